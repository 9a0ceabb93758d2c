"""Stop signals and the requeue rules, without a cluster."""

import os
import signal

import pytest

from megatrain import requeue, stop


@pytest.mark.parametrize(
    "sig, restarts, cap, state, ok, why",
    [
        ("SIGUSR1", 0, 100, "RUNNING", True, "SIGUSR1 before the time limit"),
        ("SIGUSR2", 3, 3, "RUNNING", False, "restart cap reached"),
        (
            "SIGTERM",
            0,
            100,
            "CANCELLED",
            False,
            "state CANCELLED",
        ),  # a user's scancel stays a cancel
        ("SIGTERM", 0, 100, "COMPLETING", False, "state COMPLETING"),
        ("SIGTERM", 0, 100, "RUNNING", True, "SIGTERM"),  # clusters that warn with SIGTERM alone
        ("SIGINT", 0, 100, "RUNNING", False, "Ctrl-C"),  # the user's stop
    ],
)
def test_requeue_decision(sig, restarts, cap, state, ok, why):
    decision, reason = requeue.requeue_decision(sig, restarts, cap, state)
    assert decision is ok and why in reason


@pytest.fixture
def stop_state(monkeypatch):
    """Fresh signal state, and the test process's own handlers back afterwards."""
    saved = {s: signal.getsignal(s) for s in stop.STOP_SIGNALS}
    monkeypatch.setattr(stop, "_received", None)
    monkeypatch.setattr(stop, "_agreed", None)
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_stop_signal_is_recorded_not_fatal(stop_state):
    request = stop.StopRequest()
    # the trainer sums every rank's votes in its per-step all-reduce; one process here
    assert (
        request.signal is None and not request.agree(request.votes()) and stop.stop_signal() is None
    )
    os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
    os.kill(os.getpid(), signal.SIGTERM)  # the first signal is the one reported
    assert (
        request.signal == "SIGUSR1"
        and request.agree(request.votes())
        and stop.stop_signal() == "SIGUSR1"
    )


def test_ctrl_c_is_a_stop_request_and_a_second_one_exits(stop_state, monkeypatch):
    monkeypatch.delenv(stop.LAUNCHER_ENV, raising=False)
    request = stop.StopRequest()
    os.kill(os.getpid(), signal.SIGINT)  # a KeyboardInterrupt without the handler
    assert request.signal == "SIGINT" and request.agree(request.votes())
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_rank_of_the_launcher_leaves_the_second_ctrl_c_to_it(stop_state, monkeypatch):
    # the terminal's SIGINT and the launcher's forwarded one: both reach the rank
    monkeypatch.setenv(stop.LAUNCHER_ENV, "1")
    request = stop.StopRequest()
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    assert request.signal == "SIGINT"


@pytest.mark.parametrize(
    "status, progress, again, restarts, cap, state, ok, why",
    [
        (1, True, False, 0, 100, "RUNNING", True, "after the run advanced"),
        (137, False, False, 0, 100, "RUNNING", True, "one more try"),
        (3, False, True, 1, 100, "RUNNING", False, "crashed twice in a row"),
        (1, True, True, 1, 100, "RUNNING", True, "after the run advanced"),
        (1, True, False, 5, 5, "RUNNING", False, "restart cap reached"),
        (1, True, False, 0, 100, "CANCELLED", False, "state CANCELLED"),  # scancel stays a cancel
        (2, True, False, 0, 100, "RUNNING", False, "a named error"),  # it would come back
    ],
)
def test_crash_decision(status, progress, again, restarts, cap, state, ok, why):
    decision, reason = requeue.crash_decision(status, progress, again, restarts, cap, state)
    assert decision is ok and why in reason


JOB0, JOB1, JOB2 = ({"id": "7", "restart": r} for r in range(3))


def start(job, step):
    return {"event": "run_start", "slurm_job": job, "start_step": step}


def test_assess_crash_progress_is_a_checkpoint_saved_by_this_job():
    saved_earlier = [start(JOB0, 0), {"event": "checkpoint", "step": 5}, start(JOB1, 5)]
    assert not requeue.assess_crash(saved_earlier, JOB1, 1)["progress"]
    saved_now = [*saved_earlier, {"event": "checkpoint", "step": 10}]
    crash = requeue.assess_crash(saved_now, JOB1, 1)
    assert crash["progress"] and crash["start_step"] == 5 and crash["checkpoint_step"] == 10
    # a job that died before its run_start saved nothing
    assert not requeue.assess_crash(saved_now, JOB2, 1)["progress"]


def test_assess_crash_counts_crashes_in_a_row_without_progress():
    first = requeue.assess_crash([start(JOB0, 0)], JOB0, 1)
    assert not first["progress"] and not first["again_without_progress"]
    history = [start(JOB0, 0), first, start(JOB1, 0)]
    assert requeue.assess_crash(history, JOB1, 1)["again_without_progress"]
    # a checkpoint between the two crashes: the run went on, this is a new streak
    history = [start(JOB0, 0), first, start(JOB1, 0), {"event": "checkpoint", "step": 5}]
    second = requeue.assess_crash(history, JOB1, 1)
    assert second["progress"] and not second["again_without_progress"]


def test_crash_cause_names_the_hang_the_error_or_the_signal():
    hang = [{"event": "hang", "rank": 0}]
    assert "watchdog" in requeue.crash_cause(3, hang)
    error = [{"event": "error", "type": "InjectedFault", "message": "boom", "step": 12}]
    assert requeue.crash_cause(1, error) == "InjectedFault (after step 12): boom"
    echo = {"event": "error", "type": "RuntimeError", "message": "peer gone", "step": 12}
    ranked = [{**error[0], "rank": 1}, echo]
    assert requeue.crash_cause(1, ranked) == "InjectedFault (rank 1, after step 12): boom"
    assert "signal 9" in requeue.crash_cause(137, [])
