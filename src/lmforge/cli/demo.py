"""`lmforge demo`: the whole pipeline on the built-in default corpus, in about five minutes on a laptop CPU."""

from __future__ import annotations

import argparse

from lmforge.checkpoint import load_model
from lmforge.cli import corpus, prepare, tokenizer
from lmforge.cli.eval import evaluate_checkpoint
from lmforge.cli.common import add_config_arguments, config_from_args, err, out, packaged_config, workspace_of
from lmforge.cli.runs import print_summary
from lmforge.cli.train import ProgressReporter
from lmforge.config import config_from_dict
from lmforge.model.sampling import generate
from lmforge.train.loop import train

HELP = "run the whole pipeline on the built-in stdlib corpus (what `make demo` runs)"
DESCRIPTION = """\
corpus (the Python standard library on this machine, no download) -> tokenizer -> shards -> train a small model
on this machine for a few minutes -> evaluate -> print samples and the compute summary (tokens, FLOPs, MFU, time,
energy, cost, CO2) -> record the run in the ledger. Settings come from the packaged demo config; any
--section.field flag overrides them.

examples:
  lmforge demo
  lmforge demo --train.max_time 60 --model.depth 2
"""

PROMPTS = ["def ", "import os\n\n\ndef main(", "class Stack:\n    def __init__(self"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, ("run", "data", "tokenizer", "model", "train", "meter"))


def run(args: argparse.Namespace) -> int:
    workspace = workspace_of(args)
    demo_defaults = None if args.config else config_from_dict(packaged_config("demo.yaml"))
    cfg = config_from_args(args, base=demo_defaults)
    cfg.require_stop_condition()
    err.print(f"[bold]lmforge demo[/] -> workspace {workspace.root}")

    err.rule("1/6 corpus")
    stats = corpus.build(cfg, workspace)
    out.print(corpus.stats_table(cfg.data.corpus_name(), stats))
    err.rule("2/6 tokenizer")
    tok = tokenizer.train(cfg, workspace)
    out.print(f"tokenizer: vocab {tok.vocab_size:,}, {tok.path}")
    err.rule("3/6 shards")
    index = prepare.prepare(cfg, workspace)
    out.print(prepare.shards_table(cfg.tokenizer_name(), index))
    err.rule("4/6 train")
    with ProgressReporter() as reporter:
        result = train(cfg, workspace, reporter=reporter)

    err.rule("5/6 evaluate")
    result_eval = evaluate_checkpoint(workspace, result.checkpoint, "val", device="cpu")
    out.print(f"validation split, all {result_eval['tokens']:,} tokens: loss {result_eval['loss']:.4f} | "
              f"{result_eval['bpb']:.4f} bits/byte")
    err.rule("6/6 samples")
    loaded = load_model(result.checkpoint, "cpu")
    for prompt in PROMPTS:
        ids = [loaded.tokenizer.eot_id] + loaded.tokenizer.encode(prompt)
        new = list(generate(loaded.model, ids, max_new_tokens=96, temperature=0.8, top_k=50, seed=cfg.train.seed,
                            stop_ids=(loaded.tokenizer.eot_id,)))
        out.print(f"[dim]--- prompt {prompt!r} ---[/]")
        out.print(prompt + loaded.tokenizer.decode(new), markup=False)
    print_summary(result.run_name, result.summary)
    out.print(f"\nrun folder: {result.run_dir}\nnext:\n  lmforge runs show {result.run_name}\n"
              f"  lmforge generate --ckpt {result.run_name} \"def fib(n):\"\n  lmforge eval --ckpt {result.run_name}\n"
              f"  lmforge serve --ckpt {result.run_name}    # OpenAI-compatible API on http://127.0.0.1:8000/v1")
    return 0
