"""The link model and the what-if planner: presets, spec parsing, the all-reduce cost formula, the software delay
on two real Gloo ranks, the same model against a kernel-shaped loopback (root only), and `lmforge plan-link`."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLI, expect_one_line_error

from lmforge.config import load_config
from lmforge.dist.link import PRESETS, Link, all_reduce_bytes_sent, parse_link
from lmforge.dist.plan import plan_link, wire_bytes
from lmforge.errors import ConfigError

# One rank of a two-process Gloo group: all-reduce a payload raw, or through DelayedCollectives (synchronously,
# then asynchronously around OVERLAP seconds of stand-in compute); rank 0 writes its timings as JSON.
WORKER = '''
import dataclasses, json, sys, time
import torch
import torch.distributed as dist
from lmforge.dist.link import DelayedCollectives, parse_link

rank, world, init, nbytes, spec, overlap, out = sys.argv[1:]
rank, world, nbytes, overlap = int(rank), int(world), int(nbytes), float(overlap)
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
dist.all_reduce(torch.ones(1))  # open the connections before anything is timed


def timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


x = torch.full((nbytes // 4,), rank + 1.0)
result = {}
if spec == "raw":
    result["seconds"] = timed(lambda: dist.all_reduce(x))
else:
    comm = DelayedCollectives(parse_link(spec))
    result["seconds"] = timed(lambda: comm.all_reduce(x))
    y = torch.full((nbytes // 4,), rank + 1.0)

    def overlapped():
        work = comm.all_reduce(y, async_op=True)
        time.sleep(overlap)
        work.wait()

    result["async_seconds"] = timed(overlapped)
    result["stats"] = dataclasses.asdict(comm.stats)
    result["y"] = y[0].item()
result["x"] = x[0].item()
if rank == 0:
    with open(out, "w") as f:
        json.dump(result, f)
dist.destroy_process_group()
'''


def run_two_ranks(tmp_path: Path, nbytes: int, spec: str, *, overlap: float = 0.0, netns_setup: str = "",
                  timeout: int = 60) -> dict:
    """Start both ranks from one shell script (inside `unshare -n` after `netns_setup` when given)."""
    worker = tmp_path / "allreduce_worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "result.json"
    init = f"file://{tmp_path / 'rendezvous'}"
    ranks = [f"{sys.executable} {worker} {rank} 2 {init} {nbytes} '{spec}' {overlap} {out}" for rank in (0, 1)]
    script = tmp_path / "ranks.sh"
    script.write_text(f"set -e\n{netns_setup}\n{ranks[1]} &\n{ranks[0]}\nwait $!\n")
    command = ["unshare", "-n", "bash", str(script)] if netns_setup else ["bash", str(script)]
    # Gloo picks its interface from the hostname, which need not resolve to loopback (nor exist in a new netns)
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


# -- presets and specs --


def test_presets_are_the_issues_figures():
    expected = {  # name: (up bit/s, down bit/s, latency s)
        "datacenter": (400e9, 400e9, 10e-6), "cross-region": (10e9, 10e9, 40e-3), "starlink": (15e6, 100e6, 40e-3),
        "geo-satellite": (50e6, 50e6, 600e-3), "laser-isl": (100e9, 100e9, 5e-3),
    }
    assert {name: (p.up_bps, p.down_bps, p.latency_s) for name, p in PRESETS.items()} == expected
    assert all(p.source for p in PRESETS.values())
    assert parse_link("Starlink") is PRESETS["starlink"]
    assert PRESETS["starlink"].describe() == "starlink: 15 Mbit/s up, 100 Mbit/s down, 40 ms"


@pytest.mark.parametrize("spec, up, down, latency", [
    ("up=20Mbit,down=100Mbit,latency=40ms", 20e6, 100e6, 0.04),
    ("down=1.5Gbit/s, up=800kbit, latency=0.6s", 800e3, 1.5e9, 0.6),
    ("bw=40mbit,latency=10us", 40e6, 40e6, 1e-5),
    ("bw=2e3bit,latency=0s", 2e3, 2e3, 0.0),
    ("bw=100Mbps,latency=5ms", 100e6, 100e6, 5e-3),
])
def test_custom_specs(spec, up, down, latency):
    link = parse_link(spec)
    assert (link.name, link.up_bps, link.down_bps) == ("custom", up, down)
    assert link.latency_s == pytest.approx(latency)


@pytest.mark.parametrize("spec, names", [
    ("starlinc", "unknown link 'starlinc'"),
    ("up=20MB,down=100Mbit,latency=40ms", "bad value '20MB' for up.*bits"),
    ("up=20Mbit,down=100Mbit,latency=40", "bad value '40' for latency"),
    ("up=20Mbit,down=100Mbit,delay=40ms", "bad part 'delay=40ms'"),
    ("up=20Mbit,latency=40ms", "lacks down"),
    ("bw=1Gbit,up=1Gbit,latency=1ms", "bw with up/down"),
    ("bw=1Gbit,bw=2Gbit,latency=1ms", "given twice"),
    ("bw=0Mbit,latency=1ms", "zero bandwidth"),
])
def test_bad_specs_name_the_bad_part_and_the_valid_forms(spec, names):
    with pytest.raises(ConfigError, match=names) as e:
        parse_link(spec)
    assert "\n" not in str(e.value)
    assert "RATE" in str(e.value) or "bw (both ways)" in str(e.value) or "positive RATE" in str(e.value)


# -- the cost model --


def test_transfer_and_collective_costs():
    link = Link("test", up_bps=8e6, down_bps=16e6, latency_s=0.1)  # 1 MB/s up, 2 MB/s down
    assert link.transfer_seconds(1e6, "up") == pytest.approx(1.1)
    assert link.transfer_seconds(1e6, "down") == pytest.approx(0.6)
    # ring all-reduce: 2 (P-1)/P * N over the slower direction + 2 (P-1) latencies
    assert link.all_reduce_seconds(4e6, 4) == pytest.approx(2 * 3 / 4 * 4 + 2 * 3 * 0.1)
    assert link.all_reduce_seconds(4e6, 1) == 0.0
    assert all_reduce_bytes_sent(4e6, 4) == pytest.approx(6e6)
    assert link.all_gather_seconds(1e6, 4) == pytest.approx(3 * 1 + 3 * 0.1)
    assert PRESETS["starlink"].all_reduce_seconds(4e6, 4) == pytest.approx(6e6 * 8 / 15e6 + 6 * 0.04)
    with pytest.raises(ValueError):
        link.transfer_seconds(1, "sideways")
    with pytest.raises(ConfigError, match="positive bandwidths"):
        Link("bad", 0, 1, 0)


def test_wire_bytes():
    assert wire_bytes(1000, "fp32") == 4000
    assert wire_bytes(1000, "bf16") == 2000
    assert wire_bytes(1000, "int8") == 1000 + 4 * 4  # ceil(1000 / 256) = 4 fp32 scales
    assert wire_bytes(1000, "nf4") == 512 + 4 * 8  # 8 blocks of 128 half-bytes, each with an fp32 scale
    with pytest.raises(ConfigError, match="fp32, bf16, int8, nf4"):
        wire_bytes(1000, "fp8")


def test_plan_arithmetic():
    cfg = load_config(None, {"model.depth": 2, "train.max_steps": 1000, "train.batch_size": 8})
    link = PRESETS["cross-region"]
    plan = plan_link(cfg, sites=4, link=link, peak_flops=100e12, mfu=0.5, sync_every=300, wire="bf16")
    assert plan.steps == 1000 and plan.tokens == 1000 * 4 * 8 * 256
    assert plan.compute_seconds_per_step == pytest.approx(plan.flops_per_token * 8 * 256 / 50e12)
    ddp, diloco = plan.ddp, plan.diloco
    assert ddp.syncs == 1000 and diloco.syncs == 4  # ceil(1000 / 300): the last sync ends the run
    assert ddp.payload_bytes == 4 * plan.params and diloco.payload_bytes == 2 * plan.params
    assert ddp.seconds_per_sync == pytest.approx(link.all_reduce_seconds(4 * plan.params, 4))
    assert ddp.bytes_sent_per_site == pytest.approx(1000 * 1.5 * 4 * plan.params)
    for s in (ddp, diloco):
        assert s.wall_seconds == pytest.approx(s.compute_seconds + s.comm_seconds)
        assert s.utilisation == pytest.approx(s.compute_seconds / s.wall_seconds)
        assert s.comm_seconds_per_step == pytest.approx(s.comm_seconds / 1000)
    same = plan_link(cfg, sites=4, link=link, peak_flops=100e12, sync_every=1, wire="fp32")
    assert same.diloco.wall_seconds == pytest.approx(same.ddp.wall_seconds)  # H=1 in fp32 is DDP's traffic
    # by lr: 20 steps of warm-up and a decay over the last 40% spread 300 steps' exchanges out (SyncClock)
    short = load_config(None, {"model.depth": 2, "train.max_steps": 300, "train.warmup_steps": 20})
    by_lr = plan_link(short, sites=2, link=link, peak_flops=1e12, sync_every=11, sync_by="lr", wire="nf4")
    assert by_lr.diloco.syncs == 22 < math.ceil(300 / 11) and by_lr.diloco.sync_by == "lr"  # 21 + the checkpoint
    assert short.train.checkpoint_every == 200  # at 200, between the exchanges at 198 and 212
    tokens = load_config(None, {"model.depth": 2, "train.max_tokens": 10**6, "train.batch_size": 8})
    assert plan_link(tokens, sites=2, link=link, peak_flops=1e12).steps == math.ceil(10**6 / (2 * 8 * 256))


# -- the software delay on real Gloo ranks --


def test_delayed_all_reduce_takes_the_modelled_time(tmp_path):
    spec, nbytes, overlap = "bw=20Mbit,latency=50ms", 1_000_000, 0.2
    modelled = parse_link(spec).all_reduce_seconds(nbytes, 2)  # 1 MB each way at 20 Mbit/s + 2 x 50 ms = 0.5 s
    result = run_two_ranks(tmp_path, nbytes, spec, overlap=overlap)
    assert result["x"] == 3.0 and result["y"] == 3.0  # the real all-reduce ran: 1 + 2
    assert modelled <= result["seconds"] < modelled + 0.25  # sleep and scheduling slack on a busy 2-core CI box
    assert modelled <= result["async_seconds"] < modelled + 0.25  # the stand-in compute hid inside the link time
    stats = result["stats"]
    assert stats["calls"] == 2 and stats["bytes_sent"] == pytest.approx(2 * nbytes)
    assert stats["modelled_seconds"] == pytest.approx(2 * modelled)
    assert stats["seconds"] >= 2 * modelled and stats["transport_seconds"] < stats["seconds"]
    assert stats["waited_seconds"] == pytest.approx(stats["seconds"] - overlap, abs=0.05)  # async: blocked less


# -- the model against the kernel's traffic shaper (issue 5, done-when 4) --


def test_shaped_loopback_matches_the_link_model(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root for unshare -n and tc")
    if not all(shutil.which(tool) for tool in ("unshare", "tc", "ip")):
        pytest.skip("needs unshare, tc and ip")
    rate_mbit, nbytes = 80, 7_500_000
    setup = (f"ip link set lo up mtu 1500\n"
             f"tc qdisc add dev lo root tbf rate {rate_mbit}mbit burst 32kbit latency 400ms")
    probe = subprocess.run(["unshare", "-n", "bash", "-c", f"set -e\n{setup}"], check=False, capture_output=True,
                           text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot shape loopback in a new network namespace: {probe.stderr.strip()[:200]}")
    # Both ranks' traffic crosses the one shaped lo, so each site gets half the rate; loopback adds no latency.
    link = parse_link(f"bw={rate_mbit / 2}Mbit,latency=0ms")
    modelled = link.all_reduce_seconds(nbytes, 2)  # 7.5 MB each way at 40 Mbit/s = 1.5 s
    measured = run_two_ranks(tmp_path, nbytes, "raw", netns_setup=setup)
    assert measured["x"] == 3.0
    assert measured["seconds"] == pytest.approx(modelled, rel=0.25)


# -- lmforge plan-link --


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  depth: 2\ntrain:\n  batch_size: 8\n  max_steps: 1000\n")
    return path


def test_plan_link_table_and_json(tmp_path, capsys, config_file):
    cli = CLI(tmp_path / "ws", capsys)
    base = ["plan-link", "--config", str(config_file), "--sites", "4", "--device-tflops", "100"]
    code, out, _ = cli(*base, "--link", "geo-satellite", "--sync-every", "50", "--wire", "int8")
    assert code == 0
    for text in ("geo-satellite", "DDP", "DiLoCo H=50 int8", "wall time", "compute utilisation", "sent per site",
                 "1,000 steps", "fewer bytes"):
        assert text in out
    code, out, _ = cli(*base, "--link", "up=20Mbit,down=100Mbit,latency=40ms", "--json")
    assert code == 0
    data = json.loads(out)
    cfg = load_config(config_file)
    plan = plan_link(cfg, sites=4, link=parse_link("up=20Mbit,down=100Mbit,latency=40ms"), peak_flops=100e12)
    assert data["ddp"] == plan.ddp.__dict__ and data["diloco"] == plan.diloco.__dict__
    assert data["link"]["up_bps"] == 20e6 and data["steps"] == 1000
    assert not (tmp_path / "ws").exists()  # a what-if writes nothing


def test_plan_link_device_profile(tmp_path, capsys, config_file):
    code, out, _ = CLI(tmp_path / "ws", capsys)("plan-link", "--config", str(config_file), "--sites", "2", "--link",
                                                "starlink", "--device", "h100-sxm", "--json")
    assert code == 0 and json.loads(out)["peak_flops"] == 989e12  # bf16, the GPU default


PEAK = ["--device-tflops", "100"]


@pytest.mark.parametrize("flags, pattern", [
    (["--sites", "4", "--link", "starlinc", *PEAK], "unknown link 'starlinc'"),
    (["--sites", "4", "--link", "up=1Mbit,latency=1ms", *PEAK], "lacks down"),
    (["--sites", "1", "--link", "starlink", *PEAK], "--sites must be at least 2"),
    (["--sites", "4", "--link", "starlink", "--sync-every", "0", *PEAK], "--sync-every must be a positive"),
    (["--sites", "4", "--link", "starlink", "--mfu", "1.5", *PEAK], "--mfu must be in"),
    (["--sites", "4", "--link", "starlink", "--wire", "fp8", *PEAK], "invalid choice: 'fp8'"),
    (["--sites", "4", "--link", "starlink", "--device", "h100"], "unknown device 'h100'.*did you mean"),
    (["--sites", "4", "--link", "starlink", "--device-tflops", "-3"], "--device-tflops must be positive"),
    (["--sites", "4", "--link", "starlink", "--device", "l4", *PEAK], "not allowed with argument"),
    (["--sites", "4", "--link", "starlink", "--train.max_stepz", "3", *PEAK], "did you mean --train.max_steps"),
    (["--link", "starlink", *PEAK], "--sites"),
])
def test_plan_link_bad_input_is_one_line(tmp_path, capsys, config_file, flags, pattern):
    code, _, err = CLI(tmp_path / "ws", capsys)("plan-link", "--config", str(config_file), *flags)
    expect_one_line_error(code, err, pattern, only_line=True)


def test_plan_link_without_a_stop_condition(tmp_path, capsys):
    code, _, err = CLI(tmp_path / "ws", capsys)("plan-link", "--sites", "2", "--link", "starlink",
                                                "--device-tflops", "100")
    expect_one_line_error(code, err, "no stop condition", only_line=True)


# -- docs/scale-out.md stays true to the code --

DOC = (Path(__file__).resolve().parents[1] / "docs" / "scale-out.md").read_text()


def test_doc_lists_every_preset_and_its_commands_parse():
    from lmforge.cli import parse

    for name in PRESETS:
        assert f"| `{name}` |" in DOC
    commands = [line for line in DOC.splitlines() if line.startswith("lmforge plan-link")]
    assert len(commands) == 3
    for line in commands:
        assert parse(line.split()[1:]).verb == "plan-link"


def test_doc_example_table_matches_the_planner():
    from lmforge.cli.plan_link import seconds

    demo = load_config(Path(__file__).resolve().parents[1] / "src" / "lmforge" / "configs" / "demo.yaml")
    for name in PRESETS:
        plan = plan_link(demo, sites=4, link=PRESETS[name], peak_flops=0.2e12)
        row = (f"| {name} | {seconds(plan.ddp.wall_seconds)} | {plan.ddp.utilisation * 100:.3g}% | "
               f"{seconds(plan.diloco.wall_seconds)} | {plan.diloco.utilisation * 100:.3g}% |")
        assert row in DOC
