"""Energy readers: measured where the hardware allows it, otherwise a declared-power estimate labelled as such.

    NvmlEnergy       GPU board energy from NVML's total-energy counter (Volta and newer)
    RaplEnergy       CPU package energy from the Linux powercap (RAPL) counters, Intel and AMD
    EstimatedEnergy  declared watts x wall-clock seconds: an ESTIMATE, never reported as a measurement

`make_energy_reader` picks the best that works on this machine. Every reader carries `source`, `measured` and a
human `label`, and the ledger stores them next to the joules so a number can never lose its provenance.
`footprint` turns joules and device-seconds into kWh, dollars and CO2.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path

RAPL_ROOT = Path("/sys/class/powercap")


class EnergyUnavailable(Exception):
    """This reader cannot work on this machine (no library, no counter, no permission)."""


class EnergyReader(abc.ABC):
    """Energy used since start(), in joules."""

    source: str  # "nvml", "rapl" or "estimate"
    measured: bool
    label: str

    @abc.abstractmethod
    def start(self) -> None: ...

    def sample(self) -> None:
        """Read the counters now; call it every training step (it is cheap) so no counter wrap is missed."""

    @abc.abstractmethod
    def joules(self) -> float: ...


class NvmlEnergy(EnergyReader):
    """Energy of one GPU board from nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver loaded)."""

    source = "nvml"
    measured = True

    def __init__(self, device_index: int = 0):
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
            self._read()  # raises NVMLError_NotSupported on GPUs older than Volta
        except Exception as e:  # ImportError, NVMLError (no driver, no device, not supported)
            raise EnergyUnavailable(f"NVML energy counter unavailable: {e}") from e
        self.label = f"measured (NVML total-energy counter, GPU {device_index} board only)"
        self._start_mj = self._read()

    def start(self) -> None:
        self._start_mj = self._read()

    def joules(self) -> float:
        return (self._read() - self._start_mj) / 1000.0


class RaplEnergy(EnergyReader):
    """Sum of the CPU package domains' RAPL counters, e.g. <root>/intel-rapl:0/energy_uj (AMD uses the same names).

    A counter wraps to zero at max_energy_range_uj (about 262 kJ on many CPUs, i.e. ~20 minutes at 200 W), so
    the readings are accumulated as deltas and a reading below the previous one adds one range. That is exact
    as long as sample() runs at least once per wrap period, which a per-step call guarantees.
    Sub-domains (intel-rapl:0:0 core, :1 uncore...) are inside the package and are not added again.
    """

    source = "rapl"
    measured = True

    def __init__(self, root: Path = RAPL_ROOT):
        self._domains: list[tuple[Path, int]] = []  # (energy_uj file, max_energy_range_uj)
        for domain in sorted(Path(root).glob("intel-rapl:*")):
            if domain.name.count(":") != 1:
                continue
            name_file = domain / "name"
            if name_file.exists() and not _read_text(name_file).startswith("package"):
                continue
            self._domains.append((domain / "energy_uj", _read_int(domain / "max_energy_range_uj")))
        if not self._domains:
            raise EnergyUnavailable(f"no RAPL package domains under {root}")
        self._previous = self._read_all()  # raises EnergyUnavailable when unreadable (root-only since Linux 5.10)
        self._total_uj = 0
        names = ", ".join(path.parent.name for path, _ in self._domains)
        self.label = f"measured (RAPL package counters {names}; CPU packages only, not DRAM or GPU)"

    def _read_all(self) -> list[int]:
        return [_read_int(path) for path, _ in self._domains]

    def start(self) -> None:
        self._previous = self._read_all()
        self._total_uj = 0

    def sample(self) -> None:
        now = self._read_all()
        for i, (value, previous) in enumerate(zip(now, self._previous)):
            delta = value - previous
            if delta < 0:  # the counter wrapped past max_energy_range_uj
                delta += self._domains[i][1]
            self._total_uj += delta
        self._previous = now

    def joules(self) -> float:
        self.sample()
        return self._total_uj / 1e6


class EstimatedEnergy(EnergyReader):
    """Declared watts x elapsed wall-clock seconds. Not a measurement, and labelled so everywhere."""

    source = "estimate"
    measured = False

    def __init__(self, watts: float, reason: str = ""):
        self.watts = float(watts)
        because = f"; {reason}" if reason else ""
        self.label = f"ESTIMATE: {self.watts:g} W declared x wall-clock time, not measured{because}"
        self._t0 = time.perf_counter()

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def joules(self) -> float:
        return self.watts * (time.perf_counter() - self._t0)


def make_energy_reader(
    device_type: str,
    device_index: int = 0,
    declared_watts: float | None = None,
    *,
    rapl_root: Path = RAPL_ROOT,
) -> EnergyReader:
    """The best energy reader for this device: cuda -> NVML, cpu -> RAPL, else an estimate at `declared_watts`.

    declared_watts is required (it has a default only so device_index can keep its own); the reader is started.
    """
    if declared_watts is None:
        raise TypeError("make_energy_reader() needs declared_watts for the fallback estimate")
    try:
        if device_type == "cuda":
            reader: EnergyReader = NvmlEnergy(device_index)
        elif device_type == "cpu":
            reader = RaplEnergy(rapl_root)
        else:
            raise EnergyUnavailable(f"no energy counter for device type {device_type!r}")
    except EnergyUnavailable as e:
        reader = EstimatedEnergy(declared_watts, reason=str(e))
    reader.start()
    return reader


def footprint(
    energy_j: float, device_seconds: float, price_per_hour: float | None, carbon_g_per_kwh: float
) -> dict[str, float | None]:
    """kWh, cost (device-hours x price; None when the price is unknown) and kg CO2 (kWh x grid intensity)."""
    kwh = energy_j / 3.6e6  # 1 kWh = 1000 W x 3600 s
    device_hours = device_seconds / 3600.0
    return {
        "energy_j": energy_j,
        "kwh": kwh,
        "device_hours": device_hours,
        "cost_usd": device_hours * price_per_hour if price_per_hour is not None else None,
        "co2_kg": kwh * carbon_g_per_kwh / 1000.0,
    }


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise EnergyUnavailable(f"cannot read {path}: {e}") from e


def _read_int(path: Path) -> int:
    text = _read_text(path)
    try:
        return int(text)
    except ValueError as e:
        raise EnergyUnavailable(f"{path} holds {text!r}, not an integer") from e
