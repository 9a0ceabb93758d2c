"""Energy meters on a controlled clock, a fake powercap tree and a fake NVML (no GPU needed)."""

import os
import types
from pathlib import Path

import pynvml
import pytest

from megatrain import energy
from megatrain.energy import (
    EstimateMeter,
    MeterUnavailable,
    NvmlMeter,
    RaplMeter,
    ZeroMeter,
    co2_kg,
    facility_kwh,
    make_meter,
    nvml_device_for_cuda,
)

MAX_UJ = 262_143_328_850  # a real Intel max_energy_range_uj


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


# -- estimate ---------------------------------------------------------------------------------


def test_estimate_meter_is_power_times_time():
    clock = FakeClock()
    meter = EstimateMeter(35.0, clock=clock)
    assert meter.method == "estimate" and "35 W" in meter.reason
    clock.t += 10.0
    s = meter.read()
    assert (s.joules, s.power_w, s.method, s.elapsed_s) == (350.0, 35.0, "estimate", 10.0)
    clock.t += 3600.0
    assert meter.read().joules == pytest.approx(35.0 * 3610.0)


def test_zero_meter_keeps_the_method_label():
    clock = FakeClock()
    meter = ZeroMeter("rapl", "counted by local rank 0", clock=clock)
    clock.t += 5
    s = meter.read()
    assert (s.joules, s.power_w, s.method) == (0.0, 0.0, "rapl")


