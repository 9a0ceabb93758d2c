"""Crashes and hangs of a 2-node training job on the local Slurm cluster (real sbatch, srun,
signals; in network-namespace mode a real link to cut): each job ends in bounded time, requeues
itself (`megatrain recover` in slurm/pretrain.sh) and resumes with the losses of the uninterrupted
run, bit for bit; a crash at every start stops the chain with the reason. The scenarios and their
measurements are in tests/cluster/faults.py (also run by `bench/faults.py --slurm`)."""

import pytest

from tests.cluster.faults import FAULT_STEP, HANG_TIMEOUT_S, run_fault
from tests.cluster.training import incarnations, job_text
from tests.helpers import events, losses

# from the fault until every rank is gone: the watchdog's timeout for a frozen rank or a cut
# link, plus srun's kill (KillWait=5 s) and slack for a loaded 2-core CI machine
BOUND_S = {"kill9_rank": 30, "sigstop_rank": HANG_TIMEOUT_S + 30}


def recovered(slurm_cluster, reference_run, tiny_dataset, tmp_path, fault):
    m = run_fault(slurm_cluster, fault, tiny_dataset, tmp_path, losses(reference_run[1]))
    print(m.row())
    text = job_text(slurm_cluster, m.job)
    assert m.state == "COMPLETED", text
    crashed = events(m.run_dir, "crashed")
    assert len(crashed) == 1 and crashed[0]["progress"], crashed
    requeued = events(m.run_dir, "requeued")
    assert requeued and requeued[0]["cause"] == "crash" and requeued[0]["restart"] == 1
    assert "requeueing Slurm job" in text and "(restart 1) on 2 node(s)" in text
    assert incarnations(m.job) == ["REQUEUED", "COMPLETED"]
    resumed = events(m.run_dir, "resumed")
    assert resumed and resumed[0]["step"] == 10, resumed  # the checkpoint before FAULT_STEP
    assert m.bit_identical, "the resumed run's losses differ from the uninterrupted run's"
    return m, crashed[0]


@pytest.mark.timeout(600)
def test_kill9_of_a_rank_ends_the_job_requeues_and_resumes_exactly(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    m, crashed = recovered(slurm_cluster, reference_run, tiny_dataset, tmp_path, "kill9_rank")
    assert m.seconds_until_all_gone is not None and m.seconds_until_all_gone < BOUND_S["kill9_rank"]
    assert crashed["exit_status"] != 0


@pytest.mark.timeout(600)
def test_a_frozen_rank_is_stopped_by_the_watchdog_and_the_run_comes_back(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    m, crashed = recovered(slurm_cluster, reference_run, tiny_dataset, tmp_path, "sigstop_rank")
    assert m.seconds_until_all_gone < BOUND_S["sigstop_rank"], m.row()
    hang = events(m.run_dir, "hang")
    assert hang and hang[0]["rank"] == 0 and hang[0]["step"] >= FAULT_STEP, hang
    assert list((m.run_dir / "hangs").glob("*rank0*")), "no stack dump of rank 0"
    assert "watchdog" in crashed["cause"]


@pytest.mark.timeout(600)
def test_a_rank_that_raises_once_is_requeued_and_resumes_exactly(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    m, crashed = recovered(slurm_cluster, reference_run, tiny_dataset, tmp_path, "raise_once")
    assert "InjectedFault (rank 1" in crashed["cause"], crashed
    assert m.steps_lost is not None and m.steps_lost <= FAULT_STEP - 10


@pytest.mark.timeout(600)
def test_a_link_cut_mid_run_ends_in_bounded_time_and_the_run_comes_back(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    slurm_cluster.require_netns()
    m, _ = recovered(slurm_cluster, reference_run, tiny_dataset, tmp_path, "link_down")
    assert m.seconds_until_all_gone is not None, m.row()


@pytest.mark.timeout(600)
def test_a_crash_at_every_start_stops_the_chain_with_the_reason(
    slurm_cluster, reference_run, tiny_dataset, tmp_path
):
    m = run_fault(
        slurm_cluster, "raise_every_start", tiny_dataset, tmp_path, losses(reference_run[1])
    )
    print(m.row())
    text = job_text(slurm_cluster, m.job)
    assert m.state == "FAILED", text
    crashed = events(m.run_dir, "crashed")
    assert [c["progress"] for c in crashed] == [False, False], crashed
    assert [c["again_without_progress"] for c in crashed] == [False, True]
    skipped = events(m.run_dir, "requeue_skipped")
    assert len(skipped) == 1 and "crashed twice in a row" in skipped[0]["reason"], skipped
    assert "not requeueing Slurm job" in text and "crashed twice in a row" in text
    assert incarnations(m.job) == ["REQUEUED", "FAILED"]
