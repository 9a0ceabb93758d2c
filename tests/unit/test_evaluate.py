"""megatrain.evaluate's pieces around lm-eval and W&B: what is kept of lm-eval's results, the
summary keys, which W&B run an evaluation goes to, and errors a user can fix."""

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


def test_wandb_keys_of_tasks_and_of_perplexity():
    tasks = {"step": 20, "results": {"a": {"acc": 0.5, "perplexity": None}, "b": {"acc": 1.0}}}
    assert evaluate.wandb_numbers("tasks-step20", tasks) == {
        "eval/a/acc": 0.5,
        "eval/b/acc": 1.0,
    }
    ppl = {"data": "validation", "loss": 5.0, "perplexity": 148.4, "bits_per_byte": None}
    assert evaluate.wandb_numbers("perplexity-validation", ppl) == {
        "eval/perplexity-validation/loss": 5.0,
        "eval/perplexity-validation/perplexity": 148.4,
    }


def run_dir_with(tmp_path, *wandb_folders):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in wandb_folders:
        (run / "wandb" / name).mkdir(parents=True)
    return run


def test_the_newest_wandb_run_of_a_run_and_its_mode(tmp_path):
    assert evaluate.wandb_run(run_dir_with(tmp_path)) is None
    run = run_dir_with(
        tmp_path,
        "offline-run-20260101_100000-aaaa1111",
        "run-20260102_090000-bbbb2222",
        "offline-run-20260101_230000-cccc3333",
    )
    folder, run_id, mode = evaluate.wandb_run(run)
    assert (folder.name, run_id, mode) == ("run-20260102_090000-bbbb2222", "bbbb2222", "online")
    (run / "wandb" / "offline-run-20260103_000000-dddd4444").mkdir()
    assert evaluate.wandb_run(run)[1:] == ("dddd4444", "offline")


def test_an_exported_model_reports_to_the_run_it_came_from(tmp_path):
    run = run_dir_with(tmp_path)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"megatrain": {"run_dir": str(run)}}))
    assert evaluate.source_run(model) == run and evaluate.results_dir(model) == run / "eval"
    (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert evaluate.source_run(model) is None and evaluate.results_dir(model) == model / "eval"


def test_wandb_failing_is_one_line_not_an_error(tmp_path, monkeypatch, capsys):
    run = run_dir_with(tmp_path, "run-20260102_090000-bbbb2222")  # ran online
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    line = evaluate.log_to_wandb(run, "tasks-step20", {"results": {"a": {"acc": 0.5}}})
    assert line.startswith("megatrain eval: not logged to W&B run bbbb2222")
    assert "ConnectionError: cannot reach http://127.0.0.1:9" in line
    assert capsys.readouterr().out == line + "\n"


def test_no_wandb_run_no_line(tmp_path, capsys):
    assert evaluate.log_to_wandb(run_dir_with(tmp_path), "x", {"loss": 1.0}) is None
    assert capsys.readouterr().out == ""


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
