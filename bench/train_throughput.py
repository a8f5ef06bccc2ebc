"""Training throughput of the lmforge Transformer against Hugging Face transformers on the same shape (CPU).

Times full training steps (forward + loss + backward + optimizer step + zero_grad) on random tokens after warm-up,
for our model and for HF LlamaForCausalLM (Qwen3ForCausalLM with --qk-norm, the same architecture as ours then),
with SDPA attention in both, and prints one row per implementation: parameters, tokens/s (median and best step),
MFU and speedup over HF eager. Every row uses AdamW, plus one row of lmforge as it trains by default
(Muon for the weight matrices, AdamW for the rest). Model FLOPs come from lmforge.model.sizing.flops_per_token (PaLM's convention);
the peak is measured here with a matmul probe in the same precision.

Timed steps are interleaved across implementations, so load from other processes on a shared machine falls on
all of them alike; when the median and best columns disagree a lot, the machine was busy and the best column
is the better estimate of each implementation's own speed.

    python bench/train_throughput.py                      # the CPU demo's shape: eager rows + compiled ours
    python bench/train_throughput.py --compile both       # also a compiled HF row
    python bench/train_throughput.py --dtype bf16         # both under CPU bf16 autocast
"""

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch

from lmforge.config import TrainConfig
from lmforge.model.sizing import describe, flops_per_token, shape_from_depth
from lmforge.model.transformer import Transformer, TransformerShape
from lmforge.train.optim import build_optimizers


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_peak_flops(threads: int, dtype: torch.dtype) -> float:
    """Best matmul FLOP/s on this CPU in dtype: what MFU divides by (fp32: the meter package's probe)."""
    if dtype == torch.float32:
        from lmforge.meter.hardware import measure_cpu_peak_flops

        return measure_cpu_peak_flops(threads=threads, seconds=1.0)
    n = 1024
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(20))
    return 2 * n**3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hf_model(shape: TransformerShape) -> torch.nn.Module:
    """An HF causal LM with exactly our shape: Llama, or Qwen3 when the shape uses QK-norm."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = (Qwen3Config, Qwen3ForCausalLM) if shape.qk_norm else (LlamaConfig, LlamaForCausalLM)
    config = config_class(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.d_ff,
        num_hidden_layers=shape.n_layer,
        num_attention_heads=shape.n_head,
        num_key_value_heads=shape.n_kv_head,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_seq_len,
        rope_theta=shape.rope_theta,
        rms_norm_eps=shape.norm_eps,
        tie_word_embeddings=shape.tie_embeddings,
        attention_bias=False,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return model_class(config)


class TrainingStep:
    """One implementation's training step (forward + loss + backward + optimizer step + zero_grad) on fixed tokens."""

    def __init__(self, label: str, model: torch.nn.Module, compiled: bool, is_hf: bool, idx: torch.Tensor, autocast,
                 muon: bool = False):
        self.label, self.model, self.is_hf, self.idx, self.autocast = label, model, is_hf, idx, autocast
        self.forward = torch.compile(model) if compiled else model
        # AdamW for every row but one: lmforge as it trains by default (Muon for matrices, AdamW for the rest)
        self.optimizers = (build_optimizers(model, TrainConfig(optimizer="muon"), "cpu") if muon
                           else [torch.optim.AdamW(model.parameters(), lr=1e-4)])
        self.times: list[float] = []

    def run(self) -> float:
        t0 = time.perf_counter()
        with self.autocast():
            if self.is_hf:
                loss = self.forward(input_ids=self.idx, labels=self.idx).loss  # HF shifts the labels itself
            else:
                loss = self.forward(self.idx, self.idx)  # targets = inputs: the same compute as shifted targets
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        self.model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # defaults: the CPU demo (src/lmforge/configs/demo.yaml): depth 2 (128 wide), batch 16 x 256, 4k vocabulary
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", choices=["none", "ours", "both"], default="ours",
                        help="add torch.compile rows: for ours, or for ours and HF")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 runs every implementation under torch.autocast(cpu, bfloat16)")
    parser.add_argument("--no-qk-norm", dest="qk_norm", action="store_false",
                        help="drop QK-norm (the training default) and compare with HF Llama instead of Qwen3")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = shape_from_depth(args.depth, args.vocab_size, args.seq_len, qk_norm=args.qk_norm)
    flops = flops_per_token(shape, args.seq_len)
    tokens = args.batch_size * args.seq_len
    peak = measure_peak_flops(args.threads, dtype)

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else contextlib.nullcontext()

    hf_name = "HF Qwen3ForCausalLM" if shape.qk_norm else "HF LlamaForCausalLM"
    runs = [("lmforge", False, False), (hf_name, False, False), ("lmforge", False, True)]
    if args.compile in ("ours", "both"):
        runs.append(("lmforge", True, False))
    if args.compile == "both":
        runs.append((hf_name, True, False))
    idx = torch.randint(0, shape.vocab_size, (args.batch_size, args.seq_len))
    steps = []
    for name, compiled, muon in runs:
        torch.manual_seed(0)
        is_hf = name != "lmforge"
        model = hf_model(shape) if is_hf else Transformer(shape)
        model.train()
        label = f"{name} {'compiled' if compiled else 'eager'}{', Muon' if muon else ''}"
        steps.append(TrainingStep(label, model, compiled, is_hf, idx, autocast, muon))

    # 1) warm up (and compile) one implementation at a time, 2) time steps interleaved, rotating the order
    for step in steps:
        for _ in range(args.warmup):
            step.run()
    for round_ in range(args.steps):
        for i in range(len(steps)):
            step = steps[(round_ + i) % len(steps)]
            step.times.append(step.run())

    peak = max(peak, measure_peak_flops(args.threads, dtype))  # probe again: a busy moment lowers one probe

    print(f"machine: {cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
          f"{args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"model: {describe(shape)}")
    print(f"batch {args.batch_size} x seq {args.seq_len} = {tokens} tokens/step, {flops / 1e6:.1f} MFLOP/token, "
          f"{args.steps} timed steps each after {args.warmup} warm-up")
    hf_median, hf_best = statistics.median(steps[1].times), min(steps[1].times)
    print(f"\n{'impl':<30} {'params':>8} {'tok/s med':>10} {'tok/s best':>11} {'MFU best':>9} "
          f"{'vs HF med':>10} {'vs HF best':>11}")
    for step in steps:
        n = sum(p.numel() for p in step.model.parameters())
        median, best = statistics.median(step.times), min(step.times)
        print(f"{step.label:<30} {n / 1e6:>7.2f}M {tokens / median:>10.0f} {tokens / best:>11.0f} "
              f"{tokens / best * flops / peak:>9.1%} {hf_median / median:>9.2f}x {hf_best / best:>10.2f}x")


if __name__ == "__main__":
    main()
