"""The dashboard, for real: uvicorn on a local port over a ledger made here, its JSON API driven by httpx, and the
page driven in headless Chromium (Playwright): it lists runs, draws the selected run's curve, redraws when the
ledger gets new steps, and its playground streams a reply from a live tiny-model `lmforge serve` engine with the
reply's tokens and joules, and shows a guard refusal with its category.

The browser tests skip (saying how to install) without Chromium or the playwright package; the API tests always run.
"""

from __future__ import annotations

import re
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import expect_one_line_error, lmforge_process
from test_serve_http import new_engine, running

from lmforge.dashboard.app import create_app
from lmforge.guard.guard import Guard
from lmforge.meter.ledger import Ledger
from lmforge.serve.app import create_app as create_serve_app

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:
    sync_playwright = None

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
INSTALL = "apt-get install -y chromium && pip install playwright"
NO_SERVER = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there
REFUSAL = "Sorry, not that."


def synthetic_ledger(path: Path, steps: int = 20) -> tuple[Ledger, int]:
    """A finished run with a summary, then a running one (this process) with `steps` steps and two evaluations."""
    ledger = Ledger(path)
    done = ledger.start_run("finished-d2", "train", {}, {}, str(path.parent))
    ledger.log_metrics(done, 10, {"loss": 3.0, "val_loss": 3.1, "val_bpb": 1.75})
    ledger.finish_run(done, "completed", {"steps": 10, "val_bpb": 1.75, "energy_j": 7200.0, "energy_measured": False,
                                          "cost_usd": 0.0123})
    live = ledger.start_run("live-d4", "train", {}, {}, str(path.parent))
    log_steps(ledger, live, 1, steps)
    return ledger, live


def log_steps(ledger: Ledger, run_id: int, first: int, last: int) -> None:
    for step in range(first, last + 1):
        ledger.log_metrics(run_id, step, {"loss": 6.0 / step ** 0.5, "tokens": 512.0 * step})
        if step % 10 == 0:
            ledger.log_metrics(run_id, step, {"val_loss": 5.5 / step ** 0.5, "val_bpb": 3.0 / step ** 0.5})


@pytest.fixture
def ledger(tmp_path) -> Iterator[tuple[Ledger, int]]:
    ledger, live = synthetic_ledger(tmp_path / "ledger.db")
    yield ledger, live
    ledger.close()


@pytest.fixture
def dashboard(ledger, tmp_path) -> Iterator[str]:
    with running(create_app(tmp_path / "ledger.db", NO_SERVER)) as base:
        yield base


# ---- the JSON API ---------------------------------------------------------------------------------------------


def test_runs_and_incremental_metrics(dashboard, ledger):
    led, live = ledger
    with httpx.Client(base_url=dashboard, timeout=10) as http:
        rows = http.get("/api/runs").json()["runs"]
        assert [(r["name"], r["status"], r["steps"]) for r in rows] == [("live-d4", "running", 20),
                                                                        ("finished-d2", "completed", 10)]
        assert rows[0]["val_bpb"] == pytest.approx(3.0 / 20 ** 0.5)  # running: the last evaluation so far
        assert (rows[1]["energy_j"], rows[1]["energy_measured"], rows[1]["cost_usd"]) == (7200.0, False, 0.0123)
        run = http.get("/api/runs/live-d4").json()
        assert run["id"] == live and run["metric_names"] == ["loss", "tokens", "val_bpb", "val_loss"]

        page = http.get(f"/api/runs/{live}/metrics", params={"since": 15}).json()
        assert page["steps"] == [16, 17, 18, 19, 20] and page["last_step"] == 20 and not page["more"]
        assert page["series"]["val_bpb"] == [None] * 4 + [pytest.approx(3.0 / 20 ** 0.5)]
        led.log_metrics(live, 21, {"loss": float("nan")})  # a NaN reaches the page as null
        page = http.get(f"/api/runs/{live}/metrics", params={"since": 20, "names": "loss,tokens"}).json()
        assert page["steps"] == [21] and page["series"] == {"loss": [None], "tokens": [None]}
        assert http.get(f"/api/runs/{live}/metrics", params={"since": 21}).json()["steps"] == []


