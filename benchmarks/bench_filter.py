"""Filter-stage benchmark: records/s per core, Ray against one process, the driver's peak memory, and
near-duplicate search scaling.

    .venv/bin/python benchmarks/bench_filter.py [--sizes 1000,10000] [--cpus 2] [--data /tmp/bench-filter]

1. Throughput, default preset, 256-px JPEGs in img2dataset-style tars (KEY.jpg + KEY.txt; terse
   English alt-text captions, 2 % other languages, 1 % corrupt images), for each size:
   the whole stage in one process (`runner=local`: the per-core baseline) and on a local Ray with
   --cpus workers (`runner=ray`), each in a fresh process, so every figure includes loading the
   language models once per process. Printed: wall-clock records/s (and per core), records per
   CPU-second of all the run's processes (driver, Ray's GCS, raylet and workers: the per-core rate
   an idle machine would show, and what a shared one cannot), Ray's per-CPU-second rate as a ratio to
   the single process's, Ray's start-up, and the driver's peak RSS (ru_maxrss of the driver process).
   Goals: >= 300 records/s per core, Ray >= 0.8x, driver RSS at the largest size <= 1.5x the next.
2. Near-duplicate search on n and 4n 64-bit hashes: multi-index hashing (dedup.py) vs the all-pairs baseline.
The datasets are generated once into --data and reused. Not asserted; numbers are printed.
"""

from __future__ import annotations

import argparse
import contextlib
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

