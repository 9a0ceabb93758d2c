"""Energy meters: what this process's devices consumed, in joules, with one interface.

Inside:
  EnergySample            cumulative joules since the meter started, recent power, method
  EnergyMeter             the protocol: .method, .reason, .read() (cheap, call at each log step)
  NvmlMeter               GPU energy counter via NVML (power integration where the counter
                          is missing)
  RaplMeter               CPU package energy via Linux powercap (Intel RAPL; AMD Zen uses it too)
  EstimateMeter           fixed power x elapsed time, labelled "estimate"
  ZeroMeter               reports 0 J: for ranks whose energy another rank already counts
  make_meter(...)         picks the best meter for this process and says why
  facility_kwh, co2_kg    IT joules -> facility kWh (PUE) -> kg CO2e (grid intensity)

Who counts what (no device may be counted twice once the trainer all-reduces the sums):
  - GPU runs: each rank meters only its own GPU (NVML energy is per board).
  - CPU runs: RAPL measures whole sockets, shared by all processes of the node, so only local
    rank 0 reports it; the other local ranks get a ZeroMeter with the same method.
  - Estimates are per process (the fallback power is a per-process figure).
Both counters see everything on the device, other jobs included: exclusive nodes/GPUs assumed.
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

Clock = Callable[[], float]


@dataclass(frozen=True)
class EnergySample:
    joules: float  # IT energy of the devices this meter measures, since it started
    power_w: float  # mean power over the interval since the previous read()
    method: str  # "nvml" | "rapl" | "estimate"
    elapsed_s: float  # since the meter started


class EnergyMeter(Protocol):
    method: str
    reason: str  # one line saying what is measured and why this method

    def read(self) -> EnergySample: ...


class MeterUnavailable(RuntimeError):
    """This kind of meter cannot work here; the message says why (for the run's log)."""


class _Cumulative:
    """Turns a cumulative joule count into samples with the power over the last interval."""

    method = "?"
    reason = ""

    def __init__(self, clock: Clock):
        self._clock = clock
        self._t0 = self._last_t = clock()
        self._last_j = self._last_p = 0.0

    def _sample(self, joules: float) -> EnergySample:
        t = self._clock()
        if t > self._last_t:
            self._last_p = (joules - self._last_j) / (t - self._last_t)
        self._last_t, self._last_j = t, joules
        return EnergySample(joules, self._last_p, self.method, t - self._t0)


class EstimateMeter(_Cumulative):
    """power_w x elapsed time. Honest only as far as power_w is: the label says so."""

    method = "estimate"

    def __init__(self, power_w: float, clock: Clock = time.monotonic, reason: str = ""):
        super().__init__(clock)
        self.power_w = float(power_w)
        self.reason = reason or f"estimate: {self.power_w:g} W x elapsed time"

    def read(self) -> EnergySample:
        return self._sample(self.power_w * (self._clock() - self._t0))


class ZeroMeter(_Cumulative):
    """Always 0 J, labelled with the method of the rank that does the counting."""

    def __init__(self, method: str, reason: str, clock: Clock = time.monotonic):
        super().__init__(clock)
        self.method, self.reason = method, reason

    def read(self) -> EnergySample:
        return self._sample(0.0)


class NvmlMeter(_Cumulative):
    """GPU board energy from NVML, summed over `device_indices` (NVML indices or "GPU-<uuid>").

    nvmlDeviceGetTotalEnergyConsumption gives millijoules since the driver loaded (Volta and
    newer); we subtract the value at start. Where it answers NOT_SUPPORTED (or the driver lacks
    the call) we integrate nvmlDeviceGetPowerUsage (milliwatts) with the trapezoid rule between
    read() calls: coarser, and `reason` says which GPUs use it. Pass one device per rank.
    """

    method = "nvml"
    _FALLBACK_ERRORS = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND")

    def __init__(
        self, device_indices: Sequence[int | str], nvml=None, clock: Clock = time.monotonic
    ):
        self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")  # nvidia-ml-py
        self._nvml.nvmlInit()
        self._handles = [self._handle(d) for d in device_indices]
        self._start_mj: list[int | None] = [self._energy_mj(h) for h in self._handles]
        super().__init__(clock)
        # power-integration state for the devices without a counter
        self._power_j = [0.0] * len(self._handles)
        self._power_w = [
            self._power(h) if s is None else 0.0 for h, s in zip(self._handles, self._start_mj)
        ]
        self._power_t = self._t0
        integrated = [str(d) for d, s in zip(device_indices, self._start_mj) if s is None]
        self.reason = (
            f"nvml: energy counter of GPU {', '.join(map(str, device_indices))}"
            if not integrated
            else "nvml: power integrated at each read (no energy counter) "
            f"on GPU {', '.join(integrated)}"
        )

    def _handle(self, device: int | str):
        if isinstance(device, str):
            return self._nvml.nvmlDeviceGetHandleByUUID(device)
        return self._nvml.nvmlDeviceGetHandleByIndex(device)

    def _energy_mj(self, handle) -> int | None:
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        except self._nvml.NVMLError as e:
            if e.value in [getattr(self._nvml, name) for name in self._FALLBACK_ERRORS]:
                return None
            raise

    def _power(self, handle) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW -> W

    def read(self) -> EnergySample:
        t = self._clock()
        dt, self._power_t = t - self._power_t, t
        total_j = 0.0
        for i, (h, start) in enumerate(zip(self._handles, self._start_mj)):
            if start is not None:
                total_j += (self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) - start) / 1000.0
            else:
                p = self._power(h)
                self._power_j[i] += 0.5 * (self._power_w[i] + p) * dt
                self._power_w[i] = p
                total_j += self._power_j[i]
        return self._sample(total_j)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


