"""What a report reads from the ledger, and the numbers it derives: per-run curves, rates and spending, the compute
card, serving figures, the final points of the efficiency frontier and the scaling-law groups.

Nothing here draws; charts.py turns these into pictures and html.py into a page.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmforge.errors import LmforgeError, UsageError
from lmforge.meter.ledger import Ledger
from lmforge.plan.history import finished_train_runs, run_tokenizer, scaling_points
from lmforge.plan.scaling import MIN_RUNS, ScalingLaw, ScalingPoint, fit
from lmforge.units import human

RATE_WINDOWS = 200  # throughput is averaged over at most this many windows: per-step rates of a long run are noise


@dataclass
class RunData:
    """One ledger run with its step metrics (name -> (steps, values), by step), served requests and guard count."""

    run: dict[str, Any]
    metrics: dict[str, tuple[np.ndarray, np.ndarray]]
    requests: list[dict[str, Any]]
    guard_findings: int

    @property
    def id(self) -> int:
        return self.run["id"]

    @property
    def name(self) -> str:
        return self.run["name"]

    @property
    def kind(self) -> str:
        return self.run["kind"]

    @property
    def summary(self) -> dict[str, Any]:
        return self.run.get("summary") or {}

    def curve(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(steps, values) of a metric, finite values only; None when it was never logged."""
        if name not in self.metrics:
            return None
        steps, values = self.metrics[name]
        keep = np.isfinite(values)
        return (steps[keep], values[keep]) if keep.any() else None

    def at(self, name: str, steps: np.ndarray) -> np.ndarray:
        """A cumulative counter ('time', 'tokens', 'flops') at `steps`, linear between logged steps, 0 at step 0.

        Validation runs at steps that also log the counters, except a fine-tune's step-0 evaluation: the origin
        covers it.
        """
        curve = self.curve(name)
        if curve is None:
            return np.full(len(steps), np.nan)
        return np.interp(steps, np.concatenate([[0], curve[0]]), np.concatenate([[0.0], curve[1]]))

    def rates(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, tokens/s, FLOP/s) averaged over up to RATE_WINDOWS windows of wall-clock time."""
        time = self.curve("time")
        if time is None or self.curve("tokens") is None:
            return np.array([]), np.array([]), np.array([])
        picked = np.unique(np.linspace(0, len(time[0]) - 1, min(RATE_WINDOWS, len(time[0]))).round().astype(int))
        steps = np.concatenate([[0], time[0][picked]])  # (W + 1,) window edges, from the run's start
        seconds = np.diff(self.at("time", steps))
        tokens = np.diff(self.at("tokens", steps))
        flops = np.diff(self.at("flops", steps))
        ok = seconds > 0
        return steps[1:][ok], tokens[ok] / seconds[ok], flops[ok] / seconds[ok]

    def spending(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """(steps, kWh, US$ or None without a price) spent up to each step: the run's totals spread by wall time."""
        time = self.curve("time")
        s = self.summary
        kwh = kwh_of(s)
        if time is None or kwh is None:
            return np.array([]), np.array([]), None
        share = time[1] / max(s.get("wall_seconds") or 0.0, time[1][-1])  # the total spans the whole run
        cost = s.get("cost_usd")
        return time[0], kwh * share, None if cost is None else cost * share

    def serving(self) -> dict[str, Any]:
        """Totals of the served requests and one row per request (tokens, device-seconds, J per 1k tokens)."""
        rows = []
        for r in self.requests:
            tokens = (r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0)
            energy = r.get("energy_j") or 0.0
            rows.append({"created_at": r["created_at"], "tokens": tokens, "energy_j": energy,
                         "device_seconds": r.get("device_seconds") or 0.0, "status": r.get("status") or "",
                         "j_per_1k": energy / tokens * 1000 if tokens else None})
        tokens = sum(r["tokens"] for r in rows)
        energy = sum(r["energy_j"] for r in rows)
        device = [r["device_seconds"] for r in rows]
        return {
            "requests": len(rows),
            "completed": sum(r["status"] == "completed" for r in rows),
            "refused": sum(r["status"].startswith("blocked") for r in rows),
            "failed": sum(r["status"].startswith("failed") for r in rows),
            "prompt_tokens": sum(r.get("prompt_tokens") or 0 for r in self.requests),
            "completion_tokens": sum(r.get("completion_tokens") or 0 for r in self.requests),
            "tokens": tokens, "energy_j": energy,
            "j_per_1k_tokens": energy / tokens * 1000 if tokens else None,
            "device_seconds": sum(device),
            "device_seconds_median": statistics.median(device) if device else None,
            "device_seconds_p95": float(np.percentile(device, 95)) if device else None,
            "guard_findings": self.guard_findings,
            "rows": rows,
        }


