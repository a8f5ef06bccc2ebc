"""Where a training step's time goes on a GPU: the parts of one step timed alone, then the top kernels.

Random tokens, no data needed: the point is the split between forward+backward, the optimizers and the sync at
the end of each step, at the shape bench/gpu_check.sh trains (GPT-2 small: 12 x 768, seq 1024, vocab 32768).

    python bench/gpu_profile.py                 # batch 64 x 1024
    python bench/gpu_profile.py --batch 32 --depth 12 --seq 1024 --vocab 32768 --mode max-autotune-no-cudagraphs
"""

from __future__ import annotations

import argparse

import torch

from lmforge.config import TrainConfig
from lmforge.model.sizing import describe, flops_per_token, shape_from_depth
from lmforge.model.transformer import Transformer
from lmforge.train.optim import build_optimizers
from lmforge.train.runtime import prepare_model, setup_runtime


def cuda_ms(fn, repeat: int) -> float:
    """Mean milliseconds of fn() over `repeat` calls, timed with CUDA events after one untimed call."""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--no-qk-norm", action="store_true", help="drop the per-head RMSNorm on queries and keys")
    ap.add_argument("--no-kernels", action="store_true", help="skip the kernel table")
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: the trainer's, i.e. none)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: needs a CUDA device; run it on a GPU machine")

    cfg = TrainConfig(device="cuda")
    runtime = setup_runtime(cfg)
    shape = shape_from_depth(args.depth, args.vocab, args.seq, kv_group=1, qk_norm=not args.no_qk_norm)
    model = Transformer(shape)
    step_model = prepare_model(model, runtime) if args.mode is None else \
        torch.compile(model.to("cuda"), mode=args.mode)
    adamw, muon = build_optimizers(model, cfg, "cuda")
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device="cuda")
    peak = 989e12
    tokens = args.batch * args.seq
    fpt = flops_per_token(shape, args.seq)
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | compile mode {args.mode} | {describe(shape)}")
    print(f"batch {args.batch} x {args.seq} = {tokens:,} tokens/step, {fpt / 1e6:.0f} MFLOP/token")

    def forward_backward():
        with runtime.autocast():
            loss = step_model(x, y)
        loss.backward()
        return loss

    def full_step(sync: bool):
        loss = forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adamw.step()
        muon.step()
        model.zero_grad(set_to_none=True)
        if sync:
            loss.item()

    for _ in range(3):  # compile and warm up
        full_step(True)
    forward_backward()  # leave gradients in place for the optimizer timings
    rows = [
        ("forward + backward", cuda_ms(lambda: (forward_backward(), model.zero_grad(set_to_none=False)), args.repeat)),
        ("clip_grad_norm_", cuda_ms(lambda: torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0), args.repeat)),
        ("AdamW step (embed, head, norms)", cuda_ms(adamw.step, args.repeat)),
        ("Muon step (matrices)", cuda_ms(muon.step, args.repeat)),
        ("full step, .item() every step", cuda_ms(lambda: full_step(True), args.repeat)),
        ("full step, no sync", cuda_ms(lambda: full_step(False), args.repeat)),
    ]
    print(f"\n{'part':<34}{'ms':>8}{'tok/s':>12}{'MFU':>8}")
    for name, ms in rows:
        rate = tokens / (ms / 1e3)
        full = name.startswith(("forward", "full"))
        print(f"{name:<34}{ms:>8.1f}{rate if full else float('nan'):>12,.0f}"
              f"{rate * fpt / peak if full else float('nan'):>8.1%}")

    if args.no_kernels:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            full_step(True)
        torch.cuda.synchronize()
    print("\ntop CUDA kernels over 3 steps:")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))


if __name__ == "__main__":
    main()
