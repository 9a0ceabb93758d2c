"""Faults injected on purpose, so that tests can watch the run handle them.

Set in the environment of the training processes (the tests start real ones):

    MEGATRAIN_INJECT_NAN_AT_STEPS=6,9      rank 0's loss becomes NaN at these steps (once each,
                                           as bad data would be until skipped)
    MEGATRAIN_INJECT_SPIKE_AT_STEPS=25     every rank's loss is multiplied by 100 at these steps
                                           (once each): a loss spike

The loss is changed where the model returns it (a forward hook on the last micro-batch of the
step), so gradients, the guard, metrics and checkpoints see exactly what a real fault would give.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from megatrain.callbacks import Callback

NAN_ENV = "MEGATRAIN_INJECT_NAN_AT_STEPS"
SPIKE_ENV = "MEGATRAIN_INJECT_SPIKE_AT_STEPS"


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


def from_environ(environ: Mapping[str, str] = os.environ) -> list[Callback]:
    """The injectors the environment asks for (none in a normal run)."""
    injectors: list[Callback] = []
    if environ.get(NAN_ENV):
        injectors.append(LossInjector(_steps(environ[NAN_ENV]), float("nan"), ranks={0}))
    if environ.get(SPIKE_ENV):
        injectors.append(LossInjector(_steps(environ[SPIKE_ENV]), 100.0))
    return injectors
