"""Filter-stage benchmark: throughput (records/s per core) and near-duplicate search scaling.

    .venv/bin/python benchmarks/bench_filter.py [--records 400] [--hashes 10000] [--cpus 2]

1. Per-record rules (decode, size, caption, privacy, language, sha256, pHash) in one process: the
   per-core baseline; then the whole stage on Ray Data with --cpus workers (records/s and per core,
   Ray start-up excluded: it is measured on a second run in the same Ray session).
2. Near-duplicate search on n and 4n 64-bit hashes (uniform and biased bits, 1 % planted
   near-duplicates): banded bucketing vs the all-pairs baseline. Linear search grows ~4x from n to 4n,
   all pairs ~16x. Not asserted; numbers are printed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from components.common import config  # noqa: E402
from components.common.ray_runtime import ray_session  # noqa: E402
from components.filter.config import FilterConfig  # noqa: E402
from components.filter.dedup import naive_near_duplicate_pairs, near_duplicate_pairs  # noqa: E402
from components.filter.rules import analyse, detect_language  # noqa: E402
from components.filter.sources import iter_records  # noqa: E402
from components.filter.stage import filter_pairs  # noqa: E402
from components.synthetic.corpus import generate_corpus  # noqa: E402


def bench_throughput(records: int, cpus: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        raw = str(Path(tmp) / "raw")
        generate_corpus(raw, n=records, seed=0)
        print(f"corpus: {records} records generated in {time.perf_counter() - t:.1f}s")
        cfg = config.from_dict(FilterConfig, {"source_uri": raw})
        recs = list(iter_records(raw, cfg.source))
        detect_language("warm up the language model")
        t = time.perf_counter()
        for i, r in enumerate(recs):
            analyse(r, i, cfg)
        single = len(recs) / (time.perf_counter() - t)
        print(f"per-record rules, 1 process: {single:.0f} records/s (baseline per core)")

        # One Ray session for both runs: filter_pairs joins it instead of starting its own.
        with ray_session(num_cpus=cpus, log_to_driver=False):
            cfg = config.from_dict(FilterConfig, {"source_uri": raw,
                                                  "source.files_per_unit": max(16, records // (4 * cpus))})
            filter_pairs(str(Path(tmp) / "warm"), cfg)  # worker start-up
            stats = filter_pairs(str(Path(tmp) / "out"), cfg)
        rate = stats["total"] / stats["timing"]["total_s"]
        print(f"filter stage on Ray Data, {cpus} CPUs: {rate:.0f} records/s = {rate / cpus:.0f} records/s per core "
              f"({rate / cpus / single:.2f}x the 1-process baseline per core); kept {stats['kept']}/{stats['total']}; "
              f"timing {', '.join(f'{k}={v:.2f}' for k, v in stats['timing'].items())}")


def _hashes(n: int, biased: bool, rng: np.random.Generator) -> np.ndarray:
    p = rng.uniform(0.25, 0.75, 64) if biased else np.full(64, 0.5)
    bits = rng.random((n, 64)) < p
    h = np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64)
    dup = rng.choice(n, size=n // 100, replace=False)
    for i in dup:  # plant near-duplicates 1-6 bits away from a random other hash
        j = int(rng.integers(n))
        flip = np.uint64(0)
        for b in rng.choice(64, size=int(rng.integers(1, 7)), replace=False):
            flip |= np.uint64(1) << np.uint64(b)
        h[i] = h[j] ^ flip
    return h.view(np.int64)


def _time(fn, *args) -> tuple[float, int]:
    t = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t, len(out)


def bench_near_duplicates(n: int, k: int) -> None:
    rng = np.random.default_rng(0)
    for biased in (False, True):
        small, large = _hashes(n, biased, rng), _hashes(4 * n, biased, rng)
        tb1, p1 = _time(near_duplicate_pairs, small, k)
        tb4, p4 = _time(near_duplicate_pairs, large, k)
        tn1, q1 = _time(naive_near_duplicate_pairs, small, k)
        tn4, q4 = _time(naive_near_duplicate_pairs, large, k)
        assert (p1, p4) == (q1, q4), "banded search must find exactly the all-pairs result"
        kind = "biased bits" if biased else "uniform bits"
        print(f"near-dup search ({kind}, k={k}): banded n={n}: {tb1 * 1e3:.0f} ms, 4n={4 * n}: {tb4 * 1e3:.0f} ms "
              f"(x{tb4 / tb1:.1f}; linear = x4, quadratic = x16) | all pairs: {tn1 * 1e3:.0f} ms -> {tn4 * 1e3:.0f} ms "
              f"(x{tn4 / tn1:.1f}) | banded is {tn4 / tb4:.0f}x faster at 4n | pairs found {p1}, {p4}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=400)
    ap.add_argument("--hashes", type=int, default=10000)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--max-distance", type=int, default=config.from_dict(FilterConfig).near_dup_max_distance)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    bench_near_duplicates(args.hashes, args.max_distance)
    if not args.skip_throughput:
        bench_throughput(args.records, args.cpus)


if __name__ == "__main__":
    main()
