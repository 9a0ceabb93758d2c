"""The spine end to end: prepared shards -> 2-process DeepSpeed ZeRO-2 training -> checkpoint
-> exact resume."""

import json
import subprocess
import sys

import pytest

from tests.helpers import REPO, losses, read_jsonl, run_train

TINY = REPO / "configs" / "tiny.yaml"


@pytest.mark.slow
def test_zero2_on_two_processes_trains_checkpoints_and_resumes_exactly(tiny_dataset, tmp_path):
    common = [
        f"data.sources.0.path={tiny_dataset}",
        "data.seq_len=64",
        "batch.micro_batch=4",
        "batch.grad_accum=2",
        "parallel.zero_stage=2",
        "precision=fp32",
        "run.max_steps=16",
        "run.log_every=1",
        "run.eval_every=8",
        "run.ckpt_every=8",
        "optim.warmup_steps=4",
        "optim.lr=1e-2",
    ]
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(TINY, common + [f"run.dir={full}"])
    run_train(TINY, common + [f"run.dir={part}", "run.stop_at_step=8"])
    out = run_train(TINY, common + [f"run.dir={part}"])

    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 17))
    assert a[16] < a[1] - 0.5, f"loss did not fall: {a}"
    assert all(a[s] == b[s] for s in range(1, 17)), (
        "resumed run diverged from the uninterrupted one:\n"
        + "\n".join(f"{s}: {a[s]!r} {b[s]!r}" for s in a)
    )
    val = [r["val_loss"] for r in read_jsonl(full / "metrics.jsonl") if "val_loss" in r]
    val_resumed = [r["val_loss"] for r in read_jsonl(part / "metrics.jsonl") if "val_loss" in r]
    assert val == val_resumed and len(val) == 2

    events = read_jsonl(part / "events.jsonl")
    assert {"event": "resumed", "tag": "step00000008", "step": 8}.items() <= next(
        e for e in events if e["event"] == "resumed"
    ).items()
    assert "resumed" in out.stdout or "step00000008" in out.stdout
    assert (part / "checkpoints" / "latest").read_text() == "step00000016"
    manifest = json.loads(
        (part / "checkpoints" / "step00000016" / "megatrain-checkpoint.json").read_text()
    )
    assert manifest["consumed_samples"] == 16 * 16 and manifest["files"]
    assert list(part.glob("wandb/offline-run-*/run-*.wandb")), "no offline W&B run"
    part_records = read_jsonl(part / "metrics.jsonl")
    for key in (
        "energy_kwh_it",
        "gpu_hours",
    ):  # cumulative over the jobs of a run, not restarted per job
        values = [r[key] for r in part_records]
        assert [r["step"] for r in part_records] == list(range(1, 17)) and values == sorted(
            values
        ), key
    record = part_records[-1]
    assert (
        record["energy_method"] in ("estimate", "rapl")
        and record["co2_kg"] > 0
        and record["tokens_per_s"] > 0
    )

    report = subprocess.run(
        [sys.executable, "-m", "megatrain.cli", "report", str(full)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "loss" in report.stdout and (full / "report" / "loss.png").stat().st_size > 10_000
