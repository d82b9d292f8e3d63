"""Compile the DAG to the package users upload in the KFP UI: `clipflow compile [--check]`."""

import tempfile
from pathlib import Path

from kfp import compiler

PACKAGE = Path(__file__).with_name("clip_pipeline.yaml")


def compile_pipeline(path: Path = PACKAGE) -> Path:
    from pipelines.clip_pipeline import clip_pipeline

    compiler.Compiler().compile(clip_pipeline, str(path))
    return path


def is_stale(path: Path = PACKAGE) -> bool:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = compile_pipeline(Path(tmp) / "p.yaml").read_text()
    return not path.exists() or path.read_text() != fresh
