"""Near-duplicate search (multi-index hashing over pHashes) on its own, without the stage: exact against all
pairs, >= 99 % recall on planted pairs among 100k hashes, and bounded comparisons per hash as n grows."""

from __future__ import annotations

import numpy as np

from components.filter.config import FilterConfig
from components.filter.dedup import naive_near_duplicate_pairs, near_duplicate_pairs


def test_banded_search_equals_all_pairs():
    rng = np.random.default_rng(0)
    base = rng.integers(-2**63, 2**63 - 1, size=3000, dtype=np.int64)
    for i, d in enumerate((1, 3, 6, 7, 9)):
        mask = np.uint64(0)
        for b in rng.choice(64, size=d, replace=False):
            mask |= np.uint64(1) << np.uint64(b)
        base[10 * i + 1] = (base[10 * i:10 * i + 1].view(np.uint64) ^ mask).view(np.int64)[0]
    for k in (0, 3, 6, 8):
        assert np.array_equal(near_duplicate_pairs(base, k), naive_near_duplicate_pairs(base, k))
    found = {tuple(p) for p in near_duplicate_pairs(base, 6).tolist()}
    assert {(0, 1), (10, 11), (20, 21)} <= found and (30, 31) not in found



def test_near_duplicate_recall_among_100k_hashes():
    """Planted pairs at every distance 0..near_dup_max_distance among 100k random pHashes: the multi-index
    search finds >= 99 % of them (it is exact by pigeonhole, so all), finds every pair an exhaustive search
    finds for a sample of records, and compares a bounded number of candidates per record."""
    from components.filter.dedup import BandPlan, auto_key_bits, band_rows, bucket_pairs

    rng = np.random.default_rng(7)
    n, d, per_distance = 100_000, FilterConfig().near_dup_max_distance, 60
    h = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    slots = rng.permutation(n)[:2 * per_distance * (d + 1)].reshape(-1, 2)
    planted = set()
    for i, (a, b) in enumerate(slots):
        mask = np.uint64(0)
        for bit in rng.choice(64, size=i // per_distance, replace=False):
            mask |= np.uint64(1) << np.uint64(bit)
        h[b] = (h[a:a + 1].view(np.uint64) ^ mask).view(np.int64)[0]
        planted.add((min(a, b), max(a, b)))
    found = {tuple(p) for p in near_duplicate_pairs(h, d).tolist()}
    assert len(planted & found) / len(planted) >= 0.99

    sample = rng.choice(n, size=200, replace=False)  # exhaustive for these records against all
    dist = np.bitwise_count(h[sample][:, None].view(np.uint64) ^ h[None, :].view(np.uint64))
    rows, cols = np.nonzero(dist <= d)
    truth = {(min(int(sample[r]), int(c)), max(int(sample[r]), int(c))) for r, c in zip(rows, cols) if sample[r] != c}
    assert truth <= found

    plan = BandPlan.for_distance(d, auto_key_bits(n))
    _, stats = bucket_pairs(*band_rows(np.unique(h), plan), plan)
    assert stats["candidates"] / n <= len(plan.tables)  # about 4 per bucket, half of them compared
    print(f"recall {len(planted & found) / len(planted):.3f}, {len(plan.tables)} tables, "
          f"{stats['candidates'] / n:.1f} candidate comparisons per record")


def test_band_plan_keeps_comparisons_bounded_on_skewed_hashes():
    """pHashes are far from uniform: with bits set with probabilities between 0.25 and 0.75, 16-bit keys
    would crowd the buckets as n grows; the plan chosen on a sample keeps the comparisons per hash under
    its target at 20k and at 80k, and still finds every pair within the distance of a sample."""
    from components.filter.dedup import BandPlan, band_rows, bucket_pairs, choose_plan
    from components.common.shuffle import mix64

    rng = np.random.default_rng(3)
    p = rng.uniform(0.25, 0.75, 64)
    per_hash, fixed_per_hash = {}, {}
    for n in (20_000, 80_000):
        bits = rng.random((n, 64)) < p
        h = np.unique(np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64).view(np.int64))
        sample = h[np.argsort(mix64(h), kind="stable")[:65536]]
        plan = choose_plan(6, len(h), sample)
        pairs, stats = bucket_pairs(*band_rows(h, plan), plan)
        per_hash[n] = stats["candidates"] / len(h)
        fixed = BandPlan.for_distance(6, 16)  # the shortest keys, for comparison
        fixed_per_hash[n] = bucket_pairs(*band_rows(h, fixed), fixed)[1]["candidates"] / len(h)
        some = h[:100]
        dist = np.bitwise_count(some[:, None].view(np.uint64) ^ h[None, :].view(np.uint64))
        truth = {(min(a, b), max(a, b)) for a, b in zip(np.repeat(some, len(h))[(dist <= 6).ravel()],
                                                        np.tile(h, len(some))[(dist <= 6).ravel()]) if a != b}
        assert truth <= {tuple(x) for x in pairs.tolist()}
    assert fixed_per_hash[80_000] > 3 * fixed_per_hash[20_000]  # fixed keys: crowding grows with n
    assert max(per_hash.values()) <= 40 and per_hash[80_000] < fixed_per_hash[80_000], (per_hash, fixed_per_hash)



