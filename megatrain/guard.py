"""Stability guard: what a long run does when a step goes wrong.

- A non-finite loss or gradient norm: the update is skipped (DeepSpeed's ZeRO optimizers discard
  a step whose gradient norm is not finite; the trainer does the same without ZeRO) and counted.
- fp16 loss-scale overflows: counted and logged, not bad (the scaler's normal search); at the
  minimum scale they are non-finite steps like any other.
- A loss spike: a loss more than `spike_zscore` standard deviations above the mean of the last
  `spike_window` good steps is logged (the update is kept: most spikes recover by themselves).
- `max_bad_steps` bad steps in a row: roll back to the last checkpoint and skip the data that
  was read since (the usual culprit), as PaLM and OPT did by hand. With no checkpoint to roll
  back to, `max_bad_steps` non-finite steps in a row stop the run (`TrainingDiverged`): the
  weights or optimizer state are already broken, and training on would only save them.
"""

from __future__ import annotations

import math
from collections import deque

from megatrain.config import GuardConfig
from megatrain.errors import MegatrainError


class TooManyRollbacks(MegatrainError):
    """The run keeps diverging after rolling back; a human should look (LR, data, precision)."""

    shared = True  # every rank judges the same all-reduced loss and raises together


class TrainingDiverged(MegatrainError):
    """The loss or gradients stay non-finite and there is no checkpoint to roll back to."""

    shared = True


class StabilityGuard:
    MIN_HISTORY = 20  # steps of history before a z-score means anything

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=max(cfg.spike_window, self.MIN_HISTORY))
        self.bad_streak = 0
        self.nonfinite_streak = 0  # of the bad streak, non-finite steps (loss or gradients)
        self.skipped_steps = 0  # updates not applied (non-finite), over the whole run
        self.rollbacks = 0  # in this job: guard.max_rollbacks is a per-job cap

    def state_dict(self) -> dict:
        """What a checkpoint keeps, so that spike detection is not blind after a resume."""
        return {
            "skipped_steps": self.skipped_steps,
            "loss_history": list(self.history),
            "bad_streak": self.bad_streak,
        }

    def load_state_dict(self, state: dict) -> None:
        # checkpoints from before the history was saved hold only the skipped count
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.history.clear()
        self.history.extend(state.get("loss_history", []))
        self.bad_streak = int(state.get("bad_streak", 0))

    def check(self, loss: float, update_skipped: bool, overflow: bool = False) -> str | None:
        """Classify a step: "nonfinite", "spike", "overflow" or None (good).

        `overflow`: fp16's loss scaler skipped the update because the scaled gradients overflowed
        while the scale was above its minimum. That is how dynamic loss scaling finds its scale
        (streaks of several are normal at the start and after each increase), not instability:
        counted as skipped, never a bad step; the step's loss is not part of the history.
        """
        verdict = None
        self.skipped_steps += update_skipped
        if overflow and math.isfinite(loss):
            return "overflow"
        if update_skipped or not math.isfinite(loss):
            verdict = "nonfinite"
        elif self.cfg.spike_zscore > 0 and len(self.history) >= self.MIN_HISTORY:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if loss > mean + self.cfg.spike_zscore * max(std, 1e-3 * abs(mean)):
                verdict = "spike"
        if verdict is None:
            self.history.append(loss)
            self.bad_streak = 0
        else:
            self.bad_streak += 1
        self.nonfinite_streak = self.nonfinite_streak + 1 if verdict == "nonfinite" else 0
        return verdict

    @property
    def should_roll_back(self) -> bool:
        return 0 < self.cfg.max_bad_steps <= self.bad_streak

    def rolled_back(self) -> None:
        self.bad_streak = 0
        self.rollbacks += 1
        if self.rollbacks > self.cfg.max_rollbacks:
            raise TooManyRollbacks(
                f"{self.rollbacks} rollbacks in this job (guard.max_rollbacks = "
                f"{self.cfg.max_rollbacks}); lower the learning rate or inspect the data"
            )

    def cannot_roll_back(self, step: int) -> None:
        """A rollback was due after `step` but there is no checkpoint: stop if the streak is of
        non-finite steps (spikes keep their updates and may recover by themselves)."""
        n = self.nonfinite_streak
        if n >= self.cfg.max_bad_steps:
            raise TrainingDiverged(
                f"loss or gradients non-finite for {n} steps from step {step - n + 1} and no "
                "checkpoint to roll back to: lower optim.lr (or raise optim.warmup_steps), "
                "check the data, and start again; guard.max_bad_steps sets how many such steps "
                "stop a run"
            )
