"""Chat fine-tuning: a checkpoint + OpenAI-style `messages` JSONL → a new run whose loss counts assistant tokens only.

`finetune(cfg, workspace)` runs one fine-tune to the end:

    1. load the base checkpoint (model shape from its checkpoint.json, tokenizer, chat template)
    2. read the conversations, split them by conversation into train/validation (seeded), render each with the
       checkpoint's chat template and mask everything but the assistant replies (data/chat_data.py)
    3. full fine-tuning (AdamW over every weight) or LoRA (adapters on the attention and MLP projections, the
       base frozen; train/lora.py)
    4. per step: learning rate (linear warm-up, then linear decay to zero), forward/backward on one padded batch,
       clip, AdamW step, counters (tokens, FLOPs, time, energy); validation before, every eval_every steps, after
    5. one checkpoint under runs/NAME with the adapters merged into the weights, the base's tokenizer and chat
       template: generate, serve and export load it like any other; optionally the adapters alone

The run goes to the ledger with kind "finetune". There is no resume: a fine-tune is short, and the first Ctrl-C
stops after the current step with a checkpoint of what was learnt so far (a second stops at once).
torch.compile is not applied: batches are padded to their own longest conversation, so every step has a new shape.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save as save_safetensors

from lmforge.atomic import fsync_path, write_file_atomic
from lmforge.checkpoint import LoadedModel, load_model, read_meta, resolve_checkpoint, save_checkpoint, step_dir_name
from lmforge.config import TrainConfig, option
from lmforge.data.chat_data import IGNORE_INDEX, ChatExample, collate, encode_conversations, read_chat_jsonl
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.interop.hf import set_chat_template
from lmforge.meter.energy import footprint, make_energy_reader
from lmforge.meter.hardware import default_carbon_g_per_kwh, describe_machine, resolve_profile
from lmforge.meter.ledger import Ledger
from lmforge.model.sizing import count_params, flops_per_token
from lmforge.model.transformer import TransformerShape
from lmforge.train.loop import Reporter, SilentReporter, StopAfterStep, finish_quietly, recorded_end
from lmforge.train.lora import TARGETS, adapter_state_dict, apply_lora, merged_state_dict
from lmforge.train.runtime import Runtime, setup_runtime
from lmforge.train.schedule import lr_multiplier
from lmforge.workspace import Workspace

PAD = "<|pad|>"
ADAPTER_DIR = "adapter"


@dataclass
class FinetuneConfig:
    ckpt: str = option("", "Base model: a run name, run folder or checkpoint folder (required).")
    data: str = option("", 'Chat data: a .jsonl file, one {"messages": [{"role", "content"}, ...]} per line '
                           "(required).")
    name: str = option("", "Run name (a folder under <workspace>/runs); empty = <base run>-ft-<timestamp>.")
    lora: int = option(0, "LoRA rank: train rank-r adapters on the attention and MLP projections with the base "
                          "weights frozen, merged into the weights at the end; 0 = full fine-tuning.")
    lora_alpha: float = option(0.0, "LoRA alpha: adapters are scaled by alpha / rank (0 = 2 x rank, a scale of 2, "
                                    "the common r=8/alpha=16 pairing).")
    save_adapter: bool = option(False, "With --lora: also write the adapters alone to runs/NAME/adapter/.")
    epochs: float = option(3.0, "Passes over the training conversations (ignored when --max-steps is set).")
    max_steps: int = option(0, "Stop after this many optimizer steps (0 = --epochs decides).")
    lr: float = option(0.0, "Peak AdamW learning rate (0 = 1e-4 for full fine-tuning, 1e-3 for LoRA, whose "
                            "adapters start at zero and are few).")
    warmup_steps: int = option(10, "Steps of linear learning-rate warm-up; the rest decays linearly to zero.")
    batch_size: int = option(8, "Conversations per step (padded to the longest; padding is not counted).")
    val_fraction: float = option(0.1, "Fraction of the conversations held out for validation, chosen by --seed "
                                      "(0 = no validation).")
    eval_every: int = option(0, "Validate every this many steps (0 = only before and after training).")
    weight_decay: float = option(0.0, "Decoupled weight decay on 2-D weights (norm gains never decay).")
    grad_clip: float = option(1.0, "Clip the global gradient norm to this value (0 = no clipping).")
    log_every: int = option(10, "Write step metrics to the ledger every this many steps (and at the end).")
    seed: int = option(1337, "Seed for the validation split, batch order and LoRA initialisation.")
    device: str = option("auto", "'auto' (CUDA if present, else CPU), 'cpu', 'cuda' or 'cuda:N'.")
    dtype: str = option("auto", "Compute precision: 'auto' = bf16 autocast on GPU, fp32 on CPU.",
                        choices=("auto", "fp32", "bf16"))
    threads: int = option(0, "CPU threads for torch (0 = every core).")

    def validate(self) -> FinetuneConfig:
        """Check the settings and resolve the automatic ones (lr, lora_alpha); ConfigError naming the flag."""
        for name, what in (("ckpt", "a run name or checkpoint folder"), ("data", "a .jsonl file of conversations")):
            if not getattr(self, name).strip():
                raise ConfigError(f"--{name} is required: {what}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"--{flag(f.name)} is {getattr(self, f.name)!r}; choose one of {', '.join(choices)}")
        for name in ("batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("lora", "lora_alpha", "max_steps", "lr", "warmup_steps", "eval_every", "weight_decay",
                     "grad_clip", "threads", "epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{flag(name)} must be >= 0, got {getattr(self, name)}")
        if not self.max_steps and not self.epochs:
            raise ConfigError("no stop condition: set --epochs or --max-steps")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if (self.lora_alpha or self.save_adapter) and not self.lora:
            raise ConfigError("--lora-alpha and --save-adapter need --lora RANK (LoRA fine-tuning)")
        if self.name and ("/" in self.name or self.name.startswith(".")):
            raise ConfigError(f"--name {self.name!r} is not a plain folder name; pass --name NAME")
        lr = self.lr or (1e-3 if self.lora else 1e-4)
        alpha = self.lora_alpha or 2.0 * self.lora
        return dataclasses.replace(self, lr=lr, lora_alpha=alpha)


def flag(name: str) -> str:
    return name.replace("_", "-")


@dataclass
class FinetuneResult:
    run_name: str
    run_dir: Path
    checkpoint: Path
    summary: dict[str, Any] = field(default_factory=dict)


def split_conversations(examples: list[ChatExample], val_fraction: float,
                        seed: int) -> tuple[list[ChatExample], list[ChatExample]]:
    """(train, validation), chosen by conversation with a seeded permutation; both keep the file's order."""
    n = len(examples)
    n_val = round(n * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1  # a requested validation set is never silently empty
    if val_fraction > 0 and n - n_val < 1:
        raise DataError(f"{n} conversation(s) cannot be split into training and validation; add conversations "
                        f"or pass --val-fraction 0")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


@torch.no_grad()
def assistant_loss(model: torch.nn.Module, examples: list[ChatExample], batch_size: int, pad_id: int,
                   runtime: Runtime) -> float | None:
    """Mean cross-entropy per assistant token over `examples` (every target token weighs the same); None if none."""
    if not examples:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        x, y = collate(examples[start:start + batch_size], pad_id)  # (B, T) each
        x, y = x.to(runtime.device), y.to(runtime.device)
        with runtime.autocast():
            losses = model(x, y, reduction="none")  # (B, T), 0 at ignored positions
        total += losses.sum().item()
        count += int((y != IGNORE_INDEX).sum().item())
    model.train(was_training)
    return total / count


def finetune_flops_per_token(shape: TransformerShape, seq_len: int, adapter_params: int = 0) -> float:
    """Training FLOPs per token (model/sizing's convention). With LoRA (adapter_params > 0) the frozen weights get
    no weight gradient, so their matmuls cost 2N forward + 2N backward instead of 6N; the adapters cost 6 each."""
    fpt = flops_per_token(shape, seq_len)
    if adapter_params:
        fpt += -2.0 * count_params(shape)["matmul"] + 6.0 * adapter_params
    return fpt


def build_optimizer(params: list[torch.nn.Parameter], cfg: FinetuneConfig) -> torch.optim.AdamW:
    decayed = [p for p in params if p.ndim == 2]
    plain = [p for p in params if p.ndim != 2]
    groups = [g for g in ({"params": decayed, "weight_decay": cfg.weight_decay},
                          {"params": plain, "weight_decay": 0.0}) if g["params"]]
    # betas as pretraining's defaults (config.TrainConfig)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def save_finetuned(run_dir: Path, step: int, state: dict[str, torch.Tensor], loaded: LoadedModel, config_yaml: str,
                   meta: dict[str, Any], train_state: dict[str, Any]) -> Path:
    """Write the checkpoint with the base's tokenizer and chat template; it appears in checkpoints/ whole or not at
    all (written and given its template in a temporary folder, then renamed into place)."""
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".tmp-finetune-{os.getpid()}"
    final = checkpoints / step_dir_name(step)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        written = save_checkpoint(tmp, step, state, train_state, config_yaml, loaded.tokenizer.path.read_bytes(),
                                  meta, keep_last=1)
        set_chat_template(written, loaded.chat_template)
        if final.exists():
            shutil.rmtree(final)
        os.rename(written, final)
        fsync_path(checkpoints)
    except OSError as e:
        raise LmforgeError(f"could not write the checkpoint {final}: {e.strerror or e}; free disk space and "
                           f"fine-tune again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def save_adapter(run_dir: Path, model: torch.nn.Module, cfg: FinetuneConfig, base: Path, wrapped: list[str]) -> Path:
    """runs/NAME/adapter/: adapter.safetensors ('<module>.lora_a' (r, in), '<module>.lora_b' (out, r)) and
    adapter.json (rank, alpha, the wrapped modules, the base checkpoint); W' = W + alpha / rank * B @ A."""
    folder = run_dir / ADAPTER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    write_file_atomic(folder / "adapter.safetensors", save_safetensors(adapter_state_dict(model)))
    info = {"rank": cfg.lora, "alpha": cfg.lora_alpha, "targets": list(TARGETS), "modules": wrapped,
            "base_checkpoint": str(base)}
    write_file_atomic(folder / "adapter.json", (json.dumps(info, indent=2) + "\n").encode())
    return folder


def finetune(cfg: FinetuneConfig, workspace: Workspace, *, reporter: Reporter | None = None) -> FinetuneResult:
    """Fine-tune `cfg.ckpt` on the conversations in `cfg.data` as the new run `cfg.name`; return where it ended."""
    cfg = cfg.validate()
    reporter = reporter or SilentReporter()
    runtime = setup_runtime(TrainConfig(device=cfg.device, dtype=cfg.dtype, threads=cfg.threads, compile="off"))

    # 1. the base model
    base = resolve_checkpoint(cfg.ckpt, workspace.runs_dir)
    loaded = load_model(base, runtime.device)
    base_meta = read_meta(base)
    model, tokenizer, shape = loaded.model, loaded.tokenizer, loaded.model.shape
    base_name = loaded.config.name or base.parent.parent.name
    name = cfg.name or f"{base_name}-ft-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = dataclasses.replace(cfg, name=name, ckpt=str(base),  # saved resolved: a run may gain checkpoints
                              data=str(Path(cfg.data).absolute()))
    run_dir = workspace.run_dir(name)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run '{name}' already exists in {run_dir}; choose another --name")
    ledger = Ledger(workspace.ledger_path)
    if any(r["name"] == name for r in ledger.list_runs()):
        raise ConfigError(f"a run named {name!r} is already in the ledger {ledger.path}; choose another --name")

    # 2. the data: every conversation rendered and masked (so a bad line fails first), then split by conversation
    conversations = read_chat_jsonl(Path(cfg.data))
    context = shape.max_seq_len
    examples, dropped = encode_conversations(conversations, loaded.chat_template, tokenizer, context, cfg.data)
    if not examples:
        raise DataError(f"none of the {len(conversations)} conversations in {cfg.data} has an assistant token "
                        f"within the model's context of {context} tokens; shorten the conversations")
    train_set, val_set = split_conversations(examples, cfg.val_fraction, cfg.seed)
    truncated = sum(e.truncated for e in examples)
    pad_id = tokenizer.special_ids.get(PAD, tokenizer.eot_id)  # never a target, so any id would do

    # 3. what trains: every weight, or adapters on a frozen base
    torch.manual_seed(cfg.seed)
    wrapped = apply_lora(model, cfg.lora, cfg.lora_alpha) if cfg.lora else []
    trainable = [p for p in model.parameters() if p.requires_grad]
    adapter_params = sum(p.numel() for p in trainable) if cfg.lora else 0
    optimizer = build_optimizer(trainable, cfg)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    total_steps = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))

    # meter: declared power for the estimate where nothing measures, price and carbon for the footprint
    device_name = torch.cuda.get_device_name(runtime.device) if runtime.device.type == "cuda" else None
    profile = resolve_profile(runtime.device.type, device_name, need_peak=False)
    carbon = default_carbon_g_per_kwh()
    energy = make_energy_reader(runtime.device.type, runtime.device.index or 0, declared_watts=profile.tdp_watts)
    params = count_params(shape)
    hardware = {**describe_machine(), "device": str(runtime.device), "profile": profile.name,
                "dtype": runtime.dtype, "threads": torch.get_num_threads(), "energy_source": energy.label}
    base_config = dataclasses.replace(loaded.config, name=name)

    # everything checked: only now does the run leave a trace
    run_dir.mkdir(parents=True, exist_ok=True)
    write_file_atomic(run_dir / "config.yaml", base_config.to_yaml().encode())
    write_file_atomic(run_dir / "finetune.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False).encode())
    run_id = ledger.start_run(name, "finetune", {"finetune": dataclasses.asdict(cfg), **base_config.to_dict()},
                              hardware, str(run_dir))
    method = f"LoRA rank {cfg.lora}, alpha {cfg.lora_alpha:g}" if cfg.lora else "full"
    reporter.started({"run": name, "run_dir": run_dir, "base": base, "shape": shape, "method": method,
                      "trainable_params": sum(p.numel() for p in trainable), "params": params["total"],
                      "train_conversations": len(train_set), "val_conversations": len(val_set),
                      "truncated": truncated, "dropped": dropped, "context": context,
                      "steps": total_steps, "device": str(runtime.device), "dtype": runtime.dtype,
                      "energy_label": energy.label})

    def validate(step: int) -> float | None:
        loss = assistant_loss(model, val_set, cfg.batch_size, pad_id, runtime)
        if loss is not None:
            ledger.log_metrics(run_id, step, {"val_loss": loss})
            reporter.evaluated({"step": step, "val_loss": loss})
        return loss

    step, seen, tokens, target_tokens, flops, train_seconds = 0, 0, 0, 0, 0.0, 0.0
    wall0 = time.perf_counter()
    order_rng = torch.Generator().manual_seed(cfg.seed)
    pending: list[tuple[int, dict[str, float]]] = []
    ctrl_c = StopAfterStep()
    interrupted = False
    with recorded_end(ledger, run_id, ctrl_c):
        val_before = validate(0)
        # 4. the steps, epoch after epoch
        model.train()
        while step < total_steps and not interrupted:
            order = torch.randperm(len(train_set), generator=order_rng).tolist()  # a new order every epoch
            for start in range(0, len(order), cfg.batch_size):
                if step >= total_steps:
                    break
                batch = [train_set[i] for i in order[start:start + cfg.batch_size]]
                # a. learning rate: linear warm-up, then linear decay to zero over the rest
                mult = lr_multiplier(step, step / total_steps, warmup_steps=cfg.warmup_steps, decay_frac=1.0,
                                     min_lr_frac=0.0)
                for group in optimizer.param_groups:
                    group["lr"] = cfg.lr * mult
                # b. forward and backward on the padded batch; the loss is the mean over its assistant tokens
                step_start = time.perf_counter()
                x, y = collate(batch, pad_id)  # (B, T) each
                x, y = x.to(runtime.device, non_blocking=True), y.to(runtime.device, non_blocking=True)
                with runtime.autocast():
                    loss = model(x, y)
                loss.backward()
                # c. clip and step
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise LmforgeError(f"fine-tuning loss became {loss_value} at step {step + 1}; lower --lr")
                step += 1
                # d. counters: real tokens (not padding) and the FLOPs of the padded batch the device computed
                seconds = time.perf_counter() - step_start
                energy.sample()
                seen += len(batch)
                tokens += sum(len(e.ids) - 1 for e in batch)
                target_tokens += int((y != IGNORE_INDEX).sum().item())
                flops += x.numel() * finetune_flops_per_token(shape, x.size(1), adapter_params)
                train_seconds += seconds
                pending.append((step, {"loss": loss_value, "lr_mult": mult, "tokens": tokens, "flops": flops,
                                       "time": time.perf_counter() - wall0}))
                if step % cfg.log_every == 0:
                    for logged in pending:
                        ledger.log_metrics(run_id, *logged)
                    pending.clear()
                    ledger.heartbeat(run_id)
                reporter.stepped({"step": step, "steps": total_steps, "loss": loss_value, "lr_mult": mult,
                                  "tok_per_s": tokens / train_seconds,
                                  "progress": step / total_steps})
                if cfg.eval_every and step % cfg.eval_every == 0 and step < total_steps:
                    validate(step)
                    model.train()
                if ctrl_c.requested:
                    interrupted = True
                    break
        for logged in pending:
            ledger.log_metrics(run_id, *logged)
        val_after = validate(step)

        # 5. the checkpoint: adapters merged, the base's tokenizer and chat template
        state = merged_state_dict(model) if cfg.lora else model.state_dict()
        meta = {"shape": dataclasses.asdict(shape), "tokenizer_hash": base_meta.get("tokenizer_hash", tokenizer.hash),
                "params": params["total"],
                "finetuned_from": {"checkpoint": str(base), "method": "lora" if cfg.lora else "full",
                                   "settings": dataclasses.asdict(cfg)}}
        train_state = {"counters": {"step": step, "tokens": tokens, "target_tokens": target_tokens, "flops": flops}}
        final = save_finetuned(run_dir, step, state, loaded, base_config.to_yaml(), meta, train_state)
        ledger.add_artifact(run_id, "checkpoint", str(final))
        reporter.checkpointed(final)
        adapter = None
        if cfg.save_adapter:
            adapter = save_adapter(run_dir, model, cfg, base, wrapped)
            ledger.add_artifact(run_id, "adapter", str(adapter))

    wall_seconds = time.perf_counter() - wall0
    energy_j = energy.joules()
    cost = footprint(energy_j, wall_seconds, profile.price_per_hour, carbon)
    summary = {
        "method": "lora" if cfg.lora else "full", "lora_rank": cfg.lora or None,
        "lora_alpha": cfg.lora_alpha if cfg.lora else None, "base_checkpoint": str(base),
        "steps": step, "epochs": seen / len(train_set), "tokens": tokens,
        "target_tokens": target_tokens, "flops": flops, "params": params["total"],
        "non_embedding_params": params["non_embedding"], "trainable_params": sum(p.numel() for p in trainable),
        "train_conversations": len(train_set), "val_conversations": len(val_set), "truncated": truncated,
        "dropped": dropped, "train_seconds": train_seconds, "wall_seconds": wall_seconds,
        "tok_per_s": tokens / train_seconds if train_seconds else 0.0,
        "val_loss_before": val_before, "val_loss_after": val_after, "val_loss": val_after,
        "energy_j": energy_j, "energy_measured": energy.measured, "energy_label": energy.label,
        "kwh": cost["kwh"], "cost_usd": cost["cost_usd"], "co2_kg": cost["co2_kg"],
        "price_per_hour": profile.price_per_hour, "carbon_g_per_kwh": carbon, "device": str(runtime.device),
        "profile": profile.name, "checkpoint": str(final), "adapter": str(adapter) if adapter else None,
        "pid": os.getpid(),
    }
    if interrupted:
        message = f"stopped after step {step} of {total_steps}, checkpoint {final}"
        finish_quietly(ledger, run_id, "interrupted", message)
        ledger.update_summary(run_id, summary)
        raise KeyboardInterrupt(message)
    ledger.finish_run(run_id, "completed", summary=summary)
    return FinetuneResult(name, run_dir, final, summary)
