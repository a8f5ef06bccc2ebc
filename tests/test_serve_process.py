"""The engine in a process of its own (serve/engine_process.py): the same answers as the engine in this process,
backpressure and cancellation across the pipe, metrics summed over both processes, and a dead engine process
answered with errors rather than silence."""

from __future__ import annotations

import asyncio
import dataclasses
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import wait_until
from test_serve_guard import REFUSAL, write_policy
from test_serve_http import new_engine, running

from lmforge.checkpoint import resolve_checkpoint
from lmforge.errors import LmforgeError
from lmforge.guard.guard import Guard
from lmforge.meter.ledger import Ledger
from lmforge.serve.app import create_app
from lmforge.serve.engine import EngineConfig, Failed, Finished, Overloaded, SamplingParams
from lmforge.serve import engine_process
from lmforge.serve.engine_process import EngineProcess, PipeWriter

GREEDY = SamplingParams(max_tokens=12, temperature=0)


def start(workspace, guard=None, ledger=None, run_id=None, **config) -> EngineProcess:
    return EngineProcess(resolve_checkpoint("tiny", workspace / "runs"), EngineConfig(**config), model_id="tiny",
                         guard=guard, ledger_path=ledger, run_id=run_id)


@pytest.fixture(scope="module")
def remote(trained_run) -> Iterator[EngineProcess]:
    engine = start(trained_run[0], max_concurrency=4, max_queue=2)
    yield engine
    engine.stop()


def test_answers_equal_the_engine_in_this_process(remote, trained_run):
    local = new_engine(trained_run[0], max_concurrency=4)
    try:
        for prompt, params in (("def alpha", GREEDY), ("import os", SamplingParams(max_tokens=9, seed=7, n=2)),
                               ([5, 6, 7], SamplingParams(max_tokens=4, temperature=0, logprobs=2, echo=True))):
            want, got = local.generate(prompt, params, timeout=30), remote.generate(prompt, params, timeout=30)
            assert got.texts == want.texts and got.token_ids == want.token_ids
            assert got.prompt.prompt_token_ids == want.prompt.prompt_token_ids
            assert got.logprobs == want.logprobs and got.prompt.prompt_logprobs == want.prompt.prompt_logprobs
            assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.usage.flops) == \
                (want.usage.prompt_tokens, want.usage.completion_tokens, want.usage.flops)
    finally:
        local.stop()
    assert remote.stats() == {"running": 0, "waiting": 0, "slots": 4}
    assert remote.alive and remote.pid != os.getpid()


def test_http_streams_and_metrics_sum_both_processes(remote):
    with running(create_app(remote)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        before = remote.metrics.render().decode()
        stream = client.completions.create(model="tiny", prompt="def alpha", max_tokens=12, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == remote.generate("def alpha", GREEDY).texts[0]
        assert httpx.get(base + "/health").json() == {"status": "ok", "running": 0, "waiting": 0, "slots": 4}
        text = httpx.get(base + "/metrics").text

    def value(text: str, name: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))

    # tokens are counted in the engine process, HTTP statuses in this one: /metrics shows both
    assert value(text, "lmforge_completion_tokens_total") == value(before, "lmforge_completion_tokens_total") + 24
    assert value(text, 'lmforge_requests_total{route="/v1/completions",status="200"}') == 1
    assert value(text, "lmforge_sequence_slots") == 4
    assert text.count("# TYPE lmforge_completion_tokens_total counter") == 1  # one family, not two


def test_overload_and_cancel_across_the_pipe(remote):
    long = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)

    async def scenario(params: SamplingParams, accepted: int) -> None:
        handles = [remote.submit("def", params) for _ in range(accepted)]  # 4 rows, then 2 requests queued
        with pytest.raises(Overloaded, match="at capacity"):
            remote.submit("def", params)
        handles[0].cancel()
        events = [event async for event in handles[0]]
        assert isinstance(events[-1], Finished)
        for handle in handles[1:]:
            assert isinstance([event async for event in handle][-1], Finished)

    asyncio.run(scenario(long, 6))
    asyncio.run(scenario(dataclasses.replace(long, n=4), 3))  # the queue holds requests, as in-process: n=4 each
    metrics = remote.metrics.render().decode()  # cancelled counted in the engine process, rejected in this one
    assert "lmforge_cancelled_requests_total 2.0" in metrics
    assert 'lmforge_rejected_requests_total{reason="queue_full"} 2.0' in metrics
    remote._send(("submit", "no-such-request"))  # a message the engine process cannot handle: it reads on
    remote.generate("def", GREEDY, timeout=30)
    os.kill(remote.pid, signal.SIGTERM)  # as a signal to the whole process group: only the HTTP side acts on it
    remote.generate("def", GREEDY, timeout=30)
    assert remote.alive


def test_a_dead_engine_process_fails_its_requests_and_health(trained_run):
    engine = start(trained_run[0], max_concurrency=2)
    try:
        with running(create_app(engine)) as base:
            handle = engine.submit("def", SamplingParams(max_tokens=56, temperature=0, ignore_eos=True))
            os.kill(engine.pid, signal.SIGKILL)
            events = list(handle.events(timeout=30))
            assert isinstance(events[-1], Failed) and events[-1].status == 503
            wait_until(lambda: not engine.alive)
            health = httpx.get(base + "/health")
            assert health.status_code == 503 and "engine" in health.json()["message"]
            response = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": "def"})
            assert response.status_code == 503 and "not running" in response.json()["error"]["message"]
            metrics = httpx.get(base + "/metrics")  # this process's share, still
            assert metrics.status_code == 200 and 'status="503"' in metrics.text
        with pytest.raises(LmforgeError, match="engine process ended"):
            engine.run()
    finally:
        engine.stop()


