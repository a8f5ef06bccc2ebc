"""Guard overhead per request: p50 / p99 of one `Guard.check` on the shipped dev set's prompts.

Two configurations of the default policy: rules + PII only, and rules + PII + the semantic classifier. Each
prompt is checked once as an input after a warm-up pass; the times are per text, one text at a time (what a
request costs the server before admission). Targets on a CPU: p50 <= 5 ms (rules + PII), <= 20 ms (+ semantic).

    python bench/guard_bench.py
    python bench/guard_bench.py --threads 1
"""

import argparse
import dataclasses
import time

import torch

from lmforge.guard.evaluate import load_records, percentile, shipped_devset
from lmforge.guard.guard import Guard
from lmforge.guard.policy import load_policy
from lmforge.meter.hardware import cpu_model

TARGETS_MS = {"rules + pii": 5.0, "rules + pii + semantic": 20.0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=1, help="passes over the prompts (default 1)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = [r["text"] for r in load_records(shipped_devset())]
    default = load_policy()
    fast = dataclasses.replace(default, detectors={k: v for k, v in default.detectors.items() if k != "semantic"})
    configs = {"rules + pii": fast, "rules + pii + semantic": default}
    print(f"machine: {cpu_model()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {len(texts)} prompts (median {sorted(map(len, texts))[len(texts) // 2]}"
          f" characters), one at a time\n")
    print(f"{'detectors':<26}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'target p50':>12}")
    for name, policy in configs.items():
        guard = Guard.from_policy(policy)
        for text in texts[:50]:  # warm-up: first calls allocate and load
            guard.check(text)
        seconds = []
        for _ in range(args.repeats):
            for text in texts:
                start = time.perf_counter()
                guard.check(text)
                seconds.append(time.perf_counter() - start)
        p50, p99 = 1000 * percentile(seconds, 0.5), 1000 * percentile(seconds, 0.99)
        verdict = "PASS" if p50 <= TARGETS_MS[name] else "MISS"
        print(f"{name:<26}{p50:>9.2f}{p99:>9.2f}{1000 * sum(seconds) / len(seconds):>9.2f}"
              f"{f'<= {TARGETS_MS[name]:g} {verdict}':>12}")


if __name__ == "__main__":
    main()
