"""Faults injected on purpose, so that tests can watch the run handle them.

Set in the environment of the training processes (the tests start real ones):

    MEGATRAIN_INJECT_NAN_AT_STEPS=6,9      rank 0's loss becomes NaN at these steps (once each,
                                           as bad data would be until skipped)
    MEGATRAIN_INJECT_SPIKE_AT_STEPS=25     every rank's loss is multiplied by 100 at these steps
                                           (once each): a loss spike
    MEGATRAIN_INJECT_SLOW_RANK=1:0.2       rank 1 sleeps 0.2 s in each training forward (every
                                           micro-batch): a straggler
    MEGATRAIN_INJECT_RAISE=1:12            rank 1 raises InjectedFault in the forward of step 12,
                                           each time it gets there (a crash that comes back)
    MEGATRAIN_INJECT_RAISE=1:12:once       the same, once per run directory: the first time
                                           leaves RUN_DIR/faults/raised-rank1-step12 (a crash
                                           that a restart gets past)

The loss is changed where the model returns it (a forward hook on the last micro-batch of the
step), so gradients, the guard, metrics and checkpoints see exactly what a real fault would give.
The slow rank sleeps in a forward pre-hook, inside the time megatrain/stragglers.py measures.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from megatrain.callbacks import Callback

NAN_ENV = "MEGATRAIN_INJECT_NAN_AT_STEPS"
SPIKE_ENV = "MEGATRAIN_INJECT_SPIKE_AT_STEPS"
SLOW_ENV = "MEGATRAIN_INJECT_SLOW_RANK"
RAISE_ENV = "MEGATRAIN_INJECT_RAISE"


def _steps(text: str) -> set[int]:
    return {int(s) for s in text.split(",") if s.strip()}


class LossInjector(Callback):
    """Multiply the loss of the last micro-batch of chosen steps by `factor` (on `ranks`)."""

    def __init__(self, steps: set[int], factor: float, ranks: set[int] | None = None):
        self.steps, self.factor, self.ranks = set(steps), factor, ranks
        self.micro_batches = 0

    def on_start(self, trainer) -> None:
        per_step = trainer.plan.layout.grad_accum

        def hook(module, args, loss):
            if not module.training:  # validation forwards
                return None
            self.micro_batches += 1
            if trainer.step + 1 in self.steps and self.micro_batches == per_step:
                self.steps.discard(trainer.step + 1)
                if self.ranks is None or trainer.rank in self.ranks:
                    return loss * self.factor
            return None

        trainer.engine.module.register_forward_hook(hook)

    def on_step_end(self, trainer, loss, skipped) -> None:
        self.micro_batches = 0


class SlowRank(Callback):
    """Rank `rank` sleeps `seconds` before each training forward (validation is left alone)."""

    def __init__(self, rank: int, seconds: float):
        self.rank, self.seconds = rank, seconds

    def on_start(self, trainer) -> None:
        if trainer.rank != self.rank:
            return

        def hook(module, args):
            if module.training:
                time.sleep(self.seconds)

        trainer.engine.module.register_forward_pre_hook(hook)


def _slow_rank(text: str) -> SlowRank:
    rank, _, seconds = text.partition(":")
    try:
        return SlowRank(int(rank), float(seconds))
    except ValueError:
        raise ValueError(f"{SLOW_ENV}={text!r}: expected RANK:SECONDS, e.g. 1:0.2") from None


class InjectedFault(RuntimeError):
    """The exception `RaiseInjector` raises."""


class RaiseInjector(Callback):
    """Raise `InjectedFault` on `rank` in the first training forward of `step`; with `once`, only
    if RUN_DIR/faults/ has no mark of an earlier time (the mark is written first)."""

    def __init__(self, rank: int, step: int, once: bool):
        self.rank, self.step, self.once = rank, step, once

    def on_start(self, trainer) -> None:
        if trainer.rank != self.rank:
            return
        mark = trainer.cfg.run_dir / "faults" / f"raised-rank{self.rank}-step{self.step}"

        def hook(module, args):
            if not module.training or trainer.step + 1 != self.step:
                return
            if self.once:
                if mark.exists():
                    return
                mark.parent.mkdir(exist_ok=True)
                mark.touch()
            raise InjectedFault(f"injected fault: rank {self.rank}, step {self.step}")

        trainer.engine.module.register_forward_pre_hook(hook)


def from_environ(environ: Mapping[str, str] = os.environ) -> list[Callback]:
    """The injectors the environment asks for (none in a normal run)."""
    injectors: list[Callback] = []
    if environ.get(NAN_ENV):
        injectors.append(LossInjector(_steps(environ[NAN_ENV]), float("nan"), ranks={0}))
    if environ.get(SPIKE_ENV):
        injectors.append(LossInjector(_steps(environ[SPIKE_ENV]), 100.0))
    if environ.get(SLOW_ENV):
        injectors.append(_slow_rank(environ[SLOW_ENV]))
    if environ.get(RAISE_ENV):
        rank, step, *once = environ[RAISE_ENV].split(":")
        injectors.append(RaiseInjector(int(rank), int(step), once == ["once"]))
    return injectors