def nvml_device_for_cuda(cuda_index: int) -> int | str:
    """NVML identity of CUDA device `cuda_index` as this process sees it.

    CUDA and NVML number GPUs differently once CUDA_VISIBLE_DEVICES (or CUDA_DEVICE_ORDER) is
    set, so go by UUID when torch can tell it; else map through CUDA_VISIBLE_DEVICES (integer
    entries are taken as NVML indices, which holds with PCI_BUS_ID order or identical GPUs).
    """
    uuid = ""
    try:
        import torch

        if torch.cuda.is_available():
            uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    except Exception:  # noqa: BLE001 -- older torch without .uuid, ROCm: use the environment
        uuid = ""
    if uuid:
        return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    visible = [
        v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()
    ]
    if cuda_index < len(visible):
        entry = visible[cuda_index]
        return int(entry) if entry.isdigit() else entry
    return cuda_index


class RaplMeter(_Cumulative):
    """CPU energy from Linux powercap: the top-level package zones under `root`.

    /sys/class/powercap/intel-rapl:N is one socket ("package-N"); its sub-zones intel-rapl:N:M
    are core/uncore (already inside the package, so never added) and, on Intel servers, dram
    (a separate counter, *not* part of package: added only with include_dram=True). A top-level
    "psys" zone (laptops) contains the package and is skipped; intel-rapl-mmio:* duplicates the
    MSR zones and does not match the glob. AMD Zen: since Linux 5.11 the same intel_rapl_msr
    driver exposes the AMD package counter here (no dram zone); the old amd_energy hwmon driver
    left the mainline kernel (5.13) and is not read. Since 5.10 (PLATYPUS, CVE-2020-8694)
    energy_uj is root-only on most distributions: then the meter is unavailable.
    Counters wrap at max_energy_range_uj (~262 kJ on Intel: ~20 min at 200 W; AMD's 32-bit
    counter ~65 kJ: ~5 min): read() more often than `max_read_interval_s` or wraps go unseen.
    """

    method = "rapl"

    def __init__(
        self,
        root: str | os.PathLike = "/sys/class/powercap",
        include_dram: bool = False,
        clock: Clock = time.monotonic,
    ):
        root = Path(root)
        zones = []
        for top in sorted(root.glob("intel-rapl:*")):
            if top.name.count(":") != 1 or not _read_text(top / "name").startswith("package"):
                continue
            zones.append(top)
            if include_dram:
                zones += [
                    z
                    for z in sorted(root.glob(f"{top.name}:*"))
                    if _read_text(z / "name") == "dram"
                ]
        if not zones:
            raise MeterUnavailable(f"no RAPL package zone under {root}")
        self._zones = zones
        self._max_uj = [_read_uj(z / "max_energy_range_uj") for z in zones]
        self._last_uj = [_read_uj(z / "energy_uj") for z in zones]
        self._total_uj = 0
        super().__init__(clock)
        self.max_read_interval_s = min(self._max_uj) / 1e6 / 500.0  # one wrap at a 500 W socket
        names = [f"{z.name} ({_read_text(z / 'name')})" for z in zones]
        self.reason = f"rapl: {', '.join(names)}"

    def read(self) -> EnergySample:
        for i, zone in enumerate(self._zones):
            now = _read_uj(zone / "energy_uj")
            delta = now - self._last_uj[i]
            if delta < 0:  # wrapped once: the counter restarted from 0 after max_energy_range_uj
                delta += self._max_uj[i]
            self._total_uj += delta
            self._last_uj[i] = now
        return self._sample(self._total_uj / 1e6)


