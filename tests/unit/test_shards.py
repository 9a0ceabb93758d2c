import json

import numpy as np
import pytest

from megatrain.shards import (
    ChecksumMismatch,
    Dataset,
    FormatVersionError,
    Manifest,
    ManifestError,
    ShardError,
    token_dtype,
    write_shard,
)


def make_dataset(directory, docs_per_shard, vocab_size=1000):
    rng = np.random.default_rng(0)
    shards, all_docs = [], []
    for s, n_docs in enumerate(docs_per_shard):
        docs = [
            np.append(rng.integers(1, vocab_size, size=rng.integers(1, 50)), 0)
            for _ in range(n_docs)
        ]
        shards.append(
            write_shard(directory / f"shard-{s:05d}.arrow", docs, vocab_size, batch_documents=7)
        )
        all_docs += docs
    (directory / "tokenizer.json").write_text("{}")
    Manifest(
        vocab_size=vocab_size,
        eos_id=0,
        tokenizer_file="tokenizer.json",
        tokenizer_sha256="x",
        shards=shards,
    ).write(directory)
    return all_docs


def test_round_trip_tokens_and_document_boundaries(tmp_path):
    docs = make_dataset(tmp_path, [20, 1, 33])
    ds = Dataset(tmp_path)
    flat = np.concatenate(docs)
    assert ds.num_tokens == len(flat) == ds.manifest.num_tokens
    assert ds.manifest.num_documents == 54 and ds.manifest.dtype == "uint16"
    assert np.array_equal(ds.stream.read(0, len(flat)), flat)  # across shards and record batches
    assert np.array_equal(ds.stream.read(17, 300), flat[17:300])
    assert [len(d) for d in docs[:20]] == np.diff(ds.shards[0].doc_offsets).tolist()
    assert np.array_equal(ds.shards[2].document(5), docs[21 + 5])
    assert isinstance(ds.stream.read(0, 3), np.ndarray) and ds.stream.read(0, 3).dtype == np.uint16


def test_dtype_follows_vocabulary_size(tmp_path):
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    info = write_shard(tmp_path / "big.arrow", [np.array([70000, 5, 0])], vocab_size=100_000)
    assert info.num_tokens == 3
    with pytest.raises(ValueError, match="outside the vocabulary"):
        write_shard(tmp_path / "bad.arrow", [np.array([70000])], vocab_size=1000)


def test_corrupt_shard_is_refused(tmp_path):
    make_dataset(tmp_path, [10, 10])
    path = tmp_path / "shard-00001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="shard-00001.arrow: sha256 differs"):
        Dataset(tmp_path)


def test_truncated_or_missing_shard_is_refused(tmp_path):
    make_dataset(tmp_path, [10, 10])
    path = tmp_path / "shard-00000.arrow"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ChecksumMismatch, match="truncated or replaced"):
        Dataset(tmp_path, verify=False)  # the size check runs even without hashing
    path.unlink()
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        Dataset(tmp_path)


def test_version_mismatch_is_refused(tmp_path):
    make_dataset(tmp_path, [5])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        FormatVersionError, match="shard format version 99 but this megatrain reads version 1"
    ):
        Dataset(tmp_path)


def test_missing_or_broken_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json not found"):
        Dataset(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Dataset(tmp_path)


def test_no_temporary_files_left_behind(tmp_path):
    make_dataset(tmp_path, [3, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "shard-00000.arrow",
        "shard-00001.arrow",
        "tokenizer.json",
    ]
