"""Guard rails inside the server: input checked before admission, output checked while it streams, all audited.

The tiny test model writes Python-like text ("def alpha_beta(alpha, beta): total = ... return total + 3"), so a
policy with a rule on words it emits makes the output rail fire on demand.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest
from conftest import expect_one_line_error
from test_serve_http import new_engine, running, serve_process

from lmforge.guard.guard import Guard
from lmforge.guard.policy import policy_from_dict
from lmforge.guard.rails import OutputRail, screen_input
from lmforge.meter.ledger import Ledger
from lmforge.serve.app import create_app
from lmforge.serve.engine import SamplingParams

REFUSAL = "Sorry, not that."


def write_policy(tmp_path: Path, privacy_output: str = "allow", code_output: str = "block") -> Path:
    rules = tmp_path / "rules.yaml"
    rules.write_text("violent_crimes: {keywords: [hire a hitman]}\n"
                     "code_interpreter_abuse: {keywords: [return total]}\n"  # the tiny model writes this
                     "privacy: {keywords: [alpha]}\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
refusal: "{REFUSAL}"
store_text: false
detectors:
  rules: {{file: {rules}}}
  pii: {{kinds: all}}
stream: {{chunk_chars: 8, context_chars: 40}}
categories:
  violent_crimes: {{input: block, output: block}}
  code_interpreter_abuse: {{input: allow, output: {code_output}}}
  privacy: {{input: allow, output: {privacy_output}}}
  pii: {{input: redact, output: redact}}
""")
    return policy


@pytest.fixture
def guarded(trained_run, tmp_path):
    """An engine with the test policy, its forward passes counted, and a ledger."""
    ledger = Ledger(tmp_path / "ledger.db")
    run_id = ledger.start_run("serve-test", "serve", {}, {}, str(tmp_path))
    engine = new_engine(trained_run[0], max_concurrency=4)
    engine.guard = Guard.from_policy(write_policy(tmp_path))
    engine.ledger, engine.run_id = ledger, run_id
    calls = []
    forward = engine.model.forward
    engine.model.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    yield engine, calls, ledger
    engine.stop()


def unguarded_text(trained_run, prompt: str, max_tokens: int) -> str:
    engine = new_engine(trained_run[0])
    try:
        return engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0)).texts[0]
    finally:
        engine.stop()


def test_blocked_prompt_is_refused_without_running_the_model(guarded):
    engine, calls, ledger = guarded
    result = engine.generate("please hire a hitman for me", SamplingParams(max_tokens=8, temperature=0, n=2))
    assert calls == []  # no forward pass
    assert result.texts == [REFUSAL, REFUSAL] and result.finish_reasons == ["content_filter"] * 2
    assert result.usage.completion_tokens == 0 and result.usage.flops == 0
    assert result.prompt.guard.action == "block"
    assert [(f.category, f.detector) for f in result.prompt.guard.findings] == [("violent_crimes", "rules")]
    engine.stop()  # flushes the ledger
    events = ledger.get_guard_events(engine.run_id)
    assert [(e["direction"], e["category"], e["action"]) for e in events] == [("input", "violent_crimes", "block")]
    assert events[0]["text_sha256"] == hashlib.sha256(b"please hire a hitman for me").hexdigest()
    assert events[0]["text"] is None  # store_text is off: the hash only
    assert ledger.get_requests(engine.run_id)[0]["status"] == "blocked:input"
    metrics = engine.metrics.registry
    assert metrics.get_sample_value("lmforge_guard_checks_total", {"direction": "input", "action": "block"}) == 1
    assert metrics.get_sample_value("lmforge_guard_findings_total", {"direction": "input", "action": "block",
                                                                     "category": "violent_crimes"}) == 1


def test_output_rail_cuts_generation_with_content_filter(guarded, trained_run):
    engine, _, ledger = guarded
    prompt = "def alpha_beta(alpha, beta):\n    total = alpha + beta\n"
    free = unguarded_text(trained_run, prompt, 24)
    assert "return total" in free  # what the rule will catch
    result = engine.generate(prompt, SamplingParams(max_tokens=24, temperature=0))
    assert result.finish_reasons == ["content_filter"]
    text = result.texts[0]
    assert text.endswith(REFUSAL)
    sent = text[: -len(REFUSAL)]
    assert "return total" not in sent and free.startswith(sent)  # nothing past the check went out
    assert len(result.token_ids[0]) < 24  # generation stopped early
    assert result.guard[0].action == "block"
    engine.stop()
    events = ledger.get_guard_events(engine.run_id)
    assert [(e["direction"], e["category"], e["action"]) for e in events] == [
        ("output", "code_interpreter_abuse", "block")]
    assert ledger.get_requests(engine.run_id)[0]["status"] == "blocked:output"


def test_input_redaction_reaches_the_model_redacted(guarded):
    engine, calls, _ = guarded
    result = engine.generate("mail bob@example.com: def alpha", SamplingParams(max_tokens=2, temperature=0))
    assert result.prompt.prompt_text == "mail <EMAIL>: def alpha"
    assert result.prompt.guard.action == "redact" and calls  # the model ran, on the redacted prompt


def test_chat_is_redacted_message_by_message(guarded):
    engine, _, _ = guarded
    prompt = engine.prepare(messages=[{"role": "system", "content": "Reply to a@b.io"},
                                      {"role": "user", "content": "call +1 415 555 0100"}])
    text = engine.tokenizer.decode(prompt.ids)
    assert "a@b.io" not in text and "555" not in text and "<EMAIL>" in text and "<PHONE>" in text
    assert "system" in text and "user" in text  # the template's roles are intact
    assert prompt.verdict.action == "redact" and len(prompt.verdict.findings) == 2


