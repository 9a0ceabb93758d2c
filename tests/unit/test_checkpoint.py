import json

import pytest

from megatrain.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    check_global_batch,
    complete_tags,
    find_resumable,
    needs_universal,
    prune,
    supersede,
    verify,
)


def fake_checkpoint(root, step, files=None, lineage=None):
    folder = root / f"step{step:08d}"
    folder.mkdir(parents=True)
    from megatrain.files import sha256_file

    table = {}
    for name, data in (files or {"model.pt": b"weights"}).items():
        (folder / name).write_bytes(data)
        table[name] = {"sha256": sha256_file(folder / name), "bytes": len(data)}
    manifest = {"step": step, "files": table}
    if lineage:
        manifest["lineage"] = lineage
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_prune_keeps_the_newest_and_the_permanent_ones(tmp_path):
    for step in range(100, 1100, 100):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "step00001100").mkdir()  # an unfinished save: no manifest, never a checkpoint
    prune(tmp_path, keep=3, keep_every=500)
    assert complete_tags(tmp_path) == [
        "step00000500",
        "step00000800",
        "step00000900",
        "step00001000",
    ]


def test_verify_names_the_missing_or_corrupt_file(tmp_path):
    folder = fake_checkpoint(tmp_path, 10, {"a.pt": b"aaaa", "b.pt": b"bbbb"})
    assert verify(folder) is None
    (folder / "a.pt").write_bytes(b"aaab")
    (folder / "b.pt").unlink()
    problem = verify(folder)
    assert "a.pt is corrupt" in problem and "b.pt is missing" in problem


def test_layout_changes_that_need_a_universal_checkpoint():
    saved = {"layout": {"dp_size": 4, "tp_size": 1, "zero_stage": 2}}
    assert not needs_universal(saved, dp_size=4, tp_size=1, zero_stage=2)
    assert needs_universal(saved, dp_size=2, tp_size=1, zero_stage=2)
    assert needs_universal(saved, dp_size=2, tp_size=2, zero_stage=2)
    assert needs_universal(saved, dp_size=4, tp_size=1, zero_stage=3)
    zero0 = {"layout": {"dp_size": 4, "tp_size": 1, "zero_stage": 0}}
    assert not needs_universal(
        zero0, dp_size=1, tp_size=1, zero_stage=0
    )  # whole states load anywhere


def test_prune_deletes_only_the_current_lineage_and_never_the_new_checkpoint(tmp_path):
    for step in (20, 30):
        fake_checkpoint(tmp_path, step, lineage="old")
    fake_checkpoint(tmp_path, 10, lineage="new")
    prune(tmp_path, keep=2, lineage="new", spare="step00000010")
    assert complete_tags(tmp_path) == ["step00000010", "step00000020", "step00000030"]
    fake_checkpoint(tmp_path, 11, lineage="new")
    fake_checkpoint(tmp_path, 12, lineage="new")
    prune(tmp_path, keep=2, lineage="new", spare="step00000012")
    assert complete_tags(tmp_path) == [
        "step00000011",
        "step00000012",
        "step00000020",
        "step00000030",
    ]


def test_resume_follows_the_lineage_latest_names(tmp_path):
    for step in (20, 30):
        fake_checkpoint(tmp_path, step, lineage="old")
    fake_checkpoint(tmp_path, 10, lineage="new")
    (tmp_path / LATEST).write_text("step00000010")
    tag, manifest = find_resumable(tmp_path, log=lambda e: None)
    assert tag == "step00000010" and manifest["lineage"] == "new"
    assert find_resumable(tmp_path, log=lambda e: None, lineage="old")[0] == "step00000030"


def test_supersede_moves_an_old_run_aside(tmp_path):
    ckpt = tmp_path / "checkpoints"
    fake_checkpoint(ckpt, 30, lineage="old")
    (ckpt / LATEST).write_text("step00000030")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    logged = []
    dest = supersede(ckpt, logged.append, also=(tmp_path / "metrics.jsonl",))
    assert complete_tags(ckpt) == [] and not (ckpt / LATEST).exists()
    assert (dest / "step00000030" / MANIFEST).exists() and (dest / "metrics.jsonl").exists()
    assert logged[0]["event"] == "checkpoints_superseded" and logged[0]["moved"] == 3
    assert find_resumable(ckpt, log=logged.append) is None  # a fresh start
    assert supersede(ckpt, logged.append) is None  # nothing left to move


def test_every_checkpoint_failing_is_a_named_error_listing_each(tmp_path):
    fake_checkpoint(tmp_path, 5, {"a.pt": b"aaaa"})
    (tmp_path / "step00000005" / "a.pt").write_bytes(b"aaab")
    folder = fake_checkpoint(tmp_path, 10)
    (folder / MANIFEST).write_text(json.dumps({"step": 10}))  # no files table
    (tmp_path / "step00000015").mkdir()  # an interrupted save
    logged = []
    with pytest.raises(CheckpointError) as e:
        find_resumable(tmp_path, log=logged.append)
    message = str(e.value)
    assert "step00000005" in message and "a.pt is corrupt" in message
    assert "step00000010" in message and "no 'files' table" in message
    assert "run.resume=never" in message
    assert {r["tag"] for r in logged if r["event"] == "checkpoint_rejected"} == {
        "step00000005",
        "step00000010",
        "step00000015",
    }


def test_a_folder_without_manifest_alone_is_a_fresh_start_with_an_event(tmp_path):
    (tmp_path / "step00000005").mkdir()
    (tmp_path / "step00000005-universal").mkdir()  # a conversion, not a checkpoint
    logged = []
    assert find_resumable(tmp_path, log=logged.append) is None
    assert [r["tag"] for r in logged] == ["step00000005"]


def test_a_changed_global_batch_is_refused_by_name():
    manifest = {"tag": "step00000010", "layout": {"dp_size": 2, "global_batch": 16}}
    check_global_batch(manifest, 16)
    with pytest.raises(CheckpointError, match="batch.global_batch=16"):
        check_global_batch(manifest, 8)
    older = {"layout": {"dp_size": 2}, "config": {"batch": {"micro_batch": 4, "grad_accum": 2}}}
    with pytest.raises(CheckpointError, match="global batch of 16"):
        check_global_batch(older, 8)
    check_global_batch({"layout": {"dp_size": 2}, "config": {"batch": {"grad_accum": 0}}}, 8)
