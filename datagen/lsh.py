"""Near-duplicate pairs among 64-bit perceptual hashes: banded LSH, never all pairs.

A *band* is a fixed random choice of `band_bits` of the 64 bit positions; two hashes are
candidates when they agree on every bit of some band. A pair `d` bits apart agrees on a band with
probability C(64-d, b) / C(64, b) (the band must avoid all d differing bits), so with L bands it
is found with probability 1 - (1 - p)^L. `plan()` picks L so that pairs at the largest distance
asked for (k) are found with probability >= `recall` (pairs closer than k are found more often).
Candidates are then checked exactly (popcount of the XOR <= k), so there are no false pairs.

`band_bits` grows with the number of hashes (about log2(n) + 3) so that unrelated hashes rarely
share a band: a band of b bits puts n^2 / 2^(b+1) random pairs in its buckets.

Per band: the band's bits are gathered through eight 256-entry byte tables (one lookup per byte
of the hash, not one shift per bit), the keys sorted, and equal neighbours in the sorted order
paired. Everything is numpy over whole arrays: 10M hashes take memory for a few arrays of 10M
(benchmarks/bench_curation.py states it) and no Python loop per hash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BITS = 64


@dataclass(frozen=True)
class LshPlan:
    k: int  # largest Hamming distance that makes a pair
    band_bits: int
    bands: int
    recall: float  # the planned probability of finding a pair exactly k bits apart

    def collision(self, d: int) -> float:
        """Probability that one band finds a pair `d` bits apart."""
        return math.comb(BITS - d, self.band_bits) / math.comb(BITS, self.band_bits)


def plan(n: int, k: int, recall: float = 0.99, band_bits: int | None = None) -> LshPlan:
    """Bands for `n` hashes so pairs within distance `k` are found with probability >= `recall`."""
    if not 0 <= k < BITS // 2:
        raise ValueError(f"k must be in [0, {BITS // 2}), got {k}")
    b = band_bits or min(BITS - k, max(16, math.ceil(math.log2(max(n, 2))) + 3))
    p = math.comb(BITS - k, b) / math.comb(BITS, b)
    bands = 1 if p >= 1 else max(1, math.ceil(math.log(1 - recall) / math.log(1 - p)))
    return LshPlan(k, b, bands, 1 - (1 - p) ** bands)


def _band_tables(positions: np.ndarray) -> np.ndarray:
    """(8, 256) uint32: for each byte of the hash (0 = least significant) and each byte value,
    that byte's bits at `positions`, moved to their place in the band key."""
    tables = np.zeros((8, 256), dtype=np.uint32)
    values = np.arange(256, dtype=np.uint32)
    for j, pos in enumerate(positions):
        byte, bit = divmod(int(pos), 8)
        tables[byte] |= ((values >> bit) & 1) << j
    return tables


def band_keys(hashes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The band key (uint32) of every hash for the bit `positions` (at most 32 of them)."""
    tables = _band_tables(positions)
    as_bytes = hashes.astype("<u8", copy=False).view(np.uint8).reshape(-1, 8)
    key = np.zeros(len(hashes), dtype=np.uint32)
    for byte in range(8):
        if tables[byte].any():
            key |= tables[byte][as_bytes[:, byte]]
    return key


def near_pairs(hashes: np.ndarray, k: int, *, recall: float = 0.99, seed: int = 0,
               lsh: LshPlan | None = None) -> np.ndarray:
    """(m, 2) int64 index pairs i < j with Hamming(hashes[i], hashes[j]) <= k, each once."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    lsh = lsh or plan(n, k, recall)
    rng = np.random.default_rng(seed)
    found: list[np.ndarray] = []
    for _ in range(lsh.bands):
        positions = rng.choice(BITS, size=lsh.band_bits, replace=False)
        keys = band_keys(hashes, positions)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        offset = 1
        while offset < n:
            same = np.flatnonzero(sorted_keys[offset:] == sorted_keys[:-offset])
            if not len(same):
                break
            i, j = order[same], order[same + offset]
            close = np.bitwise_count(hashes[i] ^ hashes[j]) <= k
            if close.any():
                a, b = i[close], j[close]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1))
            offset += 1
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    codes = np.unique(np.concatenate(found).astype(np.int64) @ np.array([n, 1], dtype=np.int64))
    return np.stack([codes // n, codes % n], axis=1)
