"""`lmforge launch`: write a Slurm sbatch script or a SkyPilot task that trains a run config on several nodes."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from rich.markup import escape

from lmforge.atomic import write_file_atomic
from lmforge.cli.common import add_config_arguments, config_from_args, err, workspace_of
from lmforge.config import RunConfig
from lmforge.dist.launch import (DEFAULT_PORT, SBATCH_WORD, SKYPILOT_WORKSPACE, SLURM_PORT_SPREAD, SkyPilotJob,
                                 SlurmJob, check_port, check_time, cluster_name, parse_accelerators, skypilot_yaml,
                                 slurm_script, time_for)
from lmforge.errors import UsageError
from lmforge.train.loop import default_run_name
from lmforge.workspace import Workspace

# Default --cpus-per-task: 8 per GPU. Data loading is memmap reads, so a few cores per process suffice, and GPU
# nodes have 12-24 cores per GPU, so the request fits common partitions.
CPUS_PER_GPU = 8

HELP = "write a Slurm sbatch script or a SkyPilot task YAML that trains a config on several GPU nodes"
DESCRIPTION = """\
Write the job file that trains this config on N nodes: one torchrun per node, rendezvous on the first node,
one `lmforge train` process per GPU. The config is resolved here (defaults < --config YAML < flags) and
travels with the job: saved beside the script with --out (FILE's stem + .config.yaml), else inside it.
Neither Slurm nor SkyPilot is needed to write the files. The job trains on shards already prepared in its
workspace; the file's comments give the commands.

  slurm      an sbatch script: srun starts torchrun on every node, c10d rendezvous on the first node
  skypilot   a SkyPilot task YAML: `pip install -e .` as setup, torchrun with SkyPilot's node variables

examples:
  lmforge launch slurm --config my.yaml --nodes 4 --gpus-per-node 8 --partition gpu --time 24:00:00 --out job.sbatch
  lmforge launch slurm --config my.yaml --nodes 2 --gpus-per-node 8 --sites 2 --sync-every 100 --link starlink
  lmforge launch skypilot --config my.yaml --nodes 2 --accelerators H100:8 --cloud aws --out task.yaml
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True, parser_class=type(p))
    slurm = targets.add_parser("slurm", help="write an sbatch script (srun + torchrun, c10d rendezvous)",
                               description="Write an sbatch script that trains the config on --nodes nodes.",
                               allow_abbrev=False)
    slurm.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes to allocate")
    slurm.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                       help="GPUs per node; torchrun starts one training process per GPU")
    slurm.add_argument("--cpus-per-task", type=int, metavar="N", help=f"CPU cores per node for its G processes "
                       f"(default {CPUS_PER_GPU} x G)")
    slurm.add_argument("--time", metavar="HH:MM:SS", help="wall-clock limit (default: --train.max_time plus 15 "
                       "minutes when it is set, else the partition's limit)")
    slurm.add_argument("--partition", metavar="P", help="Slurm partition (default: the cluster's)")
    slurm.add_argument("--account", metavar="A", help="Slurm account to charge (default: yours)")
    slurm.add_argument("--job-name", metavar="NAME", help="Slurm job name (default: the run name)")
    slurm.add_argument("--workspace-dir", metavar="DIR", help="the workspace every node uses, on a shared "
                       "filesystem (default: this machine's workspace)")
    slurm.add_argument("--port", type=int, metavar="PORT", help=f"rendezvous port on the first node (default "
                       f"{DEFAULT_PORT} + job id mod {SLURM_PORT_SPREAD})")
    sky = targets.add_parser("skypilot", help="write a SkyPilot task YAML",
                             description="Write a SkyPilot task that trains the config on --nodes nodes.",
                             allow_abbrev=False)
    sky.add_argument("--nodes", type=int, required=True, metavar="N", help="nodes to launch")
    sky.add_argument("--accelerators", required=True, metavar="NAME:COUNT",
                     help="GPUs per node, as SkyPilot names them (e.g. H100:8; `sky show-gpus` lists them)")
    sky.add_argument("--cloud", metavar="INFRA", help="where to run: aws, gcp, azure, kubernetes, ... (SkyPilot's "
                     "resources.infra; default: the cheapest that has the GPUs)")
    sky.add_argument("--workspace-dir", metavar="DIR", default=SKYPILOT_WORKSPACE, help="the workspace on each "
                     f"node, which gets this config's tokenizer and shards from this machine's (default "
                     f"{SKYPILOT_WORKSPACE})")
    sky.add_argument("--port", type=int, default=DEFAULT_PORT, metavar="PORT",
                     help=f"rendezvous port on the first node (default {DEFAULT_PORT})")
    for sub in (slurm, sky):
        sub.add_argument("--out", metavar="FILE", help="write the job file (atomically) instead of printing it")
        sub.add_argument("--force", action="store_true", help="overwrite --out (and its config) if they exist")
        sub.add_argument("--sites", type=int, dest="cfg:sites.count", default=argparse.SUPPRESS, metavar="K",
                         help="train K sites with DiLoCo (= --sites.count); nodes x GPUs must be a multiple of K")
        sub.add_argument("--sync-every", type=int, dest="cfg:sites.sync_every", default=argparse.SUPPRESS,
                         metavar="H", help="DiLoCo: inner steps between outer steps (= --sites.sync_every)")
        sub.add_argument("--link", dest="cfg:sites.link", default=argparse.SUPPRESS, metavar="LINK",
                         help="the link between sites: a preset or 'up=..,down=..,latency=..' (= --sites.link)")
        add_config_arguments(sub, ("run", "data", "tokenizer", "model", "train", "meter", "sites"))
        sub.set_defaults(parser=sub)


