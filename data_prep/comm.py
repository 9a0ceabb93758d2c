"""How the processes of one `megatrain prep` talk: a tiny collective API over MPI or over files.

    comm.rank, comm.size, comm.kind
    comm.barrier(tag)
    comm.allgather(obj) -> [obj of rank 0, obj of rank 1, ...]      small Python objects
    comm.alltoall([obj for rank 0, obj for rank 1, ...]) -> [obj from rank 0, ...]   numpy arrays
    comm.abort(message)      this rank failed: stop the others instead of letting them wait
    comm.finish()            end of the run: rank 0 returns once every rank is done

`SingleComm` is one process. `MPIComm` wraps mpi4py (`mpiexec -n N megatrain prep ...`,
`srun --mpi=pmi2 ...`). `FileComm` exchanges pickles through a directory on the shared
filesystem: it serves the local `--workers N` processes, Slurm job arrays and plain `srun`
steps without MPI. Its files are named by call number, so a restarted rank (a requeued array
task) replays the calls it had already made and meets the others where they are. A failing
rank writes an `abort` file; the others stop waiting and fail with its message instead of
hanging. Every `Comm` is also a `megatrain.dist.Comm`, so `megatrain.dist.agree` works on it.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from megatrain.files import atomic_write_bytes, atomic_write_text


class CommAborted(Exception):
    """Another rank failed; its message is included."""


class Comm(Protocol):
    """The ranks of one prep, whatever started them."""

    rank: int
    size: int
    kind: str
    """How the ranks were started, for the log ("MPI ranks", "local workers", ...)."""

    def barrier(self, tag: str = "") -> None: ...

    def allgather(self, obj: Any) -> list: ...

    def alltoall(self, objs: list) -> list: ...

    def abort(self, message: str) -> None:
        """This rank failed with `message`: make the others fail too, rather than wait."""

    def finish(self) -> None:
        """This rank is done; on rank 0, return once every rank is (then OUT can be cleaned)."""


class SingleComm(Comm):
    rank, size, kind = 0, 1, "1 process"

    def barrier(self, tag: str = "") -> None:
        pass

    def allgather(self, obj):
        return [obj]

    def alltoall(self, objs):
        return list(objs)

    def abort(self, message: str) -> None:
        pass

    def finish(self) -> None:
        pass


class MPIComm(Comm):
    def __init__(self):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.kind = "MPI ranks"

    def _arrive(self) -> None:
        """A barrier that sleeps while it waits: MPI's blocking calls spin a core at 100%, which
        would slow down rank 0 training the tokenizer on the same node."""
        request, delay = self.comm.Ibarrier(), 0.001
        while not request.Test():
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def barrier(self, tag: str = "") -> None:
        self._arrive()

    def allgather(self, obj):
        self._arrive()
        return self.comm.allgather(obj)

    def alltoall(self, objs):
        self._arrive()
        # Pickled point-to-point in rounds (no 2 GB message limit of a single pickled alltoall).
        out = [None] * self.size
        out[self.rank] = objs[self.rank]
        for shift in range(1, self.size):
            dst, src = (self.rank + shift) % self.size, (self.rank - shift) % self.size
            out[src] = self.comm.sendrecv(objs[dst], dest=dst, source=src)
        return out

    def abort(self, message: str) -> None:
        print(f"megatrain prep: rank {self.rank} failed: {message}", file=sys.stderr, flush=True)
        self.comm.Abort(1)

    def finish(self) -> None:
        self._arrive()


class FileComm(Comm):
    """Collectives through files in `directory` (shared by all ranks of this run)."""

    def __init__(
        self,
        directory: str | os.PathLike,
        rank: int,
        size: int,
        poll_s: float = 0.02,
        timeout_s: float = 7 * 24 * 3600,
        log=print,
        alive=None,
        kind: str = "processes",
    ):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.rank, self.size = rank, size
        self.poll_s, self.timeout_s, self.log = poll_s, timeout_s, log
        self.alive = alive  # optional callable raising if a helper process died
        self.calls = 0
        self.kind = kind
        # A heartbeat per rank, so that the others notice a rank killed without a word (OOM, node
        # failure) instead of waiting for it until the job's time limit.
        self.stale_s = float(os.environ.get("MEGATRAIN_PREP_STALE_S", "600"))
        self._beat = threading.Event()
        threading.Thread(target=self._heartbeat, daemon=True).start()

    def _heartbeat(self) -> None:
        path = self.dir / f"alive.{self.rank}"
        while True:
            path.touch()
            if self._beat.wait(min(30.0, self.stale_s / 4)):
                return

    def _check_stale(self, missing: list[str]) -> None:
        now = time.time()
        for name in missing:
            rank = name.split(".")[1]  # "00007-ag.<rank>", "00007-a2a.<from>.<to>", "exit.<rank>"
            beat = self.dir / f"alive.{rank}"
            try:
                age = now - beat.stat().st_mtime
            except OSError:
                continue  # not started yet (a pending array task): keep waiting
            if age > self.stale_s:
                raise CommAborted(
                    f"rank {rank} stopped without a word (no heartbeat for {age:.0f} s); rerun the "
                    "same command to resume"
                )

    def _write(self, name: str, obj) -> None:
        atomic_write_bytes(self.dir / name, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def _wait(self, names: list[str], what: str) -> None:
        start = last_note = time.monotonic()
        delay = self.poll_s
        while True:
            missing = [n for n in names if not (self.dir / n).exists()]
            if not missing:
                return
            abort = self.dir / "abort"
            if abort.exists():
                raise CommAborted(abort.read_text())
            if self.alive is not None:
                self.alive()
            self._check_stale(missing)
            now = time.monotonic()
            if now - start > self.timeout_s:
                raise TimeoutError(
                    f"rank {self.rank}: gave up waiting for {what} ({missing[:3]}...)"
                )
            if now - last_note > 300:
                self.log(
                    f"rank {self.rank}: waiting for {len(missing)} rank(s) at {what} "
                    f"(e.g. {missing[0]}); all ranks of a prep must run at the same time"
                )
                last_note = now
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)

    def _call(self, kind: str) -> str:
        self.calls += 1
        return f"{self.calls:05d}-{kind}"

    def barrier(self, tag: str = "") -> None:
        self.allgather(None)

    def allgather(self, obj):
        call = self._call("ag")
        self._write(f"{call}.{self.rank}", obj)
        names = [f"{call}.{r}" for r in range(self.size)]
        self._wait(names, f"call {call}")
        return [pickle.loads((self.dir / n).read_bytes()) for n in names]

    def alltoall(self, objs):
        call = self._call("a2a")
        for dst, obj in enumerate(objs):
            self._write(f"{call}.{self.rank}.{dst}", obj)
        names = [f"{call}.{src}.{self.rank}" for src in range(self.size)]
        self._wait(names, f"call {call}")
        # Kept until the run ends: a restarted rank replays its calls from these files.
        return [pickle.loads((self.dir / n).read_bytes()) for n in names]

    def abort(self, message: str) -> None:
        try:
            atomic_write_text(self.dir / "abort", f"rank {self.rank}: {message}")
        except OSError:
            pass

    def finish(self) -> None:
        self._write(f"exit.{self.rank}", None)
        if self.rank == 0:
            self._wait([f"exit.{r}" for r in range(self.size)], "exit")
