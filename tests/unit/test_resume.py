"""What a resume may find changed (megatrain/resume.py): the comparison, the named refusal,
the override."""

from dataclasses import asdict

import pytest

from megatrain.config import Config, ConfigError, load_config
from megatrain.resume import ResumeError, changes, check_resume, fingerprint, resume_event
from tests.helpers import REPO

TINY = REPO / "configs" / "tiny.yaml"


def run(*overrides: str, data: list[dict] | None = None) -> dict:
    cfg = load_config(TINY, list(overrides))
    return {"config": asdict(cfg), "data": data if data is not None else [source()]}


def source(fp: str = "a" * 64, tok: str = "1" * 64, weight: float = 1.0, path="data/x") -> dict:
    return {
        "path": path,
        "weight": weight,
        "tokenizer_sha256": tok,
        "fingerprint": fp,
        "num_tokens": 1000,
    }


def test_the_same_run_has_no_changes_and_jobs_may_change_their_cadence_and_layout():
    assert changes(run(), run()) == []
    later = run(
        "run.max_steps=900",
        "run.log_every=1",
        "run.ckpt_every=5",
        "run.eval_every=7",
        "parallel.tensor=2",
        "parallel.zero_stage=1",
        "wandb.mode=disabled",
        "data.prefetch=4",
        "run.allow_changes=[optim]",
    )
    assert check_resume(run(), later, [], "ckpt") == []


def test_a_moved_dataset_with_the_same_contents_is_no_change():
    moved = run(data=[source(path="/elsewhere/x")])
    assert changes(run(), moved) == []


def test_learning_rate_and_seed_are_refused_by_name_then_allowed_by_the_override():
    new = run("optim.lr=1e-2", "run.seed=7")
    with pytest.raises(ResumeError) as e:
        check_resume(run(), new, [], "RUN/checkpoints/step00000010")
    message = str(e.value)
    assert "RUN/checkpoints/step00000010" in message
    assert "optim.lr 0.003 -> 0.01" in message and "run.seed 1234 -> 7" in message
    assert "run.allow_changes=[optim.lr,run.seed]" in message and "\n" not in message
    with pytest.raises(ResumeError, match="run.seed"):
        check_resume(run(), new, ["optim.lr"], "ckpt")
    found = check_resume(run(), new, ["optim", "run.seed"], "ckpt")  # a section allows its keys
    assert [(c.key, c.old, c.new) for c in found] == [
        ("optim.lr", 3e-3, 1e-2),
        ("run.seed", 1234, 7),
    ]
    event = resume_event(found, "step00000010", ["optim", "run.seed"])
    assert event["event"] == "resume_changes" and event["changes"][0]["key"] == "optim.lr"


def test_batch_and_sequence_length_are_checked():
    found = changes(run(), run("batch.micro_batch=4", "data.seq_len=64"))
    assert {c.key for c in found} == {"batch.micro_batch", "data.seq_len"}


@pytest.mark.parametrize("override", ["model.d_model=64", "model.n_layer=3", "precision=bf16"])
def test_the_model_shape_and_precision_are_never_allowed(override):
    overrides = [override] + (["parallel.zero_stage=1"] if "precision" in override else [])
    allow = ["optim", "data", "tokenizer", "batch", "run.seed"]
    with pytest.raises(ResumeError, match="start a new run.dir") as e:
        check_resume(run(), run(*overrides), allow, "ckpt")
    assert override.split("=")[0] in str(e.value) and "allow_changes" not in str(e.value)


def test_another_tokenizer_and_data_are_refused_then_allowed_together():
    other = run(data=[source(fp="b" * 64, tok="2" * 64)])
    with pytest.raises(ResumeError) as e:
        check_resume(run(), other, ["data"], "ckpt")
    assert "tokenizer 111111111111 -> 222222222222" in str(e.value)
    assert "run.allow_changes=[tokenizer]" in str(e.value)
    found = check_resume(run(), other, ["data", "tokenizer"], "ckpt")
    assert {c.key for c in found} == {"data", "tokenizer"}


def test_a_new_source_or_weight_is_a_data_change():
    two = run(data=[source(), source(fp="c" * 64, path="data/y")])
    assert [c.key for c in changes(run(), two)] == ["data"]
    reweighted = run(data=[source(weight=2.0)])
    assert [c.key for c in changes(run(), reweighted)] == ["data"]


def test_a_checkpoint_without_data_records_compares_only_its_config():
    old = run()
    del old["data"]
    assert changes(old, run(data=[source(fp="d" * 64)])) == []
    assert [c.key for c in changes(old, run("optim.lr=1e-2"))] == ["optim.lr"]


def test_fingerprint_depends_on_every_shard_and_their_order():
    assert fingerprint(["a", "b"]) != fingerprint(["b", "a"]) != fingerprint(["a"])


def test_allow_changes_names_are_checked_at_load():
    with pytest.raises(ConfigError, match="'run.allow_changes' names 'model.d_model'"):
        load_config(TINY, ["run.allow_changes=[model.d_model]"])
    assert Config().run.allow_changes == []
