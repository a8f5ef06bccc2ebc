"""The compute-optimal planner: a budget on a device -> the run to train, and what it will cost.

1. The budget (wall time, dollars, kWh or FLOPs) becomes seconds and FLOPs through the device profile:
   FLOP/s = peak(dtype) x count x MFU; dollars buy price x count per hour; kWh buy TDP x count watts.
2. The scaling law (the user's fit, or the prior) splits the FLOPs into N_opt and D_opt with C = 6 N D.
3. N_opt is rounded to the nearest depth of the depth dial (in log N, N = non-embedding parameters); the tokens
   are then the budget over that depth's own FLOPs per token (sizing.flops_per_token, which counts the output
   head and attention), so the run spends the budget exactly.
4. Batch size, learning rate, predicted loss, memory, energy, cost and CO2 follow from rules stated where they are
   declared below.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace

from lmforge.config import RunConfig
from lmforge.errors import ConfigError
from lmforge.meter.hardware import DeviceProfile
from lmforge.model.sizing import count_params, flops_per_token, shape_from_depth
from lmforge.model.transformer import TransformerShape
from lmforge.plan.history import bytes_per_token, measured_mfu, scaling_points
from lmforge.plan.scaling import MIN_RUNS, PRIOR, ScalingLaw, ScalingPoint, fit

BUDGET_KINDS = ("time", "usd", "kwh", "flops")
DEFAULT_MFU = 0.4  # what tuned dense-transformer training reaches on A100/H100 (PaLM reports 46%)
MAX_DEPTH = 512  # the dial's end: 32,768 wide at aspect ratio 64, ~6e12 non-embedding parameters
# Batch size rule (DeepSeek LLM, Bi et al. 2024, section 3.1): the optimal batch grows with compute as
# B_opt = 0.292 * C^0.3271 tokens; rounded to a power of two sequences per device.
BATCH_COEFF, BATCH_EXPONENT = 0.292, 0.3271
MIN_STEPS = 100  # a run needs enough optimizer steps for warm-up and decay; smaller budgets get smaller batches
# Activation memory (Korthikanti et al. 2022, "Reducing Activation Recomputation", eq. 2 without the s^2 score
# term, which SDPA's flash kernels never store): about 34 bytes per token per layer per unit of width in 16-bit,
# i.e. 17 values; plus the logits, once in the compute dtype and once in fp32 for the cross-entropy.
ACTIVATION_VALUES_PER_WIDTH = 17
MEMORY_HEADROOM = 0.9  # of the device's memory; the rest is the CUDA context, allocator slack, compile workspaces
DURATION_UNITS = {"s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class Budget:
    kind: str  # one of BUDGET_KINDS
    value: float  # seconds, USD, kWh or FLOPs

    def describe(self) -> str:
        if self.kind == "time":
            for unit, seconds in (("d", 86400.0), ("h", 3600.0), ("min", 60.0)):
                if self.value >= seconds:
                    return f"{self.value / seconds:.4g} {unit}"
            return f"{self.value:.4g} s"
        return {"usd": f"${self.value:,.4g}", "kwh": f"{self.value:,.4g} kWh", "flops": f"{self.value:.3g} FLOPs"}[
            self.kind]


def parse_duration(text: str) -> float:
    """'8h', '90m', '1.5d', '3600s' -> seconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(s|m|min|h|d)\s*", text.lower())
    if not match:
        raise ConfigError(f"cannot read the time budget {text!r}; write a number with a unit: 90s, 30m, 8h or 2d")
    return float(match[1]) * DURATION_UNITS[match[2]]


@dataclass
class Memory:
    """Bytes on each device (data-parallel: every device holds the whole model)."""

    weights: float  # fp32 master weights
    grads: float  # fp32
    optimizer: float  # Muon: fp32 momentum for block matrices, AdamW's two fp32 moments for the rest
    activations: float  # one micro-batch, see ACTIVATION_VALUES_PER_WIDTH
    total: float
    device: float | None  # the device's memory; None when the profile does not know it
    fits: bool | None
    formula: str


