"""The report page: one self-contained HTML file (inline CSS, charts as base64 PNG data URIs, nothing fetched).

Sections: how figures are measured, an overview of the runs, the efficiency frontier and scaling-law fit across
runs, then per run its compute card and charts (learning curves, throughput and MFU, energy and money; serving
figures for a serve run).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmforge import __version__
from lmforge.meter.ledger import Ledger
from lmforge.report.charts import (
    Chart,
    frontier_chart,
    learning_curves,
    scaling_chart,
    serving_chart,
    spending_chart,
    throughput_chart,
)
from lmforge.report.data import (
    RunData,
    compute_card,
    device_hours,
    energy_provenance,
    final_points,
    human,
    kwh_of,
    load_run,
    scaling_groups,
)

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1150px; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; } h3 { margin-top: 1.5em; }
.meta, figcaption, .note { color: #555; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ddd; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; }
.estimate { color: #a04000; font-weight: 600; }
figure { margin: 1em 0; } img { max-width: 100%; border: 1px solid #eee; }
"""

HOW_TO_READ = (
    "Energy is <b>measured</b> only where a hardware counter was read (NVML on NVIDIA GPUs, RAPL on Linux CPUs); "
    "otherwise it is an <span class='estimate'>estimate</span>: the device's declared power times wall-clock time, "
    "labelled as such in every table. kWh = joules / 3.6e6. Cost = device-hours x the profile's price per "
    "device-hour. CO2 = kWh x the grid's carbon intensity, so it is an estimate whenever the energy is. FLOPs are "
    "counted from the model's size (6 N per token for training), not measured. bpb (bits per byte) compares across "
    "tokenizers; loss in nats per token only between runs on one tokenizer."
)


@dataclass(frozen=True)
class Report:
    html: str
    charts: list[Chart]  # in page order; chart.series holds what each picture shows


