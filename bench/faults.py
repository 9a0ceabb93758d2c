r"""Faults a cluster or a hostile user throws at a training run, each tried N times.

Each try starts the real command a user runs, `megatrain train configs/tiny.yaml --nproc 2`
(2 CPU processes, fp32, ZeRO-2, a checkpoint every 5 steps, a loss record every step), hits it
with one fault, waits (bounded) until every process of the run is gone, then reruns the same
command to resume and compares the losses with an uninterrupted reference run, step by step.

    python bench/faults.py            # every fault, 3 tries (10 for kill9_checkpoint)
    python bench/faults.py --tries 1 --tries-checkpoint 3
    python bench/faults.py --only sigterm,two_runs --tries 2
    python bench/faults.py --slurm --tries 3    # crashes and hangs of a 2-node Slurm job (root):
                                                # tests/cluster/faults.py says what each does

Prints one JSON row per fault:

    fault                    which fault (FAULTS below)
    tries                    how many times it was tried
    seconds_until_all_gone   from the fault until every process of the run (launcher, torchrun,
                             ranks, W&B helper) had exited: median and max over the tries
                             (null: the fault kills nothing, e.g. a corrupt byte)
    exit_code                the exit codes of the faulted command seen (negative: killed by
                             that signal, as Popen reports it)
    steps_lost               steps recorded after the checkpoint the rerun resumed from (redone
                             work): median and max
    resumed_bit_identical    after the rerun, every step's loss equals the reference's, in every try
    notes                    what went wrong or what was seen, with how many tries saw it
    checkpoint_mb_written_at_kill   kill9_checkpoint only: how much of the checkpoint was on
                             disk when the run died (median, max)

Processes are found through /proc: the launcher's descendants (sampled all along, so a rank that
outlives its parent is still followed), and any process whose command line holds the run's
`run.dir=`. Every wait is bounded: a hang is a note ("hung: killed after 60 s"), never a stuck
benchmark. Needs Linux; the full-disk fault mounts a tmpfs and needs root (else it says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from megatrain.checkpoint import MANIFEST, tag_for  # noqa: E402
from tests.helpers import (  # noqa: E402
    alive,
    all_pids,
    cmdline,
    corpus_sample,
    environ,
    kill,
    losses,
    proc_stat,
    read_jsonl,
)

MAX_STEPS = 30
CKPT_EVERY = 5
FAULT_STEP = 13  # faults land here: 3 steps after the checkpoint of step 10
TRAIN = [
    "data.seq_len=64",
    "batch.micro_batch=4",
    "batch.grad_accum=2",
    "parallel.zero_stage=2",
    "precision=fp32",
    f"run.max_steps={MAX_STEPS}",
    "run.log_every=1",
    "run.eval_every=0",
    "run.eval_batches=1",
    f"run.ckpt_every={CKPT_EVERY}",
    "run.keep=2",
    "optim.warmup_steps=4",
    "optim.lr=1e-2",
    "wandb.mode=disabled",
]


# ----------------------------------------------------------------------------- processes


class Run:
    """One `megatrain train` command on a run directory, and every process it started."""

    def __init__(
        self,
        bench: Bench,
        run_dir: Path,
        extra: list[str] = (),
        log: str = "train",
        by_dir: bool = True,
    ):
        """Start the command; `by_dir`: also follow any process whose command line holds this
        run directory (off when two commands share one, to tell their processes apart)."""
        self.dir = Path(run_dir)
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.dir.parent / f"{self.dir.name}-{log}.log"
        cmd = [sys.executable, "-m", "megatrain.cli", "train", str(REPO / "configs" / "tiny.yaml")]
        cmd += ["--nproc", "2", *bench.overrides, *extra, f"run.dir={self.dir}"]
        self.marker = f"run.dir={self.dir}" if by_dir else None
        self.started = time.monotonic()
        with open(self.log, "w") as out:
            # its own process group, as a terminal or a batch system gives a job
            self.launcher = subprocess.Popen(
                cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.seen = {self.launcher.pid}
        self.exited_at: float | None = None

    def scan(self) -> set[int]:
        """The run's live processes now; remembers every one ever seen."""
        self.poll()
        parents: dict[int, list[int]] = {}
        live = set()
        for pid in all_pids():
            stat = proc_stat(pid)
            if stat is None or stat[0] in ("Z", "X"):
                continue
            parents.setdefault(stat[1], []).append(pid)
            if self.marker and pid != os.getpid() and self.marker in cmdline(pid):
                live.add(pid)
        todo = [p for p in self.seen | live if alive(p)]
        while todo:
            pid = todo.pop()
            live.add(pid)
            todo += [c for c in parents.get(pid, []) if c not in live]
        self.seen |= live
        return {p for p in self.seen if alive(p)}

    def poll(self) -> int | None:
        rc = self.launcher.poll()
        if rc is not None and self.exited_at is None:
            self.exited_at = time.monotonic()
        return rc

    def ranks(self) -> list[int]:
        """The training processes (torchrun's workers), by rank."""
        found = [(environ(p).get("RANK"), p) for p in self.scan() if p != self.launcher.pid]
        ranks = [(int(r), p) for r, p in found if r is not None and "megatrain.cli" in cmdline(p)]
        return [p for _, p in sorted(ranks)]

    def helpers(self, words: tuple[str, ...]) -> list[int]:
        return [p for p in self.scan() if any(w in cmdline(p) for w in words)]

    def step(self) -> int:
        """The newest step in metrics.jsonl (0 before the first record)."""
        try:
            lines = (self.dir / "metrics.jsonl").read_text().splitlines()
        except OSError:
            return 0
        steps = [0]
        for line in lines:
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass  # a line being written
        return max(steps)

    def wait_for(self, condition: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
        """Poll `condition` until it holds (True) or the run ended or `timeout` passed (False)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if condition():
                return True
            if self.poll() is not None and not self.scan():
                return condition()
            time.sleep(every)
        return False

    def wait_gone(self, timeout: float) -> float | None:
        """Seconds until every process of the run has exited; None if some still live after
        `timeout` (they are then killed)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if not self.scan():
                try:  # reap the launcher: its exit code, not a zombie's None
                    self.launcher.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
                return time.monotonic() - t0
            time.sleep(0.1)
        self.kill_all()
        return None

    def kill_all(self) -> None:
        for pid in self.scan():
            kill(pid, signal.SIGKILL)
        self.launcher.wait(timeout=30)
        end = time.monotonic() + 30
        while self.scan() and time.monotonic() < end:
            time.sleep(0.1)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


# ----------------------------------------------------------------------------- the bench


@dataclass
class Try:
    """What one try of a fault saw."""

    seconds: float | None = None
    exit_code: int | None = None
    steps_lost: int | None = None
    identical: bool = False
    notes: list[str] = field(default_factory=list)
    written_mb: float | None = None  # kill9_checkpoint: how much of the checkpoint was written


@dataclass
class Bench:
    work: Path
    data: Path
    wait_s: float
    run_timeout: float
    overrides: list[str] = field(default_factory=list)
    reference: dict[int, float] = field(default_factory=dict)
    ckpt_bytes: int = 0

    runs: list[Run] = field(default_factory=list)

    def start(
        self, run_dir: Path, extra: list[str] = (), log: str = "train", by_dir: bool = True
    ) -> Run:
        self.runs.append(Run(self, run_dir, extra, log, by_dir))
        return self.runs[-1]

    def clean_up(self) -> None:
        """Kill whatever a try left running (a broken try must not slow the next one)."""
        for run in self.runs:
            run.kill_all()
        self.runs.clear()

    def to_end(self, run: Run, t: Try, what: str = "run") -> int | None:
        """Wait for a run to end by itself (bounded); a hang is killed and noted."""
        left = self.run_timeout - (time.monotonic() - run.started)
        gone = run.wait_gone(max(left, 5))
        if gone is None:
            t.notes.append(f"{what} hung: killed after {self.run_timeout:.0f} s")
        return run.launcher.returncode

    def resume(self, run_dir: Path, t: Try, extra: list[str] = ()) -> int | None:
        """Rerun the command (resume), then the steps lost and the comparison with the
        reference; returns the rerun's exit code."""
        before = run_step(run_dir)
        n_events = len(_events(run_dir))
        rc = 0
        if before == MAX_STEPS and complete(run_dir):
            t.steps_lost = 0  # the faulted run finished: nothing to resume
        else:
            rerun = self.start(run_dir, extra, log="resume")
            rc = self.to_end(rerun, t, "the resume")
            if rc != 0:
                t.notes.append(f"resume failed (exit {rc}): {last_line(rerun.output())}")
            resumed = [e for e in _events(run_dir)[n_events:] if e.get("event") == "resumed"]
            from_step = resumed[-1]["step"] if resumed else 0
            t.steps_lost = max(before - from_step, 0)
            for e in _events(run_dir)[n_events:]:
                if e.get("event") == "checkpoint_rejected":
                    t.notes.append(f"resume rejected {e['tag']}")
        t.identical = identical(run_dir, self.reference)
        if not t.identical:
            t.notes.append(differs(run_dir, self.reference))
        return rc


def _events(run_dir: Path) -> list[dict]:
    try:
        return read_jsonl(run_dir / "events.jsonl")
    except (OSError, ValueError):
        return []


def run_step(run_dir: Path) -> int:
    try:
        return max(losses(run_dir), default=0)
    except (OSError, ValueError, KeyError):
        return 0


def complete(run_dir: Path) -> bool:
    latest = run_dir / "checkpoints" / "latest"
    return latest.is_file() and latest.read_text().strip() == tag_for(MAX_STEPS)


def identical(run_dir: Path, reference: dict[int, float]) -> bool:
    try:
        return losses(run_dir) == reference
    except (OSError, ValueError, KeyError):
        return False


def differs(run_dir: Path, reference: dict[int, float]) -> str:
    try:
        got = losses(run_dir)
    except (OSError, ValueError, KeyError) as e:
        return f"no losses to compare ({type(e).__name__})"
    missing = sorted(set(reference) - set(got))
    if missing:
        return f"losses missing for steps {missing[:5]}{'...' if len(missing) > 5 else ''}"
    first = min(s for s in reference if got[s] != reference[s])
    return f"losses differ from step {first} ({got[first]!r} vs {reference[first]!r})"


def last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:200] if lines else "(no output)"


