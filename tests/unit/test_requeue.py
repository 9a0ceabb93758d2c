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
