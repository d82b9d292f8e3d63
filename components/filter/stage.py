"""Filter stage: raw image-text pairs -> kept pairs (parquet), statistics, reject samples, a plot.

Runs on Ray Data (a local Ray unless RAY_ADDRESS names a cluster, or the Ray already initialised):

1. analyse (parallel over source units): read, decode under the pixel limit, image size and
   aspect, caption, privacy, language, sha256 and pHash -> one metadata row per record, streamed
   to the driver (progress: records/s, ETA);
2. whole-dataset rules on the driver's metadata: duplicate keys, exact duplicates (image sha256 +
   normalised caption), near-duplicates (pHash banded search), optional CLIP score (parallel,
   ONNX bundle) and the per-concept cap;
3. write (parallel over units holding kept records): re-read those units and write
   `kept/part-<unit>.parquet` with the original encoded bytes.

Every record gets exactly one outcome: kept, or the first rule it fails (`REASONS` order);
`kept + sum(rejected) == total` is asserted before `stats.json` is written.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict

import numpy as np

from components.common import config, storage
from components.common.context import SYNTHETIC
from components.common.progress import Progress
from components.common.ray_runtime import ray_session, worker_env
from components.filter.config import FilterConfig
from components.filter.dedup import near_duplicate_groups
from components.filter.report import build_stats, write_reports
from components.filter.rules import analyse
from components.filter.sources import SourceConfigError, check_table_columns, estimate_records, iter_unit, list_units

KEPT_COLUMNS = ("key", "source_uri", "sha256", "phash", "caption", "width", "height", "language", "image")
_META_COLUMNS = ("uid", "key", "source_uri", "reason", "detail", "caption", "caption_norm", "width", "height",
                 "language", "language_score", "sha256", "phash", "n_bytes")
_UNIT_SHIFT = 32  # uid = unit index << 32 | record index within the unit
_ENV_VARS = ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION")


# --------------------------------------------------------------------------- Ray tasks (one unit per batch)

def _analyse_units(batch: dict, cfg_dict: dict) -> dict:
    cfg = config.from_dict(FilterConfig, cfg_dict)
    rows: list[dict] = []
    for idx, unit_json in zip(batch["idx"], batch["unit"]):
        unit = json.loads(unit_json)
        try:
            for i, rec in enumerate(iter_unit(unit, cfg.source)):
                uid = (int(idx) << _UNIT_SHIFT) | i
                try:
                    rows.append(analyse(rec, uid, cfg))
                except Exception as e:  # noqa: BLE001 - a broken record never stops the run
                    rows.append({**_blank(uid, rec.key, rec.source_uri), "reason": "unreadable",
                                 "detail": f"{type(e).__name__}: {e}"})
        except SourceConfigError:
            raise  # the input does not match the configuration: stop with the message
        except Exception as e:  # noqa: BLE001 - an unreadable unit becomes one error record
            rows.append({**_blank((int(idx) << _UNIT_SHIFT) | 0xFFFFFFFF, f"unit{int(idx):06d}_error",
                                  json.dumps(unit)[:300]),
                         "reason": "unreadable", "detail": f"{type(e).__name__}: {e}"})
    return {c: [r[c] for r in rows] for c in _META_COLUMNS}


def _blank(uid: int, key: str, source_uri: str) -> dict:
    return {"uid": uid, "key": key, "source_uri": source_uri, "reason": "", "detail": "", "caption": None,
            "caption_norm": "", "width": 0, "height": 0, "language": "", "language_score": 0.0,
            "sha256": "", "phash": 0, "n_bytes": 0}


def _records_of(unit: dict, wanted: dict, cfg: FilterConfig):
    """(uid, record) for the wanted record indices of a unit (stops after the last wanted one)."""
    last = max(int(i) for i in wanted)
    for i, rec in enumerate(iter_unit(unit, cfg.source)):
        if str(i) in wanted:
            yield i, rec
        if i >= last:
            break


def _clip_score_units(batch: dict, cfg_dict: dict) -> dict:
    from PIL import Image
    import io

    cfg = config.from_dict(FilterConfig, cfg_dict)
    model = _onnx_clip(cfg.clip_bundle)
    uids, scores = [], []
    for idx, unit_json, wanted_json in zip(batch["idx"], batch["unit"], batch["wanted"]):
        wanted = json.loads(wanted_json)
        images, captions = [], []
        for i, rec in _records_of(json.loads(unit_json), wanted, cfg):
            uids.append((int(idx) << _UNIT_SHIFT) | i)
            images.append(Image.open(io.BytesIO(rec.image)).convert("RGB"))
            captions.append(wanted[str(i)]["caption"])
        for s in range(0, len(images), cfg.clip_batch_size):
            img = model.encode_images(images[s:s + cfg.clip_batch_size])
            txt = model.encode_texts(captions[s:s + cfg.clip_batch_size])
            scores += [float(x) for x in (img * txt).sum(axis=1)]
    return {"uid": uids, "score": scores}


_CLIP_CACHE: dict[str, object] = {}


def _onnx_clip(bundle: str):
    """One OnnxClip per worker process and bundle (downloaded first when the bundle is on S3)."""
    if bundle not in _CLIP_CACHE:
        from components.export.serving import BUNDLE_FILES, OnnxClip

        local = bundle
        if storage.is_s3(bundle):
            import tempfile

            local = tempfile.mkdtemp(prefix="clip-bundle-")
            for name in BUNDLE_FILES:
                storage.download_file(storage.join(bundle, name), os.path.join(local, name))
        _CLIP_CACHE[bundle] = OnnxClip(local, intra_op_threads=1)
    return _CLIP_CACHE[bundle]


def _write_units(batch: dict, cfg_dict: dict, kept_uri: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.filter.dedup import sha256_bytes

    cfg = config.from_dict(FilterConfig, cfg_dict)
    written, parts = [], []
    for idx, unit_json, wanted_json in zip(batch["idx"], batch["unit"], batch["wanted"]):
        wanted = json.loads(wanted_json)
        rows = []
        for i, rec in _records_of(json.loads(unit_json), wanted, cfg):
            meta = wanted[str(i)]
            if rec.image is None or sha256_bytes(rec.image) != meta["sha256"]:
                raise RuntimeError(f"{rec.source_uri}: the source changed while filtering (sha256 differs "
                                   "between the analyse and write passes)")
            rows.append({**{c: meta[c] for c in KEPT_COLUMNS if c != "image"}, "image": rec.image})
        if len(rows) != len(wanted):
            raise RuntimeError(f"unit {idx}: found {len(rows)} of {len(wanted)} kept records on re-read")
        table = pa.Table.from_pylist(rows, schema=kept_schema())
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        uri = storage.join(kept_uri, f"part-{int(idx):06d}.parquet")
        storage.write_bytes(uri, sink.getvalue().to_pybytes())
        written.append(len(rows))
        parts.append(uri)
    return {"part": parts, "rows": written}


def kept_schema():
    import pyarrow as pa

    return pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("sha256", pa.string()),
                      ("phash", pa.int64()), ("caption", pa.string()), ("width", pa.int64()),
                      ("height", pa.int64()), ("language", pa.string()), ("image", pa.binary())])


# --------------------------------------------------------------------------- Ray

def _quiet_ray_data() -> None:
    import logging

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def _remote_args() -> dict:
    """Workers can import this project (a constant runtime_env, so worker processes are reused)."""
    return {"runtime_env": {"env_vars": worker_env()}, "num_cpus": 1}


def _with_driver_env(fn):
    """Run `fn` with the driver's storage settings (endpoint, credentials) set in the worker first."""
    def wrapped(batch: dict, driver_env: dict, **kw) -> dict:
        os.environ.update(driver_env)
        return fn(batch, **kw)
    wrapped.__name__ = fn.__name__
    return wrapped


