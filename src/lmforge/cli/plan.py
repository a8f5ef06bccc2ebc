"""`lmforge plan`: the compute-optimal run for a budget (time, dollars, kWh or FLOPs) on a device."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from lmforge.cli.common import (add_config_arguments, config_from_args, config_overrides, duration, human, out,
                                workspace_of)
from lmforge.config import RunConfig
from lmforge.errors import ConfigError
from lmforge.meter.hardware import DeviceProfile, default_carbon_g_per_kwh, profile_names, resolve_profile
from lmforge.plan.history import bytes_per_token, ledger_runs, measured_mfu, scaling_points
from lmforge.plan.planner import DEFAULT_MFU, Budget, Plan, choose_law, make_plan, parse_duration
from lmforge.plan.scaling import MIN_RUNS, PRIOR
from lmforge.workspace import Workspace

HELP = "the compute-optimal model size, tokens, batch and learning rate for a budget, with predicted loss and cost"
DESCRIPTION = f"""\
Before spending: what should a budget train? The budget becomes FLOPs through the device profile (peak x
--count x --mfu), a scaling law L(N, D) = E + A/N^alpha + B/D^beta splits them into model size and tokens
(C = 6 N D), and the size is rounded to the nearest depth of the depth dial. The law is your own fit when the
ledger holds {MIN_RUNS} or more finished runs on the config's tokenizer and the fit converges (see `lmforge fit`), else
the prior: Epoch AI's refit of Chinchilla. Energy is the devices' board power (TDP) for the whole time, an
estimate. Nothing is run.

devices: {", ".join(profile_names())}
('h100' means h100-sxm; 'cpu' measures this CPU)

examples:
  lmforge plan --budget 8h --device h100 --count 8
  lmforge plan --budget-usd 100 --device a100
  lmforge plan --budget-kwh 50 --device l40s --json
  lmforge plan --budget-flops 1e15 --device cpu --config my.yaml
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget", metavar="DURATION", help="wall-clock time, e.g. 90m, 8h, 2d")
    budget.add_argument("--budget-usd", type=float, metavar="USD", help="money, at the device's price per hour")
    budget.add_argument("--budget-kwh", type=float, metavar="KWH", help="energy, at the device's board power (TDP)")
    budget.add_argument("--budget-flops", type=float, metavar="FLOPS", help="training FLOPs, e.g. 1e19")
    p.add_argument("--device", metavar="NAME", help="device profile (default: the config's --meter.device_profile, "
                   "else this machine's GPU or CPU)")
    p.add_argument("--count", type=int, default=1, metavar="K", help="devices training together (default 1)")
    p.add_argument("--mfu", type=float, metavar="FRACTION", help="share of the peak training reaches (default: the "
                   f"median of the ledger's finished runs on the same device, else {DEFAULT_MFU})")
    p.add_argument("--prior", action="store_true", help="use the prior even when the ledger's runs can be fitted")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    add_config_arguments(p, ("tokenizer", "model", "train", "meter"))


def budget_of(args: argparse.Namespace) -> Budget:
    if args.budget is not None:
        return Budget("time", parse_duration(args.budget))
    for kind in ("usd", "kwh", "flops"):
        value = getattr(args, f"budget_{kind}")
        if value is not None:
            if not value > 0:
                raise ConfigError(f"--budget-{kind} must be positive, got {value:g}")
            return Budget(kind, value)
    raise ConfigError("no budget given; pass --budget, --budget-usd, --budget-kwh or --budget-flops")


def profile_name(name: str) -> str:
    """A profile name from what the user typed: exact, or a family ('h100') standing for its SXM card, or its only
    member."""
    names = profile_names()
    if name in names:
        return name
    family = [n for n in names if n.startswith(f"{name}-")]
    if f"{name}-sxm" in family:
        return f"{name}-sxm"
    if len(family) == 1:
        return family[0]
    raise ConfigError(f"unknown device {name!r}; pass --device with one of {', '.join(names)}")


def device_profile(args: argparse.Namespace, cfg: RunConfig, workspace: Workspace) -> DeviceProfile:
    """The profile of one device, with the config's meter overrides (peak, power, price) applied."""
    meter = cfg.meter
    probe_cache = workspace.probe_cache if workspace.root.is_dir() else None  # a what-if creates no workspace
    overrides = {"peak_tflops": meter.peak_tflops or None, "power_watts": meter.power_watts or None,
                 "price_per_hour": meter.price_per_hour, "cpu_threads": cfg.train.threads or None,
                 "probe_cache": probe_cache}
    name = args.device or meter.device_profile
    if name:
        name = profile_name(name)
        return resolve_profile("cpu" if name == "cpu" else "cuda", override_name=name, **overrides)
    import torch

    from lmforge.train.runtime import resolve_device

    device = resolve_device(cfg.train.device)
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return resolve_profile(device.type, gpu_name, **overrides)


def energy_text(kwh: float) -> str:
    return f"{kwh:,.4g} kWh" if kwh >= 1 else f"{kwh * 1000:.3g} Wh"


def money_text(usd: float) -> str:
    return f"${usd:,.2f}" if usd >= 1 else f"${usd:.4f}"


