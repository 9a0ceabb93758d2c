"""The run directory's lock and the datasets' readers lock (megatrain/locks.py), held by real
processes: refused by name while the holder lives, free the moment it dies (kill -9)."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from megatrain.locks import (
    DatasetInUseError,
    ReadersLock,
    RunLock,
    RunLockError,
    check_run_dir_free,
    exclude_readers,
    holders,
)
from tests.helpers import REPO


def hold(code: str) -> subprocess.Popen:
    """A process that runs `code` (taking a lock), prints 'held', then sleeps."""
    script = f"import time\nfrom megatrain.locks import *\n{code}\nprint('held', flush=True)\n"
    script += "time.sleep(600)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_a_held_run_dir_is_refused_with_host_and_pid_and_taken_after_kill_9(tmp_path):
    holder = hold(f"lock = RunLock({str(tmp_path)!r})")
    try:
        with pytest.raises(RunLockError) as e:
            RunLock(tmp_path)
        message = str(e.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message
        assert str(tmp_path) in message and "run.dir" in message
        with pytest.raises(RunLockError):
            check_run_dir_free(tmp_path)
    finally:
        kill(holder)
    lock = RunLock(tmp_path)  # the kernel dropped the dead holder's lock
    assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()
    lock.release()
    check_run_dir_free(tmp_path)
    RunLock(tmp_path).release()


def test_a_training_reading_a_dataset_keeps_prep_force_out_and_the_reverse(tmp_path):
    reader = hold(f"lock = ReadersLock([{str(tmp_path)!r}])")
    try:
        assert reader.pid in holders(tmp_path / ".readers.lock")
        with pytest.raises(DatasetInUseError, match=f"a training has .* open \\(pid {reader.pid}"):
            exclude_readers(tmp_path)
        ReadersLock([tmp_path]).release()  # readers share
    finally:
        kill(reader)
    fd = exclude_readers(tmp_path)
    try:
        with pytest.raises(DatasetInUseError, match="being replaced by `megatrain prep --force`"):
            ReadersLock([tmp_path])
    finally:
        os.close(fd)


def test_a_missing_or_read_only_dataset_needs_no_lock_file(tmp_path):
    ReadersLock([tmp_path / "absent"]).release()
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        ReadersLock([tmp_path / "ro"]).release()
    finally:
        os.chmod(tmp_path / "ro", 0o755)
