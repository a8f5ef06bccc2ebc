"""`lmforge prepare`: tokenize a corpus into flat token shards (a no-op when they are up to date)."""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from lmforge.cli.common import add_config_arguments, config_from_args, err, human, out, progress_bar, workspace_of
from lmforge.config import RunConfig
from lmforge.data.corpus import load_corpus
from lmforge.data.shards import prepare_shards
from lmforge.data.tokenizer import Tokenizer
from lmforge.workspace import Workspace

HELP = "tokenize a corpus into token shards for training"
DESCRIPTION = """\
Encode every document of the corpus with the trained tokenizer (on all cores) into flat uint16/uint32 files
<workspace>/shards/<corpus>-bpe<vocab>/{train,val}.bin with an index.json (token counts, tokenizer hash,
source hash). Re-running on the same inputs does nothing; shards built from another corpus or tokenizer are
detected as stale and rebuilt.

examples:
  lmforge prepare                                  # stdlib corpus, default vocabulary
  lmforge prepare --data.name notes --tokenizer.vocab_size 8192
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ("data", "tokenizer"))


def prepare(cfg: RunConfig, workspace: Workspace) -> dict[str, Any]:
    corpus_dir = workspace.corpus_dir(cfg.data.corpus_name())
    load_corpus(corpus_dir)  # a clear error if the corpus was never built
    tokenizer = Tokenizer.load(workspace.tokenizer_dir(cfg.tokenizer_name()))
    with progress_bar("tokenize", unit="bytes") as progress:
        return prepare_shards(corpus_dir, tokenizer, workspace.shards_dir(cfg.tokenizer_name()),
                              token_dtype=cfg.data.token_dtype, progress=progress)


def shards_table(name: str, index: dict[str, Any]) -> Table:
    table = Table(title=f"shards {name} ({index['dtype']}, vocab {index['vocab_size']:,})", title_justify="left")
    for col in ("split", "documents", "tokens", "text bytes", "bytes/token"):
        table.add_column(col, justify="right")
    for split in ("train", "val"):
        s = index["splits"][split]
        table.add_row(split, f"{s['n_docs']:,}", f"{s['n_tokens']:,}", human(s["n_bytes"], "B"),
                      f"{s['n_bytes'] / max(s['n_tokens'], 1):.2f}")
    return table


def run(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    cfg = config_from_args(args)
    index = prepare(cfg, workspace)
    out.print(shards_table(cfg.tokenizer_name(), index))
    err.print(f"next: lmforge train --data.name {cfg.data.corpus_name()} "
              f"--tokenizer.vocab_size {cfg.tokenizer.vocab_size} --train.max_time 300")
    return 0
