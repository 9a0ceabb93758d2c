"""Who may write a run directory, and who may replace a dataset: advisory `flock` locks.

    RUN_DIR/.lock              exclusive, held by rank 0 of the training for its lifetime; the file
                               says "pid P on HOST since TIME"
    DATA_DIR/.readers.lock     shared, held by every rank of every training that reads the dataset;
                               `megatrain prep --force` takes it exclusively before replacing it

What we rely on: `flock(2)` locks belong to the open file description, so the kernel drops
them when the last descriptor closes, which happens when the process dies in any way, kill -9
included. A lock left by a dead process is therefore no lock at all: the next run takes it
without any stale-pid guessing. The file's text is only a description of the holder, never
trusted for the decision.

On a local filesystem and on NFSv4 (where Linux emulates flock with byte-range locks) this
works across hosts; on some Lustre and GPFS mounts flock is local to one client or disabled
(`-o noflock`: every call fails, reported here by name). Keep the run directory on a
filesystem whose flock works across nodes, or on the node that trains.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from megatrain.errors import MegatrainError

RUN_LOCK = ".lock"
READERS_LOCK = ".readers.lock"


class RunLockError(MegatrainError):
    """Another training holds the run directory."""


class DatasetInUseError(MegatrainError):
    """A dataset is being read by a training (or written by a prep) and cannot change hands."""


def _open(path: Path, create: bool) -> int | None:
    """A descriptor to lock `path` through; None if it cannot exist (read-only dataset)."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if create else os.open(path, os.O_RDWR)
    except OSError:
        try:  # a read-only dataset directory: a read-only descriptor locks as well
            return os.open(path, os.O_RDONLY)
        except OSError:
            return None


def _flock(fd: int, path: Path, shared: bool) -> bool:
    """Non-blocking flock; False if someone holds a conflicting lock."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        os.close(fd)
        raise MegatrainError(
            f"cannot lock {path}: {e.strerror} (this filesystem does not support flock; put the "
            "directory on one that does)"
        ) from None


def holders(path: Path) -> list[int]:
    """Pids on this host holding a flock on `path` (Linux /proc/locks; [] elsewhere)."""
    try:
        st = os.stat(path)
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in lines:
        parts = line.split()  # "1: FLOCK  ADVISORY  READ  1234 08:01:5678 0 EOF"
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[-3] == inode and parts[4].isdigit():
            pids.append(int(parts[4]))
    return sorted(set(pids))


def _in_use(path: Path, fd: int) -> RunLockError:
    owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
    return RunLockError(
        f"{path.parent} is in use by another training ({owner}); wait for it to end or stop it, "
        "or give this run another run.dir"
    )


class RunLock:
    """RUN_DIR/.lock held exclusively by this process until `release()` (or its death)."""

    def __init__(self, run_dir: str | os.PathLike):
        """Take the lock at once or raise `RunLockError` naming the holder's host and pid."""
        self.fd: int | None = None
        self.path = Path(run_dir) / RUN_LOCK
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open(self.path, create=True)
        if fd is None:
            raise RunLockError(f"cannot create {self.path}: is the run directory writable?")
        if not _flock(fd, self.path, shared=False):
            error = _in_use(self.path, fd)
            os.close(fd)
            raise error
        # a description of the holder, written in place: only ever read for the message above
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Drop the lock (closing the descriptor); idempotent."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def check_run_dir_free(run_dir: str | os.PathLike) -> None:
    """Raise `RunLockError` now if a training holds RUN_DIR (for a launcher, before it starts
    ranks; the ranks then take the lock for real)."""
    path = Path(run_dir) / RUN_LOCK
    fd = _open(path, create=False) if path.exists() else None
    if fd is None:
        return
    free = _flock(fd, path, shared=False)  # a probe: nothing is written
    error = None if free else _in_use(path, fd)
    os.close(fd)
    if error:
        raise error


class ReadersLock:
    """A shared lock on each dataset a training reads, held until `release()`: `megatrain prep
    --force` cannot replace them meanwhile, and a prep rewriting one keeps the training out."""

    def __init__(self, data_dirs: list[str | os.PathLike]):
        self.fds: list[int] = []
        for directory in data_dirs:
            path = Path(directory) / READERS_LOCK
            fd = _open(path, create=Path(directory).is_dir())
            if fd is None:  # no dataset here (its loader names that) or nowhere to lock
                continue
            if not _flock(fd, path, shared=True):
                os.close(fd)
                self.release()
                raise DatasetInUseError(
                    f"{directory} is being replaced by `megatrain prep --force`; wait for it to "
                    "finish, then start the training again"
                )
            self.fds.append(fd)

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())

    def __del__(self):
        self.release()


def exclude_readers(data_dir: str | os.PathLike) -> int:
    """For a prep about to replace DATA_DIR: its readers lock, exclusively, as a descriptor to
    keep open until the prep ends; raises `DatasetInUseError` naming the trainings' pids."""
    path = Path(data_dir) / READERS_LOCK
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    fd = _open(path, create=True)
    if fd is None:
        raise DatasetInUseError(f"cannot create {path}: is {data_dir} writable?")
    if not _flock(fd, path, shared=False):
        pids = holders(path)
        os.close(fd)
        who = f"pid {', '.join(map(str, pids))} on {socket.gethostname()}" if pids else "elsewhere"
        raise DatasetInUseError(
            f"a training has {data_dir} open ({who}); replacing it would change its data under "
            "it: wait for the training to end, or prepare into another --out"
        )
    return fd