def _read_text(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_uj(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except PermissionError as e:
        raise MeterUnavailable(f"RAPL not readable: permission denied on {path}") from e
    except (OSError, ValueError) as e:
        why = os.strerror(e.errno) if getattr(e, "errno", None) else type(e).__name__
        raise MeterUnavailable(f"RAPL not readable: {path} ({why})") from e


def make_meter(
    device: str,
    local_rank: int,
    fallback_power_w: float,
    *,
    fallback_source: str = "fallback",
    rapl_root: str | os.PathLike = "/sys/class/powercap",
    nvml=None,
    clock: Clock = time.monotonic,
) -> EnergyMeter:
    """The best meter for this process; never raises. `meter.reason` says what and why, e.g.
    "energy: estimate (no NVML: ...; RAPL not readable: permission denied on ...);
    35 W per process".

    device "cuda[:N]": NVML on this rank's GPU (N, else local_rank), else estimate. RAPL is not
    tried there: it would count the CPUs only and hide the GPUs, which dominate.
    device "cpu": RAPL (local rank 0 counts the node's sockets, the others report 0), else estimate.
    """
    tried = []
    if device.startswith("cuda"):
        cuda_index = int(device.split(":")[1]) if ":" in device else _local_cuda_index(local_rank)
        try:
            nvml_dev = nvml_device_for_cuda(cuda_index)
            meter = NvmlMeter([nvml_dev], nvml=nvml, clock=clock)
            meter.reason = f"energy: {meter.reason} (cuda:{cuda_index} = NVML {nvml_dev})"
            return meter
        # ImportError, NVMLError (no driver/library): never raise
        except Exception as e:  # noqa: BLE001
            tried.append(f"no NVML: {str(e) or type(e).__name__}")
    else:
        try:
            meter = RaplMeter(rapl_root, clock=clock)
            if local_rank == 0:
                meter.reason = f"energy: {meter.reason}; local rank 0 reports the whole node"
                return meter
            return ZeroMeter(
                "rapl",
                f"energy: rapl counted by local rank 0 of this node; "
                f"local rank {local_rank} reports 0 J",
                clock=clock,
            )
        except MeterUnavailable as e:
            tried.append(str(e))
    return EstimateMeter(
        fallback_power_w,
        clock=clock,
        reason=(
            f"energy: estimate ({'; '.join(tried)}); {fallback_power_w:g} W per process "
            f"from {fallback_source}"
        ),
    )


def _local_cuda_index(local_rank: int) -> int:
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 -- a broken CUDA setup must not stop the run
        count = 0
    return local_rank % count if count else local_rank  # one visible GPU per process -> 0


def facility_kwh(it_joules: float, pue: float) -> float:
    """IT energy (J) -> facility energy (kWh): PUE adds cooling, power conversion, etc."""
    if pue < 1.0:
        raise ValueError(f"PUE must be >= 1 (facility >= IT energy), got {pue}")
    return it_joules / 3.6e6 * pue


def co2_kg(kwh_facility: float, intensity_g_per_kwh: float) -> float:
    """Facility energy (kWh) x grid carbon intensity (gCO2e/kWh) -> kg CO2e."""
    return kwh_facility * intensity_g_per_kwh / 1000.0
