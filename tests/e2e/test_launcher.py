"""`megatrain train CONFIG --nproc 2`, its own launcher (megatrain/launcher.py), as a user and an
orchestrator meet it: real processes, real signals, real gloo ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, events, read_jsonl

TINY = REPO / "configs" / "tiny.yaml"


def common(data: Path, run_dir: Path) -> list[str]:
    return [
        f"data.sources.0.path={data}",
        f"run.dir={run_dir}",
        "data.seq_len=32",
        "batch.micro_batch=2",
        "batch.grad_accum=1",
        "run.max_steps=100000",
        "run.log_every=1",
        "run.eval_every=100000",
        "run.ckpt_every=100000",
    ]


def start(overrides: list[str], tmp_path: Path) -> tuple[subprocess.Popen, Path, Path]:
    """The launcher in a session of its own (a group to kill, not the test's), output to files."""
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    cmd = [sys.executable, "-m", "megatrain.cli", "train", str(TINY), "--nproc", "2", *overrides]
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=o, stderr=e, start_new_session=True)
    return proc, out, err


def rank_pids(out: Path, proc: subprocess.Popen, timeout: float = 120) -> list[int]:
    """The ranks' pids, as the launcher prints them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m = re.search(r"started 2 ranks \(pids (\d+) (\d+)\)", out.read_text())
        if m:
            return [int(m.group(1)), int(m.group(2))]
        assert proc.poll() is None, f"launcher exited {proc.returncode}: {out.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"no rank pids printed: {out.read_text()}")


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(r["step"] >= step for r in read_jsonl(metrics)):
            return
        assert proc.poll() is None, f"launcher exited {proc.returncode} before step {step}"
        time.sleep(0.2)
    raise AssertionError(f"training did not reach step {step}")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def seconds_until_gone(pids: list[int], timeout: float = 30) -> float:
    t0 = time.monotonic()
    while any(alive(p) for p in pids):
        assert time.monotonic() - t0 < timeout, f"ranks still running: {pids}"
        time.sleep(0.02)
    return time.monotonic() - t0


@pytest.mark.slow
@pytest.mark.parametrize("target", ["group", "launcher"])
def test_kill_9_of_the_launcher_leaves_no_rank_running(tiny_dataset, tmp_path, target):
    run_dir = tmp_path / "run"
    proc, out, _ = start(common(tiny_dataset, run_dir), tmp_path)
    try:
        pids = rank_pids(out, proc)
        wait_for_step(run_dir, 2, proc)
        if target == "group":
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()  # what an orchestrator's Popen.kill() does
        proc.wait(timeout=10)
        gone = seconds_until_gone(pids, timeout=10)
        print(f"kill -9 of the {target} -> all ranks gone in {gone:.2f} s")
        assert gone < 5
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
        for p in pids if "pids" in locals() else []:
            if alive(p):
                os.kill(p, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target, signum",
    [
        ("launcher", "SIGTERM"),  # `kill PID`
        ("launcher", "SIGINT"),
        ("group", "SIGTERM"),  # Slurm, a process manager
        ("group", "SIGINT"),  # Ctrl-C in a terminal: the ranks get it twice
    ],
)
def test_a_stop_signal_saves_and_stops(tiny_dataset, tmp_path, target, signum):
    signum = getattr(signal, signum)
    run_dir = tmp_path / "run"
    proc, out, err = start(common(tiny_dataset, run_dir), tmp_path)
    try:
        pids = rank_pids(out, proc)
        wait_for_step(run_dir, 2, proc)
        t0 = time.monotonic()
        if target == "group":
            os.killpg(proc.pid, signum)
        else:
            os.kill(proc.pid, signum)
        rc = proc.wait(timeout=120)
        took = time.monotonic() - t0
        print(f"{signum.name} to the {target} -> saved and exited {rc} in {took:.2f} s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert rc == 0, err.read_text()[-3000:]
    assert not any(alive(p) for p in pids)
    (stopped,) = events(run_dir, "stopped")
    assert stopped["reason"] == signum.name
    step = stopped["step"]
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    assert (run_dir / "checkpoints" / f"step{step:08d}" / "megatrain-checkpoint.json").is_file()
    assert "Traceback" not in err.read_text()


@pytest.mark.slow
def test_a_second_sigint_kills_the_ranks_at_once(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc, out, err = start(common(tiny_dataset, run_dir), tmp_path)
    try:
        pids = rank_pids(out, proc)
        wait_for_step(run_dir, 2, proc)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.05)
        t0 = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=10)
        gone = seconds_until_gone(pids, timeout=5) + time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    print(f"second SIGINT -> launcher and ranks gone in {gone:.2f} s")
    assert rc == 130, err.read_text()[-3000:]
    assert gone < 3


def make_unwritable(tmp_path: Path) -> str:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return str(blocker / "run")  # a directory under a file: unwritable even for root


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, named",
    [
        ("parallel.tensor=3", "parallel.tensor"),
        ("data.sources.0.path={tmp}/no-such-data", "no-such-data"),
        ("cluster=no-such-cluster", "no-such-cluster"),
        ("run.dir={unwritable}", "run.dir"),
    ],
)
def test_a_mistake_the_launcher_can_see_is_one_line_and_no_rank_starts(
    tiny_dataset, tmp_path, override, named
):
    run_dir = tmp_path / "run"
    override = override.format(tmp=tmp_path, unwritable=make_unwritable(tmp_path))
    proc, out, err = start([*common(tiny_dataset, run_dir), override], tmp_path)
    rc = proc.wait(timeout=120)
    lines = err.read_text().strip().splitlines()
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("megatrain train: error:"), lines
    assert named in lines[0]
    assert "started" not in out.read_text()  # no rank


@pytest.mark.slow
def test_an_error_only_a_rank_sees_is_one_line_exit_2_without_waiting(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(tiny_dataset), str(data)], check=True)
    shard = sorted(data.glob("shard-*.arrow"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    run_dir = tmp_path / "run"
    proc, out, err = start([*common(data, run_dir), "data.verify_checksums=true"], tmp_path)
    rank_pids(out, proc)  # the launcher cannot see this one: ranks start
    deadline, seen = time.monotonic() + 300, None
    while proc.poll() is None and time.monotonic() < deadline:
        if seen is None and "error:" in err.read_text():
            seen = time.monotonic()
        time.sleep(0.05)
    rc = proc.wait(timeout=30)
    exited = time.monotonic()
    seen = seen or exited
    print(f"rank's error -> launcher exit in {exited - seen:.2f} s")
    text = err.read_text()
    errors = [line for line in text.splitlines() if line.startswith("megatrain train: error:")]
    assert rc == 2, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert len(errors) == 1 and shard.name in errors[0], errors
    assert exited - seen < 10


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_without_their_tracebacks(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    proc, out, err = start(common(tiny_dataset, run_dir), tmp_path)
    try:
        pids = rank_pids(out, proc)
        wait_for_step(run_dir, 2, proc)
        t0 = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)  # rank 0 is left in a collective with a dead peer
        rc = proc.wait(timeout=30)
        gone = seconds_until_gone(pids, timeout=5) + time.monotonic() - t0
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    print(f"kill -9 of rank 1 -> launcher and ranks gone in {gone:.2f} s")
    assert rc == 1
    assert "Traceback" not in err.read_text(), err.read_text()[-3000:]
    assert gone < 10
