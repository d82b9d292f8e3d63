"""The filter's whole-dataset rules' rounds on the shuffle of components/common/shuffle.py (decide.py,
ranked.py): the schemas of the records still alive and of rejections, and how a round sends its rejections
to their units and writes its survivors."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from components.common import storage
from components.common.shuffle import scatter, write_table

REJECT_SCHEMA = pa.schema([("uid", pa.int64()), ("reason", pa.string()), ("detail", pa.string()),
                           ("duplicate_of", pa.string())])
ALIVE_SCHEMA = pa.schema([("uid", pa.int64()), ("key", pa.string()), ("key_hash", pa.int64()),
                          ("phash", pa.int64()), ("pixels", pa.int64()), ("exact", pa.int64()),
                          ("language", pa.string()), ("concepts", pa.int64()), ("clip_score", pa.float64())])
UNIT_SHIFT = 32  # uid = unit << UNIT_SHIFT | row: a rejection finds its unit from its uid

Run = Callable[[Callable, list[dict]], Iterator[object]]  # stage.py's runner: fn, kwargs per task -> results


def live_uri(work: str, rule: str, p: int) -> str:
    return storage.join(work, "live", rule, f"part-{p:05d}.parquet")


def reject(table: pa.Table, rows: np.ndarray, reason: str, details: pa.Array, duplicate_of: pa.Array | None,
            work: str, source: str) -> None:
    """Send the rejections of `rows` (positions in `table`) to their units."""
    if not len(rows):
        return
    uids = table["uid"].take(pa.array(rows))
    dup = duplicate_of if duplicate_of is not None else pa.nulls(len(rows), pa.string())
    rejects = pa.table({"uid": uids, "reason": pa.array([reason] * len(rows), pa.string()),
                        "detail": details.cast(pa.string()), "duplicate_of": dup.cast(pa.string())},
                       schema=REJECT_SCHEMA)
    scatter(rejects, uids.to_numpy() >> UNIT_SHIFT, storage.join(work, "rejects"), source)


def survivors(table: pa.Table, rejected: np.ndarray, uri: str) -> int:
    keep = np.ones(table.num_rows, dtype=bool)
    keep[rejected] = False
    live = table.filter(pa.array(keep))
    if live.num_rows:
        write_table(uri, live)
    return live.num_rows
