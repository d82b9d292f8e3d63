"""Data path at scale: the filter and the shard stage at growing sizes on a 2-node Ray cluster, per-core rates and
memory per node.

    .venv/bin/python benchmarks/bench_data_scale.py [--sizes 10000,100000,1000000] [--nodes 2] [--side 64]

For each size: img2dataset-style tars of `--side`-px JPEGs with terse captions (bench_filter.make_dataset:
2 % other languages, 1 % corrupt images; generated once into --data), then, in a fresh process that starts a
`ray.cluster_utils.Cluster` of `--nodes` nodes with 1 CPU each (all on this machine, so that each node's
memory can be told apart; its driver is this process):
1. the filter (`filter_pairs`, default preset, `runner=ray`, joining that cluster);
2. the shard stage on its output (`components.shard.stage.shard`, `runner=ray`: the path for any size, never
   the in-process one; tokenizer "openai" so that the figure is the sharding and not BPE training).
Printed per stage: records/s wall and per core (wall rate / CPUs), records per CPU-second of all the run's
processes (the per-core rate of an idle machine; this one may be shared), the driver's peak RSS and each
node's peak RSS (the processes Ray started for the node - raylet, and GCS etc. on the head - with all their
descendants, i.e. the node's workers; sampled every 0.5 s; RSS counts the object store's shared pages in each
process that maps them). Then the goal ratios: per-core rate at the largest size within 1.25x of the one before,
the driver's RSS there <= 1.2x, filter >= 300 records/s per core; and the 400M-pair sizing from the measured
per-CPU-second rates. With --side below 200 the filter's min_side is lowered to --side / 2 so that the pairs
still pass (tiny images for the 1M point: say so when quoting it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_filter import _cpu_seconds, data_arguments, make_dataset  # noqa: E402

PAIRS_400M = 400_000_000
OBJECT_STORE = 1536 * 2**20  # bytes of object store per node (the shard stage's sort spills beyond it)


def _tree_memory(roots: list[int], pss: bool) -> int:
    """RSS (or PSS: shared pages divided among the processes that map them, so the object store counts once) of
    the given processes and all their descendants."""
    import psutil

    seen, total = set(), 0
    for pid in roots:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                total += p.memory_full_info().pss if pss else p.memory_info().rss
            except psutil.Error:
                pass
    return total


class Sampler:
    """Every 0.5 s: the peak RSS of this process (the driver) and of each node's process tree, and the CPU
    seconds of this process and every descendant (all the nodes' processes: this process started them);
    every 5 s each node's PSS (reading every process's page map costs more)."""

    PSS_EVERY = 10  # ticks of 0.5 s

    def __init__(self, nodes: dict[str, list[int]]) -> None:
        self.nodes = nodes
        self.driver_peak = 0
        self.node_peak = {name: 0 for name in nodes}
        self.node_pss_peak = {name: 0 for name in nodes}
        self.procs: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        me = psutil.Process()
        tick = 0
        while not self._stop.wait(0.5):
            self.driver_peak = max(self.driver_peak, me.memory_info().rss)
            for name, roots in self.nodes.items():
                self.node_peak[name] = max(self.node_peak[name], _tree_memory(roots, pss=False))
                if tick % self.PSS_EVERY == 0:
                    self.node_pss_peak[name] = max(self.node_pss_peak[name], _tree_memory(roots, pss=True))
            _cpu_seconds(self.procs)
            tick += 1

    def figures(self, records: int, wall_s: float, cpu0: float) -> dict:
        return {"records": records, "wall_s": wall_s, "cpu_s": _cpu_seconds(self.procs) - cpu0,
                "driver_rss_mb": self.driver_peak / 2**20,
                "node_rss_mb": {k: v / 2**20 for k, v in self.node_peak.items()},
                "node_pss_mb": {k: v / 2**20 for k, v in self.node_pss_peak.items()}}

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _node_roots(node) -> list[int]:
    """The pids of the processes Ray started for one node of a `ray.cluster_utils.Cluster`."""
    return [info.process.pid for infos in node.all_processes.values() for info in infos if info.process]


def measure(source: str, nodes: int, side: int, stages: tuple[str, ...] = ("filter", "shard")) -> dict:
    """The filter then (if in `stages`) the shard stage in this process, on a Cluster of `nodes` nodes x 1 CPU;
    figures for each."""
    import ray
    from ray.cluster_utils import Cluster

    from components.common import config
    from components.common.ray_runtime import worker_env
    from components.filter.config import FilterConfig
    from components.filter.stage import filter_pairs
    from components.shard.config import ShardConfig
    from components.shard.stage import shard

    out: dict = {}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()})
        cluster.wait_for_nodes()
        roots = {"head": _node_roots(cluster.head_node)}
        roots.update({f"worker{i + 1}": _node_roots(n) for i, n in enumerate(cluster.worker_nodes)})
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
            settings = {"source_uri": source, "runner": "ray"}
            if side < 200:
                settings["min_side"] = side // 2
            with Sampler(roots) as s:
                cpu0 = _cpu_seconds(s.procs)
                stats = filter_pairs(os.path.join(tmp, "filtered"), config.from_dict(FilterConfig, settings))
                out["filter"] = dict(s.figures(stats["total"], stats["timing"]["total_s"], cpu0), kept=stats["kept"],
                                     near=stats.get("near_duplicates", {}))
            if "shard" not in stages:
                return out
            with Sampler(roots) as s:
                cpu0 = _cpu_seconds(s.procs)
                t = time.perf_counter()
                m = shard(os.path.join(tmp, "filtered"), os.path.join(tmp, "shards"),
                          config.from_dict(ShardConfig, {"tokenizer": "openai", "runner": "ray"}))
                out["shard"] = dict(s.figures(stats["kept"], time.perf_counter() - t, cpu0),
                                    writer_nodes=len(m["run"]["nodes"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    return out


def _run(source: Path, nodes: int, side: int, stages: tuple[str, ...]) -> dict:
    """One size in a fresh process (its output goes to this one's console); its figures."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        done = subprocess.run([sys.executable, __file__, "--measure", str(source), "--nodes", str(nodes),
                               "--side", str(side), "--stages", ",".join(stages), "--measure-out", result.name],
                              env=env)
        if done.returncode:
            raise RuntimeError(f"the measurement of {source} failed (exit {done.returncode}): see its output above")
        return json.loads(Path(result.name).read_text())


