"""Device profiles: the one source of truth for peak FLOP/s, power, price and grid carbon.

The figures live in `lmforge/assets/devices.json` (vendor data sheets, dense tensor-core rates, default cloud
prices). A GPU is recognised from its torch device name; a GPU without a profile gets a generic one whose peak is
unknown, so MFU is reported as None rather than made up. A CPU's peak is measured by an fp32 matmul probe and
cached per (CPU model, thread count, torch version), because data sheets say little about what torch gets from
a given CPU. User overrides (peak, power, price) always win and are noted in the profile.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import platform
import re
import socket
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from lmforge.errors import ConfigError

DTYPE_ALIASES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "tf32": "tf32",
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
}
DTYPES = ("bf16", "fp16", "tf32", "fp32")
UNKNOWN_GPU = "unknown-gpu"


@dataclass
class DeviceProfile:
    name: str
    peak_flops: dict[str, float]  # FLOP/s per dtype ("bf16", "fp16", "tf32", "fp32"); empty when unknown
    memory_gb: float
    tdp_watts: float  # declared power of one device, used only when energy cannot be measured
    price_per_hour: float | None  # USD per device-hour; None when unknown (then cost is not reported)
    measured_peak: bool  # True when peak_flops came from the CPU probe, not a data sheet
    note: str

    def peak_flops_for(self, dtype: str) -> float | None:
        """Peak FLOP/s at `dtype` ('bf16', 'torch.float32', ...); None when unknown, which makes MFU None."""
        key = DTYPE_ALIASES.get(str(dtype).removeprefix("torch.").lower())
        if key is None:
            raise ConfigError(f"unknown dtype {dtype!r} for peak FLOP/s; use one of {', '.join(DTYPES)}")
        return self.peak_flops.get(key)

    def mfu(self, flops_per_second: float, dtype: str) -> float | None:
        """Model FLOPs utilisation: achieved / peak FLOP/s at `dtype`; None when the peak is unknown."""
        peak = self.peak_flops_for(dtype)
        return flops_per_second / peak if peak else None


@functools.cache
def load_devices() -> dict[str, Any]:
    """The parsed devices.json: {"profiles": {name: {...}}, "carbon_g_per_kwh": ..., notes}."""
    text = resources.files("lmforge").joinpath("assets/devices.json").read_text(encoding="utf-8")
    return json.loads(text)


def profile_names() -> list[str]:
    return sorted(load_devices()["profiles"])


def default_carbon_g_per_kwh() -> float:
    """World-average grid carbon intensity (IEA), the default when the user gives none."""
    return float(load_devices()["carbon_g_per_kwh"])


def match_gpu(device_name: str) -> str:
    """Profile name for a torch GPU name, e.g. 'NVIDIA H100 80GB HBM3' -> 'h100-sxm'; UNKNOWN_GPU if none fits.

    A token matches only where it is not part of a longer alphanumeric run ('L4' is not in 'NVIDIA L40S').
    Among profiles with an alternative whose tokens all match, the most specific one (most tokens) wins, so
    'NVIDIA A100 80GB PCIe' is a100-pcie although it also contains 'A100'.
    """
    def has(token: str) -> bool:
        return re.search(rf"(?<![A-Z0-9]){re.escape(token.upper())}(?![A-Z0-9])", device_name.upper()) is not None

    best, best_len = UNKNOWN_GPU, 0
    for profile, spec in load_devices()["profiles"].items():
        for alternative in spec["match"]:
            if all(has(token) for token in alternative) and len(alternative) > best_len:
                best, best_len = profile, len(alternative)
    return best


def resolve_profile(
    device_type: str,
    device_name: str | None = None,
    *,
    override_name: str | None = None,
    peak_tflops: float | None = None,
    power_watts: float | None = None,
    price_per_hour: float | None = None,
    cpu_threads: int | None = None,
    probe_cache: Path | None = None,
    need_peak: bool = True,
) -> DeviceProfile:
    """The profile of the device a run uses, with the user's overrides applied.

    device_type: 'cuda' (matched by `device_name`, torch.cuda.get_device_name()) or 'cpu' (peak measured).
    override_name: a profile name from devices.json that replaces detection.
    need_peak=False skips the CPU probe for callers that only want power and price (the peak is then empty).
    Overrides follow the config's "unset" values: peak_tflops and power_watts None or 0, price_per_hour None or
    negative, cpu_threads None or 0 (= torch's current thread count).
    """
    profiles = load_devices()["profiles"]
    if override_name:
        if override_name not in profiles:
            close = difflib.get_close_matches(override_name, profiles, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"unknown device profile {override_name!r}{hint}; set --meter.device_profile to one of "
                f"{', '.join(profile_names())}, or leave it empty to detect"
            )
        name = override_name
    elif device_type == "cpu":
        name = "cpu"
    elif device_type == "cuda":
        name = match_gpu(device_name or "")
    else:
        raise ConfigError(f"unknown device type {device_type!r}; use 'cuda' or 'cpu'")

    spec = profiles[name]
    notes = [spec["note"]]
    if name == "cpu":
        profile = _cpu_profile(spec, cpu_threads, probe_cache, skip_probe=bool(peak_tflops) or not need_peak)
        notes = [profile.note]
    else:
        profile = DeviceProfile(
            name=name, peak_flops=dict(spec["peak_flops"]), memory_gb=float(spec["memory_gb"]),
            tdp_watts=float(spec["tdp_watts"]), price_per_hour=spec["price_per_hour_usd"], measured_peak=False,
            note="",
        )
        if name == UNKNOWN_GPU and device_name:
            notes.insert(0, f"no profile matches {device_name!r}.")

    if peak_tflops:
        profile.peak_flops = {dtype: peak_tflops * 1e12 for dtype in DTYPES}
        profile.measured_peak = False
        notes.append(f"Peak set by the user: {peak_tflops:g} TFLOP/s for every dtype.")
    if power_watts:
        profile.tdp_watts = float(power_watts)
        notes.append(f"Power declared by the user: {power_watts:g} W.")
    if price_per_hour is not None and price_per_hour >= 0:
        profile.price_per_hour = float(price_per_hour)
        notes.append(f"Price set by the user: ${price_per_hour:g}/hour.")
    profile.note = " ".join(notes)
    return profile


def _cpu_profile(spec: dict, threads: int | None, probe_cache: Path | None, skip_probe: bool) -> DeviceProfile:
    import torch

    threads = threads or torch.get_num_threads()
    watts = threads * spec["tdp_watts_per_core"]
    price = threads * spec["price_per_core_hour_usd"]
    peak = {} if skip_probe else dict.fromkeys(DTYPES, cached_cpu_peak_flops(threads, probe_cache))
    note = (
        f"{cpu_model()}, {threads} threads. Peak: fp32 matmul probe on {threads} threads, used for every dtype. "
        f"Power: ESTIMATE {threads} cores x {spec['tdp_watts_per_core']:g} W declared = {watts:g} W unless RAPL "
        f"is readable. Price: default {threads} cores x ${spec['price_per_core_hour_usd']:g}/core-hour. "
        + spec["note"]
    )
    return DeviceProfile(
        name="cpu", peak_flops=peak, memory_gb=_ram_gb(), tdp_watts=float(watts), price_per_hour=price,
        measured_peak=not skip_probe, note=note,
    )


def cached_cpu_peak_flops(threads: int, probe_cache: Path | None) -> float:
    """The best fp32 matmul rate ever measured on this CPU, thread count and torch version.

    Every call probes again (about 0.3 s) and `probe_cache` (JSON) keeps the best reading: a probe taken while
    other work shares the CPU reads low, and a low peak would overstate MFU, so the maximum wins.
    """
    import torch

    peak = measure_cpu_peak_flops(threads, seconds=0.3)
    if probe_cache is None:
        return peak
    key = f"{cpu_model()}|threads={threads}|torch={torch.__version__}"
    try:
        cache = json.loads(Path(probe_cache).read_text())
    except (OSError, ValueError):  # missing or corrupt: rewrite it
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    entry = cache.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("peak_flops"), (int, float)) and entry["peak_flops"] >= peak:
        return float(entry["peak_flops"])
    cache[key] = {"peak_flops": peak, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    probe_cache = Path(probe_cache)
    probe_cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = probe_cache.with_name(f"{probe_cache.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache, indent=2) + "\n")
    os.replace(tmp, probe_cache)  # atomic: a concurrent reader sees the old or the new file, never half of one
    return peak


def measure_cpu_peak_flops(threads: int | None = None, seconds: float = 0.5) -> float:
    """Best fp32 matmul rate (FLOP/s) torch reaches on `threads` CPU threads within about `seconds`.

    An n x n matmul is 2 n^3 FLOPs. n = 1024 saturates a few cores in ~10 ms a call; many cores need 2048 to
    have enough work per thread. The best of repeated timings is taken, since slower ones are interference.
    """
    import torch

    previous_threads = torch.get_num_threads()
    threads = threads or previous_threads
    torch.set_num_threads(threads)
    try:
        n = 2048 if threads >= 8 else 1024
        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
        out = torch.empty(n, n, dtype=torch.float32)
        with torch.inference_mode():
            for _ in range(2):  # warm-up: thread pool start, page faults, caches
                torch.mm(a, b, out=out)
            best = float("inf")
            deadline = time.perf_counter() + seconds
            repeats = 0
            while repeats < 3 or time.perf_counter() < deadline:
                t0 = time.perf_counter()
                torch.mm(a, b, out=out)
                best = min(best, time.perf_counter() - t0)
                repeats += 1
        return 2 * n**3 / best
    finally:
        torch.set_num_threads(previous_threads)


def cpu_model() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 7B13' (from /proc/cpuinfo on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model", "Hardware")) and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def _ram_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 0.0


def describe_machine() -> dict[str, Any]:
    """Facts about this machine for the ledger's hardware field."""
    import torch

    machine: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gb": round(_ram_gb(), 1),
        "gpus": [],
    }
    if torch.cuda.is_available():
        machine["cuda"] = torch.version.cuda
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            machine["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1)})
    return machine