@dataclass
class Plan:
    budget: str
    device: str
    count: int
    dtype: str
    peak_flops: float  # one device
    mfu: float
    mfu_source: str
    flops: float
    seconds: float
    law: dict[str, float]
    law_source: str
    n_opt: float  # the law's optimum, non-embedding parameters
    d_opt: float  # tokens
    loss_at_opt: float
    depth: int
    depth_note: str
    d_model: int
    n_head: int
    params: int
    non_embedding_params: int
    flops_per_token: float
    tokens: int
    tokens_per_param: float
    seq_len: int
    global_batch: int  # sequences per optimizer step, all devices
    micro_batch: int  # sequences per device per forward pass (--train.batch_size)
    grad_accum: int
    steps: int
    batch_rule: str
    lr: float
    matrix_lr: float
    lr_rule: str
    predicted_loss: float
    predicted_bpb: float | None
    bpb_note: str
    energy_j: float
    kwh: float
    cost_usd: float | None
    co2_kg: float
    carbon_g_per_kwh: float
    energy_note: str
    memory: Memory
    train_flags: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def choose_law(points: list[ScalingPoint], tokenizer: str) -> tuple[ScalingLaw, str]:
    """The user's own fit when there are MIN_RUNS runs and it converges, else the prior; and why the prior."""
    if len(points) < MIN_RUNS:
        return PRIOR, f"{len(points)} finished runs on tokenizer {tokenizer} in the ledger; a fit needs {MIN_RUNS}"
    result = fit(points, bootstrap=0)
    if not result.converged:
        return PRIOR, f"the fit to {len(points)} runs on tokenizer {tokenizer} did not converge: {result.note}"
    return replace(result.law, source=f"your fit to {len(points)} runs on tokenizer {tokenizer}"), ""


def budget_seconds(budget: Budget, flops_per_second: float, profile: DeviceProfile, count: int) -> float:
    """How long the budget lasts on `count` devices."""
    if not budget.value > 0:
        raise ConfigError(f"the budget must be positive, got {budget.value:g}")
    if budget.kind == "time":
        return budget.value
    if budget.kind == "flops":
        return budget.value / flops_per_second
    if budget.kind == "usd":
        if not profile.price_per_hour:
            raise ConfigError(f"device {profile.name!r} has no price per hour, so a dollar budget cannot be "
                              f"converted; pass --meter.price_per_hour USD, or another budget")
        return budget.value / (profile.price_per_hour * count) * 3600.0
    if budget.kind == "kwh":
        return budget.value * 3.6e6 / (profile.tdp_watts * count)
    raise ConfigError(f"unknown budget kind {budget.kind!r}; use one of {', '.join(BUDGET_KINDS)}")


def shape_for(cfg: RunConfig, depth: int) -> TransformerShape:
    m = cfg.model
    return shape_from_depth(depth, cfg.tokenizer.vocab_size, m.seq_len, aspect_ratio=m.aspect_ratio,
                            head_dim=m.head_dim, kv_group=m.kv_group, qk_norm=m.qk_norm,
                            tie_embeddings=m.tie_embeddings, rope_theta=m.rope_theta)


def nearest_depth(cfg: RunConfig, n_target: float) -> tuple[int, str]:
    """The depth whose non-embedding parameter count is nearest `n_target` in log space, and a note when the
    dial's ends clamp it. Only depths whose width divides into heads (depth x aspect_ratio % head_dim == 0)."""
    m = cfg.model
    depths = [d for d in range(1, MAX_DEPTH + 1) if (d * m.aspect_ratio) % m.head_dim == 0]
    if not depths:
        raise ConfigError(f"no depth up to {MAX_DEPTH} gives a width that is a multiple of --model.head_dim "
                          f"{m.head_dim} at --model.aspect_ratio {m.aspect_ratio}; make aspect_ratio a multiple "
                          f"of head_dim")
    sizes = {d: count_params(shape_for(cfg, d))["non_embedding"] for d in depths}
    depth = min(depths, key=lambda d: abs(math.log(sizes[d] / n_target)))
    note = ""
    if n_target < sizes[depths[0]] / 2:
        note = f"the optimum ({n_target:.3g} params) is below the smallest model of the dial; depth {depth} is used"
    elif n_target > sizes[depths[-1]] * 2:
        note = f"the optimum ({n_target:.3g} params) is beyond depth {MAX_DEPTH}; depth {depth} is used"
    return depth, note


def memory_per_device(shape: TransformerShape, cfg: RunConfig, micro_batch: int, dtype: str,
                      device_bytes: float | None) -> Memory:
    counts = count_params(shape)
    total = counts["total"]
    matrices = counts["matmul"] - shape.vocab_size * shape.d_model  # the blocks' 2-D weights (Muon's)
    if cfg.train.optimizer == "muon":
        optimizer = 4.0 * matrices + 8.0 * (total - matrices)
    else:
        optimizer = 8.0 * total
    act_bytes = 2 if dtype in ("bf16", "fp16") else 4
    tokens = micro_batch * cfg.model.seq_len
    activations = tokens * (ACTIVATION_VALUES_PER_WIDTH * shape.n_layer * shape.d_model * act_bytes
                            + shape.vocab_size * (act_bytes + 4))
    need = 4.0 * total + 4.0 * total + optimizer + activations
    formula = (f"weights 4 B + grads 4 B per parameter + optimizer ({cfg.train.optimizer}: "
               + ("4 B momentum per block-matrix parameter, 8 B AdamW moments per other parameter"
                  if cfg.train.optimizer == "muon" else "8 B AdamW moments per parameter")
               + f") + activations per token of the micro-batch: {ACTIVATION_VALUES_PER_WIDTH} x layers x width "
               f"values of {act_bytes} B (Korthikanti et al. 2022, flash attention) + vocab x ({act_bytes} + 4) B of "
               f"logits; fits when the total is within {MEMORY_HEADROOM:.0%} of the device's memory")
    fits = need <= MEMORY_HEADROOM * device_bytes if device_bytes else None
    return Memory(weights=4.0 * total, grads=4.0 * total, optimizer=optimizer, activations=activations, total=need,
                  device=device_bytes, fits=fits, formula=formula)


