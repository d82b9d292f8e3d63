"""The rules on a record's rank (best CLIP score first, then key), after the duplicate rules (decide.py):

4. `clip_score`: below `clip_min_score` or outside the best `clip_top_fraction`;
5. `concept_cap`: CLIP's WIT balancing, at most `concept_cap` pairs per query, best first (a pair that
   matches several queries stays only while every one of them is under the cap);
6. `language_quota`: at most N pairs (or a share of those left) per language, best first.

A distributed sort first: each part gives a bounded sample of its sort keys, the driver cuts the sample
into range boundaries (its size grows with the partitions, not with the records), and a shuffle puts each
record in its range. Then the rules walk the ranges in order, one task per range, each carrying only
counters to the next (the rank so far, per-query and per-language counts): a scan with O(queries +
languages) state, never a column of the records. The walk is sequential by nature (whether a pair stays
depends on every better pair), vectorised except for the concept cap's pairs that match a query.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from components.common import storage
from components.filter.config import FilterConfig
from components.common.shuffle import gather, read_table, scatter
from components.filter.shuffle import ALIVE_SCHEMA, Run, reject, survivors

SAMPLES_PER_PART = 256
_SIGN = np.uint64(1 << 63)


def sort_keys(table: pa.Table) -> np.ndarray:
    """Byte strings whose order is best-first: CLIP score descending (none last), then key."""
    score = table["clip_score"].to_numpy(zero_copy_only=False).astype(np.float64)
    x = -np.nan_to_num(score, nan=-np.inf)  # ascending x = descending score
    bits = x.view(np.uint64)
    ordered = np.where(bits & _SIGN, ~bits, bits | _SIGN).astype(">u8").tobytes()  # big-endian: bytes order
    keys = table["key"].to_pylist()
    return np.array([ordered[8 * i:8 * i + 8] + k.encode("utf-8") for i, k in enumerate(keys)], dtype=object)


def sample_keys(src: str) -> list[bytes]:
    """An evenly spaced sample (at most SAMPLES_PER_PART) of one part's sort keys."""
    if not storage.exists(src):
        return []
    keys = np.sort(sort_keys(read_table(src, ["key", "clip_score"])))
    step = max(1, math.ceil(len(keys) / SAMPLES_PER_PART))
    return list(keys[::step])


def map_range(src: str, root: str, source: str, boundaries: list[bytes]) -> int:
    if not storage.exists(src):
        return 0
    table = read_table(src)
    ranges = np.searchsorted(np.array(boundaries, dtype=object), sort_keys(table), side="right")
    return scatter(table, ranges.astype(np.int64), root, source)


def _best_first(root: str, k: int) -> pa.Table:
    table = gather(root, k, ALIVE_SCHEMA)
    return table.take(pa.array(np.argsort(sort_keys(table), kind="stable"))) if table.num_rows else table


def walk_clip_concepts(k: int, root: str, work: str, cfg: FilterConfig, state: dict) -> dict:
    """Range k of the CLIP-score and concept rules; returns the counters for range k + 1."""
    table = _best_first(root, k)
    rank0 = state["rank"]
    rank = rank0 + np.arange(table.num_rows)
    state["rank"] += table.num_rows
    rejected = np.zeros(table.num_rows, dtype=bool)
    if cfg.clip_bundle:
        score = table["clip_score"].to_numpy(zero_copy_only=False).astype(np.float64)
        clip = state["clip"]
        for name, r in clip["at_rank"].items():  # the values the report and threshold need, as they pass
            if rank0 <= r < rank0 + len(score):
                clip["values"][name] = float(score[r - rank0])
        clip["sum"] += float(np.nansum(score))
        threshold = cfg.clip_min_score if cfg.clip_min_score is not None else -np.inf
        top = rank < clip["top_n"] if clip["top_n"] is not None else np.ones(len(rank), bool)
        if clip["top_n"] is not None and "top" in clip["values"]:
            threshold = max(threshold, clip["values"]["top"])
        drop = ~((score >= (cfg.clip_min_score if cfg.clip_min_score is not None else -np.inf)) & top)
        rows = np.flatnonzero(drop)
        details = pa.array([f"CLIP score {score[r]:.4f} < {threshold:.4f}" for r in rows], pa.string())
        reject(table, rows, "clip_score", details, None, work, f"clip_score-{k:05d}")
        rejected[rows] = True
    if cfg.concept_cap > 0 and cfg.concept_queries:
        counts = state["concepts"]
        masks = table["concepts"].to_numpy()
        capped, unmatched = [], []
        for r in np.flatnonzero(~rejected):
            mask = int(masks[r])
            if not mask:
                if not cfg.concept_keep_unmatched:
                    unmatched.append(r)
                continue
            hit = [i for i in range(len(counts)) if mask >> i & 1]
            if any(counts[i] >= cfg.concept_cap for i in hit):
                capped.append(r)
            else:
                for i in hit:
                    counts[i] += 1
        for rows, why in ((unmatched, "caption matches no concept query"),
                          (capped, f"a query it matches already has {cfg.concept_cap} pairs")):
            reject(table, np.array(rows, np.int64), "concept_cap", pa.array([why] * len(rows), pa.string()), None,
                    work, f"concept_cap-{k:05d}-{len(why)}")
            rejected[rows] = True
    state["left"] += survivors(table, np.flatnonzero(rejected), storage.join(work, "live", "ranked",
                                                                              f"part-{k:05d}.parquet"))
    return state


