"""How jobs start, stop and come back: Slurm rendezvous, stop signals, requeue, submitit.

A training job on Jean Zay lives 20 hours at most; a run lives weeks. The chain is:

    Slurm warns every task before the time limit (`--signal=USR1@300`, or SIGTERM)
      -> every step's all-reduce carries each rank's `StopRequest.votes()`: all ranks agree to stop
      -> the loop finishes the step, saves a checkpoint, returns          (megatrain/train.py)
      -> `finish_job()`: rank 0 runs `scontrol requeue $SLURM_JOB_ID`, within `run.max_restarts`
      -> Slurm restarts the same job (same id, SLURM_RESTART_COUNT + 1), which resumes from the checkpoint.

Inside:
  catch_stop_signals(), StopRequest   record SIGUSR1/SIGUSR2/SIGTERM instead of dying
  expand_nodelist(), rendezvous()     MASTER_ADDR (first host of the job) and MASTER_PORT (from the job id)
  requeue_decision(), finish_job()    requeue after a signal-stop, with a log line and an event each time
  submit(), TrainJob                  the same job through submitit (Slurm, or local processes without Slurm)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

# USR1: our sbatch script's warning; USR2: submitit's; SIGTERM: what Slurm sends at the limit or on
# preemption, and what some clusters send alone.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)
_received: str | None = None  # first stop signal this process got
_agreed: str | None = None  # a stop signal some rank got, once StopRequest.agree() said so


def _record(signum, frame) -> None:
    global _received
    _received = _received or signal.Signals(signum).name


def catch_stop_signals(signals=STOP_SIGNALS) -> None:
    """Record stop signals from now on. Call it first thing in a job: a warning that arrives during
    the imports and the set-up must not kill the process (the default action of USR1/USR2/TERM)."""
    for s in signals:
        signal.signal(s, _record)


class StopRequest:
    """Records SIGUSR1/SIGUSR2/SIGTERM instead of dying, so the current step can finish and be saved."""

    def __init__(self, signals=STOP_SIGNALS):
        catch_stop_signals(signals)

    @property
    def signal(self) -> str | None:
        """The stop signal this rank got, or the one another rank got once `agree()` returned True."""
        return _received or _agreed

    def votes(self) -> list[float]:
        """This rank's vote, one float per stop signal, for a sum over ranks (see `agree`)."""
        return [1.0 if _received == s.name else 0.0 for s in STOP_SIGNALS]

    def agree(self, summed_votes: list[float]) -> bool:
        """Given the votes summed over ranks: True on every rank if any rank got a stop signal."""
        global _agreed
        seen = [s.name for s, c in zip(STOP_SIGNALS, summed_votes) if c > 0]
        if seen and not _agreed:
            _agreed = seen[0]
        return bool(seen)


def stop_signal() -> str | None:
    """The stop signal all ranks agreed on (None: the run was not stopped by a signal)."""
    return _agreed


# ----------------------------------------------------------------------------- Slurm rendezvous


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list, expanded as `scontrol show hostnames` does:
    'node[1-3,5],gpu07' -> node1 node2 node3 node5 gpu07; 'r[1-2]i0n[08-09]' keeps zero padding."""
    groups = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist)  # split on commas outside brackets
    hosts: list[str] = []
    for group in groups:
        names = [""]
        for part in re.split(r"(\[[^\]]*\])", group):
            choices = [part]
            if part.startswith("["):
                choices = []
                for item in part[1:-1].split(","):
                    lo, _, hi = item.partition("-")
                    choices += (
                        [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)] if hi else [lo]
                    )
            names = [n + c for n in names for c in choices]
        hosts += names
    return hosts


def rendezvous(environ=os.environ) -> tuple[str, int]:
    """MASTER_ADDR and MASTER_PORT for the process group. Set ones win (torchrun sets both); under
    srun the master is the first host of the step (rank 0 runs there) and the port comes from the
    job id, so that every task derives the same pair without talking and two jobs sharing a node
    do not collide. The port range 10000-29999 stays below Linux's ephemeral ports (32768+)."""
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not addr:
        addr = expand_nodelist(nodelist)[0] if nodelist else "127.0.0.1"
    if not port:
        job = environ.get("SLURM_JOB_ID", "")
        port = str(10000 + int(job) % 20000) if job.isdigit() else "29500"
    return addr, int(port)


# ----------------------------------------------------------------------------- requeue


def requeue_decision(
    signal_name: str, restarts: int, max_restarts: int, job_state: str
) -> tuple[bool, str]:
    """Whether to requeue a job that a signal stopped, and why (pure: unit-tested)."""
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


