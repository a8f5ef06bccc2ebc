"""`lmforge corpus`: build a corpus (documents + deterministic train/val split) from a source, or inspect one."""

from __future__ import annotations

import argparse

from rich.table import Table

from lmforge.cli.common import add_config_arguments, config_from_args, err, human, out, progress_bar, workspace_of
from lmforge.config import RunConfig
from lmforge.data.corpus import CorpusStats, build_corpus, load_corpus
from lmforge.workspace import Workspace

HELP = "build a corpus from text files, .jsonl, .parquet or the stdlib default; or show one"
DESCRIPTION = """\
Read documents from --data.source, split them into train/validation by a hash of each document, and cache
them in <workspace>/corpora/<name>/. Non-UTF-8 bytes are replaced and counted; binary files are skipped and
counted. The default source is the Python standard library on this machine (no download).

examples:
  lmforge corpus build                                   # the stdlib default
  lmforge corpus build --data.source ~/notes --data.glob '**/*.md'
  lmforge corpus build --data.source books.jsonl --data.text_field body
  lmforge corpus show stdlib
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("build", "show"), help="build a corpus, or show a built one's statistics")
    p.add_argument("corpus_name", nargs="?", metavar="NAME", help="corpus to show (default: from the config)")
    add_config_arguments(p, ("data",))


def stats_table(name: str, s: CorpusStats) -> Table:
    table = Table(title=f"corpus {name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in [
        ("source", f"{s.source} ({s.format})"),
        ("documents", f"{s.n_docs:,} ({s.train_docs:,} train, {s.val_docs:,} validation)"),
        ("text", f"{human(s.n_bytes, 'B')} ({human(s.train_bytes, 'B')} train, {human(s.val_bytes, 'B')} validation)"),
        ("files read", f"{s.n_files:,}"),
        ("skipped", f"{s.n_binary_skipped:,} binary, {s.n_empty_skipped:,} empty"),
        ("invalid UTF-8", f"{s.n_replaced_chars:,} byte sequences replaced with U+FFFD"),
        ("source hash", s.source_hash[:16]),
    ]:
        table.add_row(key, value)
    return table


def build(cfg: RunConfig, workspace: Workspace) -> CorpusStats:
    name = cfg.data.corpus_name()
    with progress_bar(f"corpus {name}", unit="bytes") as progress:
        stats = build_corpus(cfg.data.source, workspace.corpus_dir(name), format=cfg.data.format,
                             glob=cfg.data.glob, text_field=cfg.data.text_field,
                             val_fraction=cfg.data.val_fraction, progress=progress)
    return stats


def run(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    cfg = config_from_args(args)
    if args.action == "build":
        stats = build(cfg, workspace)
        out.print(stats_table(cfg.data.corpus_name(), stats))
        err.print(f"next: lmforge tokenizer train --data.name {cfg.data.corpus_name()}")
    else:
        name = args.corpus_name or cfg.data.corpus_name()
        out.print(stats_table(name, load_corpus(workspace.corpus_dir(name))))
    return 0
