"""Is the planner right? A sweep on this CPU, a plan for a new budget from it, then that run, predicted vs actual.

    python bench/plan_vs_actual.py [--workspace DIR] [--budget-flops 3e12]

1. `lmforge sweep` (the default IsoFLOP grid on the stdlib corpus: 3 budgets x depths 1-3, under 10 minutes;
   runs already in the workspace are kept)
2. `lmforge plan --budget-flops C --device cpu --json`: the law fitted to those runs, the MFU they measured
3. `lmforge train` with exactly the flags the plan prints
4. the plan's predicted training time and validation loss against the run's (issue 6's targets: time within
   ±20%, loss within ±5%)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.meter.ledger import Ledger


def lmforge(workspace: Path, *args: str, capture: bool = False) -> str:
    env = {**os.environ, "LMFORGE_HOME": str(workspace), "COLUMNS": "160"}
    p = subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, text=True, check=False,
                       stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if p.returncode:
        sys.exit(f"lmforge {' '.join(args[:2])} failed" + (f":\n{p.stderr[-2000:]}" if capture else ""))
    return p.stdout if capture else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, default=Path(tempfile.gettempdir()) / "lmforge-plan-bench")
    parser.add_argument("--budget-flops", type=float, default=3e12)
    args = parser.parse_args()

    demo = str(Path(__file__).parents[1] / "src/lmforge/configs/demo.yaml")
    lmforge(args.workspace, "sweep")
    plan = json.loads(lmforge(args.workspace, "plan", "--config", demo, "--budget-flops", f"{args.budget_flops:g}",
                              "--device", "cpu", "--json", capture=True))
    name = f"planned-{args.budget_flops:.0e}".replace("+", "")
    ledger = Ledger(args.workspace / "ledger.db")
    if not any(r["name"] == name and r["status"] == "completed" for r in ledger.list_runs()):
        lmforge(args.workspace, "train", "--config", demo, "--name", name, "--train.max_time", "0", "--train.eval_every", "0", "--train.checkpoint_every", "0",
                *plan["train_flags"])
    s = ledger.get_run(name)["summary"]

    print(f"\nplan for {args.budget_flops:g} FLOPs on this CPU: depth {plan['depth']}, {plan['tokens']:,} tokens, "
          f"batch {plan['micro_batch']} x {plan['grad_accum']}, MFU {plan['mfu']:.3f} ({plan['mfu_source']})")
    print(f"law: {plan['law_source']}")
    print(f"{'':<26} {'predicted':>10} {'actual':>10} {'error':>8} {'target':>8}")
    rows = [("time in training steps (s)", plan["seconds"], s["train_seconds"], 0.20),
            ("validation loss", plan["predicted_loss"], s["val_loss"], 0.05)]
    if plan.get("predicted_bpb"):
        rows.append(("validation bpb", plan["predicted_bpb"], s["val_bpb"], 0.05))
    for label, predicted, actual, target in rows:
        error = predicted / actual - 1
        verdict = "met" if abs(error) <= target else "MISSED"
        print(f"{label:<26} {predicted:>10.4g} {actual:>10.4g} {error:>+7.1%} {f'±{target:.0%}':>6} {verdict}")


if __name__ == "__main__":
    main()
