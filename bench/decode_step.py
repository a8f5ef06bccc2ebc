"""Time of the serving engine's decode step alone, by batch size: the floor under `lmforge serve`'s decode rate.

For each batch size, the padded decode step of `DecodeGraphs` (forward, KV-cache write, argmax) run eagerly from
Python, the same with the model torch.compile'd, and on a GPU replayed as CUDA graphs of one step and of bursts of
--decode-steps steps (each fed the last one's argmax on the device), and of bursts of as many speculative steps
(--speculate drafted tokens per row: a forward of k + 1 tokens per row, which emits 1 to k + 1 tokens depending on
the text). Each figure is the median of --repeats timed runs, per step, including the read of the tokens on the
host that the engine does. With --kernels, the kernels of one compiled step on a GPU, and of one speculative step,
from torch.profiler: where a graph replay's time goes.

    python bench/decode_step.py --ckpt RUN|PATH                          # CPU: eager and compiled
    python bench/decode_step.py --ckpt RUN --device cuda --kernels       # GPU: also graphs, and the kernels
"""

import argparse
import functools
import statistics
import sys
import time

import torch

from lmforge.checkpoint import load_model, resolve_checkpoint
from lmforge.errors import LmforgeError
from lmforge.model.sizing import describe
from lmforge.serve.engine import DecodeGraphs, sequence_rows
from lmforge.serve.speculation import compiled_propose_and_verify
from lmforge.workspace import Workspace


def per_step_us(run, device: torch.device, steps: int, repeats: int) -> float:
    """Median microseconds per token step of `run()` (which does `steps` steps and reads their tokens)."""
    for _ in range(3):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times) * 1e6


def one_step(graphs: DecodeGraphs, tokens: list[int], positions: list[int]) -> list[int]:
    """A single step and the read of its tokens, as the engine's step does."""
    return graphs.step(tokens, positions)[1].tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, metavar="RUN|PATH", help="run name, run folder or checkpoint folder")
    parser.add_argument("--workspace", metavar="DIR", help="where run names are looked up")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--decode-steps", type=int, default=8, metavar="K", help="steps per burst (default 8)")
    parser.add_argument("--speculate", type=int, default=4, metavar="K",
                        help="tokens drafted per row in the speculative steps (default 4)")
    parser.add_argument("--speculate-max-batch", type=int, metavar="N",
                        help="time speculative steps up to this batch size (default: at every --batch; one row and "
                        "more rows are one compile of the speculative step each)")
    parser.add_argument("--position", type=int, default=48, help="cached positions of every row (default 48)")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per figure (default 50)")
    parser.add_argument("--kernels", action="store_true", help="list the kernels of one compiled step (GPU)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("--device cuda but torch sees no CUDA device; use --device cpu")

    ckpt = resolve_checkpoint(args.ckpt, Workspace.resolve(args.workspace).runs_dir)
    loaded = load_model(ckpt, str(device))
    model, vocab = loaded.model.eval(), loaded.tokenizer.vocab_size
    if device.type == "cuda":
        model.to(torch.bfloat16).fuse_projections()  # as the engine does
    room = args.decode_steps * (args.speculate + 1)
    if not 0 <= args.position <= model.shape.max_seq_len - room:
        raise LmforgeError(f"--position must leave --decode-steps x (--speculate + 1) = {room} positions in the "
                           f"context of {model.shape.max_seq_len}")
    slots = max(args.batch)
    dtype = next(model.parameters()).dtype
    cache = functools.partial(sequence_rows, model, slots, device, dtype)  # the engine's rows: one version per step
    compiled = torch.compile(model, dynamic=True)
    verify = compiled_propose_and_verify()
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"{dtype}; model: {describe(model.shape)}")
    print(f"\n{'batch':>5} {'eager':>10} {'compiled':>10} {'graph':>10} {f'graph x{args.decode_steps}':>10}"
          f" {f'spec x{args.decode_steps}':>10}   (us per step; a speculative step feeds {args.speculate + 1} tokens "
          f"per row)")
    with torch.inference_mode():
        if device.type == "cuda":  # every batch size's graphs, captured once
            graphs = DecodeGraphs(model, cache(), vocab, steps=args.decode_steps, forward=compiled,
                                  speculate=args.speculate, speculate_max_batch=args.speculate_max_batch,
                                  verify=verify)
            graphs.capture()
        for batch in args.batch:
            tokens, positions = [1] * batch, [args.position] * batch
            figures = []
            for forward in (model, compiled):
                eager = DecodeGraphs(model, cache(), vocab, forward=forward)  # never captured
                figures.append(per_step_us(functools.partial(one_step, eager, tokens, positions), device, 1,
                                           args.repeats))
            if device.type == "cuda":
                figures.append(per_step_us(functools.partial(one_step, graphs, tokens, positions), device, 1,
                                           args.repeats))
                figures.append(per_step_us(functools.partial(graphs.ahead, tokens, positions), device,
                                           args.decode_steps, args.repeats))
                if batch in graphs.speculate_batches:
                    histories = [[1] * (args.position + 1)] * batch
                    figures.append(per_step_us(functools.partial(graphs.speculative, tokens, positions, histories),
                                               device, args.decode_steps, args.repeats))
            print(f"{batch:>5} " + " ".join(f"{f:>10.1f}" for f in figures))

        if args.kernels and device.type == "cuda":
            eager = DecodeGraphs(model, cache(), vocab, forward=compiled, speculate=args.speculate,
                                 verify=verify)
            steps = [("compiled step", functools.partial(one_step, eager, [1], [args.position]))]
            if graphs.speculate:  # (not if --speculate 0, or if it did not compile)
                steps.append(("speculative step", functools.partial(eager.speculative, [1], [args.position],
                                                                    [[1] * (args.position + 1)])))
            for what, step in steps:
                step()
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    step()
                print_kernels(f"one {what} at batch 1", prof)


def print_kernels(what: str, prof: torch.profiler.profile) -> None:
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels)
    print(f"\n{what}: {len(kernels)} kernels and copies, {total:.1f} us on the device")
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    for name, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:16]:
        print(f"{sum(times):>8.1f} us {len(times):>3}x  {name[:100]}")


if __name__ == "__main__":
    try:
        main()
    except LmforgeError as e:
        sys.exit(f"decode_step: {e}")
