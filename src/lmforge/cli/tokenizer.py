"""`lmforge tokenizer train`: a byte-level BPE tokenizer for a corpus."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, Iterator

from lmforge.cli.common import add_config_arguments, config_from_args, err, out, progress_bar, workspace_of
from lmforge.config import RunConfig
from lmforge.data.corpus import iter_corpus_texts, load_corpus
from lmforge.data.tokenizer import Tokenizer, train_tokenizer
from lmforge.errors import DataError
from lmforge.workspace import Workspace

HELP = "train a byte-level BPE tokenizer on a corpus"
DESCRIPTION = """\
Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) on the training split of a built corpus and save
it as <workspace>/tokenizers/<corpus>-bpe<vocab>/tokenizer.json. Any text round-trips exactly. Special tokens
for document boundaries and chat roles are reserved (ids 0-5). Skipped when an up-to-date tokenizer exists
(same corpus content and settings) unless --force.

examples:
  lmforge tokenizer train
  lmforge tokenizer train --data.name notes --tokenizer.vocab_size 8192
"""

TRAINED_ON = "trained_on.json"  # what the tokenizer was trained from, to tell whether it is up to date


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("train",), help="train a tokenizer")
    p.add_argument("--force", action="store_true", help="retrain even if an up-to-date tokenizer exists")
    add_config_arguments(p, ("data", "tokenizer"))


def take_bytes(texts: Iterator[str], budget: int, progress: Callable[[int, int | None], None]) -> Iterator[str]:
    """The texts until about `budget` UTF-8 bytes have been yielded (all when budget is 0), reporting bytes."""
    used = 0
    for text in texts:
        yield text
        n = len(text.encode("utf-8"))
        progress(n, None)
        used += n
        if budget and used >= budget:
            return


def up_to_date(out_dir: Path, recipe: dict) -> bool:
    """True when the tokenizer in out_dir was trained from this recipe and still loads."""
    try:
        if json.loads((out_dir / TRAINED_ON).read_text()) != recipe:
            return False
        Tokenizer.load(out_dir)
        return True
    except (OSError, ValueError, DataError):
        return False


def train(cfg: RunConfig, workspace: Workspace, *, force: bool = False) -> Tokenizer:
    corpus_dir = workspace.corpus_dir(cfg.data.corpus_name())
    stats = load_corpus(corpus_dir)
    out_dir = workspace.tokenizer_dir(cfg.tokenizer_name())
    recipe = {"source_hash": stats.source_hash, "vocab_size": cfg.tokenizer.vocab_size,
              "min_frequency": cfg.tokenizer.min_frequency, "train_bytes": cfg.tokenizer.train_bytes}
    if not force and up_to_date(out_dir, recipe):
        err.print(f"tokenizer {cfg.tokenizer_name()} is up to date (use --force to retrain)")
        return Tokenizer.load(out_dir)
    budget = cfg.tokenizer.train_bytes
    total = min(budget, stats.train_bytes) if budget else stats.train_bytes
    with progress_bar(f"tokenizer {cfg.tokenizer_name()}", total=total, unit="bytes") as progress:
        texts = take_bytes(iter_corpus_texts(corpus_dir, "train"), budget, progress)
        tokenizer = train_tokenizer(texts, cfg.tokenizer.vocab_size, out_dir,
                                    min_frequency=cfg.tokenizer.min_frequency)
    (out_dir / TRAINED_ON).write_text(json.dumps(recipe))
    return tokenizer


def run(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    cfg = config_from_args(args)
    tokenizer = train(cfg, workspace, force=args.force)
    sample = "def hello(name):\n    return f'hi {name}'"
    ids = tokenizer.encode(sample)
    out.print(f"tokenizer {tokenizer.path} | vocab {tokenizer.vocab_size:,} | sha256 {tokenizer.hash[:12]}")
    out.print(f"example: {len(sample)} characters -> {len(ids)} tokens: "
              + " ".join(repr(tokenizer.decode([i])) for i in ids[:12]) + (" ..." if len(ids) > 12 else ""))
    err.print(f"next: lmforge prepare --data.name {cfg.data.corpus_name()} "
              f"--tokenizer.vocab_size {cfg.tokenizer.vocab_size}")
    return 0
