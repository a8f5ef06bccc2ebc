"""`lmforge report`: a self-contained page whose charts decode to real pictures of the runs' numbers.

Ledgers are built directly through the Ledger API with synthetic runs (known values to look for); one test
reports the real tiny run of the `trained_run` fixture end to end.
"""

from __future__ import annotations

import base64
import errno
import io
import math
import os
import re
import time

import numpy as np
import pytest
from conftest import expect_one_line_error
from PIL import Image

from lmforge.config import RunConfig
from lmforge.meter.ledger import Ledger
from lmforge.plan.scaling import ScalingLaw
from lmforge.report.charts import Chart, frontier_chart, scaling_chart
from lmforge.report.data import (
    compute_card,
    final_points,
    load_run,
    pareto,
    scaling_groups,
    select_runs,
)
from lmforge.report.html import build_report

TRUE_LAW = ScalingLaw(E=1.7, A=400.0, B=1800.0, alpha=0.34, beta=0.37)
PEAK = 1e14


def add_train_run(ledger: Ledger, name: str, *, n: float = 2e6, d: float = 3e7, steps: int = 30,
                  measured: bool = False, vocab: int = 4096) -> dict:
    """A completed training run: metrics at every step, validation every 10, a summary like the loop's."""
    config = RunConfig().to_dict()
    config["tokenizer"]["vocab_size"] = vocab
    run_id = ledger.start_run(name, "train", config, {"device": "cpu"}, f"/runs/{name}")
    tokens_per_step, seconds_per_step = d / steps, 0.5
    loss = float(TRUE_LAW.loss(n, d))
    for step in range(1, steps + 1):
        ledger.log_metrics(run_id, step, {"loss": loss + 3.0 / step, "lr_mult": 1.0, "tokens": tokens_per_step * step,
                                          "flops": 6 * n * tokens_per_step * step, "time": seconds_per_step * step})
        if step % 10 == 0:
            ledger.log_metrics(run_id, step, {"val_loss": loss + 2.0 / step, "val_bpb": (loss + 2.0 / step) / 2.8})
    energy_j = 65.0 * seconds_per_step * steps
    ledger.finish_run(run_id, "completed", summary={
        "steps": steps, "tokens": d, "flops": 6 * n * d, "params": n * 1.5, "non_embedding_params": n,
        "train_seconds": seconds_per_step * steps, "wall_seconds": seconds_per_step * steps + 1.0,
        "tok_per_s": d / (seconds_per_step * steps), "mfu": 6 * n * d / (seconds_per_step * steps) / PEAK,
        "peak_flops": PEAK, "val_loss": loss + 2.0 / steps, "val_bpb": (loss + 2.0 / steps) / 2.8,
        "energy_j": energy_j, "energy_measured": measured,
        "energy_label": "measured (RAPL package counters)" if measured else "ESTIMATE: 65 W declared x wall-clock time",
        "kwh": energy_j / 3.6e6, "cost_usd": 0.5 * steps / 3600 * 2.0, "co2_kg": energy_j / 3.6e6 * 0.4,
        "price_per_hour": 2.0, "carbon_g_per_kwh": 400.0, "device": "cpu", "profile": "cpu", "world_size": 1})
    return ledger.get_run(run_id)


def add_serve_run(ledger: Ledger, name: str = "serve-tiny") -> dict:
    run_id = ledger.start_run(name, "serve", {"model_name": "tiny"}, {"device": "cpu"}, "/runs/tiny")
    t0 = time.time()
    rows = [{"created_at": t0 + i, "model": "tiny", "prompt_tokens": 10 * (i + 1), "completion_tokens": 20,
             "flops": 1e9, "device_seconds": 0.1 * (i + 1), "energy_j": 5.0 * (i + 1), "status": "completed"}
            for i in range(4)]
    rows.append({"created_at": t0 + 5, "model": "tiny", "prompt_tokens": 7, "completion_tokens": 0, "flops": 0.0,
                 "device_seconds": 0.0, "energy_j": 0.0, "status": "blocked:input"})
    ledger.log_requests(run_id, rows)
    tokens = sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows)
    ledger.finish_run(run_id, "completed", summary={
        "requests": 5, "tokens": tokens, "energy_j": 50.0, "device_seconds": 1.0, "energy_measured": False,
        "energy_label": "ESTIMATE: 65 W declared x wall-clock time", "kwh": 50.0 / 3.6e6, "cost_usd": None,
        "co2_kg": 50.0 / 3.6e6 * 0.4})
    return ledger.get_run(run_id)


