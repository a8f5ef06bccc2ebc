"""The training loop: data → model → optimizers, with evaluation, checkpoints, metering and the ledger.

One call, `train(cfg, workspace)`, runs or resumes a run to its stop limit. The order of events per step:

    1. learning rate for this step (warm-up / stable / decay on the run's progress)
    2. grad_accum micro-batches: forward under autocast, backward
    3. clip, optimizer steps, zero grads
    4. counters (tokens, FLOPs, time, energy), metrics to the ledger every log_every steps
    5. validation every eval_every steps, a checkpoint every checkpoint_every steps

On CPU with fp32 and deterministic kernels, a run killed at any point and resumed from its last checkpoint
repeats the uninterrupted run's per-step losses bit for bit: weights, optimizer state, the data position and the
RNG state are all in the checkpoint, and metrics of steps after it are simply recomputed and overwritten.

Under torchrun the same function runs on every rank (train/parallel.py): DDP around the model, each rank its own
rows of the global batch, rank 0 alone writing the run folder, checkpoints and ledger. A checkpoint does not
depend on the world size, so a run may resume with a different number of ranks and the same global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch.nn.parallel import DistributedDataParallel

from lmforge.atomic import write_file_atomic
from lmforge.config import RunConfig
from lmforge.data.corpus import load_corpus
from lmforge.data.loader import BatchLoader
from lmforge.data.shards import load_shards
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import CheckpointError, ConfigError, DataError, LmforgeError
from lmforge.meter.energy import footprint, make_energy_reader
from lmforge.meter.hardware import default_carbon_g_per_kwh, describe_machine, resolve_profile
from lmforge.meter.ledger import Ledger
from lmforge.model.sizing import count_params, flops_per_token, shape_from_depth
from lmforge.model.transformer import Transformer, TransformerShape
from lmforge.plan.planner import predict_run
from lmforge.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from lmforge.train.evaluate import evaluate
from lmforge.train.optim import build_optimizers
from lmforge.dist import quorum
from lmforge.train.diloco import DiLoCo, site_groups
from lmforge.train.parallel import (
    full_state,
    init_distributed,
    load_full_state,
    shard_model,
    shutdown,
    wrap_data_parallel,
)
from lmforge.train.runtime import prepare_model, setup_runtime
from lmforge.train.schedule import lr_multiplier
from lmforge.workspace import Workspace


class Reporter(Protocol):
    """What the loop tells its caller (the CLI draws progress bars from it; tests may ignore it)."""

    def started(self, info: dict[str, Any]) -> None: ...
    def stepped(self, stats: dict[str, Any]) -> None: ...
    def evaluated(self, stats: dict[str, Any]) -> None: ...
    def checkpointed(self, path: Path) -> None: ...
    def noted(self, step: int, text: str) -> None: ...


class SilentReporter:
    def started(self, info): pass
    def stepped(self, stats): pass
    def evaluated(self, stats): pass
    def checkpointed(self, path): pass
    def noted(self, step, text): pass


@dataclass
class Counters:
    """Totals that survive a resume (saved in every checkpoint)."""
    step: int = 0
    tokens: int = 0
    flops: float = 0.0
    train_seconds: float = 0.0  # time inside training steps
    wall_seconds: float = 0.0   # everything: steps, validation, checkpoints
    energy_j: float = 0.0
    comm_bytes: int = 0  # DiLoCo: bytes this site's rank 0 sent to the other sites
    comm_seconds: float = 0.0  # DiLoCo: time in outer exchanges (part of train_seconds)
    outer_steps: int = 0  # DiLoCo: outer updates made (one per fragment exchanged)


class SiteWork:
    """Tokens and joules each site reported at the outer steps of a fault-tolerant run, summed over the processes
    a site went through (a report below the last one comes from a process started again)."""

    def __init__(self) -> None:
        self.latest: dict[int, tuple[float, float]] = {}
        self.retired = (0.0, 0.0)

    def update(self, reports: dict[int, tuple[float, float]]) -> None:
        for site, report in reports.items():
            old = self.latest.get(site)
            if old is not None and report[0] < old[0]:
                self.retired = (self.retired[0] + old[0], self.retired[1] + old[1])
            self.latest[site] = report

    def totals(self) -> tuple[float, float]:
        """(tokens, joules) over every site and process, as of each site's last report."""
        return (self.retired[0] + sum(t for t, _ in self.latest.values()),
                self.retired[1] + sum(j for _, j in self.latest.values()))


