"""The per-row rules of the shard stage, the same for its two ways of running (Ray, `on_ray.py`; one process,
`in_process.py`): every kept row checked, its split (a hash of the key) and its rank in the sample order (split,
then a seeded hash of the key), and the cut of the sorted rows into shard slots."""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

SPLITS = ("train", "validation")  # sorted: the sort puts every training row before every validation row
REQUIRED_COLUMNS = ("key", "source_uri", "sha256", "phash", "caption", "width", "height", "language", "image")
SORT_KEY = ["rank", "key"]  # rank: split, then the seeded order (`rank_of`); the key breaks (unlikely) ties
SPLIT_SPAN = 2**62  # ranks of the training split are in [0, SPLIT_SPAN), of the validation split above


def is_validation(key: str, val_fraction: float) -> bool:
    """The split of a key: a hash of the key alone, so it never depends on order, seed or shard size."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def rank_of(key: str, split: str, seed: int) -> int:
    """A row's place in the sample order, a non-negative int64: the split in the top bits (training rows
    first), then a seeded hash of the key (a shuffle computed per row, uniform over [0, SPLIT_SPAN))."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{split}:{key}".encode("utf-8")).digest()[:8], "big") >> 2
    return SPLITS.index(split) * SPLIT_SPAN + h


def check_key(key: Any, path: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{path}: key {key!r} must be a non-empty string")
    if "." in key or "/" in key or any(c.isspace() for c in key):
        raise ValueError(f"{path}: key {key!r} must not contain '.', '/' or whitespace "
                         "(webdataset splits member names at the first dot)")


def prepare(batch: Any, val_fraction: float, seed: int) -> Any:
    """A pyarrow table of kept rows (with the part file's name in a `path` column) -> the same rows checked,
    with their `split` and `rank` added (`read_part`, for both paths)."""
    import pyarrow as pa

    paths = batch.column("path").to_pylist() if "path" in batch.column_names else ["?"] * batch.num_rows
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"{paths[0] if paths else '?'}: missing columns {missing} "
                         f"(a kept part file needs {list(REQUIRED_COLUMNS)})")
    splits, ranks = [], []
    for key, caption, path in zip(batch.column("key").to_pylist(), batch.column("caption").to_pylist(), paths):
        check_key(key, path)
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}: key {key!r} has an empty caption")
        split = "validation" if is_validation(key, val_fraction) else "train"
        splits.append(split)
        ranks.append(rank_of(key, split, seed))
    out = batch.select(list(REQUIRED_COLUMNS)).append_column("path", pa.array(paths, pa.string()))
    return out.append_column("split", pa.array(splits, pa.string())).append_column("rank", pa.array(ranks, pa.int64()))


def read_part(uri: str, val_fraction: float, seed: int) -> Any:
    """One kept part file -> its rows checked, with their split and rank (`prepare`), each row naming the file
    by its path as pyarrow's filesystem has it (so both paths name a bad row's file alike)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.common import storage

    fs, path = storage.pyarrow_filesystem(uri)
    table = pq.read_table(path, filesystem=fs)
    return prepare(table.append_column("path", pa.array([path] * table.num_rows, pa.string())), val_fraction, seed)


def split_counts(rows: int, n_train: int, filtered_dir: str, val_fraction: float) -> dict[str, int]:
    """Rows per split, refusing an input with no training row."""
    if not n_train:
        raise ValueError(f"{filtered_dir}: no training samples ({rows} kept rows, val_fraction={val_fraction})")
    return {"train": n_train, "validation": rows - n_train}


def slots(counts: dict[str, int], samples_per_shard: int) -> Iterator[tuple[str, int, int, int]]:
    """The shard slots of the sorted rows -> (split, slot, first row, end row), rows counted over both splits
    (training rows first): `samples_per_shard` rows each, the last of a split fewer."""
    base = 0
    for split in SPLITS:
        for slot, lo in enumerate(range(base, base + counts[split], samples_per_shard)):
            yield split, slot, lo, min(lo + samples_per_shard, base + counts[split])
        base += counts[split]
