"""The whole-dataset rules, on the compact columns of the records that passed every per-record rule.

Input: one pyarrow table (`units.ALIVE_SCHEMA`: uid, key, phash, pixels, exact, language, concepts,
clip_score), about 60 bytes a record and no Python object per record. Output: the records these rules
reject, as a table (uid, reason, detail, duplicate_of) in rule order:

1. `duplicate_key`: a key seen earlier in source order (uid order);
2. `duplicate_exact`: same image bytes and normalised caption (`exact` digest); the smallest key stays;
3. `near_duplicate`: pHash within `near_dup_max_distance` bits (banded search, dedup.py); the largest
   image of a cluster stays, then the smallest key;
4. `clip_score`: below `clip_min_score` or outside the best `clip_top_fraction`;
5. `concept_cap`: CLIP's WIT balancing, at most `concept_cap` pairs per query, best CLIP score first;
6. `language_quota`: at most N pairs (or a share of those left) per language, best CLIP score first.

Ties in "best first" orders break by key, so the result does not depend on the order units finished.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.filter.config import FilterConfig
from components.filter.dedup import near_duplicate_groups

REJECT_SCHEMA = pa.schema([("uid", pa.int64()), ("reason", pa.string()), ("detail", pa.string()),
                           ("duplicate_of", pa.string())])


class _Rejects:
    """Rejections collected rule by rule; `alive` masks the rows still in play."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.alive = np.ones(table.num_rows, dtype=bool)
        self.parts: list[pa.Table] = []

    def add(self, rows: np.ndarray, reason: str, details, duplicate_of=None) -> None:
        """Reject `rows` (positions in the table) for `reason`; details / duplicate_of: one per row (lists or
        Arrow arrays)."""
        if not len(rows):
            return
        self.alive[rows] = False
        n = len(rows)
        dup = duplicate_of if duplicate_of is not None else pa.nulls(n, pa.string())
        self.parts.append(pa.table({"uid": self.table["uid"].take(pa.array(rows)), "reason": pa.array([reason] * n),
                                    "detail": _strings(details), "duplicate_of": _strings(dup)}, schema=REJECT_SCHEMA))

    def result(self) -> pa.Table:
        return pa.concat_tables(self.parts) if self.parts else REJECT_SCHEMA.empty_table()


def _strings(values) -> pa.Array:
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks().cast(pa.string())
    return values.cast(pa.string()) if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _group_starts(sorted_values: np.ndarray) -> np.ndarray:
    """For each position of a sorted array, the position where its run of equal values starts."""
    is_start = np.ones(len(sorted_values), dtype=bool)
    is_start[1:] = sorted_values[1:] != sorted_values[:-1]
    starts = np.flatnonzero(is_start)
    return starts[np.cumsum(is_start) - 1]


