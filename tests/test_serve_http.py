"""The HTTP server, for real: uvicorn on a local port, driven by the official `openai` client and by raw httpx.

Outputs must equal the engine called directly (greedy or seeded), every bad input must get a 4xx OpenAI error
object (never a 5xx), and abuse (huge bodies, floods, clients that vanish) must leave the server healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from conftest import CLI, expect_one_line_error, lmforge_process, slow_down, wait_until
from prometheus_client.parser import text_string_to_metric_families

from lmforge.checkpoint import resolve_checkpoint
from lmforge.cli import main
from lmforge.meter.ledger import Ledger
from lmforge.serve.app import create_app
from lmforge.serve.engine import Engine, EngineConfig, SamplingParams

MESSAGES = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "def alpha"}]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread on a free local port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def new_engine(workspace: Path, delay: float = 0.0, **config) -> Engine:
    """An engine on the tiny run, `delay` seconds added to each forward pass (`slow_down`)."""
    engine = Engine.from_checkpoint(resolve_checkpoint("tiny", workspace / "runs"), EngineConfig(**config))
    if delay:
        slow_down(engine, delay)
    return engine.start()


@contextlib.contextmanager
def slow_server(workspace: Path, **config) -> Iterator[tuple[Engine, str]]:
    engine = new_engine(workspace, delay=0.02, **config)
    try:
        with running(create_app(engine)) as base:
            yield engine, base
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def engine(trained_run) -> Iterator[Engine]:
    engine = new_engine(trained_run[0], max_concurrency=4, max_queue=16)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(engine) -> Iterator[str]:
    with running(create_app(engine)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def http(url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as c:
        yield c


def cancelled(engine: Engine) -> float:
    return engine.metrics.registry.get_sample_value("lmforge_cancelled_requests_total")


def assert_error(response: httpx.Response, status: int, pattern: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(pattern, error["message"]), error["message"]
    if param is not None:
        assert error["param"] == param
    return error


def choices_of(stream, chat: bool) -> tuple[list[str], dict[int, str]]:
    """The texts and finish reasons of a stream's choices, by index."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + ((choice.delta.content or "") if chat else choice.text)
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    return [texts[i] for i in sorted(texts)], reasons


# ---- the happy paths, against the engine called directly ----------------------------------------------------


def test_models_and_health(http, engine):
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["owned_by"], m["object"]) for m in models["data"]] == [("tiny", "lmforge", "model")]
    assert http.get("/health").json() == {"status": "ok", "running": 0, "waiting": 0, "slots": engine.slots}


def test_completion_matches_engine(client, engine):
    response = client.completions.create(model="tiny", prompt="def alpha", max_tokens=8, temperature=0)
    direct = engine.generate("def alpha", SamplingParams(max_tokens=8, temperature=0))
    assert response.id.startswith("cmpl-") and response.object == "text_completion" and response.model == "tiny"
    assert [c.text for c in response.choices] == direct.texts
    assert response.choices[0].finish_reason == direct.finish_reasons[0] == "length"
    assert response.choices[0].logprobs is None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == \
        (direct.usage.prompt_tokens, 8, direct.usage.total_tokens)
    extension = response.usage.model_extra["lmforge"]
    assert set(extension) == {"flops", "device_seconds", "energy_joules", "energy_measured", "queue_seconds",
                              "time_to_first_token"}
    assert extension["flops"] == direct.usage.flops > 0 and extension["energy_measured"] is False


def test_seeded_sampling_with_n_matches_engine(client, engine):
    response = client.completions.create(model="tiny", prompt="def beta", max_tokens=6, n=3, temperature=0.9,
                                         seed=7, extra_body={"top_k": 40})
    direct = engine.generate("def beta", SamplingParams(max_tokens=6, n=3, temperature=0.9, top_k=40, seed=7))
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert [c.text for c in response.choices] == direct.texts
    assert len(set(direct.texts)) > 1  # the choices draw from different seeds
    assert response.usage.completion_tokens == sum(len(ids) for ids in direct.token_ids)


