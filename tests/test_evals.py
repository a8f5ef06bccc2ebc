"""lm-evaluation-harness: the shipped tasks through the lmforge adapter and through lm-eval's own local-completions
client against a live server give the same scores; `lmforge eval --tasks` prints and records them; bad input.

The server half runs exactly what docs/evaluation.md tells a user to run (`lm_eval --model local-completions
--model_args ...` is simple_evaluate with that model name and argument string), against a real uvicorn on
127.0.0.1 serving the tiny run, with the tokenizer from `lmforge export hf`. Nothing is downloaded: the tasks'
data ship with lmforge, and this machine could not reach the Hugging Face Hub anyway.
"""

from __future__ import annotations

import json

import pytest
from conftest import CLI, expect_one_line_error
from test_serve_http import new_engine, running

from lmforge.checkpoint import resolve_checkpoint
from lmforge.evals import LmforgeLM, evaluate_tasks, harness, shipped_tasks, task_scores
from lmforge.interop.hf import export_hf
from lmforge.meter.ledger import Ledger
from lmforge.serve.app import create_app

TASKS = ["lmforge_python", "lmforge_python_gen", "lmforge_python_ppl"]
LIMIT = 16  # documents per task: 64 scored continuations, 16 generations, 16 texts


@pytest.fixture(scope="module")
def both(trained_run, tmp_path_factory) -> tuple[dict, dict]:
    """lm-eval's results for the tiny run on TASKS: (through the adapter, through local-completions + server)."""
    workspace = trained_run[0]
    ckpt = resolve_checkpoint("tiny", workspace / "runs")
    adapter = evaluate_tasks(LmforgeLM(ckpt), TASKS, limit=LIMIT, log_samples=True)
    exported = export_hf(ckpt, tmp_path_factory.mktemp("hf") / "tiny")
    engine = new_engine(workspace)
    try:
        with running(create_app(engine)) as base:
            # max_length: the model's context (lm-eval's client assumes 2048 and would send prompts that do not fit)
            args = (f"base_url={base}/v1/completions,model={engine.model_id},tokenizer={exported},"
                    f"tokenizer_backend=huggingface,max_length={engine.context_len}")
            served = evaluate_tasks("local-completions", TASKS, model_args=args, limit=LIMIT, log_samples=True)
    finally:
        engine.stop()
    return adapter, served


def test_shipped_tasks_are_found_offline():
    assert shipped_tasks() == sorted(TASKS)


def test_adapter_and_live_server_agree(both):
    adapter, served = both
    for results in both:
        assert {task: n["effective"] for task, n in results["n-samples"].items()} == dict.fromkeys(TASKS, LIMIT)
    a, s = task_scores(adapter), task_scores(served)
    # Accuracy and exact match agree exactly: the same tokens go in, and every choice is an argmax over scores
    # that differ only by float rounding (the server's prefill attention is written out, the adapter's is SDPA)
    for task, metric in [("lmforge_python", "acc"), ("lmforge_python", "acc_norm"),
                         ("lmforge_python_gen", "exact_match")]:
        assert a[task][metric] == s[task][metric], (task, metric)
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert a["lmforge_python_ppl"][metric] == pytest.approx(s["lmforge_python_ppl"][metric], rel=1e-5)
    # document by document: the same generated text, log-likelihoods equal to 1e-4 nats (measured: <= 3.4e-5,
    # float32 sums of ~10-50 log-probabilities of magnitude 1-10)
    for task in TASKS:
        by_doc = {s["doc_id"]: s["filtered_resps"] for s in served["samples"][task]}
        for sample in adapter["samples"][task]:
            mine, theirs = sample["filtered_resps"], by_doc[sample["doc_id"]]
            if task == "lmforge_python_gen":
                assert mine == theirs
            elif task == "lmforge_python_ppl":
                assert float(mine[0]) == pytest.approx(float(theirs[0]), abs=1e-4)
            else:  # four (log-likelihood, is greedy) pairs
                assert [g for _, g in mine] == [g for _, g in theirs]
                assert [ll for ll, _ in mine] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)


def test_cli_prints_and_records_scores(both, trained_run, capsys):
    workspace = trained_run[0]
    cli = CLI(workspace, capsys)
    code, out, err = cli("eval", "--ckpt", "tiny", "--tasks", "lmforge_python", "--limit", "8", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["samples"] == {"lmforge_python": 8} and result["step"] == 40
    # the first 8 documents score as they did inside the 20 of the adapter run
    firsts = [s["acc"] for s in both[0]["samples"]["lmforge_python"] if s["doc_id"] < 8]
    assert result["scores"]["lmforge_python"]["acc"] == pytest.approx(sum(firsts) / 8)
    run = Ledger(workspace / "ledger.db").get_run(result["run"])
    assert run["kind"] == "eval" and run["status"] == "completed"
    assert run["summary"]["lm_eval"] == result["scores"] and run["summary"]["tasks"] == ["lmforge_python"]
    metrics = {name: value for _, name, value in Ledger(workspace / "ledger.db").get_metrics(run["id"])}
    assert metrics["lmforge_python/acc"] == result["scores"]["lmforge_python"]["acc"]

    code, out, _ = cli("eval", "--ckpt", "tiny", "--tasks", "lmforge_python_gen", "--limit", "2")
    assert code == 0 and "|lmforge_python_gen|" in out and "exact_match" in out and "recorded in the ledger" in out


def test_cli_bad_input(trained_run, capsys, monkeypatch):
    cli = CLI(trained_run[0], capsys)
    expect_one_line_error(*cli("eval", "--ckpt", "tiny", "--tasks", "lmforge_pyton")[::2],
                          r"unknown task 'lmforge_pyton'; did you mean lmforge_python")
    expect_one_line_error(*cli("eval", "--ckpt", "tiny", "--limit", "3")[::2], r"--limit counts documents of --tasks")
    expect_one_line_error(*cli("eval", "--ckpt", "tiny", "--tasks", "lmforge_python", "--batches", "2")[::2],
                          r"with --tasks use --limit N")
    expect_one_line_error(*cli("eval", "--ckpt", "tiny", "--tasks", "lmforge_python", "--limit", "0")[::2],
                          r"--limit must be at least 1, got 0")

    def offline(**_):  # what the Hub client raises offline for a data set it has not cached
        raise ConnectionError("Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(harness, "simple_evaluate", offline)
    expect_one_line_error(*cli("eval", "--ckpt", "tiny", "--tasks", "lmforge_python")[::2],
                          r"need a download that failed \(Couldn't reach 'allenai/ai2_arc'.*use a shipped task")