def load_run(ledger: Ledger, run: dict[str, Any]) -> RunData:
    by_name: dict[str, tuple[list[int], list[float]]] = {}
    for step, name, value in ledger.get_metrics(run["id"]):
        steps, values = by_name.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)
    metrics = {name: (np.array(steps), np.array(values, dtype=float)) for name, (steps, values) in by_name.items()}
    return RunData(run, metrics, ledger.get_requests(run["id"]), len(ledger.get_guard_events(run["id"])))


def select_runs(ledger: Ledger, refs: Sequence[str], every: bool) -> list[dict[str, Any]]:
    """The runs to report, oldest first: those named, every run (`every`), or else the newest one."""
    if refs and every:
        raise UsageError(f"name runs ({' '.join(refs)}) or pass --all, not both")
    runs = ledger.list_runs()  # newest first
    if not runs:
        raise LmforgeError(f"the ledger {ledger.path} holds no runs yet; `lmforge train` or `lmforge demo` records one")
    if every:
        return runs[::-1]
    if not refs:
        return runs[:1]
    chosen = {run["id"]: run for run in (ledger.get_run(ref) for ref in refs)}  # a run named twice is shown once
    return sorted(chosen.values(), key=lambda run: run["id"])


# -- the compute card --

def kwh_of(s: dict[str, Any]) -> float | None:
    if s.get("kwh") is not None:
        return float(s["kwh"])
    return None if s.get("energy_j") is None else s["energy_j"] / 3.6e6


def device_hours(s: dict[str, Any]) -> float | None:
    """Device-hours a run paid for: serving records device-seconds; training wall time x devices."""
    if s.get("device_hours") is not None:
        return float(s["device_hours"])
    if s.get("device_seconds") is not None:
        return s["device_seconds"] / 3600.0
    if s.get("wall_seconds") is not None:
        return s["wall_seconds"] * (s.get("world_size") or 1) / 3600.0
    return None


def energy_provenance(s: dict[str, Any]) -> str:
    """'measured: ...' or 'estimate: ...', in plain words; 'unknown' when the run recorded no energy."""
    if s.get("energy_measured") is None and s.get("energy_j") is None:
        return "unknown (no energy recorded)"
    if s.get("energy_measured"):
        return f"measured: {s.get('energy_label', 'hardware counter')}"
    return f"estimate, not measured: {s.get('energy_label', 'declared power x time')}"