def walk_languages(k: int, work: str, cfg: FilterConfig, state: dict) -> dict:
    """Range k of the language quota: within each language the best pairs up to its limit stay."""
    src = storage.join(work, "live", "ranked", f"part-{k:05d}.parquet")
    if not storage.exists(src):
        return state
    table = read_table(src)
    table = table.take(pa.array(np.argsort(sort_keys(table), kind="stable")))
    quotas, seen = cfg.language_quotas(), state["seen"]
    langs = table["language"].to_pylist()
    over = []
    for r, lang in enumerate(langs):
        name = lang or "unknown"
        if name not in seen:
            limit = quotas.get(lang, quotas.get("*"))
            limit = None if limit is None else int(math.floor(limit * state["n"]) if limit < 1 else limit)
            seen[name] = [0, limit]
        count, limit = seen[name]
        if limit is not None and count >= limit:
            over.append(r)
        seen[name][0] = count + 1
    details = pa.array([f"language {langs[r] or 'unknown'} already has {seen[langs[r] or 'unknown'][1]} pairs"
                        for r in over], pa.string())
    reject(table, np.array(over, np.int64), "language_quota", details, None, work, f"language_quota-{k:05d}")
    return state


def ranked_rules(run: Run, work: str, inputs: list[str], parts: int, total: int, cfg: FilterConfig) -> dict:
    """Sort by rank, then the CLIP-score, concept and language rules in rank order (see the module doc)."""
    samples = sorted(s for keys in run(sample_keys, [{"src": s} for s in inputs]) for s in keys)
    cut = [samples[len(samples) * i // parts] for i in range(1, parts)] if samples else []
    root = storage.join(work, "shuffle", "ranked")
    list(run(map_range, [{"src": s, "root": root, "source": f"s{i:06d}", "boundaries": cut}
                         for i, s in enumerate(inputs)]))
    ranges = len(cut) + 1
    top_n = max(1, math.ceil(cfg.clip_top_fraction * total)) if cfg.clip_top_fraction is not None and total else None
    at_rank = {"top": top_n - 1} if top_n is not None else {}
    for q in (0.1, 0.5, 0.9):  # np.quantile's neighbours, as ranks in best-first order
        pos = q * (total - 1)
        at_rank[f"{q}lo"], at_rank[f"{q}hi"] = total - 1 - math.floor(pos), total - 1 - math.ceil(pos)
    state = {"n": total, "rank": 0, "left": 0, "concepts": [0] * len(cfg.concept_queries),
             "clip": {"top_n": top_n, "at_rank": at_rank, "values": {}, "sum": 0.0}}
    for k in range(ranges):
        state = next(iter(run(walk_clip_concepts, [{"k": k, "root": root, "work": work, "cfg": cfg,
                                                    "state": state}])))
    report: dict = {"clip_score": {}, "concept_counts": {}, "language_quota": {}}
    if cfg.clip_bundle:
        report["clip_score"] = _clip_report(state, total, cfg)
    if cfg.concept_cap > 0 and cfg.concept_queries:
        report["concept_counts"] = dict(zip(cfg.concept_queries, state["concepts"]))
    if cfg.language_quota:
        lang = {"n": state["left"], "seen": {}}
        for k in range(ranges):
            lang = next(iter(run(walk_languages, [{"k": k, "work": work, "cfg": cfg, "state": lang}])))
        report["language_quota"] = {name: {"limit": limit, "kept": count if limit is None else min(count, limit),
                                           "dropped": 0 if limit is None else max(0, count - limit)}
                                    for name, (count, limit) in lang["seen"].items()}
    return report


def _clip_report(state: dict, n: int, cfg: FilterConfig) -> dict:
    values = state["clip"]["values"]
    threshold = cfg.clip_min_score if cfg.clip_min_score is not None else -np.inf
    if "top" in values:
        threshold = max(threshold, values["top"])
    quantiles = {}
    for q in (0.1, 0.5, 0.9):
        pos = q * (n - 1)
        lo, hi = values.get(f"{q}lo"), values.get(f"{q}hi")
        if lo is not None and hi is not None:
            quantiles[q] = lo + (hi - lo) * (pos - math.floor(pos))
    return {"scored": n, "threshold": float(threshold) if np.isfinite(threshold) else None,
            "mean": state["clip"]["sum"] / n if n else None, "quantiles": quantiles if n else {}}
