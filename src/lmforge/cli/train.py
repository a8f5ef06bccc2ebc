"""`lmforge train`: train (or resume) a model on prepared shards."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from lmforge.checkpoint import latest_checkpoint, read_config
from lmforge.cli.common import (
    ProgressBar,
    add_config_arguments,
    config_from_args,
    err,
    human,
    workspace_of,
)
from lmforge.errors import CheckpointError, UsageError
from lmforge.model.sizing import describe
from lmforge.train.loop import TrainResult, train

HELP = "train a model on prepared shards (or --resume a run)"
DESCRIPTION = """\
Train a model on the shards `lmforge prepare` wrote for this config's corpus and tokenizer.
Stops at the first of --train.max_steps / max_tokens / max_flops / max_time. Every run writes
<workspace>/runs/<name>/ (config.yaml, checkpoints/) and a row in the ledger (`lmforge runs`).

examples:
  lmforge train --config my.yaml
  lmforge train --model.depth 6 --train.max_time 600 --name d6-10min
  lmforge train --resume d6-10min --train.max_steps 4000     # continue, with a later stop limit
  lmforge train --config my.yaml --nproc 4                    # data-parallel on 4 GPUs (or 4 CPU processes)

Data parallel: --nproc N starts N processes on this machine through torchrun; the same is
`torchrun --nproc-per-node N -m lmforge train ...`, which is also how to run on several nodes:
  torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m lmforge train ...
Each process takes --train.batch_size rows, so the global batch is N x batch_size (and a run resumes
with any N that keeps that product).

Across sites joined by slow links (DiLoCo): the processes form K sites that train on their own and
average what they learned every H steps, sending 1/H of DDP's traffic or less (bf16/int8 on the wire):
  lmforge train --config my.yaml --nproc 4 --sites 2 --sync-every 50 --link starlink
Every cross-site transfer is delayed to what the link would take, so the run shows the real link's wall time.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", metavar="RUN", help="continue the run RUN from its latest checkpoint, with its saved "
                   "config (flags still override single settings)")
    p.add_argument("--nproc", type=int, default=1, metavar="N", help="data-parallel processes on this machine, "
                   "started through torchrun (default 1; GPUs: one per GPU)")
    p.add_argument("--sites", type=int, dest="cfg:sites.count", default=argparse.SUPPRESS, metavar="K",
                   help="train K sites with DiLoCo (= --sites.count; the processes are split among them)")
    p.add_argument("--sync-every", type=int, dest="cfg:sites.sync_every", default=argparse.SUPPRESS, metavar="H",
                   help="DiLoCo: inner steps between outer steps (= --sites.sync_every)")
    p.add_argument("--link", dest="cfg:sites.link", default=argparse.SUPPRESS, metavar="LINK",
                   help="the link between sites: a preset or 'up=..,down=..,latency=..' (= --sites.link)")
    add_config_arguments(p, ("run", "data", "tokenizer", "model", "train", "meter", "sites"))


class ProgressReporter(ProgressBar):
    """Draws the training progress bar (loss, tok/s, MFU, ETA) and prints evaluations and checkpoints."""

    def __init__(self) -> None:
        super().__init__("train")

    def started(self, info: dict[str, Any]) -> None:
        resumed = f", resumed at step {info['resumed_at']}" if info["resumed_at"] is not None else ""
        err.print(f"run [bold]{info['run']}[/] in {info['run_dir']}{resumed}")
        err.print(f"model: {describe(info['shape'])}; {human(info['flops_per_token'])}FLOPs/token")
        err.print(f"device: {info['device']} ({info['dtype']}, compile {'on' if info['compile'] else 'off'}), "
                  f"peak {human(info['peak_flops'])}FLOP/s; energy: {info['energy_label']}")
        err.print(f"data: {human(info['train_tokens'])} training tokens, {human(info['tokens_per_step'])} per step")
        self.task = self.bar.add_task("train", total=1000, status="starting")

    def stepped(self, s: dict[str, Any]) -> None:
        mfu = f" | MFU {s['mfu'] * 100:.1f}%" if s["mfu"] is not None else ""
        self.bar.update(self.task, completed=min(1000, int(s["progress"] * 1000)),
                        status=f"step {s['step']} | loss {s['loss']:.4f} | {human(s['tok_per_s'])} tok/s{mfu}")

    def evaluated(self, s: dict[str, Any]) -> None:
        self.bar.console.print(f"step {s['step']:>6}: val loss {s['val_loss']:.4f} | val bpb {s['val_bpb']:.4f}")

    def checkpointed(self, path: Path) -> None:
        self.bar.console.print(f"step {int(path.name.split('_')[1]):>6}: checkpoint {path}")


def run_training(args: argparse.Namespace) -> TrainResult:
    workspace = workspace_of(args)
    if args.resume:
        if getattr(args, "cfg:name", None):
            raise UsageError("--name cannot be combined with --resume (the run keeps its name)")
        run_dir = workspace.run_dir(args.resume)
        if not run_dir.is_dir():
            raise CheckpointError(f"no run named '{args.resume}' to resume in {workspace.runs_dir}; "
                                  f"`lmforge runs` lists runs")
        last = latest_checkpoint(run_dir / "checkpoints")
        if last is None:
            raise CheckpointError(f"run '{args.resume}' has no checkpoint to resume from in {run_dir}; "
                                  f"start a new run with another --name")
        cfg = config_from_args(args, base=read_config(last))
    else:
        cfg = config_from_args(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 draws and prints
    with ProgressReporter() if main_rank else contextlib.nullcontext() as reporter:
        return train(cfg, workspace, resume=bool(args.resume), reporter=reporter)


def launch_torchrun(args: argparse.Namespace) -> int:
    """`lmforge train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m lmforge ...` (the same
    arguments, without --nproc)."""
    argv, skip = [], False
    for a in args.argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "lmforge", *argv]
    return subprocess.run(command, check=False).returncode


def run(args: argparse.Namespace) -> int:
    from lmforge.cli.runs import print_summary

    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_torchrun(args)
    result = run_training(args)
    if int(os.environ.get("RANK", "0")) == 0:
        print_summary(result.run_name, result.summary)
    return 0