def test_completion_stream_with_usage(client, engine):
    chunks = list(client.completions.create(model="tiny", prompt="def gamma", max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    direct = engine.generate("def gamma", SamplingParams(max_tokens=8, temperature=0))
    text_chunks, usage_chunk = chunks[:-1], chunks[-1]
    assert len({c.id for c in chunks}) == 1 and all(c.object == "text_completion" for c in chunks)
    assert "".join(c.choices[0].text for c in text_chunks) == direct.texts[0]
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 8
    assert usage_chunk.usage.prompt_tokens == direct.usage.prompt_tokens


def test_chat_matches_engine(client, engine):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    prompt = engine.render_chat(MESSAGES)
    direct = engine.generate(prompt, SamplingParams(max_tokens=10, temperature=0,
                                                    stop_token_ids=engine.chat_stop_token_ids))
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    message = response.choices[0].message
    assert message.role == "assistant" and message.content == direct.texts[0]
    assert response.choices[0].finish_reason == direct.finish_reasons[0]
    assert response.usage.prompt_tokens == len(prompt)


def test_chat_stream_n2(client, engine):
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, temperature=0.8,
                                            seed=11, n=2, stream=True)
    texts, roles, reasons = ["", ""], {}, {}
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        for choice in chunk.choices:
            if choice.delta.role:
                roles[choice.index] = choice.delta.role
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    direct = engine.generate(engine.render_chat(MESSAGES), SamplingParams(
        max_tokens=6, temperature=0.8, seed=11, n=2, stop_token_ids=engine.chat_stop_token_ids))
    assert roles == {0: "assistant", 1: "assistant"}
    assert texts == direct.texts
    assert reasons == dict(enumerate(direct.finish_reasons))


def test_stop_string(client, engine):
    full = engine.generate("def delta", SamplingParams(max_tokens=20, temperature=0)).texts[0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    response = client.completions.create(model="tiny", prompt="def delta", max_tokens=20, temperature=0, stop=[stop])
    assert response.choices[0].text == full[: full.index(stop)]
    assert response.choices[0].finish_reason == "stop"
    streamed = choices_of(client.completions.create(model="tiny", prompt="def delta", max_tokens=20, temperature=0,
                                                    stop=stop, stream=True), chat=False)
    assert streamed == ([full[: full.index(stop)]], {0: "stop"})


def test_echo_logprobs_for_scoring(client, engine):
    """What lm-evaluation-harness sends to score a continuation: max_tokens 0, echo, logprobs."""
    prompt = "def alpha_beta(alpha, beta):"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                         temperature=0)
    direct = engine.generate(prompt, SamplingParams(max_tokens=0, echo=True, logprobs=1, temperature=0))
    choice = response.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    lp = choice.logprobs
    assert lp.tokens == [t.token for t in direct.prompt.prompt_logprobs]
    assert len(lp.tokens) == direct.usage.prompt_tokens and response.usage.completion_tokens == 0
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx([t.logprob for t in direct.prompt.prompt_logprobs[1:]], abs=1e-5)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_generated_logprobs(client, engine):
    response = client.completions.create(model="tiny", prompt="def omega", max_tokens=5, logprobs=2, temperature=0)
    direct = engine.generate("def omega", SamplingParams(max_tokens=5, logprobs=2, temperature=0)).logprobs[0]
    lp = response.choices[0].logprobs
    assert "".join(lp.tokens) == response.choices[0].text and len(lp.tokens) == 5
    assert lp.tokens == [t.token for t in direct]
    assert lp.token_logprobs == pytest.approx([t.logprob for t in direct], abs=1e-5)
    for top, expected in zip(lp.top_logprobs, direct):
        assert top == pytest.approx({text: logprob for _, text, logprob in expected.top}, abs=1e-5)
    assert all(len(top) == 2 and max(top.values()) >= value for top, value in zip(lp.top_logprobs,
                                                                                  lp.token_logprobs))
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 3 and bytes(t.bytes).decode() == t.token for t in content)


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_equal_the_plain_response(client, echo):
    """Streamed, the legacy logprobs come a chunk at a time: text_offset runs on across chunks, and with echo the
    first chunk carries the prompt and its log-probabilities."""
    args = dict(model="tiny", prompt="def omega(x):", max_tokens=6, logprobs=2, temperature=0, echo=echo)
    plain = client.completions.create(**args).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**args, stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == plain.text
    assert plain.text.startswith("def omega(x):") == echo and len(chunks) > 1
    for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        streamed = [item for c in chunks if c.logprobs for item in getattr(c.logprobs, name)]
        assert streamed == getattr(plain.logprobs, name)


