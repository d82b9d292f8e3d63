"""The whole-dataset rules, as shuffles over the compact columns of the records that passed every
per-record rule (`ALIVE_SCHEMA`, written by each analysed unit to `_work/alive/`).

Each rule is a groupby on a key: a hash-partitioned shuffle (components/common/shuffle.py) whose reduce tasks see whole
groups. The survivors of one rule are the next one's input (`_work/live/<rule>/part-<p>`); the rejections
go straight to their unit (`_work/rejects/p-<unit>/`), where the final write applies them. In rule order:

1. `duplicate_key` (by key): a key seen earlier in source order (uid order) goes;
2. `duplicate_exact` (by the digest of image sha256 + normalised caption): the smallest key stays;
3. `near_duplicate`: pHash within `near_dup_max_distance` bits, joined into clusters (chains count); the
   largest image of a cluster stays, then the smallest key. In rounds:
   a. by pHash: the distinct pHashes (equal pHashes are one node of the graph, so exact pHash copies cost
      nothing below);
   b. by band key: multi-index hashing (dedup.py) finds every pair of distinct pHashes within the
      distance, each pair once, per bucket; the edges are written by node;
   c. clusters by min-label propagation, one shuffle per step: a node's label is the smallest pHash it
      has heard of; a node whose label fell tells its neighbours. It stops when no label changes (steps =
      the longest chain), and no process ever holds more than one partition of the graph;
   d. records by their cluster label, then each cluster keeps its best image;
4. `clip_score`, `concept_cap`, `language_quota`: rules on the rank of a record (best CLIP score first,
   then key): ranked.py.

The driver only hands out file names and adds up counts: no column of the records passes through it.
Ties break by key (then uid), so the result is the same whichever task ran first, where, and how many
partitions there were.
"""

from __future__ import annotations

import math
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from components.common import storage
from components.filter.config import FilterConfig
from components.filter.dedup import BandPlan, band_rows, bucket_pairs, choose_plan
from components.filter.ranked import ranked_rules
from components.common.shuffle import gather, mix64, partition_of, read_table, scatter, write_table
from components.filter.shuffle import ALIVE_SCHEMA, Run, live_uri, reject, survivors

BAND_SCHEMA = pa.schema([("table", pa.int64()), ("band", pa.int64()), ("phash", pa.int64())])
EDGE_SCHEMA = pa.schema([("src", pa.int64()), ("dst", pa.int64())])
LABEL_SCHEMA = pa.schema([("node", pa.int64()), ("label", pa.int64())])

