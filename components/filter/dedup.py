"""Exact and near-duplicate detection for image-text pairs.

- The pHash itself is `components.common.image_hash.phash` (the synthetic corpus plants near duplicates with it).
- Near duplicates (pHash within d bits) by **multi-index hashing** (`BandPlan`): the 64 bits are cut
  into m contiguous blocks; two hashes within d bits differ in at most d blocks, so they agree exactly
  on at least m - d of them. Each *table* is one choice of m - d blocks (C(m, d) tables) and its key is
  those blocks' bits (>= `key_bits` bits). The search is exact at distance <= d (pigeonhole). With
  `key_bits` >= log2(n) - 2 a table's bucket holds about 4 uniform hashes whatever n is; `choose_plan`
  lengthens the keys further until a uniform sample of the real hashes (which are far from uniform)
  predicts at most 32 comparisons per hash, so the comparisons per record stay bounded as n grows
  (the old d + 1 bands of 64/(d + 1) bits held n/2^9 records a bucket at d = 6). A pair is reported only by the first table (in
  `itertools.combinations` order) whose blocks it shares, so every pair comes out exactly once, whichever
  machine verified which bucket. Buckets over a cap (degenerate hash distributions) are verified on their
  first `cap` members only, and counted.
- `near_duplicate_pairs`: the same search on one in-memory array (the distributed filter runs it per band
  partition, decide.py); `naive_near_duplicate_pairs`: the all-pairs reference.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HASH_BITS = 64
MAX_TABLES = 1024  # a plan never uses more tables than this (it takes shorter keys instead)
_MAX_BLOCK_CELLS = 1 << 23  # at most this many distances (64 MiB of uint64) at once


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_WS = re.compile(r"\s+")
_PUNCT_EDGE = re.compile(r"^[\W_]+|[\W_]+$")


def normalize_caption(caption: str | None) -> str:
    """Case-folded, NFKC, whitespace-collapsed caption without leading/trailing punctuation."""
    if not caption:
        return ""
    text = unicodedata.normalize("NFKC", caption).casefold()
    return _PUNCT_EDGE.sub("", _WS.sub(" ", text).strip())


def auto_key_bits(n: int) -> int:
    """Key bits that keep a random table bucket at about 4 records for n hashes (at least 16)."""
    return max(16, math.ceil(math.log2(max(n, 2))) - 2)


def expected_candidates(plan: BandPlan, sample: np.ndarray, n: int) -> float:
    """Comparisons per hash the plan would make on n hashes distributed like `sample` (a uniform sample of
    them): each pair of the sample sharing a bucket stands for (n / len(sample))^2 pairs of the whole.
    One table at a time, so it holds O(len(sample)) whatever the tables: all of them at once (band_rows)
    took about 56 B per (table, sample row), 65,536 x 462 tables = 1.7 GB in the driver (issue 19)."""
    s = len(sample)
    if s < 2:
        return 0.0
    h = np.asarray(sample, dtype=np.int64).view(np.uint64)
    pairs = 0
    for mask in plan.table_masks():
        _, sizes = np.unique(h & mask, return_counts=True)
        pairs += int((sizes * (sizes - 1) // 2).sum())
    return float(pairs * (n / s) ** 2 / n)


def choose_plan(max_distance: int, n: int, sample: np.ndarray, target: float = 32.0) -> BandPlan:
    """The cheapest plan (fewest tables) whose expected comparisons per hash on data like `sample` stay
    under `target`, from auto_key_bits(n) up: real pHashes are far from uniform (bits correlate), so
    the key length the count alone suggests can leave crowded buckets."""
    plan = BandPlan.for_distance(max_distance, auto_key_bits(n))
    for bits in range(auto_key_bits(n), HASH_BITS + 1):
        candidate = BandPlan.for_distance(max_distance, bits)
        if candidate.tables != plan.tables and len(candidate.tables) > MAX_TABLES // 2:
            break  # more tables than it is worth: take the crowded buckets (the bucket cap bounds them)
        plan = candidate
        if expected_candidates(plan, sample, n) <= target:
            break
    return plan


@dataclass(frozen=True)
class BandPlan:
    """m contiguous blocks of the 64 bits and the C(m, d) tables of m - d blocks each."""
    max_distance: int
    blocks: tuple[int, ...]          # mask of each block (as Python ints: bit i of the hash)
    tables: tuple[tuple[int, ...], ...]  # block indices of each table, in itertools.combinations order

    @classmethod
    def for_distance(cls, max_distance: int, key_bits: int = 16) -> BandPlan:
        """The plan with the fewest blocks whose every table key has >= key_bits bits (<= MAX_TABLES tables)."""
        d = max_distance
        if not 0 <= d < HASH_BITS:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS - 1}], got {d}")
        best = None
        for m in range(d + 1, HASH_BITS + 1):
            if math.comb(m, d) > MAX_TABLES:
                break
            edges = np.linspace(0, HASH_BITS, m + 1).round().astype(int)
            widths = sorted(int(b - a) for a, b in zip(edges[:-1], edges[1:]))
            best = (m, edges)
            if sum(widths[:m - d]) >= key_bits:  # the narrowest table's key
                break
        m, edges = best
        blocks = tuple(((1 << int(hi - lo)) - 1) << int(lo) for lo, hi in zip(edges[:-1], edges[1:]))
        return cls(d, blocks, tuple(itertools.combinations(range(m), m - d)))

    def table_masks(self) -> np.ndarray:
        return np.array([sum(self.blocks[b] for b in t) for t in self.tables], dtype=np.uint64)

    def table_sets(self) -> np.ndarray:
        """Each table's blocks as a bit set (bit b = block b)."""
        return np.array([sum(1 << b for b in t) for t in self.tables], dtype=np.uint64)


