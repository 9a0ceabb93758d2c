"""Global dedup over all ranks: the work is partitioned, so no rank holds the whole corpus' keys.

Every kept document has a global id (gid): its position in the global order (units in order,
documents in unit order). Each rank holds the keys of its own units (data_prep.stages.scan_unit).

exact   each (hash, gid) goes to rank hash % size; a rank sorts its part, and in every run of
        equal hashes the smallest gid is the original, the others are duplicates of it.
near    the LSH bands are dealt out: rank r gets column b of every document for b % size == r,
        and emits, per band and bucket, an edge from each later document to the bucket's first.
        The edges (few: ~ duplicates x bands) are gathered; connected components are found with
        the vectorized union-find of data_prep.dedup; each component keeps its smallest gid.

A document removed as an exact duplicate is also in its original's near-duplicate component;
it is counted as exact. Documents with no words (no shingles) never take part in near dedup:
their empty signatures would all collide. The result, sorted gid arrays of removed documents
with the gid each duplicates, is the same for any number of ranks.
"""

from __future__ import annotations

import numpy as np

from data_prep.dedup import _cluster_roots


def _pairs(hashes: np.ndarray, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate gids, original gids) within one collection of (hash, gid)."""
    if len(hashes) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.lexsort((gids, hashes))
    h, g = hashes[order], gids[order]
    first = np.r_[True, h[1:] != h[:-1]]
    head = g[first][np.cumsum(first) - 1]
    return g[~first], head[~first]


def exact_duplicates(
    comm, local: list[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """local: [(hashes uint64, gids int64)] of this rank's units. Returns (dropped, original),
    sorted by dropped."""
    hashes = np.concatenate([h for h, _ in local]) if local else np.zeros(0, np.uint64)
    gids = np.concatenate([g for _, g in local]) if local else np.zeros(0, np.int64)
    owner = (hashes % np.uint64(comm.size)).astype(np.int64)
    parts = comm.alltoall([(hashes[owner == r], gids[owner == r]) for r in range(comm.size)])
    dropped, original = _pairs(
        np.concatenate([h for h, _ in parts]), np.concatenate([g for _, g in parts])
    )
    every = comm.allgather((dropped, original))
    dropped = np.concatenate([d for d, _ in every])
    original = np.concatenate([o for _, o in every])
    order = np.argsort(dropped, kind="stable")
    return dropped[order], original[order]


def _band_edges(keys: np.ndarray, gids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (later gid, first gid of its bucket) for one band."""
    order = np.lexsort((gids, keys))
    k, g = keys[order], gids[order]
    first = np.r_[True, k[1:] != k[:-1]] if len(k) else np.zeros(0, bool)
    head = g[first][np.cumsum(first) - 1]
    return g[~first], head[~first]


def near_duplicates(
    comm, local: list[tuple[np.ndarray, np.ndarray]], bands: int
) -> tuple[np.ndarray, np.ndarray]:
    """local: [(band keys (n, bands) uint64, gids)] of documents with shingles. Returns
    (dropped, root)."""
    keys = np.concatenate([k for k, _ in local]) if local else np.zeros((0, bands), np.uint64)
    gids = np.concatenate([g for _, g in local]) if local else np.zeros(0, np.int64)
    mine = [list(range(r, bands, comm.size)) for r in range(comm.size)]
    parts = comm.alltoall([(keys[:, cols], gids) for cols in mine])
    all_gids = np.concatenate([g for _, g in parts])
    edges = [
        _band_edges(np.concatenate([k[:, j] for k, _ in parts]), all_gids)
        for j in range(len(mine[comm.rank]))
    ]
    every = comm.allgather(edges)
    u = np.concatenate([e[0] for rank_edges in every for e in rank_edges] + [np.zeros(0, np.int64)])
    v = np.concatenate([e[1] for rank_edges in every for e in rank_edges] + [np.zeros(0, np.int64)])
    if len(u) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    nodes, inverse = np.unique(
        np.concatenate([u, v]), return_inverse=True
    )  # dense ids keep gid order
    roots = _cluster_roots(len(nodes), inverse[: len(u)], inverse[len(u) :])
    dropped = roots != np.arange(len(nodes))
    return nodes[dropped], nodes[roots[dropped]]
