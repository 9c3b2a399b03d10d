"""Duplicate clusters across every catalogued sample, and which sample of each cluster is kept.

- `exact_dup`: samples linked by the same image bytes (sha256) or the same decoded pixels
  (`pixel_sha256`: the same picture re-encoded) are one cluster.
- `near_dup`: among the samples `exact_dup` kept, pairs whose perceptual hashes are within
  Hamming distance k (datagen/lsh.py: banded LSH, checked exactly) are linked; the clusters are
  the connected components (so a chain a~b~c is one cluster even when a and c are further apart).
- `sem_dup` (datagen/semdedup.py) hands its pairs to the same clustering.

Keep rule, the same for every duplicate rule: the highest resolution (width x height), then the
earliest source (registration order in the catalog), then shard path, then key. Every sample a
rule looked at gets one decision row: kept or not, the reason, and the cluster it is in (named by
the sample kept in it), so `blip3 sql` can list each cluster side by side.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from blip3.datagen.lsh import near_pairs

DECISION_SCHEMA = pa.schema([("source", pa.string()), ("shard", pa.string()), ("key", pa.string()),
                             ("rule", pa.string()), ("kept", pa.bool_()), ("reason", pa.string()),
                             ("cluster", pa.string())])


def keep_order(t: pa.Table) -> np.ndarray:
    """Rank of every row by the keep rule (0 = kept first): most pixels, earliest source, shard, key.
    `t` has width, height, source_rank, shard, key."""
    pixels = pc.multiply(pc.cast(pc.fill_null(t["width"], 0), pa.int64()),
                         pc.cast(pc.fill_null(t["height"], 0), pa.int64()))
    keys = pa.table({"pixels": pixels, "source_rank": t["source_rank"], "shard": t["shard"], "key": t["key"]})
    order = pc.sort_indices(keys, sort_keys=[("pixels", "descending"), ("source_rank", "ascending"),
                                             ("shard", "ascending"), ("key", "ascending")]).to_numpy()
    rank = np.empty(t.num_rows, dtype=np.int64)
    rank[order] = np.arange(t.num_rows)
    return rank


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Connected-component label of each of `n` nodes linked by `pairs` (m, 2)."""
    if not len(pairs):
        return np.arange(n)
    graph = coo_matrix((np.ones(len(pairs), dtype=np.int8), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def same_value_pairs(values: list) -> np.ndarray:
    """Pairs linking every row to the first row with the same (non-null) value."""
    first: dict = {}
    pairs = []
    for i, v in enumerate(values):
        if v is None:
            continue
        j = first.setdefault(v, i)
        if j != i:
            pairs.append((j, i))
    return np.asarray(pairs, dtype=np.int64).reshape(-1, 2)


def cluster_decisions(t: pa.Table, labels: np.ndarray, rule: str, why: str) -> tuple[pa.Table, np.ndarray]:
    """Decision rows of `rule` for every row of `t` given its cluster `labels`, and the kept mask.

    In a cluster of more than one sample, the first by `keep_order` is kept ("kept: ...") and the
    others dropped ("<why> of <kept sample>"); a sample alone is kept with no reason."""
    rank = keep_order(t)
    n = t.num_rows
    _, group, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    order = np.lexsort((rank, group))  # by cluster, the kept sample first
    first = np.ones(n, dtype=bool)
    first[1:] = group[order][1:] != group[order][:-1]
    best = np.empty(len(sizes), dtype=np.int64)
    best[group[order][first]] = order[first]
    kept = np.ones(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    clusters: list[str | None] = [None] * n
    shard, key = t["shard"], t["key"]
    for i in np.flatnonzero(sizes[group] > 1).tolist():  # only samples in a cluster get a reason
        j = int(best[group[i]])
        clusters[i] = f"{shard[j].as_py()}#{key[j].as_py()}"
        if i == j:
            reasons[i] = f"kept: highest resolution, then earliest source, of a cluster of {sizes[group[i]]}"
        else:
            kept[i] = False
            reasons[i] = f"{why} of {key[j].as_py()} ({shard[j].as_py()})"
    rows = pa.table({"source": t["source"], "shard": t["shard"], "key": t["key"],
                     "rule": pa.array([rule] * n, pa.string()), "kept": pa.array(kept),
                     "reason": pa.array(reasons, pa.string()), "cluster": pa.array(clusters, pa.string())},
                    schema=DECISION_SCHEMA)
    return rows, kept


def exact_duplicates(t: pa.Table) -> tuple[pa.Table, np.ndarray]:
    """`exact_dup` decisions over `t` (sample_hashes rows with source_rank)."""
    pairs = np.concatenate([same_value_pairs(t["sha256"].to_pylist()),
                            same_value_pairs(t["pixel_sha256"].to_pylist())])
    return cluster_decisions(t, components(t.num_rows, pairs), "exact_dup", "exact copy")


def near_duplicates(t: pa.Table, k: int, *, recall: float = 0.99, seed: int = 0) -> pa.Table:
    """`near_dup` decisions over `t` (rows without a pHash are kept alone). Identical hashes are
    linked directly; the LSH search runs over the distinct hashes only."""
    hashes = t["phash"].to_numpy(zero_copy_only=False)
    has = ~pc.is_null(t["phash"]).to_numpy(zero_copy_only=False)
    idx = np.flatnonzero(has)
    unique, inverse = np.unique(hashes[idx].astype(np.uint64), return_inverse=True)
    close = near_pairs(unique, k, recall=recall, seed=seed)
    first = np.full(len(unique), -1, dtype=np.int64)
    first[inverse[::-1]] = idx[::-1]  # the first row holding each distinct hash
    links = [np.stack([first[inverse], idx], axis=1), np.stack([first[close[:, 0]], first[close[:, 1]]], axis=1)]
    return cluster_decisions(t, components(t.num_rows, np.concatenate(links)), "near_dup",
                             f"near copy (pHash within {k} bits)")[0]