def band_rows(hashes: np.ndarray, plan: BandPlan, first: int = 0,
              stop: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(table, band key, hash) rows: every hash once per table (of tables first..stop-1; all by default), its
    key = its bits in the table's blocks."""
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    masks = plan.table_masks()[first:stop]
    table = np.repeat(np.arange(first, first + len(masks), dtype=np.int64), len(h))
    keys = (np.tile(h, len(masks)) & np.repeat(masks, len(h)))
    return table, keys.view(np.int64), np.tile(h, len(masks)).view(np.int64)


def bucket_pairs(table: np.ndarray, keys: np.ndarray, hashes: np.ndarray, plan: BandPlan,
                 bucket_cap: int = 0) -> tuple[np.ndarray, dict]:
    """Pairs (a, b) of hashes (a < b as uint64, shown as int64) within `plan.max_distance` bits among rows
    sharing (table, key); each pair once (from the first table whose blocks it shares). Buckets larger than
    `bucket_cap` (0 = no cap) are verified on their first `bucket_cap` members (by hash). Returns (pairs,
    {"candidates", "capped_buckets", "capped_rows"})."""
    stats = {"candidates": 0, "capped_buckets": 0, "capped_rows": 0}
    if len(table) < 2:
        return np.zeros((0, 2), dtype=np.int64), stats
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    order = np.lexsort((h, keys, table))
    t, k, h = table[order], keys[order], h[order]
    new = np.ones(len(t), dtype=bool)
    new[1:] = (t[1:] != t[:-1]) | (k[1:] != k[:-1])
    start = np.flatnonzero(new)
    size = np.diff(np.append(start, len(t)))
    group_start = np.repeat(start, size)
    group_size = np.repeat(size, size)
    pos = np.arange(len(t)) - group_start  # place within the bucket
    if bucket_cap:
        over = size > bucket_cap
        stats["capped_buckets"] = int(over.sum())
        stats["capped_rows"] = int((size[over] - bucket_cap).sum())
        limit = np.minimum(group_size, bucket_cap)
    else:
        limit = group_size
    masks, sets = plan.table_masks(), plan.table_sets()
    need = len(plan.tables[0]) if plan.tables else 0
    found: list[np.ndarray] = []
    rows = np.flatnonzero(pos < limit - 1)  # rows with a later member to compare with
    step = 1
    while len(rows):
        j = rows + step
        stats["candidates"] += len(rows)
        a, b = h[rows], h[j]
        close = np.bitwise_count(a ^ b) <= plan.max_distance
        a, b, tt = a[close], b[close], t[rows[close]]
        if len(a):
            first = _first_table_set(a, b, plan, need)
            own = first == sets[tt]
            lo, hi = np.minimum(a[own], b[own]), np.maximum(a[own], b[own])
            found.append(np.stack([lo.view(np.int64), hi.view(np.int64)], axis=1))
        step += 1
        rows = rows[pos[rows] + step < limit[rows]]
    del masks
    pairs = np.concatenate(found) if found else np.zeros((0, 2), dtype=np.int64)
    return pairs, stats


def _first_table_set(a: np.ndarray, b: np.ndarray, plan: BandPlan, need: int) -> np.ndarray:
    """The block set of the first table (combinations order) whose blocks a and b share: their `need`
    lowest equal blocks."""
    equal = np.zeros(len(a), dtype=np.uint64)
    for i, mask in enumerate(plan.blocks):
        m = np.uint64(mask)
        equal |= ((a & m) == (b & m)).astype(np.uint64) << np.uint64(i)
    first = np.zeros(len(a), dtype=np.uint64)
    for _ in range(need):
        low = equal & (~equal + np.uint64(1))  # lowest set bit
        first |= low
        equal ^= low
    return first


def near_duplicate_pairs(hashes: Sequence[int] | np.ndarray, max_distance: int, key_bits: int = 0,
                         bucket_cap: int = 0) -> np.ndarray:
    """All index pairs (i < j) whose hashes differ in at most `max_distance` bits, as a sorted [P, 2] array
    (multi-index search on one array; key_bits 0 = auto_key_bits(n))."""
    h = np.asarray(hashes, dtype=np.int64)
    if len(h) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    distinct, inverse = np.unique(h, return_inverse=True)
    plan = BandPlan.for_distance(max_distance, key_bits or auto_key_bits(len(distinct)))
    pairs, _ = bucket_pairs(*band_rows(distinct, plan), plan, bucket_cap)
    # back to indices: every index of value a with every index of value b, and equal values among themselves
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(distinct) + 1))
    out = []
    for a, b in np.searchsorted(distinct, pairs):
        ia, ib = order[starts[a]:starts[a + 1]], order[starts[b]:starts[b + 1]]
        out.append(np.stack(np.meshgrid(ia, ib, indexing="ij"), axis=-1).reshape(-1, 2))
    for v in np.flatnonzero(np.diff(starts) > 1):
        idx = order[starts[v]:starts[v + 1]]
        i, j = np.triu_indices(len(idx), 1)
        out.append(np.stack([idx[i], idx[j]], axis=1))
    if not out:
        return np.zeros((0, 2), dtype=np.int64)
    allp = np.concatenate(out).astype(np.int64)
    allp = np.stack([allp.min(axis=1), allp.max(axis=1)], axis=1)
    return np.unique(allp, axis=0)


def _verify_group(h: np.ndarray, members: np.ndarray, max_distance: int) -> np.ndarray:
    out = []
    m = len(members)
    block = max(1, min(2048, _MAX_BLOCK_CELLS // max(m, 1)))  # bound the distance matrix
    for start in range(0, m, block):
        rows = members[start:start + block]
        cols = members[start:]
        dist = np.bitwise_count(h[rows][:, None] ^ h[cols][None, :])
        ri, ci = np.nonzero(dist <= max_distance)
        a, b = rows[ri], cols[ci]
        keep = a < b
        out.append(np.stack([a[keep], b[keep]], axis=1))
    return np.concatenate(out).astype(np.int64)


def naive_near_duplicate_pairs(hashes: Sequence[int] | np.ndarray, max_distance: int) -> np.ndarray:
    """All pairs by brute force (O(n^2)); the reference the banded search is checked against."""
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    return _verify_group(h, np.arange(len(h)), max_distance)
