import json
import subprocess
import sys

import pytest

from megatrain.cli import build_parser, main
from tests.helpers import REPO


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "megatrain.cli", *args], capture_output=True, text=True, cwd=REPO
    )


@pytest.mark.parametrize("command", ["prep", "train", "submit", "report", "carbon", "config-doc"])
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


def test_config_errors_are_one_line_without_traceback():
    out = run_cli("train", "configs/tiny.yaml", "optim.weight_decy=1", "--dry-run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "unknown key 'optim.weight_decy'" in out.stderr and "did you mean" in out.stderr


def test_docs_config_md_is_up_to_date():
    from megatrain.config import config_reference

    assert (REPO / "docs" / "config.md").read_text() == config_reference(), (
        "run `megatrain config-doc --out docs/config.md`"
    )
