"""Device profiles, the CPU peak probe and its cache, energy readers (a fake RAPL sysfs tree) and footprint maths."""

import json
import time

import pytest

from lmforge.errors import ConfigError
from lmforge.meter import energy, hardware
from lmforge.meter.energy import EstimatedEnergy, RaplEnergy, footprint, make_energy_reader
from lmforge.meter.hardware import load_devices, measure_cpu_peak_flops, resolve_profile


def fake_rapl(root, packages: dict[int, tuple[int, int]]):
    """A powercap tree: intel-rapl:N (package-N) with (energy_uj, max_energy_range_uj), plus a core sub-domain."""
    for n, (energy_uj, max_range) in packages.items():
        domain = root / f"intel-rapl:{n}"
        domain.mkdir(parents=True)
        (domain / "name").write_text(f"package-{n}\n")
        (domain / "energy_uj").write_text(f"{energy_uj}\n")
        (domain / "max_energy_range_uj").write_text(f"{max_range}\n")
        core = root / f"intel-rapl:{n}:0"  # inside the package: must not be counted twice
        core.mkdir()
        (core / "name").write_text("core\n")
        (core / "energy_uj").write_text("5\n")
        (core / "max_energy_range_uj").write_text(f"{max_range}\n")


def set_energy(root, n: int, energy_uj: int):
    (root / f"intel-rapl:{n}" / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_and_handles_wrap_around(tmp_path):
    max_range = 262_143_328_850
    fake_rapl(tmp_path, {0: (max_range - 1_000_000, max_range), 1: (10_000_000, max_range)})
    reader = RaplEnergy(root=tmp_path)
    reader.start()
    assert reader.measured and reader.source == "rapl" and "measured" in reader.label

    set_energy(tmp_path, 0, max_range - 400_000)  # +0.6 J
    set_energy(tmp_path, 1, 12_000_000)  # +2 J
    reader.sample()
    set_energy(tmp_path, 0, 1_500_000)  # wrapped: +0.4 J to the top, +1.5 J after it
    set_energy(tmp_path, 1, 13_000_000)  # +1 J
    assert reader.joules() == pytest.approx(0.6 + 2 + 1.9 + 1)
    reader.start()
    assert reader.joules() == 0.0


def test_rapl_unreadable_falls_back_to_estimate(tmp_path):
    fake_rapl(tmp_path, {0: (0, 1000)})
    (tmp_path / "intel-rapl:0" / "energy_uj").unlink()
    (tmp_path / "intel-rapl:0" / "energy_uj").mkdir()  # reading it fails like a root-only file (tests may run as root)
    with pytest.raises(energy.EnergyUnavailable):
        RaplEnergy(root=tmp_path)
    reader = make_energy_reader("cpu", 0, 10.0, rapl_root=tmp_path)
    assert reader.source == "estimate" and not reader.measured
    assert make_energy_reader("cpu", declared_watts=10.0, rapl_root=tmp_path / "absent").source == "estimate"


def test_make_energy_reader_uses_rapl_when_readable(tmp_path):
    fake_rapl(tmp_path, {0: (100, 1000)})
    reader = make_energy_reader("cpu", declared_watts=10.0, rapl_root=tmp_path)
    assert reader.source == "rapl"
    set_energy(tmp_path, 0, 600)
    assert reader.joules() == pytest.approx(500e-6)


def test_estimated_energy_is_labelled_an_estimate():
    reader = EstimatedEnergy(100.0)
    reader.start()
    time.sleep(0.05)
    joules = reader.joules()
    assert not reader.measured and reader.source == "estimate"
    assert "ESTIMATE" in reader.label and "not measured" in reader.label
    assert 100.0 * 0.05 <= joules < 100.0 * 1.0


def test_footprint_arithmetic():
    result = footprint(energy_j=3.6e6, device_seconds=2 * 3600, price_per_hour=3.0, carbon_g_per_kwh=475)
    assert result["kwh"] == pytest.approx(1.0)
    assert result["co2_kg"] == pytest.approx(0.475)
    assert result["cost_usd"] == pytest.approx(6.0)
    assert result["device_hours"] == pytest.approx(2.0)
    assert footprint(0.0, 60.0, None, 475)["cost_usd"] is None


def test_profiles_file_has_data_sheet_peaks():
    devices = load_devices()
    assert devices["carbon_g_per_kwh"] == 475 and "IEA" in devices["carbon_note"]
    profiles = devices["profiles"]
    assert profiles["a100"]["peak_flops"]["bf16"] == 312e12
    assert profiles["h100-sxm"]["peak_flops"]["bf16"] == 989e12
    assert profiles["h200"]["peak_flops"]["bf16"] == 989e12
    for name, spec in profiles.items():
        assert spec["note"], name
        for value in spec["peak_flops"].values():
            assert 1e12 < value < 1e16, name  # FLOP/s, not TFLOP/s


@pytest.mark.parametrize("device_name, profile", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"),
    ("NVIDIA H100 PCIe", "h100-pcie"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA A100 80GB PCIe", "a100-pcie"),
    ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"),
    ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA Tesla T4", "unknown-gpu"),
])
def test_gpu_names_match_profiles(device_name, profile):
    assert resolve_profile("cuda", device_name).name == profile


def test_unknown_gpu_has_no_peak_so_no_mfu():
    profile = resolve_profile("cuda", "Some Future GPU")
    assert profile.peak_flops_for("bf16") is None and profile.mfu(1e12, "bf16") is None
    assert "Some Future GPU" in profile.note
    profile = resolve_profile("cuda", "Some Future GPU", peak_tflops=100, power_watts=250, price_per_hour=1.5)
    assert profile.peak_flops_for("torch.bfloat16") == 100e12
    assert profile.mfu(50e12, "bf16") == pytest.approx(0.5)
    assert (profile.tdp_watts, profile.price_per_hour) == (250.0, 1.5)


def test_overrides_win_and_unset_values_are_ignored():
    profile = resolve_profile("cuda", "NVIDIA A100-SXM4-80GB", override_name="h100-sxm", price_per_hour=0.0)
    assert profile.name == "h100-sxm" and profile.price_per_hour == 0.0
    default = resolve_profile("cuda", "NVIDIA H100 80GB HBM3", peak_tflops=0, power_watts=0, price_per_hour=-1)
    assert default.peak_flops_for("bf16") == 989e12 and default.tdp_watts == 700 and default.price_per_hour == 3.0
    with pytest.raises(ConfigError, match="unknown dtype"):
        default.peak_flops_for("int8")


def test_unknown_profile_name_suggests_the_closest():
    with pytest.raises(ConfigError, match=r"'h100-sxm'") as info:
        resolve_profile("cuda", "NVIDIA H100 80GB HBM3", override_name="h100sxm")
    assert "a100" in str(info.value) and "\n" not in str(info.value)


def test_cpu_profile_keeps_the_best_probe(tmp_path, monkeypatch):
    """A probe taken under load reads low; the cache keeps the best reading so MFU is not overstated."""
    readings = iter([123e9, 60e9, 150e9, 40e9, 70e9])
    calls = []

    def fake_probe(threads=None, seconds=0.5):
        calls.append(threads)
        return next(readings)

    monkeypatch.setattr(hardware, "measure_cpu_peak_flops", fake_probe)
    cache = tmp_path / "hardware.json"
    first = resolve_profile("cpu", cpu_threads=2, probe_cache=cache)
    second = resolve_profile("cpu", cpu_threads=2, probe_cache=cache)  # busy machine: 60e9, the cache wins
    assert first.peak_flops_for("fp32") == second.peak_flops_for("bf16") == 123e9 and second.measured_peak
    assert second.tdp_watts == 2 * 5 and "ESTIMATE" in second.note
    assert resolve_profile("cpu", cpu_threads=2, probe_cache=cache).peak_flops_for("fp32") == 150e9  # a better one
    assert list(json.loads(cache.read_text()).values())[0]["peak_flops"] == 150e9
    assert resolve_profile("cpu", cpu_threads=1, probe_cache=cache).peak_flops_for("fp32") == 40e9  # its own key
    assert calls == [2, 2, 2, 1]
    assert resolve_profile("cpu", cpu_threads=2, peak_tflops=0.5).peak_flops_for("fp32") == 0.5e12
    assert calls == [2, 2, 2, 1]  # an explicit peak needs no probe
    cache.write_text("not json")  # a corrupt cache is rewritten, not an error
    assert resolve_profile("cpu", cpu_threads=2, probe_cache=cache).peak_flops_for("fp32") == 70e9


def test_measure_cpu_peak_flops_is_plausible_and_quick():
    t0 = time.perf_counter()
    peak = measure_cpu_peak_flops(seconds=0.3)
    assert time.perf_counter() - t0 < 2.0
    assert 1e9 < peak < 1e15


def test_describe_machine():
    machine = hardware.describe_machine()
    assert machine["hostname"] and machine["torch"] and machine["cpu_count"] >= 1
    assert isinstance(machine["gpus"], list)
    json.dumps(machine)
