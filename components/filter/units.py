"""The filter's work on one unit, the same under Ray and in one process (stage.py runs it).

`analyse_unit` reads the unit once: every record goes through the per-record rules (rules.py) and,
when set, the CLIP score; it writes under `<work>/` the unit's decision rows (`decisions/part-<unit>`),
its candidates, the passing records with their original image bytes (`candidates/part-<unit>`), and the
compact columns the whole-dataset rules need (`alive/part-<unit>`, shuffle.ALIVE_SCHEMA: no captions, no
images), then a marker (`analysed/part-<unit>.json`) with the size and sha256 of each. A rerun after a
crash skips a unit whose marker matches the settings and whose files still verify (`resumable`), so it
reads the source only for the units that did not finish. `finish_unit` later applies the whole-dataset
rejections to the unit: `OUT/decisions/part-<unit>.parquet` (every record) and `OUT/kept/part-<unit>.parquet`.

A record's uid is `unit index << 32 | record index`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from components.common import storage
from components.filter.config import EXECUTION_FIELDS, FilterConfig
from components.filter.readers import iter_unit
from components.filter.models import Models
from components.filter.rules import analyse, empty_row, language_rule
from components.filter.shuffle import ALIVE_SCHEMA, REJECT_SCHEMA, UNIT_SHIFT
from components.common.shuffle import read_table as read_parquet
from components.common.shuffle import write_table as write_parquet
from components.filter.sources import SourceConfigError

KEPT_SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("sha256", pa.string()),
                         ("phash", pa.int64()), ("caption", pa.string()), ("width", pa.int64()),
                         ("height", pa.int64()), ("language", pa.string()), ("image", pa.binary())])
KEPT_COLUMNS = tuple(KEPT_SCHEMA.names)
# kept pairs' parquet: image bytes stored as they are (JPEG/PNG do not compress), the rest zstd
KEPT_COMPRESSION = {"image": "none"} | {c: "zstd" for c in KEPT_COLUMNS if c != "image"}
DECISION_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_uri", pa.string()), ("kept", pa.bool_()), ("reason", pa.string()),
    ("detail", pa.string()), ("caption", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
    ("width", pa.int64()), ("height", pa.int64()), ("sha256", pa.string()), ("phash", pa.int64()),
    ("clip_score", pa.float64()), ("duplicate_of", pa.string())])
_WRITE = {"compression": "zstd", "use_dictionary": ["reason", "language"]}


def part_uri(work_uri: str, kind: str, idx: int) -> str:
    return storage.join(work_uri, kind, f"part-{idx:06d}.parquet")


def _digest64(text: str) -> int:
    """64 bits of sha256(text): the shuffles' key for exact duplicates and record keys."""
    d = hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(d[:8], "big", signed=True)


def _concept_mask(caption: str, patterns: list[re.Pattern]) -> int:
    mask = 0
    text = caption.lower()
    for i, p in enumerate(patterns):
        if p.search(text):
            mask |= 1 << i
    return mask


def concept_patterns(queries: tuple[str, ...]) -> list[re.Pattern]:
    """Whole-word, case-insensitive patterns of the concept queries (bit i of a mask = query i)."""
    return [re.compile(r"(?<!\w)" + re.escape(q.lower()) + r"(?!\w)") for q in queries]


_KINDS = ("decisions", "candidates", "alive")


def _fingerprint(unit: dict, cfg: FilterConfig) -> str:
    from components.common import config

    settings = {k: v for k, v in config.to_dict(cfg).items() if k not in EXECUTION_FIELDS}
    return hashlib.sha256(json.dumps([unit, settings], sort_keys=True, default=str).encode()).hexdigest()


def resumable(idx: int, unit: dict, cfg: FilterConfig, work_uri: str) -> dict | None:
    """The marker of a unit analysed before with the same settings whose files still verify, else None."""
    marker = storage.join(work_uri, "analysed", f"part-{idx:06d}.json")
    if not storage.exists(marker):
        return None
    done = storage.read_json(marker)
    if done.get("fingerprint") != _fingerprint(unit, cfg):
        return None
    for kind, (size, sha) in done["files"].items():
        uri = part_uri(work_uri, kind, idx)
        if not storage.exists(uri) or storage.size(uri) != size or storage.sha256(uri) != sha:
            return None
    return done


