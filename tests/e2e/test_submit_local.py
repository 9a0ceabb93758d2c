"""`megatrain.submit.submit` without Slurm: submitit's local executor runs the tasks on this
machine."""

import pytest
import submitit

from megatrain import submit
from tests.helpers import REPO, read_jsonl


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_local_executor_trains_on_two_processes_and_returns_summaries(tiny_dataset, tmp_path):
    run = tmp_path / "run"
    job = submit.submit(
        REPO / "configs" / "tiny.yaml",
        [
            f"data.sources.0.path={tiny_dataset}",
            f"run.dir={run}",
            "data.seq_len=64",
            "batch.micro_batch=4",
            "batch.grad_accum=2",
            "precision=fp32",
            "run.max_steps=12",
            "run.log_every=1",
            "run.eval_every=0",
            "run.ckpt_every=0",
            "optim.warmup_steps=4",
        ],
        tasks_per_node=2,
        time_min=5,
        executor="local",
    )
    assert isinstance(job, submitit.local.local.LocalJob)
    summaries = job.results()
    assert [(s["steps"], s["interrupted"]) for s in summaries] == [(12, False), (12, False)]
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in metrics] == list(range(1, 13)) and metrics[-1]["loss"] == summaries[
        0
    ]["loss"]
    assert metrics[-1]["loss"] < metrics[0]["loss"] - 0.3
    names = [e["event"] for e in read_jsonl(run / "events.jsonl")]
    bookkeeping = ("run_start", "parameter_memory", "memory_vs_plan")
    assert [n for n in names if n not in bookkeeping] == [
        "checkpoint",
        "wandb_offline",
    ]