def test_streamed_completions_with_n_match_engine(client, engine):
    texts, reasons = choices_of(client.completions.create(model="tiny", prompt="def beta", max_tokens=6, n=2,
                                                          temperature=0.9, seed=5, stream=True), chat=False)
    direct = engine.generate("def beta", SamplingParams(max_tokens=6, n=2, temperature=0.9, seed=5))
    assert texts == direct.texts and reasons == dict(enumerate(direct.finish_reasons))


def test_chat_with_n_and_stop_strings_matches_engine(client, engine):
    prompt = engine.render_chat(MESSAGES)
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6, n=2, temperature=0.9,
                                              seed=3)
    direct = engine.generate(prompt, SamplingParams(max_tokens=6, n=2, temperature=0.9, seed=3,
                                                    stop_token_ids=engine.chat_stop_token_ids))
    assert [c.message.content for c in response.choices] == direct.texts
    assert [c.finish_reason for c in response.choices] == direct.finish_reasons

    full = engine.generate(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)).texts[0]
    assert len(full) >= 8, full
    stop = full[len(full) // 2: len(full) // 2 + 2]
    args = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0, stop=stop)
    plain = client.chat.completions.create(**args, extra_body={"ignore_eos": True}).choices[0]
    assert plain.message.content == full[: full.index(stop)] and plain.finish_reason == "stop"
    texts, reasons = choices_of(client.chat.completions.create(**args, stream=True, extra_body={"ignore_eos": True}),
                                chat=True)
    assert texts == [full[: full.index(stop)]] and reasons == {0: "stop"}


def test_bursts_and_speculation_answer_as_one_step_at_a_time(trained_run, engine):
    """The tests above serve one token per step; `lmforge serve` decodes bursts of 16 and speculates by default.
    Over HTTP, plain and streamed, its answers are the one-step engine's."""
    fast = new_engine(trained_run[0], max_concurrency=4, decode_steps=16, speculate=4)
    try:
        with running(create_app(fast)) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
            for prompt in ("def alpha", "def gamma(gamma, beta):", "    return"):
                direct = engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0)).texts[0]
                args = dict(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
                assert client.completions.create(**args).choices[0].text == direct
                assert choices_of(client.completions.create(**args, stream=True), chat=False)[0] == [direct]
            chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0)
            direct = engine.generate(engine.render_chat(MESSAGES), SamplingParams(
                max_tokens=30, temperature=0, stop_token_ids=engine.chat_stop_token_ids))
            assert chat.choices[0].message.content == direct.texts[0]
        drafted = fast.metrics.registry.get_sample_value("lmforge_speculated_tokens_total", {"outcome": "drafted"})
        assert drafted > 0  # it did speculate
    finally:
        fast.stop()


# ---- bad input: always a 4xx OpenAI error object ------------------------------------------------------------

TOO_LONG = "alpha beta gamma " * 100

BAD_COMPLETIONS = [
    (b'{"model": "tiny", "prompt": ', "not valid JSON", None),
    (b'[1, 2]', "must be a JSON object", None),
    (b'{"model": "tiny", "prompt": "a", "temperature": "hot"}', "temperature", "temperature"),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": "5"}', "max_tokens", "max_tokens"),
    (b'{"model": "tiny", "prompt": "a", "stream": "yes"}', "stream", "stream"),
    (b'{"model": "tiny", "prompt": {"text": "a"}}', "prompt", "prompt"),
    (b'{"model": "tiny"}', "missing required field 'prompt'", "prompt"),
    (b'{"prompt": "a"}', "missing required field 'model'", "model"),
    (b'{"model": "tiny", "prompt": "\xff\xfe"}', "not valid UTF-8", None),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": 100000}', "context of 64 tokens", None),
    (b'{"model": "tiny", "prompt": "a", "max_tokens": -1}', "greater than or equal to 0", "max_tokens"),
    (b'{"model": "tiny", "prompt": "a", "temperature": 2.5}', "less than or equal to 2", "temperature"),
    (b'{"model": "tiny", "prompt": "a", "temperature": -0.1}', "greater than or equal to 0", "temperature"),
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', "finite", "temperature"),
    (b'{"model": "tiny", "prompt": "a", "top_p": 0}', "greater than 0", "top_p"),
    (b'{"model": "tiny", "prompt": "a", "n": 17}', "less than or equal to 16", "n"),
    (b'{"model": "tiny", "prompt": "a", "n": 8}', "n must lie in 1..4", None),  # more than the engine's slots
    (b'{"model": "tiny", "prompt": "a", "logprobs": 6}', "less than or equal to 5", "logprobs"),
    (b'{"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}', "at most 4 stop", "stop"),
    (b'{"model": "tiny", "prompt": "a", "stop": [""]}', "1 to 256 characters", "stop"),
    (b'{"model": "tiny", "prompt": "a", "stop": 5}', "a string or a list of up to 4 strings", "stop"),
    (b'{"model": "tiny", "prompt": "a", "stream_options": {"include_usage": 1}}', "valid boolean",
     "stream_options.include_usage"),
    (b'{"model": "tiny", "prompt": ["a", "b"]}', "one prompt per request, got a batch of 2", "prompt"),
    (b'{"model": "tiny", "prompt": ""}', "prompt is empty", None),
    (b'{"model": "tiny", "prompt": [1, 99999]}', "token ids must lie in", None),
    (json.dumps({"model": "tiny", "prompt": TOO_LONG}).encode(), "shorten the prompt", None),
    (b'{"model": "gpt-4", "prompt": "a"}', "'gpt-4' is not served here", "model"),
    (json.dumps({"model": "x" * 300, "prompt": "a"}).encode(), "at most 256 characters", "model"),
]


