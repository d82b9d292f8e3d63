"""Filter stage: raw image-text pairs -> kept pairs (parquet), one decision per record, statistics, a plot.

1. analyse (parallel over source units; the source is read once): every per-record rule (decode under
   the pixel limit, size, aspect, caption encoding and length, privacy, language), sha256, pHash and
   the optional CLIP score. Each unit writes its decision rows and its candidates (passing records
   with their original bytes) under `OUT/_work/` and returns only compact columns (units.py);
2. decide (driver, columnar: no Python object per record): duplicate keys, exact and near duplicates
   (pHash bands), CLIP score, concept cap, language quota (decide.py);
3. write (parallel over units): the surviving candidates -> `kept/part-<unit>.parquet`;
4. record (driver, streaming unit by unit): `decisions.parquet` (one row per input record), and from it
   `stats.json` and `rejects/<reason>.jsonl`; `stats.png` (report.py).

Units run as Ray tasks (`runner="ray"`: the Ray of this process, else RAY_ADDRESS or a cluster `ray
start` left running on this machine, else a local Ray started for the call) or one after another in
this process (`runner="local"`). Every record gets exactly one outcome: kept, or the first rule it
fails (`REASONS` order); stats.json is computed from decisions.parquet, and kept + sum(rejected) ==
total == its rows is asserted before it is written.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa

from components.common import config, storage
from components.common.context import SYNTHETIC
from components.common.progress import Progress
from components.common.ray_runtime import ray_session
from components.filter.config import FilterConfig
from components.filter.decide import decide
from components.filter.report import build_stats, write_decisions, write_stats
from components.filter.sources import check_table_columns, estimate_records, list_units
from components.filter.units import ALIVE_SCHEMA, KEPT_COLUMNS, KEPT_SCHEMA, UNIT_SHIFT, analyse_unit, \
    write_kept_unit, write_parquet

__all__ = ["filter_pairs", "resolve_source", "KEPT_COLUMNS"]
_ENV_VARS = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


# --------------------------------------------------------------------------- running units

def _task(step: str, kwargs: dict, cfg_dict: dict | None, driver_env: dict) -> object:
    """One unit of work in a worker: the driver's storage settings first, then the step."""
    os.environ.update(driver_env)
    if step == "analyse":
        return analyse_unit(cfg=config.from_dict(FilterConfig, cfg_dict), **kwargs)
    return write_kept_unit(**kwargs)


Runner = Callable[[str, list[dict], dict | None], Iterator[object]]


@contextmanager
def _runner(cfg: FilterConfig) -> Iterator[Runner]:
    """`run(step, items, cfg_dict)` yields each item's result (as they finish under Ray)."""
    env = {k: os.environ[k] for k in _ENV_VARS if os.environ.get(k)}
    if cfg.runner == "local":
        yield lambda step, items, cfg_dict: (_task(step, kw, cfg_dict, env) for kw in items)
        return
    import ray

    with ray_session(num_cpus=cfg.num_cpus, log_to_driver=False):
        remote = ray.remote(num_cpus=1, max_retries=1)(_task)
        window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))  # tasks in flight

        def run(step: str, items: list[dict], cfg_dict: dict | None) -> Iterator[object]:
            shared = ray.put(cfg_dict)
            pending: list = []
            todo = iter(items)
            for item in todo:  # keep `window` tasks in flight, submitted in unit order
                pending.append(remote.remote(step, item, shared, env))
                if len(pending) >= window:
                    done, pending = ray.wait(pending, num_returns=1)
                    yield ray.get(done[0])
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                yield ray.get(done[0])
        yield run


# --------------------------------------------------------------------------- the stage

def resolve_source(cfg: FilterConfig, output_uri: str) -> str:
    """The source to read: `cfg.source_uri`, or for "synthetic" the bundled corpus generated (with
    `cfg.synthetic_samples` pairs) under `<output_uri>/source`."""
    if cfg.source_uri != SYNTHETIC:
        return cfg.source_uri
    from components.synthetic.corpus import generate_corpus, write_to

    return write_to(storage.join(output_uri, "source"),
                    lambda d: generate_corpus(d, n=cfg.synthetic_samples, seed=0))


def _clear(*prefixes: str) -> None:
    for prefix in prefixes:
        for old in storage.list_files(prefix):
            storage.delete(old)


def filter_pairs(output_uri: str, cfg: FilterConfig) -> dict:
    """Filter the raw pairs under `cfg.source_uri` into `output_uri` (local dir or s3://); returns the stats.

    Writes `kept/part-*.parquet` (KEPT_COLUMNS), `decisions.parquet` (one row per input record),
    `stats.json` (computed from it), `rejects/<reason>.jsonl` (up to cfg.reject_samples each) and
    `stats.png`."""
    t0 = time.perf_counter()
    source_uri = resolve_source(cfg, output_uri)
    units = list_units(source_uri, cfg.source)
    check_table_columns(units, cfg.source)  # a misconfigured column fails here, before any work
    estimates = [estimate_records(u) for u in units]
    total_est = sum(estimates) if all(e is not None for e in estimates) else None
    work, kept_uri = storage.join(output_uri, "_work"), storage.join(output_uri, "kept")
    _clear(kept_uri, work)
    cfg_dict = config.to_dict(cfg)
    timing: dict[str, float] = {}
    t = time.perf_counter()
    with _runner(cfg) as run:
        timing["start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        progress = Progress(total_est, "records", label="filter")
        parts: list[pa.Table] = []
        for result in run("analyse", [{"idx": i, "unit": u, "work_uri": work} for i, u in enumerate(units)],
                          cfg_dict):
            parts.append(result["alive"])
            progress.update(result["records"])
        progress.close()
        timing["analyse_s"] = time.perf_counter() - t

        t = time.perf_counter()
        alive = pa.concat_tables(parts) if parts else ALIVE_SCHEMA.empty_table()
        del parts
        rejects, rules_report = decide(alive, cfg)
        timing["decide_s"] = time.perf_counter() - t

        t = time.perf_counter()
        with_candidates = np.unique(alive["uid"].to_numpy() >> UNIT_SHIFT)
        del alive
        rejected = np.sort(rejects["uid"].to_numpy())
        bounds = np.searchsorted(rejected >> UNIT_SHIFT, np.stack([with_candidates, with_candidates + 1]))
        items = [{"idx": int(i), "work_uri": work, "kept_uri": kept_uri,
                  "rejected_uids": pa.array(rejected[lo:hi], pa.int64())}
                 for i, lo, hi in zip(with_candidates, *bounds)]
        written = sum(int(n) for n in run("write", items, None))  # units with no candidate left: _clear below
        timing["write_s"] = time.perf_counter() - t

    if written == 0:  # an empty but readable result
        write_parquet(storage.join(kept_uri, "part-empty.parquet"), KEPT_SCHEMA.empty_table())
    t = time.perf_counter()
    counts = write_decisions(work, list(range(len(units))), rejects, output_uri, cfg.reject_samples)
    timing["record_s"] = time.perf_counter() - t
    _clear(work)
    stats = build_stats(counts, written, cfg, timing, t0, source_uri, output_uri, rules_report)
    write_stats(stats, output_uri)
    print(f"[filter] kept {stats['kept']} of {stats['total']} records in {timing['total_s']:.1f}s "
          f"({timing['records_per_s']:.0f} records/s); rejected: "
          + (", ".join(f"{r}={c}" for r, c in stats["rejected"].items()) or "none") + f" -> {output_uri}", flush=True)
    return stats
