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