@pytest.mark.parametrize("body,pattern,param", BAD_COMPLETIONS)
def test_bad_completion_requests(http, body, pattern, param):
    error = assert_error(http.post("/v1/completions", content=body), 400, pattern, param)
    assert error["type"] == "invalid_request_error"


BAD_CHATS = [
    (b'{"model": "tiny", "messages": [', "not valid JSON", None),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff"}]}', "not valid UTF-8", None),
    (b'{"model": "tiny"}', "missing required field 'messages'", "messages"),
    (b'{"model": "tiny", "messages": "hi"}', "messages", "messages"),
    (b'{"model": "tiny", "messages": []}', "at least 1 item", "messages"),
    (b'{"model": "tiny", "messages": [{"content": "hi"}]}', "messages\\[0\\].role", "messages[0].role"),
    (b'{"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}', "unknown role robot", "messages"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": 5}]}', "a string or a list of text parts",
     "messages[0].content"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
     "Input should be 'text'", "messages[0].content[0].type"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}',
     "needs logprobs: true", "top_logprobs"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}',
     "only useful with echo", None),
]


@pytest.mark.parametrize("body,pattern,param", BAD_CHATS)
def test_bad_chat_requests(http, body, pattern, param):
    assert_error(http.post("/v1/chat/completions", content=body), 400, pattern, param)


@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"top_p": 1e-300}, {"top_k": 10**12},
                                     {"temperature": 2, "presence_penalty": 2, "frequency_penalty": -2},
                                     {"prompt": [0, 0, 0]}, {"prompt": "\u0000 \U0001F600"}])
def test_extreme_valid_values_are_served(http, extreme):
    """Values at the edges of their ranges work (and none of them can take the engine down for everyone)."""
    response = http.post("/v1/completions", json={"model": "tiny", "prompt": "def", "max_tokens": 3, **extreme})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 3
    assert http.get("/health").json()["status"] == "ok"


def test_model_name_is_never_a_path(http):
    """'../../etc/passwd' is an unknown model like any other: 400, and no audited operation (open, listdir,
    scandir, remove, rename, glob, subprocess, ...) is given the name."""
    touched: list[str] = []

    def audit(event: str, args: tuple) -> None:
        if watching and "passwd" in repr(args):
            touched.append(f"{event}{args!r}")

    watching = True
    sys.addaudithook(audit)  # audit hooks cannot be removed; this one goes quiet when the test ends
    try:
        for route, body in (("/v1/completions", {"prompt": "a"}), ("/v1/chat/completions", {"messages": MESSAGES})):
            response = http.post(route, json={"model": "../../etc/passwd", **body})
            error = assert_error(response, 400, "'../../etc/passwd' is not served here", "model")
            assert error["code"] == "model_not_found"
    finally:
        watching = False
    assert touched == []


