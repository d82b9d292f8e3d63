"""Filter stage: raw image-text pairs -> kept pairs (parquet), one decision per record, statistics, a plot.

1. analyse (one task per source unit; the source is read once): every per-record rule (decode under
   the pixel limit, size, aspect, caption encoding and length, privacy, language), sha256, pHash and
   the optional CLIP score. Each unit writes its decision rows, its candidates (passing records with
   their original bytes) and their compact columns under `OUT/_work/`, then a marker: a rerun after a
   crash skips the units already done (units.py);
2. decide: the whole-dataset rules as shuffles on their keys, one task per partition (decide.py,
   ranked.py): duplicate keys, exact and near duplicates, CLIP score, concept cap, language quota;
3. finish (one task per unit): `OUT/decisions/part-<unit>.parquet` (every record of the unit) and
   `OUT/kept/part-<unit>.parquet`; the driver adds up their counts into `stats.json` (asserting kept +
   rejected = total = the decision rows, kept = the kept rows) and writes `rejects/<reason>.jsonl` and
   `stats.png` (stats.py).

The driver holds no per-record state: it hands out units and partitions and adds up counts. The
source units are Ray tasks rather than a Ray Data read: a unit is a folder slice, a table, or a tar with
its img2dataset sidecar, and every broken record must still become one decision row with its reason,
which Ray Data's readers (read_webdataset / read_binary_files) drop or fail on. Tasks run on the Ray of
this process (`runner="ray"`: else RAY_ADDRESS or a cluster `ray start` left running on this machine,
else a local Ray started for the call), spread over its nodes and retried on another node when one is
lost; or one after another in this process (`runner="local"`), the same code.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from components.common import storage
from components.common.context import SYNTHETIC
from components.common.progress import Progress
from components.common.ray_runtime import ray_session, spread_tasks, storage_env
from components.common.shuffle import clear, write_table
from components.filter.config import FilterConfig
from components.filter.decide import decide
from components.filter.models import Models, start_pool
from components.filter.stats import Tally, build_stats, write_stats
from components.filter.sources import check_table_columns, estimate_records, list_units
from components.filter.units import KEPT_COLUMNS, KEPT_SCHEMA, analyse_unit, finish_unit, part_uri

__all__ = ["filter_pairs", "resolve_source", "KEPT_COLUMNS"]
_SCRATCH_DIRS = ("live", "shuffle", "near", "rejects")  # the rules' rounds (redone by a rerun); the units'
# analyses (analysed/, decisions/, candidates/, alive/) stay for a rerun after a crash


# --------------------------------------------------------------------------- running tasks

def _task(fn: Callable, kwargs: dict, driver_env: dict) -> tuple[object, str]:
    """One task in a worker: the driver's storage settings first, then `fn(**kwargs)`; (result, node id)."""
    os.environ.update(driver_env)
    node = ""
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:
        pass
    return fn(**kwargs), node


class Runner:
    """`run(fn, items)` yields `fn(**item)` of each item (as they finish under Ray); `nodes` = where they ran."""

    def __init__(self, submit: Callable[[Callable, list[dict]], Iterator[tuple[object, str]]],
                 pool: dict[str, list] | None = None) -> None:
        self._submit = submit
        self.pool = pool or {}  # the model actors (models.start_pool), by node
        self.nodes: set[str] = set()

    def __call__(self, fn: Callable, items: list[dict]) -> Iterator[object]:
        for result, node in self._submit(fn, items):
            if node:
                self.nodes.add(node)
            yield result


@contextmanager
def _runner(cfg: FilterConfig) -> Iterator[Runner]:
    env = storage_env()
    if cfg.runner == "local":
        yield Runner(lambda fn, items: (_task(fn, kw, env) for kw in items))
        return
    import ray

    with ray_session(num_cpus=cfg.num_cpus, log_to_driver=False):
        def submit(fn: Callable, items: list[dict]) -> Iterator[tuple[object, str]]:
            return spread_tasks(_task, ((fn, item, env) for item in items))
        pool = start_pool(cfg)
        try:
            yield Runner(submit, pool)
        finally:
            for handle in (h for handles in pool.values() for h in handles):
                ray.kill(handle)


