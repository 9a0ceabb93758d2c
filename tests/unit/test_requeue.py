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