def test_plan_estimate_counts_bucket_pairs_in_bounded_memory():
    """The driver's estimate of a plan (issue 19): the pairs of the sample sharing a bucket, counted one table
    at a time. It equals the count over all (table, key) rows at once, and on the driver's full sample
    (65,536 pHashes) with a 462-table plan its numpy allocations stay under 16 MB (all tables at once: about
    56 B per table and sample row, 1.7 GB)."""
    import tracemalloc

    from components.filter.dedup import BandPlan, band_rows, expected_candidates

    rng = np.random.default_rng(5)
    small = (rng.integers(0, 1 << 12, 3000) * np.int64(0x1000100010001)).astype(np.int64)  # crowded buckets
    plan = BandPlan.for_distance(6, 24)
    table, keys, _ = band_rows(small, plan)
    _, sizes = np.unique(np.stack([table, keys], axis=1), axis=0, return_counts=True)
    pairs = int((sizes * (sizes - 1) // 2).sum())
    assert pairs > 0
    assert expected_candidates(plan, small, 30_000) == pairs * (30_000 / len(small)) ** 2 / 30_000

    sample = rng.integers(-2**63, 2**63 - 1, 65536, dtype=np.int64)
    big = BandPlan.for_distance(6, 26)
    assert len(big.tables) == 462
    tracemalloc.start()
    try:
        expected_candidates(big, sample, 1_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MB"


def test_phash_sample_is_the_same_bottom_k_in_any_order():
    """The driver keeps a bounded bottom-k of the partitions' pHash samples as they arrive (never all of them);
    merged in any order it is the bottom-k of the union, at most SAMPLE_SIZE values."""
    from components.filter.decide import _bottom_k

    rng = np.random.default_rng(6)
    values = np.unique(rng.integers(-2**63, 2**63 - 1, 5000, dtype=np.int64))
    parts = np.array_split(rng.permutation(values), 7)
    whole = _bottom_k(values, 300)
    for order in (range(7), reversed(range(7)), rng.permutation(7)):
        sample = np.zeros(0, np.int64)
        for i in order:
            sample = _bottom_k(np.concatenate([sample, _bottom_k(parts[i], 100)]), 300)
            assert len(sample) <= 300
        assert sample.tolist() == whole.tolist()


def test_band_round_holds_a_bounded_number_of_rows(tmp_path, monkeypatch):
    """A band task held its partition's pHashes x tables at once (about 670 MB of rows per task at 1M, issue 19,
    growing with the plan's tables). The band round now takes enough partitions for about BAND_ROWS rows each,
    and its map writes the tables a chunk at a time; the pairs found are those of one in-memory search."""
    import pyarrow as pa

    from components.filter import decide
    from components.filter.dedup import BandPlan, band_rows, bucket_pairs
    from components.common.shuffle import gather, read_table, write_table

    monkeypatch.setattr(decide, "BAND_ROWS", 4000)
    rng = np.random.default_rng(7)
    hashes = np.unique(rng.integers(-2**63, 2**63 - 1, 3000, dtype=np.int64))
    hashes[1::50] = (hashes[::50].view(np.uint64) ^ np.uint64(0b1011)).view(np.int64)[:len(hashes[1::50])]
    hashes = np.unique(hashes)
    plan, parts, work = BandPlan.for_distance(4, 18), 3, str(tmp_path)
    for p, part in enumerate(np.array_split(hashes, parts)):
        write_table(f"{work}/near/nodes/part-{p:05d}.parquet", pa.table({"phash": part}))
    bands = decide.band_partitions(len(hashes), plan, parts)
    assert bands == -(-len(hashes) * len(plan.tables) // 4000) > parts
    for p in range(parts):
        assert decide.map_bands(p, work, bands, plan) > bands  # more than one chunk of tables each
    for f in (tmp_path / "near" / "bands").rglob("*.parquet"):
        assert read_table(str(f)).num_rows <= 4000
    held = [gather(f"{work}/near/bands", p, decide.BAND_SCHEMA).num_rows for p in range(bands)]
    assert sum(held) == len(hashes) * len(plan.tables) and max(held) <= 2 * 4000, held
    stats = [decide.reduce_bands(p, work, parts, plan, 0) for p in range(bands)]
    edges = pa.concat_tables([gather(f"{work}/near/edges", p, decide.EDGE_SCHEMA) for p in range(parts)])
    found = {(a, b) for a, b in zip(edges["src"].to_pylist(), edges["dst"].to_pylist()) if a < b}
    whole, _ = bucket_pairs(*band_rows(hashes, plan), plan)
    assert found == {tuple(p) for p in whole.tolist()} and len(found) >= 50
    assert sum(s["pairs"] for s in stats) == len(found)
