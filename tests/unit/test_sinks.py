"""Sinks: console lines and progress bar, events, and W&B falling back to offline without
network."""

import http.server
import io
import json
import socket
import subprocess
import threading
import time

import pytest

from megatrain.sinks import ConsoleSink, MetricsLogger, format_line, reachable
from tests.helpers import read_jsonl

RECORD = {
    "step": 40,
    "tokens": 4_000_000,
    "loss": 3.25,
    "lr": 3e-4,
    "tokens_per_s": 12345.0,
    "mfu": 0.412,
    "skipped_steps": 0,
    "energy_kwh_facility": 1.5,
    "co2_kg": 0.084,
    "energy_method": "estimate",
    "eta_s": 3725.0,
    "projected_kwh_facility": 3.75,
    "projected_co2_kg": 0.21,
}


def test_plain_line_has_progress_eta_and_projection_labelled_estimate():
    line = format_line(RECORD, max_steps=100)
    assert line.startswith(
        "step     40/100 (40%) | loss 3.2500 | lr 3.00e-04 | 12,345 tok/s | mfu 41.2%"
    )
    assert "1.5 kWh 84.0 g CO2e (est.)" in line
    assert line.endswith("eta 1h02m -> ~3.75 kWh 210 g")
    measured = format_line({**RECORD, "energy_method": "nvml"}, 100)
    assert "(est.)" not in measured and "1.5 kWh 84.0 g CO2e" in measured


def test_console_is_plain_when_not_a_tty_and_draws_a_bar_on_a_tty():
    plain, tty = io.StringIO(), io.StringIO()
    for out, is_tty in ((plain, False), (tty, True)):
        sink = ConsoleSink(out, tty=is_tty)
        sink.max_steps, sink.total_tokens = 100, 10_000_000
        sink.write(RECORD)
        sink.print("[event] checkpoint")
        sink.close()
    assert "\x1b" not in plain.getvalue() and "\r" not in plain.getvalue()
    assert plain.getvalue().splitlines()[1] == "[event] checkpoint"
    bar = (
        "[############..................]  40% 40/100 steps, 4M/10M tokens | eta 1h02m"
        " | final ~3.75 kWh, 210 g CO2e (est.)"
    )
    # the line, then the bar; the next print clears the bar, prints, and redraws it
    assert tty.getvalue() == (
        format_line(RECORD, 100) + "\n" + bar + "\r\x1b[K[event] checkpoint\n" + bar + "\n"
    )


def test_logger_writes_jsonl_and_run_start(tmp_path):
    out = io.StringIO()
    logger = MetricsLogger(tmp_path, enabled=True, stream=out)
    logger.run_start({"max_steps": 100, "skipped_steps": 2, "versions": {"git_commit": "abc"}})
    logger.log({**RECORD, "skipped_steps": 2})
    logger.log({**RECORD, "step": 50, "skipped_steps": 5})
    logger.close()
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [40, 50]
    events = read_jsonl(tmp_path / "events.jsonl")
    assert events[0]["event"] == "run_start" and events[0]["versions"] == {"git_commit": "abc"}
    assert (
        len(events) == 1
    )  # skipped steps are events of the stability guard, one per step (train.py)
    assert "step     40/100 (40%)" in out.getvalue()


def test_reachable_answers_fast_both_ways():
    server = http.server.HTTPServer(
        ("127.0.0.1", 0), http.server.BaseHTTPRequestHandler
    )  # answers 501
    threading.Thread(target=server.handle_request, daemon=True).start()
    assert reachable(f"http://127.0.0.1:{server.server_port}") is None
    server.server_close()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # bound, never listening: refused
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts the connection (backlog), never answers: like a dropping firewall
        t0 = time.monotonic()
        assert "refused" in reachable(f"http://127.0.0.1:{closed}")
        assert "timed out" in reachable(f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=0.5)
        assert time.monotonic() - t0 < 2.5


def test_wandb_online_without_network_goes_offline_fast_and_says_so(tmp_path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv(
        "WANDB_API_KEY", "x" * 40
    )  # a key but no network: W&B alone would hang ~100 s
    out = io.StringIO()
    t0 = time.monotonic()
    logger = MetricsLogger(
        tmp_path,
        enabled=True,
        stream=out,
        wandb_args=dict(
            name="t",
            mode="online",
            project="megatrain-test",
            entity=None,
            config={"config": {"a": 1}},
        ),
    )
    assert logger.wandb is not None and logger.wandb.mode == "offline"
    logger.log(RECORD)
    logger.close()
    assert time.monotonic() - t0 < 30
    event = read_jsonl(tmp_path / "events.jsonl")[0]
    assert (
        event["event"] == "wandb_offline"
        and f"cannot reach http://127.0.0.1:{port}" in event["reason"]
    )
    assert "wandb sync" in event["sync_later"]
    assert "[event] event=wandb_offline" in out.getvalue()
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text())["step"] == 40


def test_jsonl_lines_are_whole_or_absent_after_a_torn_write_and_on_a_full_disk(tmp_path):
    from megatrain.sinks import EventLog, JsonlSink

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # a writer killed mid-line
    sink = JsonlSink(path)
    sink.write({"step": 2})
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]

    full = tmp_path / "full"
    full.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8k", "tmpfs", str(full)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        sink, said = JsonlSink(full / "metrics.jsonl"), []
        with pytest.raises(OSError):
            for step in range(10_000):
                sink.write({"step": step, "pad": "x" * 300})
        log = EventLog(full, echo=said.append)
        log.write({"event": "checkpoint_failed", "pad": "y" * 20_000})  # does not fit
        assert any("events.jsonl not written" in s for s in said)
        for name in ("metrics.jsonl", "events.jsonl"):
            text = (full / name).read_text() if (full / name).exists() else ""
            assert not text or text.endswith("\n"), f"{name} ends in a torn line"
            [json.loads(line) for line in text.splitlines()]
    finally:
        subprocess.run(["umount", "-l", str(full)], check=False)


def test_rewind_drops_the_records_a_resumed_run_writes_again(tmp_path):
    from megatrain.sinks import JsonlSink

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"step": s, "energy_kwh_it": s / 10}) + "\n" for s in (1, 2, 3))
    )
    sink = JsonlSink(path)
    assert sink.rewind(3) is None
    assert sink.rewind(1) == {"step": 3, "energy_kwh_it": 0.3}
    sink.write({"step": 2})
    assert [r["step"] for r in read_jsonl(path)] == [1, 2]
