"""Job files for clusters, from a resolved run config: an sbatch script for Slurm and a SkyPilot task YAML.

Both start one torchrun per node; torchrun rendezvouses on the first node and starts one `lmforge train`
process per GPU, so a job is the multi-node form of `torchrun --nproc-per-node G -m lmforge train`
(train/parallel.py). Nothing here imports Slurm or SkyPilot: the files are text, checked by tests with
`bash -n` and yaml.safe_load. The run config travels with the job (saved beside the script, or inside it),
so the job can be explained and repeated from its files alone.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from dataclasses import dataclass
from typing import Any

import yaml

from lmforge import __version__
from lmforge.config import RunConfig
from lmforge.errors import ConfigError, UsageError

DEFAULT_PORT = 29500  # torchrun's own default rendezvous port
SLURM_PORT_SPREAD = 1000  # Slurm jobs without --port take 29500 + job id mod this, so jobs sharing a node differ
CONFIG_DELIMITER = "LMFORGE_CONFIG"  # heredoc delimiter around an embedded config
SKYPILOT_WORKSPACE = "~/lmforge-work"  # workspace on a SkyPilot node (each node has its own disk)

# What sbatch can take on an #SBATCH line without quoting: names, lists and Slurm's %x/%j log patterns.
SBATCH_WORD = re.compile(r"[A-Za-z0-9_.,:+@%/=-]+")
# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")


@dataclass(frozen=True)
class SlurmJob:
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    job_name: str
    workspace: str  # the workspace every node uses, on a filesystem they share
    log: str  # sbatch --output pattern (%x = job name, %j = job id)
    time: str | None = None  # None: the partition's default limit
    partition: str | None = None
    account: str | None = None
    port: int | None = None  # None: DEFAULT_PORT + job id mod SLURM_PORT_SPREAD


@dataclass(frozen=True)
class SkyPilotJob:
    nodes: int
    accelerators: str  # NAME:COUNT per node, e.g. H100:8
    gpus_per_node: int
    name: str
    local_workspace: str  # where this config's tokenizer and shards are prepared, copied to every node
    workspace: str = SKYPILOT_WORKSPACE
    infra: str | None = None  # aws, gcp, ... (None: SkyPilot picks the cheapest that has the GPUs)
    port: int = DEFAULT_PORT


def check_layout(cfg: RunConfig, nodes: int, procs_per_node: int) -> None:
    """The job's processes must split evenly into the config's DiLoCo sites (train/diloco.py site_groups)."""
    if nodes < 1:
        raise UsageError(f"--nodes must be at least 1, got {nodes}")
    if procs_per_node < 1:
        raise UsageError(f"--gpus-per-node must be at least 1, got {procs_per_node}")
    world = nodes * procs_per_node
    if world % cfg.sites.count:
        raise ConfigError(f"--sites.count {cfg.sites.count} does not divide the {world} processes ({nodes} nodes x "
                          f"{procs_per_node} GPUs); choose nodes x GPUs per node as a multiple of {cfg.sites.count}")


def check_port(port: int) -> None:
    if not 1024 <= port <= 65535:
        raise UsageError(f"--port must be in 1024..65535, got {port}")


def sbatch_word(flag: str, value: str) -> str:
    """A value for an #SBATCH line, which sbatch reads itself (no shell): plain words only."""
    if not SBATCH_WORD.fullmatch(value):
        raise UsageError(f"{flag} {value!r} has characters an #SBATCH line cannot carry; use letters, digits "
                         f"and _.,:+@%/=- only")
    return value


