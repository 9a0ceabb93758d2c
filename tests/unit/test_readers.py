"""Readers (units of work, bad input) and recipes."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.launch import acquire_lock, run_prep
from data_prep.pipeline import assign_units
from data_prep.readers import Unit, plan_units, read_documents, read_unit
from data_prep.recipe import load_recipe, parse_recipe
from data_prep.state import PrepError, PrepOptions
from megatrain.schema import ConfigError


def collect(unit, **kw):
    rejects = []
    docs = [
        (d.source, d.text)
        for d in read_unit(unit, lambda loc, why: rejects.append((loc, why)), **kw)
    ]
    return docs, rejects


def test_big_jsonl_is_cut_at_line_starts_into_units_that_read_the_same(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": f"document {i} " + "x" * (i % 50)}) for i in range(300)]
    lines[123] = "{broken"
    path.write_text("\n".join(lines))  # no newline at the end
    units = plan_units([path], unit_bytes=1000)
    assert len(units) > 5 and [u.index for u in units] == list(range(len(units)))
    assert units[0].start == 0 and all(a.stop == b.start for a, b in zip(units, units[1:]))
    assert units[-1].stop == path.stat().st_size
    whole = collect(Unit(0, str(path), path.stat().st_size))
    parts = [collect(u) for u in units]
    assert [d for p in parts for d in p[0]] == whole[0]  # same documents, same file:line
    assert [r for p in parts for r in p[1]] == whole[1] == [(f"{path}:124", whole[1][0][1])]


def test_huge_line_is_skipped_by_line_number(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(
        json.dumps({"text": "ok 1"})
        + "\n"
        + json.dumps({"text": "y" * 5000})
        + "\n"
        + json.dumps({"text": "ok 3"})
        + "\n"
    )
    docs, rejects = collect(Unit(0, str(path), 1), max_chars=100)
    assert [t for _, t in docs] == ["ok 1", "ok 3"]
    assert [(loc, why.split(":")[0]) for loc, why in rejects] == [(f"{path}:2", "too_long")]


def test_txt_split_by_file_or_paragraph(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first block\nstill first\n\n\nsecond block\n")
    whole = [d.text for d in read_documents(path, lambda *_: None)]
    assert whole == ["first block\nstill first\n\n\nsecond block\n"]
    blocks = [
        (d.source, d.text) for d in read_documents(path, lambda *_: None, txt_split="paragraph")
    ]
    assert blocks == [(f"{path}:1", "first block\nstill first\n"), (f"{path}:5", "second block\n")]


def test_parquet_row_groups_become_units(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(
        pa.table({"text": [f"row {i} " * 50 for i in range(40)]}), path, row_group_size=10
    )
    units = plan_units([path], unit_bytes=500)
    assert len(units) == 4 and [u.first_line for u in units] == [0, 10, 20, 30]
    rows = [d for u in units for d in collect(u)[0]]
    assert [s for s, _ in rows] == [f"{path}:{i}" for i in range(40)]


def test_recipe_refuses_unknown_keys_by_name(tmp_path):
    with pytest.raises(
        ConfigError,
        match="unknown key 'dedup.near.shingle'; did you mean 'dedup.near.shingle_size'",
    ):
        parse_recipe({"dedup": {"near": {"shingle": 3}}})
    with pytest.raises(ConfigError, match="'output.shard_tokens' should be a number"):
        parse_recipe({"output": {"shard_tokens": "lots"}})
    assert parse_recipe({"dedup": {"near": True}}).dedup.near.enabled
    with pytest.raises(ConfigError, match=r"filters\[0\] \(quality\).*min_word"):
        parse_recipe({"filters": [{"name": "quality", "min_word": 3}]})
    with pytest.raises(ConfigError, match="not a multiple of bands"):
        parse_recipe({"dedup": {"near": {"num_perm": 100, "bands": 14}}})
    recipe = parse_recipe({"dedup": {"near": {"enabled": True, "num_perm": 128, "bands": 16}}})
    assert recipe.dedup.near.rows == 8 and recipe.tokenizer.special_tokens[0] == "<|endoftext|>"
    (tmp_path / "r.yaml").write_text("filters: [\n")
    with pytest.raises(ConfigError, match="r.yaml: invalid YAML"):
        load_recipe(tmp_path / "r.yaml")
    assert len(load_recipe("configs/data/fr-en.yaml").build_filters()) == 4


def test_units_are_dealt_by_size_whatever_the_order():
    units = [Unit(i, "f", size) for i, size in enumerate([5, 100, 7, 60, 40, 1])]
    assert assign_units(units, 2) == [[1, 2], [0, 3, 4, 5]]  # loads 107 and 106
    assert sorted(u for part in assign_units(units, 4) for u in part) == list(range(6))


def test_a_second_run_cannot_write_into_the_same_output(tmp_path):
    fd = acquire_lock(tmp_path / "out")  # as a running prep holds it
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    with pytest.raises(PrepError, match="is being written by another `megatrain prep` .pid"):
        run_prep(
            PrepOptions(inputs=[str(tmp_path / "a.jsonl")], out=str(tmp_path / "out")),
            log=lambda *_: None,
        )
    os.close(fd)
    run_prep(
        PrepOptions(inputs=[str(tmp_path / "a.jsonl")], out=str(tmp_path / "out")),
        log=lambda *_: None,
    )