def test_unknown_params_are_ignored_and_named(http):
    body = {"model": "tiny", "prompt": "def", "max_tokens": 2, "logit_bias": {"5": 1}, "frobnicate": True,
            "bad\r\nname": 1, "user": "someone"}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-lmforge-ignored-params"] == "logit_bias,frobnicate,bad%0D%0Aname"
    assert "x-lmforge-ignored-params" not in http.post("/v1/completions", json={
        "model": "tiny", "prompt": "def", "max_tokens": 2, "user": "someone"}).headers
    error = http.post("/v1/completions", json={**body, "model": "nope"})  # errors name them too
    assert error.status_code == 400 and error.headers["x-lmforge-ignored-params"].startswith("logit_bias")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/engines"), 404, "no route /v1/engines")
    assert_error(http.post("/health"), 405, "does not take POST")
    assert_error(http.get("/v1/completions"), 405, "does not take GET")


def test_a_bug_is_a_500_error_object_and_the_server_lives_on(http, engine, monkeypatch, caplog):
    def broken() -> dict:
        raise RuntimeError("a bug")

    monkeypatch.setattr(engine, "stats", broken)
    error = assert_error(http.get("/health"), 500, "internal server error")
    assert error["type"] == "internal_server_error" and "a bug" in caplog.text  # logged, not shown to clients
    monkeypatch.undo()
    assert http.get("/health").json()["status"] == "ok"


def test_huge_bodies_get_413(http):
    big = b'{"model": "tiny", "prompt": "' + b"a" * 10_000_000 + b'"}'
    assert_error(http.post("/v1/completions", content=big), 413, "over this server's limit")

    def chunks():  # no Content-Length: the server counts bytes as they arrive
        for _ in range(30):
            yield b"a" * 100_000

    assert_error(http.post("/v1/completions", content=chunks()), 413, "over this server's limit")
    assert http.get("/health").status_code == 200


def test_api_keys(engine):
    with running(create_app(engine, api_keys={"k"})) as base, httpx.Client(base_url=base) as h:
        body = {"model": "tiny", "prompt": "def", "max_tokens": 2}
        error = assert_error(h.post("/v1/completions", json=body), 401, "API key")
        assert error["type"] == "authentication_error"
        assert_error(h.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401, "API key")
        assert_error(h.get("/v1/models", headers={"Authorization": "k"}), 401, "API key")
        assert h.get("/health").status_code == 200 and h.get("/metrics").status_code == 200  # open for probes
        ok = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0)
        assert ok.completions.create(**body).choices[0].finish_reason == "length"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()


