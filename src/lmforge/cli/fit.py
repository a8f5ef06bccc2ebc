"""`lmforge fit`: fit L(N, D) = E + A/N^alpha + B/D^beta to the ledger's finished runs, with the frontier."""

from __future__ import annotations

import argparse
import json
import math

from rich.table import Table

from lmforge.cli.common import human, out, workspace_of
from lmforge.errors import ConfigError
from lmforge.plan.history import finished_train_runs, ledger_runs, most_common_tokenizer, run_tokenizer, scaling_points
from lmforge.plan.scaling import HUBER_DELTA, MIN_RUNS, NAMES, PRIOR, ScalingFit, ScalingLaw, fit, frontier

HELP = "fit a scaling law L(N, D) to the ledger's finished runs and show the compute-optimal frontier"
DESCRIPTION = f"""\
Fits L(N, D) = E + A/N^alpha + B/D^beta to the finished training runs in the ledger: N = non-embedding
parameters, D = training tokens, L = validation loss (nats/token). As Chinchilla and Epoch AI: in log space,
Huber loss (delta {HUBER_DELTA:g}) summed over runs, L-BFGS-B from a grid of starts keeping the best, and 90%
intervals from a bootstrap over runs. Losses compare only on one tokenizer, so one tokenizer's runs are fitted
(the one with the most runs, or --tokenizer). With fewer than {MIN_RUNS} runs the prior is shown: Epoch AI's
refit of Chinchilla. The frontier splits each budget C = 6 N D into the N and D that minimise the loss.

examples:
  lmforge fit
  lmforge fit --tokenizer stdlib-bpe4096 --budgets 1e15,1e16,1e17 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="NAME", help="fit the runs on this tokenizer (default: the one with the "
                   "most finished runs)")
    p.add_argument("--bootstrap", type=int, default=100, metavar="N", help="bootstrap resamples for the intervals "
                   "(default 100; 0 = none)")
    p.add_argument("--budgets", metavar="FLOPS,...", help="compute budgets of the frontier (default: decades from "
                   "the runs' compute upward, or 1e16..1e21 for the prior)")
    p.add_argument("--json", action="store_true", help="print the fit and the frontier as JSON")


def parse_budgets(text: str) -> list[float]:
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--budgets expects FLOP counts separated by commas, e.g. 1e15,1e16; got {text!r}") from None
    if not budgets or not all(b > 0 and math.isfinite(b) for b in budgets):
        raise ConfigError(f"--budgets must be positive FLOP counts, e.g. 1e15,1e16; got {text!r}")
    return budgets


def default_budgets(result: ScalingFit | None) -> list[float]:
    """Decades from the smallest run's compute to 100x the largest; 1e16..1e21 without runs."""
    if result is None:
        return [10.0 ** k for k in range(16, 22)]
    compute = [6.0 * p.n * p.d for p in result.points]
    lo, hi = math.floor(math.log10(min(compute))), math.ceil(math.log10(max(compute))) + 2
    step = max(1, math.ceil((hi - lo) / 6))  # at most about seven rows
    return [10.0 ** k for k in range(lo, hi + 1, step)]


def span(value: float, interval: tuple[float, float] | None, fmt) -> str:
    return fmt(value) + (f" ({fmt(interval[0])} - {fmt(interval[1])})" if interval else "")


def print_fit(law: ScalingLaw, result: ScalingFit | None, headline: str, rows: list[dict]) -> None:
    out.print(headline)
    constants = Table(title="L(N, D) = E + A / N^alpha + B / D^beta  (nats/token)", title_justify="left")
    constants.add_column("constant")
    constants.add_column("value", justify="right")
    if result is not None and result.bootstrap:
        constants.add_column(f"90% interval ({len(result.bootstrap)} bootstrap fits)", justify="right")
    for name in NAMES:
        interval = result.interval(name) if result is not None else None
        constants.add_row(name, f"{getattr(law, name):.4g}",
                          *([f"{interval[0]:.4g} - {interval[1]:.4g}"] if interval else []))
    out.print(constants)
    table = Table(title="compute-optimal frontier (C = 6 N D, N non-embedding parameters)", title_justify="left")
    for column in ("budget C (FLOPs)", "N_opt", "D_opt", "tokens/param", "predicted loss"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(f"{r['flops']:.3g}", span(r["n_opt"], r.get("n_opt_interval"), human),
                      span(r["d_opt"], r.get("d_opt_interval"), human), f"{r['d_opt'] / r['n_opt']:.3g}",
                      span(r["loss"], r.get("loss_interval"), lambda v: f"{v:.4f}"))
    out.print(table)
    if result is not None and result.bootstrap:
        out.print("[dim]Intervals: 5th to 95th percentile over refits on runs resampled with replacement.[/]")


def run(args: argparse.Namespace) -> int:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {args.bootstrap}")
    budgets = parse_budgets(args.budgets) if args.budgets else None
    runs = ledger_runs(workspace_of(args).ledger_path)
    tokenizer = args.tokenizer or most_common_tokenizer(runs)
    points = scaling_points(runs, tokenizer) if tokenizer else []
    others = len(scaling_points(runs)) - len(points)
    left_out = f"; {others} runs on other tokenizers left out (--tokenizer picks one)" if others else ""
    if args.tokenizer and not points:
        known = sorted({t for r in finished_train_runs(runs) if (t := run_tokenizer(r))})
        raise ConfigError(f"no finished run on tokenizer {args.tokenizer!r} in the ledger; "
                          + (f"runs used {', '.join(known)}" if known else "train some first, e.g. `lmforge sweep`"))
    result: ScalingFit | None = None
    if len(points) < MIN_RUNS:
        law = PRIOR
        headline = (f"{len(points)} finished runs{f' on tokenizer {tokenizer}' if tokenizer else ''} in the ledger; "
                    f"a fit needs {MIN_RUNS}{left_out}. Showing the {PRIOR.source}.")
    else:
        result = fit(points, bootstrap=args.bootstrap)
        law = result.law
        status = "converged" if result.converged else f"[red]did not converge[/]: {result.note}; `lmforge plan` " \
                                                      f"uses the prior"
        headline = (f"[bold]fit to {len(points)} finished runs on tokenizer {tokenizer}[/]{left_out}: {status} "
                    f"(Huber {result.objective:.3g} summed, best of {result.starts} L-BFGS-B starts)")
    rows = frontier(law, budgets or default_budgets(result), result.bootstrap if result else ())
    if args.json:
        print(json.dumps({"tokenizer": tokenizer, "law": {**law.constants(), "source": law.source},
                          "fit": result.to_dict() if result else None, "frontier": rows}, indent=2))
    else:
        print_fit(law, result, headline, rows)
    return 0