def test_a_long_history_comes_in_pages(dashboard, monkeypatch):
    monkeypatch.setattr("lmforge.dashboard.data.MAX_STEPS_PER_PAGE", 7)
    pages, since = [], -1
    while not pages or pages[-1]["more"]:
        pages.append(httpx.get(f"{dashboard}/api/runs/live-d4/metrics", params={"since": since}).json())
        since = pages[-1]["last_step"]
    assert [p["steps"] for p in pages] == [list(range(1, 8)), list(range(8, 15)), list(range(15, 21))]


@pytest.mark.parametrize(("method", "path", "body", "status", "pattern"), [
    ("GET", "/api/runs/live-d5", None, 404, r"no run named 'live-d5' \(did you mean 'live-d4'\?\)"),
    ("GET", "/api/runs/live-d5/metrics", None, 404, r"no run named 'live-d5'"),
    ("GET", "/api/runs/live-d4/metrics?since=abc", None, 400, r"^since: .*integer.*'abc'"),
    ("GET", "/api/runs/live-d4/metrics?since=-5", None, 400, r"^since: .*-1"),
    ("GET", "/api/runs/live-d4/metrics?names=loss;drop", None, 400, r"^names: .*'loss;drop'"),
    ("GET", "/api/runs?limit=0", None, 400, r"^limit: "),
    ("GET", "/api/nothing", None, 404, r"no route /api/nothing"),
    ("POST", "/api/chat", b"{", 400, r"not valid JSON"),
    ("POST", "/api/chat", b'{"messages": []}', 400, r"^messages: .*at least 1"),
    ("POST", "/api/chat", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400,
     r"^temperature: .*2"),
    ("POST", "/api/chat", b'{"messages": [{"role": "robot", "content": "hi"}]}', 400, r"^messages\.0\.role: "),
    ("POST", "/api/chat", b'{"messages": [{"role": "user", "content": "hi"}]}', 502,
     r"cannot reach lmforge serve at http://127\.0\.0\.1:9/v1 .*lmforge serve --ckpt RUN"),
    ("GET", "/api/serve", None, 502, r"cannot reach lmforge serve"),
])
def test_bad_requests_get_json_errors(dashboard, method, path, body, status, pattern):
    response = httpx.request(method, dashboard + path, content=body, timeout=10)
    assert response.status_code == status, response.text
    assert re.search(pattern, response.json()["error"]["message"]), response.json()


def test_cli_serves_and_refuses_bad_flags(ledger, tmp_path, cli):
    expect_one_line_error(*cli("dashboard")[::2], r"no ledger at .*ledger\.db; `lmforge train`")
    expect_one_line_error(*cli("dashboard", "--serve-url", "127.0.0.1:8000")[::2], r"--serve-url must be an http")
    with lmforge_process(tmp_path, ["dashboard", "--port", "0"], "dashboard at", signal.SIGINT) as (line, ended):
        base = re.search(r"at (http://\S+)", line).group(1)
        assert [r["name"] for r in httpx.get(f"{base}/api/runs", timeout=10).json()["runs"]] == \
            ["live-d4", "finished-d2"]
    assert ended["returncode"] == 0


# ---- the page in headless Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if sync_playwright is None:
        pytest.skip(f"the playwright package is not installed; {INSTALL}")
    if CHROMIUM is None:
        pytest.skip(f"no chromium on PATH; {INSTALL}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser) -> Iterator[Page]:
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: errors.append(f"off-host request {r.url}")
            if not r.url.startswith("http://127.0.0.1:") else None)
    yield page
    page.close()
    assert errors == []  # no script error, nothing fetched from a CDN


def line_pixels(page: Page) -> int:
    """Pixels of the loss line's blue (#1f77b4, antialiased) on the chart's canvas."""
    return page.evaluate("""() => {
        const canvas = document.querySelector('#chart canvas');
        const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let n = 0;
        for (let i = 0; i < px.length; i += 4) {
            if (px[i + 3] > 0 && px[i + 2] > px[i] + 80 && px[i + 2] > px[i + 1] + 30) n++;
        }
        return n;
    }""")