def mass_text(kg: float) -> str:
    return f"{kg:,.4g} kg" if kg >= 1 else f"{kg * 1000:.3g} g"


def print_plan(p: Plan) -> None:
    out.print(f"[bold]plan for {p.budget}[/] on {p.count} x {p.device} ({p.dtype}, {human(p.peak_flops)}FLOP/s peak "
              f"each, MFU {p.mfu:.3g} {p.mfu_source})")
    out.print(f"budget: {human(p.flops)}FLOPs over {duration(p.seconds)}")
    out.print(f"law: L = {p.law['E']:.4g} + {p.law['A']:.4g}/N^{p.law['alpha']:.4g} + {p.law['B']:.4g}/D^"
              f"{p.law['beta']:.4g}; {p.law_source}")
    out.print(f"the law's optimum at C = 6 N D: N = {human(p.n_opt)} non-embedding params, D = {human(p.d_opt)} "
              f"tokens, loss {p.loss_at_opt:.4g}")
    memory = p.memory
    fits = {True: "fits", False: "[red]does NOT fit[/] (--train.parallel fsdp shards weights, grads and optimizer "
            "state across devices)", None: "unknown (the profile gives no memory size)"}[memory.fits]
    of_device = f" of {human(memory.device, 'B')}" if memory.device else ""
    table = Table(title="recommended run", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("depth", f"{p.depth} ({p.d_model} wide, {p.n_head} head{'s' if p.n_head > 1 else ''})"
                  + (f"; {p.depth_note}" if p.depth_note else "")),
        ("parameters", f"{human(p.params)} ({human(p.non_embedding_params)} non-embedding)"),
        ("tokens", f"{human(p.tokens)} ({p.tokens_per_param:.3g} per non-embedding parameter; "
                   f"{human(p.flops_per_token)}FLOPs/token)"),
        ("batch", f"{p.global_batch:,} sequences x {p.seq_len} = {human(p.global_batch * p.seq_len)} tokens/step; "
                  f"per device {p.micro_batch} x {p.grad_accum} accumulated; {p.steps:,} steps"),
        ("learning rate", f"AdamW {p.lr:.3g}, Muon {p.matrix_lr:g}"),
        ("predicted val loss", f"{p.predicted_loss:.4f} nats/token"),
        ("predicted val bpb", f"{p.predicted_bpb:.4f} ({p.bpb_note})" if p.predicted_bpb is not None else p.bpb_note),
        ("wall time", duration(p.seconds)),
        ("energy", f"{energy_text(p.kwh)} ({p.energy_note})"),
        ("cost", money_text(p.cost_usd) if p.cost_usd is not None else "unknown (no price; --meter.price_per_hour)"),
        ("CO2", f"{mass_text(p.co2_kg)} at {p.carbon_g_per_kwh:g} g/kWh"),
        ("memory per device", f"{human(memory.total, 'B')}{of_device}: {fits}; weights {human(memory.weights, 'B')}, "
                              f"grads {human(memory.grads, 'B')}, optimizer {human(memory.optimizer, 'B')}, "
                              f"activations {human(memory.activations, 'B')}"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    out.print(f"[dim]batch: {p.batch_rule}.\nlearning rate: {p.lr_rule}.\nmemory: {memory.formula}.[/]")
    out.print("train it: lmforge train " + " ".join(p.train_flags))


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    budget = budget_of(args)
    workspace = workspace_of(args)
    profile = device_profile(args, cfg, workspace)
    runs = ledger_runs(workspace.ledger_path)
    tokenizer = cfg.tokenizer_name()
    if args.mfu is not None:
        mfu, mfu_source = args.mfu, "(--mfu)"
    elif measured := measured_mfu(runs, profile.name):
        mfu, mfu_source = measured[0], f"(median of {measured[1]} finished runs on {profile.name})"
    else:
        mfu, mfu_source = DEFAULT_MFU, "(default; no finished run on this device in the ledger)"
    law, law_note = (PRIOR, "--prior") if args.prior else choose_law(scaling_points(runs, tokenizer), tokenizer)
    carbon = cfg.meter.carbon_g_per_kwh if cfg.meter.carbon_g_per_kwh >= 0 else default_carbon_g_per_kwh()
    def plan_with(mfu: float, mfu_source: str):
        return make_plan(cfg, budget, profile, count=args.count, mfu=mfu, mfu_source=mfu_source, law=law,
                         law_note=law_note, bytes_per_token=bytes_per_token(runs, tokenizer), carbon_g_per_kwh=carbon)

    plan = plan_with(mfu, mfu_source)
    # once the depth is known, the MFU measured at that depth (if any run had it) is the better guess
    if args.mfu is None and (same := measured_mfu(runs, profile.name, plan.depth)) and same[0] != mfu:
        plan = plan_with(same[0], f"(median of {same[1]} finished runs on {profile.name} at depth {plan.depth})")
    # the train command repeats the config this plan was made for; the plan's own settings win
    planned = {flag.removeprefix("--") for flag in plan.train_flags[::2]}
    plan.train_flags[:0] = (["--config", args.config] if args.config else []) + [
        part for key, value in config_overrides(args).items() if key not in planned for part in (f"--{key}", str(value))]
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan)
    return 0