def _run_units(items: list[dict], fn, fn_kwargs: dict):
    """Map `fn` over unit items (one unit per Ray task); yields the result batches as they finish."""
    import ray

    env = {k: os.environ[k] for k in _ENV_VARS if os.environ.get(k)}
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(_with_driver_env(fn), batch_size=1, fn_kwargs={**fn_kwargs, "driver_env": env},
                        batch_format="numpy", **_remote_args())
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


# --------------------------------------------------------------------------- whole-dataset rules

def _dedup(meta: dict[int, dict], cfg: FilterConfig) -> None:
    """Mark duplicate keys, exact and near duplicates among the records that passed so far."""
    alive = sorted((m for m in meta.values() if not m["reason"]), key=lambda m: (m["key"], m["source_uri"]))
    seen_keys: dict[str, dict] = {}
    for m in alive:
        if m["key"] in seen_keys:
            m["reason"], m["detail"] = "duplicate_key", f"key {m['key']} also used by {seen_keys[m['key']]['source_uri']}"
        else:
            seen_keys[m["key"]] = m
    if cfg.exact_dedup:
        first: dict[tuple[str, str], dict] = {}
        for m in alive:
            if m["reason"]:
                continue
            k = (m["sha256"], m["caption_norm"])
            if k in first:
                m["reason"], m["detail"] = "duplicate_exact", f"same image and caption as {first[k]['key']}"
            else:
                first[k] = m
    if cfg.near_dedup:
        alive = [m for m in alive if not m["reason"]]
        groups = near_duplicate_groups(np.array([m["phash"] for m in alive], dtype=np.int64),
                                       cfg.near_dup_max_distance)
        for g in groups:
            members = [alive[i] for i in g]
            # representative: the largest image (most pixels), then the smallest key
            rep = min(members, key=lambda m: (-(m["width"] * m["height"]), m["key"], m["source_uri"]))
            for m in members:
                if m is not rep:
                    m["reason"], m["detail"] = "near_duplicate", f"pHash within {cfg.near_dup_max_distance} bits of {rep['key']}"