def compute_card(run: RunData) -> list[tuple[str, str]]:
    """(row, value) pairs: what a run was and what it cost, with estimated figures said to be estimates."""
    s = run.summary
    estimated = "" if s.get("energy_measured") else " (estimate)"
    params = human(s.get("params"))
    if s.get("non_embedding_params") is not None:
        params += f" ({human(s['non_embedding_params'])} non-embedding)"
    hours, kwh = device_hours(s), kwh_of(s)
    cost = "- (no price per device-hour known)" if s.get("cost_usd") is None else f"${s['cost_usd']:.4g}"
    if s.get("cost_usd") is not None and s.get("price_per_hour"):
        cost += f" at ${s['price_per_hour']:g}/device-hour"
    devices = f"{s['world_size']} x " if (s.get("world_size") or 1) > 1 else ""
    card = [
        ("parameters", params),
        ("tokens", human(s.get("tokens"))),
        ("FLOPs", "-" if s.get("flops") is None else f"{s['flops']:.3g}"),
        ("device-hours", "-" if hours is None else f"{hours:.3g}" + (f" on {devices}{s['profile']}" if s.get("profile")
                                                                    else "")),
        ("energy", "-" if kwh is None else f"{kwh:.3g} kWh{estimated}"),
        ("cost", cost),
        ("CO2", "-" if s.get("co2_kg") is None else f"{s['co2_kg']:.3g} kg" + (
            f" at {s['carbon_g_per_kwh']:g} g/kWh" if s.get("carbon_g_per_kwh") else "") + estimated),
        ("final val bpb", "-" if s.get("val_bpb") is None else f"{s['val_bpb']:.4f}"),
        ("final val loss", "-" if s.get("val_loss") is None else f"{s['val_loss']:.4f} nats/token"),
        ("energy source", energy_provenance(s)),
    ]
    if s.get("sites"):  # a low-communication (DiLoCo) run: what crossed the links between sites
        utilisation = s.get("compute_utilisation")
        sent = human(s.get("comm_bytes_per_site"), "B")
        card.append(("sites", f"{s['sites']} sites over {s.get('link', '?')}, {sent} sent per site, "
                              f"{s.get('comm_seconds', 0):.3g} s communicating"
                              + ("" if utilisation is None else f", {utilisation:.0%} compute utilisation")))
    return card


# -- across runs --

@dataclass(frozen=True)
class FinalPoint:
    """Where a finished training run ended up, and what it spent getting there."""

    name: str
    flops: float | None
    cost_usd: float | None
    kwh: float | None
    val_loss: float | None
    val_bpb: float | None


def final_points(runs: Sequence[dict[str, Any]]) -> list[FinalPoint]:
    return [FinalPoint(r["name"], s.get("flops"), s.get("cost_usd"), kwh_of(s), s.get("val_loss"), s.get("val_bpb"))
            for r in finished_train_runs(list(runs)) for s in [r.get("summary") or {}]]


@dataclass(frozen=True)
class ScalingGroup:
    """The scaling points of one tokenizer's runs and, with MIN_RUNS or more, the fitted law."""

    tokenizer: str
    points: list[ScalingPoint]
    law: ScalingLaw | None
    note: str  # the fit's standing, or why there is none


def scaling_groups(runs: Sequence[dict[str, Any]]) -> list[ScalingGroup]:
    """One group per tokenizer among the finished training runs, most runs first; fits without a bootstrap."""
    runs = list(runs)
    tokenizers = sorted({t for r in finished_train_runs(runs) if scaling_points([r]) and (t := run_tokenizer(r))})
    groups = []
    for tokenizer in tokenizers:
        points = scaling_points(runs, tokenizer)
        if len(points) < MIN_RUNS:
            groups.append(ScalingGroup(tokenizer, points, None, f"{len(points)} finished run"
                                       f"{'s' if len(points) != 1 else ''} on {tokenizer}; a fit of L(N, D) needs "
                                       f"{MIN_RUNS} (`lmforge sweep` trains a grid), so only the points are shown"))
            continue
        result = fit(points, bootstrap=0)
        law = result.law
        standing = "converged" if result.converged else f"did not converge ({result.note}); do not trust the curves"
        groups.append(ScalingGroup(tokenizer, points, law, f"{law.source}: {standing}. E = {law.E:.4g}, "
                                   f"A = {law.A:.4g}, B = {law.B:.4g}, alpha = {law.alpha:.4g}, "
                                   f"beta = {law.beta:.4g}; `lmforge fit` adds bootstrap intervals"))
    return sorted(groups, key=lambda g: -len(g.points))


def pareto(x: Sequence[float], y: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats on both (lower x and lower y), in order of x."""
    best, front = math.inf, []
    for i in sorted(range(len(x)), key=lambda i: (x[i], y[i])):
        if y[i] < best:
            best = y[i]
            front.append(i)
    return front
