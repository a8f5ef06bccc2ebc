"""`lmforge plan-link`: predict a config's run across sites over a link, for DDP and for DiLoCo."""

from __future__ import annotations

import argparse
import difflib
import json

from rich.table import Table

from lmforge.cli.common import add_config_arguments, config_from_args, duration, human, out, workspace_of
from lmforge.config import SYNC_BY, RunConfig
from lmforge.dist.link import PRESETS, SPEC_FORMS, Link, parse_link, seconds_text
from lmforge.dist.plan import DEFAULT_MFU, DEFAULT_SYNC_EVERY, WIRES, LinkPlan, StrategyPlan, plan_link
from lmforge.errors import ConfigError
from lmforge.meter.hardware import profile_names, resolve_profile

HELP = "predict comm time, wall time and utilisation of a run across sites over a link (DDP vs DiLoCo)"
DESCRIPTION = f"""\
Before renting anything: how long would this config's run take on K sites joined by a given link, trained
with DDP (fp32 gradients all-reduced every step) and with DiLoCo (a pseudo-gradient all-reduced every H steps
in the wire precision)? Compute per step is FLOPs / (device peak x --mfu); communication is a ring all-reduce
over the link (latency + bytes / bandwidth per step of the ring). Each site is one device; nothing is run.

link presets: {", ".join(PRESETS)};
or a custom spec such as up=20Mbit,down=100Mbit,latency=40ms (docs/scale-out.md gives the presets' sources)

examples:
  lmforge plan-link --config src/lmforge/configs/demo.yaml --sites 4 --link starlink
  lmforge plan-link --config my.yaml --sites 8 --link geo-satellite --sync-every 500 --wire int8 --device h100-sxm
  lmforge plan-link --config my.yaml --sites 2 --link bw=1Gbit,latency=20ms --device-tflops 100 --json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sites", type=int, required=True, metavar="K", help="number of sites (at least 2)")
    p.add_argument("--link", required=True, metavar="PRESET_OR_SPEC", help=f"the link between sites: {SPEC_FORMS}")
    p.add_argument("--sync-every", type=int, default=DEFAULT_SYNC_EVERY, metavar="H",
                   help=f"DiLoCo inner steps per outer step (default {DEFAULT_SYNC_EVERY})")
    p.add_argument("--sync-by", choices=SYNC_BY, default="steps", help="DiLoCo: outer steps every H steps, or "
                   "every H steps' worth of learning rate (lr: H apart at the peak, farther apart in warm-up and "
                   "decay; the config's schedule and checkpoints decide how many; default steps)")
    p.add_argument("--wire", choices=WIRES, default="fp32", help="DiLoCo pseudo-gradient precision on the wire; int8 "
                   "carries one fp32 scale per 256 values, nf4 one per 128 (default fp32; DDP always sends fp32)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--device", metavar="NAME", help="device profile of every site: " + ", ".join(profile_names())
                        + " ('cpu' measures this CPU; default: the config's meter settings, else this machine)")
    device.add_argument("--device-tflops", type=float, metavar="X", help="peak TFLOP/s of one site's device")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, metavar="FRACTION",
                   help=f"share of the peak that training reaches (default {DEFAULT_MFU}, typical of tuned GPU runs)")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    add_config_arguments(p, ("tokenizer", "model", "train", "meter"))


def device_peak(args: argparse.Namespace, cfg: RunConfig) -> tuple[float, str]:
    """One site's peak FLOP/s and where it came from: a flag, the config's meter settings, or this machine."""
    if args.device_tflops is not None:
        if not args.device_tflops > 0:
            raise ConfigError(f"--device-tflops must be positive, got {args.device_tflops:g}")
        return args.device_tflops * 1e12, f"{args.device_tflops:g} TFLOP/s (--device-tflops)"
    if not args.device and cfg.meter.peak_tflops:
        return cfg.meter.peak_tflops * 1e12, f"{cfg.meter.peak_tflops:g} TFLOP/s (--meter.peak_tflops)"
    name = args.device or cfg.meter.device_profile
    if name and name not in profile_names():
        close = difflib.get_close_matches(name, profile_names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown device {name!r}{hint}; pass --device with one of {', '.join(profile_names())}, "
                          f"or --device-tflops X")
    workspace = workspace_of(args)
    probe_cache = workspace.probe_cache if workspace.root.is_dir() else None  # a what-if creates no workspace
    if name:
        profile = resolve_profile("cpu" if name == "cpu" else "cuda", override_name=name, probe_cache=probe_cache)
    else:
        import torch

        from lmforge.train.runtime import resolve_device

        device = resolve_device(cfg.train.device)
        gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        profile = resolve_profile(device.type, gpu_name, cpu_threads=cfg.train.threads or None,
                                  probe_cache=probe_cache)
    dtype = cfg.train.dtype if cfg.train.dtype != "auto" else ("fp32" if profile.name == "cpu" else "bf16")
    peak = profile.peak_flops_for(dtype)
    if not peak:
        raise ConfigError(f"no peak FLOP/s is known for device {profile.name!r}; pass --device NAME or "
                          f"--device-tflops X")
    how = "measured on this CPU" if profile.measured_peak else "profile"
    return peak, f"{profile.name}, {human(peak)}FLOP/s {dtype} ({how})"


def seconds(s: float) -> str:
    """Any span from microseconds to weeks, readably."""
    if s < 1:
        return seconds_text(s)
    if s < 60:
        return f"{s:.3g} s"
    if s >= 2 * 86400:
        return f"{s / 86400:.3g} days"
    return duration(s)


def strategy_label(s: StrategyPlan) -> str:
    return "DDP" if s.strategy == "ddp" else f"DiLoCo H={s.sync_every}{' by lr' if s.sync_by == 'lr' else ''} {s.wire}"


def print_plan(plan: LinkPlan, link: Link, config_name: str, device: str) -> None:
    out.print(f"[bold]{config_name}[/] on {plan.sites} sites over {link.describe()}")
    out.print(f"[dim]link: {link.source}[/]")
    out.print(f"model: {human(plan.params)} params, {human(plan.flops_per_token)}FLOPs/token; run: {plan.steps:,} "
              f"steps x {human(plan.tokens_per_step)} tokens = {human(plan.tokens)} tokens (from {plan.steps_from})")
    out.print(f"device per site: {device}; at MFU {plan.mfu:g} a step computes in "
              f"{seconds(plan.compute_seconds_per_step)}")
    table = Table(title="predicted for the whole run", title_justify="left")
    table.add_column("")
    for s in (plan.ddp, plan.diloco):
        table.add_column(strategy_label(s), justify="right")
    rows = [
        ("all-reduce payload", lambda s: human(s.payload_bytes, "B")),
        ("all-reduces", lambda s: f"{s.syncs:,} (every {s.sync_every} step{'s' if s.sync_every > 1 else ''}"
                                  f"{' of peak learning rate' if s.sync_by == 'lr' else ''})"),
        ("time per all-reduce", lambda s: seconds(s.seconds_per_sync)),
        ("comm per step (mean)", lambda s: seconds(s.comm_seconds_per_step)),
        ("compute per step", lambda s: seconds(plan.compute_seconds_per_step)),
        ("wall time", lambda s: seconds(s.wall_seconds)),
        ("compute utilisation", lambda s: f"{s.utilisation * 100:.3g}%"),
        ("sent per site", lambda s: human(s.bytes_sent_per_site, "B")),
    ]
    for label, cell in rows:
        table.add_row(label, cell(plan.ddp), cell(plan.diloco))
    out.print(table)
    ddp, diloco = plan.ddp, plan.diloco
    out.print(f"{strategy_label(diloco)} sends {ddp.bytes_sent_per_site / diloco.bytes_sent_per_site:,.0f}x fewer "
              f"bytes than DDP; DDP takes {ddp.wall_seconds / diloco.wall_seconds:,.3g}x its wall time.")
    out.print("[dim]Assumes one device per site, no overlap of communication with compute, ring all-reduce over "
              "the slower direction of the link; payload bytes only (TCP/IP adds ~4%).[/]")


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    link = parse_link(args.link)
    peak, device = device_peak(args, cfg)
    plan = plan_link(cfg, sites=args.sites, link=link, peak_flops=peak, mfu=args.mfu, sync_every=args.sync_every,
                     sync_by=args.sync_by, wire=args.wire)
    if args.json:
        print(json.dumps({**plan.to_dict(), "device": device}, indent=2))
    else:
        print_plan(plan, link, args.config or "default config", device)
    return 0
