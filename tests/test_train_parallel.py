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
import torch
from conftest import run_subprocess
from test_train import losses

from lmforge.cli import main
from lmforge.meter.ledger import Ledger
from lmforge.dist.plan import wire_bytes
from lmforge.train.diloco import NF4_LEVELS, decode, encode, fragment_bounds
from lmforge.train.schedule import SyncClock, exchanges_in_run, lr_multiplier

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


def test_streaming_overlapped_diloco_agrees_on_theta(prepared):
    """Streaming (2 fragments at staggered steps) with each exchange overlapped by one inner step, nf4 wire:
    every outer update leaves every rank with the same θ, and every fragment is exchanged every H steps."""
    workspace, data = prepared
    p = run_subprocess(workspace, "train", *data, "--name", "streaming", *STEPS, "--train.batch_size", "4",
                       "--train.checkpoint_every", "0", "--nproc", "2", "--sites", "2", "--sync-every", "4",
                       "--sites.fragments", "2", "--sites.overlap_steps", "1", "--sites.wire", "nf4")
    assert p.returncode == 0, p.stderr[-3000:]
    ledger = Ledger(workspace / "ledger.db")
    run = ledger.get_run("streaming")
    spreads = ledger.get_metrics(run["id"], "replica_spread")
    # fragment 1 is sent at 2, 6, 10 and fragment 0 at 4, 8, 12, each applied one step later; the end of the run
    # applies the one still in flight and exchanges fragment 1 once more (not a step metric)
    assert [step for step, _, _ in spreads] == [3, 5, 7, 9, 11] and all(v == 0 for _, _, v in spreads)
    assert math.isfinite(run["summary"]["val_bpb"])


