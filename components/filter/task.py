"""What the filter stage's KFP component runs, as a plain function: KFP's small values and artifacts
in, a call of the stage, lineage on the parent MLflow run, a JSON pointer out. No kfp import, so the
component's process can import it (kfp.dsl has no decorators at run time)."""

from typing import Any

DECISIONS_ARTIFACT_MAX = 64 * 2**20  # the decisions dataset is also logged to MLflow up to this size


def run(ctx: str, filtered: Any, report: Any = None, **settings: Any) -> dict:
    """Filter the raw pairs into the run's work area; `settings` are FilterConfig fields by name."""
    import mlflow

    from components.common import config, storage
    from components.common.context import RunContext, write_pointer
    from components.common.inputs import log_source
    from components.common.tracking import log_file, stage_run, tag_run
    from components.filter.config import FilterConfig
    from components.filter.stage import filter_pairs
    from components.filter.view import show

    run_ctx = RunContext.from_json(ctx)
    cfg = config.stage_config(FilterConfig, settings, "filter")  # + the object in filter_settings
    out = run_ctx.uri("filtered")
    with stage_run("filter", run_ctx.tracking, params=cfg, tags={"source_uri": cfg.source_uri}) as mlrun:
        if cfg.cluster.resolved_launcher() == "rayjob":  # the same command on the RayJob's Ray cluster
            from components.common.rayjob import run_stage_rayjob, stage_entrypoint

            run_stage_rayjob("filter", stage_entrypoint("filter", [cfg.source_uri, out], config.to_dict(cfg)),
                             cfg.cluster.spec(), run_ctx)
            stats = storage.read_json(storage.join(out, "stats.json"))
        else:
            stats = filter_pairs(out, cfg)
        log_source(stats["source_uri"])  # the raw pairs as the run's MLflow dataset input
        mlflow.log_metrics({"total": stats["total"], "kept": stats["kept"],
                            **{f"rejected.{k}": v for k, v in stats["rejected"].items()}})
        log_file(storage.join(out, "stats.png"), "plots")
        log_file(storage.join(out, "stats.json"))
        for sample in storage.list_files(storage.join(out, "rejects")):  # rejected examples, per reason
            log_file(sample, "rejects")
        mlflow.set_tag("decisions_uri", stats["decisions_uri"])  # every record's decision: a parquet dataset
        parts = storage.list_files(stats["decisions_uri"])
        if sum(storage.size(p) for p in parts) <= DECISIONS_ARTIFACT_MAX:
            for part in parts:
                log_file(part, "decisions")
    tag_run(run_ctx.tracking, run_ctx.parent_run_id, {"lineage.source_uri": stats["source_uri"],
                                                      "lineage.filtered_uri": out})
    return show(report, write_pointer(filtered, {"uri": out, "source_uri": stats["source_uri"],
                                                 "run_id": mlrun.info.run_id, "stats": stats,
                                                 "samples": stats["kept"]}), run_ctx.tracking)
