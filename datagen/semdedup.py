"""Semantic duplicates (SemDeDup, Abbas et al. 2023): near-identical meaning, not near-identical pixels.

The image embeddings (open_clip, L2-normalised, from `ClipStage`) are clustered with k-means
(k = n / `per_cluster`, seeded); inside each cluster every pair with cosine similarity >=
`threshold` (= 1 - SemDeDup's epsilon) is linked, and `datagen/dedup.py` keeps one sample per
connected group by the common keep rule. Comparing only inside a k-means cluster is what makes it
affordable: the cost is the sum of the squared cluster sizes, not n^2.
"""

from __future__ import annotations

import numpy as np

#: SemDeDup's epsilon 0.05: pairs at cosine >= 0.95 (the paper sweeps 0.0-0.1 on LAION-440M).
DEFAULT_THRESHOLD = 0.95
PER_CLUSTER = 1000


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means labels of the rows of `x` (normalised), k-means++ seeding."""
    rng = np.random.default_rng(seed)
    n = len(x)
    k = max(1, min(k, n))
    centres = [x[rng.integers(n)]]
    dist = 1 - x @ centres[0]
    for _ in range(1, k):
        p = np.clip(dist, 0, None) ** 2
        centres.append(x[rng.choice(n, p=p / p.sum()) if p.sum() > 0 else rng.integers(n)])
        dist = np.minimum(dist, 1 - x @ centres[-1])
    c = np.stack(centres)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        new = np.argmax(x @ c.T, axis=1)
        if _ and np.array_equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = x[labels == j]
            if len(members):
                m = members.sum(axis=0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
    return labels


def semantic_pairs(embeddings: np.ndarray, *, threshold: float = DEFAULT_THRESHOLD,
                   per_cluster: int = PER_CLUSTER, seed: int = 0) -> np.ndarray:
    """(m, 2) row pairs i < j in the same k-means cluster with cosine >= `threshold`."""
    x = np.asarray(embeddings, dtype=np.float32)
    if len(x) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = kmeans(x, max(1, len(x) // per_cluster), seed=seed)
    out = []
    for j in np.unique(labels):
        idx = np.flatnonzero(labels == j)
        if len(idx) < 2:
            continue
        sims = x[idx] @ x[idx].T
        a, b = np.nonzero(np.triu(sims >= threshold, k=1))
        out.append(np.stack([idx[a], idx[b]], axis=1))
    return np.concatenate(out).astype(np.int64) if out else np.zeros((0, 2), dtype=np.int64)