def append_event(run_dir: Path, record: dict) -> None:
    """One line in RUN_DIR/events.jsonl (the trainer's logger is closed by now) and on stdout."""
    from megatrain.sinks import event_line

    record = {"time": time.time(), **record}
    with open(Path(run_dir) / "events.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(event_line(record), flush=True)


def _wandb_note(run_dir: Path) -> None:
    runs = sorted(
        p.name for p in (run_dir / "wandb").glob("offline-run-*")
    )  # one per job of the run
    if runs:
        sync = f"wandb sync {run_dir / 'wandb'}/offline-run-*"
        append_event(
            run_dir, {"event": "wandb_offline", "run": runs[-1], "runs": len(runs), "sync": sync}
        )
        print(f"megatrain: W&B ran offline; from a login node with internet: {sync}", flush=True)


def finish_job(cfg, summary: dict, rank: int) -> bool:
    """After `train()` returned, on every rank (collective): note where the offline W&B runs are,
    and if a signal stopped the run inside a Slurm job, have rank 0 requeue it. True on every rank
    if the job was requeued: Slurm is about to kill it, so exit without writing anything more."""
    requeued = False
    if rank == 0:
        _wandb_note(cfg.run_dir)
        if summary.get("interrupted") and stop_signal():
            requeued = _requeue(cfg, summary)
    from megatrain.parallel import all_reduce_sum

    return all_reduce_sum([float(requeued)])[0] > 0


def _requeue(cfg, summary: dict) -> bool:
    run_dir, sig, job = cfg.run_dir, stop_signal(), os.environ.get("SLURM_JOB_ID")
    if not job:
        append_event(
            run_dir,
            {
                "event": "requeue_skipped",
                "signal": sig,
                "reason": "not a Slurm job; rerun the same command to resume",
            },
        )
        return False
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    ok, reason = requeue_decision(sig, restarts, cfg.run.max_restarts, _job_state(job))
    if not ok:
        append_event(
            run_dir, {"event": "requeue_skipped", "job_id": job, "signal": sig, "reason": reason}
        )
        print(f"megatrain: not requeueing Slurm job {job}: {reason}", flush=True)
        return False
    append_event(
        run_dir,
        {
            "event": "requeued",
            "job_id": job,
            "signal": sig,
            "step": summary.get("steps"),
            "restart": restarts + 1,
            "max_restarts": cfg.run.max_restarts,
        },
    )
    print(
        f"megatrain: requeueing Slurm job {job} after {reason} (restart {restarts + 1} of at most "
        f"{cfg.run.max_restarts}); it resumes from step {summary.get('steps')}",
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
        append_event(run_dir, {"event": "requeue_failed", "job_id": job, "error": error})
        print(f"megatrain: scontrol requeue {job} failed: {error}", flush=True)
        return False
    return True


# ----------------------------------------------------------------------------- submitit


def parse_slurm_time(text: str | int) -> int:
    """Slurm's --time formats -> minutes: '90', '20:00:00', '1-00:00:00', '2-12', '30:00' (min:sec)."""
    text = str(text).strip()
    days, _, rest = text.rpartition("-") if "-" in text else ("", "", text)
    parts = [int(p) for p in rest.split(":")] if rest else []
    if days:  # after "D-": hours[:minutes[:seconds]]
        h, m, s = (parts + [0, 0, 0])[:3]
        return int(days) * 1440 + h * 60 + m + (s > 0)
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + (parts[2] > 0)
    if len(parts) == 2:
        return parts[0] + (parts[1] > 0)
    if len(parts) == 1:
        return parts[0]
    raise ValueError(f"cannot read '{text}' as a Slurm time (e.g. 20:00:00 or 90)")


def choose_qos(slurm, qos: str | None, time_min: int) -> str | None:
    """The QoS name for a job of `time_min` minutes: `qos` as a short name (`dev`, `t3`, `t4`) or a
    full name; by default the profile's `default_qos`, or the shortest one that fits the time."""
    from megatrain.config import ConfigError

    if qos:
        return slurm.qos.get(qos, qos)
    if not slurm.qos:
        return None
    limits = slurm.qos_max_hours
    default = slurm.default_qos
    if default in slurm.qos and time_min <= 60 * limits.get(default, float("inf")):
        return slurm.qos[default]
    fitting = sorted(
        (h, k) for k, h in limits.items() if k in slurm.qos and time_min <= 60 * h and k != "dev"
    )
    if not fitting:
        raise ConfigError(
            f"a {time_min}-minute job fits no QoS of this cluster "
            f"({', '.join(f'{slurm.qos[k]} <= {h:g} h' for k, h in limits.items())})"
        )
    return slurm.qos[fitting[0][1]]


def job_setup(profile) -> list[str]:
    """Shell lines a job runs before Python: the profile's modules and set-up, then two exports."""
    lines = (
        ["module purge", *(f"module load {m}" for m in profile.modules)] if profile.modules else []
    )
    return (
        lines
        + list(profile.setup)
        + [
            # Slurm 22.05+ srun no longer inherits sbatch's --cpus-per-task: pass it on, or every task gets one core
            "export SRUN_CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}",
            "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}",
        ]
    )


def slurm_parameters(
    profile,
    *,
    nodes: int = 1,
    tasks_per_node: int | None = None,
    time_min: int = 1200,
    qos: str | None = None,
    account: str | None = None,
    job_name: str = "megatrain",
) -> dict:
    """sbatch options for `nodes` nodes of a cluster profile, one task per GPU, as submitit
    SlurmExecutor parameters (the same flags slurm/pretrain.sh documents)."""
    s = profile.slurm
    tpn = tasks_per_node or profile.gpus_per_node or 1
    extra = {"requeue": True}
    if s.hint:
        extra["hint"] = s.hint
    for flag in s.extra:  # "--exclusive", "--mem=0"
        key, _, value = flag.lstrip("-").partition("=")
        extra[key.replace("-", "_")] = value or True
    params = {
        "job_name": job_name,
        "nodes": nodes,
        "ntasks_per_node": tpn,
        "time": time_min,
        "signal_delay_s": s.signal_s,
        "setup": job_setup(profile),
        "additional_parameters": extra,
        "srun_args": ["--kill-on-bad-exit=1"],
    }  # a crashed rank stops the others, not a hang
    if s.cpus_per_task:
        params["cpus_per_task"] = s.cpus_per_task
    if profile.gpus_per_node:
        params["gres"] = f"gpu:{tpn}"  # one GPU per task; IDRIS documents --gres=gpu:N
    if s.partition:
        params["partition"] = s.partition
    if s.constraint:
        params["constraint"] = s.constraint
    name = choose_qos(s, qos, time_min)
    if name:
        params["qos"] = name
    if account:  # "xyz" -> "xyz@h100" on Jean Zay; a full "xyz@h100" is kept
        params["account"] = account if "@" in account else account + s.account_suffix
    return params


class TrainJob(submitit.helpers.Checkpointable):
    """A training run as a submitit job; every task calls it. A stop signal (submitit's USR2, or
    SIGTERM) is handled by our loop: finish the step, save, requeue through `finish_job`. Should a
    signal come before our handler is installed, submitit calls `checkpoint()`, which requeues the
    same call: it resumes from the run directory's latest checkpoint either way."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self) -> dict:
        catch_stop_signals()  # replaces submitit's own USR2 handler, which would exit mid-step
        env = submitit.JobEnvironment()
        if env.cluster != "slurm":  # local executor: torch's variables from submitit's
            os.environ.update(
                RANK=str(env.global_rank),
                WORLD_SIZE=str(env.num_tasks),
                LOCAL_RANK=str(env.local_rank),
                LOCAL_WORLD_SIZE=str(env.num_tasks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(10000 + int(env.raw_job_id) % 20000),
            )
        import torch.distributed as dist

        from megatrain.train import train

        summary = train(self.cfg)
        requeued = finish_job(self.cfg, summary, env.global_rank)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        if requeued:  # no result file: the caller's job.results() waits for the resumed job
            sys.stdout.flush()
            os._exit(0)
        return summary


def prepare(config, overrides=(), cluster: str | None = None):
    """The run's Config, validated here so that errors surface before anything is queued. Compute
    nodes have no internet: W&B runs offline unless an override says otherwise."""
    from megatrain.config import Config, load_config
    from megatrain.shards import Manifest

    if isinstance(config, Config):
        cfg = config
        cfg.cluster = cluster or cfg.cluster
    else:
        wandb = (
            [] if any(o.startswith("wandb.mode=") for o in overrides) else ["wandb.mode=offline"]
        )
        cfg = load_config(
            config, [*wandb, *overrides, *([f"cluster={cluster}"] if cluster else [])]
        )
    for src in cfg.data.sources:
        Manifest.read(src.path)
    return cfg


def submit(
    config,
    overrides=(),
    *,
    cluster: str | None = None,
    nodes: int = 1,
    tasks_per_node: int | None = None,
    time_min: int = 1200,
    qos: str | None = None,
    account: str | None = None,
    folder=None,
    executor: str = "auto",
) -> submitit.Job:
    """Submit a training run and return its submitit job: `job.results()` waits (through requeues)
    and returns every task's summary, or raises the job's error with its traceback.

    config: a run YAML (with `overrides`) or a Config. cluster: a configs/clusters/ profile
    (default: the config's `cluster`). executor: "slurm", "local" (processes here) or "auto"
    (Slurm if `sbatch` exists). folder: submitit's logs and pickles (default RUN_DIR/submitit)."""
    from megatrain.config import ConfigError, load_cluster

    cfg = prepare(config, overrides, cluster)
    profile = load_cluster(cfg.cluster)
    tpn = tasks_per_node or profile.gpus_per_node or 1
    kind = executor if executor != "auto" else ("slurm" if shutil.which("sbatch") else "local")
    folder = Path(folder or cfg.run_dir / "submitit")
    if kind == "slurm":
        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=cfg.run.max_restarts)
        ex.update_parameters(
            **slurm_parameters(
                profile,
                nodes=nodes,
                tasks_per_node=tpn,
                time_min=time_min,
                qos=qos,
                account=account,
                job_name=cfg.run.name,
            )
        )
    elif kind == "local":
        if nodes != 1:
            raise ConfigError(
                f"the local executor runs on this machine only; asked for {nodes} nodes"
            )
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(
            tasks_per_node=tpn, timeout_min=time_min, signal_delay_s=profile.slurm.signal_s
        )
    else:
        raise ConfigError(f"executor must be 'slurm', 'local' or 'auto', got {executor!r}")
    return ex.submit(TrainJob(cfg))
