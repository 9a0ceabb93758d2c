"""Writing files so that a crash never leaves a half-written one that looks whole, and hashing them.

Every file megatrain and data_prep write for later use (shards, manifests, checkpoints, markers,
intermediate prep files, the messages ranks exchange) goes through `atomic_path`: write under a
temporary name unique to the host and process, fsync, rename over the final name. A reader then
sees either the old file, or nothing, or the whole new one, even on a shared filesystem written
from several nodes, and after kill -9 or a full disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_path(path: str | os.PathLike) -> Path:
    """Where to write `path` before renaming it: hidden, unique per host and process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write `path` through; on success fsync it (unless told not to:
    for files that are only advisory) and rename it into place; on error remove it."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        yield tmp
        if fsync:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str, fsync: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), fsync)


def write_json(path: str | os.PathLike, obj, **dumps_args) -> None:
    """`obj` as JSON (one trailing newline), atomically."""
    atomic_write_text(path, json.dumps(obj, **dumps_args) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            h.update(chunk)
    return h.hexdigest()


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) so that it is either whole or absent: one write on an
    O_APPEND descriptor, and on a short or failed write (a full disk) the file is cut back to
    where it was. A torn last line left by a process killed mid-write is cut off first, so that
    the new line never glues onto it."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn tail: back to its line start
            tail = os.pread(fd, min(size, 1 << 20), max(size - (1 << 20), 0))
            size -= len(tail) - (tail.rfind(b"\n") + 1)
            os.ftruncate(fd, size)
        try:
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {path}")
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def human_bytes(n: float) -> str:
    """1.5 MB, 320 kB, 12 B: sizes in messages."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.0f} B"
