"""Readers (units of work, bad input, byte accounting) and recipes."""

import bz2
import gzip
import json
import lzma
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep.launch import acquire_lock, run_prep
from data_prep.pipeline import assign_units
from data_prep.readers import (
    ByteCounts,
    Unit,
    binary_reason,
    bytes_closes,
    expand_inputs,
    plan_units,
    read_documents,
    read_unit,
    skip_reason,
)
from data_prep.recipe import load_recipe, parse_recipe
from data_prep.state import PrepError, PrepOptions
from megatrain.schema import ConfigError
from tests.helpers import CORPUS


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


def corpus_texts(lang: str = "en") -> list[str]:
    with gzip.open(CORPUS / f"{lang}.jsonl.gz", "rt") as f:
        return [json.loads(line)["text"] for line in f]


def read_with_ledger(path, **kw):
    ledger, rejects = ByteCounts(), []
    docs = list(
        read_unit(
            Unit(0, str(path), path.stat().st_size),
            lambda loc, why: rejects.append((loc, why)),
            ledger=ledger,
            **kw,
        )
    )
    return docs, rejects, ledger


def _zstd(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


@pytest.mark.parametrize(
    "ext, compress",
    [
        (".gz", gzip.compress),
        (".zst", _zstd),
        (".xz", lzma.compress),
        (".bz2", lambda b: bz2.compress(b, compresslevel=1)),  # 100 kB blocks: bz2's unit
    ],
)
def test_truncated_archive_keeps_the_whole_documents_before_the_damage(tmp_path, ext, compress):
    texts = corpus_texts()[:40]
    data = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    whole = compress(data)
    path = tmp_path / f"a.jsonl{ext}"
    path.write_bytes(whole[: len(whole) * 3 // 4])  # cut a real archive
    docs, rejects, ledger = read_with_ledger(path)
    kept = len(docs)
    assert 0 < kept < 40 and [d.text for d in docs] == texts[:kept]  # whole ones, in order
    [(where, why)] = rejects
    assert where == f"{path}:{kept + 1}" and why.startswith("truncated_or_corrupt_archive")
    [damage] = ledger.files
    assert damage["path"] == str(path) and damage["documents_kept"] == kept
    assert damage["compressed_offset"] == path.stat().st_size  # cut at the end: all was read
    assert 0 < damage["partial_bytes"] < len(json.dumps({"text": texts[kept]})) + 1
    assert damage["decompressed_offset"] == ledger.decoded < len(data)
    assert ledger.partial == damage["partial_bytes"] and ledger.documents + ledger.partial == (
        ledger.decoded
    )
    assert bytes_closes(ledger.as_dict(), path.stat().st_size)


def test_corrupt_archive_is_located_and_its_rest_counted(tmp_path):
    texts = corpus_texts()[:40]
    first = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[:20]).encode())
    rest = gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts[20:]).encode())
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(first + b"\x1f\x8b\x09" + rest[3:])  # the second member's header broken
    docs, rejects, ledger = read_with_ledger(path)
    assert [d.text for d in docs] == texts[:20]
    [damage] = ledger.files
    size = path.stat().st_size
    assert damage["compressed_offset"] == ledger.read == len(first)
    assert damage["bytes"] == ledger.skipped["truncated_or_corrupt_archive"] == size - len(first)
    assert damage["partial_bytes"] == 0 and bytes_closes(ledger.as_dict(), size)
    assert "zlib.error" in rejects[0][1] and rejects[0][0] == f"{path}:21"
    (tmp_path / "b.jsonl.gz").write_text(json.dumps({"text": "not gzip at all"}) + "\n")
    docs, rejects, ledger = read_with_ledger(tmp_path / "b.jsonl.gz")
    assert docs == [] and ledger.skipped == {"truncated_or_corrupt_archive": 28}  # all of it
    assert ledger.read == 0 and "incorrect header check" in rejects[0][1]


def test_truncated_txt_drops_only_the_cut_block(tmp_path):
    text = "".join(f"paragraph {i}\n" + "words and more words\n" * 200 + "\n" for i in range(20))
    whole = gzip.compress(text.encode())
    path = tmp_path / "a.txt.gz"
    path.write_bytes(whole[: len(whole) // 2])
    blocks, _, ledger = read_with_ledger(path, txt_split="paragraph")
    assert 0 < len(blocks) < 20 and all(d.text.count("\n") == 201 for d in blocks)
    assert ledger.partial > 0 and bytes_closes(ledger.as_dict(), path.stat().st_size)
    docs, rejects, ledger = read_with_ledger(path)  # one document per file: the file is cut
    assert docs == [] and ledger.partial == ledger.decoded > 0
    assert "0 document(s) before it kept" in rejects[0][1]


def test_binary_files_are_told_from_text():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    assert binary_reason(noise).startswith("NUL byte")
    no_nul = noise.replace(b"\0", b"x")[:4000]
    assert "invalid UTF-8 or control characters" in binary_reason(no_nul)
    assert binary_reason(b"") == binary_reason(b"plain\ttext\r\n\x0c\x1b[1m") == ""


def test_the_bundled_corpus_is_text_by_the_binary_rule():
    """No file of corpus/ and none of its documents, in UTF-8 or in Latin-1, is called binary."""
    for lang in ("en", "fr"):
        assert skip_reason(CORPUS / f"{lang}.jsonl.gz") == ""
        for text in corpus_texts(lang):
            assert binary_reason(text.encode()) == "", text[:80]
            assert binary_reason(text.encode("latin-1", "replace")) == "", text[:80]


def test_binary_files_and_dangling_symlinks_are_planned_as_skips(tmp_path):
    (tmp_path / "ok.txt").write_text("un texte en français, déjà lu à l'été\n")
    (tmp_path / "noise.txt").write_bytes(os.urandom(1 << 20))
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "dangling.jsonl")
    units = {Path(u.path).name: u for u in plan_units(expand_inputs([str(tmp_path)]), 1 << 20)}
    assert units["ok.txt"].skip == ""
    assert units["noise.txt"].skip.startswith("binary_file: NUL byte at offset")
    assert units["noise.txt"].size == 1 << 20
    assert units["dangling.jsonl"].skip == f"unreadable: dangling symlink to {tmp_path}/gone.jsonl"
    ledger, rejects = ByteCounts(), []
    for name in ("noise.txt", "dangling.jsonl"):
        assert list(read_unit(units[name], lambda *r: rejects.append(r), ledger=ledger)) == []
    assert [r[0] for r in rejects] == [
        str(tmp_path / "noise.txt"),
        str(tmp_path / "dangling.jsonl"),
    ]
    assert ledger.skipped == {"binary_file": 1 << 20, "unreadable": 0} and ledger.decoded == 0
