"""Fault-tolerant DiLoCo (--sites.drop_after): each site its own job, membership agreed per outer step.

Without faults it computes exactly what the one-job DiLoCo computes; a site killed mid-run is dropped from the
outer steps, started again by `lmforge train`, and rejoins with the global weights; the ledger records both.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_subprocess

from lmforge.checkpoint import load_checkpoint
from lmforge.cli import main
from lmforge.dist.quorum import Quorum, RunEnded, connect
from lmforge.errors import ConfigError
from lmforge.meter.ledger import Ledger
from lmforge.train.loop import SiteWork

SITES = ["--nproc", "2", "--sites", "2", "--train.batch_size", "4", "--train.threads", "1",
         "--train.eval_every", "0", "--train.checkpoint_every", "0"]


def test_without_faults_the_same_weights_as_one_job(prepared):
    workspace, data = prepared
    common = [*data, *SITES, "--train.max_steps", "12", "--sync-every", "3", "--sites.wire", "int8"]
    p = run_subprocess(workspace, "train", *common, "--name", "one-job")
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_subprocess(workspace, "train", *common, "--name", "ft-clean", "--sites.drop_after", "5")
    assert p.returncode == 0, p.stderr[-3000:]
    ledger = Ledger(workspace / "ledger.db")
    one, ft = ledger.get_run("one-job")["summary"], ledger.get_run("ft-clean")["summary"]
    # the same global weights, bit for bit (the logged losses differ: one job averages them over both sites)
    one_weights, ft_weights = (load_checkpoint(Path(s["checkpoint"])).model_state for s in (one, ft))
    assert all(torch.equal(one_weights[k], ft_weights[k]) for k in one_weights)
    assert ft["val_bpb"] == one["val_bpb"]
    # plus, per outer step, the 6 float64s each site tells the others (exchanges seen, θ's hash, step, work, size)
    assert ft["comm_bytes_per_site"] == one["comm_bytes_per_site"] + 4 * 6 * 8
    assert ft["sites_dropped"] == ft["sites_rejoined"] == 0 and ft["tokens_trained"] == ft["tokens"]
    assert ledger.get_events(ledger.get_run("ft-clean")["id"]) == []


def site_process(launcher: subprocess.Popen, site: int) -> int | None:
    """The pid of the job `lmforge train` started for this site (one process per site)."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            with open(f"/proc/{child}/cmdline", "rb") as f:
                if f"--sites.site\0{site}\0".encode() in f.read():
                    return int(child)
    return None


def test_stalled_then_killed_site_is_dropped_and_rejoins(prepared):
    """Site 1 stalls (SIGSTOP) past --sites.drop_after: site 0 goes on alone, and when site 1 wakes up it catches
    up at a later outer step. Then site 1 is killed (SIGKILL): `lmforge train` starts it again and it rejoins with
    the global weights. The run completes, and the ledger has the four events in order."""
    workspace, data = prepared
    env = {**os.environ, "LMFORGE_HOME": str(workspace), "COLUMNS": "200"}
    args = [*data, *SITES, "--train.max_steps", "1500", "--sync-every", "50", "--sites.drop_after", "2",
            "--train.log_every", "10", "--name", "ft-faults"]
    launcher = subprocess.Popen([sys.executable, "-m", "lmforge", "train", *args], env=env,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    ledger, deadline = Ledger(workspace / "ledger.db"), time.monotonic() + 240

    def wait_for(done, what: str) -> None:
        while not done():
            assert launcher.poll() is None, f"the run ended before {what}"
            assert time.monotonic() < deadline, f"no {what} in time"
            time.sleep(0.1)

    def events() -> list[tuple[str, int]]:
        runs = [r for r in ledger.list_runs() if r["name"] == "ft-faults"]
        return [(e["kind"], e["detail"]["site"]) for e in ledger.get_events(runs[0]["id"])] if runs else []

    def spreads() -> list:
        runs = [r for r in ledger.list_runs() if r["name"] == "ft-faults"]
        return ledger.get_metrics(runs[0]["id"], "replica_spread") if runs else []

    try:
        wait_for(lambda: any(step >= 100 for step, _, _ in spreads()), "two outer steps of both sites")
        site1 = site_process(launcher, 1)
        os.kill(site1, signal.SIGSTOP)
        wait_for(lambda: len(events()) == 1, "a drop of the stalled site")
        os.kill(site1, signal.SIGCONT)
        wait_for(lambda: len(events()) == 2, "the woken site catching up")
        os.kill(site1, signal.SIGKILL)
        _, stderr = launcher.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:  # on failure, nothing of the run is left behind
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGCONT)
            os.killpg(launcher.pid, signal.SIGKILL)
    assert launcher.returncode == 0, stderr[-3000:]
    assert stderr.count("starting it again") == 1 and "site 1 failed (exit -9; see" in stderr
    assert stderr.count("site 1 dropped") == 2 and stderr.count("site 1 rejoined with the global weights") == 2
    run = ledger.get_run("ft-faults")
    assert run["status"] == "completed"
    assert events() == [("site_dropped", 1), ("site_rejoined", 1)] * 2, stderr[-3000:]
    steps = [e["step"] for e in ledger.get_events(run["id"])]
    assert 100 <= steps[0] < steps[1] <= steps[2] < steps[3] < 1500, steps
    s = run["summary"]
    assert s["sites_dropped"] == s["sites_rejoined"] == 2 and s["steps"] == 1500
    # the steps site 1 missed are missing from the tokens trained; every outer step left one global θ
    assert s["tokens"] / 2 < s["tokens_trained"] < s["tokens"]
    assert all(v == 0 for _, _, v in spreads())
    assert math.isfinite(s["val_bpb"])


