"""`lmforge train`: train (or resume) a model on prepared shards."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
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
from lmforge.config import RunConfig
from lmforge.dist.quorum import RunEnded
from lmforge.train.loop import TrainResult, default_run_name, train

SITE_JOB = "LMFORGE_SITE_JOB"  # set in the jobs `launch_sites` starts: they train, and launch nothing

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
average what they learned every H steps, sending 1/H of DDP's traffic or less (bf16/int8/nf4 on the wire):
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

    def noted(self, step: int, text: str) -> None:
        self.bar.console.print(f"step {step:>6}: {text}")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    """The run's config: the flags over the defaults, or over the saved config of the run to --resume."""
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
        return config_from_args(args, base=read_config(last))
    return config_from_args(args)


def run_training(args: argparse.Namespace) -> TrainResult:
    workspace, cfg = workspace_of(args), resolve_config(args)
    main_rank = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 draws and prints
    with ProgressReporter() if main_rank else contextlib.nullcontext() as reporter:
        return train(cfg, workspace, resume=bool(args.resume), reporter=reporter)


def without_nproc(argv: list[str]) -> list[str]:
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            kept.append(a)
    return kept


def torchrun(nproc: int, argv: list[str]) -> list[str]:
    """The command `torchrun --standalone --nproc-per-node N -m lmforge ARGV` (one process: no torchrun)."""
    if nproc == 1:
        return [sys.executable, "-m", "lmforge", *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lmforge", *argv]


def launch_torchrun(args: argparse.Namespace) -> int:
    """`lmforge train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m lmforge ...` (the same
    arguments, without --nproc)."""
    return subprocess.run(torchrun(args.nproc, without_nproc(args.argv)), check=False).returncode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_sites(args: argparse.Namespace, cfg: RunConfig) -> int:
    """Fault-tolerant DiLoCo on this machine: one job per site (torchrun for the site's share of --nproc), all
    meeting at the store site 0 serves. A site other than 0 that fails is started again, up to
    --sites.restarts times, and catches up at the next outer step; the run ends when site 0 does."""
    sites = cfg.sites.count
    if args.nproc % sites:
        raise UsageError(f"--nproc {args.nproc} is not a multiple of --sites.count {sites}; each site runs "
                         f"nproc / sites processes (e.g. --nproc {sites})")
    workspace = workspace_of(args)
    name = args.resume or cfg.name or default_run_name(cfg)
    store = f"127.0.0.1:{free_port()}"  # the sites are all on this machine (a saved config may name an old port)
    argv = without_nproc(args.argv) + ([] if args.resume or cfg.name else ["--name", name])
    logs = workspace.root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, SITE_JOB: "1"}

    def start(site: int) -> subprocess.Popen:
        command = torchrun(args.nproc // sites, [*argv, "--sites.site", str(site), "--sites.store", store])
        if site == 0:  # site 0 draws the progress bar and prints the summary
            return subprocess.Popen(command, env=env)
        with open(logs / f"{name}-site{site}.log", "ab") as log:
            return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)

    err.print(f"{sites} sites, {args.nproc // sites} process(es) each, meeting at {store}; the other sites' "
              f"output goes to {logs}/{name}-site<N>.log")
    jobs = {site: start(site) for site in range(sites)}
    restarts = dict.fromkeys(range(1, sites), cfg.sites.restarts)
    interrupts = 0
    try:
        while True:
            try:
                code = jobs[0].wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:  # the first stops every site after its step (with a checkpoint); a second now
                interrupts += 1
                for job in jobs.values():
                    job.send_signal(signal.SIGINT if interrupts == 1 else signal.SIGTERM)
                continue
            for site, job in list(jobs.items())[1:]:
                if job.poll() not in (None, 0) and not interrupts:
                    log = logs / f"{name}-site{site}.log"
                    if restarts[site] > 0:
                        restarts[site] -= 1
                        err.print(f"site {site} failed (exit {job.returncode}; see {log}); starting it again "
                                  f"({restarts[site]} restart(s) left)")
                        jobs[site] = start(site)
                    else:
                        err.print(f"site {site} failed (exit {job.returncode}; see {log}) and has no restarts left; "
                                  f"the others go on without it")
                        del jobs[site]
        deadline = time.monotonic() + cfg.sites.drop_after + 60
        for job in list(jobs.values())[1:]:  # they finish with site 0 (a site still waiting to rejoin ends too)
            with contextlib.suppress(subprocess.TimeoutExpired):
                job.wait(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.terminate()
                job.wait()
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def run(args: argparse.Namespace) -> int:
    from lmforge.cli.runs import print_summary

    if args.nproc < 1:
        raise UsageError(f"--nproc must be at least 1, got {args.nproc}")
    if "WORLD_SIZE" not in os.environ and SITE_JOB not in os.environ:
        cfg = resolve_config(args)
        # one job per site on this machine, unless this command is one site of a run spread over machines
        one_site = any(hasattr(args, f"cfg:sites.{key}") for key in ("site", "store"))
        if cfg.sites.count > 1 and cfg.sites.drop_after > 0 and not one_site:
            return launch_sites(args, cfg)
        if args.nproc > 1:
            return launch_torchrun(args)
    try:
        result = run_training(args)
    except RunEnded as e:  # a site that came back too late: the others have finished the run
        err.print(str(e))
        return 0
    if int(os.environ.get("RANK", "0")) == 0 and result.summary.get("site", 0) == 0:
        print_summary(result.run_name, result.summary)
    return 0
