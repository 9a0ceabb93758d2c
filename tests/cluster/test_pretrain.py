"""`sbatch slurm/pretrain.sh` on the local two-node Slurm cluster: training on 2 nodes x 1 task and
1 node x 2 tasks, a warning signal -> checkpoint -> requeue -> exact resume, and Slurm's own
time-limit warning. Fp32 on CPU: runs of the same config on two processes have bit-identical
losses."""

import subprocess
import time

import pytest

from tests.cluster.training import (
    CONFIG,
    NO_WARNING,
    SCRIPT,
    STEPS,
    incarnations,
    job_env,
    job_text,
    lifecycle_events,
    overrides,
    wait_for_step,
)
from tests.helpers import losses


@pytest.mark.timeout(400)
def test_one_node_two_tasks(slurm_cluster, reference_run):
    job, run = reference_run
    text = job_text(slurm_cluster, job)
    a = losses(run)
    assert sorted(a) == list(range(1, STEPS + 1)), text
    assert a[STEPS] < a[1] - 0.5, f"loss did not fall: {a}"
    assert (
        "(restart 0) on 1 node(s)" in text
        and "2 task(s)" in text
        and "srun exited with status 0" in text
    )
    assert "2 processes (dp 2 x tp 1)" in text
    ev = lifecycle_events(run)
    assert [e["event"] for e in ev] == ["checkpoint", "wandb_offline"], ev
    assert ev[1]["runs"] == 1 and ev[1]["sync"].startswith("wandb sync ")
    assert list(run.glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run"


@pytest.mark.timeout(300)
def test_two_nodes_one_task_each_matches_one_node(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    job, state, _ = slurm_cluster.run(
        SCRIPT,
        CONFIG,
        *overrides(tiny_dataset, tmp_path / "run"),
        cwd=tmp_path,
        env=job_env(slurm_cluster),
        timeout=240,
        sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--time=10", NO_WARNING],
    )
    text = job_text(slurm_cluster, job)
    assert state == "COMPLETED", text
    assert "on 2 node(s) node[1-2], 2 task(s)" in text
    # Rank 0 on node1 was the master (first host of the node list, port from the job id): the two
    # nodes trained together, with exactly the losses of two processes on one node.
    assert losses(tmp_path / "run") == losses(reference_run[1])


@pytest.mark.timeout(300)
def test_warning_signal_checkpoints_requeues_and_resumes_exactly(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    t0 = time.monotonic()
    job = slurm_cluster.submit(
        SCRIPT,
        CONFIG,
        *overrides(tiny_dataset, run),
        cwd=tmp_path,
        env=job_env(slurm_cluster),
        sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--time=10", NO_WARNING],
    )
    wait_for_step(run, 3)
    # What `--signal=USR1@N` does before the time limit, at a moment the test chooses: USR1 to
    # every task.
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    state = slurm_cluster.wait(job, timeout=240)
    text = job_text(slurm_cluster, job)
    assert state == "COMPLETED", text
    print(f"signal -> requeue -> resume -> done: {time.monotonic() - t0:.0f} s")

    ev = lifecycle_events(run)
    names = [e["event"] for e in ev]
    assert names == [
        "checkpoint",
        "stopped",
        "wandb_offline",
        "requeued",
        "resumed",
        "checkpoint",
        "wandb_offline",
    ], ev
    stopped, requeued, resumed = ev[1], ev[3], ev[4]
    assert stopped["reason"] == "SIGUSR1" and 3 <= stopped["step"] < STEPS
    assert requeued == {
        **requeued,
        "job_id": job,
        "signal": "SIGUSR1",
        "step": stopped["step"],
        "restart": 1,
    }
    assert resumed["step"] == stopped["step"] and resumed["tag"] == f"step{stopped['step']:08d}"
    assert "requeueing Slurm job" in text and "(restart 1) on 1 node(s)" in text
    assert slurm_cluster.job_info(job).get("Restarts") == "1"
    assert incarnations(job) == ["REQUEUED", "COMPLETED"]
    assert ev[-1]["runs"] == 2  # one offline W&B run per job, both in RUN_DIR/wandb

    a, b = losses(reference_run[1]), losses(run)
    assert a == b, "resumed run diverged:\n" + "\n".join(f"{s}: {a[s]!r} {b.get(s)!r}" for s in a)


@pytest.mark.timeout(300)
def test_time_limit_warning_from_slurm_requeues_until_the_cap(
    slurm_cluster, tiny_dataset, tmp_path
):
    """A real 1-minute limit with `--signal=USR1@20`. slurmctld checks limits every 30 s and warns
    once fewer than N + 30 s remain, so each job is warned 10-40 s after it starts: after srun has
    started the tasks (a warning with no step running is lost) and 20 s or more before the limit.
    The first job checkpoints and requeues; the second resumes, is warned too, checkpoints, and
    stops requeueing at run.max_restarts=1. Neither job reaches its limit (no TIMEOUT)."""
    run = tmp_path / "run"
    t0 = time.monotonic()
    job, state, _ = slurm_cluster.run(
        SCRIPT,
        CONFIG,
        *overrides(tiny_dataset, run, "run.max_steps=100000", "run.max_restarts=1"),
        cwd=tmp_path,
        env=job_env(slurm_cluster),
        timeout=240,
        sbatch_args=["--nodes=1", "--ntasks-per-node=2", "--time=1", "--signal=USR1@20"],
    )
    text = job_text(slurm_cluster, job)
    assert state == "COMPLETED", text
    print(f"two 1-minute jobs: {time.monotonic() - t0:.0f} s")
    ev = [e for e in lifecycle_events(run) if e["event"] != "wandb_offline"]
    assert [e["event"] for e in ev] == [
        "checkpoint",
        "stopped",
        "requeued",
        "resumed",
        "checkpoint",
        "stopped",
        "requeue_skipped",
    ], ev
    first, second = ev[1]["step"], ev[5]["step"]
    assert ev[1]["reason"] == ev[5]["reason"] == "SIGUSR1" and ev[3]["step"] == first < second
    assert "restart cap reached" in ev[6]["reason"] and "not requeueing Slurm job" in text
    assert incarnations(job) == ["REQUEUED", "COMPLETED"]
    assert (run / "checkpoints" / "latest").read_text() == f"step{second:08d}"
