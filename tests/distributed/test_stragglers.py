"""Straggler detection on 2 CPU processes with real DeepSpeed (gloo): rank 1, slowed by the
injector, is the slowest rank of every record and is named in one `straggler` event. (That an
unslowed run names no straggler is checked on test_trainer.py's ZeRO runs.)"""

import pytest

from tests.helpers import REPO, events, read_jsonl, run_train

TINY = REPO / "configs" / "tiny.yaml"
pytestmark = pytest.mark.slow


def test_a_slowed_rank_is_named_once_with_its_host(tiny_dataset, tmp_path):
    overrides = {
        "data.sources.0.path": tiny_dataset,
        "data.seq_len": 64,
        "batch.micro_batch": 4,
        "batch.grad_accum": 1,
        "precision": "fp32",
        "parallel.zero_stage": 1,
        "run.max_steps": 8,
        "run.log_every": 1,
        "run.straggler_factor": 1.5,
        "run.straggler_intervals": 3,
        "wandb.mode": "disabled",
        "run.dir": tmp_path,
    }
    # rank 1's forward sleeps 0.1 s: ~20x its own work, a ratio to the median near 2 (2 ranks)
    out = run_train(
        TINY,
        [f"{k}={v}" for k, v in overrides.items()],
        env={"MEGATRAIN_INJECT_SLOW_RANK": "1:0.1"},
    )
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["slowest_rank"] for r in records] == [1] * 8
    assert min(r["slowest_rank_ratio"] for r in records) > 1.5
    (event,) = events(tmp_path, "straggler")  # once, though slow in all 8 intervals
    assert (event["rank"], event["step"]) == (1, 3)  # the 3rd slow interval in a row
    assert event["ratio"] > 1.5 and event["host"]
    assert event["forward_s"] >= 0.1 > event["median_forward_s"]
    assert not events(tmp_path, "straggler_recovered")
    assert out.stdout.count("event=straggler ") == 1  # and one console line