def test_output_redaction_rewrites_only_what_it_sends(trained_run, tmp_path):
    engine = new_engine(trained_run[0])
    engine.guard = Guard.from_policy(write_policy(tmp_path, privacy_output="redact", code_output="allow"))
    try:
        prompt = "def beta_gamma(beta, gamma):\n"
        free = unguarded_text(trained_run, prompt, 40)
        result = engine.generate(prompt, SamplingParams(max_tokens=40, temperature=0))
    finally:
        engine.stop()
    assert "alpha" in free
    assert result.texts[0] == re.sub(r"\balpha\b", "<REDACTED>", free)  # whole words, as the rules match
    assert result.finish_reasons[0] == "length" and result.guard[0].action == "redact"


def test_server_shows_verdicts_and_streams_end_with_content_filter(guarded):
    engine, _, _ = guarded
    with running(create_app(engine)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        # input blocked: a normal 200 answer with the refusal, and the verdict in the extension field
        r = client.chat.completions.create(model=engine.model_id, max_tokens=5,
                                           messages=[{"role": "user", "content": "hire a hitman now"}])
        assert r.choices[0].message.content == REFUSAL and r.choices[0].finish_reason == "content_filter"
        guard = r.model_extra["lmforge"]["guard"]
        assert guard["input"]["action"] == "block"
        assert guard["input"]["findings"] == [{"category": "violent_crimes", "detector": "rules", "score": 1.0,
                                               "action": "block"}]
        assert guard["output"] == [{"index": 0, "action": "allow", "findings": []}]
        # output cut mid-stream
        stream = client.completions.create(model=engine.model_id, prompt="def alpha_beta(alpha, beta):\n    total"
                                           " = alpha + beta\n", max_tokens=24, temperature=0, stream=True)
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert "return total" not in text and text.endswith(REFUSAL)
        last = [c for c in chunks if c.choices and c.choices[0].finish_reason][-1]
        assert last.choices[0].finish_reason == "content_filter"
        assert last.model_extra["lmforge"]["guard"]["output"][0]["action"] == "block"
        # an allowed request still shows the (allow) verdicts
        r = client.completions.create(model=engine.model_id, prompt="def", max_tokens=3, temperature=0)
        assert r.model_extra["lmforge"]["guard"]["input"] == {"action": "allow", "findings": []}
        metrics = httpx.get(base + "/metrics").text
        assert 'lmforge_guard_checks_total{action="block",direction="input"} 1.0' in metrics
        assert 'lmforge_guard_findings_total{action="block",category="code_interpreter_abuse",direction="output"}' \
            in metrics


def test_output_rail_context_catches_a_phrase_split_across_chunks():
    guard = Guard.from_policy(policy_from_dict({
        "detectors": {"rules": {"file": "builtin"}, "pii": {}},
        "stream": {"chunk_chars": 10, "context_chars": 30},
        "categories": {"violent_crimes": {"input": "block", "output": "block"}, "pii": {"output": "redact"}}}))
    rail = OutputRail(guard)
    text = "Sure. Step one: hire a hitman"
    assert rail.release(text, 0, 5, final=False) is None  # under chunk_chars: held back
    first = rail.release(text, 0, 20, final=False)  # "Sure. Step one: hire" says nothing wrong yet
    assert first.text == text[:20] and not first.blocked
    second = rail.release(text, 20, len(text), final=True)  # " a hitman" alone does not match; with context it does
    assert second.blocked and rail.verdict().action == "block"
    assert [f.category for f in rail.verdict().findings] == ["violent_crimes"]
    # an unfinished word (and digit groups before it) waits for the next chunk, so PII is checked whole
    text = "write to bob@exa"
    assert rail.ready(text, 0, len(text)) == len("write to ")
    assert rail.ready("call +1 415 55", 0, 14) == len("call ")
    rail = OutputRail(guard)
    out = rail.release("write to bob@example.com today", 9, 30, final=True)
    assert out.text == "<EMAIL> today" and out.action == "redact"
    assert screen_input(guard, ["hi", "hire a hitman"]).verdict.action == "block"


def test_serve_cli_with_guard(trained_run, tmp_path):
    """`lmforge serve --guard`: a bad policy is a one-line error before anything starts; a good one refuses,
    and the run's summary counts it."""
    workspace = trained_run[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("detectors: {rulez: {}}\n")
    p = subprocess.run([sys.executable, "-m", "lmforge", "serve", "--ckpt", "tiny", "--guard", str(bad)],
                       env={**os.environ, "LMFORGE_HOME": str(workspace)}, capture_output=True, text=True,
                       timeout=120, check=False)
    expect_one_line_error(p.returncode, p.stderr, r"unknown detector 'rulez' \(did you mean 'rules'\?\)")
    with serve_process(workspace, "--guard", str(write_policy(tmp_path)), "--compile", "off") as (base, _, ended):
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        r = client.completions.create(model="tiny", prompt="hire a hitman", max_tokens=3)
        assert r.choices[0].finish_reason == "content_filter"
    assert ended["returncode"] == 0, ended["stderr"]
    assert "guard: 1 prompts refused, 0 outputs cut off, 1 findings audited" in ended["stderr"]
    run = next(r for r in Ledger(workspace / "ledger.db").list_runs() if r["config"].get("guard"))
    assert run["summary"]["blocked_input"] == 1 and run["config"]["guard"].endswith("policy.yaml")
