"""`lmforge runs`: list the ledger's runs, show one in detail, or export runs to TensorBoard or MLflow."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from lmforge.cli.common import duration, human, out, workspace_of
from lmforge.errors import UsageError
from lmforge.meter.export import export_mlflow, export_tensorboard
from lmforge.meter.ledger import Ledger

HELP = "list runs from the ledger, show one (runs show RUN), or export runs to TensorBoard / MLflow"
DESCRIPTION = """\
List every run recorded in the workspace ledger (a run killed without a chance to say so is shown as
'crashed'), or show one run's config, hardware, compute summary and metrics, or export runs: to TensorBoard event
files (one folder per run; pip install 'lmforge[tensorboard]') or to MLflow (a folder or a tracking server's URI;
pip install 'lmforge[mlflow]'). Exporting a run again replaces its earlier export.

examples:
  lmforge runs
  lmforge runs show stdlib-d4-20261126-101500
  lmforge runs export stdlib-d4-20261126-101500 --to tensorboard tb-logs
  lmforge runs export 3 4 5 --to mlflow file:./mlruns
"""
EXPORT_KINDS = ("tensorboard", "mlflow")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("list", "show", "export"), default="list",
                   help="list (default), show or export")
    p.add_argument("run_refs", nargs="*", metavar="RUN", help="run name or id (one for show, any number for export)")
    p.add_argument("--to", nargs=2, metavar=("{tensorboard,mlflow}", "DIR|URI"),
                   help="export target: tensorboard and a folder, or mlflow and a folder or tracking URI")
    p.add_argument("--experiment", metavar="NAME", default="lmforge",
                   help="MLflow experiment the runs go to (default lmforge)")
    p.add_argument("--limit", type=int, default=50, help="list at most this many runs, newest first (default 50)")


def when(ts: float | None) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"


def money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def energy_text(s: dict[str, Any]) -> str:
    if s.get("kwh") is None:
        return "-"
    return f"{s['kwh'] * 1000:.3g} Wh" + ("" if s.get("energy_measured") else " (est.)")


def print_summary(name: str, s: dict[str, Any]) -> None:
    """The compute summary of a finished training run: what it did, what it cost."""
    table = Table(title=f"compute summary: {name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")  # paths stay whole in a narrow terminal
    mfu = f"{s['mfu'] * 100:.1f}% of {human(s['peak_flops'])}FLOP/s" if s.get("mfu") is not None else "unknown peak"
    price = "no price known (--meter.price_per_hour)" if s.get("price_per_hour") is None else \
        f"at ${s['price_per_hour']}/device-hour"
    rows = [
        ("parameters", f"{human(s.get('params'))} ({human(s.get('non_embedding_params'))} non-embedding)"),
        ("steps / tokens", f"{s.get('steps', 0):,} / {s.get('tokens', 0):,}"),
        ("FLOPs", human(s.get("flops"))),
        ("throughput", f"{human(s.get('tok_per_s'))} tokens/s, MFU {mfu}"),
        ("time", f"{duration(s.get('wall_seconds'))} wall, {duration(s.get('train_seconds'))} in training steps"),
        ("validation", f"loss {s['val_loss']:.4f}, {s['val_bpb']:.4f} bits/byte" if s.get("val_bpb") else "-"),
        ("energy", f"{energy_text(s)}; {s.get('energy_label', '-')}"),
        ("cost", f"{money(s.get('cost_usd'))} {price}"),
        ("CO2", "-" if s.get("co2_kg") is None else f"{s['co2_kg'] * 1000:.3g} g at {s['carbon_g_per_kwh']:g} g/kWh"
                + ("" if s.get("energy_measured") else " (from estimated energy)")),
        ("checkpoint", s.get("checkpoint", "-")),
    ]
    if s.get("sites"):  # DiLoCo
        util = s.get("compute_utilisation")
        every = f"{s['sync_every']} steps" + (" of peak learning rate" if s.get("sync_by") == "lr" else "")
        outer = f" ({s['outer_steps']} outer updates)" if s.get("outer_steps") else ""
        sites = (f"{s['sites']} sites, outer step every {every}{outer}, {s['wire']} over {s['link']}: "
                 f"{human(s.get('comm_bytes_per_site'))}B sent per site, {duration(s.get('comm_seconds'))} "
                 f"communicating" + (f", compute {util * 100:.0f}% of training time" if util is not None else ""))
        if s.get("drop_after"):
            sites += (f"; {s['sites_dropped']} dropped, {s['sites_rejoined']} rejoined; "
                      f"{s['tokens_trained']:,} tokens trained by the sites")
        rows.insert(2, ("sites", sites))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    if s.get("predicted"):
        print_prediction(s["predicted"], s)


def print_prediction(p: dict[str, Any], s: dict[str, Any]) -> None:
    """What the planner predicted before the run (`lmforge plan`'s model), next to what happened."""
    table = Table(title="predicted before the run vs actual", title_justify="left")
    for column in ("", "predicted", "actual", "error"):
        table.add_column(column, justify="left" if not column else "right")

    def row(label: str, predicted: float | None, actual: float | None, text) -> None:
        error = f"{(predicted / actual - 1) * 100:+.1f}%" if predicted and actual else "-"
        table.add_row(label, text(predicted) if predicted is not None else "-",
                      text(actual) if actual is not None else "-", error)

    row("val loss", p.get("val_loss"), s.get("val_loss"), lambda v: f"{v:.4f}")
    row("val bpb", p.get("val_bpb"), s.get("val_bpb"), lambda v: f"{v:.4f}")
    row("time in training steps", p.get("wall_seconds"), s.get("train_seconds"), duration)
    row("energy (kWh)", p.get("energy_kwh"), s.get("kwh"), lambda v: f"{v:.3g}")
    row("cost", p.get("cost_usd"), s.get("cost_usd"), money)
    out.print(table)
    out.print(f"[dim]predicted with MFU {p['mfu']:.3f} ({p['mfu_source']}) and the law: {p['law']}[/]",
              soft_wrap=True)


def list_runs(ledger: Ledger, limit: int) -> None:
    runs = ledger.list_runs(limit=limit)
    if not runs:
        out.print("no runs yet; `lmforge demo` or `lmforge train` records one")
        return
    table = Table(title=f"runs in {ledger.path}", title_justify="left")
    for col in ("id", "name", "kind", "status", "started", "steps", "tokens", "val bpb", "time", "energy", "cost",
                "CO2"):
        table.add_column(col, justify="right" if col in ("id", "steps", "tokens", "val bpb") else "left")
    for r in runs:
        s = r.get("summary") or {}
        table.add_row(str(r["id"]), r["name"], r["kind"], r["status"], when(r["created_at"]),
                      f"{s['steps']:,}" if "steps" in s else "-", human(s.get("tokens")),
                      f"{s['val_bpb']:.4f}" if s.get("val_bpb") else "-", duration(s.get("wall_seconds")),
                      energy_text(s), money(s.get("cost_usd")),
                      f"{s['co2_kg'] * 1000:.3g} g" if s.get("co2_kg") is not None else "-")
    out.print(table)


def show_run(ledger: Ledger, ref: str) -> None:
    r = ledger.get_run(ref)
    out.print(f"[bold]run {r['id']}: {r['name']}[/]  ({r['kind']}, {r['status']})")
    out.print(f"folder: {r['run_dir']}")
    out.print(f"started {when(r['created_at'])}, last heartbeat {when(r['updated_at'])}, ended {when(r['ended_at'])}")
    if r.get("error"):
        out.print(f"[red]error:[/] {r['error']}")
    if r.get("summary") and r["kind"] == "train":
        print_summary(r["name"], r["summary"])
    elif r.get("summary"):
        out.print("result: " + ", ".join(f"{k}={v}" for k, v in r["summary"].items()))
    hw = r.get("hardware") or {}
    out.print("hardware: " + ", ".join(f"{k}={v}" for k, v in hw.items()))
    metrics: dict[int, dict[str, float]] = {}
    for step, name, value in ledger.get_metrics(r["id"]):
        metrics.setdefault(step, {})[name] = value
    losses = [(step, m["loss"]) for step, m in metrics.items() if "loss" in m]
    if losses:
        out.print(f"train loss: step {losses[0][0]} {losses[0][1]:.4f} -> step {losses[-1][0]} {losses[-1][1]:.4f} "
                  f"({len(losses)} steps recorded)")
    evals = [(step, m) for step, m in metrics.items() if "val_bpb" in m]
    if evals:
        table = Table(title="validation", title_justify="left")
        for column in ("step", "tokens", "time", "train loss", "val loss", "val bpb"):
            table.add_column(column, justify="right")
        for step, m in evals:
            table.add_row(f"{step:,}", human(m.get("tokens")), duration(m.get("time")),
                          *(f"{m[k]:.4f}" if k in m else "-" for k in ("loss", "val_loss", "val_bpb")))
        out.print(table)
    for e in ledger.get_events(r["id"]):
        detail = ", ".join(f"{k} {v}" for k, v in e["detail"].items())
        out.print(f"event: step {e['step']:,} {e['kind'].replace('_', ' ')} ({detail}) at {when(e['created_at'])}")
    for a in ledger.get_artifacts(r["id"])[-5:]:
        out.print(f"artifact: {a['kind']} {a['path']}")
    if r.get("config"):
        out.print("config:\n" + yaml.safe_dump(r["config"], sort_keys=False))


def export_runs(ledger: Ledger, refs: list[str], kind: str, target: str, experiment: str) -> None:
    if kind not in EXPORT_KINDS:
        raise UsageError(f"--to {kind} is not an export target; choose --to tensorboard DIR or --to mlflow URI")
    if not refs:
        raise UsageError("`lmforge runs export` needs run names or ids; `lmforge runs` lists them")
    if kind == "tensorboard":
        folders = export_tensorboard(ledger, refs, Path(target))
        out.print(f"wrote {len(folders)} run(s) to {folders[0].parent}; view with: tensorboard --logdir {target}")
    else:
        ids = export_mlflow(ledger, refs, target, experiment)
        out.print(f"logged {len(ids)} run(s) to MLflow experiment {experiment!r} at {target}: {', '.join(ids)}")


def run(args: argparse.Namespace) -> int:
    ledger = Ledger(workspace_of(args).ledger_path)
    if args.to and args.action != "export":
        raise UsageError("--to is for `lmforge runs export RUN ... --to {tensorboard,mlflow} DIR|URI`")
    if args.action == "export":
        if not args.to:
            raise UsageError("`lmforge runs export` needs a target: --to tensorboard DIR or --to mlflow URI")
        export_runs(ledger, args.run_refs, *args.to, args.experiment)
    elif args.action == "show":
        if len(args.run_refs) != 1:
            raise UsageError("`lmforge runs show` needs one run name or id; `lmforge runs` lists them")
        show_run(ledger, args.run_refs[0])
    else:
        list_runs(ledger, args.limit)
    return 0
