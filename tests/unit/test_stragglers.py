"""Straggler detection's pure decisions: which rank is slowest, by how much, and when a rank that
stays slow (or recovers) is named: once, not every interval."""

import pytest
import torch

from megatrain.faults import SlowRank, from_environ
from megatrain.stragglers import StragglerMonitor, StragglerTracker, slowest


def test_slowest_rank_and_ratios_to_the_median():
    rank, ratios = slowest([1.0, 3.0, 1.0, 2.0])
    assert rank == 1
    assert ratios == pytest.approx([2 / 3, 2.0, 2 / 3, 4 / 3])  # median 1.5


def test_one_process_or_nothing_timed_is_ratio_one():
    assert slowest([0.25]) == (0, [1.0])
    assert slowest([0.0, 0.0]) == (0, [1.0, 1.0])


def test_equal_times_name_the_lowest_rank():
    assert slowest([2.0, 2.0, 2.0])[0] == 0


def run(tracker, intervals):
    """The changes reported at each interval, by interval index."""
    return {i: c for i, ratios in enumerate(intervals) if (c := tracker.update(ratios))}


def test_a_persistently_slow_rank_is_named_once():
    tracker = StragglerTracker(factor=1.5, intervals=3)
    changes = run(tracker, [[1.0, 1.6]] * 10)
    assert changes == {2: [("straggler", 1)]}
    assert tracker.stragglers == {1}


def test_slow_intervals_must_be_consecutive():
    tracker = StragglerTracker(factor=1.5, intervals=3)
    slow, fast = [1.0, 1.8], [1.0, 1.1]
    assert run(tracker, [slow, slow, fast, slow, slow, fast] * 3) == {}
    assert run(tracker, [[1.0, 1.5]] * 3) == {2: [("straggler", 1)]}  # at the factor is slow


def test_recovery_then_slow_again_gives_one_event_each():
    tracker = StragglerTracker(factor=1.5, intervals=2)
    slow, fast = [1.0, 1.0, 2.0], [1.0, 1.0, 1.0]
    # a single fast interval does not end it, two in a row do
    history = [slow, slow, slow, fast, slow, fast, fast, fast, slow, slow]
    assert run(tracker, history) == {
        1: [("straggler", 2)],
        6: [("straggler_recovered", 2)],
        9: [("straggler", 2)],
    }


def test_each_rank_is_tracked_on_its_own():
    tracker = StragglerTracker(factor=1.5, intervals=2)
    history = [[2.0, 1.0, 1.0, 1.0], [2.0, 1.0, 1.0, 1.7], [2.0, 1.0, 1.0, 1.7]]
    assert run(tracker, history) == {1: [("straggler", 0)], 2: [("straggler", 3)]}


def test_factor_zero_turns_events_off():
    assert run(StragglerTracker(factor=0, intervals=1), [[1.0, 100.0]] * 5) == {}


def test_slow_rank_injector_from_the_environment():
    (injector,) = from_environ({"MEGATRAIN_INJECT_SLOW_RANK": "1:0.25"})
    assert isinstance(injector, SlowRank) and (injector.rank, injector.seconds) == (1, 0.25)
    with pytest.raises(ValueError, match="MEGATRAIN_INJECT_SLOW_RANK='1'.*RANK:SECONDS"):
        from_environ({"MEGATRAIN_INJECT_SLOW_RANK": "1"})


def test_a_factor_that_flags_every_interval_is_refused():
    from megatrain.config import ConfigError, load_config
    from tests.helpers import REPO

    tiny = REPO / "configs" / "tiny.yaml"
    for factor in ("1", "0.5"):
        with pytest.raises(ConfigError, match=r"'run.straggler_factor' \(.*\) must be above 1"):
            load_config(tiny, [f"run.straggler_factor={factor}"])
    assert load_config(tiny, ["run.straggler_factor=0"]).run.straggler_factor == 0  # off


def test_monitor_sums_the_forwards_of_an_interval_and_starts_again():
    ticks = iter([10.0, 10.5, 11.0, 11.25, 20.0, 20.125])
    monitor = StragglerMonitor(1.5, 3, torch.device("cpu"), clock=lambda: next(ticks))
    assert monitor.hosts and monitor.hosts[0]  # this process alone: its own host name
    for _ in range(2):
        monitor.begin_forward()
        monitor.end_forward()
    assert monitor._interval_seconds() == 0.75
    monitor.begin_forward()
    monitor.end_forward()
    assert monitor._interval_seconds() == 0.125  # the interval before is not counted again
    # one process: the slowest rank is itself, at the median
    assert monitor.collect(1) == {"slowest_rank": 0, "slowest_rank_ratio": 1.0}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_monitor_times_queued_gpu_work_with_events():
    monitor = StragglerMonitor(1.5, 3, torch.device("cuda", torch.cuda.current_device()))
    a = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    monitor.begin_forward()
    for _ in range(20):
        a = (a @ a) / 4096  # queued, not waited for
    monitor.end_forward()
    seconds = monitor._interval_seconds()  # waits for the last event only
    assert 0 < seconds < 10
    assert monitor._interval_seconds() == 0.0