def sizing(rate_per_cpu_s: float, node_rss_mb: dict[str, float], what: str, node_cpus: int = 16) -> str:
    """Node-hours and memory per node for 400M pairs. Memory: a worker node's peak (PSS where measured; 1 CPU:
    one worker) times the CPUs of a node; the head's extra processes (GCS, dashboard) are not per CPU and are
    left out."""
    workers = [v for k, v in node_rss_mb.items() if k != "head"] or list(node_rss_mb.values())
    cpu_rss_mb = max(workers)
    core_h = PAIRS_400M / rate_per_cpu_s / 3600
    return (f"{what}: 400M pairs at {rate_per_cpu_s:.0f} records per CPU-second = {core_h:,.0f} core-hours = "
            f"{core_h / node_cpus:,.0f} node-hours of {node_cpus}-CPU nodes (e.g. 10 nodes: "
            f"{core_h / node_cpus / 10:.1f} h); memory per node ~ {cpu_rss_mb * node_cpus / 1024:.1f} GiB "
            f"(a 1-CPU worker node's peak, {cpu_rss_mb:.0f} MB, x {node_cpus}: an upper bound, as its raylet, "
            f"Ray's agents and its share of the object store are counted per CPU; head node "
            f"{node_rss_mb.get('head', 0):.0f} MB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    data_arguments(ap, "10000,100000")
    ap.add_argument("--nodes", type=int, default=2, help="nodes of the Ray cluster, 1 CPU each")
    ap.add_argument("--side", type=int, default=256, help="image side in px (tiny images for 1M, e.g. 64)")
    ap.add_argument("--json", help="write every size's figures to this file as they come; sizes already in it are "
                                   "not measured again (a long run can be resumed or extended)")
    ap.add_argument("--stages", default="filter,shard",
                    help="filter,shard (default) or filter: the filter alone (its driver's memory, its rate)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one size in this process
    ap.add_argument("--measure-out", help=argparse.SUPPRESS)  # internal: where it writes its figures
    args = ap.parse_args()
    stages = tuple(args.stages.split(","))
    if stages not in (("filter", "shard"), ("filter",)):
        ap.error(f"--stages {args.stages}: must be filter,shard or filter (the shard stage reads the filter's output)")
    if args.measure:
        Path(args.measure_out).write_text(json.dumps(measure(args.measure, args.nodes, args.side, stages)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    cpus = args.nodes
    print(f"== data path at scale: {args.side}-px JPEGs in tars, a Ray cluster of {args.nodes} nodes x 1 CPU on this "
          f"machine (load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when it started)", flush=True)
    saved = json.loads(Path(args.json).read_text()) if args.json and Path(args.json).exists() else {}
    results: dict[int, dict] = {}
    for n in sizes:
        old = saved.get(str(n), {})
        if old.get("side") == args.side and old.get("nodes") == args.nodes and all(st in old for st in stages):
            results[n] = r = saved[str(n)]
            print(f"-- {n} records: the figures in {args.json} (measured {r['when']}, load average {r['load']:.1f})")
        else:
            source = make_dataset(Path(args.data), n, per_tar=max(100, min(10_000, n // 40)), side=args.side)
            t = time.perf_counter()
            results[n] = r = _run(source, args.nodes, args.side, stages)
            r.update(when=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), load=os.getloadavg()[0],
                     side=args.side, nodes=args.nodes)
            print(f"-- {n} records measured in {time.perf_counter() - t:.0f}s (load average {r['load']:.1f})")
        print(f"{'records':>9} {'stage':>6} {'wall rec/s':>10} {'per core':>8} {'per CPU-s':>9} {'driver RSS MB':>13} "
              f"node peak RSS MB (PSS: the object store counted once)")
        for stage in stages:
            m = r[stage]
            wall = m["records"] / m["wall_s"]
            per_node = ", ".join(f"{k} {v:.0f}" + (f" (PSS {m['node_pss_mb'][k]:.0f})" if "node_pss_mb" in m else "")
                                 for k, v in m["node_rss_mb"].items())
            print(f"{n:>9} {stage:>6} {wall:>10.0f} {wall / cpus:>8.0f} {m['records'] / m['cpu_s']:>9.0f} "
                  f"{m['driver_rss_mb']:>13.0f} {per_node}", flush=True)
        near = r["filter"]["near"]
        if near:
            print(f"{'':>9} near-duplicate search: {near['nodes']} pHashes, {near['tables']} tables, "
                  f"{near['candidates_per_node']:.1f} candidate comparisons per pHash, {near['pairs']} pairs, "
                  f"{near['capped_buckets']} capped buckets"
                  + (f", {near['band_partitions']} band partitions" if "band_partitions" in near else ""), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps({**saved, **{str(k): v for k, v in results.items()}}, indent=1))
    if len(sizes) > 1:
        a, b = sizes[-2], sizes[-1]
        for stage in stages:
            ra, rb = (results[x][stage] for x in (a, b))
            per_cpu_s = (ra["records"] / ra["cpu_s"]) / (rb["records"] / rb["cpu_s"])
            wall = (ra["records"] / ra["wall_s"]) / (rb["records"] / rb["wall_s"])
            print(f"{stage}: rate per CPU-second at {a} / at {b} = {per_cpu_s:.2f}x (wall rate: {wall:.2f}x; goal "
                  f"<= 1.25x); driver RSS at {b} / at {a} = {rb['driver_rss_mb'] / ra['driver_rss_mb']:.2f}x "
                  "(goal <= 1.2x)")
    last = results[sizes[-1]]
    f = last["filter"]
    print(f"filter per core: {f['records'] / f['wall_s'] / cpus:.0f} records/s wall, "
          f"{f['records'] / f['cpu_s']:.0f} per CPU-second (goal >= 300)")
    for stage in stages:
        m = last[stage]
        print(sizing(m["records"] / m["cpu_s"], m.get("node_pss_mb") or m["node_rss_mb"], stage))


if __name__ == "__main__":
    main()
