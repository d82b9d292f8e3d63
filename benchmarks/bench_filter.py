"""Filter-stage benchmark: records/s per core, Ray against one process, the driver's peak memory, and
near-duplicate search scaling.

    .venv/bin/python benchmarks/bench_filter.py [--sizes 1000,10000] [--cpus 2] [--data /tmp/bench-filter]

1. Throughput, default preset, 256-px JPEGs in img2dataset-style tars (KEY.jpg + KEY.txt; terse
   English alt-text captions, 2 % other languages, 1 % corrupt images), for each size:
   the whole stage in one process (`runner=local`: the per-core baseline) and on a local Ray with
   --cpus workers (`runner=ray`), each in a fresh process, so every figure includes loading the
   language models once per process. Printed: records/s, records/s per core, Ray's per-core rate as
   a ratio to the single-process rate (with and without Ray's start-up), and the driver's peak RSS
   (ru_maxrss of the driver process; Ray's workers are other processes).
   Goals: >= 300 records/s per core, Ray >= 0.8x, driver RSS at the largest size <= 1.5x the next.
2. Near-duplicate search on n and 4n 64-bit hashes: banded bucketing vs the all-pairs baseline.
The datasets are generated once into --data and reused. Not asserted; numbers are printed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.common import config  # noqa: E402
from components.filter.config import FilterConfig  # noqa: E402
from components.filter.dedup import naive_near_duplicate_pairs, near_duplicate_pairs  # noqa: E402


# --------------------------------------------------------------------------- data

def _jpeg(rng: np.random.Generator) -> bytes:
    from PIL import Image

    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((256, 256), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(root: Path, n: int, per_tar: int) -> Path:
    """n pairs as tars of `per_tar` samples under root/<n>; reused when already complete."""
    from components.filter.langid import load_eval_set
    from components.synthetic.captions import short_caption
    from components.synthetic.scenes import random_scene

    out = root / str(n)
    done = out / "_complete"
    if done.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    foreign = [text for lang, text in load_eval_set() if lang != "en"]
    t = time.perf_counter()
    for start in range(0, n, per_tar):
        with tarfile.open(out / f"{start // per_tar:05d}.tar", "w") as tar:
            for i in range(start, min(n, start + per_tar)):
                scene = random_scene(rng)
                roll = rng.random()
                caption = foreign[int(rng.integers(len(foreign)))] if roll < 0.02 else \
                    short_caption(scene, rng) if roll < 0.6 else scene.caption(rng)
                image = rng.bytes(4000) if rng.random() < 0.01 else _jpeg(rng)
                for name, data in ((f"{i:09d}.jpg", image), (f"{i:09d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    done.write_text("")
    print(f"generated {n} pairs in {time.perf_counter() - t:.0f}s -> {out}", flush=True)
    return out


# --------------------------------------------------------------------------- one measurement (a subprocess)

def measure(source: str, runner: str, cpus: int) -> dict:
    from components.filter.stage import filter_pairs

    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        cfg = config.from_dict(FilterConfig, {"source_uri": source, "runner": runner, "num_cpus": cpus})
        stats = filter_pairs(tmp, cfg)
    return {"total": stats["total"], "kept": stats["kept"], "timing": stats["timing"],
            "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run(source: Path, runner: str, cpus: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--measure", str(source), "--runner", runner,
                           "--cpus", str(cpus)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{runner} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_throughput(sizes: list[int], cpus: int, data: Path) -> None:
    print(f"\n== throughput: default preset, 256-px JPEGs in tars, local runner (1 core) vs Ray ({cpus} CPUs)")
    print(f"{'records':>8} {'runner':>6} {'records/s':>9} {'per core':>8} {'Ray/1-proc':>10} {'w/o start':>9} "
          f"{'start s':>7} {'driver RSS MB':>13}")
    rss: dict[int, float] = {}
    for n in sizes:
        source = make_dataset(data, n, per_tar=max(100, n // 40))
        single = _run(source, "local", 1)
        on_ray = _run(source, "ray", cpus)
        base = single["total"] / single["timing"]["total_s"]
        for name, r, cores in (("local", single, 1), ("ray", on_ray, cpus)):
            rate = r["total"] / r["timing"]["total_s"]
            warm = r["total"] / (r["timing"]["total_s"] - r["timing"]["start_s"])
            print(f"{n:>8} {name:>6} {rate:>9.0f} {rate / cores:>8.0f} {rate / cores / base:>9.2f}x "
                  f"{warm / cores / base:>8.2f}x {r['timing']['start_s']:>7.1f} {r['driver_rss_mb']:>13.0f}", flush=True)
        rss[n] = on_ray["driver_rss_mb"]
    if len(sizes) > 1:
        a, b = sizes[-2], sizes[-1]
        print(f"driver RSS (Ray) at {b} / at {a}: {rss[b] / rss[a]:.2f}x (goal <= 1.5x)")


# --------------------------------------------------------------------------- near-duplicate search

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
    ap.add_argument("--sizes", default="1000,10000", help="records per throughput run, e.g. 1000,10000,100000")
    ap.add_argument("--cpus", type=int, default=2, help="Ray workers (CPUs of the local Ray)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "bench-filter"),
                    help="where the generated datasets are kept between runs")
    ap.add_argument("--hashes", type=int, default=10000)
    ap.add_argument("--max-distance", type=int, default=config.from_dict(FilterConfig).near_dup_max_distance)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one run in this process, JSON out
    ap.add_argument("--runner", default="local", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.runner, args.cpus)))
        return
    bench_near_duplicates(args.hashes, args.max_distance)
    if not args.skip_throughput:
        bench_throughput([int(s) for s in args.sizes.split(",")], args.cpus, Path(args.data))


if __name__ == "__main__":
    main()