def _key_order(keys: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in key order, rank of each position in that order); ties by position (a stable sort)."""
    order = pc.sort_indices(keys).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return order, rank


def decide(alive: pa.Table, cfg: FilterConfig) -> tuple[pa.Table, dict]:
    """(rejections, report) for the records in `alive` (see the module doc); report holds the CLIP-score
    summary, the concept counts and the per-language counts of the language quota."""
    alive = alive.sort_by("uid")  # source order, whatever order the units finished in
    rj = _Rejects(alive)
    report: dict = {"clip_score": {}, "concept_counts": {}, "language_quota": {}}
    if not alive.num_rows:
        return rj.result(), report
    by_key, rank = _key_order(alive["key"])  # ties by position = source order (decide_all sorts by uid)
    keys = alive["key"]

    # 1. duplicate keys: the first in source order stays
    key_sorted = pc.take(keys, pa.array(by_key))
    same = np.zeros(len(by_key), dtype=bool)
    if len(by_key) > 1:
        same[1:] = pc.equal(key_sorted.slice(1), key_sorted.slice(0, len(by_key) - 1)).to_numpy(zero_copy_only=False)
    dups = by_key[same]
    rj.add(dups, "duplicate_key", ["another record has this key (the first in source order stays)"] * len(dups),
           pc.take(keys, pa.array(dups)))

    # 2. exact duplicates: the smallest key stays
    if cfg.exact_dedup:
        rows = np.flatnonzero(rj.alive)
        exact = alive["exact"].to_numpy()
        order = rows[np.lexsort((rank[rows], exact[rows]))]
        first = order[_group_starts(exact[order])]
        dup = order[first != order]
        originals = pc.take(keys, pa.array(first[first != order]))
        rj.add(dup, "duplicate_exact", pc.binary_join_element_wise("same image and caption as ", originals, ""),
               originals)

    # 3. near duplicates: the largest image of a cluster stays, then the smallest key
    if cfg.near_dedup:
        rows = np.flatnonzero(rj.alive)
        pixels = alive["pixels"].to_numpy()
        dup_rows, originals = [], []
        for group in near_duplicate_groups(alive["phash"].to_numpy()[rows], cfg.near_dup_max_distance):
            members = rows[np.array(group)]
            rep = members[np.lexsort((rank[members], -pixels[members]))[0]]
            for m in members[members != rep]:
                dup_rows.append(m)
                originals.append(rep)
        rep_keys = pc.take(keys, pa.array(originals, pa.int64())).to_pylist() if originals else []
        rj.add(np.array(dup_rows, dtype=np.int64), "near_duplicate",
               [f"pHash within {cfg.near_dup_max_distance} bits of {k}" for k in rep_keys], rep_keys)

    clip = alive["clip_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    best_first = np.lexsort((rank, -np.nan_to_num(clip, nan=-np.inf)))  # best CLIP score, then key
    if cfg.clip_bundle:
        report["clip_score"] = _clip_rule(rj, clip, best_first, cfg)
    if cfg.concept_cap > 0 and cfg.concept_queries:
        report["concept_counts"] = _concept_rule(rj, alive["concepts"].to_numpy(), best_first, cfg)
    if cfg.language_quota:
        report["language_quota"] = _language_rule(rj, alive["language"], best_first, cfg)
    return rj.result(), report


def _clip_rule(rj: _Rejects, clip: np.ndarray, best_first: np.ndarray, cfg: FilterConfig) -> dict:
    ranked = best_first[rj.alive[best_first]]
    values = clip[ranked]
    threshold = cfg.clip_min_score if cfg.clip_min_score is not None else -np.inf
    keep_n = int(np.sum(values >= threshold))
    if cfg.clip_top_fraction is not None and len(values):
        top_n = max(1, int(np.ceil(cfg.clip_top_fraction * len(values))))
        threshold = max(threshold, float(values[top_n - 1]))
        keep_n = min(keep_n, top_n)
    dropped = ranked[keep_n:]
    rj.add(dropped, "clip_score", [f"CLIP score {clip[r]:.4f} < {threshold:.4f}" for r in dropped])
    return {"scored": len(values), "threshold": float(threshold) if np.isfinite(threshold) else None,
            "mean": float(values.mean()) if len(values) else None,
            "quantiles": {q: float(np.quantile(values, q)) for q in (0.1, 0.5, 0.9)} if len(values) else {}}


def _concept_rule(rj: _Rejects, masks: np.ndarray, best_first: np.ndarray, cfg: FilterConfig) -> dict:
    """A pair matching several queries stays only while every one of them is under the cap."""
    queries = cfg.concept_queries
    counts = np.zeros(len(queries), dtype=np.int64)
    capped, unmatched = [], []
    for r in best_first[rj.alive[best_first]]:
        mask = int(masks[r])
        if not mask:
            if not cfg.concept_keep_unmatched:
                unmatched.append(r)
            continue
        hit = [i for i in range(len(queries)) if mask >> i & 1]
        if any(counts[i] >= cfg.concept_cap for i in hit):
            capped.append(r)
        else:
            counts[hit] += 1
    rj.add(np.array(unmatched, dtype=np.int64), "concept_cap", ["caption matches no concept query"] * len(unmatched))
    rj.add(np.array(capped, dtype=np.int64), "concept_cap",
           [f"a query it matches already has {cfg.concept_cap} pairs"] * len(capped))
    return {q: int(c) for q, c in zip(queries, counts)}


def _language_rule(rj: _Rejects, languages: pa.ChunkedArray, best_first: np.ndarray, cfg: FilterConfig) -> dict:
    """Within each language, the best pairs up to its limit stay (a share is of the pairs left here)."""
    quotas = cfg.language_quotas()
    rows = best_first[rj.alive[best_first]]
    codes = pc.take(languages, pa.array(rows)).dictionary_encode().combine_chunks()
    names = codes.dictionary.to_pylist()
    index = codes.indices.to_numpy()
    limits = []
    for name in names:
        limit = quotas.get(name, quotas.get("*"))
        limits.append(np.inf if limit is None else (np.floor(limit * len(rows)) if limit < 1 else limit))
    seen = np.bincount(index, minlength=len(names))
    order = np.argsort(index, kind="stable")  # by language, best first within each
    position = np.empty(len(rows), dtype=np.int64)  # place of each row within its language
    position[order] = np.arange(len(order)) - _group_starts(index[order])
    over = position >= np.array(limits)[index]
    rj.add(rows[over], "language_quota",
           [f"language {names[c] or 'unknown'} already has {int(limits[c])} pairs" for c in index[over]])
    return {(names[c] or "unknown"): {"limit": None if np.isinf(limits[c]) else int(limits[c]),
                                     "kept": int(min(seen[c], limits[c])), "dropped": int(max(0, seen[c] - limits[c]))}
            for c in range(len(names))}
