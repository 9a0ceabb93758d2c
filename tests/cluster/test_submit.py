"""`megatrain.submit.submit` through submitit on the local Slurm cluster: a run that is warned
(submitit's USR2), checkpoints, requeues and ends with the uninterrupted run's losses; and a
job's error surfacing to the caller."""

from __future__ import annotations

import subprocess
import time

import pytest
import submitit

from megatrain import submit
from tests.cluster.training import CONFIG, STEPS, lifecycle_events, overrides, wait_for_step
from tests.helpers import events, losses


@pytest.mark.timeout(300)
def test_submitit_job_requeues_and_results_reach_the_caller(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    run = tmp_path / "run"
    t0 = time.monotonic()
    job = submit.submit(
        CONFIG,
        overrides(tiny_dataset, run),
        cluster="local",
        nodes=1,
        tasks_per_node=2,
        time_min=10,
        executor="slurm",
    )
    assert isinstance(job, submitit.SlurmJob)
    submission = job.paths.submission_file.read_text()
    assert "#SBATCH --requeue" in submission and "#SBATCH --signal=USR2@60" in submission
    assert "--kill-on-bad-exit=1" in submission and "#SBATCH --ntasks-per-node=2" in submission
    wait_for_step(run, 3)
    subprocess.run(
        ["scancel", "--signal=USR2", job.job_id], check=True
    )  # submitit's warning signal
    summaries = job.results()  # waits through the requeue
    print(f"submitit: signal -> requeue -> resume -> results: {time.monotonic() - t0:.0f} s")

    assert len(summaries) == 2 and all(
        s["steps"] == STEPS and not s["interrupted"] for s in summaries
    ), summaries
    assert summaries[0]["loss"] == summaries[1]["loss"] == losses(run)[STEPS]
    names = [e["event"] for e in lifecycle_events(run)]
    assert names == [
        "checkpoint",
        "stopped",
        "wandb_offline",
        "requeued",
        "resumed",
        "checkpoint",
        "wandb_offline",
    ], lifecycle_events(run)
    assert slurm_cluster.job_info(job.job_id).get("Restarts") == "1"
    assert losses(run) == losses(reference_run[1])


@pytest.mark.timeout(200)
def test_submitit_job_error_surfaces_to_the_caller(slurm_cluster, tiny_dataset, tmp_path):
    # Valid on the login node, wrong once the job reads the data: the tokenizer has 512 ids.
    job = submit.submit(
        CONFIG,
        overrides(tiny_dataset, tmp_path / "run", "model.vocab_size=100"),
        cluster="local",
        nodes=1,
        tasks_per_node=2,
        time_min=5,
        executor="slurm",
    )
    with pytest.raises(
        submitit.core.utils.FailedJobError, match="'model.vocab_size' \\(100\\) is smaller"
    ):
        job.results()


@pytest.mark.timeout(400)
def test_submitit_job_requeues_after_a_crash_and_results_reach_the_caller(
    slurm_cluster, reference_run, tiny_dataset, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    monkeypatch.setenv("MEGATRAIN_INJECT_RAISE", "1:13:once")  # sbatch passes it to the tasks
    job = submit.submit(
        CONFIG,
        overrides(tiny_dataset, run, "run.ckpt_every=5"),
        cluster="local",
        nodes=1,
        tasks_per_node=2,
        time_min=10,
        executor="slurm",
    )
    assert "megatrain.cli recover" in job.paths.submission_file.read_text()
    summaries = job.results()  # no error result from the crashed job: it waits for the requeue
    assert [s["steps"] for s in summaries] == [STEPS, STEPS], summaries
    crashed = events(run, "crashed")
    assert len(crashed) == 1 and "InjectedFault (rank 1" in crashed[0]["cause"], crashed
    assert events(run, "resumed")[0]["step"] == 10
    assert slurm_cluster.job_info(job.job_id).get("Restarts") == "1"
    assert losses(run) == losses(reference_run[1])