# -- RAPL on a fake /sys/class/powercap --------------------------------------------------------


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = MAX_UJ):
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(label + "\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def _set(zone: Path, energy_uj: int):
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


@pytest.fixture
def powercap(tmp_path):
    """Two sockets with core/dram sub-zones, a psys zone and an MMIO duplicate (flat, like
    sysfs)."""
    root = tmp_path / "powercap"
    (root / "intel-rapl").mkdir(parents=True)  # the control type, not a zone
    (root / "intel-rapl" / "enabled").write_text("1\n")
    zones = {
        "pkg0": _zone(root, "intel-rapl:0", "package-0", 1_000_000),
        "core0": _zone(root, "intel-rapl:0:0", "core", 500_000),
        "dram0": _zone(root, "intel-rapl:0:1", "dram", 200_000),
        "pkg1": _zone(root, "intel-rapl:1", "package-1", 3_000_000),
        "dram1": _zone(root, "intel-rapl:1:0", "dram", 100_000),
        "psys": _zone(root, "intel-rapl:2", "psys", 9_000_000),
        "mmio": _zone(root, "intel-rapl-mmio:0", "package-0", 7_000_000),
    }
    return root, zones


def test_rapl_sums_packages_only(powercap):
    root, z = powercap
    clock = FakeClock()
    meter = RaplMeter(root, clock=clock)
    assert meter.method == "rapl"
    assert "intel-rapl:0 (package-0)" in meter.reason and "intel-rapl:1 (package-1)" in meter.reason
    assert "psys" not in meter.reason and "mmio" not in meter.reason
    _set(z["pkg0"], 1_000_000 + 60_000_000)  # +60 J
    _set(z["pkg1"], 3_000_000 + 40_000_000)  # +40 J
    for k in ("core0", "dram0", "dram1", "psys", "mmio"):  # must not be added
        _set(z[k], 10**11)
    clock.t += 2.0
    s = meter.read()
    assert (
        s.joules == pytest.approx(100.0) and s.power_w == pytest.approx(50.0) and s.method == "rapl"
    )


def test_rapl_include_dram_adds_dram_not_core(powercap):
    root, z = powercap
    meter = RaplMeter(root, include_dram=True, clock=FakeClock())
    _set(z["dram0"], 200_000 + 5_000_000)
    _set(z["dram1"], 100_000 + 7_000_000)
    _set(z["core0"], 10**11)
    assert meter.read().joules == pytest.approx(12.0)


def test_rapl_counter_wraparound(tmp_path):
    root = tmp_path / "powercap"
    max_uj = 1_000_000_000  # 1 kJ, small so the wrap is easy to see
    pkg = _zone(root, "intel-rapl:0", "package-0", max_uj - 30_000_000, max_uj=max_uj)
    meter = RaplMeter(root, clock=FakeClock())
    _set(pkg, 20_000_000)  # 30 J to the top, wrap, 20 J after
    assert meter.read().joules == pytest.approx(50.0)
    _set(pkg, 25_000_000)
    assert meter.read().joules == pytest.approx(55.0)
    assert meter.max_read_interval_s == pytest.approx(1000.0 / 500.0)


def test_rapl_permission_denied_is_unavailable(powercap, monkeypatch):
    root, _ = powercap
    locked = root / "intel-rapl:0" / "energy_uj"
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):  # what the kernel answers a non-root reader since 5.10
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(MeterUnavailable, match=f"permission denied on {locked}"):
        RaplMeter(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads mode-000 files")
def test_rapl_unreadable_file_for_real(powercap):
    root, z = powercap
    (z["pkg0"] / "energy_uj").chmod(0)
    with pytest.raises(MeterUnavailable, match="permission denied"):
        RaplMeter(root)


def test_rapl_missing_tree_is_unavailable(tmp_path):
    with pytest.raises(MeterUnavailable, match="no RAPL package zone"):
        RaplMeter(tmp_path / "nothing-here")


# -- NVML, through a fake module with pynvml's own error class ---------------------------------


def fake_nvml(energy_mj, power_mw, unsupported=(), error=pynvml.NVML_ERROR_NOT_SUPPORTED):
    """energy_mj / power_mw: dicts index -> value, mutated by tests to move time forward."""

    def total_energy(h):
        if h in unsupported:
            raise pynvml.NVMLError(error)
        return energy_mj[h]

    return types.SimpleNamespace(
        NVMLError=pynvml.NVMLError,
        NVML_ERROR_NOT_SUPPORTED=pynvml.NVML_ERROR_NOT_SUPPORTED,
        NVML_ERROR_FUNCTION_NOT_FOUND=pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetHandleByUUID=lambda u: int(u.removeprefix("GPU-fake")),
        nvmlDeviceGetTotalEnergyConsumption=total_energy,
        nvmlDeviceGetPowerUsage=lambda h: power_mw[h],
    )


def test_nvml_energy_counter_subtracts_start():
    mj = {0: 5_000_000_000}  # counter since driver load: must not leak into the run's energy
    clock = FakeClock()
    meter = NvmlMeter([0], nvml=fake_nvml(mj, {0: 0}), clock=clock)
    assert meter.method == "nvml" and "energy counter" in meter.reason
    mj[0] += 4_000_000  # 4 kJ
    clock.t += 10.0
    s = meter.read()
    assert (s.joules, s.power_w, s.method) == (4000.0, 400.0, "nvml")


@pytest.mark.parametrize(
    "error", [pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND]
)
def test_nvml_integrates_power_without_counter(error):
    mw = {0: 100_000, 1: 200_000}
    mj = {0: 0, 1: 0}
    clock = FakeClock()
    meter = NvmlMeter(
        [0, "GPU-fake1"], nvml=fake_nvml(mj, mw, unsupported={1}, error=error), clock=clock
    )
    assert "power integrated" in meter.reason and "GPU-fake1" in meter.reason
    clock.t += 10.0
    mw[1] = 300_000  # 200 W -> 300 W over 10 s: trapezoid = 2500 J
    mj[0] += 1_000_000  # GPU 0 has a counter: 1 kJ
    assert meter.read().joules == pytest.approx(3500.0)
    clock.t += 10.0  # flat 300 W: +3000 J
    assert meter.read().joules == pytest.approx(6500.0)


def test_nvml_other_errors_propagate():
    nvml = fake_nvml({0: 0}, {0: 0}, unsupported={0}, error=pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(pynvml.NVMLError):
        NvmlMeter([0], nvml=nvml)


def _nvml_works():
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except pynvml.NVMLError:
        return False


@pytest.mark.skipif(not _nvml_works(), reason="needs an NVIDIA GPU with a driver")
def test_nvml_real_gpu():
    meter = NvmlMeter([0])
    s = meter.read()
    assert s.method == "nvml" and s.joules >= 0
    meter.close()


@pytest.mark.skipif(_nvml_works(), reason="checks the environment mapping used without CUDA")
def test_nvml_device_for_cuda_uses_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert nvml_device_for_cuda(1) == 3
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa-bbbb,GPU-cccc")
    assert nvml_device_for_cuda(0) == "GPU-aaaa-bbbb"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert nvml_device_for_cuda(1) == 1


# -- make_meter: picks, never raises, says why ------------------------------------------------


@pytest.mark.skipif(_nvml_works(), reason="this host has NVML")
def test_make_meter_cuda_without_nvml_falls_back_to_estimate():
    meter = make_meter(
        "cuda", local_rank=0, fallback_power_w=300.0, fallback_source="cluster profile"
    )
    assert isinstance(meter, EstimateMeter) and meter.method == "estimate"
    assert meter.reason.startswith("energy: estimate (no NVML: ")
    assert meter.reason.endswith("300 W per process from cluster profile")
    assert "RAPL" not in meter.reason  # CPU counters would hide the GPUs: not tried on CUDA


def test_make_meter_cuda_with_nvml(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    monkeypatch.setattr(energy, "nvml_device_for_cuda", lambda i: [4, 5, 6, 7][i])
    meter = make_meter(
        "cuda:2", local_rank=0, fallback_power_w=300.0, nvml=fake_nvml({6: 0}, {6: 0})
    )
    assert isinstance(meter, NvmlMeter)
    assert meter.reason == "energy: nvml: energy counter of GPU 6 (cuda:2 = NVML 6)"


def test_make_meter_cpu_permission_denied(powercap, monkeypatch):
    root, _ = powercap
    locked = root / "intel-rapl:0" / "energy_uj"
    real_read_text = Path.read_text

    def read_text(self, *args, **kwargs):
        if self == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    meter = make_meter("cpu", 0, 35.0, fallback_source="cluster profile", rapl_root=root)
    assert meter.method == "estimate"
    assert meter.reason == (
        f"energy: estimate (RAPL not readable: permission denied on {locked}); "
        "35 W per process from cluster profile"
    )


def test_make_meter_cpu_without_powercap(tmp_path):
    clock = FakeClock()
    meter = make_meter("cpu", 1, 35.0, rapl_root=tmp_path / "absent", clock=clock)
    assert meter.method == "estimate" and "no RAPL package zone" in meter.reason
    clock.t += 2.0
    assert meter.read().joules == pytest.approx(70.0)  # every process reports its own estimate


def test_make_meter_cpu_rapl_only_local_rank_0_counts(powercap):
    root, z = powercap
    clock = FakeClock()
    rank0 = make_meter("cpu", 0, 35.0, rapl_root=root, clock=clock)
    rank1 = make_meter("cpu", 1, 35.0, rapl_root=root, clock=clock)
    assert isinstance(rank0, RaplMeter) and "local rank 0 reports the whole node" in rank0.reason
    assert isinstance(rank1, ZeroMeter) and rank1.method == "rapl"
    _set(z["pkg0"], 1_000_000 + 10_000_000)
    clock.t += 1.0
    assert rank0.read().joules + rank1.read().joules == pytest.approx(
        10.0
    )  # what an all-reduce sums


# -- facility energy and CO2 ------------------------------------------------------------------


def test_facility_kwh_and_co2():
    assert facility_kwh(3.6e6, 1.0) == pytest.approx(1.0)
    assert facility_kwh(3.6e9, 1.2) == pytest.approx(1200.0)
    assert co2_kg(1000.0, 57.0) == pytest.approx(57.0)
    with pytest.raises(ValueError, match="PUE"):
        facility_kwh(1.0, 0.9)
