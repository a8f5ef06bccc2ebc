"""What guard rails cost a server: the engine with no guard, with rules + PII, and with the shipped default policy.

    python bench/guard_serve_bench.py --ckpt RUN_OR_CHECKPOINT [--requests 16] [--max-tokens 64]

Each setting submits the same `--requests` greedy prompts at once (ignore_eos, so every request generates
--max-tokens tokens) to a fresh engine and prints tokens/s, and the guard's time per check by direction (from
the engine's own lmforge_guard_seconds histogram). Outputs are compared with the unguarded run: the rails must
change nothing here, as these prompts are harmless.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from lmforge.checkpoint import resolve_checkpoint
from lmforge.guard.guard import Guard
from lmforge.guard.policy import load_policy
from lmforge.serve.engine import Engine, EngineConfig, SamplingParams
from lmforge.workspace import Workspace

PROMPTS = ["def main(argv):\n", "class Parser:\n", "import os\n", "# Read the config file\n"]


def guards() -> dict[str, Guard | None]:
    default = load_policy()
    fast = dataclasses.replace(default, detectors={k: v for k, v in default.detectors.items() if k != "semantic"})
    return {"none": None, "rules + pii": Guard.from_policy(fast), "default (builtin)": Guard.from_policy(default)}


def run(path: Path, guard: Guard | None, requests: int, max_tokens: int) -> tuple[float, dict, list[str]]:
    engine = Engine.from_checkpoint(path, EngineConfig(max_concurrency=requests), guard=guard).start()
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    try:
        engine.generate("warm up", params)
        start = time.perf_counter()
        handles = [engine.submit(PROMPTS[i % len(PROMPTS)], params) for i in range(requests)]
        results = [h.result() for h in handles]
        seconds = time.perf_counter() - start
    finally:
        engine.stop()
    registry = engine.metrics.registry
    per_check = {}
    for direction in ("input", "output"):
        count = registry.get_sample_value("lmforge_guard_seconds_count", {"direction": direction}) or 0
        total = registry.get_sample_value("lmforge_guard_seconds_sum", {"direction": direction}) or 0
        per_check[direction] = (count, total / count * 1e3 if count else 0.0)
    return sum(len(r.token_ids[0]) for r in results) / seconds, per_check, [r.texts[0] for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="run name, run folder or checkpoint folder")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    path = resolve_checkpoint(args.ckpt, Workspace.resolve().runs_dir)
    print(f"{args.requests} requests x {args.max_tokens} tokens at once, {path}")
    print(f"{'guard':<20} {'tokens/s':>9} {'vs none':>8} {'input checks':>13} {'ms/check':>9} "
          f"{'output checks':>14} {'ms/check':>9}  same text")
    baseline, reference = None, None
    for name, guard in guards().items():
        tps, checks, texts = run(path, guard, args.requests, args.max_tokens)
        baseline, reference = baseline or tps, reference or texts
        (n_in, ms_in), (n_out, ms_out) = checks["input"], checks["output"]
        print(f"{name:<20} {tps:>9.0f} {tps / baseline:>7.2f}x {n_in:>13.0f} {ms_in:>9.2f} {n_out:>14.0f} "
              f"{ms_out:>9.2f}  {texts == reference}")


if __name__ == "__main__":
    main()
