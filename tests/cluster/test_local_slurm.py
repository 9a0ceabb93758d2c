"""Smoke tests of the local Slurm cluster itself: if these fail, no other cluster test means
anything."""

import json
import re
import socket
import subprocess
import time
from pathlib import Path

import pytest

JOBS = Path(__file__).resolve().parent / "jobs"


def _tasks(output: str) -> list[dict]:
    """The TASK lines of env_probe.sh, sorted by rank."""
    tasks = [json.loads(line[5:]) for line in output.splitlines() if line.startswith("TASK ")]
    return sorted(tasks, key=lambda t: t["procid"])


def test_cluster_has_two_idle_nodes(slurm_cluster):
    assert slurm_cluster.nodes[:2] == ["node1", "node2"]


@pytest.mark.timeout(120)
def test_two_nodes_one_task_each(slurm_cluster, tmp_path):
    _job, state, out = slurm_cluster.run(
        JOBS / "env_probe.sh",
        slurm_cluster.python,
        cwd=tmp_path,
        sbatch_args=["--nodes=2", "--ntasks-per-node=1"],
    )
    assert state == "COMPLETED", out
    tasks = _tasks(out)
    assert [(t["procid"], t["nodeid"], t["localid"], t["node"]) for t in tasks] == [
        (0, 0, 0, "node1"),
        (1, 1, 0, "node2"),
    ], out
    for t in tasks:
        assert (t["ntasks"], t["nnodes"], t["nodelist"]) == (2, 2, "node[1-2]")
        assert t["node_addr"] == "127.0.0.1"  # fake node names resolve (torch rendezvous needs it)
        assert t["hostname"] == socket.gethostname()  # fake nodes, one real machine
        assert t["python"] == slurm_cluster.python  # the test venv's Python, not the system's


@pytest.mark.timeout(120)
def test_one_node_two_tasks(slurm_cluster, tmp_path):
    _job, state, out = slurm_cluster.run(
        JOBS / "env_probe.sh",
        slurm_cluster.python,
        cwd=tmp_path,
        sbatch_args=["--nodes=1", "--ntasks=2"],
    )
    assert state == "COMPLETED", out
    tasks = _tasks(out)
    assert [(t["procid"], t["nodeid"], t["localid"]) for t in tasks] == [(0, 0, 0), (1, 0, 1)], out
    assert len({t["node"] for t in tasks}) == 1
    assert all(t["ntasks"] == 2 and t["nnodes"] == 1 for t in tasks)
    assert tasks[0]["nodelist"] == tasks[0]["node"]


@pytest.mark.timeout(120)
def test_requeue_restarts_job(slurm_cluster, tmp_path):
    job, state, out = slurm_cluster.run(JOBS / "requeue.sh", cwd=tmp_path, timeout=90)
    assert state == "COMPLETED", out
    assert re.findall(r"run restart_count=(\d+)", out) == ["0", "1"], out
    assert "NOT KILLED" not in out and "second run done" in out
    assert slurm_cluster.job_info(job)["Restarts"] == "1"


@pytest.mark.timeout(150)
def test_signal_reaches_batch_shell_before_time_limit(slurm_cluster, tmp_path):
    _job, state, out = slurm_cluster.run(JOBS / "signal.sh", cwd=tmp_path, timeout=120)
    assert state == "COMPLETED", out  # TIMEOUT would mean the trap never ran
    m = re.search(r"got USR1 after (\d+) s", out)
    assert m and int(m.group(1)) < 60, out  # before the 1-minute limit


@pytest.mark.timeout(120)
def test_mpi_hello_across_two_nodes(slurm_cluster, tmp_path):
    _job, state, out = slurm_cluster.run(JOBS / "mpi_hello.sh", slurm_cluster.python, cwd=tmp_path)
    assert state == "COMPLETED", out
    ranks = sorted(re.findall(r"MPI rank=(\d) size=(\d) node=(\w+) sum=(\d+) lib=(\w+)", out))
    assert ranks == [("0", "2", "node1", "3", "MPICH"), ("1", "2", "node2", "3", "MPICH")], out


@pytest.mark.timeout(60)
def test_sacct_records_failed_job(slurm_cluster, tmp_path):
    # submitit polls sacct: without accounting it never returns on a job that died.
    job, state, out = slurm_cluster.run(
        JOBS / "env_probe.sh", "/nonexistent/python", cwd=tmp_path, sbatch_args=["--ntasks=1"]
    )
    assert state == "FAILED", out
    for _ in range(40):  # slurmctld reports to slurmdbd asynchronously
        acct = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job, "-o", "State,ExitCode"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if acct.startswith("FAILED|"):
            break
        time.sleep(0.25)
    assert acct.startswith("FAILED|"), acct
