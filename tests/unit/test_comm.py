"""FileComm: the collectives that local workers and Slurm array tasks use, on real files."""

import threading
import time

import numpy as np
import pytest

from data_prep.comm import CommAborted, FileComm
from data_prep.global_dedup import exact_duplicates, near_duplicates
from data_prep.launch import run_prep
from data_prep.state import PrepError, PrepOptions
from megatrain.dist import DistEnv


def run_ranks(directory, size, fn):
    """fn(comm) on `size` ranks (threads), results in rank order."""
    results, errors = [None] * size, []

    def target(rank):
        try:
            results[rank] = fn(FileComm(directory, rank, size, log=lambda *_: None))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=target, args=(r,)) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def test_allgather_and_alltoall(tmp_path):
    def fn(comm):
        gathered = comm.allgather(comm.rank * 10)
        received = comm.alltoall([np.array([comm.rank, dst]) for dst in range(comm.size)])
        return gathered, [r.tolist() for r in received]

    for rank, (gathered, received) in enumerate(run_ranks(tmp_path, 3, fn)):
        assert gathered == [0, 10, 20]
        assert received == [[src, rank] for src in range(3)]


def test_partitioned_dedup_is_the_same_on_any_number_of_ranks(tmp_path):
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 50, 200).astype(np.uint64)  # many exact duplicates
    bands = rng.integers(0, 400, (200, 4)).astype(np.uint64)  # some shared buckets
    gids = np.arange(200, dtype=np.int64)

    def fn(comm):
        mine = [
            (hashes[i :: comm.size], gids[i :: comm.size]) for i in [comm.rank]
        ]  # round-robin split
        mine_near = [(bands[comm.rank :: comm.size], gids[comm.rank :: comm.size])]
        exact = exact_duplicates(comm, mine)
        near = near_duplicates(comm, mine_near, 4)
        return [a.tolist() for a in (*exact, *near)]

    results = [run_ranks(tmp_path / str(n), n, fn) for n in (1, 2, 3)]
    assert all(r == results[0][0] for per_n in results for r in per_n)
    dropped, original = results[0][0][:2]
    assert len(dropped) == 200 - 50 + sum(1 for h in range(50) if h not in set(hashes.tolist()))
    assert all(hashes[d] == hashes[o] and o < d for d, o in zip(dropped, original))


def test_a_rank_that_dies_silently_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setenv("MEGATRAIN_PREP_STALE_S", "0.5")
    dead = FileComm(tmp_path, 1, 2, log=lambda *_: None)
    dead._beat.set()  # its process is gone: no more heartbeats, no more calls
    time.sleep(0.8)
    with pytest.raises(CommAborted, match="rank 1 stopped without a word"):
        FileComm(tmp_path, 0, 2, log=lambda *_: None).barrier()


def test_launcher_detection():
    def launcher(environ):
        env = DistEnv.from_environ(environ, arrays_are_ranks=True)
        return env.launcher, env.rank, env.world_size

    assert launcher({}) == ("local", 0, 1)
    assert launcher({"PMI_RANK": "0", "PMI_SIZE": "2"}) == ("mpi", 0, 2)
    array = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert launcher({**array, "SLURM_STEP_ID": "0", "SLURM_NTASKS": "1"}) == ("array", 3, 4)
    srun = {"SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}
    assert launcher(srun) == ("srun", 2, 4)
    # the batch script itself
    assert launcher({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}) == ("local", 0, 1)


def test_torchrun_is_not_a_prep_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(PrepError, match="not run under torchrun.*--workers N, mpiexec, srun"):
        run_prep(PrepOptions(inputs=[str(tmp_path)], out=str(tmp_path / "out")))
