"""Tests for data_prep.dedup: exact and MinHash/LSH near-duplicate detection across workers.

The key property: splitting the same documents across 1, 2 or 3 workers, or in any order with
explicit order keys, gives the same kept documents, and the same input gives the same hashes in
any process (no PYTHONHASHSEED)."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from data_prep.dedup import (
    MinHashConfig,
    MinHasher,
    _cluster_roots,
    candidate_probability,
    estimated_jaccard,
    exact_hashes,
    resolve_exact,
    resolve_near_duplicates,
    text_hash,
)


def make_docs(n, seed=0, words=400):
    """n unrelated documents of random words from a 2000-word made-up vocabulary."""
    rng = random.Random(seed)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(6)) for _ in range(2000)
    ]
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def edit_words(text, n_changes, seed):
    """The same text with n_changes words replaced."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = "changed"
    return " ".join(words)


def split_into(arrays, n_workers):
    """Cut one array into n_workers contiguous chunks (like workers reading consecutive files)."""
    return np.array_split(arrays, n_workers)


def kept(masks):
    return np.flatnonzero(np.concatenate(masks)).tolist()


# ----------------------------------------------------------------------------------------------
# Exact


def test_text_hash_is_pinned():
    # blake2b-64 of the UTF-8 bytes: must never change, or old hash files stop matching new ones.
    assert text_hash("hello world") == 0x50B1A332AA338687
    assert exact_hashes(["hello world"]).dtype == np.uint64


def test_exact_dedup_across_workers():
    docs = make_docs(12, words=20)
    # Duplicates planted so that copies land in different workers for every split below.
    docs[5], docs[9], docs[11] = docs[0], docs[0], docs[3]
    hashes = exact_hashes(docs)
    expected = [i for i in range(12) if i not in (5, 9, 11)]
    for n_workers in (1, 2, 3):
        masks = resolve_exact(split_into(hashes, n_workers))
        assert [len(m) for m in masks] == [len(h) for h in split_into(hashes, n_workers)]
        assert kept(masks) == expected


def test_exact_dedup_with_order_keys_is_independent_of_assignment():
    docs = make_docs(10, words=20)
    docs[7] = docs[2]
    hashes = exact_hashes(docs)
    keys = np.arange(10, dtype=np.uint64) * 1000  # e.g. (file index << 32) | line
    # Round-robin over 3 workers: worker w gets docs w, w+3, ...; doc 2 still wins over doc 7.
    parts = [np.arange(w, 10, 3) for w in range(3)]
    masks = resolve_exact([hashes[p] for p in parts], [keys[p] for p in parts])
    dropped = [int(i) for p, m in zip(parts, masks) for i in p[~m]]
    assert dropped == [7]
    # Reversing the global order makes the later copy win.
    masks = resolve_exact([hashes[p] for p in parts], [(10_000 - keys[p]) for p in parts])
    assert [int(i) for p, m in zip(parts, masks) for i in p[~m]] == [2]
    with pytest.raises(ValueError, match="unique"):
        resolve_exact([hashes], [np.zeros(10, dtype=np.uint64)])


def test_exact_dedup_empty():
    assert [len(m) for m in resolve_exact([np.zeros(0, np.uint64)] * 2)] == [0, 0]


# ----------------------------------------------------------------------------------------------
# MinHash / LSH


def test_lsh_parameters():
    cfg = MinHashConfig()
    assert (cfg.shingle_size, cfg.num_perm) == (5, 112)
    assert cfg.threshold == pytest.approx(0.719, abs=0.001)
    assert candidate_probability(0.9, 14, 8) > 0.99
    assert candidate_probability(0.3, 14, 8) < 0.001


def test_signature_estimates_jaccard():
    hasher = MinHasher(MinHashConfig(bands=32, rows=8))  # 256 hashes: a tighter estimate
    a = make_docs(1, seed=1)[0]
    b = edit_words(a, 20, seed=2)
    shingles = [{tuple(t.split()[i : i + 5]) for i in range(len(t.split()) - 4)} for t in (a, b)]
    true = len(shingles[0] & shingles[1]) / len(shingles[0] | shingles[1])
    estimate = estimated_jaccard(hasher.signature(a), hasher.signature(b))
    assert abs(estimate - true) < 0.1
    assert hasher.signature(a).dtype == np.uint32


def test_near_dedup_catches_edited_copies_only():
    hasher = MinHasher()
    docs = make_docs(30, seed=3)
    docs[12] = edit_words(docs[4], 3, seed=4)  # 3 of 400 words changed: Jaccard ~0.93
    docs[25] = docs[4].upper() + " !"  # case and punctuation are ignored by the shingles
    docs[20] = edit_words(docs[7], 4, seed=5)
    keys = hasher.band_keys(hasher.signatures(docs))
    assert keys.shape == (30, 14) and keys.dtype == np.uint64
    expected = [i for i in range(30) if i not in (12, 20, 25)]
    for n_workers in (1, 2, 3):
        assert kept(resolve_near_duplicates(split_into(keys, n_workers))) == expected


def test_near_dedup_clusters_are_transitive_and_keep_the_first():
    # A ~ B and B ~ C but A and C differ more: one cluster, represented by A (lowest index).
    a = make_docs(1, seed=6, words=600)[0]
    b = edit_words(a, 6, seed=7)
    c = edit_words(b, 6, seed=8)
    hasher = MinHasher()
    keys = hasher.band_keys(hasher.signatures([c, *make_docs(5, seed=9), a, b]))
    assert kept(resolve_near_duplicates([keys])) == [0, 1, 2, 3, 4, 5]  # c came first
    # With explicit order keys putting a first, a is kept instead.
    order = np.array([7, 1, 2, 3, 4, 5, 0, 6], dtype=np.uint64)
    assert kept(resolve_near_duplicates([keys], [order])) == [1, 2, 3, 4, 5, 6]


def test_cluster_roots_matches_a_plain_union_find():
    rng = np.random.default_rng(0)
    n = 500
    u, v = rng.integers(0, n, 300), rng.integers(0, n, 300)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x

    for a, b in zip(u.tolist(), v.tolist()):
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    assert _cluster_roots(n, u, v).tolist() == [find(x) for x in range(n)]


def test_short_and_empty_texts():
    hasher = MinHasher()
    assert len(hasher.shingle_hashes("two words")) == 1  # shorter than a shingle: one shingle
    assert (hasher.signature("") == 0xFFFFFFFF).all()
    assert hasher.signatures([]).shape == (0, 112)
    with pytest.raises(ValueError, match="shape"):
        hasher.band_keys(np.zeros((2, 10), dtype=np.uint32))


def test_hashes_are_identical_in_other_processes():
    """Same input -> same hashes in a fresh interpreter, whatever PYTHONHASHSEED is."""
    text = make_docs(1, seed=10, words=50)[0]
    hasher = MinHasher()
    here = {
        "exact": int(exact_hashes([text])[0]),
        "keys": hasher.band_keys(hasher.signatures([text]))[0].tolist(),
    }
    code = (
        "import json, sys; from data_prep.dedup import MinHasher, exact_hashes\n"
        "t = sys.stdin.read(); h = MinHasher()\n"
        "print(json.dumps({'exact': int(exact_hashes([t])[0]),"
        " 'keys': h.band_keys(h.signatures([t]))[0].tolist()}))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        command = [sys.executable, "-c", code]
        out = subprocess.run(
            command, input=text, env=env, capture_output=True, text=True, check=False
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == here
