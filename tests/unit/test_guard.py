"""The stability guard's judgement, and its memory across a checkpoint."""

import json
import math

import pytest

from megatrain.config import GuardConfig
from megatrain.guard import StabilityGuard, TooManyRollbacks, TrainingDiverged


def warmed_up(steps: int = 30) -> StabilityGuard:
    guard = StabilityGuard(GuardConfig(spike_window=20, spike_zscore=6.0, max_bad_steps=2))
    for i in range(steps):
        assert guard.check(5.0 - 0.01 * i + 0.02 * (i % 3), update_skipped=False) is None
    return guard


def test_skips_spikes_and_rollbacks():
    guard = warmed_up()
    assert guard.check(50.0, update_skipped=False) == "spike" and not guard.should_roll_back
    assert guard.check(math.nan, update_skipped=True) == "nonfinite" and guard.should_roll_back
    assert guard.skipped_steps == 1
    guard.rolled_back()
    assert guard.bad_streak == 0 and guard.rollbacks == 1
    with pytest.raises(TooManyRollbacks, match="guard.max_rollbacks"):
        for _ in range(GuardConfig().max_rollbacks):
            guard.rolled_back()


def test_a_resumed_guard_sees_a_spike_at_once():
    """Its history travels in the checkpoint (as JSON): spike detection is not blind for
    `spike_window` steps after every resume."""
    guard = warmed_up()
    guard.check(math.nan, update_skipped=True)
    state = json.loads(json.dumps(guard.state_dict()))
    resumed = StabilityGuard(guard.cfg)
    resumed.load_state_dict(state)
    assert (resumed.skipped_steps, resumed.bad_streak, list(resumed.history)) == (
        1,
        1,
        list(guard.history),
    )
    assert resumed.check(50.0, update_skipped=False) == "spike"
    fresh = StabilityGuard(guard.cfg)  # what a resume gave before the history was saved
    fresh.load_state_dict({"skipped_steps": 1})
    assert fresh.check(50.0, update_skipped=False) is None


def test_fp16_overflow_skips_are_counted_but_not_instability():
    """Dynamic loss scaling skips steps while it finds its scale: streaks of them are normal and
    must never roll a run back."""
    guard = warmed_up()
    history = list(guard.history)
    for _ in range(5):
        assert guard.check(4.9, update_skipped=True, overflow=True) == "overflow"
    assert guard.bad_streak == 0 and not guard.should_roll_back and guard.skipped_steps == 5
    assert list(guard.history) == history
    # at the minimum scale (the trainer then says overflow=False), it is a non-finite step
    assert guard.check(4.9, update_skipped=True) == "nonfinite" and guard.bad_streak == 1


def test_without_a_checkpoint_a_non_finite_streak_stops_and_spikes_do_not():
    """A spike then a non-finite step is a bad streak of 2 but only 1 non-finite step: the run
    goes on; 2 non-finite steps in a row (max_bad_steps) with nothing to roll back to stop it."""
    guard = warmed_up()
    guard.check(50.0, update_skipped=False)
    guard.check(math.nan, update_skipped=True)
    assert guard.should_roll_back
    guard.cannot_roll_back(step=32)
    guard.check(6.0, update_skipped=True)  # gradients non-finite, loss finite
    with pytest.raises(TrainingDiverged, match="non-finite for 2 steps from step 32 and no"):
        guard.cannot_roll_back(step=33)
