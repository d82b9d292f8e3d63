"""Compile the DAG to the package users upload in the KFP UI: `python -m pipelines.compile [--check]`."""

import argparse
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed package is stale")
    args = parser.parse_args()
    if args.check:
        stale = is_stale()
        print(f"{PACKAGE}: {'STALE - run python -m pipelines.compile' if stale else 'up to date'}")
        sys.exit(1 if stale else 0)
    print(f"wrote {compile_pipeline()}")


if __name__ == "__main__":
    main()
