"""`megatrain submit`: a training run as a Slurm job through submitit, shaped by a cluster profile.

prepare()            the run's config, validated before anything is queued
slurm_parameters()   sbatch options from a cluster profile (one task per GPU, QoS, account,
                     modules), the same flags slurm/pretrain.sh documents
TrainJob             what every task runs: `megatrain.requeue.train_job`, which requeues the
                     job after a time-limit warning
recover_lines()      the batch script's lines after srun: `megatrain recover` requeues a crashed
                     job, as slurm/pretrain.sh does
submit()             to Slurm, or to local processes where there is no Slurm
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

import submitit
import yaml

from megatrain.config import Config, ConfigError, load_cluster, load_config
from megatrain.dist import job_port
from megatrain.errors import MegatrainError
from megatrain.files import atomic_write_text
from megatrain.shards import Manifest
from megatrain.stop import catch_stop_signals


def parse_slurm_time(text: str | int) -> int:
    """Slurm's --time formats -> minutes: '90', '20:00:00', '1-00:00:00', '2-12',
    '30:00' (min:sec)."""
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
    raise ConfigError(f"cannot read '{text}' as a Slurm time (e.g. 20:00:00 or 90)")


def choose_qos(slurm, qos: str | None, time_min: int) -> str | None:
    """The QoS name for a job of `time_min` minutes: `qos` as a short name (`dev`, `t3`, `t4`) or a
    full name; by default the profile's `default_qos`, or the shortest one that fits the time."""
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
            # Slurm 22.05+ srun no longer inherits sbatch's --cpus-per-task: pass it on, or every
            # task gets one core
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
    SIGTERM) is handled by our loop: finish the step, save, requeue (megatrain/requeue.py). Should a
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
                MASTER_PORT=str(job_port(env.raw_job_id)),
            )
        from megatrain.requeue import train_job

        try:
            summary, requeued = train_job(self.cfg)
        except BaseException as e:
            if env.cluster != "slurm":
                raise
            traceback.print_exc()
            if isinstance(e, MegatrainError):
                # a named error would come back after a requeue: the caller gets it now, and the
                # exit status tells `megatrain recover` not to requeue (as the CLI's exit 2 does)
                with submitit.core.utils.temporary_save_path(env.paths.result_pickle) as tmp:
                    submitit.core.utils.cloudpickle_dump(("error", traceback.format_exc()), tmp)
            # Otherwise no result: the batch script's `megatrain recover` (after srun) requeues
            # the job, or ends it FAILED with this traceback in its stderr.
            sys.stderr.flush()
            os._exit(2 if isinstance(e, MegatrainError) else 1)
        if requeued:  # no result file: the caller's job.results() waits for the resumed job
            os._exit(0)
        return summary


def recover_lines(config_file: Path) -> list[str]:
    """Batch-script lines after srun: after a crash, `megatrain recover` requeues the job or says
    why not (megatrain/requeue.py), as slurm/pretrain.sh does; the job keeps srun's status."""
    python, config = shlex.quote(sys.executable), shlex.quote(str(config_file))
    return [
        "megatrain_status=$?",
        'if [ "$megatrain_status" -ne 0 ]; then',
        f"  {python} -u -m megatrain.cli recover {config} --exit-status $megatrain_status",
        "fi",
        "exit $megatrain_status",
    ]


def prepare(config, overrides=(), cluster: str | None = None):
    """The run's Config, validated here so that errors surface before anything is queued. Compute
    nodes have no internet: W&B runs offline unless an override says otherwise."""
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
    cfg = prepare(config, overrides, cluster)
    profile = load_cluster(cfg.cluster)
    tpn = tasks_per_node or profile.gpus_per_node or 1
    kind = executor if executor != "auto" else ("slurm" if shutil.which("sbatch") else "local")
    folder = Path(folder or cfg.run_dir / "submitit")
    if kind == "slurm":
        # the run's config as loaded, for `megatrain recover` in the batch script
        config_file = folder / "config.yaml"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(config_file, yaml.safe_dump(asdict(cfg), sort_keys=False))
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
            ),
            teardown=recover_lines(config_file),
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
