"""Stragglers: the rank whose own work is slowest, each log interval, and a rank that stays slow.

In synchronous data parallelism every rank's step lasts as long as the slowest rank's (the
gradient reduction waits for it), so the wall step time names no one. What each rank does alone
is its forward passes, so that is what is timed: the `engine(inputs, targets)` call of every
micro-batch, on CPU with perf_counter, on GPU with CUDA event pairs on the stream (no
synchronization) read once per log interval. The backward is left out: DeepSpeed reduces
gradients inside it (overlapped under ZeRO-2, at the accumulation boundary otherwise), so it holds
the wait for the slowest rank. Under tensor parallelism and ZeRO-3 the forward holds collectives
too (all-reduces, parameter gathers), which pull every rank toward the slowest: ratios are
smaller there.

  slowest(times)       the slowest rank and each rank's time over the median (pure)
  StragglerTracker     which ranks stayed slow (or recovered) long enough: one event each (pure)
  StragglerMonitor     per-rank forward timing; per log interval one all_gather and the events
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from megatrain import dist


def slowest(times: Sequence[float]) -> tuple[int, list[float]]:
    """The slowest rank (the lowest of equals) and every rank's time over the median of all
    (all 1.0 when the median is 0: nothing was timed)."""
    median = statistics.median(times)
    ratios = [t / median if median > 0 else 1.0 for t in times]
    return max(range(len(times)), key=lambda r: (times[r], -r)), ratios


class StragglerTracker:
    """A rank is slow in an interval when its ratio is at least `factor`; it becomes a straggler
    after `intervals` slow intervals in a row, and recovers after as many intervals in a row below
    the factor. Each change is reported once (no event per interval); `factor` 0: never."""

    def __init__(self, factor: float, intervals: int):
        self.factor, self.intervals = factor, intervals
        self.stragglers: set[int] = set()
        self._streak: dict[int, int] = {}  # intervals in a row that disagree with a rank's state

    def update(self, ratios: Sequence[float]) -> list[tuple[str, int]]:
        """One interval's ratios, by rank; returns the changes: ("straggler" or
        "straggler_recovered", rank)."""
        if self.factor <= 0:
            return []
        changes = []
        for rank, ratio in enumerate(ratios):
            flagged = rank in self.stragglers
            if (ratio >= self.factor) == flagged:
                self._streak.pop(rank, None)
                continue
            self._streak[rank] = self._streak.get(rank, 0) + 1
            if self._streak[rank] >= self.intervals:
                del self._streak[rank]
                if flagged:
                    self.stragglers.discard(rank)
                    changes.append(("straggler_recovered", rank))
                else:
                    self.stragglers.add(rank)
                    changes.append(("straggler", rank))
        return changes


class StragglerMonitor:
    """Every rank: begin_forward()/end_forward() around each micro-batch's forward (cheap, local);
    collect(step) once per log interval (collective: one all_gather of a float) gives the
    record's `slowest_rank` and `slowest_rank_ratio`, and `log` (rank 0's event log) gets a
    `straggler` or `straggler_recovered` event when a rank changes state."""

    def __init__(
        self,
        factor: float,
        intervals: int,
        device: torch.device,
        log: Callable[[dict], None] | None = None,
        clock=time.perf_counter,
    ):
        self.hosts = dist.all_gather(socket.gethostname())  # once, for the events
        self.tracker = StragglerTracker(factor, intervals)
        self.factor, self.intervals = factor, intervals
        self.cuda, self.log, self.clock = device.type == "cuda", log, clock
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._seconds = 0.0

    def begin_forward(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = self.clock()

    def end_forward(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._spans.append((self._start, end))
        else:
            self._seconds += self.clock() - self._start

    def _interval_seconds(self) -> float:
        """This rank's forward seconds since the last collect()."""
        seconds, self._seconds = self._seconds, 0.0
        if self._spans:
            self._spans[-1][1].synchronize()  # the stream is in order: all spans are done
            seconds += sum(a.elapsed_time(b) for a, b in self._spans) / 1000
            self._spans = []
        return seconds

    def collect(self, step: int) -> dict:
        """The interval's slowest rank and its forward time over the median of all ranks; call on
        every rank at the same step."""
        times = dist.all_gather(self._interval_seconds())
        rank, ratios = slowest(times)
        for kind, r in self.tracker.update(ratios):
            if self.log is not None:
                self.log(
                    {
                        "event": kind,
                        "rank": r,
                        "host": self.hosts[r],
                        "step": step,
                        "ratio": ratios[r],
                        "forward_s": times[r],
                        "median_forward_s": statistics.median(times),
                        "factor": self.factor,
                        "intervals": self.intervals,
                    }
                )
        return {"slowest_rank": rank, "slowest_rank_ratio": ratios[rank]}
