"""Starting the ranks of a prep: one process, local workers, MPI, a Slurm array or srun tasks.

`run_prep(opts)` asks `megatrain.dist.DistEnv` who this process is (`launcher`, rank, size):

    local   this process is rank 0; `--workers N` starts N-1 more (`worker_main`), which
            inherit the output lock and die with it (PR_SET_PDEATHSIG), talking through files
    mpi     every rank runs run_prep; collectives through mpi4py
    array   SLURM_ARRAY_TASK_ID is the rank, the array's task count the size; collectives through
            files (OUT/.prep-work/sync/array-<job id>); all tasks must be able to run at once
    srun    SLURM_PROCID / SLURM_NTASKS of a step without MPI; collectives through files

torchrun is refused: its ranks are meant for training. Rank 0 of a local or MPI run holds
OUT/.prep.lock exclusively; the tasks of an array or srun step share it (they are one run),
which still keeps any other local or MPI run out.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

from data_prep.comm import Comm, CommAborted, FileComm, MPIComm, SingleComm
from data_prep.pipeline import prepare_rank
from data_prep.state import PrepError, PrepOptions, quiet
from data_prep.workdir import WorkDir
from megatrain.dist import DistEnv, agree
from megatrain.locks import exclude_readers
from megatrain.shards import MANIFEST_FILE

LOCK_FILE = ".prep.lock"


def run_prep(opts: PrepOptions, log=print) -> dict:
    """Run (this rank of) a prep and return the report (the same dict as DIR/report.json)."""
    env = DistEnv.from_environ(arrays_are_ranks=True)
    if env.launcher == "torchrun":
        raise PrepError(
            "megatrain prep does not run under torchrun; start its ranks with --workers N, "
            "mpiexec, srun or a Slurm job array"
        )
    if env.launcher != "local" and opts.workers > 1:
        raise PrepError(
            f"--workers {opts.workers} is for a single process; under {env.launcher} the ranks "
            "are the workers (drop --workers)"
        )
    if env.launcher == "local":
        return _run_local(opts, log)
    out = Path(opts.out)
    if env.launcher == "mpi":
        comm = MPIComm()
        lock = agree(lambda: acquire_lock(out) if comm.rank == 0 else None, comm)
    else:  # the Slurm job (and step) id names the folder the tasks meet in
        e = os.environ
        session, kind = (
            (f"array-{e['SLURM_ARRAY_JOB_ID']}", "Slurm array tasks")
            if env.launcher == "array"
            else (f"step-{e['SLURM_JOB_ID']}.{e['SLURM_STEP_ID']}", "srun tasks")
        )
        comm = FileComm(WorkDir(out).sync(session), env.rank, env.world_size, log=log, kind=kind)
        lock = agree(lambda: acquire_lock(out, shared=True), comm)
    trainings = agree(lambda: _keep_trainings_out(out, opts.force and comm.rank == 0), comm)
    try:
        return _run_ranks(opts, comm, log)
    finally:
        for fd in (lock, trainings):
            if fd is not None:
                os.close(fd)


def _keep_trainings_out(out: Path, force: bool) -> int | None:
    """`--force` replaces a finished dataset: not while a training reads it (their shared lock
    on OUT/.readers.lock), and no training may open it until this prep ends (the descriptor
    returned, to keep open)."""
    return exclude_readers(out) if force else None


def _run_ranks(opts: PrepOptions, comm: Comm, log) -> dict:
    try:
        report = prepare_rank(opts, comm, log)
    except CommAborted as e:
        raise PrepError(f"another rank failed: {e}") from None
    except Exception as e:
        if not getattr(e, "shared", False):  # the others do not know: stop them
            comm.abort(f"{type(e).__name__}: {e}")
        raise
    comm.finish()
    work = WorkDir(opts.out)
    if comm.rank == 0 and not opts.keep_work and (work.out / MANIFEST_FILE).exists():
        shutil.rmtree(work.root, ignore_errors=True)
    return report


def acquire_lock(out: Path, shared: bool = False) -> int:
    """flock OUT/.prep.lock; returns the fd to keep open (children may inherit it).

    Exclusive for a run's coordinator (local or MPI rank 0); shared for Slurm array tasks, which
    all belong to one run. Released by the kernel when the process (and its children) end,
    even after kill -9, so a stale lock never blocks a rerun.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise PrepError(
            f"{out} is being written by another `megatrain prep` ({owner}); wait for it to "
            "finish or choose another --out"
        ) from None
    if not shared:  # the lock file says who holds it (not a data file: written in place)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
    return fd


# ----------------------------------------------------------------------------- local workers


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL me when my parent dies (Linux), so that kill -9 of
    the parent stops the whole run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_local(opts: PrepOptions, log) -> dict:
    lock = acquire_lock(Path(opts.out))
    children: list[subprocess.Popen] = []
    trainings = None
    try:
        trainings = _keep_trainings_out(Path(opts.out), opts.force)
        if opts.workers <= 1:
            return _run_ranks(opts, SingleComm(), log)
        session = f"local-{uuid.uuid4().hex[:12]}"
        args = [str(opts.workers), session, json.dumps(asdict(opts))]
        for rank in range(1, opts.workers):
            children.append(
                subprocess.Popen(
                    [sys.executable, "-m", "data_prep.launch", str(rank), *args],
                    pass_fds=(lock,),
                    preexec_fn=_die_with_parent,
                    env={**os.environ, "RAYON_NUM_THREADS": "1"},
                )
            )

        def alive():
            for rank, child in enumerate(children, start=1):
                if child.poll() not in (None, 0):
                    raise PrepError(
                        f"worker {rank} failed (exit code {child.returncode}); see its error above"
                    )

        sync = WorkDir(opts.out).sync(session)
        comm = FileComm(sync, 0, opts.workers, log=log, alive=alive, kind="local workers")
        report = _run_ranks(opts, comm, log)
        for rank, child in enumerate(children, start=1):
            if child.wait() != 0:
                raise PrepError(f"worker {rank} failed (exit code {child.returncode})")
        return report
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for fd in (lock, trainings):
            if fd is not None:
                os.close(fd)


def worker_main(argv: list[str]) -> int:
    """Local worker RANK of `megatrain prep --workers SIZE`, started by rank 0 as

        python -m data_prep.launch RANK SIZE SESSION OPTIONS_JSON

    It meets rank 0 in OUT/.prep-work/sync/SESSION; rank 0 reports a failed worker."""
    rank, size, session, payload = int(argv[0]), int(argv[1]), argv[2], argv[3]
    opts = PrepOptions(**json.loads(payload))
    comm = FileComm(WorkDir(opts.out).sync(session), rank, size, log=quiet)
    try:
        _run_ranks(opts, comm, quiet)
    except Exception as e:
        if not getattr(e, "shared", False):  # a shared error is rank 0's to print
            print(f"megatrain prep: worker {rank}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