def test_diloco_sync_by_lr_exchanges_as_the_clock_says_and_checkpoints_between_exchanges(prepared):
    """sync_by lr, H = 3, warm-up 4, decay over the second half of 12 steps: the learning-rate multipliers add up to
    H after steps 5 and 8 (SyncClock); a checkpoint at step 10, between exchanges, exchanges the whole model first,
    and the run resumed from it keeps the clock (the last exchange ends the run)."""
    workspace, data = prepared
    args = [*data, "--name", "bylr", *STEPS, "--train.batch_size", "4", "--train.warmup_steps", "4",
            "--train.decay_frac", "0.5", "--train.checkpoint_every", "5", "--nproc", "2", "--sites", "2",
            "--sync-every", "3", "--sites.sync_by", "lr"]
    p = run_subprocess(workspace, "train", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    ledger = Ledger(workspace / "ledger.db")
    run = ledger.get_run("bylr")
    spreads = ledger.get_metrics(run["id"], "replica_spread")
    assert [step for step, _, _ in spreads] == [5, 8] and all(v == 0 for _, _, v in spreads)
    # 5 and 8 by the clock, 10 for the checkpoint, 12 to end the run (as plan-link counts them); each an
    # all-gather of the bf16 model
    planned = exchanges_in_run(12, 3, "lr", warmup_steps=4, decay_frac=0.5, min_lr_frac=0.0, checkpoint_every=5)
    assert run["summary"]["outer_steps"] == planned == 4 and run["summary"]["sync_by"] == "lr"
    assert run["summary"]["comm_bytes_per_site"] == 4 * 2 * run["summary"]["params"]
    shutil.rmtree(workspace / "runs" / "bylr" / "checkpoints" / "step_00000012")
    p = run_subprocess(workspace, "train", "--resume", "bylr", "--nproc", "2")
    assert p.returncode == 0, p.stderr[-3000:]
    assert ledger.get_run("bylr")["summary"]["outer_steps"] == 4


def test_sync_clock():
    for every, fragments in [(4, 1), (4, 2), (6, 3), (5, 2)]:
        by_steps, by_lr = SyncClock(every, fragments), SyncClock(every, fragments, "lr")
        for step in range(1, 40):  # at a constant rate, the lr clock is DiLoCo's step clock
            due = [f for f in range(fragments) if step % every == f * every // fragments % every]
            assert by_steps.due(step, 0.3) == due == by_lr.due(step, 1.0)
    # warm-up-stable-decay over 300 steps, H = 11: 11 steps apart at the peak, further apart elsewhere
    kw = dict(warmup_steps=20, decay_frac=0.4, min_lr_frac=0.0)
    clock = SyncClock(11, by="lr")
    steps = [s + 1 for s in range(300) if clock.due(s + 1, lr_multiplier(s, s / 300, **kw))]
    gaps = [b - a for a, b in zip(steps, steps[1:])]
    assert steps[0] == 21 and steps[-1] == 300 and gaps[:15] == [11] * 15 and gaps[-1] == 50
    assert exchanges_in_run(300, 11, "lr", **kw) == len(steps) == 21  # the last one ends the run
    assert exchanges_in_run(300, 14, "steps", **kw) == 22  # 21 every 14 steps, then one to end the run


def test_fragments():
    assert fragment_bounds([10, 10, 10, 10], 2) == [(0, 20), (20, 40)]
    assert fragment_bounds([100, 1, 1, 1], 3) == [(0, 100), (100, 101), (101, 103)]
    assert fragment_bounds([5], 1) == [(0, 5)]


# the largest gap between two neighbouring levels, as a share of a block's largest magnitude
WIDEST_STEP = {"int8": 1 / 127, "nf4": float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max())}


@pytest.mark.parametrize("wire, dtype, block, nbytes", [("int8", torch.int8, 256, 1024 + 4 * 4),
                                                         ("nf4", torch.uint8, 128, 512 + 4 * 8)])
def test_low_precision_wires_round_each_value_to_its_blocks_nearest_level(wire, dtype, block, nbytes):
    delta = torch.randn(1000) * torch.logspace(-3, 1, 1000)
    parts = encode(delta, wire)
    assert parts[0].dtype == dtype and parts[1].numel() == -(-1000 // block)  # one fp32 scale per block
    assert sum(p.numel() * p.element_size() for p in parts) == nbytes == wire_bytes(1024, wire)
    back = decode(parts, wire, 1000)
    padded = torch.nn.functional.pad(delta, (0, -1000 % block)).view(-1, block)
    step = (padded.abs().amax(1) * WIDEST_STEP[wire]).repeat_interleave(block)[:1000]
    assert ((back - delta).abs() <= step / 2 + 1e-7).all()  # within half a step
    assert torch.isclose(back.abs().max(), delta.abs().max())  # each block's largest value is a level


def test_nf4_rounds_normal_values_closer_than_16_even_levels():
    x = torch.randn(10_000, 128)
    scales = x.abs().amax(dim=1, keepdim=True)
    even = (x / scales * 7).round() / 7 * scales  # int4: -7..7
    nf4 = decode(encode(x.flatten(), "nf4"), "nf4", x.numel()).view_as(x)
    assert (nf4 - x).pow(2).mean() < 0.75 * (even - x).pow(2).mean()


def test_fsdp_matches_one_process_and_its_checkpoint_resumes_unsharded(prepared):
    """FSDP2 over 2 ranks (AdamW) steps like one process with the same global batch; its full-state checkpoint
    resumes in one process."""
    workspace, data = prepared
    adamw = ["--train.optimizer", "adamw", "--train.lr", "0.003"]
    assert main(["--workspace", str(workspace), "train", *data, "--name", "one-adamw", *STEPS, *adamw,
                 "--train.batch_size", "8", "--train.checkpoint_every", "0"]) == 0
    p = run_subprocess(workspace, "train", *data, "--name", "fsdp", *STEPS, *adamw, "--train.batch_size", "4",
                       "--train.checkpoint_every", "6", "--nproc", "2", "--train.parallel", "fsdp")
    assert p.returncode == 0, p.stderr[-3000:]
    one = losses(workspace, "one-adamw")
    assert_same_losses(losses(workspace, "fsdp"), one)
    shutil.rmtree(workspace / "runs" / "fsdp" / "checkpoints" / "step_00000012")
    assert main(["--workspace", str(workspace), "train", "--resume", "fsdp", "--train.batch_size", "8"]) == 0
    assert_same_losses(losses(workspace, "fsdp"), one)
