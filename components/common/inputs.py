"""Datasets as MLflow inputs (`mlflow.log_input`): what a stage run read, with a name, its source URI, a
digest and, where it fits, a schema and a profile, so the MLflow UI's Dataset column, dataset views and
filters show the lineage. Each stage calls one function while its run is open:

- filter   `log_source(uri)`               the raw pairs; digest: a fingerprint of the listing (every file's
                                            relative path and size: cheap, and the same for the same files)
- shard    `log_filtered(uri)`             the filter's kept pairs; digest: their keys, image hashes, captions
- train    `log_manifest(manifest, uri)`   the shard manifest; digest: its `content_hash`
- evaluate `log_eval_sets(planned)`        each evaluation dataset; digest: the listing fingerprint of its files,
                                            the manifest's content hash for the validation split

A digest is the first `DIGEST_CHARS` hex digits of the hash (MLflow stores at most 36 characters); the whole
hash is in the profile. The same data gives the same digest in every run.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

from mlflow.data.dataset import Dataset
from mlflow.data.dataset_source import DatasetSource
from mlflow.types import ColSpec, DataType, Schema

DIGEST_CHARS = 12  # hex digits of a hash shown as the dataset's digest
FILTERED_NAME = "filtered-pairs"  # the filter output's dataset name
MANIFEST_NAME = "shards"  # the shard manifest's dataset name
SOURCE_NAME = "source-pairs"  # the raw pairs' dataset name
ROW_IDENTITY = ("key", "sha256", "caption")  # a kept record's columns that make the filter output's digest
SHARD_SCHEMA = {"__key__": "string", "jpg": "binary", "txt": "string", "json": "string"}  # a shard sample's members


class DataInput(Dataset):
    """A dataset known by where it is and a digest we computed: MLflow's Dataset with a profile."""

    def __init__(self, source: DatasetSource, name: str, digest: str, schema: Schema | None = None,
                 profile: dict[str, Any] | None = None):
        self._schema, self._profile = schema, profile
        super().__init__(source=source, name=name, digest=digest)

    def _compute_digest(self) -> str:  # always given
        return self._digest

    @property
    def schema(self) -> Schema | None:
        return self._schema

    @property
    def profile(self) -> dict[str, Any] | None:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        out = super().to_dict()
        if self._schema is not None:
            out["schema"] = json.dumps({"mlflow_colspec": self._schema.to_dict()})
        if self._profile is not None:
            out["profile"] = json.dumps(self._profile, default=str)
        return out


def source_of(uri: str) -> DatasetSource:
    """MLflow's dataset source for a URI: s3:// (S3ArtifactDatasetSource) or a local path (local)."""
    import os

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from components.common import storage

    if not storage.is_s3(uri) and "://" not in uri:
        uri = os.path.abspath(uri)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a local path matches two equivalent local sources
        return resolve_dataset_source(uri)


def schema_of(columns: dict[str, str]) -> Schema:
    """An MLflow schema from {column: MLflow data type name} (string, long, double, binary, ...)."""
    return Schema([ColSpec(type=DataType[kind], name=name) for name, kind in columns.items()])


def log_dataset(name: str, uri: str, content_hash: str, context: str, schema: dict[str, str] | None = None,
                profile: dict[str, Any] | None = None) -> DataInput:
    """Log one dataset as an input of the active run (`context`: how the run used it, e.g. "training")."""
    import mlflow

    if not content_hash:
        raise ValueError(f"dataset {name!r} at {uri}: no content hash to use as its digest")
    dataset = DataInput(source_of(uri), name, content_hash[:DIGEST_CHARS], schema_of(schema) if schema else None,
                        {"content_hash": content_hash, **(profile or {})})
    mlflow.log_input(dataset, context=context)
    return dataset