@dataclass
class TrainResult:
    run_name: str
    run_dir: Path
    checkpoint: Path
    summary: dict[str, Any] = field(default_factory=dict)


class NoLedger:
    """What ranks other than 0 write to: nothing (rank 0 keeps the run's records)."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class StopAfterStep:
    """The first Ctrl-C asks the loop to stop after the current step (with a checkpoint); a second stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def finish_quietly(ledger: Ledger, run_id: int, status: str, error: str) -> None:
    """Record how a run ended; a ledger that cannot be written (a full disk) must not hide the original error."""
    try:
        ledger.finish_run(run_id, status, error=error)
    except sqlite3.Error:
        pass


@contextlib.contextmanager
def recorded_end(ledger: Ledger, run_id: int, ctrl_c: StopAfterStep) -> Iterator[None]:
    """Whatever ends the block is how the run ends in the ledger (interrupted, or failed with the error); the
    Ctrl-C handler is put back in every case."""
    try:
        yield
    except KeyboardInterrupt as e:  # stopped at a step boundary (checkpointed), or a second Ctrl-C (not)
        finish_quietly(ledger, run_id, "interrupted", str(e) or "interrupted by the user (Ctrl-C)")
        raise
    except LmforgeError as e:
        finish_quietly(ledger, run_id, "failed", str(e))
        raise
    except Exception as e:
        finish_quietly(ledger, run_id, "failed", f"{type(e).__name__}: {e}")
        raise
    finally:
        ctrl_c.restore()


def model_shape(cfg: RunConfig, vocab_size: int) -> TransformerShape:
    m = cfg.model
    try:
        return shape_from_depth(m.depth, vocab_size, m.seq_len, aspect_ratio=m.aspect_ratio, head_dim=m.head_dim,
                                kv_group=m.kv_group, qk_norm=m.qk_norm, tie_embeddings=m.tie_embeddings,
                                rope_theta=m.rope_theta)
    except ValueError as e:
        raise ConfigError(f"invalid model shape: {e}") from None


def check_shape(saved: dict[str, Any], shape: TransformerShape, where: Path) -> None:
    want = dataclasses.asdict(shape)
    diff = [f"{k} {saved.get(k)} vs {v}" for k, v in want.items() if saved.get(k) != v]
    if diff:
        raise CheckpointError(
            f"checkpoint {where} is from a different model shape ({', '.join(diff)}, checkpoint vs config); "
            f"drop the --model.* overrides or start a new run"
        )


def default_run_name(cfg: RunConfig) -> str:
    return f"{cfg.data.corpus_name()}-d{cfg.model.depth}-{time.strftime('%Y%m%d-%H%M%S')}"


def progress_of(cfg: RunConfig, c: Counters) -> float:
    """How far the run is toward its nearest stop limit, in [0, 1+]."""
    t = cfg.train
    fractions = [c.step / t.max_steps if t.max_steps else 0.0,
                 c.tokens / t.max_tokens if t.max_tokens else 0.0,
                 c.flops / t.max_flops if t.max_flops else 0.0,
                 c.wall_seconds / t.max_time if t.max_time else 0.0]
    return max(fractions)


