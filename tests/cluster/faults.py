"""Faults thrown at a training job on the local Slurm cluster, measured: shared by the tests
(tests/cluster/test_faults.py, which assert on the result) and the benchmark (`bench/faults.py
--slurm`, which prints it).

Each fault runs `sbatch slurm/pretrain.sh` on 2 nodes x 1 task (in network-namespace mode the
two ranks talk across the bridge), a checkpoint every 5 steps, the watchdog at `HANG_TIMEOUT_S`;
the fault lands once step `FAULT_STEP` (3 steps after a checkpoint) is recorded:

    kill9_rank          SIGKILL to rank 1
    sigstop_rank        SIGSTOP to rank 1: a frozen rank, which only the watchdog can tell
    link_down           node2's link down until rank 0's watchdog fires, then up again
    raise_once          rank 1 raises in step FAULT_STEP, the first time only
    raise_every_start   rank 1 raises in step 3 of every job, before any checkpoint: the chain
                        must stop by itself, with the reason

A `Measured` row says how long until every training process of the faulted job was gone, how long
until the run resumed (the `resumed` event of the requeued job), the steps redone, and whether the
losses of the whole run equal the uninterrupted reference's, bit for bit.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.cluster.training import (
    CONFIG,
    NO_WARNING,
    SCRIPT,
    job_env,
    job_text,
    last_step,
    overrides,
    wait_for_step,
)
from tests.helpers import alive, all_pids, cmdline, environ, events, kill, losses

FAULTS = ("kill9_rank", "sigstop_rank", "link_down", "raise_once", "raise_every_start")
FAULT_STEP = 13
HANG_TIMEOUT_S = 15
SETTINGS = [
    "run.ckpt_every=5",
    "run.keep=2",
    f"run.hang_timeout_s={HANG_TIMEOUT_S}",
    # start-up and checkpoint saves get this much; gloo's own timeout comes later, so that the
    # watchdog is what ends a hang
    "run.hang_slow_s=40",
    "run.collective_timeout_s=300",
]


@dataclass
class Measured:
    fault: str
    job: str
    run_dir: Path
    state: str  # the job's final state, after its requeues
    seconds_until_all_gone: float | None = None
    seconds_until_resumed: float | None = None
    steps_lost: int | None = None
    bit_identical: bool | None = None
    notes: list[str] = field(default_factory=list)

    def row(self) -> dict:
        return {
            "fault": self.fault,
            "final_state": self.state,
            "seconds_until_all_gone": _round(self.seconds_until_all_gone),
            "seconds_until_resumed": _round(self.seconds_until_resumed),
            "steps_lost": self.steps_lost,
            "resumed_bit_identical": self.bit_identical,
            "notes": self.notes,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def trainers(run_dir: Path) -> list[int]:
    """Pids of the ranks of this run (`python -m megatrain.cli train`; not srun's own)."""
    return [
        pid
        for pid in all_pids()
        if "megatrain.cli train" in (line := cmdline(pid))
        and f"run.dir={run_dir}" in line
        and not line.startswith("srun ")
        and alive(pid)
    ]


def wait_gone(pids: list[int], timeout: float) -> float | None:
    """The wall-clock time by which every pid had exited (None: some still alive after
    `timeout` s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(alive(p) for p in pids):
            return time.time()
        time.sleep(0.05)
    return None


def wait_started(run_dir: Path, ranks: int = 2, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = trainers(run_dir)
        if len(pids) >= ranks:
            return pids
        time.sleep(0.1)
    raise TimeoutError(f"no training process of {run_dir} after {timeout} s")


def _first(run_dir: Path, name: str, after: float = 0.0, timeout: float = 120) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [
            e
            for e in (events(run_dir, name) if (run_dir / "events.jsonl").exists() else [])
            if e["time"] >= after
        ]
        if found:
            return found[0]
        time.sleep(0.2)
    return None


def inject(cluster, fault: str, run_dir: Path, pids: list[int], m: Measured) -> float:
    """Throw `fault` at the running job (for the raise_* faults: wait for it); returns the
    wall-clock time it happened."""
    if fault.startswith("raise"):
        error = _first(run_dir, "error", timeout=240)
        if error is None:
            raise TimeoutError(f"{fault}: no error event in {run_dir} after 240 s")
        return error["time"]
    rank1 = [p for p in pids if environ(p).get("SLURM_PROCID") == "1"]
    if not rank1:
        raise RuntimeError(f"{fault}: no rank 1 process found for {run_dir}")
    # a step takes ~0.1 s here: poll fast, so that the fault lands in step FAULT_STEP + 1 or so,
    # before the next checkpoint
    wait_for_step(run_dir, FAULT_STEP, poll_s=0.01)
    t = time.time()
    if fault == "kill9_rank":
        kill(rank1[0], signal.SIGKILL)
    elif fault == "sigstop_rank":
        kill(rank1[0], signal.SIGSTOP)
    elif fault == "link_down":
        cluster.set_link(cluster.nodes[1], up=False)
        hang = _first(run_dir, "hang", after=t, timeout=HANG_TIMEOUT_S + 60)
        m.notes.append(
            f"link down {time.time() - t:.1f} s; rank 0's watchdog "
            + (f"fired after {hang['time'] - t:.1f} s" if hang else "did not fire")
        )
        cluster.set_link(cluster.nodes[1], up=True)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return t


def reference_losses(cluster, dataset: Path, workdir: Path) -> dict[int, float]:
    """The uninterrupted run the faulted ones are compared with: the same job, no fault."""
    run_dir = workdir / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    job, state, _ = cluster.run(
        SCRIPT,
        CONFIG,
        *overrides(dataset, run_dir, *SETTINGS),
        cwd=workdir,
        env=job_env(cluster),
        timeout=400,
        sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--time=10", NO_WARNING],
    )
    if state != "COMPLETED":
        raise RuntimeError(f"the reference job {job} ended {state}:\n{job_text(cluster, job)}")
    return losses(run_dir)


def run_fault(
    cluster, fault: str, dataset: Path, workdir: Path, reference: dict[int, float]
) -> Measured:
    """Submit a training job, throw `fault` at it, follow it through its requeues to the end."""
    run_dir = workdir / "run"
    env = job_env(cluster)
    if fault == "raise_once":
        env["MEGATRAIN_INJECT_RAISE"] = f"1:{FAULT_STEP}:once"
    elif fault == "raise_every_start":
        env["MEGATRAIN_INJECT_RAISE"] = "1:3"
    job = cluster.submit(
        SCRIPT,
        CONFIG,
        *overrides(dataset, run_dir, *SETTINGS),
        cwd=workdir,
        env=env,
        sbatch_args=["--nodes=2", "--ntasks-per-node=1", "--time=10", NO_WARNING],
    )
    m = Measured(fault, job, run_dir, state="")
    pids = wait_started(run_dir)
    t_fault = inject(cluster, fault, run_dir, pids, m)
    gone = wait_gone(pids, timeout=120)
    if gone is None:
        m.notes.append("a training process was still alive 120 s after the fault")
    else:
        m.seconds_until_all_gone = max(0.0, gone - t_fault)
    steps_done = last_step(run_dir)
    m.state = cluster.wait(job, timeout=400)
    resumed = _first(run_dir, "resumed", after=t_fault, timeout=1)
    if resumed:
        m.seconds_until_resumed = resumed["time"] - t_fault
        m.steps_lost = max(0, steps_done - resumed["step"])
    if fault == "raise_every_start":  # no resume: how the chain ended
        crashes = events(run_dir, "crashed")
        skipped = events(run_dir, "requeue_skipped")
        if skipped:
            m.notes.append(
                f"{len(crashes)} jobs crashed; the chain stopped "
                f"{skipped[-1]['time'] - t_fault:.1f} s after the first crash: "
                f"{skipped[-1]['reason'][:60]}..."
            )
        return m
    m.bit_identical = losses(run_dir) == reference
    if m.state != "COMPLETED":
        m.notes.append(job_text(cluster, job)[-2000:])
    return m