def listing_fingerprint(uri: str) -> tuple[str, int, int]:
    """(sha256 of every file's path relative to `uri` and its size, files, bytes): the same files give the
    same fingerprint wherever they are; nothing is read but the listing (`storage.list_sizes`)."""
    from components.common import storage

    files = storage.list_sizes(uri)
    root = uri.rstrip("/")
    digest, total = hashlib.sha256(), 0
    for f, size in files:
        total += size
        digest.update(f"{f[len(root):].lstrip('/')}\0{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest(), len(files), total


def log_source(uri: str) -> DataInput:
    """The filter stage's input: the raw pairs under `uri` (its files' listing as the digest)."""
    fingerprint, files, size = listing_fingerprint(uri)
    if not files:
        raise ValueError(f"source {uri}: no files to log as the filter's input")
    return log_dataset(SOURCE_NAME, uri, fingerprint, "source", profile={"files": files, "bytes": size,
                                                                         "digest_of": "file paths and sizes"})


def log_filtered(uri: str) -> DataInput:
    """The shard stage's input: the filter's output at `uri`; digest: the kept records' `ROW_IDENTITY` columns
    (key, image sha256, caption), sorted by key, so the same pairs give the same digest however the filter split
    them into part files (only those columns are read)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.common import storage

    parts = [f for f in storage.list_files(storage.join(uri, "kept")) if f.endswith(".parquet")]
    if not parts:
        raise ValueError(f"filter output {uri}: no kept/*.parquet to log as the shard stage's input")
    tables, schema = [], None
    for part in parts:
        fs, path = storage.pyarrow_filesystem(part)
        parquet = pq.ParquetFile(fs.open_input_file(path))
        schema = schema or parquet.schema_arrow
        missing = [c for c in ROW_IDENTITY if c not in parquet.schema_arrow.names]
        if missing:
            raise ValueError(f"filter output {part}: no column {missing} (a kept part has {list(ROW_IDENTITY)})")
        tables.append(parquet.read(columns=list(ROW_IDENTITY)))
    rows = pa.concat_tables(tables).sort_by("key")
    digest = hashlib.sha256()
    for key, sha, caption in zip(*(rows[c].to_pylist() for c in ROW_IDENTITY)):
        digest.update(f"{key}\0{sha}\0{caption}\n".encode("utf-8", "surrogateescape"))
    columns = {field.name: _mlflow_type(field.type) for field in schema}
    return log_dataset(FILTERED_NAME, uri, digest.hexdigest(), "preprocessing", columns,
                       {"rows": rows.num_rows, "files": len(parts), "digest_of": "key, image sha256 and caption of "
                        "every kept record"})


def _mlflow_type(arrow_type: Any) -> str:
    import pyarrow as pa

    for test, kind in ((pa.types.is_string, "string"), (pa.types.is_large_string, "string"),
                       (pa.types.is_binary, "binary"), (pa.types.is_large_binary, "binary"),
                       (pa.types.is_boolean, "boolean"), (pa.types.is_integer, "long"),
                       (pa.types.is_floating, "double")):
        if test(arrow_type):
            return kind
    return "string"


def log_manifest(manifest: dict, manifest_uri: str, context: str = "training") -> DataInput:
    """The shard manifest read by a run (train: "training"): digest its content hash, profile the splits."""
    splits = manifest.get("splits", {})
    profile = {f"{name}.samples": split.get("samples", 0) for name, split in splits.items()}
    profile.update({f"{name}.shards": len(split.get("shards", [])) for name, split in splits.items()})
    return log_dataset(MANIFEST_NAME, manifest_uri, str(manifest.get("content_hash", "")), context, SHARD_SCHEMA,
                       {**profile, "tokenizer_sha256": manifest.get("tokenizer_sha256", ""),
                        "digest_of": "the manifest's content hash"})


def log_eval_sets(planned: list[Any], manifest: dict | None = None) -> list[DataInput]:
    """Every dataset the evaluate stage reads (`components.evaluate.plan.Planned`), context "evaluation":
    the suite's sets by their files' listing, the validation split by the manifest's content hash."""
    out = []
    for p in planned:
        data = p.data
        columns = {"image": "binary", **({"label": "long"} if data.has_labels else {}),
                   **({"caption": "string"} if data.has_captions else {})}
        profile = {"records": len(data) if data.size_known else None, "kind": data.kind,
                   "classes": len(data.classnames) if data.classnames else None, "tasks": ",".join(p.tasks)}
        if data.kind == "manifest" and manifest is not None:
            digest, location = str(manifest.get("content_hash", "")), data.root
            profile["digest_of"] = "the manifest's content hash"
        else:
            location = data.location
            digest, profile["files"], profile["bytes"] = listing_fingerprint(location)
            profile["digest_of"] = "file paths and sizes"
        out.append(log_dataset(p.name, location, digest, "evaluation", columns,
                               {k: v for k, v in profile.items() if v is not None}))
    return out
