"""`megatrain report` on a hand-made run directory: time-weighted means, labels, plots, error
messages."""

import json

import pytest

from megatrain.cli import main
from megatrain.report import ReportError, report, summarize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def records(method="estimate"):
    # interval 1: 10 steps of 2 s at 10% MFU; interval 2: 30 steps of 1 s at 20% MFU
    common = {
        "data_wait_s": 0.1,
        "optimizer_s": 0.1,
        "mem_gb": 1.0,
        "skipped_steps": 0,
        "energy_method": method,
    }
    return [
        {
            "step": 10,
            "tokens": 10_000,
            "loss": 5.0,
            "tokens_per_s": 500.0,
            "tflops_per_gpu": 1.0,
            "mfu": 0.1,
            "step_s": 2.0,
            "fwd_bwd_s": 1.8,
            "power_w": 800.0,
            "gpu_hours": 0.05,
            "energy_kwh_it": 0.04,
            "energy_kwh_facility": 0.048,
            "co2_kg": 0.048 * 0.057,
            **common,
        },
        {
            "step": 40,
            "tokens": 40_000,
            "loss": 4.0,
            "val_loss": 4.2,
            "tokens_per_s": 1000.0,
            "tflops_per_gpu": 2.0,
            "mfu": 0.2,
            "step_s": 1.0,
            "fwd_bwd_s": 0.8,
            "power_w": 800.0,
            "gpu_hours": 0.1,
            "energy_kwh_it": 0.08,
            "energy_kwh_facility": 0.096,
            "co2_kg": 0.096 * 0.057,
            **{**common, "mem_gb": 2.0},
        },
    ]


def write_run(run_dir, recs, info=None):
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 41, "lo'
    )
    if info:
        (run_dir / "events.jsonl").write_text(json.dumps({"event": "run_start", **info}) + "\n")
    return run_dir


INFO = {
    "cluster_profile": {"name": "jz", "pue": 1.2, "carbon_intensity_g_per_kwh": 57},
    "params": 1.25e8,
    "world_size": 8,
    "accelerator": "A100 SXM4 80GB",
    "energy_reason": "energy: estimate (no NVML: ...)",
    "peak_source": "A100 SXM4 80GB dense bf16 peak 312 TFLOP/s",
    "config": {"run": {"name": "demo"}},
}


def test_summary_time_weights_rates_and_labels_estimates(tmp_path):
    run = write_run(tmp_path / "run", records(), INFO)
    text, pngs = report(run)
    s = json.loads((run / "report" / "summary.json").read_text())
    assert s["mean_mfu"] == pytest.approx((0.1 * 20 + 0.2 * 30) / 50)  # weighted by 20 s and 30 s
    assert s["mean_tokens_per_s"] == pytest.approx((500 * 20 + 1000 * 30) / 50)
    assert s["mean_power_w_per_gpu"] == pytest.approx(800.0)  # 0.08 kWh over 0.1 GPU-h
    assert (s["steps"], s["tokens"], s["final_val_loss"], s["peak_mem_gb"]) == (
        40,
        40_000,
        4.2,
        2.0,
    )
    assert (
        "ESTIMATED" in text
        and "GPU-hours         0.1 " in text
        and "mean MFU          16.00%" in text
    )
    assert "CO2e (facility) = 0.096 kWh x 57 gCO2e/kWh / 1000 = 0.00547 kg" in text
    md = (run / "report" / "summary.md").read_text()
    assert (
        "| energy method | ESTIMATED (device power x time, not measured) |" in md
        and "![co2](co2.png)" in md
    )
    assert [p.name for p in pngs] == [
        "loss.png",
        "throughput.png",
        "step_time.png",
        "energy.png",
        "co2.png",
    ]
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, p


def test_measured_energy_is_called_measured_and_info_is_optional(tmp_path):
    run = write_run(tmp_path / "run", records("nvml"))
    text, _ = report(run)
    assert "measured (nvml)" in text and "ESTIMATED" not in text
    assert "formula" not in summarize(
        records("nvml")
    )  # no PUE/intensity known: no made-up arithmetic


def test_errors_name_the_file(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert f"{tmp_path}/metrics.jsonl not found" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(ReportError, match="no records yet"):
        report(tmp_path)
