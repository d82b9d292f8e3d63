"""What the shard stage's KFP component runs, as a plain function: KFP's small values and artifacts
in, a call of the stage, lineage on the parent MLflow run, a JSON pointer out. No kfp import, so the
component's process can import it (kfp.dsl has no decorators at run time)."""

from typing import Any


def run(ctx: str, filtered: Any, dataset: Any, report: Any = None, **settings: Any) -> dict:
    """Write the kept pairs as webdataset shards + tokenizer + manifest.json (written last)."""
    import mlflow

    from components.common import config, storage
    from components.common.context import RunContext, read_pointer, write_pointer
    from components.common.inputs import log_filtered
    from components.common.tracking import log_file, stage_run, tag_run
    from components.shard.config import ShardConfig
    from components.shard.stage import shard
    from components.shard.view import show

    run_ctx = RunContext.from_json(ctx)
    cfg = config.stage_config(ShardConfig, settings, "shard")  # + the object in shard_settings
    out = run_ctx.uri("shards")
    with stage_run("shard", run_ctx.tracking, params=cfg) as mlrun:
        filtered_uri, manifest_uri = read_pointer(filtered)["uri"], storage.join(out, "manifest.json")
        log_filtered(filtered_uri)  # the filter's output as the run's MLflow dataset input
        if cfg.cluster.resolved_launcher() == "rayjob":  # the same command on the RayJob's Ray cluster
            from components.common.rayjob import run_stage_rayjob, stage_entrypoint

            run_stage_rayjob("shard", stage_entrypoint("shard", [filtered_uri, out], config.to_dict(cfg)),
                             cfg.cluster.spec(), run_ctx)
            manifest = storage.read_json(manifest_uri)
        else:
            manifest = shard(filtered_uri, out, cfg)
        counts = {f"samples.{name}": split["samples"] for name, split in manifest["splits"].items()}
        mlflow.log_metrics({**counts, "shards": sum(len(s["shards"]) for s in manifest["splits"].values())})
        mlflow.set_tags({"dataset.manifest_uri": manifest_uri, "dataset.content_hash": manifest["content_hash"]})
        log_file(manifest_uri)
    tag_run(run_ctx.tracking, run_ctx.parent_run_id, {"lineage.manifest_uri": manifest_uri,
                                                      "lineage.dataset_content_hash": manifest["content_hash"],
                                                      "lineage.tokenizer": cfg.tokenizer_spec or "trained",
                                                      "lineage.tokenizer_sha256": manifest["tokenizer_sha256"]})
    return show(report, manifest, write_pointer(dataset, {"uri": manifest_uri, "content_hash": manifest["content_hash"],
                                   "run_id": mlrun.info.run_id, "tokenizer": manifest["tokenizer"],
                                   "samples": manifest["splits"]["train"]["samples"]}), run_ctx.tracking, cfg)
