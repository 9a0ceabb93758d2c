"""The benchmarks are not tests, but they must keep running: smoke-run them on the CPU."""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port


@pytest.mark.slow
def test_train_throughput_bench_runs_both_sides(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "bench/train_throughput.py",
            "--device",
            "cpu",
            "--model",
            "tiny",
            "--seq-len",
            "32",
            "--micro-batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--precision",
            "fp32",
            "--no-compile",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    for side in ("megatrain", "reference"):
        assert result[side]["tokens_per_s"] > 0 and 0 < result[side]["mfu"] < 1
    assert result["ratio"] > 0 and result["flops_per_token"] > 0


def test_gpu_check_skips_every_check_without_a_gpu_and_says_why():
    out = subprocess.run(
        [sys.executable, "bench/gpu_check.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert lines[0]["check"] == "environment" and lines[0]["status"] == "SKIP"
    assert {"train-bf16-zero1", "exact-resume", "throughput-1.3b-compiled"} <= {
        x["check"] for x in lines
    }
    assert all(x["status"] == "SKIP" and x["why"] for x in lines)


def write_run(run_dir, records, events=()):
    (run_dir / "checkpoints" / "step00000040").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_gpu_check_judges_a_training_run_by_its_files(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    from gpu_check import judge_training

    good = {
        "tokens_per_s": 5e5,
        "mfu": 0.4,
        "energy_method": "nvml",
        "energy_kwh_it": 0.01,
        "mem_gb": 20,
        "loss_scale": 1024.0,
    }
    write_run(tmp_path / "ok", [{**good, "loss": 9.0}, {**good, "loss": 6.5}])
    status, figures = judge_training(tmp_path / "ok", "fp16")
    assert status == "PASS" and figures["loss_scale"] == 1024.0 and figures["checkpoints"]
    flat = [{**good, "loss": 9.0}, {**good, "loss": 8.8, "energy_method": "estimate"}]
    write_run(tmp_path / "bad", flat, [{"event": "rollback"}])
    status, figures = judge_training(tmp_path / "bad", "bf16")
    assert status == "FAIL" and figures["rollbacks"] == 1
    assert {"the loss did not fall by 1", "energy not measured by NVML", "rolled back"} <= set(
        figures["why"]
    )


@pytest.mark.slow
def test_faults_bench_kills_a_rank_and_reports_one_row(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/faults.py", "--only", "kill9_rank", "--tries", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert row["fault"] == "kill9_rank" and row["tries"] == 1, row
    assert row["exit_code"] and row["seconds_until_all_gone"]["max"] >= 0, row
    assert row["steps_lost"] is not None and row["resumed_bit_identical"] is True, row
    assert not any(n.startswith("bench error") for n in row["notes"]), row
