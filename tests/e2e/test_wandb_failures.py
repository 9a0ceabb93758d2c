"""W&B never takes a run down: its helper process killed mid-run (a real 2-process training),
dead or stuck when the run finishes, or its server stalling at the start. Each failure is one
`wandb_failed` event; training goes on and metrics.jsonl stays complete."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, events, free_port, read_jsonl

TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children first found by their parent's id)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in () may hold spaces
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def wandb_helpers(pid: int) -> list[int]:
    """W&B's helper processes below `pid`: `wandb-core` (or the older `wandb service`)."""
    helpers = []
    for child in descendants(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"wandb-core" in cmdline or b"wandb service" in cmdline:
            helpers.append(child)
    return helpers


def test_training_goes_on_when_the_wandb_helper_is_killed(tiny_dataset, tmp_path):
    """2 CPU processes, W&B offline; the helper is killed with SIGKILL after 3 records."""
    run_dir, max_steps = tmp_path / "run", 30
    overrides = {
        "data.sources.0.path": tiny_dataset,
        "data.seq_len": 64,
        "batch.micro_batch": 4,
        "batch.grad_accum": 0,
        "batch.global_batch": 16,
        "precision": "fp32",
        "run.max_steps": max_steps,
        "run.log_every": 1,
        "run.eval_every": 0,
        "run.ckpt_every": 0,
        "optim.warmup_steps": 3,
        "wandb.mode": "offline",
        "run.dir": run_dir,
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += [f"--master_port={free_port()}", "-m", "megatrain.cli", "train", str(TINY)]
    cmd += [f"{k}={v}" for k, v in overrides.items()]
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    killed: list[int] = []

    def kill_helper_mid_run():
        metrics = run_dir / "metrics.jsonl"
        while proc.poll() is None:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                for helper in wandb_helpers(proc.pid):
                    os.kill(helper, signal.SIGKILL)
                    killed.append(helper)
                if killed:
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_helper_mid_run, daemon=True)
    killer.start()
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    killer.join(5)
    assert killed, f"never found W&B's helper process below the launcher:\n{output[-3000:]}"
    assert proc.returncode == 0, output[-4000:]
    (failed,) = events(run_dir, "wandb_failed")
    assert failed["call"] == "log" and 3 <= failed["step"] < max_steps, failed
    assert "Traceback" not in output
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, max_steps + 1))
    assert events(run_dir, "checkpoint")[-1]["step"] == max_steps


# W&B's state is per process: each case runs its own Python, as a trainer's rank 0 would.
LOGGER = """
import json, os, signal, sys, time
from pathlib import Path
from megatrain import sinks
from megatrain.sinks import MetricsLogger
from tests.e2e.test_wandb_failures import wandb_helpers

fault, run_dir = sys.argv[1], Path(sys.argv[2])
sinks.WANDB_FINISH_TIMEOUT_S = 3.0
args = dict(name="t", mode=os.environ.get("MODE", "offline"), project="megatrain-test",
            entity=None, config={})
t0 = time.monotonic()
logger = MetricsLogger(run_dir, enabled=True, wandb_args=args)
started = time.monotonic() - t0
(helper,) = wandb_helpers(os.getpid())
os.kill(helper, {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "none": 0}[fault])
time.sleep(0.5)
logger.log({"step": 1, "loss": 2.0, "tokens_per_s": 1.0})
logger.log({"step": 2, "loss": 1.5, "tokens_per_s": 1.0})
t0 = time.monotonic()
logger.close()
closed = time.monotonic() - t0
if fault == "stop":
    os.kill(helper, signal.SIGKILL)
print(json.dumps({"started_s": started, "closed_s": closed}))
sys.stdout.flush()
os._exit(0)  # as `megatrain train` does: W&B's exit hooks would talk to the dead helper
"""


@pytest.mark.parametrize(
    "fault, call, step", [("kill", "log", 1), ("stop", "finish", None)], ids=["dead", "stuck"]
)
def test_a_dead_or_stuck_wandb_helper_is_one_event(tmp_path, fault, call, step):
    """A dead helper: the next log raises at once, one event and no further W&B calls. A stuck
    one (SIGSTOP): logging is buffered, and finish gives up after its bound."""
    out = subprocess.run(
        [sys.executable, "-c", LOGGER, fault, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    timing = json.loads(out.stdout.splitlines()[-1])
    (failed,) = events(tmp_path, "wandb_failed")
    assert failed["call"] == call and failed["step"] == step, failed
    if fault == "stop":
        assert "within 3 s" in failed["error"] and timing["closed_s"] < 6
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


class StallingProxy(http.server.BaseHTTPRequestHandler):
    """Answers the reachability probe (HEAD) at once and never answers W&B's requests."""

    def do_HEAD(self):
        self.send_response(200)
        self.end_headers()

    def do_POST(self):
        time.sleep(120)

    do_GET = do_POST

    def log_message(self, *args):
        pass


def test_wandb_online_start_behind_a_stalling_proxy_is_bounded(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), StallingProxy)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {
        **os.environ,
        "MODE": "online",
        "WANDB_MODE": "online",
        "WANDB_BASE_URL": f"http://127.0.0.1:{server.server_port}",
        "WANDB_API_KEY": "x" * 40,
    }
    try:
        out = subprocess.run(
            [sys.executable, "-c", LOGGER, "none", str(tmp_path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
    finally:
        server.shutdown()
    assert out.returncode == 0, out.stderr[-3000:]
    timing = json.loads(out.stdout.splitlines()[-1])
    (offline,) = events(tmp_path, "wandb_offline")
    assert "online init failed" in offline["reason"], offline
    assert timing["started_s"] < 25, timing  # was ~31 s: the init timeout and the fallback
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]