def analyse_unit(idx: int, unit: dict, cfg: FilterConfig, work_uri: str, models: Models | None = None) -> dict:
    """Per-record rules over one unit (skipped when `resumable`), the model-bearing ones (language, CLIP
    score) for the whole unit at once through `models`; writes its parts and marker; returns
    {"idx", "records", "alive", "resumed"}."""
    done = resumable(idx, unit, cfg, work_uri)
    if done:
        return {"idx": idx, "records": done["records"], "alive": done["alive"], "resumed": True}
    models = models or Models(cfg)
    rows: list[dict] = []
    images: dict[int, bytes] = {}  # uid -> image bytes of the rows still passing
    try:
        for i, rec in enumerate(iter_unit(unit, cfg.source)):
            uid = (idx << UNIT_SHIFT) | i
            try:
                row = analyse(rec, uid, cfg, language=False)
            except Exception as e:  # noqa: BLE001 - a broken record never stops the run
                row = {**empty_row(uid, rec.key, rec.source_uri), "reason": "unreadable",
                       "detail": f"{type(e).__name__}: {e}"}
            rows.append(row)
            if not row["reason"]:
                images[uid] = rec.image
    except SourceConfigError:
        raise  # the input does not match the configuration: stop with the message
    except Exception as e:  # noqa: BLE001 - a unit that cannot be read on becomes one error record
        where = unit.get("uri") or (unit.get("items") or [["?"]])[0][0]
        rows.append({**empty_row((idx << UNIT_SHIFT) | 0xFFFFFFFF, f"unit{idx:06d}_error", str(where)),
                     "reason": "unreadable", "detail": f"reading stopped after {len(rows)} records: "
                                                       f"{type(e).__name__}: {e}"})
    pending = [r for r in rows if not r["reason"]]
    for r, decision in zip(pending, models.languages([r["caption"] for r in pending], idx)):
        language_rule(r, decision, cfg)
    alive = [r for r in rows if not r["reason"]]
    images = [images[r["uid"]] for r in alive]
    scores = models.clip_scores(images, [r["caption"] for r in alive], idx) if cfg.clip_bundle else [None] * len(alive)
    for r, s in zip(alive, scores):
        r["clip_score"] = s
    patterns = concept_patterns(cfg.concept_queries)
    decisions = pa.Table.from_pylist([{**{c: r.get(c) for c in DECISION_SCHEMA.names}, "kept": not r["reason"]}
                                      for r in rows], schema=DECISION_SCHEMA)
    write_parquet(part_uri(work_uri, "decisions", idx), decisions.append_column(
        "uid", pa.array([r["uid"] for r in rows], pa.int64())), **_WRITE)
    candidates = pa.Table.from_pylist([{**{c: r[c] for c in KEPT_COLUMNS if c != "image"}, "image": img}
                                       for r, img in zip(alive, images)], schema=KEPT_SCHEMA)
    write_parquet(part_uri(work_uri, "candidates", idx), candidates.append_column(
        "uid", pa.array([r["uid"] for r in alive], pa.int64())), compression=KEPT_COMPRESSION | {"uid": "zstd"})
    compact = pa.Table.from_pylist([{
        "uid": r["uid"], "key": r["key"], "key_hash": _digest64(r["key"]), "phash": r["phash"],
        "pixels": r["width"] * r["height"], "exact": _digest64(f"{r['sha256']}\0{r['caption_norm']}"),
        "language": r["language"], "concepts": _concept_mask(r["caption"], patterns) if patterns else 0,
        "clip_score": r["clip_score"]} for r in alive], schema=ALIVE_SCHEMA)
    write_parquet(part_uri(work_uri, "alive", idx), compact, compression="zstd")
    files = {kind: [storage.size(part_uri(work_uri, kind, idx)), storage.sha256(part_uri(work_uri, kind, idx))]
             for kind in _KINDS}
    done = {"fingerprint": _fingerprint(unit, cfg), "records": len(rows), "alive": len(alive), "files": files}
    storage.write_json(storage.join(work_uri, "analysed", f"part-{idx:06d}.json"), done)  # last: the unit is done
    return {"idx": idx, "records": len(rows), "alive": len(alive), "resumed": False}


def _apply(part: pa.Table, rejects: pa.Table) -> pa.Table:
    """The unit's decision rows with the whole-dataset rejections (`rejects`: this unit's, by uid) applied."""
    if rejects.num_rows:
        at = pc.index_in(part["uid"], value_set=rejects["uid"])
        hit = pc.is_valid(at)
        for col in ("reason", "detail", "duplicate_of"):
            part = part.set_column(part.schema.get_field_index(col), col,
                                   pc.if_else(hit, pc.take(rejects[col], at), part[col]))
        part = part.set_column(part.schema.get_field_index("kept"), "kept", pc.equal(part["reason"], ""))
    return part.sort_by("uid").select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)


SAMPLE_FIELDS = ("key", "source_uri", "caption", "detail", "duplicate_of")


def finish_unit(idx: int, work_uri: str, output_uri: str, reject_samples: int) -> dict:
    """Write the unit's final decisions (`OUT/decisions/part-<unit>.parquet`) and kept pairs
    (`OUT/kept/part-<unit>.parquet`, when any); returns counts read from the written decisions:
    {"idx", "total", "kept", "written", "reasons": {reason: n}, "languages": {lang: kept},
    "samples": {reason: [rows]}}."""
    from components.common.shuffle import gather

    rejects = gather(storage.join(work_uri, "rejects"), idx, REJECT_SCHEMA)
    decisions = _apply(read_parquet(part_uri(work_uri, "decisions", idx)), rejects)
    write_parquet(storage.join(output_uri, "decisions", f"part-{idx:06d}.parquet"), decisions, **_WRITE)
    written = 0
    cand_uri = part_uri(work_uri, "candidates", idx)
    if storage.exists(cand_uri):
        table = read_parquet(cand_uri)
        if rejects.num_rows:
            table = table.filter(pc.invert(pc.is_in(table["uid"], value_set=rejects["uid"])))
        if table.num_rows:
            write_parquet(storage.join(output_uri, "kept", f"part-{idx:06d}.parquet"),
                          table.sort_by("uid").select(list(KEPT_COLUMNS)), compression=KEPT_COMPRESSION)
        written = table.num_rows
    reasons = Counter(decisions["reason"].to_pylist())
    kept = reasons.pop("", 0)
    rejected = decisions.filter(pc.invert(decisions["kept"]))
    samples = {}
    for reason in reasons if reject_samples > 0 else ():
        rows = rejected.filter(pc.equal(rejected["reason"], reason)).slice(0, reject_samples)
        samples[reason] = rows.select(list(SAMPLE_FIELDS)).to_pylist()
    languages = Counter(decisions.filter(decisions["kept"])["language"].to_pylist())
    return {"idx": idx, "total": decisions.num_rows, "kept": kept, "written": written, "reasons": dict(reasons),
            "languages": dict(languages), "samples": samples}
