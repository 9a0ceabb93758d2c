"""`megatrain eval` end to end on a briefly trained tiny model: the shipped lm-eval tasks through
the real lm-evaluation-harness and transformers, offline (no network access is even attempted),
from another directory than the repository, and the numbers in the run's offline W&B run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
WANDB = Path(sys.executable).parent / "wandb"
TASKS = ["megatrain_lastword_fr", "megatrain_lastword_en"]
STEPS = 20

# `megatrain` with every attempt to reach another machine (a connection or a name lookup that is
# not local) reported on stderr, and refused
NO_NETWORK = """
import socket, sys

LOCAL = {"localhost", "127.0.0.1", "::1", None}

def hook(event, args):
    if event == "socket.connect" and args[0].family != socket.AF_UNIX:
        where = args[1][0] if isinstance(args[1], tuple) else args[1]
    elif event == "socket.getaddrinfo":
        where = args[0]
    else:
        return
    if where not in LOCAL:
        print(f"NETWORK ATTEMPT: {event} {args[1:]!r}", file=sys.stderr, flush=True)
        raise OSError(f"no network in this test ({where})")

sys.addaudithook(hook)
from megatrain.cli import main
sys.exit(main(sys.argv[1:]))
"""


def env() -> dict:
    # this checkout's code in every process, whatever the venv's editable install points at
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


def megatrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", NO_NETWORK, *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env(),
    )
    assert "NETWORK ATTEMPT" not in result.stderr, result.stderr[-4000:]
    assert result.returncode == 0, f"{args}: rc {result.returncode}\n{result.stderr[-6000:]}"
    return result


def wandb_summary(folder: Path) -> dict:
    out = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", "--summary", str(folder)],
        capture_output=True,
        text=True,
        check=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> tuple[Path, str]:
    """(run directory, W&B run id) of a tiny model trained for a few steps on 1 process, with an
    offline W&B run."""
    run_dir = tmp_path_factory.mktemp("eval") / "run"
    overrides = {
        "data.sources.0.path": tiny_dataset,
        "batch.micro_batch": 4,
        "batch.grad_accum": 2,
        "precision": "fp32",
        "run.max_steps": STEPS,
        "run.log_every": 5,
        "run.eval_every": 0,
        "run.eval_batches": 2,
        "optim.warmup_steps": 4,
        "run.dir": run_dir,
        "wandb.mode": "offline",
    }
    cmd = [sys.executable, "-m", "megatrain.cli", "train", str(REPO / "configs" / "tiny.yaml")]
    result = subprocess.run(
        cmd + [f"{k}={v}" for k, v in overrides.items()],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env=env(),
    )
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr}"
    (folder,) = run_dir.glob("wandb/offline-run-*")
    return run_dir, folder.name.rsplit("-", 1)[-1]  # offline-run-<time>-<id>


def test_tasks_run_offline_from_anywhere_and_reach_the_run_and_its_wandb_run(trained, tmp_path):
    run_dir, run_id = trained
    out = megatrain(
        "eval", str(run_dir), "--tasks", ",".join(TASKS), "--limit", "20", "--device", "cpu",
        cwd=tmp_path,  # not the repository: the tasks find their data beside their YAML
    )  # fmt: skip

    saved = json.loads((run_dir / "eval" / f"tasks-step{STEPS}.json").read_text())
    assert saved["step"] == STEPS and saved["tasks"] == TASKS and saved["model"] == str(run_dir)
    assert saved["samples"] == {t: 20 for t in TASKS} and saved["lm_eval_version"]
    assert Path(saved["task_dir"]) == REPO / "configs" / "eval"
    for task in TASKS:
        metrics = saved["results"][task]
        assert 0 <= metrics["acc"] <= 1, metrics
        assert math.isfinite(metrics["perplexity"]) and metrics["perplexity"] >= 1, metrics
    assert json.dumps(saved["results"], indent=2) in out.stdout  # printed as saved

    assert f"numbers in the summary of W&B run {run_id}" in out.stdout, out.stdout[-2000:]
    resumed = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}"))
    assert len(resumed) >= 2, resumed  # the training's, and the one the eval resumed
    summary = wandb_summary(resumed[-1])
    assert summary["run_id"] == run_id and summary["state"] == "finished"
    for task in TASKS:
        for metric in ("acc", "perplexity"):
            got = summary["summary"][f"eval/{task}/{metric}"]
            assert got == pytest.approx(saved["results"][task][metric], rel=1e-12)


def test_perplexity_reaches_the_wandb_run_too(trained, tmp_path):
    run_dir, run_id = trained
    out = megatrain("eval", str(run_dir), "--device", "cpu", cwd=tmp_path)
    saved = json.loads((run_dir / "eval" / "perplexity-validation.json").read_text())
    assert math.isfinite(saved["perplexity"]) and saved["tokens"] > 0
    assert f"numbers in the summary of W&B run {run_id}" in out.stdout, out.stdout[-2000:]
    newest = max(run_dir.glob("wandb/offline-run-*"), key=lambda p: p.name)
    assert newest.name.endswith(f"-{run_id}")
    summary = wandb_summary(newest)["summary"]
    assert summary["eval/perplexity-validation/perplexity"] == pytest.approx(saved["perplexity"])
    assert summary["eval/perplexity-validation/bits_per_byte"] == pytest.approx(
        saved["bits_per_byte"]
    )
