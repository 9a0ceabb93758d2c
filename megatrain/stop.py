"""Stop signals: finish the step, save, stop, instead of dying mid-step.

Slurm warns every task before the time limit (`--signal=USR1@300` in slurm/pretrain.sh,
submitit's USR2, or SIGTERM alone on some clusters). `catch_stop_signals()` records the first
one instead of letting it kill the process; the trainer's per-step all-reduce carries each
rank's vote (`StopRequest.votes()`), so that every rank agrees to stop at the same step even
when the signal reached only some of them. Ctrl-C (SIGINT) is a stop request too; a second one
exits at once (under `megatrain train --nproc N`, the launcher does that for its ranks).

A signal handler belongs to the process, so what it records is process state: `_signal`, the
first stop signal this process got, and `_agreed`, the one all ranks agreed on.
"""

from __future__ import annotations

import os
import signal

# USR1: our sbatch script's warning; USR2: submitit's; SIGTERM: what Slurm sends at the limit or
# on preemption, and what some clusters send alone; SIGINT: Ctrl-C, the user's own stop.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# Set by megatrain's local launcher in its ranks (megatrain/launcher.py)
LAUNCHER_ENV = "MEGATRAIN_LAUNCHER_PID"
_received: str | None = None  # first stop signal this process got
_agreed: str | None = None  # a stop signal some rank got, once StopRequest.agree() said so


def _record(signum, frame) -> None:
    global _received
    # A second Ctrl-C exits at once. Not in a rank of megatrain's launcher: the terminal's SIGINT
    # and the launcher's forwarded one both reach it, and the launcher handles a second Ctrl-C.
    if _received == "SIGINT" == signal.Signals(signum).name:
        if not os.environ.get(LAUNCHER_ENV):
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a third kills
            raise KeyboardInterrupt
    _received = _received or signal.Signals(signum).name


def received_signal() -> str | None:
    """The first stop signal this process got (before any vote)."""
    return _received


def catch_stop_signals(signals=STOP_SIGNALS) -> None:
    """Record stop signals from now on. Call it first thing in a job: a warning that arrives
    during the imports and the set-up must not kill the process (the default action of
    USR1/USR2/TERM)."""
    for s in signals:
        signal.signal(s, _record)


class StopRequest:
    """This rank's view of the stop signals, and the vote that makes all ranks agree."""

    def __init__(self, signals=STOP_SIGNALS):
        catch_stop_signals(signals)

    @property
    def signal(self) -> str | None:
        """The stop signal this rank got, or the one another rank got once `agree()` said so."""
        return _received or _agreed

    def votes(self) -> dict[str, float]:
        """This rank's vote, one number per stop signal, to be summed over ranks (see `agree`)."""
        return {f"stop_{s.name}": 1.0 if _received == s.name else 0.0 for s in STOP_SIGNALS}

    def agree(self, summed_votes: dict[str, float]) -> bool:
        """Given the votes summed over ranks: True on every rank if any rank got a stop signal."""
        global _agreed
        seen = [s.name for s in STOP_SIGNALS if summed_votes[f"stop_{s.name}"] > 0]
        if seen and not _agreed:
            _agreed = seen[0]
        return bool(seen)


def stop_signal() -> str | None:
    """The stop signal all ranks agreed on (None: the run was not stopped by a signal)."""
    return _agreed