def _group_firsts(table: pa.Table, group: str, order: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """(rows that are not first of their `group`, the first row of each such row's group), by `order`."""
    if not table.num_rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = pc.sort_indices(table, sort_keys=[(group, "ascending")] + order).to_numpy()
    g = table[group].to_numpy(zero_copy_only=False)[idx]
    start = np.ones(len(idx), dtype=bool)
    start[1:] = g[1:] != g[:-1]
    first = idx[np.flatnonzero(start)[np.cumsum(start) - 1]]
    return idx[~start], first[~start]


# --------------------------------------------------------------------------- map and the simple rules

def map_scatter(src: str, root: str, source: str, column: str, parts: int) -> int:
    """Map side of a shuffle: the rows of part `src` to their partitions of `column`."""
    if not storage.exists(src):
        return 0
    table = read_table(src)
    return scatter(table, partition_of(table[column].to_numpy(), parts), root, source)


def reduce_first(root: str, p: int, work: str, rule: str, cfg: FilterConfig) -> int:
    """duplicate_key (the first uid of a key stays) or duplicate_exact (the smallest key stays)."""
    table = gather(root, p, ALIVE_SCHEMA)
    if rule == "duplicate_key":
        dup, first = _group_firsts(table, "key", [("uid", "ascending")])
        originals = table["key"].take(pa.array(first))
        details = pa.array(["another record has this key (the first in source order stays)"] * len(dup))
    else:
        dup, first = _group_firsts(table, "exact", [("key", "ascending"), ("uid", "ascending")])
        originals = table["key"].take(pa.array(first))
        details = pc.binary_join_element_wise("same image and caption as ", originals, "")
    reject(table, dup, rule, details, originals, work, f"{rule}-{p:05d}")
    return survivors(table, dup, live_uri(work, rule, p))


# --------------------------------------------------------------------------- near duplicates

SAMPLE_PER_PARTITION = 4096  # pHashes each partition shows the driver to choose the band plan ...
SAMPLE_SIZE = 65536          # ... of which it keeps this many (the smallest by mix64: a uniform sample)


def reduce_distinct_phash(root: str, p: int, work: str) -> tuple[int, list[int]]:
    """3a: the distinct pHashes of this partition (nodes of the graph); (how many, a uniform bottom-k sample
    of them by their mix64 hash: the same on every run)."""
    table = gather(root, p, ALIVE_SCHEMA)
    nodes = pc.unique(table["phash"]).sort()
    if len(nodes):
        write_table(storage.join(work, "near", "nodes", f"part-{p:05d}.parquet"), pa.table({"phash": nodes}))
    return len(nodes), _bottom_k(nodes.to_numpy(), SAMPLE_PER_PARTITION).tolist()


def _bottom_k(values: np.ndarray, k: int) -> np.ndarray:
    """The k values with the smallest mix64 (distinct pHashes: no ties), so merging partial bottom-k's in any
    order gives the bottom-k of all of them: a uniform sample the same on every run."""
    return values[np.argsort(mix64(values), kind="stable")[:k]]


BAND_ROWS = 4 * 2**20  # (table, band key, pHash) rows a band task holds at a time (about 100 B each while a
                       # reduce pairs them): the band partitions and the map's chunks of tables are sized by it


def band_partitions(nodes: int, plan: BandPlan, parts: int) -> int:
    """Partitions of the band round: at least `parts`, and enough that each holds about BAND_ROWS rows (there
    are nodes x tables of them, so a band task's memory stays bounded however many tables the plan takes)."""
    return max(parts, -(-nodes * len(plan.tables) // BAND_ROWS))


def map_bands(p: int, work: str, parts: int, plan: BandPlan) -> int:
    """3b, map: each node once per table, to the band partition (of `parts`) of its (table, band key); the
    tables a chunk at a time, so that at most about BAND_ROWS rows are held at once."""
    src = storage.join(work, "near", "nodes", f"part-{p:05d}.parquet")
    if not storage.exists(src):
        return 0
    nodes = read_table(src)["phash"].to_numpy()
    per_chunk = max(1, BAND_ROWS // max(len(nodes), 1))
    files = 0
    for chunk, first in enumerate(range(0, len(plan.tables), per_chunk)):
        table, band, h = band_rows(nodes, plan, first, first + per_chunk)
        rows = pa.table({"table": table, "band": band, "phash": h}, schema=BAND_SCHEMA)
        bucket = partition_of(band ^ mix_table(table), parts)
        files += scatter(rows, bucket, storage.join(work, "near", "bands"), f"n{p:05d}-{chunk:04d}")
    return files


def mix_table(table: np.ndarray) -> np.ndarray:
    return (table.astype(np.int64) * np.int64(0x3C6EF372FE94F82B)).astype(np.int64)


def reduce_bands(p: int, work: str, parts: int, plan: BandPlan, bucket_cap: int) -> dict:
    """3b, reduce: the pairs within the distance among the buckets of band partition `p`, written as edges
    (both directions) to the partitions (of `parts`) of their source node."""
    rows = gather(storage.join(work, "near", "bands"), p, BAND_SCHEMA)
    pairs, stats = bucket_pairs(rows["table"].to_numpy(), rows["band"].to_numpy(), rows["phash"].to_numpy(),
                                plan, bucket_cap)
    if len(pairs):
        src = np.concatenate([pairs[:, 0], pairs[:, 1]])
        dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
        scatter(pa.table({"src": src, "dst": dst}, schema=EDGE_SCHEMA), partition_of(src, parts),
                storage.join(work, "near", "edges"), f"b{p:05d}")
    return stats | {"pairs": len(pairs)}


def _labels_uri(work: str, step: int, p: int) -> str:
    return storage.join(work, "near", "labels", f"{step:04d}", f"part-{p:05d}.parquet")


def propagate(p: int, step: int, work: str, parts: int) -> int:
    """3c, one step for this partition's nodes: label = min(label, what the neighbours said); the nodes
    whose label fell tell their neighbours (next step's messages). Returns the messages sent."""
    edges = gather(storage.join(work, "near", "edges"), p, EDGE_SCHEMA)
    if not edges.num_rows:
        return 0
    src, dst = edges["src"].to_numpy(), edges["dst"].to_numpy()
    if step == 0:
        nodes = np.unique(src)
        label = nodes.copy()
        changed = np.ones(len(nodes), dtype=bool)
    else:
        prev = read_table(_labels_uri(work, step - 1, p))
        nodes, label = prev["node"].to_numpy(), prev["label"].to_numpy().copy()
        msgs = gather(storage.join(work, "near", "messages", f"{step:04d}"), p, LABEL_SCHEMA)
        at = np.searchsorted(nodes, msgs["node"].to_numpy())
        before = label.copy()
        np.minimum.at(label, at, msgs["label"].to_numpy())
        changed = label < before
    write_table(_labels_uri(work, step, p), pa.table({"node": nodes, "label": label}, schema=LABEL_SCHEMA))
    at = np.searchsorted(nodes, src)
    send = changed[at]
    if not send.any():
        return 0
    out = pa.table({"node": dst[send], "label": label[at][send]}, schema=LABEL_SCHEMA)
    scatter(out, partition_of(dst[send], parts), storage.join(work, "near", "messages", f"{step + 1:04d}"),
            f"m{p:05d}")
    return int(send.sum())


def reduce_assign(root: str, p: int, work: str, parts: int, last_step: int) -> int:
    """3d: each record's cluster label (its pHash when it has no neighbour), to the partition of that label."""
    table = gather(root, p, ALIVE_SCHEMA)
    label = table["phash"].to_numpy().copy()
    uri = _labels_uri(work, last_step, p)
    if last_step >= 0 and storage.exists(uri) and table.num_rows:
        labels = read_table(uri)
        nodes = labels["node"].to_numpy()
        at = np.clip(np.searchsorted(nodes, label), 0, max(len(nodes) - 1, 0))
        hit = nodes[at] == label if len(nodes) else np.zeros(len(label), bool)
        label[hit] = labels["label"].to_numpy()[at[hit]]
    table = table.append_column("cluster", pa.array(label, pa.int64()))
    return scatter(table, partition_of(label, parts), storage.join(work, "near", "clusters"), f"a{p:05d}")


def reduce_clusters(p: int, work: str, cfg: FilterConfig) -> int:
    """3e: in each cluster the largest image stays (then the smallest key); the others are near duplicates."""
    schema = ALIVE_SCHEMA.append(pa.field("cluster", pa.int64()))
    table = gather(storage.join(work, "near", "clusters"), p, schema)
    dup, first = _group_firsts(table, "cluster", [("pixels", "descending"), ("key", "ascending"),
                                                  ("uid", "ascending")])
    originals = table["key"].take(pa.array(first))
    details = pc.binary_join_element_wise(f"pHash within {cfg.near_dup_max_distance} bits of ", originals, "")
    reject(table, dup, "near_duplicate", details, originals, work, f"near_duplicate-{p:05d}")
    return survivors(table.drop(["cluster"]), dup, live_uri(work, "near_duplicate", p))


def _near_duplicates(run: Run, work: str, inputs: list[str], parts: int, cfg: FilterConfig
                     ) -> tuple[list[str], dict, int]:
    by_phash = storage.join(work, "near", "by_phash")
    list(run(map_scatter, [{"src": s, "root": by_phash, "source": f"s{i:06d}", "column": "phash", "parts": parts}
                           for i, s in enumerate(inputs)]))
    nodes, sample = 0, np.zeros(0, np.int64)  # the bottom-k so far: at most SAMPLE_SIZE values, whatever n is
    for count, values in run(reduce_distinct_phash, [{"root": by_phash, "p": p, "work": work} for p in range(parts)]):
        nodes += count
        sample = _bottom_k(np.concatenate([sample, np.array(values, dtype=np.int64)]), SAMPLE_SIZE)
    plan = BandPlan.for_distance(cfg.near_dup_max_distance, cfg.near_dup_key_bits) if cfg.near_dup_key_bits \
        else choose_plan(cfg.near_dup_max_distance, nodes, sample)
    bands = band_partitions(nodes, plan, parts)
    list(run(map_bands, [{"p": p, "work": work, "parts": bands, "plan": plan} for p in range(parts)]))
    report = {"nodes": nodes, "tables": len(plan.tables), "blocks": len(plan.blocks), "candidates": 0, "pairs": 0,
              "capped_buckets": 0, "capped_rows": 0, "band_partitions": bands}
    for stats in run(reduce_bands, [{"p": p, "work": work, "parts": parts, "plan": plan,
                                     "bucket_cap": cfg.near_dup_bucket_cap} for p in range(bands)]):
        for k, v in stats.items():
            report[k] += v
    step = -1
    if report["pairs"]:
        while True:
            step += 1
            sent = sum(run(propagate, [{"p": p, "step": step, "work": work, "parts": parts} for p in range(parts)]))
            if not sent:
                break
    report["propagation_steps"] = step + 1
    report["candidates_per_node"] = report["candidates"] / nodes if nodes else 0.0
    list(run(reduce_assign, [{"root": by_phash, "p": p, "work": work, "parts": parts, "last_step": step}
                             for p in range(parts)]))
    left = sum(run(reduce_clusters, [{"p": p, "work": work, "cfg": cfg} for p in range(parts)]))
    return [live_uri(work, "near_duplicate", p) for p in range(parts)], report, left


# --------------------------------------------------------------------------- all rules

def partitions_for(total: int, units: int, cfg: FilterConfig) -> int:
    """Shuffle partitions: `cfg.shuffle_partitions`, else one per `partition_rows` records (>= min(units, 16))."""
    if cfg.shuffle_partitions:
        return cfg.shuffle_partitions
    return max(1, min(4096, max(math.ceil(total / cfg.partition_rows), min(units, 16))))


def decide(run: Run, work: str, inputs: list[str], total: int, cfg: FilterConfig) -> dict:
    """Run the whole-dataset rules over the ALIVE parts `inputs` (`total` rows); the rejections land in
    `<work>/rejects/p-<unit>/`. Returns the report: CLIP-score summary, concept counts, language quota,
    near-duplicate search figures."""
    parts = partitions_for(total, len(inputs), cfg)
    report: dict = {"clip_score": {}, "concept_counts": {}, "language_quota": {}}
    rules = ["duplicate_key"] + (["duplicate_exact"] if cfg.exact_dedup else [])
    for rule in rules:
        root = storage.join(work, "shuffle", rule)
        column = "key_hash" if rule == "duplicate_key" else "exact"
        list(run(map_scatter, [{"src": s, "root": root, "source": f"s{i:06d}", "column": column, "parts": parts}
                               for i, s in enumerate(inputs)]))
        total = sum(run(reduce_first, [{"root": root, "p": p, "work": work, "rule": rule, "cfg": cfg}
                                       for p in range(parts)]))
        inputs = [live_uri(work, rule, p) for p in range(parts)]
    if cfg.near_dedup:
        inputs, report["near_duplicates"], total = _near_duplicates(run, work, inputs, parts, cfg)
    if cfg.clip_bundle or (cfg.concept_cap > 0 and cfg.concept_queries) or cfg.language_quota:
        report.update(ranked_rules(run, work, inputs, parts, total, cfg))
    return report
