"""The README's promises: its two commands come first and work, and every lmforge command it shows parses."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess

import pytest
from conftest import REPO

from lmforge.cli import build_parser, serve
from lmforge.meter.ledger import Ledger
from lmforge.serve.metrics import ServeMetrics

README = (REPO / "README.md").read_text()


def test_readme_starts_with_the_two_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    assert README.index("make demo") < 400


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()


def readme_commands() -> list[str]:
    """`lmforge ...` lines of the code blocks and `lmforge ...` inline code (the verb table)."""
    blocks = re.findall(r"```(?:bash)?\n(.*?)```", README, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    inline = [c.replace("\\|", "|") for c in re.findall(r"`(lmforge [^`]+)`", README)]
    return [line for line in lines if line.startswith("lmforge ")] + inline


def test_every_readme_command_parses():
    commands = readme_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        args, extra = parser.parse_known_args(argv)
        assert not extra, f"README command has unknown arguments {extra}: {command}"
        assert args.verb, command


def test_readme_lists_every_serve_flag_and_metric():
    """The serving section's flag table is `lmforge serve`'s flags, no more and no fewer; its metrics table names
    every metric the server exports."""
    section = README[README.index("## Serving"):README.index("## Guard")]
    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    flags = {option for action in parser._actions for option in action.option_strings if option != "--help"}
    table = set(re.findall(r"^\| `(--[a-z-]+)", section, flags=re.M))
    assert table == {flag for flag in flags if flag.startswith("--")}
    for family in ServeMetrics().registry.collect():
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"`{name}" in section, f"README's metrics table lacks {name}"


@pytest.mark.slow
def test_make_demo_runs_end_to_end(tmp_path):
    """`make demo` itself, shortened through ARGS: every stage runs on the real stdlib corpus."""
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path), "COLUMNS": "200"}
    args = ("--model.depth 1 --train.max_time 5 --train.eval_every 0 --train.checkpoint_every 0 "
            "--tokenizer.train_bytes 2000000 --tokenizer.vocab_size 1024")
    proc = subprocess.run(["make", "--no-print-directory", "demo", f"ARGS={args}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for needle in ("corpus stdlib", "validation split, all", "--- prompt 'def ' ---", "compute summary", "FLOPs",
                   "MFU", "energy", "cost", "CO2", "bits/byte", "ESTIMATE"):
        assert needle in out, needle
    runs = {r["kind"]: r for r in Ledger(tmp_path / "ledger.db").list_runs()}
    assert sorted(runs) == ["eval", "train"]
    assert runs["train"]["status"] == "completed" and runs["train"]["summary"]["tokens"] > 0
    assert runs["eval"]["summary"]["val_bpb"] > 0