def _concept_cap(alive: list[dict], cfg: FilterConfig) -> dict[str, int]:
    """CLIP's WIT balancing: at most `concept_cap` pairs per query (whole-word, case-insensitive match);
    a pair matching several queries is kept only while every one of them is under the cap."""
    patterns = [(q, re.compile(r"(?<!\w)" + re.escape(q.lower()) + r"(?!\w)")) for q in cfg.concept_queries]
    counts: Counter = Counter()
    for m in alive:
        text = (m["caption"] or "").lower()
        matched = [q for q, p in patterns if p.search(text)]
        if not matched:
            if not cfg.concept_keep_unmatched:
                m["reason"], m["detail"] = "concept_cap", "caption matches no concept query"
            continue
        if any(counts[q] >= cfg.concept_cap for q in matched):
            m["reason"], m["detail"] = "concept_cap", f"queries {matched} already have {cfg.concept_cap} pairs"
            continue
        for q in matched:
            counts[q] += 1
    return dict(counts)


def _unit_items(units: list[dict], meta: dict[int, dict], fields: tuple[str, ...]) -> list[dict]:
    by_unit: dict[int, dict] = defaultdict(dict)
    for uid, m in meta.items():
        if not m["reason"]:
            by_unit[uid >> _UNIT_SHIFT][str(uid & 0xFFFFFFFF)] = {f: m[f] for f in fields}
    return [{"idx": u, "unit": json.dumps(units[u]), "wanted": json.dumps(by_unit[u])} for u in sorted(by_unit)]


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

    Writes `kept/part-*.parquet` (KEPT_COLUMNS), `stats.json`, `rejects/<reason>.jsonl` (up to
    cfg.reject_samples each) and `stats.png`."""
    t0 = time.perf_counter()
    source_uri = resolve_source(cfg, output_uri)
    units = list_units(source_uri, cfg.source)
    check_table_columns(units, cfg.source)  # a misconfigured column fails here, before any work
    estimates = [estimate_records(u) for u in units]
    total_est = sum(e for e in estimates if e) if all(e is not None for e in estimates) else None
    timing: dict[str, float] = {}
    meta: dict[int, dict] = {}
    cfg_dict = config.to_dict(cfg)
    t = time.perf_counter()
    with ray_session(num_cpus=cfg.num_cpus, log_to_driver=False):
        _quiet_ray_data()
        timing["ray_start_s"] = time.perf_counter() - t
        t = time.perf_counter()
        progress = Progress(total_est, "records", label="filter")
        items = [{"idx": i, "unit": json.dumps(u)} for i, u in enumerate(units)]
        for batch in _run_units(items, _analyse_units, {"cfg_dict": cfg_dict}):
            n = len(batch["uid"])
            for j in range(n):
                row = {c: _py(batch[c][j]) for c in _META_COLUMNS}
                meta[row["uid"]] = row
            progress.update(n)
        progress.close()
        timing["analyse_s"] = time.perf_counter() - t

        t = time.perf_counter()
        _dedup(meta, cfg)
        timing["dedup_s"] = time.perf_counter() - t

        clip_stats = {}
        if cfg.clip_bundle:
            t = time.perf_counter()
            clip_stats = _clip_filter(units, meta, cfg, cfg_dict)
            timing["clip_score_s"] = time.perf_counter() - t

        concept_counts = {}
        if cfg.concept_cap > 0 and cfg.concept_queries:
            alive = [m for m in meta.values() if not m["reason"]]
            alive.sort(key=lambda m: (-m.get("clip_score", 0.0), m["key"]))
            concept_counts = _concept_cap(alive, cfg)

        t = time.perf_counter()
        kept_uri = storage.join(output_uri, "kept")
        for old in storage.list_files(kept_uri):
            storage.delete(old)
        items = _unit_items(units, meta, tuple(c for c in KEPT_COLUMNS if c != "image"))
        written = 0
        for batch in _run_units(items, _write_units, {"cfg_dict": cfg_dict, "kept_uri": kept_uri}):
            written += int(sum(batch["rows"]))
        if not items:  # an empty but readable result
            import pyarrow as pa
            import pyarrow.parquet as pq

            sink = pa.BufferOutputStream()
            pq.write_table(kept_schema().empty_table(), sink)
            storage.write_bytes(storage.join(kept_uri, "part-empty.parquet"), sink.getvalue().to_pybytes())
        timing["write_s"] = time.perf_counter() - t

    stats = build_stats(meta, cfg, written, timing, t0, source_uri, output_uri, clip_stats, concept_counts)
    write_reports(meta, stats, output_uri, cfg.reject_samples)
    print(f"[filter] kept {stats['kept']} of {stats['total']} records in {timing['total_s']:.1f}s "
          f"({timing['records_per_s']:.0f} records/s); rejected: "
          + (", ".join(f"{r}={c}" for r, c in stats["rejected"].items()) or "none") + f" -> {output_uri}", flush=True)
    return stats


def _clip_filter(units: list[dict], meta: dict[int, dict], cfg: FilterConfig, cfg_dict: dict) -> dict:
    items = _unit_items(units, meta, ("caption",))
    scores: dict[int, float] = {}
    progress = Progress(sum(len(json.loads(i["wanted"])) for i in items), "pairs", label="clip-score")
    for batch in _run_units(items, _clip_score_units, {"cfg_dict": cfg_dict}):
        for uid, s in zip(batch["uid"], batch["score"]):
            scores[int(uid)] = float(s)
        progress.update(len(batch["uid"]))
    progress.close()
    for uid, s in scores.items():
        meta[uid]["clip_score"] = s
    values = np.array(sorted(scores.values(), reverse=True))
    threshold = cfg.clip_min_score if cfg.clip_min_score is not None else -np.inf
    if cfg.clip_top_fraction is not None and len(values):
        keep_n = max(1, int(np.ceil(cfg.clip_top_fraction * len(values))))
        threshold = max(threshold, float(values[keep_n - 1]))
    ranked = sorted(scores, key=lambda u: (-scores[u], meta[u]["key"]))
    keep_n = sum(1 for u in ranked if scores[u] >= threshold)
    if cfg.clip_top_fraction is not None:
        keep_n = min(keep_n, max(1, int(np.ceil(cfg.clip_top_fraction * len(values)))))
    for u in ranked[keep_n:]:
        meta[u]["reason"], meta[u]["detail"] = "clip_score", f"CLIP score {scores[u]:.4f} < {threshold:.4f}"
    return {"scored": len(values), "threshold": float(threshold) if np.isfinite(threshold) else None,
            "mean": float(values.mean()) if len(values) else None,
            "quantiles": {q: float(np.quantile(values, q)) for q in (0.1, 0.5, 0.9)} if len(values) else {}}


def _py(v):
    if isinstance(v, np.generic):
        return v.item()
    return v
