"""The SQLite ledger: run lifecycle, metric overwrite on resume, crash detection, schema versions, concurrency."""

import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from lmforge.errors import LmforgeError
from lmforge.meter.ledger import MIGRATIONS, SCHEMA_VERSION, Ledger


def test_run_lifecycle(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    run_id = ledger.start_run("tiny", "train", {"model": {"depth": 2}, "path": tmp_path}, {"gpus": []}, "runs/tiny")
    run = ledger.get_run("tiny")
    assert run["id"] == run_id and run["status"] == "running" and run["kind"] == "train"
    assert run["config"] == {"model": {"depth": 2}, "path": str(tmp_path)} and run["hardware"] == {"gpus": []}
    assert run["summary"] == {} and run["run_dir"] == "runs/tiny" and run["ended_at"] is None

    ledger.heartbeat(run_id)
    ledger.log_metrics(run_id, 1, {"loss": 4.0, "lr": 1e-3})
    ledger.add_artifact(run_id, "checkpoint", tmp_path / "step_1", sha256="ab" * 32, nbytes=123)
    ledger.update_summary(run_id, {"tokens": 100, "energy_source": "estimate"})
    ledger.finish_run(run_id, "completed", summary={"tokens": 200, "kwh": 0.1})

    run = ledger.get_run(str(run_id))  # by id as well
    assert run["status"] == "completed" and run["ended_at"] >= run["created_at"]
    assert run["summary"] == {"tokens": 200, "energy_source": "estimate", "kwh": 0.1}
    artifact, = ledger.get_artifacts(run_id)
    assert (artifact["kind"], artifact["path"], artifact["bytes"]) == ("checkpoint", str(tmp_path / "step_1"), 123)
    with pytest.raises(LmforgeError, match="already"):
        ledger.start_run("tiny", "train", {}, {}, "runs/tiny")

    ledger.resume_run(run_id)
    assert ledger.get_run("tiny")["status"] == "running" and ledger.get_run("tiny")["ended_at"] is None
    ledger.finish_run(run_id, "interrupted", error="Ctrl-C")
    assert ledger.get_run("tiny")["error"] == "Ctrl-C"

    second = ledger.start_run("eval-1", "eval", {}, {}, "runs/eval-1")
    assert [r["id"] for r in ledger.list_runs()] == [second, run_id]
    assert [r["id"] for r in ledger.list_runs(limit=1)] == [second]


def test_unknown_run_names_the_closest(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.start_run("baseline-depth4", "train", {}, {}, "runs/a")
    with pytest.raises(LmforgeError, match=r"no run named 'baseline-depth5' \(did you mean 'baseline-depth4'\?\)"):
        ledger.get_run("baseline-depth5")


def test_metrics_overwrite_repeated_steps(tmp_path):
    ledger = Ledger(tmp_path / "ledger.db")
    run_id = ledger.start_run("r", "train", {}, {}, "runs/r")
    for step in range(1, 5):
        ledger.log_metrics(run_id, step, {"loss": 10.0 - step, "lr": 0.1})
    # resumed from a checkpoint at step 2: steps 3 and 4 run again and replace their first values
    ledger.log_metrics(run_id, 3, {"loss": 6.5, "lr": 0.1})
    ledger.log_metrics(run_id, 4, {"loss": float("nan"), "lr": 0.1})
    losses = ledger.get_metrics(run_id, "loss")
    assert [(s, v) for s, _, v in losses[:3]] == [(1, 9.0), (2, 8.0), (3, 6.5)]
    assert losses[3][0] == 4 and math.isnan(losses[3][2])
    assert len(ledger.get_metrics(run_id)) == 8


def test_killed_run_is_shown_crashed(tmp_path):
    db = tmp_path / "ledger.db"
    script = textwrap.dedent(f"""
        import time
        from lmforge.meter.ledger import Ledger
        run_id = Ledger({str(db)!r}).start_run("doomed", "train", {{}}, {{}}, "runs/doomed")
        print(run_id, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        run_id = int(child.stdout.readline())
        ledger = Ledger(db)
        assert ledger.get_run("doomed")["status"] == "running"  # alive: left alone
        child.send_signal(signal.SIGKILL)
        time.sleep(0.2)  # not reaped yet: the child is a zombie, which must count as dead
        run, = ledger.list_runs()
        assert run["id"] == run_id and run["status"] == "crashed" and "killed" in run["error"]
        assert run["ended_at"] == run["updated_at"]
    finally:
        child.kill()
        child.wait()
    assert ledger.mark_crashed_runs() == 0


def test_a_version_1_ledger_is_migrated_with_its_rows(tmp_path):
    """A ledger written before guard_events existed opens, keeps its runs, and gains the table."""
    path = tmp_path / "ledger.db"
    conn = sqlite3.connect(path)
    MIGRATIONS[0](conn)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO runs (name, kind, status, created_at, updated_at) VALUES ('old', 'train', "
                 "'completed', 1, 1)")
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    assert ledger.get_run("old")["status"] == "completed"
    ledger.log_guard_events(None, [{"created_at": 2.0, "request_id": "r", "direction": "input", "category": "hate",
                                    "detector": "rules", "score": 1.0, "action": "block", "text_sha256": "ab"}])
    assert ledger.get_guard_events()[0]["text"] is None


def test_newer_schema_is_a_clear_error(tmp_path):
    db = tmp_path / "ledger.db"
    Ledger(db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(LmforgeError, match=f"schema version {SCHEMA_VERSION + 1}, newer") as info:
        Ledger(db)
    assert "\n" not in str(info.value)


def test_not_a_database_is_a_clear_error(tmp_path):
    db = tmp_path / "ledger.db"
    db.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LmforgeError, match="cannot open the ledger"):
        Ledger(db)


def test_reader_and_writer_run_concurrently(tmp_path):
    db = tmp_path / "ledger.db"
    ledger = Ledger(db)
    run_id = ledger.start_run("busy", "train", {}, {}, "runs/busy")
    steps = 300
    script = textwrap.dedent(f"""
        import time
        from lmforge.meter.ledger import Ledger
        ledger = Ledger({str(db)!r})
        for step in range({steps}):
            time.sleep(0.001)  # a training step
            ledger.log_metrics({run_id}, step, {{"loss": 1.0 / (step + 1), "tokens": step * 64.0}})
            if step % 50 == 0:
                ledger.heartbeat({run_id})
        ledger.finish_run({run_id}, "completed", summary={{"steps": {steps}}})
    """)
    writer = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    seen = []
    while writer.poll() is None:  # read as fast as possible while it writes
        seen.append(len(ledger.get_metrics(run_id, "loss")))
        ledger.list_runs()
    assert writer.returncode == 0, writer.stderr.read()
    assert seen == sorted(seen)  # every read saw a consistent, growing prefix
    assert any(0 < n < steps for n in seen)  # and some saw the run half-way
    assert len(ledger.get_metrics(run_id, "loss")) == steps
    assert ledger.get_run("busy")["status"] == "completed"
