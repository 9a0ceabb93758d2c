"""What a run measures about itself: one record per log interval, the same on every rank.

Metric names are fixed (see docs/architecture.md) so dashboards line up across runs. The
sinks that write the records (metrics.jsonl, W&B, console) are in megatrain/sinks.py.

Inside:
  mfu(...)                model FLOPs utilization from FLOPs/token, tokens/s and the peak
  resolve_peak(...)       the peak MFU is computed against, and where it comes from
  StepMetrics             per-step marks (cheap, local) -> collect(): one record (collective)

Timing a step without slowing it: the loop marks four points per step (begin_step, begin_compute,
begin_optimizer, end_step). On CPU these are perf_counter readings. On GPU the work is queued
asynchronously, so forward/backward and optimizer times are CUDA events recorded on the stream
(no synchronization) and read once per log interval, after a single torch.cuda.synchronize().
"""

from __future__ import annotations

import time

import torch

from megatrain import energy, hardware
from megatrain.dist import all_reduce


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak_flops: float) -> float:
    """Model FLOPs utilization: achieved model FLOP/s per device over the device's dense peak."""
    return flops_per_token * tokens_per_s_per_device / peak_flops if peak_flops > 0 else 0.0


def resolve_peak(
    precision: str,
    detected: hardware.Accelerator,
    override_tflops: dict[str, float],
    profile_accelerator: str = "",
) -> tuple[float, str]:
    """Dense peak FLOP/s per device for MFU, and a line saying where it comes from.

    Order: the cluster profile's `peak_tflops[precision]` (a measured or negotiated figure beats
    the datasheet), then the detected device's row in megatrain/hardware.py, then the row named by
    the profile's `accelerator` (for a GPU the table does not recognize by name). 0.0 when none
    is known: MFU is then left out of the records rather than computed against a made-up number.
    """
    if override_tflops.get(precision):
        return override_tflops[
            precision
        ] * 1e12, f"cluster profile peak_tflops.{precision} = {override_tflops[precision]:g}"
    candidates = [detected, hardware.ACCELERATORS.get(profile_accelerator)]
    for accel in candidates:
        if accel is None:
            continue
        try:
            flops = hardware.peak_flops(accel, precision)
        except ValueError:
            continue
        rough = ", rough" if accel.rough else ""
        return (
            flops,
            (
                f"{accel.name} dense {precision} peak {flops / 1e12:g} TFLOP/s "
                f"(megatrain/hardware.py{rough})"
            ),
        )
    return (
        0.0,
        (
            f"no {precision} peak known for {detected.name}: MFU not reported "
            "(set peak_tflops in the cluster profile)"
        ),
    )


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory, or the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class StepMetrics:
    """Measurements of the steps since the last log line, turned into one record for all ranks.

    Every rank calls, per optimizer step: begin_step() before fetching the batch, begin_compute()
    once it is in hand, begin_optimizer() after the last backward of the step, end_step(loss)
    after the optimizer step. All cheap and local (no GPU synchronization, no communication).
    collect() is collective, once per log interval: it averages loss and phase times over ranks,
    sums energy and power over ranks, takes the max of peak memory, and derives throughput, MFU,
    energy, CO2, GPU-hours (the meters' running time summed over ranks: the span the energy covers),
    ETA and the projected final energy and CO2.

    A checkpoint keeps its state_dict(): the energy and device time of the run so far, so that
    the cumulative figures of a resumed run continue.
    """

    def __init__(
        self,
        *,
        tokens_per_step: int,
        world_size: int,
        flops_per_token: float,
        peak_flops: float,
        meter,
        pue: float,
        intensity_g_per_kwh: float,
        device: torch.device,
        max_steps: int,
        first_step: int,
        clock=time.perf_counter,
    ):
        self.tokens_per_step, self.world_size = tokens_per_step, world_size
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.meter, self.pue, self.intensity = meter, pue, intensity_g_per_kwh
        self.device, self.max_steps, self.first_step = device, max_steps, first_step
        self.energy_before_j = self.device_s_before = 0.0  # earlier jobs of the run
        self.cuda = device.type == "cuda"
        self.clock = clock
        self.t_start = clock()
        self.skipped_steps = 0
        self._reset()

    def _reset(self) -> None:
        self._loss_sum = 0.0
        self._steps = 0
        self._data_wait_s = self._wall_s = 0.0
        self._marks: list[tuple] = []  # (compute, optimizer, end) stamps of each step
        self._t_step = self._t_end = None

    # -- per step, every rank ---------------------------------------------------------------
    def _stamp(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return self.clock()

    def begin_step(self) -> None:
        self._t_step = self.clock()

    def begin_compute(self) -> None:
        self._data_wait_s += self.clock() - self._t_step
        self._compute = self._stamp()

    def begin_optimizer(self) -> None:
        self._optimizer = self._stamp()

    def end_step(self, loss: float, skipped_steps: int = 0) -> None:
        """`loss`: the step's mean loss. `skipped_steps`: updates skipped so far in the run."""
        self._marks.append((self._compute, self._optimizer, self._stamp()))
        self._t_end = self.clock()
        self._wall_s += self._t_end - self._t_step
        self._loss_sum += float(loss)
        self._steps += 1
        self.skipped_steps = int(skipped_steps)

    # -- per log interval, collective --------------------------------------------------------
    def _phase_seconds(self) -> tuple[float, float]:
        """Forward+backward and optimizer seconds summed over the interval's steps."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            return (
                sum(c.elapsed_time(o) for c, o, _ in self._marks) / 1000,
                sum(o.elapsed_time(e) for _, o, e in self._marks) / 1000,
            )
        return sum(o - c for c, o, _ in self._marks), sum(e - o for _, o, e in self._marks)

    def collect(self, step: int, **extra) -> dict:
        """One record for the steps since the last collect(); call on every rank at the same
        step."""
        # synchronizes the GPU: the clock below is honest
        fwd_bwd_s, optimizer_s = self._phase_seconds()
        now = self.clock()
        if self._t_end is not None:
            self._wall_s += now - self._t_end  # GPU work still queued at end_step() finished by now
        n = max(self._steps, 1)
        sample = self.meter.read()
        sums = all_reduce(
            {
                "loss": self._loss_sum,
                "joules": sample.joules,
                "power_w": sample.power_w,
                "metered_s": sample.elapsed_s,
                "wall_s": self._wall_s,
                "data_wait_s": self._data_wait_s,
                "fwd_bwd_s": fwd_bwd_s,
                "optimizer_s": optimizer_s,
                "estimating_ranks": 1.0 if sample.method == "estimate" else 0.0,
            }
        )
        mem_gb = all_reduce({"mem_gb": peak_memory_gb(self.device)}, "max")["mem_gb"]
        joules, wall_s = sums["joules"], sums["wall_s"]
        w = self.world_size
        step_s = wall_s / w / n  # mean over ranks, per step
        tok_s = self.tokens_per_step / step_s if step_s > 0 else 0.0
        per_device = tok_s / w
        joules_total = joules + self.energy_before_j
        kwh_facility = energy.facility_kwh(joules_total, self.pue)
        elapsed = now - self.t_start
        done = max(step - self.first_step, 1)  # steps this job
        remaining = max(self.max_steps - step, 0)
        projected_j = joules_total + joules / done * remaining
        record = {
            "step": step,
            "loss": sums["loss"] / (n * w),
            **extra,
            "tokens_per_s": tok_s,
            "tokens_per_s_per_gpu": per_device,
            "tflops_per_gpu": self.flops_per_token * per_device / 1e12,
        }
        if self.peak_flops > 0:
            record["mfu"] = mfu(self.flops_per_token, per_device, self.peak_flops)
        record.update(
            {
                "step_s": step_s,
                "data_wait_s": sums["data_wait_s"] / w / n,
                "fwd_bwd_s": sums["fwd_bwd_s"] / w / n,
                "optimizer_s": sums["optimizer_s"] / w / n,
                "skipped_steps": self.skipped_steps,
                "mem_gb": mem_gb,
                # the span the energy covers
                "gpu_hours": (self.device_s_before + sums["metered_s"]) / 3600,
                "power_w": sums["power_w"],
                "energy_kwh_it": joules_total / 3.6e6,
                "energy_kwh_facility": kwh_facility,
                "co2_kg": energy.co2_kg(kwh_facility, self.intensity),
                # one estimating rank makes the whole sum an estimate, and it says so
                "energy_method": "estimate" if sums["estimating_ranks"] > 0 else sample.method,
                "eta_s": elapsed / done * remaining,
                "projected_kwh_facility": energy.facility_kwh(projected_j, self.pue),
                "projected_co2_kg": energy.co2_kg(
                    energy.facility_kwh(projected_j, self.pue), self.intensity
                ),
            }
        )
        self._reset()
        return record

    def state_dict(self) -> dict:
        """Energy (J, all ranks) and device-seconds of the run so far (collective): a resumed run
        continues its cumulative figures."""
        sample = self.meter.read()
        sums = all_reduce({"energy_j": sample.joules, "device_s": sample.elapsed_s})
        return {
            "energy_j": sums["energy_j"] + self.energy_before_j,
            "device_s": sums["device_s"] + self.device_s_before,
        }

    def load_state_dict(self, state: dict) -> None:
        self.energy_before_j = float(state.get("energy_j", 0.0))
        self.device_s_before = float(state.get("device_s", 0.0))

    def add_unsaved_work(self, energy_j: float, device_s: float) -> None:
        """Count work that no checkpoint holds (a crashed job's steps after its last checkpoint,
        as its last metrics record measured them): the run's totals include all work done."""
        self.energy_before_j += max(energy_j, 0.0)
        self.device_s_before += max(device_s, 0.0)
