"""The shard stage in this process, without Ray, for small inputs: the same rows (`rows.prepare`), the same
sort order (`rows.SORT_KEY`), the same slots (`rows.slots`) and the same `writer.write_slot`, run serially,
so the output is byte-identical to the Ray path's (`on_ray.py`).

Unlike the Ray path it holds every kept row in memory (about the kept parquet parts' size): it is bounded by
`ShardConfig.in_process_max_bytes`, which `stage.shard` checks before it picks this path. What it saves is
Ray's start-up, the distributed sort through storage and task scheduling: 20-30 s a call, which
dominates small runs (tests, the demo).
"""

from __future__ import annotations

from components.shard.config import ShardConfig
from components.shard.rows import SORT_KEY, read_part, slots, split_counts
from components.shard.writer import SlotLog, write_slot

NODE = "in-process"  # what the run's `nodes` entry says for this path (no Ray node)


def _read_sorted(files: list[str], cfg: ShardConfig):
    """Every kept row, checked, with its split and rank, sorted as the Ray path sorts them."""
    import pyarrow as pa

    tables = [read_part(uri, cfg.val_fraction, cfg.seed) for uri in files]
    return pa.concat_tables(tables, promote_options="permissive").sort_by([(k, "ascending") for k in SORT_KEY])


def write_in_process(files: list[str], cfg: ShardConfig, output_uri: str, filtered_dir: str,
                     tokenizer: str | None) -> tuple[list[dict], str]:
    """Sort the kept rows and write every slot here, one after the other -> (the writers' records in slot
    order, the tokenizer.json text: `tokenizer` when given, else one trained on the first `tokenizer_sample`
    training rows)."""
    import pyarrow.compute as pc

    table = _read_sorted(files, cfg)
    counts = split_counts(table.num_rows, pc.sum(pc.equal(table.column("split"), "train")).as_py() or 0,
                          filtered_dir, cfg.val_fraction)
    if tokenizer is None:
        from clip_model.tokenizer import ClipTokenizer

        captions = table.column("caption").slice(0, min(counts["train"], cfg.tokenizer_sample)).to_pylist()
        tokenizer = ClipTokenizer.train(captions, vocab_size=cfg.vocab_size).to_str()
    log = SlotLog(table.num_rows, cfg)
    for split, slot, lo, hi in slots(counts, cfg.samples_per_shard):
        log.add({**write_slot(split, slot, [table.slice(lo, hi - lo)], cfg, output_uri, filtered_dir), "node": NODE})
    return log.close(), tokenizer
