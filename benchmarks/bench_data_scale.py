"""Data path at scale: the filter and the shard stage at growing sizes, per-core rates and memory.

    .venv/bin/python benchmarks/bench_data_scale.py [--sizes 10000,100000,1000000] [--cpus 2] [--side 256]

For each size: img2dataset-style tars of `--side`-px JPEGs with terse captions (bench_filter.make_dataset:
2 % other languages, 1 % corrupt images; generated once into --data), then, each in a fresh process:
1. the filter (`filter_pairs`, default preset, `runner=ray` on a local Ray of --cpus CPUs);
2. the shard stage on its output (`components.shard.stage.shard`, default settings, tokenizer "openai"
   so that the figure is the sharding and not BPE training).
Printed per stage: records/s wall and per core (wall rate / CPUs), records per CPU-second of all the
run's processes (the per-core rate of an idle machine; this one may be shared), the driver's peak RSS
(ru_maxrss) and the node's peak RSS (driver + Ray's GCS, raylet and workers, sampled every 0.5 s; one
node here). Then the goal ratios: per-core rate at the largest size within 1.25x of the one before, the
driver's RSS there <= 1.2x, filter >= 300 records/s per core; and the 400M-pair sizing from the
measured per-CPU-second rates. With --side below 200 the filter's min_side is lowered to --side / 2
so that the pairs still pass (tiny images for the 1M point: say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_filter import _cpu_seconds, make_dataset  # noqa: E402

PAIRS_400M = 400_000_000


class Sampler:
    """Peak RSS of this process and of it plus every descendant, and their CPU seconds, every 0.5 s."""

    def __init__(self) -> None:
        self.node_peak = 0
        self.procs: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.wait(0.5):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.node_peak = max(self.node_peak, total)
            _cpu_seconds(self.procs)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measure(source: str, cpus: int, side: int) -> dict:
    """The filter then the shard stage in this process (one Ray session); figures for each."""
    from components.common import config
    from components.common.ray_runtime import ray_session
    from components.filter.config import FilterConfig
    from components.filter.stage import filter_pairs
    from components.shard.config import ShardConfig
    from components.shard.stage import shard

    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp, ray_session(num_cpus=cpus, log_to_driver=False):
        settings = {"source_uri": source, "runner": "ray", "num_cpus": cpus}
        if side < 200:
            settings["min_side"] = side // 2
        with Sampler() as s:
            cpu0 = _cpu_seconds(s.procs)
            stats = filter_pairs(os.path.join(tmp, "filtered"), config.from_dict(FilterConfig, settings))
            out["filter"] = {"records": stats["total"], "kept": stats["kept"], "wall_s": stats["timing"]["total_s"],
                             "cpu_s": _cpu_seconds(s.procs) - cpu0, "node_rss_mb": s.node_peak / 2**20,
                             "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                             "near": stats.get("near_duplicates", {})}
        with Sampler() as s:
            cpu0 = _cpu_seconds(s.procs)
            t = time.perf_counter()
            shard(os.path.join(tmp, "filtered"), os.path.join(tmp, "shards"),
                  config.from_dict(ShardConfig, {"tokenizer": "openai"}))
            out["shard"] = {"records": stats["kept"], "wall_s": time.perf_counter() - t,
                            "cpu_s": _cpu_seconds(s.procs) - cpu0, "node_rss_mb": s.node_peak / 2**20,
                            "driver_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return out


def _run(source: Path, cpus: int, side: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, __file__, "--measure", str(source), "--cpus", str(cpus),
                           "--side", str(side)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"measurement failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def sizing(rate_per_cpu_s: float, node_rss_mb: float, cpus: int, what: str, node_cpus: int = 16) -> str:
    core_h = PAIRS_400M / rate_per_cpu_s / 3600
    return (f"{what}: 400M pairs at {rate_per_cpu_s:.0f} records per CPU-second = {core_h:,.0f} core-hours = "
            f"{core_h / node_cpus:,.0f} node-hours of {node_cpus}-CPU nodes (e.g. 10 nodes: "
            f"{core_h / node_cpus / 10:.1f} h); memory per node ~ {node_rss_mb / cpus * node_cpus / 1024:.1f} GiB "
            f"({node_rss_mb:.0f} MB measured with {cpus} CPUs, scaled per CPU)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="records per run, e.g. 10000,100000,1000000")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--side", type=int, default=256, help="image side in px (tiny images for 1M, e.g. 64)")
    ap.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "bench-filter"),
                    help="where the generated datasets are kept between runs")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one size in this process, JSON out
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.cpus, args.side)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"== data path at scale: {args.side}-px JPEGs in tars, local Ray with {args.cpus} CPUs "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when it started)")
    print(f"{'records':>9} {'stage':>6} {'wall rec/s':>10} {'per core':>8} {'per CPU-s':>9} {'driver RSS MB':>13} "
          f"{'node RSS MB':>11}")
    results: dict[int, dict] = {}
    for n in sizes:
        source = make_dataset(Path(args.data), n, per_tar=max(100, min(10_000, n // 40)), side=args.side)
        results[n] = r = _run(source, args.cpus, args.side)
        for stage in ("filter", "shard"):
            m = r[stage]
            wall = m["records"] / m["wall_s"]
            print(f"{n:>9} {stage:>6} {wall:>10.0f} {wall / args.cpus:>8.0f} {m['records'] / m['cpu_s']:>9.0f} "
                  f"{m['driver_rss_mb']:>13.0f} {m['node_rss_mb']:>11.0f}", flush=True)
        near = r["filter"]["near"]
        if near:
            print(f"{'':>9} near-duplicate search: {near['nodes']} pHashes, {near['tables']} tables, "
                  f"{near['candidates_per_node']:.1f} candidate comparisons per pHash, {near['pairs']} pairs, "
                  f"{near['capped_buckets']} capped buckets", flush=True)
    if len(sizes) > 1:
        a, b = sizes[-2], sizes[-1]
        for stage in ("filter", "shard"):
            ra, rb = (results[x][stage] for x in (a, b))
            per_core = (ra["records"] / ra["wall_s"]) / (rb["records"] / rb["wall_s"])
            print(f"{stage}: per-core rate at {a} / at {b} = {per_core:.2f}x (goal <= 1.25x); driver RSS at {b} / at "
                  f"{a} = {rb['driver_rss_mb'] / ra['driver_rss_mb']:.2f}x (goal <= 1.2x)")
    last = results[sizes[-1]]
    f = last["filter"]
    print(f"filter per core: {f['records'] / f['wall_s'] / args.cpus:.0f} records/s wall, "
          f"{f['records'] / f['cpu_s']:.0f} per CPU-second (goal >= 300)")
    for stage in ("filter", "shard"):
        m = last[stage]
        print(sizing(m["records"] / m["cpu_s"], m["node_rss_mb"], args.cpus, stage))


if __name__ == "__main__":
    main()