def error_message(text: str) -> str:
    """The line a user would read as the error: megatrain's own, else the last exception line."""
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    for line in lines:
        if ": error: " in line and line.startswith("megatrain"):
            return line[:200]
    from_ranks = [x for x in lines if re.match(r"\[rank\d+\]: \w+(Error|Exception): ", x)]
    if from_ranks:  # the first rank's own error, not torchrun's ChildFailedError after it
        return from_ranks[0][:200]
    errors = [x for x in lines if "Error:" in x or "Exception:" in x]
    return (errors[-1] if errors else last_line(text))[:200]


def describe_output(text: str) -> str:
    tracebacks = text.count("Traceback (most recent call last)")
    lines = len([x for x in text.splitlines() if x.strip()])
    return f"{tracebacks} tracebacks in {lines} lines of output"


def flip_byte(path: Path) -> None:
    """Invert one byte in the middle of a file."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def outlived(run: Run, gone_at: float) -> str | None:
    if run.exited_at is not None and gone_at - run.exited_at > 1:
        return f"ranks outlived the launcher by {gone_at - run.exited_at:.1f} s"
    return None


# ----------------------------------------------------------------------------- the faults


def kill9_rank(b: Bench, d: Path, t: Try) -> None:
    """kill -9 of one rank (rank 1) mid-run: the launcher must stop the other one."""
    run = b.start(d / "run")
    if not run.wait_for(lambda: run.step() >= FAULT_STEP, b.run_timeout):
        t.notes.append(f"never reached step {FAULT_STEP}")
    ranks = run.ranks()
    kill(ranks[-1], signal.SIGKILL)
    _measure_end(b, run, t)
    b.resume(d / "run", t)


def kill9_group(b: Bench, d: Path, t: Try) -> None:
    """kill -9 of the launcher's process group (what an orchestrator's kill does)."""
    run = b.start(d / "run")
    run.wait_for(lambda: run.step() >= FAULT_STEP, b.run_timeout)
    os.killpg(run.launcher.pid, signal.SIGKILL)
    _measure_end(b, run, t)
    b.resume(d / "run", t)


def _measure_end(b: Bench, run: Run, t: Try) -> None:
    """After a fault: the seconds until all is gone (bounded by --wait-s), the exit code, and
    whether the ranks trained on after it."""
    t0, at = time.monotonic(), run.step()
    t.seconds = run.wait_gone(b.wait_s)
    if t.seconds is None:
        t.seconds = b.wait_s
        t.notes.append(f"processes still running after {b.wait_s:.0f} s: killed by the bench")
    elif note := outlived(run, t0 + t.seconds):
        t.notes.append(note)
    t.exit_code = run.launcher.returncode
    if run.step() > at + 1:
        t.notes.append(f"the ranks trained on after the fault, from step {at} to {run.step()}")


def kill9_checkpoint(b: Bench, d: Path, t: Try) -> None:
    """kill -9 of every process of the run while a checkpoint is written: after its folder
    appears, before its manifest is."""
    run = b.start(d / "run")
    folder = d / "run" / "checkpoints" / tag_for(2 * CKPT_EVERY)
    run.wait_for(folder.exists, b.run_timeout, every=0.002)
    for pid in run.scan():
        kill(pid, signal.SIGKILL)
    t.seconds = run.wait_gone(b.wait_s)
    t.exit_code = run.launcher.returncode
    if folder.exists() and not (folder / MANIFEST).exists():  # the dead write no more
        t.written_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
        t.notes.append(f"killed mid-write (of ~{b.ckpt_bytes / 1e6:.0f} MB)")
    else:
        t.notes.append("missed the write: the manifest was there (killed after it)")
    b.resume(d / "run", t)


def _signal(sig: signal.Signals) -> Callable[[Bench, Path, Try], None]:
    def fault(b: Bench, d: Path, t: Try) -> None:
        run = b.start(d / "run")
        run.wait_for(lambda: run.step() >= FAULT_STEP, b.run_timeout)
        at = run.step()
        os.kill(run.launcher.pid, sig)
        t0 = time.monotonic()
        gone = run.wait_gone(b.wait_s)
        t.exit_code = run.launcher.returncode
        if gone is None:
            t.seconds = b.wait_s
            t.notes.append(f"hung: killed after {b.wait_s:.0f} s")
        else:
            t.seconds = gone
            if note := outlived(run, t0 + gone):
                t.notes.append(note)
        stops = [e for e in _events(d / "run") if e.get("event") == "stopped"]
        last = run_step(d / "run")
        if stops:
            t.notes.append(f"stopped with a checkpoint {stops[-1]['step'] - at} steps after it")
        elif last == MAX_STEPS:
            t.notes.append(f"not a stop: the ranks trained on from step {at} to the end")
        else:
            t.notes.append(f"died without a checkpoint at step {last}")
        if "Traceback" in run.output():
            t.notes.append(describe_output(run.output()))
        b.resume(d / "run", t)

    fault.__doc__ = f"{sig.name} to the launcher (`kill -{sig.name[3:]} PID`) mid-run."
    return fault


def corrupt_checkpoint(b: Bench, d: Path, t: Try) -> None:
    """One byte of the newest checkpoint's largest file flipped, then resume: the checkpoint
    must be rejected and the one before it used."""
    run = b.start(d / "run", [f"run.stop_at_step={FAULT_STEP}"])
    b.to_end(run, t, "the first run")
    ckpt = d / "run" / "checkpoints" / tag_for(FAULT_STEP)
    files = [p for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST]
    if not files:
        t.notes.append(f"no checkpoint at step {FAULT_STEP} to corrupt")
    else:
        flip_byte(max(files, key=lambda p: p.stat().st_size))
    t.exit_code = b.resume(d / "run", t)  # the exit code of the resume on the corrupt checkpoint


def corrupt_shard(b: Bench, d: Path, t: Try) -> None:
    """One byte of a data shard flipped (in a copy of the dataset), then resume: a named
    refusal is expected; then the byte is restored and the run resumed to the end."""
    data = d / "data"
    shutil.copytree(b.data, data)
    extra = [f"data.sources.0.path={data}"]
    run = b.start(d / "run", [*extra, f"run.stop_at_step={FAULT_STEP}"])
    b.to_end(run, t, "the first run")
    shard = sorted(data.glob("shard-*.arrow"))[0]
    original = shard.read_bytes()
    flip_byte(shard)
    refused = b.start(d / "run", extra, log="refused")
    t.exit_code = b.to_end(refused, t, "the run on the corrupt shard")
    gone = time.monotonic() - refused.started
    text = refused.output()
    verdict = "refused" if t.exit_code != 0 else "trained on it"
    t.notes.append(f"{verdict} (exit {t.exit_code}) after {gone:.0f} s: {error_message(text)}")
    t.notes.append(describe_output(text))
    shard.write_bytes(original)
    b.resume(d / "run", t, extra)


def full_disk(b: Bench, d: Path, t: Try) -> None:
    """The checkpoints on a tmpfs with room for 1.5 checkpoints: the second save fills it."""
    ckpts = d / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    size = int(b.ckpt_bytes * 1.5) + 1_000_000
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(ckpts)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        t.notes.append(f"skipped: cannot mount ({last_line(mount.stderr)})")
        return
    keep = d / "saved-checkpoints"
    try:
        run = b.start(d / "run")
        folder = ckpts / tag_for(2 * CKPT_EVERY)
        run.wait_for(folder.exists, b.run_timeout, every=0.01)
        _measure_end(b, run, t)
        text = run.output()
        named = "no space left on device" in text.lower()
        t.notes.append(
            f"exit {t.exit_code}: {error_message(text)}"
            + ("" if named else " (no 'no space left on device' in the output)")
        )
        t.notes.append(describe_output(text))
        partial = [p for p in ckpts.glob("step*") if not (p / MANIFEST).exists()]
        if partial:
            mb = sum(f.stat().st_size for p in partial for f in p.rglob("*") if f.is_file()) / 1e6
            t.notes.append(f"partial checkpoint folder left behind ({mb:.0f} MB)")
        latest = ckpts / "latest"
        t.notes.append(f"latest = {latest.read_text().strip() if latest.exists() else None}")
        if any(e.get("event") == "checkpoint_failed" for e in _events(d / "run")):
            t.notes.append("checkpoint_failed event logged")
        # free the space: the checkpoints move off the tmpfs, as a user would clean up
        shutil.copytree(ckpts, keep)
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], capture_output=True)
    shutil.rmtree(ckpts, ignore_errors=True)
    shutil.move(keep, ckpts)
    b.resume(d / "run", t)


def wandb_killed(b: Bench, d: Path, t: Try) -> None:
    """W&B offline; its helper process (wandb-core / wandb service) kill -9'd mid-run: training
    must go on."""
    run = b.start(d / "run", ["wandb.mode=offline"])
    run.wait_for(lambda: run.step() >= FAULT_STEP, b.run_timeout)
    helpers = run.helpers(("wandb-core", "wandb service", "wandb_internal", "wandb/bin"))
    if not helpers:
        t.notes.append("no W&B helper process found")
    at = run.step()
    for pid in helpers:
        kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    rc = b.to_end(run, t)
    t.seconds = time.monotonic() - t0
    t.exit_code = rc
    last = run_step(d / "run")
    if rc == 0 and last == MAX_STEPS:
        t.notes.append(f"trained on from step {at} to the end")
    else:
        t.notes.append(
            f"crashed {t.seconds:.1f} s after (step {last}): {error_message(run.output())}"
        )
    failed = [e for e in _events(d / "run") if e.get("event") == "wandb_failed"]
    if failed:
        t.notes.append("wandb_failed event logged")
    b.resume(d / "run", t, ["wandb.mode=offline"])


def two_runs(b: Bench, d: Path, t: Try) -> None:
    """A second identical command on the same run directory while the first one starts: one must
    be refused at once, naming who holds the directory. The seconds are from the second start
    until the first of the two commands is entirely gone."""
    first = b.start(d / "run", log="first", by_dir=False)
    # the second starts as soon as the first's ranks exist, so that both train at once
    first.wait_for(lambda: len(first.ranks()) == 2, b.run_timeout)
    second = b.start(d / "run", log="second", by_dir=False)
    t0 = time.monotonic()
    end = t0 + b.run_timeout
    while time.monotonic() < end and first.scan() and second.scan():
        time.sleep(0.1)
    t.seconds = time.monotonic() - t0
    codes = [b.to_end(r, t, name) for r, name in ((first, "first"), (second, "second"))]
    t.exit_code = codes[1]
    t.notes.append(f"exit codes: first {codes[0]}, second {codes[1]}")
    for r, name in ((first, "first"), (second, "second")):
        if r.launcher.returncode not in (0, None):
            t.notes.append(f"{name}: {error_message(r.output())}")
    try:
        records = read_jsonl(d / "run" / "metrics.jsonl")
        t.notes.append(f"{len(records)} metrics records for {MAX_STEPS} steps")
    except (OSError, ValueError) as e:
        t.notes.append(f"metrics.jsonl unreadable ({type(e).__name__})")
    b.resume(d / "run", t)


FAULTS: dict[str, Callable[[Bench, Path, Try], None]] = {
    "kill9_rank": kill9_rank,
    "kill9_group": kill9_group,
    "kill9_checkpoint": kill9_checkpoint,
    "sigterm": _signal(signal.SIGTERM),
    "sigint": _signal(signal.SIGINT),
    "corrupt_checkpoint": corrupt_checkpoint,
    "corrupt_shard": corrupt_shard,
    "full_disk": full_disk,
    "wandb_killed": wandb_killed,
    "two_runs": two_runs,
}


# ----------------------------------------------------------------------------- driver


def spread(values) -> dict | None:
    """Median and max of the values that were measured (None: none was)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def summarize(name: str, tries: list[Try]) -> dict:
    notes = Counter(n for t in tries for n in dict.fromkeys(t.notes))
    written = spread(t.written_mb for t in tries)
    return {
        "fault": name,
        "tries": len(tries),
        "seconds_until_all_gone": spread(t.seconds for t in tries),
        "exit_code": sorted({t.exit_code for t in tries if t.exit_code is not None}),
        "steps_lost": spread(t.steps_lost for t in tries),
        "resumed_bit_identical": all(t.identical for t in tries),
        "notes": [f"{n} ({c}/{len(tries)})" for n, c in notes.items()],
        **({"checkpoint_mb_written_at_kill": written} if written else {}),
    }