def test_overload_gets_429_with_retry_after(trained_run):
    """One row, one queue place: one request runs; of four more, one times out waiting and three are refused."""
    body = {"model": "tiny", "prompt": "def", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    async def flood(engine: Engine, base: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=30) as h:
            first = asyncio.create_task(h.post("/v1/completions", json=body))
            while engine.stats()["running"] == 0:  # it holds the row: now the queue place is the only one left
                await asyncio.sleep(0.01)
            rest = await asyncio.gather(*(h.post("/v1/completions", json={**body, "stream": True})
                                          for _ in range(4)))  # a stream's 429 comes before its first chunk
            return [await first, *rest]

    with slow_server(trained_run[0], max_concurrency=1, max_queue=1, queue_timeout=0.2) as (engine, base):
        responses = asyncio.run(flood(engine, base))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 429, 429, 429, 429], [r.text for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert all(r.headers["retry-after"] == "1" for r in refused)
    errors = [assert_error(r, 429, "overloaded|capacity") for r in refused]
    assert all(e["type"] == "rate_limit_error" for e in errors)
    assert sorted((e["code"], "waited" in e["message"]) for e in errors) == \
        [("overloaded", False)] * 3 + [("queue_timeout", True)]  # one timed out in the queue; three found it full


def test_client_leaving_a_stream_frees_its_slot(trained_run):
    body = {"model": "tiny", "prompt": "def", "max_tokens": None, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with slow_server(trained_run[0]) as (engine, base), httpx.Client(base_url=base) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["object"] == "text_completion"
            assert engine.stats()["running"] == 1
        assert wait_until(lambda: engine.stats()["running"] == 0 and cancelled(engine) == 1)
        assert engine.generate("def", SamplingParams(max_tokens=2)).usage.completion_tokens == 2  # still serving


def test_client_leaving_a_plain_request_frees_its_slot(trained_run):
    body = {"model": "tiny", "prompt": "def", "max_tokens": None, "temperature": 0, "ignore_eos": True}
    with slow_server(trained_run[0]) as (engine, base):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, timeout=0.3)
        assert wait_until(lambda: engine.stats()["running"] == 0 and cancelled(engine) == 1)
        count = engine.metrics.registry.get_sample_value
        assert count("lmforge_requests_total", {"route": "/v1/completions", "status": "499"}) == 1


def test_hundreds_of_concurrent_connections(http, url, engine):
    body = {"model": "tiny", "prompt": "def", "max_tokens": 2, "temperature": 0}

    async def crowd() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as h:
            return await asyncio.gather(*(h.post("/v1/completions", json=body) for _ in range(200)))

    responses = asyncio.run(crowd())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= engine.slots, sorted(set(statuses))
    for refused in (r for r in responses if r.status_code == 429):
        assert assert_error(refused, 429, "at capacity")["code"] == "overloaded" and refused.headers["retry-after"]
    assert http.get("/health").json()["status"] == "ok"
    assert wait_until(lambda: engine.stats() == {"running": 0, "waiting": 0, "slots": engine.slots})
    assert http.post("/v1/completions", json=body).status_code == 200


def test_64_simultaneous_streams_equal_each_request_alone(trained_run):
    engine = new_engine(trained_run[0], max_concurrency=64, max_queue=64)
    prompts = [f"def {a}_{b}(" for a in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")
               for b in ("alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta")]
    params = SamplingParams(max_tokens=24, temperature=0)
    try:
        alone = [engine.generate(p, params).texts[0] for p in prompts]
        slow_down(engine, 0.01)  # each stream now lasts 0.24 s or more: they must overlap to pass the peak below
        with running(create_app(engine)) as base:
            client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)

            async def stream(prompt: str) -> tuple[str, str | None]:
                text, reason = "", None
                async for chunk in await client.completions.create(model="tiny", prompt=prompt, max_tokens=24,
                                                                   temperature=0, stream=True):
                    text += chunk.choices[0].text
                    reason = chunk.choices[0].finish_reason or reason
                return text, reason

            async def all_at_once():
                results = await asyncio.gather(*(stream(p) for p in prompts))
                await client.close()
                return results

            peak, done = [0], threading.Event()

            def watch() -> None:  # how many decode together: the requests must overlap, not run in turn
                while not done.is_set():
                    peak[0] = max(peak[0], engine.stats()["running"])
                    time.sleep(0.001)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                together = asyncio.run(all_at_once())
            finally:
                done.set()
                watcher.join()
        assert len(together) == 64 and all(reason in ("stop", "length") for _, reason in together)
        assert peak[0] >= 32, peak
        assert [text for text, _ in together] == alone
    finally:
        engine.stop()


def test_metrics_count_every_response(http, engine):
    http.post("/v1/completions", json={"model": "tiny", "prompt": "def", "max_tokens": 1})
    http.post("/v1/completions", content=b"{")
    http.get("/no/such/route")
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")
    count = engine.metrics.registry.get_sample_value
    assert count("lmforge_requests_total", {"route": "/v1/completions", "status": "200"}) >= 1
    assert count("lmforge_requests_total", {"route": "/v1/completions", "status": "400"}) >= 1
    assert count("lmforge_requests_total", {"route": "other", "status": "404"}) >= 1


