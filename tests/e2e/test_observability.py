"""One 2-process run, read back through every sink: metrics.jsonl, events.jsonl, the offline W&B run
(with `wandb leet inspect`, as a user would), the console, and `megatrain report`."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, read_jsonl, run_train

TINY = REPO / "configs" / "tiny.yaml"
WANDB = Path(sys.executable).parent / "wandb"
DOCUMENTED = [
    "step",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_per_s_per_gpu",
    "tflops_per_gpu",
    "mfu",
    "step_s",
    "data_wait_s",
    "fwd_bwd_s",
    "optimizer_s",
    "skipped_steps",
    "mem_gb",
    "gpu_hours",
    "power_w",
    "energy_kwh_it",
    "energy_kwh_facility",
    "co2_kg",
    "energy_method",
    "eta_s",
    "projected_kwh_facility",
    "projected_co2_kg",
]


@pytest.fixture(scope="module")
def run(tiny_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("observed") / "run"
    out = run_train(
        TINY,
        [
            f"data.sources.0.path={tiny_dataset}",
            "data.seq_len=64",
            "batch.micro_batch=4",
            "batch.grad_accum=2",
            "precision=fp32",
            "run.max_steps=12",
            "run.log_every=3",
            "run.eval_every=6",
            "run.ckpt_every=0",
            "optim.warmup_steps=4",
            f"run.dir={run_dir}",
            "wandb.mode=offline",
        ],
    )
    return run_dir, out.stdout


def run_start(run_dir) -> dict:
    return next(e for e in read_jsonl(run_dir / "events.jsonl") if e["event"] == "run_start")


def leet(*args):
    result = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", *args],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return result.stdout


@pytest.mark.slow
def test_metrics_jsonl_records_are_complete_and_consistent(run):
    run_dir, _ = run
    records = read_jsonl(run_dir / "metrics.jsonl")
    start = run_start(run_dir)
    assert [r["step"] for r in records] == [3, 6, 9, 12]
    tokens_per_step = start["tokens_per_step"]
    assert tokens_per_step == 16 * 64
    for r in records:
        assert set(DOCUMENTED) <= set(r), set(DOCUMENTED) - set(r)
        assert r["tokens"] == r["step"] * tokens_per_step
        assert r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_s"], rel=1e-9)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2, rel=1e-9)
        assert r["mfu"] == pytest.approx(
            start["flops_per_token"] * r["tokens_per_s_per_gpu"] / start["peak_flops"]
        )
        split = r["data_wait_s"] + r["fwd_bwd_s"] + r["optimizer_s"]
        assert 0.5 * r["step_s"] < split <= r["step_s"] * 1.001, (
            r
        )  # the phases are the step, minus bookkeeping
        assert (
            r["fwd_bwd_s"] > r["optimizer_s"] > 0 and r["skipped_steps"] == 0 and r["mem_gb"] > 0.1
        )
        assert r["energy_kwh_facility"] == pytest.approx(
            r["energy_kwh_it"] * start["cluster_profile"]["pue"]
        )
        assert r["co2_kg"] == pytest.approx(
            r["energy_kwh_facility"] * start["cluster_profile"]["carbon_intensity_g_per_kwh"] / 1000
        )
        assert r["energy_method"] == start["energy_method"] in ("estimate", "rapl")
    energy = [r["energy_kwh_it"] for r in records]
    assert energy == sorted(energy) and energy[0] > 0
    last = records[-1]
    assert last["eta_s"] == 0 and last["projected_kwh_facility"] == pytest.approx(
        last["energy_kwh_facility"]
    )
    assert [("val_loss" in r) for r in records] == [False, True, False, True]
    if (
        last["energy_method"] == "estimate"
    ):  # 15 W per process in configs/clusters/local.yaml, 2 processes
        assert last["power_w"] == pytest.approx(30.0, rel=0.01)
        assert last["energy_kwh_it"] * 1000 == pytest.approx(last["gpu_hours"] * 15.0, rel=0.01)


@pytest.mark.slow
def test_run_start_event_carries_config_cluster_versions_and_methods(run):
    run_dir, _ = run
    start = run_start(run_dir)
    assert start["event"] == "run_start" and start["start_step"] == 0 and start["max_steps"] == 12
    assert start["config"]["run"]["max_steps"] == 12 and start["cluster_profile"]["name"] == "local"
    versions = start["versions"]
    assert versions["torch"] and versions["deepspeed"] and len(versions["git_commit"]) == 40
    assert start["energy_reason"].startswith("energy: ") and "TFLOP/s" in start["peak_source"]


@pytest.mark.slow
def test_offline_wandb_history_matches_metrics_jsonl(run):
    run_dir, _ = run
    records = {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}
    (wandb_run,) = run_dir.glob("wandb/offline-run-*")
    history = [
        json.loads(line)["history"]["item"]
        for line in leet(str(wandb_run)).splitlines()
        if '"type":"history"' in line
    ]
    assert [h["step"] for h in history] == sorted(records)
    for h in history:
        r = records[h["step"]]
        numeric = {k: v for k, v in r.items() if isinstance(v, (int, float))}
        assert {k: h[k] for k in numeric} == pytest.approx(numeric, rel=1e-12), h["step"]
    summary = json.loads(leet("--summary", str(wandb_run)))
    assert summary["state"] == "finished"
    config = summary["config"]
    assert config["versions"]["git_commit"] == run_start(run_dir)["versions"]["git_commit"]
    assert (
        config["cluster_profile"]["pue"] == 1
        and config["energy_method"] == records[12]["energy_method"]
    )


@pytest.mark.slow
def test_console_lines_are_plain_with_progress_and_projection(run):
    _, stdout = run
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split("|")[0].strip() for line in lines] == [
        "step      3/12 (25%)",
        "step      6/12 (50%)",
        "step      9/12 (75%)",
        "step     12/12 (100%)",
    ]
    assert "\x1b[" not in stdout and "\r" not in stdout  # not a terminal: no bar, no escape codes
    assert "eta " in lines[0] and " -> ~" in lines[0] and "CO2e" in lines[0]
    if "(est.)" not in lines[0]:
        assert "rapl" in stdout


@pytest.mark.slow
def test_report_writes_plots_and_summary(run):
    run_dir, _ = run
    out = subprocess.run(
        [sys.executable, "-m", "megatrain.cli", "report", str(run_dir)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    for name in ("loss", "throughput", "step_time", "energy", "co2"):
        png = run_dir / "report" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["tokens"] == 12 * 16 * 64 and 0 < summary["mean_mfu"] < 1
    assert (
        summary["gpu_hours"] > 0
        and summary["co2_kg"] > 0
        and math.isfinite(summary["energy_kwh_it"])
    )
    for words in ("GPU-hours", "energy (IT)", "CO2e", "mean MFU", "energy method"):
        assert words in out.stdout
    assert ("ESTIMATED" in out.stdout) == (summary["energy_method"] == "estimate")