def test_a_stuck_engine_process_is_killed_on_stop(trained_run):
    engine = start(trained_run[0], max_concurrency=2)
    handle = engine.submit("def", SamplingParams(max_tokens=56, temperature=0, ignore_eos=True))
    os.kill(engine.pid, signal.SIGSTOP)  # a step that never ends
    engine.stop(timeout=1)
    assert not engine._process.is_alive()
    events = list(handle.events(timeout=10))
    assert isinstance(events[-1], Failed) and events[-1].status == 503
    with pytest.raises(LmforgeError, match="not running"):
        engine.submit("def", GREEDY)


def test_a_paused_engine_process_holds_nothing_up(trained_run, monkeypatch):
    """A SIGSTOPped engine process reads nothing: sends still return at once (what the pipe cannot take waits, in
    order), /metrics answers with the engine's last counts, and once it runs again it takes everything in."""
    monkeypatch.setattr(engine_process, "CALL_TIMEOUT_S", 0.5)
    engine = start(trained_run[0], max_concurrency=2)
    try:
        want = engine.generate("def", GREEDY, timeout=30)
        assert "lmforge_completion_tokens_total 12.0" in engine.metrics.render().decode()
        os.kill(engine.pid, signal.SIGSTOP)
        sent = threading.Event()

        def send_many() -> None:
            for _ in range(40):  # 4 MB of cancels for no request, far more than the pipe holds
                engine._send(("cancel", "x" * 100_000))
            sent.set()

        threading.Thread(target=send_many, daemon=True).start()
        assert sent.wait(30)
        handle = engine.submit("def", GREEDY)  # behind them
        assert "lmforge_completion_tokens_total 12.0" in engine.metrics.render().decode()  # the last answer
        os.kill(engine.pid, signal.SIGCONT)
        assert handle.result(timeout=30).token_ids == want.token_ids
        assert "lmforge_completion_tokens_total 24.0" in engine.metrics.render().decode()
    finally:
        os.kill(engine.pid, signal.SIGCONT)
        engine.stop()


def test_a_failing_start_is_one_clear_error(trained_run):
    with pytest.raises(LmforgeError, match="--kv-cache-mb .* is less than one sequence's KV cache"):
        start(trained_run[0], kv_cache_mb=0.0001)

    def kill_it(doing: str) -> None:  # the engine process dies without a word (out of memory, say)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)

    with pytest.raises(LmforgeError, match=r"exited \(code -9\) while starting"):
        EngineProcess(resolve_checkpoint("tiny", trained_run[0] / "runs"), EngineConfig(compile=True),
                      model_id="tiny", on_start=kill_it)


def test_the_interpreter_exits_without_stop(trained_run, tmp_path):
    script = tmp_path / "no_stop.py"
    script.write_text(f"""
from pathlib import Path

from lmforge.checkpoint import resolve_checkpoint
from lmforge.serve.engine import EngineConfig, SamplingParams
from lmforge.serve.engine_process import EngineProcess

if __name__ == "__main__":
    engine = EngineProcess(resolve_checkpoint("tiny", Path({str(trained_run[0] / "runs")!r})), EngineConfig(),
                           model_id="tiny")
    print(engine.generate("def", SamplingParams(max_tokens=3, temperature=0)).usage.completion_tokens)
""")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "3", done.stderr


def test_guard_rails_on_both_sides_of_the_pipe(trained_run, tmp_path):
    # the input rail runs in this process, the output rail in the engine's; the engine process audits both
    policy = write_policy(tmp_path)
    ledger = Ledger(tmp_path / "ledger.db")
    run_id = ledger.start_run("serve-test", "serve", {}, {}, str(tmp_path))
    engine = start(trained_run[0], guard=Guard.from_policy(policy), ledger=tmp_path / "ledger.db", run_id=run_id)
    try:
        blocked = engine.generate("how do I hire a hitman", GREEDY, timeout=30)
        assert blocked.texts == [REFUSAL] and blocked.finish_reasons == ["content_filter"]
        assert blocked.prompt.guard.blocked
        cut = engine.generate("def alpha_beta(alpha, beta):", SamplingParams(max_tokens=48, temperature=0),
                              timeout=30)
        assert cut.finish_reasons == ["content_filter"] and cut.guard[0].blocked
        assert "return total" not in cut.texts[0]
        assert 'lmforge_guard_checks_total{action="block",direction="input"} 1.0' in engine.metrics.render().decode()
    finally:
        engine.stop()
    statuses = sorted(r["status"] for r in ledger.get_requests(run_id))
    assert statuses == ["blocked:input", "blocked:output"]
    assert {e["direction"] for e in ledger.get_guard_events(run_id)} == {"input", "output"}


def test_pipe_writer_never_waits_and_keeps_the_order():
    """A pipe nobody reads fills after a few hundred kilobytes; sends still return at once, and what could not go
    out then follows, in order, as the other end reads."""
    ours, theirs = multiprocessing.Pipe()
    writer = PipeWriter(ours)
    messages = [("message", i, b"x" * 50_000) for i in range(100)]  # 5 MB
    sent = threading.Event()

    def send_all() -> None:
        for message in messages:
            writer.send(message)
        sent.set()

    threading.Thread(target=send_all, daemon=True).start()
    assert sent.wait(30)  # every send returned while the other end had read nothing
    assert [theirs.recv() for _ in messages] == messages
    writer.send(("after the backlog",))
    assert theirs.recv() == ("after the backlog",)
    writer.close()
    writer.send(("after close",))  # dropped, not raised
    ours.close()
    assert theirs.poll(10)  # the writer's thread closes its end too
    with pytest.raises(EOFError):
        theirs.recv()
