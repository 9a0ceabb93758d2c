"""The progress watchdog: a rank that makes no progress for too long dumps its stacks and exits.

A rank blocked in a collective (a frozen peer, a dead GPU, a lost link) cannot stop itself, and
the collective's own timeout is long (`run.collective_timeout_s`, 30 minutes by default). Each
rank therefore runs a daemon thread that watches the trainer's heartbeat (`beat`, once per
completed step) and the phase it is in (`phase`: evaluation, checkpoint save). When nothing
completes within the phase's limit (`timeout_for`), it

- writes every thread's Python stack to `RUN_DIR/hangs/<host>-rank<r>-step<s>.txt`
  (faulthandler; the file is whole or absent: temporary name, then rename);
- prints one line to stderr (`megatrain train: error: hang: ...`), on every rank; rank 0 also
  logs a `hang` event to events.jsonl (only rank 0 writes it; another rank's record is its line
  and its stack file);
- exits the process with `HANG_EXIT` (3), so that the launcher, or Slurm's `--kill-on-bad-exit`,
  ends the job within seconds.

The limit of a step is `run.hang_timeout_s` when positive, else the larger of a floor
(`AUTO_FLOOR_S`: start-up leftovers, a slow log interval) and `run.hang_factor` x the median
step time measured so far. Start-up (up to the first step's end: compilation, NCCL set-up),
evaluation and checkpoint saves get at least `run.hang_slow_s`.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

HANG_EXIT = 3  # the exit code of a rank the watchdog stopped
AUTO_FLOOR_S = 600.0  # automatic timeout's floor for a step
STEPS_KEPT = 100  # recent step times the median is taken over
SLOW_PHASES = ("start-up", "evaluation", "checkpoint save", "rollback")
DYING_S = 60.0  # the most a firing watchdog may spend writing (a hung file system) before exiting


def timeout_for(
    phase: str,
    fixed_s: float,
    factor: float,
    slow_s: float,
    step_times: list[float],
) -> float:
    """Seconds without progress after which a rank in `phase` counts as hung: a step's limit is
    `fixed_s` if positive, else max(AUTO_FLOOR_S, factor x the median of `step_times`); a slow
    phase (start-up, evaluation, checkpoint save, rollback) gets at least `slow_s`."""
    if fixed_s > 0:
        limit = fixed_s
    else:
        median = statistics.median(step_times) if step_times else 0.0
        limit = max(AUTO_FLOOR_S, factor * median)
    return max(limit, slow_s) if phase in SLOW_PHASES else limit


class Watchdog:
    """One rank's progress watchdog (a daemon thread, from `start` to `stop`)."""

    def __init__(
        self,
        run_dir: Path,
        rank: int,
        first_step: int,
        fixed_s: float,
        factor: float,
        slow_s: float,
        log: Callable[[dict], object] | None = None,
        poll_s: float = 0.5,
    ):
        self.hang_dir = Path(run_dir) / "hangs"
        self.rank, self.host = rank, socket.gethostname()
        self.fixed_s, self.factor, self.slow_s = fixed_s, factor, slow_s
        self.log = log  # rank 0's event log; None on the other ranks
        self.poll_s = poll_s
        self.done = first_step  # steps completed
        self.current, self.name = first_step + 1, "start-up"  # the step and phase it is in
        self.last = time.monotonic()  # the last sign of progress
        self.step_times: deque[float] = deque(maxlen=STEPS_KEPT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megatrain-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self.last = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def beat(self, step: int) -> None:
        """Step `step` completed (cheap: called from the training loop after every step)."""
        now = time.monotonic()
        if self.name == "step":  # not the first step (compilation): it would skew the median
            self.step_times.append(now - self.last)
        self.done, self.current, self.name, self.last = step, step + 1, "step", now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """A slow phase after step `done` (evaluation, checkpoint save): a longer allowance; its
        end counts as progress, and its time is not a step's."""
        before = self.name
        self.name, self.current, self.last = name, self.done, time.monotonic()
        try:
            yield
        finally:
            self.name, self.current, self.last = before, self.done + 1, time.monotonic()

    def limit(self) -> float:
        return timeout_for(self.name, self.fixed_s, self.factor, self.slow_s, list(self.step_times))

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            waited, limit = time.monotonic() - self.last, self.limit()
            if waited > limit:
                self._fire(waited, limit)

    def _fire(self, waited: float, limit: float) -> None:
        """Stacks to disk, one line, rank 0's event, exit: this process is dying, and it must die
        even if writing hangs."""
        threading.Timer(DYING_S, os._exit, (HANG_EXIT,)).start()
        path = self.hang_dir / f"{self.host}-rank{self.rank}-step{self.current}.txt"
        try:
            self.hang_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "w") as f:
                f.write(
                    f"rank {self.rank} on {self.host}: no progress for {waited:.1f} s "
                    f"(limit {limit:.1f} s), phase '{self.name}', step {self.current}\n\n"
                )
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
                os.fsync(f.fileno())
            os.replace(tmp, path)
            where = str(path)
        except OSError as e:
            where = f"not written: {e}"
        print(
            f"megatrain train: error: hang: rank {self.rank} on {self.host} made no progress for "
            f"{waited:.0f} s (limit {limit:.0f} s), phase '{self.name}', step {self.current}; "
            f"stacks: {where}",
            file=sys.stderr,
            flush=True,
        )
        if self.log is not None:
            try:
                self.log(
                    {
                        "event": "hang",
                        "rank": self.rank,
                        "host": self.host,
                        "step": self.current,
                        "phase": self.name,
                        "waited_s": round(waited, 3),
                        "timeout_s": limit,
                        "stacks": where,
                    }
                )
            except Exception as e:  # noqa: BLE001 - the exit matters more than the event
                print(f"megatrain: hang event not written: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(HANG_EXIT)
