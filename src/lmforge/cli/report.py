"""`lmforge report`: write one self-contained HTML page showing what runs did and what they cost."""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.atomic import write_file_atomic
from lmforge.cli.common import existing_ledger, out
from lmforge.errors import LmforgeError
from lmforge.meter.ledger import Ledger

HELP = "write an HTML report of runs: curves, compute cards, efficiency frontier, scaling fit, serving"
DESCRIPTION = """\
Writes one self-contained HTML file (charts embedded as PNG, nothing loaded from the network) with, per run: loss
and validation bpb against step, wall time and FLOPs; throughput and MFU; energy and money over the run; a compute
card (params, tokens, FLOPs, device-hours, kWh, $, kg CO2, final bpb, and whether the energy was measured or is an
estimate); for a serve run, tokens served and joules per 1k tokens. Across the runs: the efficiency frontier
(final loss and bpb against FLOPs, $ and kWh) and the scaling law L(N, D) fitted per tokenizer once it has 5
finished runs. Without RUN or --all it reports the newest run.

examples:
  lmforge report
  lmforge report stdlib-d4-20261126-101500 stdlib-d6-20261126-111500 --out compare.html
  lmforge report --all --out everything.html
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="RUN", help="run names or ids (default: the newest run)")
    p.add_argument("--all", action="store_true", dest="every", help="report every run in the ledger")
    p.add_argument("--out", type=Path, default=Path("report.html"), metavar="FILE",
                   help="the HTML file to write (default: report.html in the current folder)")


def run(args: argparse.Namespace) -> int:
    # imported here, so matplotlib loads only when a report is made (not for `lmforge --help`)
    from lmforge.report.data import select_runs
    from lmforge.report.html import build_report

    target: Path = args.out.expanduser()
    if target.is_dir():
        raise LmforgeError(f"--out {target} is a folder; pass a file name, e.g. --out {target / 'report.html'}")
    if not target.parent.is_dir():
        raise LmforgeError(f"cannot write the report to {target}: {target.parent} is not a folder; create it or "
                           f"pass another --out")
    ledger_path = existing_ledger(args)
    ledger = Ledger(ledger_path)
    runs = select_runs(ledger, args.runs, args.every)
    report = build_report(ledger, runs)
    try:
        write_file_atomic(target, report.html.encode("utf-8"))
    except OSError as e:
        raise LmforgeError(f"cannot write the report to {target}: {e.strerror or e}; pass a writable --out") from None
    out.print(f"wrote {target}: {plural(len(runs), 'run')}, {plural(len(report.charts), 'chart')}, "
              f"{len(report.html) / 1e3:.0f} kB", markup=False)
    return 0


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
