"""The CLI: help text, the verbs on a tiny run, and every bad input the foundation issue lists.

Each bad input must give a one-line error naming the problem, exit non-zero, print no traceback, and damage
nothing already on disk.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import CLI, expect_one_line_error, run_subprocess

from lmforge.cli import VERBS, main
from lmforge.config import iter_fields
from lmforge.meter.ledger import Ledger


def test_help_lists_every_verb(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for verb in VERBS:
        assert verb in text


def test_train_help_documents_every_field(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for section, f in iter_fields():
        flag = f"--{section}.{f.name}" if section else f"--{f.name}"
        assert flag in text
        assert " ".join(f.metadata["doc"].split())[:40] in text


def test_verbs_on_a_trained_run(trained_run, capsys):
    workspace, run, data = trained_run
    cli = CLI(workspace, capsys)
    code, out, _ = cli("runs")
    assert code == 0 and run in out and "completed" in out
    code, out, _ = cli("runs", "show", run)
    assert code == 0 and "val bpb" in out and "compute summary" in out and "estimate" in out.lower()
    code, out, _ = cli("eval", "--ckpt", run, "--batches", "2")
    assert code == 0 and "val bpb" in out
    code, out, _ = cli("generate", "--ckpt", run, "def alpha", "--max-new-tokens", "20", "--seed", "1")
    assert code == 0 and out.startswith("def alpha") and len(out) > len("def alpha") + 5
    again = cli("generate", "--ckpt", run, "def alpha", "--max-new-tokens", "20", "--seed", "1")[1]
    assert again == out  # seeded sampling repeats
    code, out, _ = cli("corpus", "show", "src")
    assert code == 0 and "documents" in out
    eval_run = Ledger(workspace / "ledger.db").list_runs()[0]
    assert eval_run["kind"] == "eval"
    code, out, _ = cli("runs", "show", str(eval_run["id"]))
    assert code == 0 and "val_bpb" in out


def test_summary_without_a_known_price_or_peak(capsys):
    from lmforge.cli.runs import print_summary

    print_summary("x", {"steps": 3, "tokens": 30, "cost_usd": None, "price_per_hour": None, "mfu": None,
                        "kwh": 0.001, "co2_kg": 0.0005, "carbon_g_per_kwh": 475, "energy_label": "ESTIMATE"})
    out = capsys.readouterr().out
    assert "no price known" in out and "unknown peak" in out


# --- bad input -----------------------------------------------------------------------------------------------

def test_missing_corpus_path(cli):
    expect_one_line_error(*cli("corpus", "build", "--data.source", "/no/such/dir")[::2], r"does not exist")


def test_empty_corpus_dir(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    expect_one_line_error(*cli("corpus", "build", "--data.source", str(tmp_path / "empty"))[::2], r"no text documents")


def test_corpus_without_text(cli, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    (src / "a.bin").write_bytes(b"\x00\x01\x02" * 100)
    (src / "b.txt").write_text("   \n")
    expect_one_line_error(*cli("corpus", "build", "--data.source", str(src))[::2], r"no text documents.*binary")


def test_vocab_too_large_for_token_dtype(cli):
    code, _, err = cli("prepare", "--tokenizer.vocab_size", "70000", "--data.token_dtype", "uint16")
    expect_one_line_error(code, err, r"does not fit --data.token_dtype uint16")


def test_config_typo_on_command_line(cli):
    expect_one_line_error(*cli("train", "--model.dept", "3")[::2], r"unknown option --model.dept; did you mean --model.depth")


def test_config_typo_in_yaml(cli, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  max_step: 10\n")
    expect_one_line_error(*cli("train", "--config", str(path))[::2], r"unknown config key 'train.max_step'.*'train.max_steps'")


def test_resume_without_checkpoint(prepared, capsys):
    workspace, data = prepared
    cli = CLI(workspace, capsys)
    expect_one_line_error(*cli("train", "--resume", "never-ran")[::2], r"no run named 'never-ran' to resume")
    (workspace / "runs" / "hollow").mkdir(parents=True)
    (workspace / "runs" / "hollow" / "config.yaml").write_text("name: hollow\ntrain:\n  max_steps: 5\n")
    expect_one_line_error(*cli("train", "--resume", "hollow")[::2], r"has no checkpoint to resume from")


def folder_digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_checkpoint_from_a_different_shape(trained_run, capsys):
    workspace, run, data = trained_run
    copy = workspace / "runs" / "tiny-copy"
    shutil.copytree(workspace / "runs" / run, copy)
    before = folder_digest(copy)
    cli = CLI(workspace, capsys)
    code, _, err = cli("train", "--resume", "tiny-copy", "--model.depth", "2", "--train.max_steps", "60")
    expect_one_line_error(code, err, r"different model shape .*n_layer 1 vs 2")
    assert folder_digest(copy) == before  # nothing damaged


def test_failed_rebuild_leaves_the_corpus_intact(prepared, capsys):
    workspace, _ = prepared
    corpus = workspace / "corpora" / "src"
    before = folder_digest(corpus)
    code, _, err = CLI(workspace, capsys)("corpus", "build", "--data.source", "/no/such/dir", "--data.name", "src")
    expect_one_line_error(code, err, "does not exist")
    assert folder_digest(corpus) == before


def test_prompt_longer_than_context(trained_run, capsys):
    workspace, run, _ = trained_run
    code, _, err = CLI(workspace, capsys)("generate", "--ckpt", run, "alpha beta " * 200)
    expect_one_line_error(code, err, r"prompt has \d+ tokens but the model's context is 64")


def test_corrupted_checkpoint(trained_run, capsys):
    workspace, run, _ = trained_run
    copy = workspace / "runs" / "tiny-corrupt"
    shutil.copytree(workspace / "runs" / run, copy)
    last = sorted((copy / "checkpoints").glob("step_*"))[-1]
    weights = last / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x55
    weights.write_bytes(bytes(data))
    cli = CLI(workspace, capsys)
    expect_one_line_error(*cli("eval", "--ckpt", "tiny-corrupt")[::2], r"corrupted: model.safetensors fails its sha256")
    weights.write_bytes(bytes(data[:100]))
    expect_one_line_error(*cli("generate", "--ckpt", str(last), "x")[::2], r"has 100 bytes, expected \d+ \(truncated\?\)")


def test_truncated_and_corrupted_shard(prepared, tmp_path, capsys):
    workspace, data = prepared
    broken = tmp_path / "ws-broken"
    shutil.copytree(workspace, broken, ignore=shutil.ignore_patterns("runs", "ledger.db*"))
    shard = next((broken / "shards").iterdir()) / "train.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    cli = CLI(broken, capsys)
    code, _, err = cli("train", *data, "--train.max_steps", "2")
    expect_one_line_error(code, err, r"train.bin is \d+ bytes, expected \d+ \(truncated or overwritten\); re-run `lmforge prepare`")
    shutil.rmtree(broken / "shards")
    shutil.copytree(workspace / "shards", broken / "shards")
    data_bytes = bytearray(shard.read_bytes())
    data_bytes[10] ^= 0x01  # same size, different content
    shard.write_bytes(bytes(data_bytes))
    code, _, err = cli("train", *data, "--train.max_steps", "2")
    expect_one_line_error(code, err, r"train.bin has sha256 .* \(corrupted\); re-run `lmforge prepare`")


def test_user_errors_exit_nonzero_without_traceback_in_a_real_process(tmp_path):
    proc = run_subprocess(tmp_path, "corpus", "build", "--data.source", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