def scraped(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """GET /metrics, parsed: {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(http.get("/metrics").text) for s in family.samples}


def test_metrics_report_tokens_latencies_queue_and_energy(trained_run):
    """One row: while the first request runs, the second waits (queue depth 1); afterwards /metrics holds the two
    requests' tokens, one TTFT and one latency each, a gap per later token, and their FLOPs and energy."""
    body = {"model": "tiny", "prompt": "def alpha", "max_tokens": 48, "temperature": 0, "ignore_eos": True}
    with slow_server(trained_run[0], max_concurrency=1, max_queue=4) as (_, base), \
            httpx.Client(base_url=base, timeout=30) as http, ThreadPoolExecutor(2) as pool:
        assert scraped(http)[("lmforge_sequence_slots", ())] == 1
        first = pool.submit(http.post, "/v1/completions", json=body)
        assert wait_until(lambda: scraped(http)[("lmforge_running_sequences", ())] == 1)
        second = pool.submit(http.post, "/v1/completions", json={**body, "prompt": "import os"})
        assert wait_until(lambda: scraped(http)[("lmforge_queue_depth", ())] == 1)
        usages = [f.result().json()["usage"] for f in (first, second)]
        assert wait_until(lambda: scraped(http)[("lmforge_running_sequences", ())] == 0)
        metrics = scraped(http)

    def value(name: str, **labels: str) -> float:
        return metrics[(name, tuple(sorted(labels.items())))]

    assert value("lmforge_queue_depth") == 0
    assert value("lmforge_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert value("lmforge_completion_tokens_total") == 96
    assert value("lmforge_time_to_first_token_seconds_count") == 2
    assert value("lmforge_request_latency_seconds_count") == 2
    assert value("lmforge_inter_token_latency_seconds_count") == 94  # every token after a request's first
    assert value("lmforge_inter_token_latency_seconds_bucket", le="0.01") == 0  # each step sleeps 0.02 s here
    assert value("lmforge_flops_total") == pytest.approx(sum(u["lmforge"]["flops"] for u in usages))
    assert value("lmforge_device_seconds_total") > 0
    assert value("lmforge_energy_joules_total", source="estimate") == pytest.approx(
        sum(u["lmforge"]["energy_joules"] for u in usages))


# ---- the CLI ------------------------------------------------------------------------------------------------


def test_serve_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--ckpt", "--host", "--port", "--api-key-file", "--max-concurrency", "--max-queue",
                 "--queue-timeout", "--kv-cache-mb", "--max-body-mb", "--device", "--model-name"):
        assert flag in text


def test_serve_bad_input(trained_run, tmp_path, capsys):
    cli = CLI(trained_run[0], capsys)

    def refused(pattern: str, *args: str) -> None:
        expect_one_line_error(*cli("serve", "--ckpt", "tiny", *args)[::2], pattern, only_line=True)

    refused("cannot read --api-key-file .*missing.txt", "--api-key-file", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("# no keys yet\n\n")
    refused("holds no key", "--api-key-file", str(tmp_path / "empty.txt"))
    refused("--max-concurrency", "--max-concurrency", "0")
    refused("--port", "--port", "70000")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        refused("cannot listen on 127.0.0.1:.*pick another --port", "--port", str(busy.getsockname()[1]))


@contextlib.contextmanager
def serve_process(workspace: Path, *args: str) -> Iterator[tuple[str, str, dict]]:
    """`lmforge serve --ckpt tiny --port 0 ARGS` in a subprocess; yields (base URL, its 'serving' line, a dict
    that holds its exit code and stderr once the block ends with SIGTERM)."""
    with lmforge_process(workspace, ["serve", "--ckpt", "tiny", "--port", "0", *args], "serving") as (line, ended):
        yield re.search(r"at (http://\S+/v1)", line).group(1), line, ended


@pytest.mark.parametrize("engine_process", ["off", "on"])
def test_serve_cli_records_a_ledger_run(trained_run, tmp_path, engine_process):
    """`lmforge serve` for real (compiled, bursts, speculation): answers as the plain engine does, stops on
    SIGTERM (as on Ctrl-C) with exit 0, leaves a completed run; with the engine in its own process, that process
    writes the request rows the summary counts."""
    workspace = trained_run[0]
    keys = tmp_path / "keys.txt"
    keys.write_text("secret-key\n")
    with serve_process(workspace, "--api-key-file", str(keys), "--max-concurrency", "2", "--decode-steps", "4",
                       "--engine-process", engine_process) as (base, line, ended):
        assert "context 64, 2 slots, speculating at up to 2 sequences" in line and "energy:" in line
        assert ("engine in process" in line) == (engine_process == "on")
        client = openai.OpenAI(base_url=base, api_key="secret-key", max_retries=0)
        response = client.completions.create(model="tiny", prompt="def", max_tokens=12, temperature=0)
        assert response.usage.completion_tokens == 12
    err = ended["stderr"]
    assert ended["returncode"] == 0, err
    assert "served 1 requests" in err
    run = next(r for r in Ledger(workspace / "ledger.db").list_runs() if r["kind"] == "serve")
    assert run["status"] == "completed" and run["name"].startswith("serve-tiny-")
    assert run["summary"]["requests"] == 1 and run["summary"]["completion_tokens"] == 12
    engine = new_engine(workspace)  # eager, one token per step, in this process: the same text
    try:
        assert response.choices[0].text == engine.generate("def", SamplingParams(max_tokens=12, temperature=0)).texts[0]
    finally:
        engine.stop()
    assert run["config"]["max_concurrency"] == 2 and "secret-key" not in json.dumps(run["config"])
    assert run["config"]["speculate"] == 4 and run["config"]["speculate_max_batch"] == 0  # 0: auto
    assert run["config"]["engine_process"] == (engine_process == "on")
