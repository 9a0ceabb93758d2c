"""Starting the ranks of a prep: one process, local workers, MPI, a Slurm array or srun tasks.

`run_prep(opts)` looks at the environment (data_prep.comm.detect_launcher):

    local   this process is rank 0; `--workers N` starts N-1 more (`python -m data_prep.launch`),
            which inherit the output lock and die with it (PR_SET_PDEATHSIG), talking through files
    mpi     every rank runs run_prep; collectives through mpi4py
    array   SLURM_ARRAY_TASK_ID is the rank, the array's task count the size; collectives through
            files (OUT/.prep-work/sync/array-<job id>); all tasks must be able to run at once
    srun    SLURM_PROCID / SLURM_NTASKS of a step without MPI; collectives through files

Rank 0 of a local or MPI run holds OUT/.prep.lock exclusively; the tasks of an array or srun
step share it (they are one run), which still keeps any other local or MPI run out.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import asdict
from pathlib import Path

from data_prep.comm import CommAborted, FileComm, MPIComm, SingleComm, detect_launcher
from data_prep.pipeline import PrepError, PrepOptions, _run
from data_prep.stages import remove_tree
from data_prep.workdir import LockedError, WorkDir, acquire_lock
from megatrain.shards import MANIFEST_FILE


def run_prep(opts: PrepOptions, log=print) -> dict:
    """Run (this rank of) a prep and return the report (the same dict as DIR/report.json)."""
    launcher = detect_launcher()
    if launcher != "local" and opts.workers > 1:
        raise PrepError(
            f"--workers {opts.workers} is for a single process; under {launcher} the ranks are "
            "the workers (drop --workers)"
        )
    if launcher == "local":
        return _run_local(opts, log)
    if launcher == "mpi":
        comm = MPIComm()
        lock = _shared_lock_error(
            comm, lambda: acquire_lock(Path(opts.out)) if comm.rank == 0 else None
        )
    else:
        env = os.environ
        if launcher == "array":
            first = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            size = int(
                env.get("SLURM_ARRAY_TASK_COUNT") or int(env["SLURM_ARRAY_TASK_MAX"]) - first + 1
            )
            rank, session = (
                int(env["SLURM_ARRAY_TASK_ID"]) - first,
                f"array-{env['SLURM_ARRAY_JOB_ID']}",
            )
        else:
            rank, size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
            session = f"step-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
        comm = FileComm(
            WorkDir(opts.out).sync(session),
            rank,
            size,
            log=log,
            kind="Slurm array tasks" if launcher == "array" else "srun tasks",
        )
        lock = acquire_lock(Path(opts.out), shared=True)
    try:
        return _run_ranks(opts, comm, log)
    finally:
        if lock is not None:
            os.close(lock)


def _shared_lock_error(comm, take):
    """Take the lock on rank 0; every rank fails alike if it is held."""
    fd, error = None, None
    try:
        fd = take()
    except LockedError as e:
        error = str(e)
    error = comm.allgather(error)[0]
    if error:
        raise PrepError(error)
    return fd


def _run_ranks(opts: PrepOptions, comm, log) -> dict:
    try:
        report = _run(opts, comm, log if comm.rank == 0 else _quiet)
    except CommAborted as e:
        raise PrepError(f"another rank failed: {e}") from None
    except Exception as e:
        if not getattr(e, "shared", False):  # the others do not know: stop them
            comm.abort(f"{type(e).__name__}: {e}")
        raise
    _finish(comm, opts)
    return report


def _finish(comm, opts: PrepOptions) -> None:
    """Every rank is done: rank 0 removes the work directory once the manifest exists."""
    if isinstance(comm, FileComm):
        (comm.dir / f"exit.{comm.rank}").touch()
        if comm.rank == 0:
            comm._wait([f"exit.{r}" for r in range(comm.size)], "exit")
    elif isinstance(comm, MPIComm):
        comm.barrier()
    work = WorkDir(opts.out)
    if comm.rank == 0 and not opts.keep_work and (work.out / MANIFEST_FILE).exists():
        remove_tree(work.root)


def _quiet(*_):
    pass


# ----------------------------------------------------------------------------- local workers


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL me when my parent dies (Linux), so kill -9 stops the whole run."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _run_local(opts: PrepOptions, log) -> dict:
    out = Path(opts.out)
    try:
        lock = acquire_lock(out)
    except LockedError as e:
        raise PrepError(str(e)) from None
    children: list[subprocess.Popen] = []
    try:
        if opts.workers <= 1:
            return _run_ranks(opts, SingleComm(), log)
        session = f"local-{uuid.uuid4().hex[:12]}"
        payload = json.dumps(asdict(opts))
        for rank in range(1, opts.workers):
            children.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "data_prep.launch",
                        str(rank),
                        str(opts.workers),
                        session,
                        payload,
                    ],
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

        comm = FileComm(
            WorkDir(out).sync(session), 0, opts.workers, log=log, alive=alive, kind="local workers"
        )
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
        os.close(lock)


def _worker_main(argv: list[str]) -> int:
    rank, size, session, payload = int(argv[0]), int(argv[1]), argv[2], argv[3]
    opts = PrepOptions(**json.loads(payload))
    comm = FileComm(WorkDir(opts.out).sync(session), rank, size, log=_quiet)
    try:
        _run_ranks(opts, comm, _quiet)
    except Exception as e:
        print(
            f"megatrain prep: worker {rank}: {type(e).__name__}: {e}", file=sys.stderr, flush=True
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
