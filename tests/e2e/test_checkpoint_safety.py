"""Checkpoints that are never lost or misread, on real 2-process gloo runs of the tiny config:
pruning and resuming follow the run's lineage, a run dir whose checkpoints all fail stops by
name, a full disk (a real tmpfs) is named and leaves nothing half-written, metrics.jsonl keeps
each step once, the energy of a killed job's unsaved steps is still counted, and a new world size
does not silently change the global batch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.helpers import REPO, events, losses, read_jsonl, run_train, train_command

TINY = REPO / "configs" / "tiny.yaml"


def common(dataset: Path, run_dir: Path) -> list[str]:
    return [
        f"data.sources.0.path={dataset}",
        f"run.dir={run_dir}",
        "data.seq_len=64",
        "batch.micro_batch=4",
        "batch.grad_accum=2",
        "parallel.zero_stage=2",
        "precision=fp32",
        "run.log_every=1",
        "run.eval_every=0",
        "optim.warmup_steps=4",
        "optim.lr=1e-2",
        "wandb.mode=disabled",
    ]


def command(overrides: list[str], nproc: int = 2) -> list[str]:
    return train_command(TINY, overrides, nproc)


def train_failing(overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """A training that must fail; its output."""
    result = subprocess.run(
        command(overrides, nproc), capture_output=True, text=True, timeout=600, cwd=REPO
    )
    assert result.returncode != 0, f"training did not fail:\n{result.stdout[-3000:]}"
    return result


def parses_line_by_line(path: Path) -> None:
    text = path.read_text()
    assert text.endswith("\n"), f"{path} ends in a torn line"
    for line in text.splitlines():
        json.loads(line)


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory) -> Path:
    """A run dir with checkpoints at steps 5 and 10 (copy it before changing it)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    run_train(TINY, common(tiny_dataset, run_dir) + ["run.max_steps=10", "run.ckpt_every=5"])
    return run_dir


def copy_run(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def manifest(run_dir: Path, tag: str) -> dict:
    return json.loads((run_dir / "checkpoints" / tag / "megatrain-checkpoint.json").read_text())


def kill_tree(process: subprocess.Popen) -> None:
    """kill -9 the launcher and every rank (a node failure)."""
    parent = psutil.Process(process.pid)
    for p in [*parent.children(recursive=True), parent]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)


