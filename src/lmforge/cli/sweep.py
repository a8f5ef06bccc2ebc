"""`lmforge sweep`: a small IsoFLOP grid on this machine, every run in the ledger, for `lmforge fit` and `plan`."""

from __future__ import annotations

import argparse
import dataclasses

from rich.table import Table

from lmforge.cli import corpus, prepare, tokenizer
from lmforge.cli.common import (
    add_config_arguments,
    config_from_args,
    duration,
    err,
    human,
    out,
    packaged_config,
    workspace_of,
)
from lmforge.cli.train import ProgressReporter
from lmforge.config import RunConfig, config_from_dict
from lmforge.errors import UsageError
from lmforge.meter.ledger import Ledger
from lmforge.train.loop import train

HELP = "train a small IsoFLOP grid (several sizes at each of a few FLOP budgets) for `lmforge fit`"
DESCRIPTION = """\
IsoFLOP profiles, as in Chinchilla's second approach: at each FLOP budget, train each model depth until it has
spent that budget (--train.max_flops), so every budget compares small models trained long against large models
trained briefly. Every run goes to the ledger as an ordinary training run named PREFIX-c<budget>-d<depth>; runs that
already completed are skipped, so an interrupted sweep continues where it stopped. Then `lmforge fit` fits
L(N, D) to them and `lmforge plan` uses that fit. The data are prepared first if needed (as `lmforge demo` does).
Settings come from the packaged demo config (the stdlib corpus) unless --config is given.

examples:
  lmforge sweep                                          # 3 budgets x 3 depths, under 10 minutes on 2 CPU cores
  lmforge sweep --budgets 1e13,3e13,1e14 --depths 2,3,4,6
  lmforge fit && lmforge plan --budget-flops 3e13 --device cpu
"""


def number_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(float(x)) if kind is int else kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise UsageError(f"{flag} needs at least one positive number, got {text!r}")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budgets", default="1e12,2e12,5e12", metavar="C,C,...",
                   help="training FLOP budgets (default 1e12,2e12,5e12: under 10 minutes on 2 CPU cores in all)")
    p.add_argument("--depths", default="1,2,3", metavar="D,D,...", help="model depths to train at each budget "
                   "(the depth dial: width = depth x --model.aspect_ratio; default 1,2,3)")
    p.add_argument("--prefix", default="sweep", help="run names are PREFIX-c<budget>-d<depth> (default sweep)")
    add_config_arguments(p, ("data", "tokenizer", "model", "train", "meter"))


def grid(base: RunConfig, budgets: list[float], depths: list[int], prefix: str) -> list[RunConfig]:
    """One config per (budget, depth): the base with that depth, stopping at that budget and nothing else."""
    configs = []
    for budget in budgets:
        for depth in depths:
            train_cfg = dataclasses.replace(base.train, max_flops=budget, max_steps=0, max_tokens=0, max_time=0.0,
                                            eval_every=0, checkpoint_every=0)
            cfg = dataclasses.replace(base, name=f"{prefix}-c{budget:.0e}-d{depth}".replace("+", ""),
                                      model=dataclasses.replace(base.model, depth=depth), train=train_cfg)
            configs.append(cfg.validate())
    return configs


def run(args: argparse.Namespace) -> int:
    budgets = number_list(args.budgets, float, "--budgets")
    depths = number_list(args.depths, int, "--depths")
    workspace = workspace_of(args)
    defaults = None if args.config else config_from_dict(packaged_config("demo.yaml"))
    base = config_from_args(args, base=defaults)
    configs = grid(base, budgets, depths, args.prefix)

    err.rule("data")
    corpus.build(base, workspace)
    tokenizer.train(base, workspace)
    prepare.prepare(base, workspace)
    ledger = Ledger(workspace.ledger_path)
    done = {r["name"] for r in ledger.list_runs() if r["status"] == "completed"}
    for i, cfg in enumerate(configs, 1):
        if cfg.name in done:
            err.print(f"{i}/{len(configs)} {cfg.name}: already completed, skipped")
            continue
        err.rule(f"{i}/{len(configs)} {cfg.name}")
        if workspace.run_dir(cfg.name).exists():  # an interrupted earlier attempt: continue it
            with ProgressReporter() as reporter:
                train(cfg, workspace, resume=True, reporter=reporter)
            continue
        with ProgressReporter() as reporter:
            train(cfg, workspace, reporter=reporter)

    table = Table(title=f"IsoFLOP sweep ({len(configs)} runs)", title_justify="left")
    for column in ("run", "budget", "params", "tokens", "val loss", "val bpb", "time"):
        table.add_column(column, justify="left" if column == "run" else "right")
    for cfg in configs:
        s = ledger.get_run(cfg.name)["summary"]
        table.add_row(cfg.name, human(cfg.train.max_flops), human(s.get("params")), human(s.get("tokens")),
                      f"{s['val_loss']:.4f}" if s.get("val_loss") else "-",
                      f"{s['val_bpb']:.4f}" if s.get("val_bpb") else "-", duration(s.get("wall_seconds")))
    out.print(table)
    out.print("next: lmforge fit    (L(N, D) fitted to these runs), then lmforge plan --budget-flops C --device cpu")
    return 0
