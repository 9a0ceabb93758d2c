"""Smoke tests of the local Slurm cluster itself: if these fail, no other cluster test means
anything."""

import json
import os
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
        # fake node names resolve (torch rendezvous needs it)
        assert t["node_addr"] == socket.gethostbyname(t["node"])
        assert t["python"] == slurm_cluster.python  # the test venv's Python, not the system's
        if slurm_cluster.network == "loopback":  # fake nodes, one real machine
            assert t["node_addr"] == "127.0.0.1" and t["hostname"] == socket.gethostname()


@pytest.mark.timeout(120)
def test_each_node_has_its_own_namespace_address_and_hostname(slurm_cluster, tmp_path):
    slurm_cluster.require_netns()
    _job, state, out = slurm_cluster.run(
        JOBS / "env_probe.sh",
        slurm_cluster.python,
        cwd=tmp_path,
        sbatch_args=["--nodes=2", "--ntasks-per-node=1"],
    )
    assert state == "COMPLETED", out
    node1, node2 = _tasks(out)
    here = os.stat("/proc/self/ns/net").st_ino
    assert len({node1["netns"], node2["netns"], here}) == 3, out  # three network namespaces
    assert "127.0.0.1" != node1["node_addr"] != node2["node_addr"] != "127.0.0.1", out
    for t in (node1, node2):
        assert t["hostname"] == t["node"], out
        # its own address and loopback, nothing of the machine's (nor the other node's)
        assert t["addrs"] == sorted(["127.0.0.1", t["node_addr"]]), out


@pytest.mark.timeout(180)
def test_gloo_rendezvous_crosses_the_bridge(slurm_cluster, tmp_path):
    slurm_cluster.require_netns()
    _job, state, out = slurm_cluster.run(
        JOBS / "gloo_probe.sh",
        slurm_cluster.python,
        cwd=tmp_path,
        timeout=150,
        sbatch_args=["--nodes=2", "--ntasks-per-node=1"],
    )
    assert state == "COMPLETED", out
    ranks = sorted(
        (json.loads(line[5:]) for line in out.splitlines() if line.startswith("GLOO ")),
        key=lambda r: r["rank"],
    )
    assert [(r["rank"], r["node"], r["master"], r["sum"]) for r in ranks] == [
        (0, "node1", "node1", 3.0),
        (1, "node2", "node1", 3.0),
    ], out
    a1, a2 = socket.gethostbyname("node1"), socket.gethostbyname("node2")
    # node2's connections: to the store on node1 (MASTER_PORT) and to rank 0's gloo pair, each
    # from node2's address to node1's, over their veths and the bridge
    conns = {
        (local.removeprefix("::ffff:"), remote.removeprefix("::ffff:"), to_store)
        for local, remote, to_store in ranks[1]["conns"]
    }
    assert (a2, a1, True) in conns and (a2, a1, False) in conns, out
    assert all(local == a2 and remote == a1 for local, remote, _ in conns), out


@pytest.mark.timeout(180)
def test_cut_link_fails_connections_in_bounded_time_and_up_restores_them(slurm_cluster, tmp_path):
    slurm_cluster.require_netns()
    log, stop, timeout = tmp_path / "tries.log", tmp_path / "stop", 1.0
    job = slurm_cluster.submit(
        JOBS / "link_probe.sh", slurm_cluster.python, log, stop, str(timeout), cwd=tmp_path
    )

    def tries(after: float) -> list[tuple[float, str]]:
        """(time, "ok"/"fail: why") of node1's tries to reach node2 that ended after `after`."""
        text = log.read_text() if log.exists() else ""
        lines = [line.split(" ", 1) for line in text.splitlines()]
        return [(float(t), what) for t, what in lines if float(t) > after]

    def first(after: float, ok: bool, within: float) -> float:
        deadline = time.time() + within
        while time.time() < deadline:
            hits = [t for t, what in tries(after) if (what == "ok") == ok]
            if hits:
                return hits[0]
            time.sleep(0.1)
        raise AssertionError(
            f"no {'ok' if ok else 'failed'} try within {within} s of {after}: "
            f"{tries(after - 5)}\n{slurm_cluster._output_so_far(job)}"
        )

    try:
        first(0, ok=True, within=120)  # the job runs, node1 reaches node2
        cut = time.time()
        with slurm_cluster.link_down("node2"):
            failed = first(cut, ok=False, within=10)
            time.sleep(3)
            up = time.time()
        restored = first(up, ok=True, within=10)
        stop.touch()
        assert slurm_cluster.wait(job, timeout=60) == "COMPLETED", slurm_cluster.job_output(job)
    finally:
        stop.touch()
    print(
        f"link down -> first failed connection: {failed - cut:.2f} s (connect timeout "
        f"{timeout} s); link up -> first connection: {restored - up:.2f} s"
    )
    assert failed - cut < timeout + 1.5  # bounded: the try in flight, then one that times out
    # every try that began after the cut and ended before the link came back failed
    during = [what for t, what in tries(cut + timeout + 0.5) if t < up]
    assert during and all(what.startswith("fail: ") for what in during), during
    assert restored - up < 5


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