@pytest.mark.slow
def test_a_fresh_start_over_old_checkpoints_keeps_its_own_and_a_crash_resumes_them(
    tiny_dataset, tmp_path
):
    """run.resume=never over an old run's steps 20 and 30 (keep 2): the new step-10 checkpoint
    survives its pruning, kill -9 after it, and the resumed job continues the new run from its
    own checkpoint, bit-identically, with each step once in metrics.jsonl and the killed job's
    unsaved energy counted."""
    run_dir = tmp_path / "run"
    args = common(tiny_dataset, run_dir) + ["run.max_steps=30", "run.ckpt_every=10", "run.keep=2"]
    run_train(TINY, args)
    reference = losses(run_dir)
    old_lineage = manifest(run_dir, "step00000030")["lineage"]

    job = subprocess.Popen(
        command(args + ["run.resume=never"]),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 400
    while time.time() < deadline and job.poll() is None:
        try:  # files being written: read again on a partial line
            start = job_start(run_dir)
            saved = [e["step"] for e in events(run_dir, "checkpoint") if e["time"] > start]
            done = [r["step"] for r in read_jsonl(metrics)] if metrics.exists() else []
        except (ValueError, OSError):
            continue
        if saved and done and max(done) >= saved[-1] + 3:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the fresh run ended before it could be killed"
    kill_tree(job)

    killed_records = read_jsonl(metrics)
    own = [e["step"] for e in events(run_dir, "checkpoint") if e["time"] > job_start(run_dir)]
    tag = f"step{own[-1]:08d}"
    assert (run_dir / "checkpoints" / tag).is_dir(), "the fresh checkpoint was pruned"
    new_lineage = manifest(run_dir, tag)["lineage"]
    assert new_lineage != old_lineage
    superseded = list((run_dir / "checkpoints").glob("superseded-*/step00000030"))
    assert superseded, "the old run's checkpoints were not set aside"

    run_train(TINY, args)
    resumed = events(run_dir, "resumed")[-1]
    assert resumed["tag"] == tag, f"resumed {resumed['tag']}, not the fresh run's {tag}"
    records = read_jsonl(metrics)
    assert [r["step"] for r in records] == list(range(1, 31)), "a step is recorded twice"
    assert losses(run_dir) == reference, "the resumed fresh run diverged"
    unsaved = events(run_dir, "unsaved_work_counted")[-1]
    assert unsaved["redone_steps"] == killed_records[-1]["step"] - own[-1] > 0
    first_again = next(r for r in records if r["step"] == own[-1] + 1)
    assert first_again["energy_kwh_it"] > killed_records[-1]["energy_kwh_it"], (
        "the energy of the killed job's steps after its checkpoint was lost"
    )
    assert first_again["gpu_hours"] > killed_records[-1]["gpu_hours"]
    assert manifest(run_dir, "step00000030")["lineage"] == new_lineage


def job_start(run_dir: Path) -> float:
    """When the newest job of the run started (its run_start event), 0 before."""
    starts = (
        [e["time"] for e in events(run_dir, "run_start")]
        if (run_dir / "events.jsonl").exists()
        else []
    )
    return starts[-1] if starts else 0.0


@pytest.mark.slow
def test_a_run_dir_whose_checkpoints_all_fail_stops_by_name(trained, tiny_dataset, tmp_path):
    """A corrupt byte in step 5, a manifest without `files` in step 10 and a folder without a
    manifest: every one is rejected with an event, and the run stops by name instead of
    training again from step 0."""
    run_dir = copy_run(trained, tmp_path)
    ckpt = run_dir / "checkpoints"
    optim = sorted((ckpt / "step00000005").glob("*optim_states.pt"))[0]
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optim.write_bytes(bytes(data))
    meta = manifest(run_dir, "step00000010")
    del meta["files"]
    (ckpt / "step00000010" / "megatrain-checkpoint.json").write_text(json.dumps(meta))
    shutil.copytree(ckpt / "step00000010", ckpt / "step00000015")
    (ckpt / "step00000015" / "megatrain-checkpoint.json").unlink()
    before = read_jsonl(run_dir / "metrics.jsonl")

    out = train_failing(common(tiny_dataset, run_dir) + ["run.max_steps=20"])
    assert "every checkpoint in" in out.stderr and "KeyError" not in out.stderr
    assert "step00000005" in out.stderr and "step00000010" in out.stderr
    assert "has no 'files'" in out.stderr
    rejected = {e["tag"]: e["reason"] for e in events(run_dir, "checkpoint_rejected")}
    assert set(rejected) == {"step00000005", "step00000010", "step00000015"}
    assert "interrupted save" in rejected["step00000015"]
    assert read_jsonl(run_dir / "metrics.jsonl") == before, "the run started again from step 0"
    # one process, no launcher in between: one line and exit code 2
    single = [sys.executable, "-m", "megatrain.cli", "train", str(TINY)]
    args = common(tiny_dataset, run_dir) + ["run.max_steps=20"]
    out = subprocess.run(single + args, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "megatrain train: error: every checkpoint in" in out.stderr


def mount_tmpfs(path: Path, size_bytes: int) -> None:
    path.mkdir(parents=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def checkpoint_size(run_dir: Path) -> int:
    return sum(f["bytes"] for f in manifest(run_dir, "step00000010")["files"].values())


@pytest.mark.slow
@pytest.mark.parametrize("room", [0.5, 1.5], ids=["during-the-write", "before-the-write"])
def test_a_full_disk_is_named_and_leaves_nothing_half_written(
    trained, tiny_dataset, tmp_path, room
):
    """A real full filesystem: a tmpfs with room for half a checkpoint (the first save fails in
    DeepSpeed's write) or one and a half (the second save is refused by the free-space check)."""
    size = checkpoint_size(trained)
    run_dir = tmp_path / "full"
    mount_tmpfs(run_dir, int(size * room) + 1_500_000)  # + config, tokenizer, records
    try:
        out = train_failing(
            common(tiny_dataset, run_dir) + ["run.max_steps=20", "run.ckpt_every=4", "run.keep=3"]
        )
        assert f"no space left on device in {run_dir / 'checkpoints'}" in out.stderr
        assert "the last checkpoint took" in out.stderr
        failed = events(run_dir, "checkpoint_failed")
        assert len(failed) == 1 and failed[0]["free_bytes"] >= 0
        ckpt = run_dir / "checkpoints"
        folders = sorted(p.name for p in ckpt.iterdir() if p.is_dir())
        if room < 1:
            assert folders == [] and not (ckpt / "latest").exists()
        else:
            assert folders == ["step00000004"], f"a partial folder is left: {folders}"
            assert (ckpt / "latest").read_text() == "step00000004"
            assert failed[0]["last_checkpoint_bytes"] == sum(
                f["bytes"] for f in manifest(run_dir, "step00000004")["files"].values()
            )
        assert not list(ckpt.glob(".*tmp*")), "a temporary file is left"
        parses_line_by_line(run_dir / "events.jsonl")
        parses_line_by_line(run_dir / "metrics.jsonl")
    finally:
        subprocess.run(["umount", "-l", str(run_dir)], check=False)


@pytest.mark.slow
def test_a_new_world_size_with_an_explicit_grad_accum_is_refused_by_name(
    trained, tiny_dataset, tmp_path
):
    """Resuming a 2-process run on 1 process with `batch.grad_accum=2` would halve the global
    batch: refused, naming the global batch to set instead."""
    run_dir = copy_run(trained, tmp_path)
    before = read_jsonl(run_dir / "metrics.jsonl")
    out = train_failing(common(tiny_dataset, run_dir) + ["run.max_steps=12"], nproc=1)
    assert "global batch of 16" in out.stderr and "batch.global_batch=16" in out.stderr
    assert read_jsonl(run_dir / "metrics.jsonl") == before
