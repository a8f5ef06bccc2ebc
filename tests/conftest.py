"""Shared fixtures: a small learnable corpus, a prepared workspace, one tiny trained run, a CLI runner."""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ["COLUMNS"] = "200"  # rich tables are as wide as a terminal; tests are not one
from lmforge.cli import main

REPO = Path(__file__).resolve().parents[1]

# The tiny debug config: one block, 64 wide; trains in seconds on a CPU.
TINY = {
    "model.depth": "1", "model.aspect_ratio": "64", "model.head_dim": "32", "model.seq_len": "64",
    "tokenizer.vocab_size": "384", "train.batch_size": "8", "train.eval_batches": "4", "train.log_every": "5",
    "train.warmup_steps": "5", "train.threads": "2",
}


def flags(settings: dict[str, str]) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key}", str(value))]


def write_learnable_corpus(root: Path, n_files: int = 60, seed: int = 0) -> Path:
    """Python-like files built from a few templates: easy to learn, far from a unigram distribution."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    ops = ["+", "-", "*"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f'"""Module {i}."""', ""]
        for _ in range(rng.randint(6, 12)):
            a, b = rng.sample(names, 2)
            op = rng.choice(ops)
            n = rng.randint(1, 9)
            lines += [f"def {a}_{b}({a}, {b}):", f"    total = {a} {op} {b}", f"    return total {op} {n}", ""]
        (root / f"mod_{i:03d}.py").write_text("\n".join(lines))
    return root


def wait_until(condition, seconds: float = 3.0) -> bool:
    """Poll `condition` until it holds or `seconds` pass; its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def slow_down(engine, seconds: float) -> None:
    """Add `seconds` to each forward pass of a serving engine, so its requests run long enough to be overlapped,
    queued or interrupted (the tiny model otherwise answers a full context in a fraction of a second)."""
    forward = engine.model.forward

    def slow_forward(*args, **kwargs):
        time.sleep(seconds)
        return forward(*args, **kwargs)

    engine.model.forward = slow_forward


def expect_one_line_error(code: int, err: str, pattern: str, *, only_line: bool = False) -> None:
    """A user error: exit 2, no traceback, and a last line 'error: ...' matching `pattern` (the only line when
    only_line)."""
    import re

    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), err
    assert not only_line or len(lines) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, " ".join(lines[-1:])), f"{pattern!r} not in {lines[-1]!r}"


class CLI:
    """Runs `lmforge` in-process against one workspace; returns (exit code, stdout, stderr)."""

    def __init__(self, workspace: Path, capsys):
        self.workspace, self.capsys = workspace, capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = main(["--workspace", str(self.workspace), *args])
        out, err = self.capsys.readouterr()
        return code, out, err


@contextlib.contextmanager
def lmforge_process(workspace: Path, args: list[str], ready: str, stop: int = signal.SIGTERM
                    ) -> Iterator[tuple[str, dict]]:
    """`lmforge ARGS` in a subprocess, waited for until a stderr line contains `ready`; yields (that line, a dict
    that holds its exit code and stderr once the block ends by sending `stop`)."""
    env = {**os.environ, "LMFORGE_HOME": str(workspace), "COLUMNS": "200"}
    process = subprocess.Popen([sys.executable, "-m", "lmforge", *args], env=env, stderr=subprocess.PIPE, text=True)
    ended: dict = {}
    try:
        selector = selectors.DefaultSelector()
        selector.register(process.stderr, selectors.EVENT_READ)
        line, deadline = "", time.monotonic() + 60
        while ready not in line:
            assert time.monotonic() < deadline, f"lmforge {args[0]} printed no {ready!r} line within 60 s"
            if not selector.select(timeout=1):  # nothing to read yet
                continue
            line = process.stderr.readline()
            assert line or process.poll() is None, f"lmforge {args[0]} exited early"
        yield line, ended
    finally:
        process.send_signal(stop)
        _, ended["stderr"] = process.communicate(timeout=30)
        ended["returncode"] = process.returncode


def run_subprocess(workspace: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMFORGE_HOME": str(workspace), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "lmforge", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    return write_learnable_corpus(tmp_path_factory.mktemp("corpus") / "src")


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus_dir) -> tuple[Path, list[str]]:
    """A workspace with the tiny corpus built, a tokenizer trained and shards prepared; plus the data flags."""
    workspace = tmp_path_factory.mktemp("ws")
    data = flags({"data.source": str(corpus_dir), "data.val_fraction": "0.1", **TINY})
    threads = torch.get_num_threads()
    for verb in (["corpus", "build"], ["tokenizer", "train"], ["prepare"]):
        assert main(["--workspace", str(workspace), *verb, *only(data, verb[0])]) == 0
    torch.set_num_threads(threads)
    return workspace, data


def only(data_flags: list[str], verb: str) -> list[str]:
    """The subset of flags a data verb accepts."""
    sections = {"corpus": ("--data.",), "tokenizer": ("--data.", "--tokenizer."), "prepare": ("--data.", "--tokenizer.")}
    keep = sections.get(verb)
    if keep is None:
        return data_flags
    pairs = list(zip(data_flags[::2], data_flags[1::2]))
    return [x for k, v in pairs if k.startswith(keep) for x in (k, v)]


@pytest.fixture(scope="session")
def trained_run(prepared) -> tuple[Path, str, list[str]]:
    """One tiny run (40 steps, checkpoints every 20) shared by the eval/generate/error tests."""
    workspace, data = prepared
    assert main(["--workspace", str(workspace), "train", *data, "--name", "tiny", "--train.max_steps", "40",
                 "--train.checkpoint_every", "20", "--train.eval_every", "20"]) == 0
    return workspace, "tiny", data


@pytest.fixture
def cli(tmp_path, capsys) -> CLI:
    return CLI(tmp_path / "ws", capsys)