def png_pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)  # (H, W, 3)


def assert_real_picture(png: bytes) -> None:
    """Decodes as a PNG of a sensible size with real content: not one colour, many colours, ink on the page."""
    pixels = png_pixels(png)
    assert pixels.shape[0] >= 200 and pixels.shape[1] >= 300
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50
    assert (pixels.mean(axis=2) < 128).mean() > 0.005  # dark pixels: text and lines, not a blank canvas


def embedded_pngs(page: str) -> list[bytes]:
    return [base64.b64decode(data) for data in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def by_key(charts: list[Chart], suffix: str) -> Chart:
    return next(c for c in charts if c.key.endswith(suffix))


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    return Ledger(tmp_path / "ledger.db")


def test_report_is_self_contained_and_every_chart_is_a_real_picture(ledger):
    train = add_train_run(ledger, "small")
    add_train_run(ledger, "large", n=8e6, d=6e7)
    serve = add_serve_run(ledger)
    evaluated = ledger.start_run("eval-small", "eval", {}, {}, "/runs/small")  # one result, no counters
    ledger.log_metrics(evaluated, 30, {"val_loss": 2.5, "val_bpb": 0.9})
    ledger.finish_run(evaluated, "completed", summary={"val_loss": 2.5, "val_bpb": 0.9, "tokens": 4096})
    report = build_report(ledger, select_runs(ledger, [], every=True))
    page = report.html
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page and "@import" not in page
    pngs = embedded_pngs(page)
    assert len(pngs) == len(report.charts) >= 8
    for png, chart in zip(pngs, report.charts):
        assert png == chart.png
        assert_real_picture(png)
    assert [c.key for c in report.charts] == [
        "frontier", "scaling-stdlib-bpe4096", *(f"run-{i}-{part}" for i in (1, 2) for part in
                                                ("learning", "throughput", "spending")), "run-3-serving",
        "run-4-learning"]
    assert report.charts[-1].series["val bpb vs step"].y == (0.9,)
    assert f"id='run-{train['id']}'" in page and f"id='run-{serve['id']}'" in page


def test_learning_curves_show_the_runs_steps_and_values(ledger):
    run = add_train_run(ledger, "small", n=2e6, d=3e7, steps=30)
    charts = build_report(ledger, [run]).charts
    learning = by_key(charts, "-learning")
    metrics = {}
    for step, name, value in ledger.get_metrics(run["id"]):
        metrics.setdefault(name, {})[step] = value
    train = learning.series["train loss vs step"]
    assert train.x == tuple(float(s) for s in range(1, 31))
    assert train.y == pytest.approx([metrics["loss"][s] for s in range(1, 31)])
    val = learning.series["val bpb vs step"]
    assert val.x == (10.0, 20.0, 30.0)
    assert val.y == pytest.approx([metrics["val_bpb"][s] for s in (10, 20, 30)])
    assert learning.series["val loss vs time"].x == pytest.approx([5.0, 10.0, 15.0])  # 0.5 s a step
    assert learning.series["train loss vs FLOPs"].x[-1] == pytest.approx(6 * 2e6 * 3e7)

    throughput = by_key(charts, "-throughput")
    assert throughput.series["tokens/s vs step"].y == pytest.approx([3e7 / 30 / 0.5] * 30)
    mfu = 6 * 2e6 * (3e7 / 30) / 0.5 / PEAK * 100
    assert throughput.series["MFU vs step"].y == pytest.approx([mfu] * 30)
    assert throughput.series["run MFU (training steps only)"].y == pytest.approx((mfu,))

    spending = by_key(charts, "-spending")
    kwh = spending.series["kWh vs step"]
    assert kwh.y[-1] == pytest.approx(run["summary"]["kwh"] * 15.0 / 16.0)  # 15 s of a 16 s run
    assert np.all(np.diff(kwh.y) > 0)
    assert spending.series["$ vs step"].y[-1] == pytest.approx(run["summary"]["cost_usd"] * 15.0 / 16.0)
    assert "ESTIMATED" in spending.panels[0].title


def test_compute_card_shows_the_summary_and_says_estimate_plainly(ledger):
    estimated = add_train_run(ledger, "estimated", n=2e6, d=3e7)
    measured = add_train_run(ledger, "measured", n=2e6, d=3e7, measured=True)
    page = build_report(ledger, [estimated, measured]).html
    sections = dict(re.findall(r"<section id='run-(\d+)'>(.*?)</section>", page, flags=re.DOTALL))
    card = sections[str(estimated["id"])]
    s = estimated["summary"]
    for text in ("3M (2M non-embedding)", "30M", f"{6 * 2e6 * 3e7:.3g}", f"{s['wall_seconds'] / 3600:.3g}",
                 f"{s['kwh']:.3g} kWh", f"${s['cost_usd']:.4g}", f"{s['co2_kg']:.3g} kg", f"{s['val_bpb']:.4f}"):
        assert text in card, text
    assert "<span class='estimate'>estimate</span>, not measured: <span class='estimate'>ESTIMATE</span>: 65 W" in card
    measured_card = sections[str(measured["id"])]
    assert "measured: measured (RAPL package counters)" in measured_card
    assert "estimate" not in measured_card.lower()
    ledger.update_summary(measured["id"], {"sites": 4, "link": "starlink", "comm_bytes_per_site": 3.2e7,
                                           "comm_seconds": 12.5, "compute_utilisation": 0.8})
    card = dict(compute_card(load_run(ledger, ledger.get_run(measured["id"]))))
    assert card["sites"] == "4 sites over starlink, 32MB sent per site, 12.5 s communicating, 80% compute utilisation"


def test_frontier_and_scaling_fit_across_runs(ledger):
    sizes, tokens = (1e6, 3e6, 1e7), (1e7, 4e7)
    runs = [add_train_run(ledger, f"n{n:.0e}-d{d:.0e}", n=n, d=d) for n in sizes for d in tokens]
    runs.append(add_train_run(ledger, "other-tokenizer", vocab=384))
    frontier = frontier_chart(final_points(runs))
    points = frontier.series["runs: val_loss vs flops"]
    assert sorted(points.names) == sorted(r["name"] for r in runs)
    assert sorted(points.x) == pytest.approx(sorted(r["summary"]["flops"] for r in runs))
    front = frontier.series["frontier: val_loss vs flops"]
    assert list(front.y) == sorted(front.y, reverse=True)  # more compute only joins the frontier if it is better
    assert_real_picture(frontier.png)

    charts = [scaling_chart(g.tokenizer, g.points, g.law, g.note) for g in scaling_groups(runs)]
    assert [c.key for c in charts] == ["scaling-stdlib-bpe4096", "scaling-stdlib-bpe384"]  # most runs first
    fitted = charts[0]
    assert "converged" in fitted.caption and "did not" not in fitted.caption
    assert_real_picture(fitted.png)
    for n in sizes:
        label = next(k for k in fitted.series if k.startswith("runs N=") and
                     fitted.series[k].names[0].startswith(f"n{n:.0e}"))
        curve = fitted.series[label.replace("runs", "fit")]
        # the fitted curve passes through the runs it was fitted to (synthetic runs, no noise but the 2/steps tail)
        assert np.interp(np.log(tokens), np.log(curve.x), curve.y) == pytest.approx(fitted.series[label].y, rel=0.02)
    few = charts[1]
    assert not any(label.startswith("fit") for label in few.series)
    assert "1 finished run on stdlib-bpe384; a fit of L(N, D) needs 5" in few.caption


def test_serving_figures_from_the_requests_table(ledger):
    run = add_serve_run(ledger)
    report = build_report(ledger, [run])
    serving = by_key(report.charts, "-serving")
    served = serving.series["tokens served vs time"]
    assert served.x == (0.0, 1.0, 2.0, 3.0, 5.0)
    assert served.y[-1] == 30 + 40 + 50 + 60 + 7 == run["summary"]["tokens"]
    per_1k = serving.series["J per 1k tokens per request"]
    assert per_1k.y == pytest.approx([5.0 / 30 * 1000, 10.0 / 40 * 1000, 15.0 / 50 * 1000, 20.0 / 60 * 1000, 0.0])
    assert serving.series["all requests"].y == pytest.approx((50.0 / 187 * 1000,))
    assert_real_picture(serving.png)
    assert "tokens served</th><td>187 (107 prompt + 80 completion)" in report.html
    assert f"{50.0 / 187 * 1000:.4g} J (<span class='estimate'>estimate</span>)" in report.html
    assert "latency</th><td>not recorded" in report.html


def test_pareto_keeps_runs_nobody_beats():
    assert pareto([3.0, 1.0, 2.0, 4.0], [1.0, 3.0, 2.0, 0.5]) == [1, 2, 0, 3]
    assert pareto([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == [0]


def test_cli_writes_the_newest_run_or_the_named_ones(cli, tmp_path):
    ledger = Ledger(cli.workspace / "ledger.db")
    first = add_serve_run(ledger, "first")  # serve runs: one chart each, quick to draw
    add_serve_run(ledger, "second")
    out = tmp_path / "report.html"
    code, stdout, err = cli("report", "--out", str(out))
    assert code == 0, err
    assert f"wrote {out}: 1 run, 1 chart" in stdout
    page = out.read_text()
    assert "second" in page and "first" not in page
    code, stdout, err = cli("report", "first", "second", "first", "--out", str(out))
    assert code == 0, err
    assert "2 runs" in stdout and f"id='run-{first['id']}'" in out.read_text()
    assert not list(tmp_path.glob(".report.html.tmp-*"))


@pytest.mark.parametrize("args, pattern", [
    (["nosuch"], r"no run named 'nosuch'.*`lmforge runs` lists them"),
    (["first", "--all"], r"name runs \(first\) or pass --all, not both"),
    (["--out", "{tmp}/missing/report.html"], r"cannot write the report to .*: .*missing is not a folder"),
    (["--out", "{tmp}"], r"is a folder; pass a file name"),
])
def test_cli_bad_input_is_one_line_exit_2(cli, tmp_path, args, pattern):
    add_train_run(Ledger(cli.workspace / "ledger.db"), "first")
    code, _, err = cli("report", *[a.format(tmp=tmp_path) for a in args])
    expect_one_line_error(code, err, pattern, only_line=True)


def test_cli_unwritable_out_is_one_line_exit_2(cli, tmp_path, monkeypatch):
    add_serve_run(Ledger(cli.workspace / "ledger.db"))

    def disk_full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("lmforge.cli.report.write_file_atomic", disk_full)  # any user, root included
    code, _, err = cli("report", "--out", str(tmp_path / "report.html"))
    expect_one_line_error(code, err, r"cannot write the report to .*: No space left on device; pass a writable --out",
                          only_line=True)


def test_cli_without_runs_is_one_line_exit_2(cli):
    code, _, err = cli("report")
    expect_one_line_error(code, err, r"no ledger at .*ledger\.db", only_line=True)
    Ledger(cli.workspace / "ledger.db")
    code, _, err = cli("report", "--all")
    expect_one_line_error(code, err, r"holds no runs yet", only_line=True)


def test_report_of_a_real_tiny_run(trained_run, tmp_path, capsys):
    from lmforge.cli import main

    workspace, name, _ = trained_run
    out = tmp_path / "tiny.html"
    assert main(["--workspace", str(workspace), "report", name, "--out", str(out)]) == 0
    page = out.read_text()
    pngs = embedded_pngs(page)
    assert len(pngs) == 4  # learning curves, throughput and MFU, energy and money; the scaling point
    for png in pngs:
        assert_real_picture(png)
    run = Ledger(workspace / "ledger.db").get_run(name)
    assert f"{run['summary']['val_bpb']:.4f}" in page
    assert math.isfinite(run["summary"]["kwh"]) and f"{run['summary']['kwh']:.3g} kWh" in page
