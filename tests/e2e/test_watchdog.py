"""A frozen rank ends the job in bounded time: `megatrain train --nproc 2` with rank 1 stopped
(SIGSTOP) mid-run. Rank 0's watchdog dumps its stacks, logs a `hang` event and exits 3; the
launcher stops the stopped rank too. And `run.collective_timeout_s` reaches the process group.
Real processes, real signals, real gloo ranks."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from megatrain.watchdog import HANG_EXIT
from tests.e2e.test_launcher import TINY, alive, common, rank_pids, start, wait_for_step
from tests.helpers import REPO, events, free_port

pytestmark = pytest.mark.slow


def freeze_rank_1(overrides, tmp_path, timeout: float) -> tuple[int, float, float, list[int], str]:
    """Start 2 ranks, SIGSTOP rank 1 after step 3; the launcher's exit code, the wall time of the
    signal, the seconds from it until the launcher and every rank are gone, the pids, stderr."""
    run_dir = tmp_path / "run"
    proc, out, err = start(common(run_dir.parent / "data", run_dir) + overrides, tmp_path)
    try:
        pids = rank_pids(out, proc)
        wait_for_step(run_dir, 3, proc)
        t0, stopped_at = time.monotonic(), time.time()
        os.kill(pids[1], signal.SIGSTOP)
        rc = proc.wait(timeout=timeout)
        while any(alive(p) for p in pids) and time.monotonic() - t0 < timeout:
            time.sleep(0.02)
        gone = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return rc, stopped_at, gone, pids, err.read_text()


@pytest.fixture
def data_link(tiny_dataset, tmp_path):
    (tmp_path / "data").symlink_to(tiny_dataset)


def test_a_frozen_rank_fires_the_watchdog_of_the_others(data_link, tmp_path):
    rc, stopped_at, gone, pids, err = freeze_rank_1(["run.hang_timeout_s=8"], tmp_path, 60)
    run_dir = tmp_path / "run"
    (hang,) = events(run_dir, "hang")
    to_hang = hang["time"] - stopped_at
    print(f"SIGSTOP of rank 1 -> hang event in {to_hang:.1f} s; all gone in {gone:.1f} s")
    assert rc == HANG_EXIT, err[-3000:]
    assert not any(alive(p) for p in pids)  # the stopped rank too
    assert to_hang < 8 + 3 and gone < 8 + 10
    assert hang["rank"] == 0 and hang["host"] and hang["phase"] == "step"
    assert hang["step"] >= 4 and hang["waited_s"] >= 8
    stacks = run_dir / "hangs" / f"{hang['host']}-rank0-step{hang['step']}.txt"
    assert hang["stacks"] == str(stacks)
    text = stacks.read_text()
    assert "Thread" in text and 'File "' in text and "in train_step" in text  # where it waited
    assert "megatrain train: error: hang: rank 0" in err
    assert "Traceback" not in err, err[-3000:]


COLLECTIVE = """
import os, sys, time
from megatrain import dist
from megatrain.config import load_config
from megatrain.train import Trainer

trainer = Trainer(load_config(sys.argv[1], sys.argv[2:]))
dist.all_reduce({"x": 1.0})
if trainer.rank == 1:
    time.sleep(120)  # never joins the next collective
    os._exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce({"x": 1.0})
except RuntimeError as e:
    print(f"raised after {time.monotonic() - t0:.2f} s: {str(e)[-80:]}", flush=True)
os._exit(0)
"""


def test_the_collective_timeout_reaches_the_process_group(tiny_dataset, tmp_path):
    """`run.collective_timeout_s` is the process group's: a peer that never joins a gloo
    collective makes it raise after that long, not DeepSpeed's 30 minutes. (Measured, not
    explained: in a whole CPU training, a rank waiting inside the ZeRO engine's step for a stopped
    peer still waited after 120 s with a 20 s timeout; the watchdog covers that. On GPU, NCCL
    with TORCH_NCCL_ASYNC_ERROR_HANDLING=1, set by dist.py, aborts on the timeout.)"""
    port = free_port()
    overrides = [
        *common(tiny_dataset, tmp_path / "run"),
        "run.collective_timeout_s=5",
    ]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-c", COLLECTIVE, str(TINY), *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True))
    try:
        out = procs[0].communicate(timeout=240)[0]
    finally:
        for p in procs:
            p.kill()
    m = re.search(r"raised after ([\d.]+) s", out)
    assert m, out[-2000:]
    print(f"a gloo collective with a 5 s timeout and an absent peer: {m.group(0)}")
    assert 4.5 <= float(m.group(1)) < 5 + 5
