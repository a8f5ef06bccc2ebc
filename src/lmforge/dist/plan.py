"""What-if for training across sites: how long a config's run takes over a given link, for DDP and for DiLoCo.

Closed-form, nothing runs. Compute per step comes from model sizing (FLOPs per token) and an assumed fraction of
the device's peak; communication from the link's ring all-reduce cost (lmforge.dist.link). Assumptions, all
stated in the output:
- each site is one device running the config's micro-batches (batch_size x grad_accum x seq_len tokens per step),
  so the global batch is `sites` times that; traffic inside a site is free;
- DDP all-reduces fp32 gradients of every parameter after every step and the link is never overlapped with
  compute (over slow links the all-reduce dwarfs the backward pass it could hide behind);
- DiLoCo all-reduces the pseudo-gradient (every parameter) once per outer step of H inner steps, in the wire
  precision, also not overlapped; a last sync ends the run, so a run of S steps syncs ceil(S / H) times (with
  sync_by lr, as often as the learning-rate schedule over S steps calls for, plus one per checkpoint between
  them: exchanges_in_run in train/schedule.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.config import SYNC_BY, RunConfig
from lmforge.dist.link import Link, all_reduce_bytes_sent
from lmforge.errors import ConfigError
from lmforge.model.sizing import count_params, flops_per_token, shape_from_depth
from lmforge.train.schedule import exchanges_in_run

WIRES = ("fp32", "bf16", "int8", "nf4")
INT8_BLOCK = 256  # elements sharing one fp32 scale: 4 / 256 = 1.6% overhead on the 1 byte per element
NF4_BLOCK = 128  # on an nf4 wire: 4 / 128 bytes of scale on the half byte per element (6%)
DEFAULT_MFU = 0.4  # what tuned dense-transformer training reaches on A100/H100 (PaLM reports 46%)
DEFAULT_SYNC_EVERY = 100  # DiLoCo's paper uses H = 500 on long runs; 100 keeps several outer steps in short ones


def wire_bytes(numel: int, wire: str) -> int:
    """Bytes of `numel` values on the wire: fp32 4, bf16 2, int8 1 plus one fp32 scale per INT8_BLOCK values, nf4
    a half plus one fp32 scale per NF4_BLOCK values."""
    if wire == "fp32":
        return 4 * numel
    if wire == "bf16":
        return 2 * numel
    if wire == "int8":
        return numel + 4 * math.ceil(numel / INT8_BLOCK)
    if wire == "nf4":
        blocks = math.ceil(numel / NF4_BLOCK)
        return blocks * NF4_BLOCK // 2 + 4 * blocks
    raise ConfigError(f"unknown wire precision {wire!r}; use one of {', '.join(WIRES)}")


@dataclass
class StrategyPlan:
    """One way of training the run across sites, and what the link makes of it."""

    strategy: str  # "ddp" or "diloco"
    sync_every: int  # steps between all-reduces (1 for DDP)
    sync_by: str  # "steps", or "lr": sync_every steps' worth of learning rate
    wire: str  # precision on the wire
    payload_bytes: int  # the tensor one all-reduce carries
    syncs: int  # all-reduces in the whole run
    seconds_per_sync: float
    comm_seconds_per_step: float  # averaged over the run
    compute_seconds: float  # whole run
    comm_seconds: float  # whole run, all of it exposed (see the module docstring)
    wall_seconds: float
    utilisation: float  # compute / (compute + exposed communication)
    bytes_sent_per_site: float  # whole run, payload bytes


@dataclass
class LinkPlan:
    """The run, the link, and both strategies over it."""

    sites: int
    link: dict[str, Any]  # name, up_bps, down_bps, latency_s, source
    params: int
    flops_per_token: float
    tokens_per_step: int  # all sites together
    steps: int
    tokens: int
    steps_from: str  # which stop limit set the step count, in words
    peak_flops: float  # one device, FLOP/s
    mfu: float
    compute_seconds_per_step: float
    ddp: StrategyPlan
    diloco: StrategyPlan

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def strategy_plan(strategy: str, link: Link, sites: int, params: int, steps: int, step_seconds: float,
                  sync_every: int, sync_by: str, syncs: int, wire: str) -> StrategyPlan:
    payload = wire_bytes(params, wire)
    per_sync = link.all_reduce_seconds(payload, sites)
    compute, comm = steps * step_seconds, syncs * per_sync
    return StrategyPlan(
        strategy=strategy, sync_every=sync_every, sync_by=sync_by, wire=wire, payload_bytes=payload, syncs=syncs,
        seconds_per_sync=per_sync, comm_seconds_per_step=comm / steps, compute_seconds=compute, comm_seconds=comm,
        wall_seconds=compute + comm, utilisation=compute / (compute + comm) if compute + comm else 1.0,
        bytes_sent_per_site=syncs * all_reduce_bytes_sent(payload, sites),
    )


def run_steps(cfg: RunConfig, tokens_per_step: int, flops_per_step: float, step_seconds: float) -> tuple[int, str]:
    """Steps the config's nearest stop limit allows, and which limit that was.

    max_time is a wall-clock budget; it is turned into the steps it buys at compute speed, so the plan holds
    the work fixed and shows how much longer the link makes it.
    """
    t = cfg.train
    limits = []
    if t.max_steps:
        limits.append((t.max_steps, f"--train.max_steps {t.max_steps:,}"))
    if t.max_tokens:
        limits.append((math.ceil(t.max_tokens / tokens_per_step), f"--train.max_tokens {t.max_tokens:,}"))
    if t.max_flops:
        limits.append((math.ceil(t.max_flops / flops_per_step), f"--train.max_flops {t.max_flops:g}"))
    if t.max_time:
        limits.append((max(1, math.floor(t.max_time / step_seconds)),
                       f"--train.max_time {t.max_time:g} s at compute speed, without communication"))
    if not limits:
        raise ConfigError("the config has no stop condition to plan for; set --train.max_steps, --train.max_tokens, "
                          "--train.max_flops or --train.max_time")
    return min(limits)


def plan_link(cfg: RunConfig, *, sites: int, link: Link, peak_flops: float, mfu: float = DEFAULT_MFU,
              sync_every: int = DEFAULT_SYNC_EVERY, sync_by: str = "steps", wire: str = "fp32") -> LinkPlan:
    """Predict the run in `cfg` across `sites` sites joined by `link`, each site one device of `peak_flops`."""
    if not isinstance(sites, int) or sites < 2:
        raise ConfigError(f"--sites must be at least 2 (one site sends nothing across a link), got {sites}")
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ConfigError(f"--sync-every must be a positive number of steps, got {sync_every}")
    if sync_by not in SYNC_BY:
        raise ConfigError(f"--sync-by must be one of {', '.join(SYNC_BY)}, got {sync_by!r}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}; 0.4 is typical for tuned GPU training")
    if not peak_flops > 0:
        raise ConfigError(f"the device's peak must be positive, got {peak_flops} FLOP/s; pass --device-tflops X")
    wire_bytes(1, wire)  # rejects an unknown wire precision before any arithmetic
    m = cfg.model
    shape = shape_from_depth(m.depth, cfg.tokenizer.vocab_size, m.seq_len, aspect_ratio=m.aspect_ratio,
                             head_dim=m.head_dim, kv_group=m.kv_group, qk_norm=m.qk_norm,
                             tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta)
    params = count_params(shape)["total"]
    fpt = flops_per_token(shape, m.seq_len)
    site_tokens = cfg.train.batch_size * cfg.train.grad_accum * m.seq_len
    step_seconds = fpt * site_tokens / (peak_flops * mfu)
    tokens_per_step = sites * site_tokens
    steps, steps_from = run_steps(cfg, tokens_per_step, fpt * tokens_per_step, step_seconds)
    t = cfg.train
    syncs = exchanges_in_run(steps, sync_every, sync_by, warmup_steps=t.warmup_steps, decay_frac=t.decay_frac,
                             min_lr_frac=t.min_lr_frac, checkpoint_every=t.checkpoint_every)
    link_info = {"name": link.name, "up_bps": link.up_bps, "down_bps": link.down_bps, "latency_s": link.latency_s,
                 "source": link.source}
    return LinkPlan(
        sites=sites, link=link_info, params=params, flops_per_token=fpt, tokens_per_step=tokens_per_step,
        steps=steps, tokens=steps * tokens_per_step, steps_from=steps_from, peak_flops=peak_flops, mfu=mfu,
        compute_seconds_per_step=step_seconds,
        ddp=strategy_plan("ddp", link, sites, params, steps, step_seconds, 1, "steps", steps, "fp32"),
        diloco=strategy_plan("diloco", link, sites, params, steps, step_seconds, sync_every, sync_by, syncs, wire),
    )