def train(cfg: RunConfig, workspace: Workspace, *, resume: bool = False,
          reporter: Reporter | None = None) -> TrainResult:
    """Run (or, with resume=True, continue) the run `cfg.name` until a stop limit; return where it ended."""
    cfg.require_stop_condition()
    t = cfg.train
    runtime = setup_runtime(t)
    world, device = init_distributed(runtime.device)
    runtime = dataclasses.replace(runtime, device=device)
    try:
        return _train(cfg, workspace, resume, reporter if world.main and reporter else SilentReporter(), runtime,
                      world)
    finally:
        shutdown(world)


def _train(cfg: RunConfig, workspace: Workspace, resume: bool, reporter: Reporter, runtime, world) -> TrainResult:
    t = cfg.train
    # fault-tolerant DiLoCo: this process's job is one site; site 0's first rank keeps the run's records
    elastic = cfg.sites.count > 1 and cfg.sites.drop_after > 0
    keeper = world.main and (not elastic or cfg.sites.site == 0)
    if not keeper:
        reporter = SilentReporter()
    torch.manual_seed(t.seed)  # the same on every rank: the same initial weights

    # run folder: a new run must not overwrite an old one; a resumed run must have a checkpoint
    name = cfg.name or default_run_name(cfg)
    cfg = dataclasses.replace(cfg, name=name)
    run_dir = workspace.run_dir(name)
    checkpoints_dir = run_dir / "checkpoints"
    if resume:
        last = latest_checkpoint(checkpoints_dir)
        if last is None:
            raise CheckpointError(f"run '{name}' has no checkpoint to resume from in {checkpoints_dir}; "
                                  f"start a new run with another --name")
    elif keeper and run_dir.exists() and any(run_dir.iterdir()):  # (the keeper creates it below)
        raise ConfigError(f"run '{name}' already exists in {run_dir}; continue it with --resume {name} "
                          f"or choose another --name")

    # data: tokenizer and shards must exist and belong together
    tokenizer = Tokenizer.load(workspace.tokenizer_dir(cfg.tokenizer_name()))
    try:  # the corpus may be deleted once prepared; if it is there, the shards must come from it
        corpus_hash = load_corpus(workspace.corpus_dir(cfg.data.corpus_name())).source_hash
    except DataError:
        corpus_hash = None
    # full sha256 check: ~1 s per GB, once per run, so a corrupted shard is an error and not a silent bad run
    shards = load_shards(workspace.shards_dir(cfg.tokenizer_name()), expected_tokenizer_hash=tokenizer.hash,
                         expected_source_hash=corpus_hash, verify="hash")
    train_tokens, val_tokens = shards.tokens("train"), shards.tokens("val")
    token_bytes = torch.from_numpy(tokenizer.token_byte_lengths())
    tokenizer_json = tokenizer.path.read_bytes()  # copied into every checkpoint: the folder serves on its own

    # model and optimizers
    shape = model_shape(cfg, tokenizer.vocab_size)
    model = Transformer(shape)
    model.to(runtime.device)
    fsdp = t.parallel == "fsdp"
    if fsdp:
        shard_model(model, world)  # before the optimizers: they must hold the sharded parameters
    optimizers = build_optimizers(model, t, runtime.device.type)
    world_size = world.world_size * (cfg.sites.count if elastic else 1)  # every process of the run
    rank = world.rank + (cfg.sites.site * world.world_size if elastic else 0)
    loader = BatchLoader(train_tokens, t.batch_size, cfg.model.seq_len, rank=rank, world_size=world_size,
                         seed=t.seed)
    counters = Counters()
    if resume:
        ckpt = load_checkpoint(last)
        check_shape(ckpt.meta.get("shape", {}), shape, last)
        if ckpt.meta.get("tokenizer_hash") != tokenizer.hash:
            raise CheckpointError(f"checkpoint {last} was trained with another tokenizer than "
                                  f"{tokenizer.path} (it was retrained since); start a new run")
        settings = [[{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] for opt in optimizers]
        if "optimizers_by_name" in ckpt.train_state:  # written by an FSDP run: loads sharded or not
            load_full_state(model, optimizers, ckpt.model_state, ckpt.train_state["optimizers_by_name"])
        elif fsdp:
            raise CheckpointError(f"checkpoint {last} was written by a DDP run; resume it with "
                                  f"--train.parallel ddp")
        else:
            model.load_state_dict(ckpt.model_state)
            for opt, state in zip(optimizers, ckpt.train_state["optimizers"], strict=True):
                opt.load_state_dict(state)  # moments and step counts from the checkpoint ...
        for opt, opt_settings in zip(optimizers, settings, strict=True):
            for group, setting in zip(opt.param_groups, opt_settings, strict=True):
                group.update(setting)  # ... learning rates, betas, decay from the config (flags may change them)
        loader.load_state_dict(ckpt.train_state["loader"])
        counters = Counters(**ckpt.train_state["counters"])
        torch.set_rng_state(ckpt.train_state["rng"]["torch"])
        if runtime.device.type == "cuda" and ckpt.train_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(ckpt.train_state["rng"]["cuda"], runtime.device)
    diloco = None
    if cfg.sites.count > 1:
        if cfg.sites.sync_by == "steps" and t.checkpoint_every % cfg.sites.sync_every:
            raise ConfigError(f"--train.checkpoint_every {t.checkpoint_every} must be a multiple of "
                              f"--sites.sync_every {cfg.sites.sync_every}: checkpoints follow an outer step")
        if elastic:  # each site its own job: the world is this site; the sites meet at the store
            site_group, cross_group = None, None
            store = quorum.connect(cfg.sites.store, host_it=keeper)
            membership = quorum.Quorum(store, cfg.sites.site, cfg.sites.count, cfg.sites.drop_after)
        else:
            _, site_group, cross_group = site_groups(world, cfg.sites.count)
            membership = None
        diloco = DiLoCo(model, cfg.sites, world, cross_group, membership)
        if resume:
            diloco.load_state_dict(ckpt.train_state["diloco"], counters.step)
    parallel_model = model if fsdp else wrap_data_parallel(model, world, 1 if elastic else cfg.sites.count,
                                                           site_group if diloco else None)
    # DDP all-reduces gradients on the last micro-batch only (FSDP reduce-scatters every one)
    accumulating = parallel_model.no_sync if isinstance(parallel_model, DistributedDataParallel) else \
        contextlib.nullcontext
    step_model = prepare_model(parallel_model, runtime)

    # meter: peak FLOP/s for MFU, an energy reader (measured where possible, else a labelled estimate)
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None
    profile = resolve_profile(
        runtime.device.type, device_name, override_name=cfg.meter.device_profile or None,
        peak_tflops=cfg.meter.peak_tflops or None, power_watts=cfg.meter.power_watts or None,
        price_per_hour=cfg.meter.price_per_hour if cfg.meter.price_per_hour >= 0 else None,
        cpu_threads=torch.get_num_threads(), probe_cache=workspace.probe_cache,
    )
    peak_dtype = "bf16" if runtime.dtype == "bf16" else "fp32"
    peak = profile.peak_flops_for(peak_dtype)
    carbon = cfg.meter.carbon_g_per_kwh if cfg.meter.carbon_g_per_kwh >= 0 else default_carbon_g_per_kwh()
    energy = make_energy_reader(runtime.device.type, runtime.device.index or 0, declared_watts=profile.tdp_watts)
    energy.start()

    params = count_params(shape)
    fpt = flops_per_token(shape, cfg.model.seq_len)
    tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum * world_size
    hardware = {**describe_machine(), "device": str(runtime.device), "profile": profile.name,
                "peak_flops": peak, "dtype": runtime.dtype, "compile": runtime.compile,
                "threads": torch.get_num_threads(), "energy_source": energy.label, "world_size": world_size}
    # everything checked: only now does the run leave a trace (so a failed start can be retried under its name)
    ledger = Ledger(workspace.ledger_path) if keeper else NoLedger()
    if keeper:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_file_atomic(run_dir / "config.yaml", cfg.to_yaml().encode())
    if not keeper:
        run_id = None
    elif resume:
        run_id = ledger.get_run(name)["id"]
        ledger.resume_run(run_id)
    else:
        run_id = ledger.start_run(name, "train", cfg.to_dict(), hardware, str(run_dir))
    if keeper and not resume:  # the planner's forecast, kept for `lmforge runs show` to compare
        prediction = predict_run(cfg, shape, peak, profile, world_size=world_size, runs=ledger.list_runs())
        if prediction is not None:
            ledger.update_summary(run_id, {"predicted": prediction.to_dict()})
    reporter.started({"run": name, "run_dir": run_dir, "shape": shape, "params": params, "flops_per_token": fpt,
                      "tokens_per_step": tokens_per_step, "device": str(runtime.device), "dtype": runtime.dtype,
                      "compile": runtime.compile, "peak_flops": peak, "energy_label": energy.label,
                      "resumed_at": counters.step if resume else None, "train_tokens": len(train_tokens)})

    def save(counters: Counters) -> Path | None:
        """Rank 0 writes the checkpoint; every rank calls this at the same step (energy is summed over ranks)."""
        counters.energy_j = start_energy + world.total(energy.joules())
        if diloco is not None and not diloco.in_sync(counters.step):  # (then the sites hold θ, which is saved)
            count_exchanges(diloco.sync_all(counters.step, (site_tokens, energy.joules() * world.world_size)))
        if fsdp:  # gathered from every rank's shards (a collective)
            model_state, optimizer_states = full_state(model, optimizers)
            optimizer_key = "optimizers_by_name"
        else:
            model_state, optimizer_states = model.state_dict(), [opt.state_dict() for opt in optimizers]
            optimizer_key = "optimizers"
        if not keeper:
            return None
        state = {
            optimizer_key: optimizer_states,
            "loader": loader.state_dict(),
            "counters": dataclasses.asdict(counters),
            "diloco": diloco.state_dict() if diloco else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(runtime.device) if runtime.device.type == "cuda" else None},
        }
        meta = {"shape": dataclasses.asdict(shape), "tokenizer_hash": tokenizer.hash, "params": params["total"]}
        path = save_checkpoint(checkpoints_dir, counters.step, model_state, state, cfg.to_yaml(),
                               tokenizer_json, meta, t.keep_last)
        ledger.add_artifact(run_id, "checkpoint", str(path))
        reporter.checkpointed(path)
        return path

    def validate() -> dict[str, float]:
        result = evaluate(step_model, val_tokens, token_bytes, batch_size=t.batch_size, seq_len=cfg.model.seq_len,
                          max_batches=t.eval_batches or None, runtime=runtime)
        metrics = {"val_loss": result["loss"], "val_bpb": result["bpb"]}
        ledger.log_metrics(run_id, counters.step, metrics)
        reporter.evaluated({"step": counters.step, **metrics})
        return metrics

    pending: list[tuple[int, dict[str, float]]] = []

    def count_exchanges(outer: list) -> None:
        counters.comm_bytes += sum(o.bytes_sent for o in outer)
        counters.comm_seconds += sum(o.waited for o in outer)
        counters.outer_steps += len(outer)
        for o in outer:
            if o.sites:
                membership_changed(o)

    # fault-tolerant runs: who took part in the last exchange, and the work each site reported
    sites_present = set(range(cfg.sites.count))
    site_work = SiteWork()
    site_tokens = 0  # trained by this site since this process started

    def membership_changed(o) -> None:
        """Record the sites that left and came back; move a site that caught up to the step it caught up with."""
        nonlocal sites_present
        for s in sorted(sites_present - set(o.sites)):
            ledger.log_event(run_id, o.step, "site_dropped", {"site": s, "sites": list(o.sites)})
            reporter.noted(o.step, f"site {s} dropped: not at the outer step within {cfg.sites.drop_after:g} s")
        for s in o.caught_up:
            ledger.log_event(run_id, o.step, "site_rejoined", {"site": s})
            reporter.noted(o.step, f"site {s} rejoined with the global weights")
        sites_present = set(o.sites)
        site_work.update(o.work)
        if cfg.sites.site in o.caught_up:
            counters.step = o.step
            counters.tokens, counters.flops = o.step * tokens_per_step, o.step * tokens_per_step * fpt
            loader.seek(o.step * t.grad_accum)

    def sync_sites() -> None:
        """Every site to the global weights (unless they are there already): what is saved at the end."""
        if diloco is not None and not diloco.in_sync(counters.step):
            count_exchanges(diloco.sync_all(counters.step, (site_tokens, energy.joules() * world.world_size)))
        if elastic and keeper:
            membership.close(timeout_s=cfg.sites.drop_after + 60)
        elif elastic and world.local_rank == 0:
            membership.finished()

    def flush() -> None:
        for step, metrics in pending:
            ledger.log_metrics(run_id, step, metrics)
        pending.clear()
        ledger.heartbeat(run_id)

    start_wall, start_energy = counters.wall_seconds, counters.energy_j
    wall0 = time.perf_counter()
    last_saved = counters.step if resume else -1
    val: dict[str, float] = {}
    step_model.train()
    if elastic and membership.started_before(world.local_rank):  # a site started again: catch up first
        count_exchanges([diloco.catch_up()])
    ctrl_c = StopAfterStep()
    with recorded_end(ledger, run_id, ctrl_c):
        while (progress := progress_of(cfg, counters)) < 1.0:
            # 1. learning rate for this step
            mult = lr_multiplier(counters.step, progress, warmup_steps=t.warmup_steps, decay_frac=t.decay_frac,
                                 min_lr_frac=t.min_lr_frac)
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["initial_lr"] * mult
            # 2. forward and backward over the micro-batches
            step_start = time.perf_counter()
            loss_sum = torch.zeros((), device=runtime.device)
            for micro in range(t.grad_accum):
                x, y = next(loader)  # (B, T) each
                x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
                with contextlib.nullcontext() if micro == t.grad_accum - 1 else accumulating():
                    with runtime.autocast():
                        loss = step_model(x, y)
                    (loss / t.grad_accum).backward()
                loss_sum += loss.detach()
            # 3. clip and step
            if t.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)
            loss_value = world.mean(loss_sum / t.grad_accum).item()
            if not math.isfinite(loss_value):
                raise LmforgeError(f"training loss became {loss_value} at step {counters.step + 1}; lower "
                                   f"--train.lr / --train.matrix_lr or raise --train.warmup_steps, then resume")
            counters.step += 1
            site_tokens += tokens_per_step // cfg.sites.count if elastic else 0
            outer = diloco.after_step(counters.step, (site_tokens, energy.joules() * world.world_size), mult) \
                if diloco is not None else []
            # 4. counters and metrics
            step_seconds = time.perf_counter() - step_start
            energy.sample()
            counters.tokens += tokens_per_step
            counters.flops += fpt * tokens_per_step
            counters.train_seconds += step_seconds
            counters.wall_seconds = start_wall + time.perf_counter() - wall0
            counters.energy_j = start_energy + energy.joules() * world_size  # an estimate until summed at a save
            # the values that decide when to stop, agreed: the slowest rank's clock, anyone's Ctrl-C
            counters.wall_seconds, stop_asked = world.largest([counters.wall_seconds, float(ctrl_c.requested)])
            pending.append((counters.step, {"loss": loss_value, "lr_mult": mult, "tokens": counters.tokens,
                                            "flops": counters.flops, "time": counters.wall_seconds}))
            if outer:
                count_exchanges(outer)
                pending[-1][1].update(comm_bytes=counters.comm_bytes, comm_seconds=counters.comm_seconds,
                                      replica_spread=max(o.replica_spread for o in outer))
            if counters.step % t.log_every == 0:
                flush()
            tok_per_s = tokens_per_step / step_seconds
            reporter.stepped({"step": counters.step, "loss": loss_value, "lr_mult": mult, "tok_per_s": tok_per_s,
                              "mfu": profile.mfu(fpt * tok_per_s / world_size, peak_dtype),
                              "progress": progress_of(cfg, counters)})
            # 5. validation and checkpoints
            if t.eval_every and counters.step % t.eval_every == 0:
                val = validate()
            if t.checkpoint_every and counters.step % t.checkpoint_every == 0:
                flush()  # metrics up to the checkpoint are durable before it exists
                save(counters)
                last_saved = counters.step
            if stop_asked:  # finish the step, checkpoint it, stop: resuming repeats exactly what follows
                flush()
                sync_sites()
                path = save(counters) if last_saved != counters.step else latest_checkpoint(checkpoints_dir)
                raise KeyboardInterrupt(f"stopped after step {counters.step}, checkpoint {path}; "
                                        f"continue with --resume {name}")
        flush()
        sync_sites()
        if not val or t.eval_every == 0 or counters.step % t.eval_every:
            val = validate()
        counters.wall_seconds = start_wall + time.perf_counter() - wall0
        final = save(counters) if last_saved != counters.step else latest_checkpoint(checkpoints_dir)
        counters.energy_j = start_energy + world.total(energy.joules())
        if elastic:  # the other sites' energy as they reported it; this site's as measured now
            site_work.update({cfg.sites.site: (site_tokens, counters.energy_j - start_energy)})
            counters.energy_j = start_energy + site_work.totals()[1]

    device_seconds = counters.wall_seconds * world_size
    cost = footprint(counters.energy_j, device_seconds, profile.price_per_hour, carbon)
    tok_per_s = counters.tokens / counters.train_seconds if counters.train_seconds else 0.0
    summary = {
        "steps": counters.step, "tokens": counters.tokens, "flops": counters.flops,
        "params": params["total"], "non_embedding_params": params["non_embedding"],
        "train_seconds": counters.train_seconds, "wall_seconds": counters.wall_seconds,
        "tok_per_s": tok_per_s, "mfu": profile.mfu(fpt * tok_per_s / world_size, peak_dtype), "peak_flops": peak,
        "val_loss": val.get("val_loss"), "val_bpb": val.get("val_bpb"),
        "energy_j": counters.energy_j, "energy_measured": energy.measured, "energy_label": energy.label,
        "kwh": cost["kwh"], "cost_usd": cost["cost_usd"], "co2_kg": cost["co2_kg"],
        "price_per_hour": profile.price_per_hour, "carbon_g_per_kwh": carbon,
        "device": str(runtime.device), "profile": profile.name, "checkpoint": str(final), "pid": os.getpid(),
        "world_size": world_size,
    }
    if diloco is not None:
        compute = counters.train_seconds - counters.comm_seconds
        summary |= {"sites": cfg.sites.count, "sync_every": cfg.sites.sync_every, "sync_by": cfg.sites.sync_by,
                    "outer_steps": counters.outer_steps, "wire": cfg.sites.wire,
                    "link": cfg.sites.link, "tokens_per_site": counters.tokens // cfg.sites.count,
                    "comm_bytes_per_site": counters.comm_bytes,
                    "comm_seconds": counters.comm_seconds,
                    "compute_utilisation": compute / counters.train_seconds if counters.train_seconds else None}
        if elastic:
            events = ledger.get_events(run_id) or []  # (only site 0 keeps them)
            summary |= {"site": cfg.sites.site, "drop_after": cfg.sites.drop_after, "tokens_trained": int(site_work.totals()[0]),
                        "sites_dropped": sum(e["kind"] == "site_dropped" for e in events),
                        "sites_rejoined": sum(e["kind"] == "site_rejoined" for e in events)}
    ledger.finish_run(run_id, "completed", summary=summary)
    return TrainResult(name, run_dir, final, summary)
