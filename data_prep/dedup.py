"""Exact and near-duplicate detection, built for global dedup across many workers.

Both kinds work in two steps, so that the result does not depend on how documents were split:

1. Each worker turns its documents, in its local order, into a compact numpy array:
       exact:  exact_hashes(texts)            -> (n,) uint64, one 64-bit blake2b hash per doc
       near:   MinHasher(cfg).signatures(...) -> (n, bands * rows) uint32 MinHash signatures
               MinHasher(cfg).band_keys(sigs) -> (n, bands) uint64 LSH bucket keys
   The pipeline exchanges these arrays (MPI gather, or .npy files).
2. One resolution step gets the arrays of all workers, in worker order:
       resolve_exact(hashes_per_worker)              -> a boolean "keep" mask per worker
       resolve_near_duplicates(band_keys_per_worker) -> a boolean "keep" mask per worker

Global order: the first document of a duplicate group, in global order, is kept. By default the
global order is worker 0's documents, then worker 1's, ... (what you get when workers read
contiguous slices of one ordered list of files). If workers get files some other way, give each
document an explicit uint64 ``order_keys`` entry, unique across the corpus, e.g.
(file index << 32) | line number: the global order is then the order of these keys.

Hashes of text are stable across processes, machines and runs: blake2b and xxhash are fixed
algorithms, and nothing here uses Python's hash() (randomized by PYTHONHASHSEED).
Documents are expected to be normalized (data_prep.filters.normalize) before hashing.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from megatrain.hashing import mix64

# ----------------------------------------------------------------------------------------------
# Global order and per-worker results


def _global_ranks(lengths: list[int], order_keys: Sequence[np.ndarray] | None) -> np.ndarray:
    """Rank in the global order of every document, documents concatenated in worker order."""
    n = sum(lengths)
    if order_keys is None:
        return np.arange(n, dtype=np.int64)
    if [len(k) for k in order_keys] != lengths:
        raise ValueError("order_keys must have one entry per document of each worker")
    keys = np.concatenate([np.asarray(k, dtype=np.uint64) for k in order_keys])
    order = np.argsort(keys, kind="stable")
    if n > 1 and np.any(keys[order][1:] == keys[order][:-1]):
        raise ValueError("order_keys must be unique across all workers")
    ranks = np.empty(n, dtype=np.int64)
    ranks[order] = np.arange(n)
    return ranks


def _split(mask: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    """Cut one array over all documents back into one array per worker."""
    return np.split(mask, np.cumsum(lengths)[:-1])


# ----------------------------------------------------------------------------------------------
# Exact dedup


def text_hash(text: str) -> int:
    """64-bit blake2b of the UTF-8 text, as an unsigned int.

    64 bits: two different documents collide with probability ~N^2 / 2^65 over a corpus of N docs
    (1e-4 for N = 1e8): a rare lost document, which is acceptable for training data.
    """
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


def exact_hashes(texts: Iterable[str]) -> np.ndarray:
    """One worker's hashes: (n,) uint64, in the worker's local document order. 8 bytes/doc."""
    return np.fromiter((text_hash(t) for t in texts), dtype=np.uint64)


def resolve_exact(
    hashes: Sequence[np.ndarray], order_keys: Sequence[np.ndarray] | None = None
) -> list[np.ndarray]:
    """Keep masks, one per worker: True for the first document (in global order) of each hash.

    Sort all (hash, global rank) pairs; in each run of equal hashes the lowest rank wins. The
    result is the same for any number of workers as long as the global order is the same.
    Memory ~ 40 bytes/doc. Larger corpora can be resolved in parts: route each hash to part
    hash % n_parts (all copies then meet in one part) and resolve each part with order_keys.
    """
    lengths = [len(h) for h in hashes]
    if sum(lengths) == 0:
        return [np.zeros(0, dtype=bool) for _ in hashes]
    all_hashes = np.concatenate([np.asarray(h, dtype=np.uint64) for h in hashes])
    ranks = _global_ranks(lengths, order_keys)
    order = np.lexsort((ranks, all_hashes))  # by hash, then by global rank
    sorted_hashes = all_hashes[order]
    first_of_run = np.r_[True, sorted_hashes[1:] != sorted_hashes[:-1]]
    keep = np.zeros(len(all_hashes), dtype=bool)
    keep[order[first_of_run]] = True
    return _split(keep, lengths)


# ----------------------------------------------------------------------------------------------
# Near dedup: MinHash + LSH
#
# Jaccard similarity of two documents = |A ∩ B| / |A ∪ B| over their sets of shingles (word
# n-grams). For a random hash function h, P[min h(A) == min h(B)] = Jaccard(A, B), so a
# signature of K minima estimates it (Broder 1997). LSH cuts the signature into `bands` bands
# of `rows` values; two documents become candidates if they agree on all rows of at least one
# band, which happens with probability
#       P(s) = 1 - (1 - s^rows)^bands        for Jaccard similarity s,
# an S-curve whose steepest point is near the threshold t ~ (1 / bands)^(1 / rows).
# 14 bands x 8 rows (112 hashes): t ~ 0.72; P(0.8) = 0.92, P(0.9) = 1.00, P(0.5) = 0.05.


def candidate_probability(similarity: float, bands: int, rows: int) -> float:
    """Probability that two documents of this Jaccard similarity share an LSH bucket."""
    return 1.0 - (1.0 - similarity**rows) ** bands


@dataclass(frozen=True)
class MinHashConfig:
    """MinHash/LSH parameters. All workers and the resolution step must use the same ones."""

    shingle_size: int = 5
    """Words per shingle. 5-grams: a few changed words change only a few shingles."""
    bands: int = 14
    """LSH bands. More bands: lower threshold (more pairs found, more false positives)."""
    rows: int = 8
    """Signature values per band. More rows: steeper S-curve, higher threshold."""
    seed: int = 0
    """Seed of the hash functions: signatures made with different seeds are not comparable."""

    @property
    def num_perm(self) -> int:
        """Length of a signature, bands * rows."""
        return self.bands * self.rows

    @property
    def threshold(self) -> float:
        """Approximate Jaccard similarity above which pairs are found, (1/bands)^(1/rows)."""
        return (1.0 / self.bands) ** (1.0 / self.rows)


_WORD_RE = re.compile(r"\w+")  # near-dup shingles ignore case and punctuation
_CHUNK = 4096  # shingles per block: bounds the (block, num_perm) uint64 temporary to 3.7 MB


class MinHasher:
    """Computes MinHash signatures and LSH band keys for one MinHashConfig."""

    def __init__(self, config: MinHashConfig = MinHashConfig()) -> None:
        self.config = config
        # The K hash functions are h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32 for 32-bit x:
        # Dietzfelbinger's multiply-add-shift, a strongly universal family like (a*x + b) mod p,
        # with the modulus 2^64 that numpy's uint64 arithmetic gives for free (about 6x faster
        # than a Mersenne-prime modulus here). a_i, b_i come from blake2b(seed, i), so they never
        # change with the numpy version or the platform.
        params = [self._u64(f"minhash:{config.seed}:{i}") for i in range(2 * config.num_perm)]
        self._a = np.array(params[0::2], dtype=np.uint64)
        self._b = np.array(params[1::2], dtype=np.uint64)

    @staticmethod
    def _u64(label: str) -> int:
        return int.from_bytes(hashlib.blake2b(label.encode(), digest_size=8).digest(), "little")

    def shingle_hashes(self, text: str) -> np.ndarray:
        """32-bit hashes (in uint64) of the word n-grams of text; a short text is one shingle."""
        words = _WORD_RE.findall(text.casefold())
        # xxh3 once per word, then the n-gram hash combines word hashes with numpy:
        # g = mix(...mix(mix(h[i]) ^ h[i+1])... ^ h[i+n-1]), a chain of bijective mixes.
        h = np.fromiter(
            (xxhash.xxh3_64_intdigest(w.encode()) for w in words), np.uint64, len(words)
        )
        n = min(self.config.shingle_size, len(h))
        if n == 0:
            return h
        g = h[: len(h) - n + 1].copy()
        for j in range(1, n):
            g = mix64(g) ^ h[j : len(h) - n + 1 + j]
        return mix64(g) >> np.uint64(32)  # keep 32 bits: multiply-add-shift needs x < 2^32

    def signature(self, text: str, shingles: np.ndarray | None = None) -> np.ndarray:
        """(num_perm,) uint32 MinHash signature; all 0xFFFFFFFF for a text without words.

        ``shingles``: the text's shingle_hashes, if the caller already has them."""
        x = self.shingle_hashes(text) if shingles is None else shingles
        sig = np.full(self.config.num_perm, 0xFFFFFFFF, dtype=np.uint64)
        with np.errstate(over="ignore"):  # the wrap-around mod 2^64 is the point
            for start in range(0, len(x), _CHUNK):
                y = np.multiply.outer(x[start : start + _CHUNK], self._a)  # (block, K)
                y += self._b
                y >>= np.uint64(32)
                np.minimum(sig, y.min(axis=0), out=sig)
        return sig.astype(np.uint32)

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """(n, num_perm) uint32 signatures of one worker's texts, in its local order."""
        rows = [self.signature(t) for t in texts]
        return np.stack(rows) if rows else np.zeros((0, self.config.num_perm), dtype=np.uint32)

    def band_keys(self, signatures: np.ndarray) -> np.ndarray:
        """(n, bands) uint64: one hash per band of rows values. 8 * bands bytes per document.

        Two documents share a bucket in band j iff their keys in column j are equal (up to
        64-bit collisions, ~n^2 / 2^65 per band: negligible).
        """
        cfg = self.config
        if signatures.shape[1:] != (cfg.num_perm,):
            raise ValueError(
                f"signatures must have shape (n, {cfg.num_perm}), got {signatures.shape}"
            )
        bands = signatures.reshape(len(signatures), cfg.bands, cfg.rows).astype(np.uint64)
        keys = np.full(bands.shape[:2], cfg.rows, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for r in range(cfg.rows):
                keys = mix64(keys ^ bands[:, :, r])
        return keys


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """MinHash estimate of the Jaccard similarity of two documents: fraction of equal minima."""
    return float(np.mean(sig_a == sig_b))


def _cluster_roots(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components of the graph (n nodes, edges u-v): each node's smallest member.

    Union-find, vectorized: every round hooks, for every edge, the larger root under the smaller
    one (np.minimum.at resolves conflicts: the smallest wins), then compresses paths by pointer
    jumping until every node points at a root. parent[x] <= x always holds, so the root of a
    component is its smallest index, i.e. its first document in global order. Deterministic.
    """
    parent = np.arange(n, dtype=np.int64)
    while True:
        pu, pv = parent[u], parent[v]
        if np.array_equal(pu, pv):
            return parent
        np.minimum.at(parent, np.maximum(pu, pv), np.minimum(pu, pv))
        while True:
            grandparent = parent[parent]
            if np.array_equal(grandparent, parent):
                break
            parent = grandparent


def resolve_near_duplicates(
    band_keys: Sequence[np.ndarray], order_keys: Sequence[np.ndarray] | None = None
) -> list[np.ndarray]:
    """Keep masks, one per worker: False for documents with an earlier near-duplicate.

    Documents sharing a bucket in any band are joined; clusters are the connected components
    (so A~B and B~C put A, B, C together even if A and C differ more). Each cluster keeps its
    first document in global order. Memory: one (N, bands) uint64 copy of the keys, 8 * bands * N
    bytes (112 B/doc for 14 bands: 1.1 GB for 10M docs) besides the caller's arrays, ~40 N bytes
    of sort temporaries, and 16 bytes per candidate edge (at most bands * N, far fewer in
    practice). Measured: 2M docs, 10% duplicates: 0.76 GB peak RSS with the input keys, 5 s.
    """
    lengths = [len(k) for k in band_keys]
    n = sum(lengths)
    if n == 0:
        return [np.zeros(0, dtype=bool) for _ in band_keys]
    ranks = _global_ranks(lengths, order_keys)
    keys = np.empty((n, band_keys[0].shape[1]), dtype=np.uint64)
    for rows, worker_keys in zip(_split(ranks, lengths), band_keys):
        keys[rows] = worker_keys  # row i is now the document of global rank i
    us, vs = [], []
    for band in range(keys.shape[1]):
        # Sort the band's keys; a run of equal keys is a bucket. Stable sort: each run lists
        # its documents in global order, so its first one is the bucket's earliest document.
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        run_start = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
        head = order[run_start][np.cumsum(run_start) - 1]  # first document of each one's run
        us.append(order[~run_start])
        vs.append(head[~run_start])
    roots = _cluster_roots(n, np.concatenate(us), np.concatenate(vs))
    keep_by_rank = roots == np.arange(n)
    return _split(keep_by_rank[ranks], lengths)