def agree_all(quorums: dict[int, Quorum], exchange: int, joining: frozenset = frozenset(),
              late: float = 0.0) -> dict:
    """Every site in `quorums` agrees on `exchange` in its own thread (the joining ones `late` seconds first)."""
    out = {}

    def one(site):
        out[site] = quorums[site].agree(exchange, 0, joining=site in joining)
    threads = {site: threading.Thread(target=one, args=(site,)) for site in quorums}
    for site in sorted(quorums, key=lambda s: s not in joining):
        threads[site].start()
        if site in joining:
            time.sleep(late)
    for t in threads.values():
        t.join(timeout=30)
    return out


def sites_at_one_store(count: int, drop_after: float) -> tuple[dist.TCPStore, dict[int, Quorum]]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)  # a free port
    return store, {site: Quorum(connect(f"127.0.0.1:{store.port}", host_it=False), site, count, drop_after,
                                startup_s=0) for site in range(count)}


def test_quorum_leaves_out_the_silent_and_the_late_and_takes_back_joiners():
    store, quorums = sites_at_one_store(3, drop_after=1.0)
    # site 2 is silent: after 1 s the others go on without it
    start = time.monotonic()
    got = agree_all({0: quorums[0], 1: quorums[1]}, 1)
    assert 1.0 <= time.monotonic() - start < 10
    assert got[0].sites == got[1].sites == (0, 1) and (got[0].index, got[1].index) == (0, 1)
    # it turns up after the members were fixed: not a member
    assert quorums[2].agree(1, 0, joining=False).index == -1
    # the next exchange: 0 and 1 wait only for each other (the sites of their last exchange); 2, joining, is in
    start = time.monotonic()
    got = agree_all(quorums, 2, joining=frozenset({2}), late=0.1)
    assert time.monotonic() - start < 1.0 + 0.1
    assert got[0].sites == got[1].sites == got[2].sites == (0, 1, 2) and got[2].index == 2
    quorums[0].completed(2)
    assert quorums[1].latest() == 2
    quorums[1].finished()  # site 1 is done: nobody waits for it
    start = time.monotonic()
    got = agree_all({0: quorums[0], 2: quorums[2]}, 3)
    assert got[0].sites == (0, 2) and time.monotonic() - start < 1.0
    del store


def test_quorum_never_goes_on_without_site_0():
    """Site 0 keeps the run's records: the others wait for it however late it is (it ends the run if it dies)."""
    store, quorums = sites_at_one_store(3, drop_after=0.2)
    got = {}
    waiting = threading.Thread(target=lambda: got.update(one=quorums[1].agree(1, 0, joining=False)))
    waiting.start()
    other = threading.Thread(target=lambda: got.update(two=quorums[2].agree(1, 0, joining=False)))
    other.start()
    time.sleep(1.0)  # five times drop_after
    assert waiting.is_alive() and other.is_alive()
    assert quorums[0].agree(1, 0, joining=False).sites == (0, 1, 2)
    waiting.join(timeout=10)
    other.join(timeout=10)
    assert got["one"].sites == got["two"].sites == (0, 1, 2)
    del store


def test_a_site_too_late_for_a_closed_run_ends_quietly():
    store, quorums = sites_at_one_store(2, drop_after=0.2)
    quorums[0].close(timeout_s=0)
    with pytest.raises(RunEnded, match="the run had ended"):
        quorums[1].agree(1, 0, joining=True)
    del store


def test_site_work_adds_up_the_processes_of_a_restarted_site():
    work = SiteWork()
    work.update({0: (100, 10.0), 1: (100, 10.0)})
    work.update({0: (200, 20.0), 1: (0, 0.0)})  # site 1 started again
    work.update({0: (300, 30.0), 1: (50, 4.0)})
    assert work.totals() == (300 + 100 + 50, 30.0 + 10.0 + 4.0)


@pytest.mark.parametrize("flags, message", [
    (["--sites.drop_after", "2", "--sites.fragments", "2"], "plain DiLoCo only"),
    (["--sites.drop_after", "-1"], "--sites.drop_after and --sites.restarts must be >= 0"),
    (["--sites.drop_after", "2", "--sites.site", "2"], "--sites.site must be in [0, 2)"),
])
def test_fault_tolerance_bad_settings(prepared, capsys, flags, message):
    workspace, data = prepared
    assert main(["--workspace", str(workspace), "train", *data, "--sites", "2", "--train.max_steps", "2",
                 *flags]) == 2
    assert message in capsys.readouterr().err


def test_store_address_errors():
    with pytest.raises(ConfigError, match="must be HOST:PORT"):
        connect("no-port", host_it=False)
    with pytest.raises(ConfigError, match="needs --sites.store"):
        connect("", host_it=False)