# --------------------------------------------------------------------------- the stage

def resolve_source(cfg: FilterConfig, output_uri: str) -> str:
    """The source to read: `cfg.source_uri`, or for "synthetic" the bundled corpus generated (with
    `cfg.synthetic_samples` pairs) under `<output_uri>/source`."""
    if cfg.source_uri != SYNTHETIC:
        return cfg.source_uri
    from components.synthetic.corpus import generate_corpus, write_to

    return write_to(storage.join(output_uri, "source"),
                    lambda d: generate_corpus(d, n=cfg.synthetic_samples, seed=0))


def filter_pairs(output_uri: str, cfg: FilterConfig) -> dict:
    """Filter the raw pairs under `cfg.source_uri` into `output_uri` (local dir or s3://); returns the stats.

    Writes `kept/part-*.parquet` (KEPT_COLUMNS), `decisions/part-*.parquet` (one row per input record),
    `stats.json` (computed from them), `rejects/<reason>.jsonl` (up to cfg.reject_samples each) and
    `stats.png`. A run that stopped half way leaves `_work/`: the next run into the same `output_uri`
    skips the units it had analysed (same settings, files verified) and gives the same bytes."""
    t0 = time.perf_counter()
    source_uri = resolve_source(cfg, output_uri)
    units = list_units(source_uri, cfg.source)
    check_table_columns(units, cfg.source)  # a misconfigured column fails here, before any work
    estimates = [estimate_records(u) for u in units]
    total_est = sum(estimates) if all(e is not None for e in estimates) else None
    work = storage.join(output_uri, "_work")
    clear(storage.join(output_uri, "kept"), storage.join(output_uri, "decisions"),  # the units' analyses stay
          *[storage.join(work, d) for d in _SCRATCH_DIRS])
    timing: dict[str, float] = {}
    t = time.perf_counter()
    with _runner(cfg) as run:
        timing["start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        progress = Progress(total_est, "records", label="filter")
        alive_total, resumed, inputs = 0, 0, []
        models = Models(cfg, run.pool)
        for result in run(analyse_unit, [{"idx": i, "unit": u, "cfg": cfg, "work_uri": work, "models": models}
                                         for i, u in enumerate(units)]):
            alive_total += result["alive"]
            resumed += result["resumed"]
            progress.update(result["records"])
        progress.close()
        inputs = [part_uri(work, "alive", i) for i in range(len(units))]
        timing["analyse_s"] = time.perf_counter() - t

        t = time.perf_counter()
        rules_report = decide(run, work, inputs, alive_total, cfg)
        timing["decide_s"] = time.perf_counter() - t

        t = time.perf_counter()
        tally = Tally(cfg.reject_samples)
        for counts in run(finish_unit, [{"idx": i, "work_uri": work, "output_uri": output_uri,
                                         "reject_samples": cfg.reject_samples} for i in range(len(units))]):
            tally.add(counts)
        timing["record_s"] = time.perf_counter() - t
        nodes, actors = len(run.nodes), sum(len(h) for h in run.pool.values())

    if tally.written == 0:  # an empty but readable result
        write_table(storage.join(output_uri, "kept", "part-empty.parquet"), KEPT_SCHEMA.empty_table())
    tally.write_samples(output_uri)
    clear(work)
    stats = build_stats(tally.counts(), tally.written, cfg, timing, t0, source_uri, output_uri, rules_report)
    stats["execution"] = {"units": len(units), "units_resumed": resumed, "nodes": nodes, "model_actors": actors}
    write_stats(stats, output_uri)
    print(f"[filter] kept {stats['kept']} of {stats['total']} records in {timing['total_s']:.1f}s "
          f"({timing['records_per_s']:.0f} records/s); rejected: "
          + (", ".join(f"{r}={c}" for r, c in stats["rejected"].items()) or "none") + f" -> {output_uri}", flush=True)
    return stats
