"""megatrain.evaluate's pieces around lm-eval: what is kept of lm-eval's results, where results
of an exported model go, and errors a user can fix."""

import json
import math

import pytest

from megatrain import evaluate
from megatrain.errors import MegatrainError


def test_lm_eval_rows_become_plain_numbers():
    row = {
        "name": "t",
        "alias": "t",
        "sample_len": 20,
        "acc,none": 0.25,
        "acc_stderr,none": "N/A",
        "perplexity,none": math.inf,
        "exact_match,strict-match": 1,
        "flag,none": True,
    }
    assert evaluate._numbers(row) == {
        "acc": 0.25,
        "perplexity": None,
        "exact_match,strict-match": 1.0,
    }


def run_dir_with(tmp_path, *wandb_folders):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in wandb_folders:
        (run / "wandb" / name).mkdir(parents=True)
    return run


def test_an_exported_model_reports_to_the_run_it_came_from(tmp_path):
    run = run_dir_with(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"megatrain": {"run_dir": str(run)}}))
    assert evaluate.source_run(model) == run and evaluate.results_dir(model) == run / "eval"
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert evaluate.source_run(model) is None and evaluate.results_dir(model) == model / "eval"


@pytest.mark.parametrize(
    "tasks, kwargs, words",
    [
        ([" "], {}, "--tasks names no task"),
        (["megatrain_lastword_fr"], {"limit": 0}, "--limit 0"),
        (["megatrain_lastword_fr"], {"task_dir": "/nonexistent"}, "--task-dir /nonexistent"),
        (["hellaswag", "megatrain_lastword_fr"], {}, "no task hellaswag in "),
        (["megatrain_lastword_fr"], {}, "is neither a run directory"),
    ],
)
def test_task_errors_say_what_to_fix(tmp_path, monkeypatch, tasks, kwargs, words):
    for name in evaluate.OFFLINE:  # run_tasks sets them; put them back afterwards
        monkeypatch.setenv(name, "1")
    with pytest.raises(MegatrainError, match=words):
        evaluate.run_tasks(tmp_path, tasks, **kwargs)


def test_a_step_is_a_run_directory_choice(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"megatrain": {"step": 20}}))
    assert evaluate.model_directory(model, None, tmp_path) == (model, 20)
    assert evaluate.model_directory(model, 20, tmp_path) == (model, 20)
    with pytest.raises(MegatrainError, match=r"--step 7: .* \(of step 20\)"):
        evaluate.model_directory(model, 7, tmp_path)
