"""How a training job ends: the same under `megatrain train` and `megatrain submit`.

A training job on Jean Zay lives 20 hours at most; a run lives weeks. The chain is:

    Slurm warns every task before the time limit (`--signal=USR1@300`, or SIGTERM)
      -> all ranks agree to stop at the same step (megatrain/stop.py)
      -> the loop finishes the step, saves a checkpoint, returns          (megatrain/train.py)
      -> `train_job()`: rank 0 runs `scontrol requeue $SLURM_JOB_ID`, within `run.max_restarts`
      -> Slurm restarts the same job (same id, SLURM_RESTART_COUNT + 1); it resumes from the
         checkpoint.

A crash ends a job too: a rank raises, is killed, or its watchdog stops it (megatrain/watchdog.py,
exit 3); `srun --kill-on-bad-exit` then ends the others. The batch script outlives srun and runs
`megatrain recover` (`recover()`), which requeues the job the same way when the run advanced (a
checkpoint was saved since this job started) or when it is the first crash without progress; a
second crash in a row without progress stops the chain, with the reason in events.jsonl.
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
    ends = _chain_ends(restarts, max_restarts, job_state)
    if ends:
        return False, ends
    return True, f"{signal_name} before the time limit"


def _chain_ends(restarts: int, max_restarts: int, job_state: str) -> str | None:
    """Why no requeue may follow whatever stopped the job, or None."""
    if job_state and job_state != "RUNNING":
        # `scancel`, the time limit itself or a preemption: Slurm is already ending the job (and
        # requeues it itself if preemption says so). A user's scancel must stay a cancel.
        return f"Slurm is ending the job (state {job_state}); rerun the same job to resume"
    if restarts >= max_restarts:
        return (
            f"restart cap reached ({restarts} restarts, run.max_restarts={max_restarts}); "
            "submit the job again to continue"
        )
    return None


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
    return _scontrol_requeue(job, events)


def _scontrol_requeue(job: str, events: EventLog) -> bool:
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


# ----------------------------------------------------------------------------- after a crash

NAMED_ERROR_EXIT = 2  # `megatrain train` exits 2 on a MegatrainError: a mistake named on one line


def crash_decision(
    exit_status: int,
    progress: bool,
    again_without_progress: bool,
    restarts: int,
    max_restarts: int,
    job_state: str,
) -> tuple[bool, str]:
    """Whether to requeue a job whose srun ended with `exit_status`, and why (pure:
    unit-tested). `progress`: a checkpoint was saved since this job started;
    `again_without_progress`: the crash before this one saved nothing either, and nothing was
    saved since."""
    ends = _chain_ends(restarts, max_restarts, job_state)
    if ends:
        return False, ends
    if exit_status == NAMED_ERROR_EXIT:
        return False, (
            "a named error (exit 2: a bad config, data or checkpoint, a full disk, a diverged "
            "run) would come back after a requeue; fix what the job's output says, then submit "
            "the same job again"
        )
    if not progress and again_without_progress:
        return False, (
            "crashed twice in a row without saving a checkpoint: a requeue would crash again; "
            "fix the cause (the error in the job's output, RUN_DIR/hangs/ for a hang), then "
            "submit the same job again to resume"
        )
    if progress:
        return True, "crash after the run advanced"
    return True, "first crash without progress: one more try"


def crash_cause(exit_status: int, history: list[dict]) -> str:
    """The crash in words, from srun's exit status and this job's events."""
    if any(e.get("event") == "hang" for e in history):
        return "the watchdog stopped a hung rank (stacks in RUN_DIR/hangs/)"
    # the first error is the cause; the later ones, on other ranks, are its echoes
    error = next((e for e in history if e.get("event") == "error"), None)
    if error:
        where = f"rank {error['rank']}, " if "rank" in error else ""
        return f"{error['type']} ({where}after step {error['step']}): {error['message']}"[:300]
    if exit_status > 128:
        return f"a rank was killed (srun exit status {exit_status}: signal {exit_status - 128})"
    return f"a rank failed (srun exit status {exit_status})"


def assess_crash(history: list[dict], job: dict, exit_status: int) -> dict:
    """The `crashed` record of Slurm job `job` ({"id", "restart"}) from the run's events so far
    (pure: unit-tested). progress: a checkpoint was saved since this job's run_start (none if it
    crashed before starting); again_without_progress: the crash before this one also saved
    nothing, and nothing was saved since."""
    start = max(
        (
            i
            for i, e in enumerate(history)
            if e.get("event") == "run_start" and e.get("slurm_job") == job
        ),
        default=len(history),
    )
    mine = history[start:]
    saved = [e["step"] for e in mine if e.get("event") == "checkpoint"]
    last_crash = max(
        (i for i, e in enumerate(history) if e.get("event") == "crashed"), default=None
    )
    return {
        "event": "crashed",
        "job_id": job["id"],
        "restart": job["restart"],
        "exit_status": exit_status,
        "cause": crash_cause(exit_status, mine),
        "start_step": mine[0].get("start_step") if mine else None,
        "checkpoint_step": saved[-1] if saved else None,
        "progress": bool(saved),
        "again_without_progress": not saved
        and last_crash is not None
        and not any(e.get("event") == "checkpoint" for e in history[last_crash:]),
    }


def recover(cfg: Config, exit_status: int, environ=os.environ) -> bool:
    """Run by the batch script after srun ended with `exit_status` != 0: record a `crashed` event
    and requeue the job when `crash_decision` says so. Returns whether it requeued."""
    events = EventLog(cfg.run_dir, echo=lambda line: print(line, flush=True))
    job = dist.slurm_job(environ)
    if job is None:
        print("megatrain recover: not a Slurm job; rerun the same command to resume", flush=True)
        return False
    record = events.write(assess_crash(events.read(), job, exit_status))
    ok, reason = crash_decision(
        exit_status,
        record["progress"],
        record["again_without_progress"],
        job["restart"],
        cfg.run.max_restarts,
        _job_state(job["id"]),
    )
    if not ok:
        events.write({"event": "requeue_skipped", "job_id": job["id"], "reason": reason})
        print(f"megatrain: not requeueing Slurm job {job['id']}: {reason}", flush=True)
        return False
    events.write(
        {
            "event": "requeued",
            "job_id": job["id"],
            "cause": "crash",
            "reason": reason,
            "restart": job["restart"] + 1,
            "max_restarts": cfg.run.max_restarts,
        }
    )
    print(
        f"megatrain: requeueing Slurm job {job['id']} after a crash ({record['cause']}; {reason}),"
        f" restart {job['restart'] + 1} of at most {cfg.run.max_restarts}",
        flush=True,
    )
    return _scontrol_requeue(job["id"], events)