def resolved_config(args: argparse.Namespace) -> RunConfig:
    """The run config, with its run name fixed now (every node must write to the same run folder)."""
    cfg = config_from_args(args)
    cfg.require_stop_condition()  # fail here, not after the job waited in a queue
    return cfg if cfg.name else dataclasses.replace(cfg, name=default_run_name(cfg))


def check_out(path: Path, force: bool) -> None:
    if path.is_dir():
        raise UsageError(f"--out {path} is a folder; name a file, e.g. {path / 'job.sbatch'}")
    if not path.parent.is_dir():
        raise UsageError(f"the folder of --out {path} does not exist; create it or choose another --out")
    if path.exists() and not force:
        raise UsageError(f"{path} exists; pass --force to overwrite it, or choose another --out")


def note_unprepared(cfg: RunConfig, workspace: Path, where: str) -> None:
    shards = Workspace(workspace).shards_dir(cfg.tokenizer_name())
    if not (shards / "index.json").is_file():
        err.print(f"note: no shards for this config in {escape(str(shards))} yet; prepare them {where} before the "
                  f"job starts (the commands are in the file's comments)")


def launch_slurm(args: argparse.Namespace, cfg: RunConfig) -> int:
    if args.port is not None:
        check_port(args.port)
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise UsageError(f"--cpus-per-task must be at least 1, got {args.cpus_per_task}")
    if args.time:
        check_time(cfg, args.time)
    workspace = Path(args.workspace_dir).expanduser().absolute() if args.workspace_dir else workspace_of(args).root
    out = Path(args.out).absolute() if args.out else None
    config_path = out.with_name(out.stem + ".config.yaml") if out else None
    if out and not SBATCH_WORD.fullmatch(str(out.parent)):
        raise UsageError(f"the folder of --out {out} has characters an #SBATCH line cannot carry (the job log goes "
                         f"there); write the script to a folder whose path has no spaces or quotes")
    job = SlurmJob(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                   cpus_per_task=args.cpus_per_task or CPUS_PER_GPU * args.gpus_per_node,
                   job_name=args.job_name or cfg.name, workspace=str(workspace),
                   log=str(out.parent / "%x-%j.out") if out else "%x-%j.out", time=args.time or time_for(cfg),
                   partition=args.partition, account=args.account, port=args.port)
    script = slurm_script(cfg, job, str(config_path) if config_path else None)
    if out:
        check_out(out, args.force)
        check_out(config_path, args.force)
    note_unprepared(cfg, workspace, "on the cluster")
    if out is None:
        print(script, end="")
        return 0
    write_file_atomic(config_path, cfg.to_yaml().encode())  # first: the script never names a missing config
    write_file_atomic(out, script.encode())
    err.print(f"wrote {escape(str(out))} and its config {escape(str(config_path))}; submit with: "
              f"sbatch {escape(str(out))}")
    return 0


def launch_skypilot(args: argparse.Namespace, cfg: RunConfig) -> int:
    check_port(args.port)
    name, gpus = parse_accelerators(args.accelerators)
    if not args.workspace_dir.startswith(("/", "~/")):
        raise UsageError(f"--workspace-dir {args.workspace_dir!r} must be absolute or start with ~/ (a path on "
                         f"each node)")
    if args.cloud is not None and not re.fullmatch(r"[a-z0-9/_-]+", args.cloud):
        raise UsageError(f"--cloud {args.cloud!r} is not a SkyPilot infra name; e.g. aws, gcp, aws/us-east-1")
    local = workspace_of(args).root
    job = SkyPilotJob(nodes=args.nodes, accelerators=f"{name}:{gpus}", gpus_per_node=gpus, name=cfg.name,
                      local_workspace=str(local), workspace=args.workspace_dir.rstrip("/"), infra=args.cloud,
                      port=args.port)
    text = skypilot_yaml(cfg, job)
    out = Path(args.out).absolute() if args.out else None
    if out:
        check_out(out, args.force)
    note_unprepared(cfg, local, "on this machine")
    if out is None:
        print(text, end="")
        return 0
    write_file_atomic(out, text.encode())
    err.print(f"wrote {escape(str(out))}; launch with: sky launch -c {cluster_name(cfg.name)} {escape(str(out))}")
    return 0


def run(args: argparse.Namespace) -> int:
    cfg = resolved_config(args)
    return launch_slurm(args, cfg) if args.target == "slurm" else launch_skypilot(args, cfg)