def slurm_seconds(text: str) -> int:
    """Seconds in a Slurm --time value, or UsageError naming the accepted forms."""
    match = SLURM_TIME.fullmatch(text)
    if not match:
        raise UsageError(f"--time {text!r} is not a Slurm time; use HH:MM:SS, MINUTES or DAYS-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if c is not None:  # H:M:S
        return a * 3600 + b * 60 + c
    return a * 60 + (b or 0)  # M or M:S


def slurm_time(seconds: float) -> str:
    minutes = -(-int(seconds) // 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:00"


def check_time(cfg: RunConfig, time: str) -> None:
    """A wall-clock limit shorter than the training budget would kill the job before its last checkpoint."""
    limit = slurm_seconds(time)
    if cfg.train.max_time and limit <= cfg.train.max_time:
        raise UsageError(f"--time {time} ({limit} s) is not longer than --train.max_time {cfg.train.max_time:g} s; "
                         f"Slurm would kill the job before its final checkpoint: give a longer --time")


def time_for(cfg: RunConfig) -> str | None:
    """Default --time: the training budget plus 15 minutes for start-up, evaluation and the final checkpoint;
    None (the partition's limit) when the run stops on steps, tokens or FLOPs rather than time."""
    return slurm_time(cfg.train.max_time + 15 * 60) if cfg.train.max_time else None


def describe_run(cfg: RunConfig, nodes: int, gpus: int) -> list[str]:
    """Comment lines: what the job trains, on how many processes, with which global batch."""
    world = nodes * gpus
    t = cfg.train
    tokens = world * t.batch_size * t.grad_accum * cfg.model.seq_len
    if cfg.sites.count > 1:
        layout = (f"DiLoCo, {cfg.sites.count} sites of {world // cfg.sites.count} processes, an outer step every "
                  f"{cfg.sites.sync_every} steps ({cfg.sites.wire} on the wire, link delays simulated as "
                  f"{cfg.sites.link})")
    else:
        layout = "data-parallel (DDP)"
    return [f"run {cfg.name}: {nodes} nodes x {gpus} GPUs = {world} processes, {layout}",
            (f"global batch: {world} processes x {t.batch_size} rows x {t.grad_accum} accumulated x "
             f"{cfg.model.seq_len} tokens = {tokens:,} tokens per step")]


def comment(text: str) -> str:
    """A one-line shell/YAML comment, whatever `text` holds (a newline in a path must not end the comment)."""
    return "# " + text.replace("\r", "\\r").replace("\n", "\\n")


def prepare_commands(cfg: RunConfig, workspace: str, config_path: str | None = None) -> list[str]:
    """The commands that build the tokenizer and shards this config trains on: with its saved config file, or
    with flags for the data and tokenizer settings that differ from the defaults."""
    defaults = RunConfig()

    def settings(sections: tuple[str, ...]) -> list[str]:
        if config_path:
            return ["--config", shlex.quote(config_path)]
        return [f"--{s}.{name} {shlex.quote(str(value))}" for s in sections
                for name, value in dataclasses.asdict(getattr(cfg, s)).items()
                if value != getattr(getattr(defaults, s), name)]

    ws = shlex.quote(workspace)
    return [" ".join([f"lmforge --workspace {ws} {verb}", *settings(sections)])
            for verb, sections in (("corpus build", ("data",)), ("tokenizer train", ("data", "tokenizer")),
                                   ("prepare", ("data", "tokenizer")))]


def heredoc(path_expr: str, text: str) -> list[str]:
    """Shell lines that write `text` verbatim to the file `path_expr` (a quoted heredoc: nothing expands)."""
    delimiter = CONFIG_DELIMITER
    while delimiter in text.splitlines():
        delimiter += "_"
    return [f"cat > {path_expr} <<'{delimiter}'", *text.rstrip("\n").splitlines(), delimiter]


def torchrun_lines(rendezvous: list[str], workspace: str) -> list[str]:
    """`torchrun <rendezvous flags> -m lmforge train --config "$CONFIG"`, one flag per line."""
    return [*(f"  {flag} \\" for flag in rendezvous),
            f"  -m lmforge --workspace {shlex.quote(workspace)} train --config \"$CONFIG\""]


def slurm_script(cfg: RunConfig, job: SlurmJob, config_path: str | None) -> str:
    """The sbatch script. `config_path`: the resolved config saved beside it; None embeds the config instead,
    written by the job beside its log."""
    check_layout(cfg, job.nodes, job.gpus_per_node)
    sbatch = {"job-name": job.job_name, "nodes": str(job.nodes), "ntasks-per-node": "1",
              "gpus-per-node": str(job.gpus_per_node), "cpus-per-task": str(job.cpus_per_task),
              "time": job.time, "partition": job.partition, "account": job.account, "output": job.log}
    beside_log = '"$SLURM_SUBMIT_DIR/$SLURM_JOB_NAME-$SLURM_JOB_ID.config.yaml"'
    config_ref = shlex.quote(config_path) if config_path else beside_log
    lines = [
        "#!/bin/bash",
        f"# Slurm job written by `lmforge launch slurm` (lmforge {__version__}). Submit it with: sbatch THIS_FILE",
        *map(comment, describe_run(cfg, job.nodes, job.gpus_per_node)),
        "#",
        "# Submit from the environment lmforge is installed in (sbatch passes it on to every node). Every node",
        comment(f"reads the workspace {job.workspace} (a shared filesystem), where the shards for this config"),
        "# must already be prepared, e.g. on the login node:",
        *(comment(f"  {c}") for c in prepare_commands(cfg, job.workspace, config_path)),
        "# srun starts one task per node (ntasks-per-node=1): a torchrun that starts one process per GPU.",
        *(f"#SBATCH --{key}={sbatch_word('--' + key, value)}" for key, value in sbatch.items() if value),
        "",
        "set -eu",
        ': "${SLURM_JOB_ID:?submit this script with sbatch}"',
        "",
    ]
    if config_path:
        lines += ["# the resolved run config, saved beside this script by lmforge launch", f"CONFIG={config_ref}"]
    else:
        lines += ["# the resolved run config travels inside this script; the job saves it beside its log",
                  f"CONFIG={config_ref}", *heredoc('"$CONFIG"', cfg.to_yaml())]
    port = str(job.port) if job.port else f"$(({DEFAULT_PORT} + SLURM_JOB_ID % {SLURM_PORT_SPREAD}))"
    port_note = [] if job.port else [(f"# on a port per job ({DEFAULT_PORT} + job id mod {SLURM_PORT_SPREAD}), "
                                      "so two jobs sharing a node do not collide")]
    lines += [
        "",
        "# the first node of the allocation hosts the c10d rendezvous",
        *port_note,
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"PORT={port}",
        "",
        "srun torchrun \\",
        *torchrun_lines(['--nnodes "$SLURM_NNODES"', f"--nproc-per-node {job.gpus_per_node}",
                         '--rdzv-id "$SLURM_JOB_ID"', "--rdzv-backend c10d", '--rdzv-endpoint "$HEAD:$PORT"'],
                        job.workspace),
    ]
    return "\n".join(lines) + "\n"


class _TaskDumper(yaml.SafeDumper):
    """safe_dump, with multi-line strings (setup, run) as readable literal blocks."""


_TaskDumper.add_representer(str, lambda dumper, s: dumper.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def skypilot_task(cfg: RunConfig, job: SkyPilotJob) -> dict[str, Any]:
    """The SkyPilot task as a mapping: `num_nodes` nodes with `accelerators` each, the repository as workdir,
    this config's tokenizer and shards copied from the local workspace, the resolved config inside `run`."""
    check_layout(cfg, job.nodes, job.gpus_per_node)
    tokenizer = cfg.tokenizer_name()
    local = job.local_workspace.rstrip("/")
    run = [
        *map(comment, describe_run(cfg, job.nodes, job.gpus_per_node)),
        "set -eu",
        "# the resolved run config travels inside this task",
        "mkdir -p ~/lmforge-launch",
        f"CONFIG=~/lmforge-launch/{shlex.quote(cfg.name + '.config.yaml')}",
        *heredoc('"$CONFIG"', cfg.to_yaml()),
        "# the first node (first line of SKYPILOT_NODE_IPS) hosts the rendezvous",
        'HEAD=$(echo "$SKYPILOT_NODE_IPS" | head -n1)',
        "torchrun \\",
        *torchrun_lines(['--nnodes "$SKYPILOT_NUM_NODES"', '--nproc-per-node "$SKYPILOT_NUM_GPUS_PER_NODE"',
                         '--node-rank "$SKYPILOT_NODE_RANK"', '--master-addr "$HEAD"', f"--master-port {job.port}"],
                        job.workspace),
    ]
    resources: dict[str, Any] = {"accelerators": job.accelerators}
    if job.infra:
        resources["infra"] = job.infra
    return {
        "name": job.name,
        "num_nodes": job.nodes,
        "resources": resources,
        "workdir": ".",  # the lmforge checkout `sky launch` runs in; .gitignore'd files (lmforge-work/) stay behind
        "file_mounts": {f"{job.workspace}/tokenizers/{tokenizer}": f"{local}/tokenizers/{tokenizer}",
                        f"{job.workspace}/shards/{tokenizer}": f"{local}/shards/{tokenizer}"},
        "setup": "pip install -e .\n",
        "run": "\n".join(run) + "\n",
    }


def cluster_name(name: str) -> str:
    """A SkyPilot cluster name for a run name: lower case letters, digits and dashes, starting with a letter."""
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
    return cleaned if cleaned[:1].isalpha() else f"lmforge-{cleaned}".rstrip("-")


def skypilot_yaml(cfg: RunConfig, job: SkyPilotJob) -> str:
    header = [f"SkyPilot task written by `lmforge launch skypilot` (lmforge {__version__}).",
              f"Launch it from the lmforge checkout with: sky launch -c {cluster_name(job.name)} THIS_FILE",
              f"Every node gets this config's tokenizer and shards from {job.local_workspace}; prepare them first:",
              *(f"  {c}" for c in prepare_commands(cfg, job.local_workspace)),
              f"Checkpoints land in {job.workspace} on the first node: `sky rsync-down` them before `sky down`."]
    task = yaml.dump(skypilot_task(cfg, job), Dumper=_TaskDumper, sort_keys=False)
    return "".join(comment(line) + "\n" for line in header) + task


def parse_accelerators(text: str) -> tuple[str, int]:
    """'H100:8' -> ('H100', 8); 'H100' -> ('H100', 1)."""
    name, _, count = text.partition(":")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or (count and not count.isdigit()) or count == "0":
        raise UsageError(f"--accelerators {text!r} is not NAME:COUNT with a whole number of GPUs per node; "
                         f"e.g. H100:8 (`sky show-gpus` lists names)")
    return name, int(count or 1)
