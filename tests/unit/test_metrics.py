"""Metrics math on known inputs: MFU, throughput, the step-time split, energy, CO2, GPU-hours,
projections."""

import pytest
import torch

from megatrain import hardware
from megatrain.energy import EstimateMeter, NvmlMeter
from megatrain.metrics import StepMetrics, mfu, resolve_peak
from tests.unit.test_energy import FakeClock, fake_nvml


def test_mfu_known_inputs():
    # 1 GFLOP/token at 100k tokens/s on an A100 (312 TFLOP/s bf16 dense): 100 TFLOP/s achieved
    assert mfu(1e9, 1e5, 312e12) == pytest.approx(100 / 312)
    assert mfu(1e9, 1e5, 0.0) == 0.0


def make(clock, meter=None, **kw):
    args = dict(
        tokens_per_step=1024,
        world_size=1,
        flops_per_token=1e6,
        peak_flops=1e12,
        pue=1.5,
        intensity_g_per_kwh=50.0,
        device=torch.device("cpu"),
        max_steps=10,
        first_step=0,
    )
    args.update(kw)
    return StepMetrics(meter=meter or EstimateMeter(100.0, clock=clock), clock=clock, **args)


def step(m, clock, data_s, fwd_bwd_s, optimizer_s, loss, skipped=0):
    m.begin_step()
    clock.t += data_s
    m.begin_compute()
    clock.t += fwd_bwd_s
    m.begin_optimizer()
    clock.t += optimizer_s
    m.end_step(torch.tensor(loss, dtype=torch.float64), skipped_steps=skipped)


def test_collect_derives_throughput_split_energy_and_projection():
    clock = FakeClock(0.0)
    m = make(clock)
    step(m, clock, 0.1, 0.4, 0.1, 2.0)
    step(m, clock, 0.0, 0.4, 0.2, 4.0)
    r = m.collect(2, lr=1e-3)
    assert r["loss"] == 3.0 and r["lr"] == 1e-3 and r["step"] == 2
    assert r["step_s"] == pytest.approx(0.6)
    assert (r["data_wait_s"], r["fwd_bwd_s"], r["optimizer_s"]) == pytest.approx((0.05, 0.4, 0.15))
    assert r["tokens_per_s"] == pytest.approx(1024 / 0.6) == r["tokens_per_s_per_gpu"]
    assert r["tflops_per_gpu"] == pytest.approx(1e6 * 1024 / 0.6 / 1e12)
    assert r["mfu"] == pytest.approx(1e6 * 1024 / 0.6 / 1e12)
    # 100 W for 1.2 s = 120 J; PUE 1.5; 50 g/kWh
    assert r["energy_kwh_it"] == pytest.approx(120 / 3.6e6)
    assert r["energy_kwh_facility"] == pytest.approx(180 / 3.6e6)
    assert r["co2_kg"] == pytest.approx(180 / 3.6e6 * 50 / 1000)
    assert r["power_w"] == pytest.approx(100.0) and r["energy_method"] == "estimate"
    assert r["gpu_hours"] == pytest.approx(1.2 / 3600)
    assert r["eta_s"] == pytest.approx(0.6 * 8)
    # 60 J per step so far, 8 steps to go: 600 J at the end
    assert r["projected_kwh_facility"] == pytest.approx(600 * 1.5 / 3.6e6)
    assert r["projected_co2_kg"] == pytest.approx(600 * 1.5 / 3.6e6 * 50 / 1000)


def test_evaluation_time_is_outside_step_time_but_inside_gpu_hours():
    clock = FakeClock(0.0)
    m = make(clock)
    step(m, clock, 0.0, 0.5, 0.5, 1.0)
    m.collect(1)
    clock.t += 100.0  # a validation pass and a checkpoint between two log lines
    step(m, clock, 0.0, 0.25, 0.25, 1.0)
    r = m.collect(2)
    assert r["step_s"] == pytest.approx(0.5) and r["tokens_per_s"] == pytest.approx(2048)
    assert r["gpu_hours"] == pytest.approx(101.5 / 3600)
    assert r["energy_kwh_it"] == pytest.approx(100 * 101.5 / 3.6e6)