def build_report(ledger: Ledger, runs: Sequence[dict[str, Any]]) -> Report:
    """The page for `runs` (ledger run dicts, in the order shown)."""
    data = [load_run(ledger, run) for run in runs]
    charts: list[Chart] = []
    written = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    headline = (f"<h1>lmforge report</h1><p class='meta'>{len(data)} run{'s' if len(data) != 1 else ''} from "
                f"{_e(ledger.path)}, written {written} by lmforge {__version__}.</p>")
    body = [headline, f"<h2>How the figures are measured</h2><p>{HOW_TO_READ}</p>", _overview(data),
            _across(runs, charts)]
    body += [_run_section(run, charts) for run in data]
    page = (f"<!doctype html>\n<html lang='en'><head><meta charset='utf-8'><title>lmforge report</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")
    return Report(page, charts)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _figure(chart: Chart, charts: list[Chart]) -> str:
    charts.append(chart)
    data = base64.b64encode(chart.png).decode("ascii")
    return (f"<figure id='{_e(chart.key)}'><img alt='{_e(chart.title)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{_e(chart.caption)}</figcaption></figure>")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """A grid with a header row; columns `numeric` right-aligned."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td class='num'>{_e(c)}</td>" if i in numeric else f"<td>{_mark(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _card(rows: Sequence[tuple[str, str]]) -> str:
    """A two-column table: what, and its value."""
    body = "".join(f"<tr><th>{_e(key)}</th><td>{_mark(value)}</td></tr>" for key, value in rows)
    return f"<table>{body}</table>"


def _mark(text: str) -> str:
    """Escaped text, with the word 'estimate' highlighted so nobody reads an estimate as a measurement."""
    escaped = _e(text)
    for word in ("estimate", "ESTIMATE"):
        escaped = escaped.replace(word, f"<span class='estimate'>{word}</span>")
    return escaped


def _overview(data: Sequence[RunData]) -> str:
    rows = []
    for run in data:
        s = run.summary
        kwh, hours = kwh_of(s), device_hours(s)
        rows.append([run.name, run.kind, run.run["status"], "-" if s.get("steps") is None else f"{s['steps']:,}",
                     human(s.get("tokens")), "-" if s.get("flops") is None else f"{s['flops']:.3g}",
                     "-" if s.get("val_bpb") is None else f"{s['val_bpb']:.4f}",
                     "-" if hours is None else f"{hours:.3g}", "-" if kwh is None else f"{kwh:.3g}",
                     "-" if s.get("cost_usd") is None else f"${s['cost_usd']:.4g}",
                     energy_provenance(s).split(":")[0]])
    return "<h2>Runs</h2>" + _table(["run", "kind", "status", "steps", "tokens", "FLOPs", "val bpb", "device-hours",
                                     "kWh", "$", "energy"], rows, numeric=(3, 4, 5, 6, 7, 8, 9))


def _across(runs: Sequence[dict[str, Any]], charts: list[Chart]) -> str:
    parts = ["<h2>Across runs</h2>", "<h3>Efficiency frontier</h3>"]
    points = final_points(runs)
    if len([p for p in points if p.flops and (p.val_loss or p.val_bpb)]) >= 2:
        parts.append(_figure(frontier_chart(points), charts))
    else:
        parts.append(f"<p class='note'>The frontier needs two or more finished training runs with a final "
                     f"validation loss; these runs have {len(points)}. `lmforge report --all` reports every run in "
                     f"the ledger.</p>")
    parts.append("<h3>Scaling law</h3>")
    groups = scaling_groups(runs)
    if not groups:
        parts.append("<p class='note'>No finished training run here records its non-embedding parameters, tokens and "
                     "validation loss, so there is nothing to fit.</p>")
    for group in groups:  # the caption says whether the fit converged, or why there is none
        parts.append(_figure(scaling_chart(group.tokenizer, group.points, group.law, group.note), charts))
    return "\n".join(parts)


def _run_section(run: RunData, charts: list[Chart]) -> str:
    r = run.run
    started = dt.datetime.fromtimestamp(r["created_at"]).strftime("%Y-%m-%d %H:%M")
    parts = [f"<section id='run-{run.id}'><h2>{_e(run.name)}</h2>",
             f"<p class='meta'>{_e(run.kind)} run {run.id}, {_e(r['status'])}, started {started}"
             + (f"; device {_e(run.summary['device'])}" if run.summary.get("device") else "") + "</p>"]
    if r.get("error"):
        parts.append(f"<p class='note'>error: {_e(r['error'])}</p>")
    parts.append("<h3>Compute card</h3>" + _card(compute_card(run)))
    if run.curve("loss") is not None or run.curve("val_loss") is not None:
        parts.append(_figure(learning_curves(run), charts))
    if run.curve("time") is not None and run.curve("tokens") is not None:
        parts.append(_figure(throughput_chart(run), charts))
        if kwh_of(run.summary) is not None:
            parts.append(_figure(spending_chart(run), charts))
    if run.kind == "serve":
        parts.append(_serving(run, charts))
    return "\n".join(parts) + "</section>"


def _serving(run: RunData, charts: list[Chart]) -> str:
    stats = run.serving()
    s = run.summary
    estimated = "" if s.get("energy_measured") else " (estimate)"
    rows = [
        ("requests", (f"{stats['requests']:,}: {stats['completed']:,} completed, {stats['refused']:,} refused by "
                      f"the guard, {stats['failed']:,} failed")),
        ("tokens served", (f"{stats['tokens']:,} ({stats['prompt_tokens']:,} prompt + "
                           f"{stats['completion_tokens']:,} completion)")),
        ("energy", f"{stats['energy_j']:.4g} J{estimated}"),
        ("joules per 1k tokens", "-" if stats["j_per_1k_tokens"] is None else
         f"{stats['j_per_1k_tokens']:.4g} J{estimated}"),
        ("device-seconds per request", "-" if stats["device_seconds_median"] is None else
         f"median {stats['device_seconds_median']:.3g} s, 95th percentile {stats['device_seconds_p95']:.3g} s"),
        ("latency", "not recorded in the ledger (requests keep device-seconds, not end-to-end time)"),
        ("guard findings", f"{stats['guard_findings']:,}"),
        ("energy source", energy_provenance(s)),
    ]
    parts = ["<h3>Serving</h3>" + _card(rows)]
    if stats["requests"]:
        parts.append(_figure(serving_chart(run), charts))
    return "\n".join(parts)
