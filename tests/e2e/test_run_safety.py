"""A run directory and a dataset that a second command cannot corrupt: the run directory's lock
(real concurrent `megatrain train --nproc 2`, a kill -9'd holder), the resume checks (data
re-prepared with another tokenizer, a changed model, learning rate or seed), and `megatrain prep
--force` refused while a training reads the dataset."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatrain.files import sha256_file
from tests.helpers import REPO, corpus_sample, events, read_jsonl

TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def overrides(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        f"data.sources.0.path={dataset}",
        "data.seq_len=64",
        "batch.micro_batch=4",
        "batch.grad_accum=0",
        "batch.global_batch=8",
        "precision=fp32",
        "run.max_steps=8",
        "run.log_every=1",
        "run.eval_every=0",
        "run.ckpt_every=4",
        "optim.warmup_steps=2",
        "optim.lr=1e-2",
        "wandb.mode=disabled",
        f"run.dir={run_dir}",
        *extra,
    ]


def train_cmd(args: list[str], nproc: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "megatrain.cli", "train", str(TINY), *args]
    return cmd + ([f"--nproc={nproc}"] if nproc > 1 else [])


def train(args: list[str], nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_cmd(args, nproc), capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def start(args: list[str], nproc: int = 1) -> subprocess.Popen:
    """A training in its own session (so that the test can kill all of it)."""
    return subprocess.Popen(
        train_cmd(args, nproc),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )


def wait_for_steps(run_dir: Path, steps: int, proc: subprocess.Popen, timeout: float = 600):
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and len(read_jsonl(metrics)) >= steps:
            return
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"no {steps} steps in {run_dir} after {timeout} s")


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (torchrun's ranks live in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_all(proc: subprocess.Popen) -> None:
    """kill -9 the training and every process it started."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def prep(raw: Path, out: Path, vocab: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatrain.cli", "prep", str(raw), "--out", str(out)]
    cmd += ["--vocab-size", str(vocab), "--shard-tokens", "40000", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def checkpointed(tiny_dataset, tmp_path_factory) -> Path:
    """A run stopped after 4 steps, with its checkpoint (one process)."""
    run_dir = tmp_path_factory.mktemp("safety") / "base"
    result = train(overrides(tiny_dataset, run_dir, "run.stop_at_step=4"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step00000004"
    return run_dir


def resume_copy(checkpointed: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    return run_dir


def error_line(result: subprocess.CompletedProcess) -> str:
    """The CLI's one-line error: exit 2, no traceback."""
    assert result.returncode == 2, f"rc {result.returncode}:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if "megatrain train: error:" in line]
    assert len(lines) == 1, result.stderr[-4000:]
    return lines[0]


# ----------------------------------------------------------------------------- the lock


def test_a_second_training_on_a_run_dir_is_refused_at_once_and_the_first_is_untouched(
    tiny_dataset, tmp_path
):
    run_dir = tmp_path / "run"
    args = overrides(tiny_dataset, run_dir, "run.max_steps=30", "run.ckpt_every=10")
    first = start(args, nproc=2)
    try:
        wait_for_steps(run_dir, 1, first)
        began = time.monotonic()
        second = train(args, nproc=2, timeout=120)
        took = time.monotonic() - began
        line = error_line(second)
        holder = int(re.search(r"\(pid (\d+) on ", line).group(1))
        assert holder in descendants(first.pid), f"{holder} is not one of the first run's ranks"
        assert f"on {socket.gethostname()}" in line and str(run_dir) in line
        assert took < 30, f"the refusal took {took:.1f} s"
        assert first.wait(timeout=600) == 0, first.stdout.read()[-4000:]
    finally:
        if first.poll() is None:
            kill_all(first)
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(1, 31)), steps
    assert len(events(run_dir, "run_start")) == 1


def test_a_run_killed_with_kill_9_leaves_no_lock_behind(tiny_dataset, tmp_path):
    run_dir = tmp_path / "run"
    args = overrides(tiny_dataset, run_dir, "run.max_steps=200", "run.ckpt_every=2")
    first = start(args, nproc=2)
    try:
        wait_for_steps(run_dir, 3, first)
        holder = (run_dir / ".lock").read_text()
        assert f"on {socket.gethostname()}" in holder
    finally:
        kill_all(first)
    result = train(overrides(tiny_dataset, run_dir, "run.max_steps=6"), nproc=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert events(run_dir, "resumed"), "the next run did not resume"
    assert (run_dir / ".lock").read_text() != holder  # taken over by the new run


# ----------------------------------------------------------------------------- resume checks


def test_data_reprepared_with_another_tokenizer_is_refused_then_resumed_with_the_override(
    tmp_path_factory, tmp_path
):
    root = tmp_path_factory.mktemp("reprep")
    raw, data = corpus_sample(root / "raw"), root / "data"
    assert prep(raw, data, 512).returncode == 0
    run_dir = tmp_path / "run"
    first = train(overrides(data, run_dir, "run.stop_at_step=4"))
    assert first.returncode == 0, first.stderr[-4000:]
    again = prep(raw, data, 480, "--force")  # another vocabulary, padded to the same 512 rows
    assert again.returncode == 0, again.stderr[-3000:]

    line = error_line(train(overrides(data, run_dir)))
    assert "tokenizer" in line and "data [" in line and "run.dir" in line
    assert "run.allow_changes=[data,tokenizer]" in line
    assert not events(run_dir, "resumed")

    allowed = train(overrides(data, run_dir, "run.allow_changes=[data,tokenizer]"))
    assert allowed.returncode == 0, allowed.stderr[-4000:]
    change = events(run_dir, "resume_changes")[0]
    assert {c["key"] for c in change["changes"]} == {"data", "tokenizer"}
    assert events(run_dir, "resumed")[0]["step"] == 4


@pytest.mark.parametrize(
    "change, named",
    [("model.d_model=64", "model.d_model 128 -> 64"), ("model.n_layer=2", "model.n_layer 4 -> 2")],
)
def test_a_changed_model_is_refused_by_name(checkpointed, tiny_dataset, tmp_path, change, named):
    run_dir = resume_copy(checkpointed, tmp_path)
    line = error_line(train(overrides(tiny_dataset, run_dir, change)))
    assert named in line and "new run.dir" in line and "step00000004" in line


def test_a_changed_learning_rate_or_seed_is_refused_and_lr_resumes_with_the_override(
    checkpointed, tiny_dataset, tmp_path
):
    run_dir = resume_copy(checkpointed, tmp_path)
    line = error_line(train(overrides(tiny_dataset, run_dir, "optim.lr=2e-2", "run.seed=99")))
    assert "optim.lr 0.01 -> 0.02" in line and "run.seed 1234 -> 99" in line
    assert "run.allow_changes=[optim.lr,run.seed]" in line

    allowed = overrides(tiny_dataset, run_dir, "optim.lr=2e-2", "run.allow_changes=[optim.lr]")
    result = train(allowed)
    assert result.returncode == 0, result.stderr[-4000:]
    change = events(run_dir, "resume_changes")[0]
    assert change["changes"] == [{"key": "optim.lr", "old": 0.01, "new": 0.02}]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")][-4:] == [5, 6, 7, 8]


# ----------------------------------------------------------------------------- prep --force


def test_prep_force_is_refused_while_a_training_reads_the_dataset(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("busy")
    raw, data = corpus_sample(root / "raw"), root / "data"
    assert prep(raw, data, 512).returncode == 0
    before = {
        p.name: sha256_file(p) for p in data.iterdir() if p.is_file() and not p.name.startswith(".")
    }
    run_dir = tmp_path / "run"
    training = start(overrides(data, run_dir, "run.max_steps=400", "run.ckpt_every=0"), nproc=2)
    try:
        wait_for_steps(run_dir, 1, training)
        result = prep(raw, data, 480, "--force")
        ranks = descendants(training.pid)
        assert result.returncode == 2, result.stderr[-3000:]
        assert f"a training has {data} open (pid " in result.stderr
        named = result.stderr.split("(pid ")[1].split(" on ")[0].split(", ")
        assert {int(p) for p in named} <= set(ranks) and len(named) == 2, (named, ranks)
    finally:
        kill_all(training)
    after = {
        p.name: sha256_file(p) for p in data.iterdir() if p.is_file() and not p.name.startswith(".")
    }
    assert after == before