def test_resumed_run_continues_energy_and_gpu_hours():
    clock = FakeClock(0.0)
    m = make(clock, first_step=5)
    m.load_state_dict({"energy_j": 3.6e6, "device_s": 3600.0, "consumed_samples": 80})
    step(m, clock, 0.0, 1.0, 1.0, 1.0)
    r = m.collect(6)
    assert r["energy_kwh_it"] == pytest.approx(1 + 200 / 3.6e6)
    assert r["gpu_hours"] == pytest.approx(1 + 2 / 3600)
    assert r["eta_s"] == pytest.approx(2.0 * 4)  # only this job's steps set the pace
    state = m.state_dict()
    assert state == {"energy_j": pytest.approx(3.6e6 + 200), "device_s": pytest.approx(3602.0)}


def test_skipped_steps_and_unknown_peak():
    clock = FakeClock(0.0)
    m = make(clock, peak_flops=0.0)
    step(m, clock, 0.0, 1.0, 1.0, 1.0, skipped=3)
    r = m.collect(1)
    assert r["skipped_steps"] == 3
    assert "mfu" not in r and r["tflops_per_gpu"] > 0  # no made-up peak, no MFU


def test_nvml_meter_is_read_at_each_collect():
    mj = {0: 1_000_000}
    clock = FakeClock(0.0)
    m = make(clock, meter=NvmlMeter([0], nvml=fake_nvml(mj, {0: 0}), clock=clock))
    step(m, clock, 0.0, 1.0, 1.0, 1.0)
    mj[0] += 700_000  # 700 J over 2 s
    r = m.collect(1)
    assert r["energy_method"] == "nvml" and r["power_w"] == pytest.approx(350.0)
    assert r["energy_kwh_it"] == pytest.approx(700 / 3.6e6)
    step(m, clock, 0.0, 1.0, 1.0, 1.0)
    mj[0] += 1_400_000
    r = m.collect(2)
    assert r["power_w"] == pytest.approx(700.0) and r["energy_kwh_it"] == pytest.approx(
        2100 / 3.6e6
    )


def test_resolve_peak_order():
    a100 = hardware.ACCELERATORS["A100-SXM-80GB"]
    assert resolve_peak("bf16", a100, {"bf16": 280.0})[0] == 280e12  # the profile's override wins
    flops, source = resolve_peak("bf16", a100, {})
    assert flops == 312e12 and "A100" in source
    unknown = hardware.Accelerator("unknown-gpu", "NVIDIA Future GPU", {}, None, "", rough=True)
    assert resolve_peak("bf16", unknown, {}, "H100-SXM")[0] == pytest.approx(989.4e12)
    flops, source = resolve_peak("bf16", unknown, {}, "cpu")
    assert flops == 0.0 and "MFU not reported" in source
    v100 = hardware.ACCELERATORS["V100-SXM2-32GB"]
    assert (
        resolve_peak("bf16", v100, {})[0] == 0.0
    )  # no bf16 units on Volta: no MFU rather than a wrong one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_phases_are_event_times_read_once_per_interval():
    device = torch.device("cuda", torch.cuda.current_device())
    m = StepMetrics(
        tokens_per_step=1024,
        world_size=1,
        flops_per_token=1e6,
        peak_flops=1e15,
        pue=1.0,
        intensity_g_per_kwh=50.0,
        device=device,
        max_steps=10,
        first_step=0,
        meter=EstimateMeter(1.0),
    )
    a = torch.randn(4096, 4096, device=device)
    for _ in range(3):
        m.begin_step()
        m.begin_compute()
        loss = (a @ a).mean()  # queued, not waited for
        m.begin_optimizer()
        a = a * 0.5
        m.end_step(loss)
    r = m.collect(3)
    assert r["fwd_bwd_s"] > 0 and r["optimizer_s"] > 0
    assert (
        r["fwd_bwd_s"] + r["optimizer_s"] <= r["step_s"] * 1.01
    )  # the tail of queued work is in step_s
    assert r["mem_gb"] > 0.05
