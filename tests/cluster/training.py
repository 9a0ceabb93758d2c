"""Shared by the training tests on the local Slurm cluster: the run's overrides, readers of a run
directory and of a job's output, and one uninterrupted reference run for the session."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, events, losses

SCRIPT = REPO / "slurm" / "pretrain.sh"
CONFIG = REPO / "configs" / "tiny.yaml"
STEPS = 30
COMMON = [
    "data.seq_len=64",
    "batch.micro_batch=4",
    "batch.grad_accum=2",
    "parallel.zero_stage=2",
    "precision=fp32",
    "run.log_every=1",
    "run.eval_every=0",
    "run.ckpt_every=0",
    "optim.warmup_steps=4",
    "optim.lr=1e-2",
]
# The script's own warning (USR1@300) would come at once in a short job: tests say when they
# want one.
NO_WARNING = "--signal=USR1@1"


def job_env(cluster) -> dict:
    """The test venv's `python` first on PATH: the script runs plain `srun python ...`."""
    return {"PATH": f"{Path(cluster.python).parent}:{os.environ['PATH']}"}


def overrides(data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.sources.0.path={data}",
        f"run.dir={run_dir}",
        f"run.max_steps={STEPS}",
        *COMMON,
        *extra,
    ]


def job_text(cluster, job: str) -> str:
    out = cluster.output_path(job)
    err = out.with_suffix(".err")
    return (
        out.read_text(errors="replace")
        + "\n--- stderr\n"
        + (err.read_text(errors="replace") if err.exists() else "")
    )


BOOKKEEPING = {"run_start", "parameter_memory", "memory_vs_plan"}  # every job, at start


def lifecycle_events(run_dir: Path) -> list[dict]:
    """The run's lifecycle events (checkpoints, stops, requeues, resumes, W&B notes), oldest
    first."""
    return [e for e in events(run_dir) if e["event"] not in BOOKKEEPING]


def incarnations(job: str) -> list[str]:
    """The states of each job of a requeued run, oldest first (sacct --duplicates)."""
    for _ in range(40):  # slurmctld reports to slurmdbd asynchronously
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "--duplicates", "-j", job, "-o", "State"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if out and out[-1] == "COMPLETED":
            break
        time.sleep(0.25)
    return out


def last_step(run_dir: Path) -> int:
    """The newest step recorded in metrics.jsonl (0 before the first)."""
    if not (run_dir / "metrics.jsonl").exists():
        return 0
    return max(losses(run_dir), default=0)


def wait_for_step(run_dir: Path, step: int, timeout: float = 240, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if last_step(run_dir) >= step:
            return
        time.sleep(poll_s)
    raise TimeoutError(f"no step {step} in {run_dir} after {timeout} s")


@pytest.fixture(scope="session")
def reference_run(slurm_cluster, tiny_dataset, tmp_path_factory):
    """An uninterrupted run, 1 node x 2 tasks: (job id, run dir). The first training job of the
    session also compiles DeepSpeed's CPU op into TORCH_EXTENSIONS_DIR (~50 s, once)."""
    cwd = tmp_path_factory.mktemp("slurm_reference")
    job, state, _ = slurm_cluster.run(
        SCRIPT,
        CONFIG,
        *overrides(tiny_dataset, cwd / "run"),
        cwd=cwd,
        env=job_env(slurm_cluster),
        timeout=300,
        sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--time=10", NO_WARNING],
    )
    assert state == "COMPLETED", job_text(slurm_cluster, job)
    return job, cwd / "run"
