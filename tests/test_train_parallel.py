"""Data parallel training on Gloo (CPU): 2 ranks step like one process with the same global batch, and a
checkpoint written by 2 ranks resumes in 1.

Tolerance: per-step losses within 1e-5 relative. The only difference is arithmetic order: DDP sums each rank's
mean gradient over half the batch and halves it, one process takes the mean over the whole batch, and those
round differently in the last bits; over a dozen steps the largest gap measured here is 1.4e-7.
"""

from __future__ import annotations

import math
import shutil

import pytest
from conftest import run_subprocess
from test_train import losses

from lmforge.cli import main
from lmforge.meter.ledger import Ledger

STEPS = ["--train.max_steps", "12", "--train.eval_every", "0", "--train.threads", "1"]
TOLERANCE = 1e-5


def assert_same_losses(got: dict[int, float], want: dict[int, float]) -> None:
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=TOLERANCE), step


def test_two_ranks_match_one_process_and_resume_with_one(prepared):
    workspace, data = prepared
    assert main(["--workspace", str(workspace), "train", *data, "--name", "one", *STEPS,
                 "--train.batch_size", "8", "--train.checkpoint_every", "0"]) == 0
    p = run_subprocess(workspace, "train", *data, "--name", "two", *STEPS, "--train.batch_size", "4",
                       "--train.checkpoint_every", "6", "--nproc", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    one, two = losses(workspace, "one"), losses(workspace, "two")
    assert_same_losses(two, one)
    run = Ledger(workspace / "ledger.db").get_run("two")
    assert run["summary"]["world_size"] == 2 and run["summary"]["tokens"] == 12 * 8 * 64
    # as if killed after step 6: the checkpoint of 2 ranks x 4 rows resumes in 1 process x 8 rows
    shutil.rmtree(workspace / "runs" / "two" / "checkpoints" / "step_00000012")
    assert main(["--workspace", str(workspace), "train", "--resume", "two", "--train.batch_size", "8"]) == 0
    assert_same_losses(losses(workspace, "two"), one)


def test_nproc_bad_values(prepared, capsys):
    workspace, data = prepared
    assert main(["--workspace", str(workspace), "train", *data, "--nproc", "0"]) == 2
    assert "--nproc must be at least 1" in capsys.readouterr().err


def test_diloco_two_sites_keep_identical_global_weights(prepared):
    """2 sites of 1 rank, H = 3: after every outer step both replicas hold bit-identical global weights (the
    hash spread across ranks is exactly 0); the bytes each site sent match the bf16 all-gather of the model."""
    workspace, data = prepared
    p = run_subprocess(workspace, "train", *data, "--name", "sites", *STEPS, "--train.batch_size", "4",
                       "--train.checkpoint_every", "6", "--nproc", "2", "--sites.count", "2",
                       "--sites.sync_every", "3", "--sites.link", "cross-region")
    assert p.returncode == 0, p.stderr[-3000:]
    ledger = Ledger(workspace / "ledger.db")
    run = ledger.get_run("sites")
    spreads = ledger.get_metrics(run["id"], "replica_spread")
    assert [step for step, _, _ in spreads] == [3, 6, 9, 12] and all(v == 0 for _, _, v in spreads)
    params = run["summary"]["params"]
    assert run["summary"]["comm_bytes_per_site"] == 4 * params * 2  # 4 outer steps x (K-1) x N bf16 values
    # cross-region: 40 ms latency per ring step, so each outer step takes at least that long
    assert run["summary"]["comm_seconds"] >= 4 * 0.04
    assert 0 < run["summary"]["compute_utilisation"] < 1
    assert math.isfinite(run["summary"]["val_bpb"])
