"""A run whose loss turns non-finite with no checkpoint to roll back to stops by name, instead of
training NaN to the end and saving it."""

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, events

TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def test_a_diverged_run_without_checkpoint_stops_with_a_named_error(tiny_dataset, tmp_path):
    """optim.lr=1e30 (inf is refused at load): the first update blows the weights up, the next
    steps' gradients are non-finite (their updates skipped); after guard.max_bad_steps of them
    the run stops, exit 2, one line (before: NaN trained to the end and was saved, exit 0)."""
    run_dir = tmp_path / "run"
    overrides = {
        "data.sources.0.path": tiny_dataset,
        "data.seq_len": 64,
        "batch.micro_batch": 4,
        "batch.grad_accum": 1,
        "precision": "fp32",
        "run.max_steps": 12,
        "run.log_every": 1,
        "run.eval_every": 0,
        "run.ckpt_every": 0,
        "optim.lr": 1e30,
        "optim.min_lr": 0,
        "optim.warmup_steps": 0,
        "guard.max_bad_steps": 3,
        "wandb.mode": "disabled",
        "run.dir": run_dir,
    }
    cmd = [sys.executable, "-m", "megatrain.cli", "train", str(TINY)]
    out = subprocess.run(
        cmd + [f"{k}={v}" for k, v in overrides.items()],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=os.environ,
        timeout=600,
    )
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    (line,) = [x for x in out.stderr.splitlines() if "error:" in x]
    assert "loss or gradients non-finite for 3 steps" in line and "optim.lr" in line
    (error,) = events(run_dir, "error")
    assert error["type"] == "TrainingDiverged" and error["step"] < 12
    assert [e["step"] for e in events(run_dir, "skipped_step")][-3:] == [
        error["step"] - 2,
        error["step"] - 1,
        error["step"],
    ]
    assert not events(run_dir, "checkpoint")
    assert not list(run_dir.glob("checkpoints/step*")), "a diverged run saved a checkpoint"
