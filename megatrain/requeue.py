"""How a training job ends: the same under `megatrain train` and `megatrain submit`.

A training job on Jean Zay lives 20 hours at most; a run lives weeks. The chain is:

    Slurm warns every task before the time limit (`--signal=USR1@300`, or SIGTERM)
      -> all ranks agree to stop at the same step (megatrain/stop.py)
      -> the loop finishes the step, saves a checkpoint, returns          (megatrain/train.py)
      -> `train_job()`: rank 0 runs `scontrol requeue $SLURM_JOB_ID`, within `run.max_restarts`
      -> Slurm restarts the same job (same id, SLURM_RESTART_COUNT + 1); it resumes from the
         checkpoint.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from megatrain import dist
from megatrain.config import Config
from megatrain.sinks import EventLog
from megatrain.stop import stop_signal
from megatrain.train import train


def train_job(cfg: Config) -> tuple[dict, bool]:
    """Train, then on every rank: note where the offline W&B runs are, requeue the Slurm job if a
    signal stopped it, and close the process group. Returns (summary, requeued); a requeued job
    should exit at once: Slurm is about to kill it."""
    summary = train(cfg)  # an exception propagates: the launcher (torchrun, srun) stops the others
    rank = dist.rank_world()[0]
    requeued = False
    if rank == 0:
        state = "stopped" if summary["interrupted"] else "finished"
        print(f"megatrain: {state} at step {summary['steps']}; run directory {summary['run_dir']}")
        events = EventLog(cfg.run_dir, echo=lambda line: print(line, flush=True))
        _wandb_note(cfg.run_dir, events)
        if summary["interrupted"] and stop_signal():
            requeued = _requeue(cfg, summary, events)
    requeued = dist.all_reduce({"requeued": float(requeued)})["requeued"] > 0
    dist.teardown()
    sys.stdout.flush()
    sys.stderr.flush()
    return summary, requeued


def requeue_decision(
    signal_name: str, restarts: int, max_restarts: int, job_state: str
) -> tuple[bool, str]:
    """Whether to requeue a job that a signal stopped, and why (pure: unit-tested)."""
    if signal_name == "SIGINT":
        return False, "Ctrl-C is the user's stop, not the time limit's; rerun to resume"
    if job_state and job_state != "RUNNING":
        # `scancel`, the time limit itself or a preemption: Slurm is already ending the job (and
        # requeues it itself if preemption says so). A user's scancel must stay a cancel.
        return False, f"Slurm is ending the job (state {job_state}); rerun the same job to resume"
    if restarts >= max_restarts:
        return False, (
            f"restart cap reached ({restarts} restarts, run.max_restarts={max_restarts}); "
            "submit the job again to continue"
        )
    return True, f"{signal_name} before the time limit"


def _job_state(job_id: str) -> str:
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    m = re.search(r"\bJobState=(\S+)", out)
    return m.group(1) if m else ""


def _wandb_note(run_dir: Path, events: EventLog) -> None:
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))  # one per job
    if runs:
        sync = f"wandb sync {run_dir / 'wandb'}/offline-run-*"
        events.write({"event": "wandb_offline", "run": runs[-1], "runs": len(runs), "sync": sync})
        print(f"megatrain: W&B ran offline; from a login node with internet: {sync}", flush=True)


def _requeue(cfg: Config, summary: dict, events: EventLog) -> bool:
    sig, job = stop_signal(), os.environ.get("SLURM_JOB_ID")
    if not job:
        reason = "not a Slurm job; rerun the same command to resume"
        events.write({"event": "requeue_skipped", "signal": sig, "reason": reason})
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    ok, reason = requeue_decision(sig, restarts, cfg.run.max_restarts, _job_state(job))
    if not ok:
        events.write({"event": "requeue_skipped", "job_id": job, "signal": sig, "reason": reason})
        print(f"megatrain: not requeueing Slurm job {job}: {reason}", flush=True)
        return False
    events.write(
        {
            "event": "requeued",
            "job_id": job,
            "signal": sig,
            "step": summary["steps"],
            "restart": restarts + 1,
            "max_restarts": cfg.run.max_restarts,
        }
    )
    print(
        f"megatrain: requeueing Slurm job {job} after {reason} (restart {restarts + 1} of at most "
        f"{cfg.run.max_restarts}); it resumes from step {summary['steps']}",
        flush=True,
    )
    try:
        proc = subprocess.run(
            ["scontrol", "requeue", job], capture_output=True, text=True, timeout=120
        )
        error = proc.stderr.strip() if proc.returncode else ""
    except (OSError, subprocess.SubprocessError) as e:
        error = repr(e)
    if error:  # the checkpoint is saved: resubmitting the job resumes it
        events.write({"event": "requeue_failed", "job_id": job, "error": error})
        print(f"megatrain: scontrol requeue {job} failed: {error}", flush=True)
        return False
    return True
