import json
import os
import subprocess
import sys

import pytest

from megatrain.cli import build_parser, main
from megatrain.shards import Dataset
from tests.helpers import REPO, corpus_sample, prep_summaries


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "megatrain.cli", *args], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.parametrize(
    "command",
    [
        "prep",
        "train",
        "plan",
        "submit",
        "export",
        "generate",
        "eval",
        "report",
        "carbon",
        "config-doc",
    ],
)
def test_every_subcommand_explains_itself(command):
    out = run_cli(command, "--help")
    assert (
        out.returncode == 0
        and "usage: megatrain " + command in out.stdout
        and "example" in out.stdout
    )


def test_top_level_help_lists_subcommands():
    text = build_parser().format_help()
    assert all(c in text for c in ("prep", "train", "report")) and "examples:" in text


def test_dry_run_prints_sizes_and_batch_layout(tiny_dataset, capsys):
    assert (
        main(
            [
                "train",
                "configs/tiny.yaml",
                "--dry-run",
                "--world-size",
                "2",
                f"data.sources.0.path={tiny_dataset}",
                "batch.grad_accum=0",
                "batch.global_batch=64",
            ]
        )
        == 0
    )
    info = json.loads(capsys.readouterr().out)
    assert info["vocab_size"] == 512 and info["params"] > info["non_embedding_params"] > 0
    assert info["flops_per_token"] > 6 * info["non_embedding_params"]
    assert (info["micro_batch"], info["grad_accum"], info["dp_size"], info["global_batch"]) == (
        8,
        4,
        2,
        64,
    )


def test_dry_run_prints_the_forecast_on_a_gpu_cluster(tiny_dataset, capsys):
    """On the config's cluster: the same forecast as `megatrain plan`; on a CPU profile, the
    memory per process alone."""
    args = ["train", "configs/tiny.yaml", "--dry-run", f"data.sources.0.path={tiny_dataset}"]
    assert main([*args, "--world-size", "8", "cluster=jean-zay-h100", "precision=bf16"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plan"]["fits"] and info["plan"]["nodes"] == 2 and info["plan"]["gpu_hours"] > 0
    assert main([*args, "--world-size", "2"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "plan" not in info and info["memory_gb_per_process"]["overhead"] == 0


def test_submit_refuses_a_run_that_will_not_fit(tiny_dataset):
    """A 7B model with ZeRO-1 on one V100 node: the table, the nearest layout that fits, exit 2;
    --force submits anyway (here: --dry-run prints the Slurm parameters)."""
    args = [
        "submit",
        "configs/runs/gopher-7.1b.yaml",
        f"data.sources.0.path={tiny_dataset}",
        "model.vocab_size=32000",
        "precision=fp16",
        "parallel.zero_stage=1",
        "--cluster",
        "jean-zay-v100",
        "--dry-run",
    ]
    out = run_cli(*args)
    assert out.returncode == 2 and "DOES NOT FIT" in out.stderr
    assert "the nearest layout that does on 1 node(s): {" in out.stderr and "--force" in out.stderr
    forced = run_cli(*args, "--force")
    assert forced.returncode == 0 and json.loads(forced.stdout)["nodes"] == 1


def test_config_errors_are_one_line_without_traceback():
    out = run_cli("train", "configs/tiny.yaml", "optim.weight_decy=1", "--dry-run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown key 'optim.weight_decy'" in out.stderr and "did you mean" in out.stderr


def test_docs_config_md_is_up_to_date():
    from megatrain.config import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(), (
        "run `megatrain config-doc --out docs/config.md`"
    )


# What Slurm sets for task `rank` of 2: in a job array, and in an srun step without MPI.
SLURM_TASK = {
    "array": lambda rank: {
        "SLURM_ARRAY_JOB_ID": "4242",
        "SLURM_ARRAY_TASK_ID": str(rank),
        "SLURM_ARRAY_TASK_COUNT": "2",
        "SLURM_ARRAY_TASK_MIN": "0",
    },
    "srun": lambda rank: {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(rank),
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": str(rank),
    },
}


@pytest.mark.parametrize("launcher", ["array", "srun"])
def test_slurm_tasks_print_one_summary(tmp_path, launcher):
    """Both tasks run at once, as Slurm starts them; only rank 0 prints the closing line."""
    raw = corpus_sample(tmp_path / "raw", docs_per_language=10)
    out = tmp_path / "out"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PMI", "OMPI_", "MPI_")) and k not in ("RANK", "WORLD_SIZE")
    }
    cmd = [sys.executable, "-m", "megatrain.cli", "prep", str(raw), "--out", str(out)]
    tasks = [
        subprocess.Popen(
            [*cmd, "--vocab-size", "300"],
            cwd=REPO,
            env={**env, **SLURM_TASK[launcher](rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [task.communicate(timeout=300) for task in tasks]
    assert [task.returncode for task in tasks] == [0, 0], outputs
    stdout = "".join(o for o, _ in outputs)
    assert prep_summaries(stdout) == 1 and "on 2 worker(s)" in stdout
    report = json.loads((out / "report.json").read_text())
    assert Dataset(out).manifest.num_documents == report["docs_out"] > 0
    assert report["workers"] == 2 and not (out / ".prep-work").exists()