def batch_for(flops: float, tokens: int, seq_len: int, count: int) -> tuple[int, str]:
    """Sequences per device per optimizer step: DeepSeek's B_opt, at least one, at most what leaves MIN_STEPS."""
    b_opt = BATCH_COEFF * flops ** BATCH_EXPONENT
    per_device = 2 ** max(0, round(math.log2(max(b_opt / (seq_len * count), 1.0))))
    while per_device > 1 and tokens // (per_device * count * seq_len) < MIN_STEPS:
        per_device //= 2
    rule = (f"B_opt = {BATCH_COEFF} x C^{BATCH_EXPONENT} tokens (DeepSeek LLM 2024) = {b_opt:,.0f} tokens, rounded "
            f"to a power of two sequences per device, halved while the run would have under {MIN_STEPS} steps")
    return per_device, rule


def make_plan(cfg: RunConfig, budget: Budget, profile: DeviceProfile, *, count: int = 1, mfu: float = DEFAULT_MFU,
              mfu_source: str = "default", law: ScalingLaw = PRIOR, law_note: str = "",
              bytes_per_token: float | None = None, carbon_g_per_kwh: float) -> Plan:
    """The run to train with `budget` on `count` devices of `profile`, predicted by `law`."""
    if count < 1:
        raise ConfigError(f"--count must be at least 1, got {count}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu:g}; 0.3-0.5 is typical of tuned GPU training")
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("fp32" if profile.name == "cpu" else "bf16")
    peak = profile.peak_flops_for(dtype)
    if not peak:
        raise ConfigError(f"no peak FLOP/s is known for device {profile.name!r} at {dtype}; pass --device NAME "
                          f"or --meter.peak_tflops X")
    # 1. the budget in seconds and FLOPs
    flops_per_second = peak * count * mfu
    seconds = budget_seconds(budget, flops_per_second, profile, count)
    flops = seconds * flops_per_second
    # 2. the law's optimum, 3. the nearest depth and the tokens it can afford
    n_opt, d_opt = law.compute_optimal(flops)
    depth, depth_note = nearest_depth(cfg, n_opt)
    shape = shape_for(cfg, depth)
    counts = count_params(shape)
    fpt = flops_per_token(shape, cfg.model.seq_len)
    tokens = int(flops / fpt)
    seq_len = cfg.model.seq_len
    if tokens < count * seq_len:
        raise ConfigError(f"the budget ({budget.describe()}) buys {tokens:,} tokens at depth {depth}, less than one "
                          f"sequence of {seq_len} per device; raise the budget")
    # 4. batch: the per-device batch from the rule, split into the largest micro-batch that fits in memory
    per_device, batch_rule = batch_for(flops, tokens, seq_len, count)
    device_bytes = profile.memory_gb * 1e9 if profile.memory_gb else None
    micro = per_device
    memory = memory_per_device(shape, cfg, micro, dtype, device_bytes)
    while micro > 1 and memory.fits is False:
        micro //= 2
        memory = memory_per_device(shape, cfg, micro, dtype, device_bytes)
    global_batch = per_device * count
    # Learning rate (nanochat's rule): AdamW rates (embeddings, head, norms) scale as 1/sqrt(width) from the
    # config's own width, where its --train.lr was chosen; Muon normalises each matrix's update, so its rate
    # carries across widths unchanged.
    config_width = cfg.model.depth * cfg.model.aspect_ratio
    lr = cfg.train.lr * (shape.d_model / config_width) ** -0.5
    lr_rule = (f"--train.lr {cfg.train.lr:g} (set for the config's width {config_width}) x (width {shape.d_model} / "
               f"{config_width})^-0.5 (nanochat); Muon's --train.matrix_lr unchanged")
    # 5. prediction and footprint
    loss = float(law.loss(counts["non_embedding"], tokens))
    if law == PRIOR:
        bpb, bpb_note = None, "unknown: the prior's loss is per Chinchilla token; bpb needs a fit to your runs"
    elif bytes_per_token:
        bpb, bpb_note = loss / math.log(2) / bytes_per_token, f"at {bytes_per_token:.3g} bytes/token (your runs)"
    else:
        bpb, bpb_note = None, "unknown: no run in the ledger reports bpb for this tokenizer"
    energy_j = profile.tdp_watts * count * seconds
    kwh = energy_j / 3.6e6
    device_hours = seconds * count / 3600.0
    flags = ["--model.depth", str(depth), "--train.max_tokens", str(tokens), "--train.batch_size", str(micro),
             "--train.grad_accum", str(per_device // micro), "--train.lr", f"{lr:.3g}"]
    if count > 1:
        flags += ["--nproc", str(count)]
    return Plan(
        budget=budget.describe(), device=profile.name, count=count, dtype=dtype, peak_flops=peak, mfu=mfu,
        mfu_source=mfu_source, flops=flops, seconds=seconds, law=law.constants(),
        law_source=law.source + (f" ({law_note})" if law_note else ""), n_opt=n_opt, d_opt=d_opt,
        loss_at_opt=float(law.loss(n_opt, d_opt)), depth=depth, depth_note=depth_note, d_model=shape.d_model,
        n_head=shape.n_head, params=counts["total"], non_embedding_params=counts["non_embedding"],
        flops_per_token=fpt, tokens=tokens, tokens_per_param=tokens / counts["non_embedding"], seq_len=seq_len,
        global_batch=global_batch, micro_batch=micro, grad_accum=per_device // micro,
        steps=tokens // (global_batch * seq_len), batch_rule=batch_rule, lr=lr, matrix_lr=cfg.train.matrix_lr,
        lr_rule=lr_rule, predicted_loss=loss, predicted_bpb=bpb, bpb_note=bpb_note, energy_j=energy_j, kwh=kwh,
        cost_usd=device_hours * profile.price_per_hour if profile.price_per_hour is not None else None,
        co2_kg=kwh * carbon_g_per_kwh / 1000.0, carbon_g_per_kwh=carbon_g_per_kwh,
        energy_note=f"ESTIMATE: {count} x {profile.tdp_watts:g} W board power for the whole time",
        memory=memory, train_flags=flags,
    )


@dataclass(frozen=True)
class Prediction:
    """What the planner expects of a run before it starts, kept in the ledger next to what happened."""
    val_loss: float
    val_bpb: float | None  # None: no bytes/token ratio for this tokenizer yet, or the law is the prior
    wall_seconds: float  # training compute at the MFU below; validation and checkpoints not included
    tokens: float
    flops: float
    energy_kwh: float  # board power x time (an estimate, like the planner's)
    cost_usd: float | None
    mfu: float
    mfu_source: str
    law: str

    def to_dict(self) -> dict:
        return asdict(self)


def predict_run(cfg: RunConfig, shape: TransformerShape, peak_flops: float, profile: DeviceProfile, *,
                world_size: int = 1, runs: list[dict] | None = None) -> Prediction | None:
    """The planner's forecast for `cfg` as it is (its own size and stop limit), from the ledger's earlier runs:
    their fit (else the prior) for the loss, their median MFU on this device (else DEFAULT_MFU) for the time.
    None when the run stops only on something the planner cannot turn into tokens."""
    runs = runs or []
    t = cfg.train
    measured = measured_mfu(runs, profile.name, cfg.model.depth)
    mfu, mfu_source = (measured[0], f"median of {measured[1]} runs") if measured else (DEFAULT_MFU, "default")
    fpt = flops_per_token(shape, cfg.model.seq_len)
    tokens_per_step = t.batch_size * cfg.model.seq_len * t.grad_accum * world_size
    rate = peak_flops * mfu * world_size / fpt  # tokens per second
    limits = [t.max_tokens or math.inf, t.max_steps * tokens_per_step or math.inf,
              t.max_flops / fpt if t.max_flops else math.inf, t.max_time * rate if t.max_time else math.inf]
    tokens = min(limits)
    if not math.isfinite(tokens) or tokens <= 0:
        return None
    tokenizer = cfg.tokenizer_name()
    law, why_prior = choose_law(scaling_points(runs, tokenizer), tokenizer)
    loss = float(law.loss(count_params(shape)["non_embedding"], tokens))
    ratio = bytes_per_token(runs, tokenizer) if not why_prior else None
    seconds = tokens / rate
    kwh = profile.tdp_watts * world_size * seconds / 3.6e6
    price = profile.price_per_hour
    return Prediction(loss, loss / math.log(2) / ratio if ratio else None, seconds, tokens, tokens * fpt, kwh,
                      price * world_size * seconds / 3600 if price else None, mfu, mfu_source,
                      law.source if not why_prior else f"prior ({why_prior})")