def test_page_lists_runs_draws_the_chart_and_follows_new_steps(dashboard, ledger, page):
    led, live = ledger
    page.goto(dashboard)
    rows = page.locator("#runs tbody tr")
    rows.first.wait_for()
    assert rows.count() == 2
    assert rows.nth(0).locator("td").all_inner_texts()[:4] == ["live-d4", "train", "running", "20"]
    assert rows.nth(1).locator("td").all_inner_texts() == ["finished-d2", "train", "completed", "10", "1.7500",
                                                           "2.00 Wh (est.)", "$0.0123"]
    # the newest run is selected and drawn
    chart = page.locator("#chart")
    page.wait_for_function("document.querySelector('#chart').dataset.points === '20'", timeout=5000)
    assert page.locator("#chart-title").inner_text() == "live-d4 (train)"
    assert chart.locator("canvas").count() == 1 and line_pixels(page) > 100
    assert "val loss" in chart.inner_text() and "val bpb" in chart.inner_text()  # the legend
    # the run trains on: new steps land in the ledger and the chart takes them within a poll or two
    log_steps(led, live, 21, 30)
    page.wait_for_function("document.querySelector('#chart').dataset.points === '30'", timeout=6000)
    assert chart.get_attribute("data-last-step") == "30"
    assert "val bpb 0.5477" in page.locator("#chart-note").inner_text()  # 3 / sqrt(30)
    # another run, chosen by a click
    rows.nth(1).click()
    page.wait_for_function("document.querySelector('#chart').dataset.lastStep === '10'", timeout=5000)
    assert chart.get_attribute("data-points") == "1" and "selected" in rows.nth(1).get_attribute("class")


def write_policy(tmp_path: Path) -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text("violent_crimes: {keywords: [hire a hitman]}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f'refusal: "{REFUSAL}"\ndetectors:\n  rules: {{file: {rules}}}\n'
                      "categories:\n  violent_crimes: {input: block, output: block}\n")
    return policy


def test_playground_streams_a_reply_and_shows_a_refusal(trained_run, tmp_path, page, browser):
    synthetic_ledger(tmp_path / "ledger.db", steps=1)[0].close()
    engine = new_engine(trained_run[0], delay=0.01)  # each token a little slower, so the reply visibly streams
    engine.guard = Guard.from_policy(write_policy(tmp_path))
    try:
        with running(create_serve_app(engine)) as serve, \
                running(create_app(tmp_path / "ledger.db", serve + "/v1")) as base:
            page.goto(base)
            page.wait_for_function("document.querySelector('#serve-status').textContent.startsWith('tiny at')",
                                   timeout=5000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "24")
            # count the reply's text changes: more than one means it arrived in pieces
            page.evaluate("""() => {
                window.replyUpdates = 0;
                new MutationObserver(() => { window.replyUpdates++; })
                    .observe(document.querySelector('#conversation'), {subtree: true, characterData: true,
                                                                       childList: true});
            }""")
            page.fill("#prompt", "def alpha")
            page.press("#prompt", "Enter")
            reply = page.locator(".turn.assistant").nth(0)
            page.wait_for_selector(".turn.assistant[data-state=done]", timeout=20000)
            assert reply.locator(".bubble").inner_text().strip() != ""
            assert page.evaluate("window.replyUpdates") > 3
            meta = reply.locator(".meta")
            assert int(meta.get_attribute("data-completion-tokens")) > 0
            assert float(meta.get_attribute("data-joules")) > 0
            assert re.search(r"\d+ \+ \d+ tokens", meta.inner_text()) and re.search(r"[\d.e+-]+ J", meta.inner_text())
            assert meta.locator(".verdict[data-direction=input]").inner_text() == "input: allow"

            page.click("#clear")  # a new chat: the tiny model's context (64 tokens) holds one exchange
            page.fill("#prompt", "please hire a hitman for me")
            page.click("#send")
            refused = page.locator(".turn.assistant").nth(0)
            page.wait_for_selector(".turn.assistant[data-state=done]", timeout=20000)
            assert refused.locator(".bubble").inner_text() == REFUSAL
            assert "refused" in refused.get_attribute("class")
            assert refused.locator(".verdict[data-direction=input]").inner_text() == "input: block (violent_crimes)"
            assert "finish: content_filter" in refused.locator(".meta").inner_text()
    finally:
        engine.stop()
