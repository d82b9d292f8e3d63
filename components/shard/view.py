"""What the shard stage shows when it ends: the shard summary (KFP Markdown, MLflow description) and its
key figures (the console's end line)."""

from __future__ import annotations

from typing import Any

from components.common.publish import human_bytes, markdown_table, publish


def _splits(manifest: dict) -> dict[str, dict]:
    return {name: {"samples": split["samples"], "shards": len(split["shards"]),
                   "bytes": sum(s.get("bytes", 0) for s in split["shards"])}
            for name, split in manifest["splits"].items()}


def _shards(names: list[str]) -> int:
    return sum(name.endswith(".tar") for name in names)  # the run's lists also name tokenizer.json


def _stored_size(manifest: dict) -> str:
    side, cap = manifest.get("train_shorter_side"), manifest.get("image_max_side")
    train = (f"training images stored with the shorter side at most {side} px" if side
             else "training images stored as they came")
    return train + "; validation images as they came" + (f"; every longer side capped at {cap} px" if cap else "")


def headline(manifest: dict, tokenizer: str) -> str:
    splits = _splits(manifest)
    counts = " + ".join(f"{s['samples']} {name}" for name, s in splits.items())
    run = manifest.get("run") or {}
    written = f", {_shards(run['uploaded'])} written, {_shards(run['skipped'])} unchanged" if "uploaded" in run else ""
    return (f"{counts} samples in {sum(s['shards'] for s in splits.values())} shards, "
            f"{human_bytes(sum(s['bytes'] for s in splits.values()))}{written}; tokenizer {tokenizer}")


def markdown(manifest: dict, tokenizer: str, manifest_uri: str) -> str:
    splits = _splits(manifest)
    rows = [[name, s["samples"], s["shards"], human_bytes(s["bytes"]),
             human_bytes(s["bytes"] / s["shards"]) if s["shards"] else "-"] for name, s in splits.items()]
    lines = ["# Shard", "", f"- manifest: `{manifest_uri}`", f"- content hash: `{manifest['content_hash']}`",
             f"- tokenizer: {tokenizer} (`{manifest['tokenizer']}`)",
             f"- {_stored_size(manifest)}", "", "## Splits", ""]
    lines += markdown_table(["split", "samples", "shards", "bytes", "bytes per shard"], rows)
    run = manifest.get("run") or {}
    if "uploaded" in run:
        lines += ["", f"Shards written {_shards(run['uploaded'])}, unchanged and skipped {_shards(run['skipped'])}, "
                      f"stale removed {len(run['removed'])}, in {run['seconds']:.1f} s."]
    return "\n".join(lines)


def tokenizer_name(cfg: Any) -> str:
    return cfg.tokenizer_spec or f"trained BPE of {cfg.vocab_size} tokens"


def show(artifact: Any, manifest: dict, pointer: dict, tracking: Any, cfg: Any) -> dict:
    """Publish the finished shard stage (`cfg`: its ShardConfig); returns `pointer` (the step's result)."""
    tokenizer = tokenizer_name(cfg)
    publish("shard", artifact, markdown(manifest, tokenizer, pointer["uri"]), headline(manifest, tokenizer),
            tracking, pointer.get("run_id"))
    return pointer
