"""How jobs start and stop: signals before a time limit or preemption.

Slurm (`#SBATCH --signal=...`) and most schedulers warn a job before killing it; the trainer
asks `StopRequest.any_rank()` after every step, and when one rank was warned, all of them
finish the step, save a checkpoint and leave together.
"""
from __future__ import annotations

import signal

from megatrain.parallel import all_reduce_sum

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records SIGUSR1/SIGTERM instead of dying, so the current step can finish and be saved."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signal: str | None = None
        for s in signals:
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def any_rank(self) -> bool:
        """True on every rank if any rank received a stop signal (collective)."""
        return all_reduce_sum([1.0 if self.signal else 0.0])[0] > 0
