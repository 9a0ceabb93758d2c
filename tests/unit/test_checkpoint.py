import json

from megatrain.checkpoint import MANIFEST, complete_tags, needs_universal, prune, verify


def fake_checkpoint(root, step, files=None):
    folder = root / f"step{step:08d}"
    folder.mkdir(parents=True)
    from megatrain.files import sha256_file

    table = {}
    for name, data in (files or {"model.pt": b"weights"}).items():
        (folder / name).write_bytes(data)
        table[name] = {"sha256": sha256_file(folder / name), "bytes": len(data)}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "files": table}))
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