def _jpeg(rng: np.random.Generator, side: int = 256) -> bytes:
    from PIL import Image

    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((side, side), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_dataset(root: Path, n: int, per_tar: int, side: int = 256) -> Path:
    """n pairs (`side`-px JPEGs) as tars of `per_tar` samples under root/<n> (root/<n>-<side>px when not 256);
    reused when already complete."""
    from components.filter.langid import load_eval_set
    from components.synthetic.captions import short_caption
    from components.synthetic.scenes import random_scene

    out = root / (str(n) if side == 256 else f"{n}-{side}px")
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
                image = rng.bytes(4000) if rng.random() < 0.01 else _jpeg(rng, side)
                for name, data in ((f"{i:09d}.jpg", image), (f"{i:09d}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    done.write_text("")
    print(f"generated {n} pairs in {time.perf_counter() - t:.0f}s -> {out}", flush=True)
    return out


# --------------------------------------------------------------------------- one measurement (a subprocess)

def _cpu_seconds(procs: dict) -> float:
    """CPU seconds (user + system) used so far by this process and its descendants (Ray's GCS, raylet and
    workers when this process started Ray); `procs` remembers each process's last reading, so one that
    exits between two readings still counts with what it had used."""
    import psutil

    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            procs[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return sum(procs.values())


def measure(source: str, runner: str, cpus: int, runs: int) -> dict:
    """The stage `runs` times in this process (one Ray session); wall and CPU seconds of each run, CPU
    counted over this process and every process it started. A second run shows the steady state:
    worker processes up, language models loaded."""
    import threading

    from components.common.ray_runtime import ray_session
    from components.filter.stage import filter_pairs

    procs: dict[int, float] = {}
    stop = threading.Event()

    def sample() -> None:  # Ray's workers come and go: read every process's CPU time regularly
        while not stop.wait(0.5):
            _cpu_seconds(procs)

    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        cfg = config.from_dict(FilterConfig, {"source_uri": source, "runner": runner, "num_cpus": cpus})
        t = time.perf_counter()
        with ray_session(num_cpus=cpus, log_to_driver=False) if runner == "ray" else contextlib.nullcontext():
            start_s = time.perf_counter() - t
            watcher = threading.Thread(target=sample, daemon=True)
            watcher.start()
            out = []
            for i in range(runs):
                cpu0 = _cpu_seconds(procs)
                stats = filter_pairs(os.path.join(tmp, str(i)), cfg)
                out.append({"wall_s": stats["timing"]["total_s"], "cpu_s": _cpu_seconds(procs) - cpu0})
            stop.set()
            watcher.join()
    return {"total": stats["total"], "kept": stats["kept"], "runs": out, "start_s": start_s,
            "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _run(source: Path, runner: str, cpus: int, runs: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--measure", str(source), "--runner", runner,
                           "--cpus", str(cpus), "--runs", str(runs)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{runner} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def bench_throughput(sizes: list[int], cpus: int, data: Path, warm_max: int) -> None:
    load = os.getloadavg()[0]
    print(f"\n== throughput: default preset, 256-px JPEGs in tars; one process vs Ray with {cpus} CPUs "
          f"(load average {load:.1f} on {os.cpu_count()} cores when it started)")
    print("per CPU-s: records per CPU-second of all the run's processes = the rate per core of an idle machine "
          "(this one may be shared); cold: a fresh process (Ray started, models loaded, excluded: Ray's start-up); "
          f"warm: a second run in the same process and Ray (sizes <= {warm_max})")
    print(f"{'records':>8} {'runner':>6} {'run':>4} {'wall rec/s':>10} {'wall/core':>9} {'per CPU-s':>9} "
          f"{'vs 1-proc':>9} "
          f"{'Ray start s':>11} {'driver RSS MB':>13}")
    rss: dict[int, float] = {}
    for n in sizes:
        source = make_dataset(data, n, per_tar=max(100, n // 40))
        runs = 2 if n <= warm_max else 1
        single, on_ray = _run(source, "local", 1, runs), _run(source, "ray", cpus, runs)
        for i, label in enumerate(("cold", "warm")[:runs]):
            base = single["total"] / single["runs"][i]["cpu_s"]
            for name, r, cores in (("local", single, 1), ("ray", on_ray, cpus)):
                wall = r["total"] / r["runs"][i]["wall_s"]
                per_cpu = r["total"] / r["runs"][i]["cpu_s"]
                print(f"{n:>8} {name:>6} {label:>4} {wall:>10.0f} {wall / cores:>9.0f} {per_cpu:>9.0f} "
                      f"{per_cpu / base:>8.2f}x {r['start_s']:>11.1f} {r['driver_rss_mb']:>13.0f}", flush=True)
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
        assert (p1, p4) == (q1, q4), "the multi-index search must find exactly the all-pairs result"
        kind = "biased bits" if biased else "uniform bits"
        print(f"near-dup search ({kind}, k={k}): banded n={n}: {tb1 * 1e3:.0f} ms, 4n={4 * n}: {tb4 * 1e3:.0f} ms "
              f"(x{tb4 / tb1:.1f}; linear = x4, quadratic = x16) | all pairs: {tn1 * 1e3:.0f} ms -> {tn4 * 1e3:.0f} ms "
              f"(x{tn4 / tn1:.1f}) | banded is {tn4 / tb4:.0f}x faster at 4n | pairs found {p1}, {p4}")


def data_arguments(ap: argparse.ArgumentParser, sizes: str) -> None:
    """--sizes (records per run) and --data (where the generated datasets stay between runs): the filter's
    benchmarks share both, and so the datasets."""
    ap.add_argument("--sizes", default=sizes, help=f"records per run, comma-separated (default {sizes})")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "bench-filter"),
                    help="where the generated datasets are kept between runs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data_arguments(ap, "1000,10000")
    ap.add_argument("--cpus", type=int, default=2, help="Ray workers (CPUs of the local Ray)")
    ap.add_argument("--hashes", type=int, default=10000)
    ap.add_argument("--max-distance", type=int, default=config.from_dict(FilterConfig).near_dup_max_distance)
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-near", action="store_true", help="skip the near-duplicate search benchmark")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one run in this process, JSON out
    ap.add_argument("--runner", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--warm-max", type=int, default=10000, help="sizes up to this also get a warm second run")
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.runner, args.cpus, args.runs)))
        return
    if not args.skip_near:
        bench_near_duplicates(args.hashes, args.max_distance)
    if not args.skip_throughput:
        bench_throughput([int(s) for s in args.sizes.split(",")], args.cpus, Path(args.data), args.warm_max)


if __name__ == "__main__":
    main()
