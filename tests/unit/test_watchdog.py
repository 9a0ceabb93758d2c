"""The progress watchdog (megatrain/watchdog.py): its timeout rule, and a real process that stops
progressing: stacks on disk, one line, a `hang` event, exit 3; slow phases do not fire."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

from megatrain.watchdog import AUTO_FLOOR_S, HANG_EXIT, timeout_for
from tests.helpers import REPO, events


def test_automatic_timeout_is_the_floor_until_steps_are_slow():
    assert timeout_for("step", 0, 10, 3600, []) == AUTO_FLOOR_S
    assert timeout_for("step", 0, 10, 3600, [1.0, 2.0, 50.0]) == AUTO_FLOOR_S  # 10 x 2 s
    assert timeout_for("step", 0, 10, 3600, [100.0, 120.0, 900.0]) == 1200  # 10 x the median


def test_a_fixed_timeout_replaces_the_rule_for_steps():
    assert timeout_for("step", 8, 10, 3600, [100.0]) == 8


def test_slow_phases_get_at_least_their_allowance():
    for phase in ("start-up", "evaluation", "checkpoint save", "rollback"):
        assert timeout_for(phase, 8, 10, 3600, []) == 3600
        assert timeout_for(phase, 0, 10, 3600, [1000.0]) == 10000  # a slower step rule wins
    assert timeout_for("step", 8, 10, 3600, []) == 8


def run_script(
    body: str, tmp_path, timeout: float = 60
) -> tuple[subprocess.CompletedProcess, float]:
    script = textwrap.dedent(
        f"""
        import time
        from megatrain.sinks import EventLog
        from megatrain.watchdog import Watchdog
        run_dir = {str(tmp_path)!r}
        """
    ) + textwrap.dedent(body)
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    return done, time.monotonic() - t0


def test_a_process_that_stops_progressing_dumps_its_stacks_logs_and_exits(tmp_path):
    done, took = run_script(
        """
        log = EventLog(run_dir).write
        dog = Watchdog(run_dir, 0, 0, 1.0, 10, 0, log=log, poll_s=0.05).start()
        for step in range(1, 4):
            time.sleep(0.1)
            dog.beat(step)

        def stuck_in_a_collective():
            time.sleep(60)

        stuck_in_a_collective()
        """,
        tmp_path,
    )
    assert done.returncode == HANG_EXIT, done.stderr
    assert took < 15
    (stacks,) = (tmp_path / "hangs").glob("*-rank0-step4.txt")
    text = stacks.read_text()
    assert "phase 'step', step 4" in text and "Thread" in text and 'File "' in text
    assert "stuck_in_a_collective" in text
    assert not list((tmp_path / "hangs").glob(".*"))  # no temporary file left
    assert "megatrain train: error: hang: rank 0" in done.stderr
    (hang,) = events(tmp_path, "hang")
    assert hang["rank"] == 0 and hang["step"] == 4 and hang["phase"] == "step"
    assert hang["host"] and hang["stacks"] == str(stacks) and hang["waited_s"] >= 1.0


def test_a_slow_phase_within_its_allowance_does_not_fire(tmp_path):
    done, _ = run_script(
        """
        dog = Watchdog(run_dir, 1, 0, 1.0, 10, 4.0, poll_s=0.05).start()
        time.sleep(2)  # start-up: the first step may be slow
        dog.beat(1)
        with dog.phase("checkpoint save"):
            time.sleep(2)
        time.sleep(0.5)
        dog.beat(2)
        dog.stop()
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "hangs").exists()