def prepare(work: Path) -> Path:
    """The tests' tiny dataset: a sample of the bundled corpus, vocab 512."""
    from data_prep.launch import run_prep
    from data_prep.state import PrepOptions

    out = work / "data"
    if not (out / "manifest.json").exists():
        inputs = corpus_sample(work / "raw")
        options = PrepOptions(
            inputs=[str(inputs)], out=str(out), vocab_size=512, shard_tokens=40_000
        )
        run_prep(options, log=lambda *_: None)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tries", type=int, default=3, help="tries of each fault")
    p.add_argument("--tries-checkpoint", type=int, default=10, help="tries of kill9_checkpoint")
    p.add_argument("--only", default="", help=f"comma-separated faults among {', '.join(FAULTS)}")
    p.add_argument("--wait-s", type=float, default=60, help="longest wait for processes to go")
    p.add_argument("--run-timeout", type=float, default=300, help="longest a training may take")
    p.add_argument("--work", type=Path, help="keep every run here (default: a temporary dir)")
    p.add_argument(
        "--slurm",
        action="store_true",
        help="the crash and hang faults of a 2-node Slurm job on the local test cluster "
        "(tests/cluster/faults.py; needs root), instead of the local ones",
    )
    return p.parse_args(argv)


def main_slurm(args, work: Path) -> None:
    """The Slurm faults (tests/cluster/faults.py) on the local test cluster, started here if
    needed (root): one JSON row per fault, spread over the tries."""
    from tests.cluster.conftest import SCRIPT as LOCAL_SLURM
    from tests.cluster.conftest import SlurmCluster
    from tests.cluster.faults import FAULTS as SLURM_FAULTS
    from tests.cluster.faults import reference_losses, run_fault

    names = [n for n in args.only.split(",") if n] or list(SLURM_FAULTS)
    unknown = sorted(set(names) - set(SLURM_FAULTS))
    if unknown:
        raise SystemExit(f"unknown faults {unknown}; choose among {', '.join(SLURM_FAULTS)}")
    started = subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, text=True)
    if started.returncode != 0:
        raise SystemExit(f"no local Slurm cluster: {started.stderr.strip() or started.stdout}")
    cluster = SlurmCluster()
    data = prepare(work)
    reference = reference_losses(cluster, data, work / "reference")
    for name in names:
        if name == "link_down" and cluster.network != "netns":
            print(json.dumps({"fault": name, "skipped": cluster.network_reason}), flush=True)
            continue
        rows = []
        for i in range(args.tries):
            d = work / name / f"try{i}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            rows.append(run_fault(cluster, name, data, d, reference).row())

        summary = {
            "fault": name,
            "tries": len(rows),
            "network": cluster.network,
            "final_state": sorted({r["final_state"] for r in rows}),
            "seconds_until_all_gone": spread(r["seconds_until_all_gone"] for r in rows),
            "seconds_until_resumed": spread(r["seconds_until_resumed"] for r in rows),
            "steps_lost": spread(r["steps_lost"] for r in rows),
            "resumed_bit_identical": [r["resumed_bit_identical"] for r in rows],
            "notes": [n[:300] for r in rows for n in r["notes"]],
        }
        print(json.dumps(summary), flush=True)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.slurm:
        with tempfile.TemporaryDirectory(prefix="megatrain-faults-") as tmp:
            main_slurm(args, args.work or Path(tmp))
        return
    names = [n for n in args.only.split(",") if n] or list(FAULTS)
    unknown = sorted(set(names) - set(FAULTS))
    if unknown:
        raise SystemExit(f"unknown faults {unknown}; choose among {', '.join(FAULTS)}")
    # Ctrl-C stops the bench even when started in the background (where a shell ignores SIGINT),
    # and the commands it starts do not inherit an ignored SIGINT: the sigint row needs it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("MEGATRAIN_CONFIGS", str(REPO / "configs"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")])
    )
    temporary = None if args.work else tempfile.TemporaryDirectory(prefix="megatrain-faults-")
    work = args.work or Path(temporary.name)
    work.mkdir(parents=True, exist_ok=True)
    bench = None
    try:
        data = prepare(work)
        bench = Bench(work, data, args.wait_s, args.run_timeout)
        bench.overrides = [f"data.sources.0.path={data}", *TRAIN]
        ref = work / "reference"
        if not (complete(ref) and run_step(ref) == MAX_STEPS):  # else kept from an earlier run
            shutil.rmtree(ref, ignore_errors=True)
            rc = bench.to_end(bench.start(ref), Try(), "the reference")
            if rc != 0 or run_step(ref) != MAX_STEPS:
                raise SystemExit(f"the reference run failed (exit {rc}); see {ref}-train.log")
        bench.reference = losses(ref)
        folder = ref / "checkpoints" / tag_for(MAX_STEPS)
        bench.ckpt_bytes = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        for name in names:
            n = args.tries_checkpoint if name == "kill9_checkpoint" else args.tries
            tries = []
            for i in range(n):
                d = work / name / f"try{i}"
                shutil.rmtree(d, ignore_errors=True)
                d.mkdir(parents=True)
                t = Try()
                try:
                    FAULTS[name](bench, d, t)
                except Exception as e:  # a broken try is a row's note, not the end of the bench
                    t.notes.append(f"bench error: {type(e).__name__}: {e}")
                finally:
                    bench.clean_up()
                tries.append(t)
            print(json.dumps(summarize(name, tries)), flush=True)
    finally:
        if bench:
            bench.clean_up()
        if temporary:
            temporary.cleanup()


if __name__ == "__main__":
    main()
