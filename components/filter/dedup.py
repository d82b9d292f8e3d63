"""Exact and near-duplicate detection for image-text pairs.

- `phash(image)`: 64-bit DCT perceptual hash (grayscale, 32x32, 2-D DCT-II, the 8x8 lowest
  frequencies compared with their median), returned as a signed int64 so it fits a parquet int64.
- `near_duplicate_groups(hashes, max_distance)`: clusters of hashes within `max_distance` bits,
  found by banded bucketing (pigeonhole: split the 64 bits into max_distance + 1 bands; two hashes
  within max_distance bits agree exactly on at least one band), then verified by Hamming distance.
  Work grows with the number of hashes plus the number of candidate pairs, not with all pairs.
- `naive_near_duplicate_pairs`: the all-pairs reference (tests and the benchmark baseline).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Sequence

import numpy as np
from PIL import Image
from scipy.fft import dctn

HASH_BITS = 64
_MAX_GROUP_BLOCK = 2048  # candidate groups larger than this are verified in row blocks
_MAX_BLOCK_CELLS = 1 << 23  # at most this many distances (64 MiB of uint64) at once


def phash(image: Image.Image, hash_size: int = 8, highfreq_factor: int = 4) -> int:
    """DCT perceptual hash of `image` as a signed 64-bit int (bit i = coefficient i > median)."""
    side = hash_size * highfreq_factor
    gray = image.convert("L").resize((side, side), Image.Resampling.LANCZOS)
    pixels = np.asarray(gray, dtype=np.float64)
    low = dctn(pixels, type=2, norm="ortho")[:hash_size, :hash_size]
    bits = (low > np.median(low)).reshape(-1)
    return int(np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8")[0].astype(np.int64))


def hamming(a: int, b: int) -> int:
    return int(np.bitwise_count(np.array(a, dtype=np.int64).view(np.uint64)
                                ^ np.array(b, dtype=np.int64).view(np.uint64)))


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


class _UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return int(root)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _band_masks(max_distance: int) -> list[tuple[int, np.uint64]]:
    """(shift, mask) for max_distance + 1 contiguous bands covering the 64 bits."""
    n_bands = max_distance + 1
    if not 1 <= n_bands <= HASH_BITS:
        raise ValueError(f"max_distance must be in [0, {HASH_BITS - 1}], got {max_distance}")
    edges = np.linspace(0, HASH_BITS, n_bands + 1).round().astype(int)
    bands = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        width = int(hi - lo)
        mask = np.uint64((1 << width) - 1) if width < 64 else np.uint64(0xFFFFFFFFFFFFFFFF)
        bands.append((int(lo), mask))
    return bands


def near_duplicate_pairs(hashes: Sequence[int] | np.ndarray, max_distance: int) -> np.ndarray:
    """All index pairs (i < j) whose hashes differ in at most `max_distance` bits, as an [P, 2] array.

    Candidates are pairs that share at least one band exactly; each candidate is verified."""
    h = np.asarray(hashes, dtype=np.int64).view(np.uint64)
    n = len(h)
    found: list[np.ndarray] = []
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    for shift, mask in _band_masks(max_distance):
        band = (h >> np.uint64(shift)) & mask
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        boundaries = np.flatnonzero(np.diff(sorted_band)) + 1
        starts = np.concatenate(([0], boundaries))
        ends = np.concatenate((boundaries, [n]))
        for s, e in zip(starts[ends - starts > 1], ends[ends - starts > 1]):
            members = np.sort(order[s:e])
            found.append(_verify_group(h, members, max_distance))
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    return np.unique(pairs, axis=0) if len(pairs) else pairs.reshape(0, 2)


def _verify_group(h: np.ndarray, members: np.ndarray, max_distance: int) -> np.ndarray:
    out = []
    m = len(members)
    block = max(1, min(_MAX_GROUP_BLOCK, _MAX_BLOCK_CELLS // max(m, 1)))  # bound the distance matrix
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


def clusters_from_pairs(n: int, pairs: np.ndarray) -> list[list[int]]:
    """Connected components (size > 1) of the graph on range(n) with the given edges."""
    uf = _UnionFind(n)
    for a, b in pairs:
        uf.union(int(a), int(b))
    groups: dict[int, list[int]] = {}
    for i in np.unique(pairs):
        groups.setdefault(uf.find(int(i)), []).append(int(i))
    return [sorted(g) for g in groups.values() if len(g) > 1]


def near_duplicate_groups(hashes: Sequence[int] | np.ndarray, max_distance: int) -> list[list[int]]:
    """Clusters of indices whose hashes are linked by chains of distance <= max_distance."""
    return clusters_from_pairs(len(hashes), near_duplicate_pairs(hashes, max_distance))
