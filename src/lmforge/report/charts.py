"""Report charts: matplotlib figures (Agg canvas, no pyplot state) rendered to PNG, each returned with the series
it drew.

A chart is a grid of panels; a panel holds lines, point sets and reference lines. Every chart keeps the numbers it
plotted next to its picture, so a test can check that a picture shows what it claims and nobody has to trust a
rendering. The builders at the bottom take the report's data (report/data.py) and never read the ledger.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from lmforge.plan.scaling import MIN_RUNS, ScalingLaw, ScalingPoint
from lmforge.report.data import FinalPoint, RunData, human, pareto

DPI = 100  # 1,100 x 600 pixels for a 2 x 3 grid: sharp in a browser, ~100 kB a chart
PANEL_INCHES = (3.7, 3.0)  # width, height of one panel
STYLES = ("line", "points", "frontier", "hline")


@dataclass(frozen=True)
class Series:
    """One plotted set: `style` is a line, points, a staircase frontier, or a horizontal reference line at y[0]."""

    label: str  # unique within its chart, e.g. "train loss vs step"
    x: tuple[float, ...]
    y: tuple[float, ...]
    style: str = "line"
    names: tuple[str, ...] = ()  # text written next to each point (run names), or none
    color: str | None = None

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"series style must be one of {STYLES}, got {self.style!r}")
        if len(self.x) != len(self.y):
            raise ValueError(f"series {self.label!r}: {len(self.x)} x values but {len(self.y)} y values")


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...] = ()
    logx: bool = False
    logy: bool = False
    note: str = ""  # written across the panel, e.g. why it is empty
    from_zero: bool = False  # y axis starts at 0: rates and totals, where the size of a dip matters


@dataclass(frozen=True)
class Chart:
    key: str  # unique within a report, e.g. "run-3-learning"
    title: str
    caption: str
    png: bytes
    panels: tuple[Panel, ...] = field(repr=False)

    @property
    def series(self) -> dict[str, Series]:
        """Every series of every panel, by label."""
        return {s.label: s for panel in self.panels for s in panel.series}


def series(label: str, x: Sequence[float], y: Sequence[float], style: str = "line", names: Sequence[str] = (),
           color: str | None = None) -> Series:
    """A Series of plain floats (numpy scalars and arrays in, a hashable record out)."""
    return Series(label, tuple(float(v) for v in x), tuple(float(v) for v in y), style, tuple(names), color)


def render(key: str, title: str, panels: Sequence[Panel], caption: str = "", columns: int = 3,
           panel_inches: tuple[float, float] = PANEL_INCHES) -> Chart:
    """Draw `panels` in a grid `columns` wide and return the PNG with the panels it drew."""
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(panel_inches[0] * columns, panel_inches[1] * rows + 0.5), dpi=DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    for i, panel in enumerate(panels):
        _draw(fig.add_subplot(rows, columns, i + 1), panel)
    # fixed margins in inches, not constrained layout: measuring every tick label first doubled the render time
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.2 / width, bottom=0.6 / height, top=1 - 0.75 / height,
                        wspace=0.45, hspace=0.65)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return Chart(key, title, caption, buffer.getvalue(), tuple(panels))


def _draw(ax, panel: Panel) -> None:
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel(panel.xlabel, fontsize=9)
    ax.set_ylabel(panel.ylabel, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    for s in panel.series:
        if s.style == "line":
            ax.plot(s.x, s.y, label=s.label, color=s.color, linewidth=1.2)
        elif s.style == "points":
            ax.scatter(s.x, s.y, label=s.label, color=s.color, s=22, zorder=3)
        elif s.style == "frontier":
            ax.step(s.x, s.y, where="post", label=s.label, color=s.color or "black", linestyle="--", linewidth=1)
        else:
            ax.axhline(s.y[0], label=s.label, color=s.color or "grey", linestyle=":", linewidth=1.2)
        for x, y, name in zip(s.x, s.y, s.names):
            ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    drawn = [s for s in panel.series if s.x]
    for axis, log, set_scale in ((ax.xaxis, panel.logx, ax.set_xscale), (ax.yaxis, panel.logy, ax.set_yscale)):
        if log and drawn:
            # ticks at 1, 2 and 5 of each decade, written 2M or 5G: matplotlib's default labels every minor tick
            # in mathtext, which piles up over a range narrower than a decade
            set_scale("log")
            axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0), numticks=7))
            axis.set_major_formatter(FuncFormatter(lambda v, _: human(v)))
            axis.set_minor_formatter(NullFormatter())
    if not panel.logy:
        ax.ticklabel_format(axis="y", useOffset=False)  # a flat line reads 2.5e5, not 1e-6 + 2.5e5
        top = max((max(s.y) for s in drawn), default=0.0)
        if panel.from_zero and top > 0:
            ax.set_ylim(0, top * 1.08)
    if drawn:
        ax.legend(fontsize=7)
    if panel.note or not drawn:
        ax.text(0.5, 0.5, panel.note or "no data", transform=ax.transAxes, ha="center", va="center", fontsize=9,
                wrap=True, color="dimgrey")


# -- one run --

def learning_curves(run: RunData) -> Chart:
    """Train loss and validation loss (nats/token) and validation bpb against step, wall time and FLOPs."""
    train, val_loss, val_bpb = run.curve("loss"), run.curve("val_loss"), run.curve("val_bpb")
    axes = [("step", "step", lambda steps: steps)]
    if run.curve("time") is not None:  # an eval run logs its result at one step and no counters
        axes.append(("time", "wall time (s)", lambda steps: run.at("time", steps)))
    if run.curve("flops") is not None:
        axes.append(("FLOPs", "training FLOPs", lambda steps: run.at("flops", steps)))
    loss_panels, bpb_panels = [], []
    for name, xlabel, x_of in axes:
        lines, bpb = [], []
        if train is not None:
            lines.append(series(f"train loss vs {name}", x_of(train[0]), train[1], color="tab:blue"))
        if val_loss is not None:
            lines.append(series(f"val loss vs {name}", x_of(val_loss[0]), val_loss[1], "points", color="tab:orange"))
        if val_bpb is not None:
            bpb.append(series(f"val bpb vs {name}", x_of(val_bpb[0]), val_bpb[1], color="tab:green"))
        loss_panels.append(Panel(f"loss vs {name}", xlabel, "loss (nats/token)", tuple(lines), logx=name == "FLOPs"))
        bpb_panels.append(Panel(f"validation bpb vs {name}", xlabel, "bits per byte", tuple(bpb), logx=name == "FLOPs",
                                note="" if bpb else "no validation bpb recorded"))
    return render(f"run-{run.id}-learning", f"{run.name}: learning curves", loss_panels + bpb_panels,
                  "Train loss at every step; validation loss and bits per byte (bpb) where the run evaluated. "
                  "bpb does not depend on the tokenizer, so it compares across runs; loss does not.", len(axes))


def throughput_chart(run: RunData) -> Chart:
    """Tokens per second and MFU over the run, from the logged tokens, FLOPs and wall-clock time."""
    s = run.summary
    steps, tok_per_s, flops_per_s = run.rates()
    lines = [series("tokens/s vs step", steps, tok_per_s, color="tab:blue")] if len(steps) else []
    if s.get("tok_per_s"):
        lines.append(series("run average tokens/s (training steps only)", [0], [s["tok_per_s"]], "hline"))
    panels = [Panel("throughput", "step", "tokens / s (wall clock)", tuple(lines), from_zero=True)]
    peak = s.get("peak_flops")
    if peak and len(steps):
        mfu = flops_per_s / (peak * s.get("world_size", 1)) * 100
        lines = [series("MFU vs step", steps, mfu, color="tab:purple")]
        if s.get("mfu") is not None:
            lines.append(series("run MFU (training steps only)", [0], [s["mfu"] * 100], "hline"))
        panels.append(Panel("model FLOPs utilisation", "step", f"% of {human(peak)}FLOP/s peak", tuple(lines),
                            from_zero=True))
    else:
        panels.append(Panel("model FLOPs utilisation", "step", "%", note="peak FLOP/s unknown for this device"))
    return render(f"run-{run.id}-throughput", f"{run.name}: throughput and MFU", panels,
                  "Per step, from the logged token and FLOP counters over wall-clock time (evaluation and checkpoint "
                  "pauses included, so dips are pauses). The dotted line is the run's average over its training "
                  "steps alone.", columns=2)


def spending_chart(run: RunData) -> Chart:
    """Energy and money spent against step, and the loss bought with them."""
    s = run.summary
    steps, kwh, usd = run.spending()
    measured = "measured" if s.get("energy_measured") else "ESTIMATED"
    panels = [Panel(f"energy ({measured})", "step", "kWh", (series("kWh vs step", steps, kwh, color="tab:red"),),
                    from_zero=True)]
    if usd is not None:
        panels.append(Panel("cost", "step", "US$", (series("$ vs step", steps, usd, color="tab:green"),),
                            from_zero=True))
    else:
        panels.append(Panel("cost", "step", "US$", note="no price per device-hour known"))
    train = run.curve("loss")
    loss_vs_kwh = ()
    if train and len(steps):
        loss_vs_kwh = (series("train loss vs kWh", np.interp(train[0], steps, kwh), train[1], color="tab:blue"),)
    panels.append(Panel("loss bought with energy", "kWh", "train loss (nats/token)", loss_vs_kwh))
    return render(f"run-{run.id}-spending", f"{run.name}: energy and money", panels,
                  "The ledger records a run's total energy and cost; these curves spread them over the run in "
                  f"proportion to wall-clock time. Energy here is {measured.lower()}: {s.get('energy_label', '-')}.")


def serving_chart(run: RunData) -> Chart:
    """Tokens served over time, joules per 1k tokens and device time per request."""
    stats = run.serving()
    rows = stats["rows"]
    t0 = rows[0]["created_at"] if rows else 0.0
    since = [r["created_at"] - t0 for r in rows]
    numbered = [(i, r["j_per_1k"]) for i, r in enumerate(rows, 1) if r["j_per_1k"] is not None]  # tokens > 0
    per_1k = [series("J per 1k tokens per request", [i for i, _ in numbered], [j for _, j in numbered], "points")]
    if stats["j_per_1k_tokens"] is not None:
        per_1k.append(series("all requests", [0], [stats["j_per_1k_tokens"]], "hline"))
    panels = [
        Panel("tokens served", "seconds since the first request", "tokens (prompt + completion)",
              (series("tokens served vs time", since, np.cumsum([r["tokens"] for r in rows])),) if rows else ()),
        Panel("energy per 1k tokens", "request", "J / 1k tokens", tuple(per_1k) if numbered else ()),
        Panel("device time per request", "tokens", "device-seconds",
              (series("device-seconds vs tokens", [r["tokens"] for r in rows], [r["device_seconds"] for r in rows],
                      "points", color="tab:purple"),) if rows else ()),
    ]
    return render(f"run-{run.id}-serving", f"{run.name}: serving", panels,
                  "One point per request the ledger recorded. Device-seconds are the request's share of the "
                  "engine's busy time, not its end-to-end latency (the ledger does not record latency).")


# -- across runs --

FRONTIER_AXES = (("flops", "training FLOPs"), ("cost_usd", "cost (US$)"), ("kwh", "energy (kWh)"))


def frontier_chart(points: Sequence[FinalPoint]) -> Chart:
    """Final validation loss and bpb of each run against its FLOPs, dollars and kWh, with the Pareto frontier."""
    panels = []
    for metric, ylabel in (("val_loss", "final val loss (nats/token)"), ("val_bpb", "final val bpb")):
        for key, xlabel in FRONTIER_AXES:
            usable = [p for p in points if _positive(getattr(p, key)) and _positive(getattr(p, metric))]
            x = [getattr(p, key) for p in usable]
            y = [getattr(p, metric) for p in usable]
            drawn = ()
            if usable:
                best = pareto(x, y)
                drawn = (series(f"runs: {metric} vs {key}", x, y, "points", [p.name for p in usable]),
                         series(f"frontier: {metric} vs {key}", [x[i] for i in best], [y[i] for i in best],
                                "frontier"))
            panels.append(Panel(f"{ylabel.split(' (')[0]} vs {xlabel.split(' (')[0]}", xlabel, ylabel, drawn,
                                logx=True, note="" if usable else f"no run records both {key} and {metric}"))
    return render("frontier", "efficiency frontier across runs", panels,
                  "One point per finished training run. The dashed staircase joins the runs no other run beats on "
                  "both axes: cheaper and better. Loss compares only between runs on one tokenizer; bpb compares "
                  "across tokenizers.")


def scaling_chart(tokenizer: str, points: Sequence[ScalingPoint], law: ScalingLaw | None, note: str) -> Chart:
    """Validation loss against training tokens per model size: the runs, and the fitted L(N, D) when there is one."""
    sizes = sorted({p.n for p in points})
    colors = [_color(i, len(sizes)) for i in range(len(sizes))]
    drawn = []
    d_all = [p.d for p in points]
    d_grid = np.geomspace(min(d_all) / 2, max(d_all) * 2, 64) if points else np.array([])
    for n, color in zip(sizes, colors):
        mine = [p for p in points if p.n == n]
        drawn.append(series(f"runs N={human(n)}", [p.d for p in mine], [p.loss for p in mine], "points",
                            [p.name for p in mine], color))
        if law is not None:
            drawn.append(series(f"fit N={human(n)}", d_grid, law.loss(n, d_grid), color=color))
    title = "L(N, D) = E + A/N^alpha + B/D^beta" if law is not None else f"runs only: a fit needs {MIN_RUNS}"
    panel = Panel(title, "training tokens D", "final val loss (nats/token)", tuple(drawn), logx=True)
    return render(f"scaling-{_slug(tokenizer)}", f"scaling law on tokenizer {tokenizer}", [panel], note, columns=1,
                  panel_inches=(7.5, 4.5))


def _color(i: int, n: int) -> str:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    return to_hex(colormaps["viridis"](0.85 * i / max(1, n - 1)))


def _positive(value) -> bool:
    return value is not None and math.isfinite(value) and value > 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text)
