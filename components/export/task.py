"""What the export stage's KFP component runs, as a plain function: KFP's small values and artifacts
in, a call of the stage, lineage on the parent MLflow run, a JSON pointer out. No kfp import, so the
component's process can import it (kfp.dsl has no decorators at run time)."""

from typing import Any


def run(ctx: str, dataset: Any, model: Any, onnx_model: Any, report: Any = None, **settings: Any) -> dict:
    """Export ONNX encoders, check parity, register the model; tags close the lineage chain."""
    from components.common import config
    from components.common.context import RunContext, read_pointer, write_pointer
    from components.common.tracking import tag_run
    from components.export.config import ExportConfig
    from components.export.stage import export
    from components.export.view import show

    run_ctx = RunContext.from_json(ctx)
    cfg = config.stage_config(ExportConfig, settings, "export")  # + the object in export_settings
    data, trained = read_pointer(dataset), read_pointer(model)
    result = export(trained["uri"], data["tokenizer"], run_ctx.uri("export"), cfg, run_ctx.tracking,
                    dataset_content_hash=data["content_hash"], training_run_id=trained["run_id"])
    tag_run(run_ctx.tracking, run_ctx.parent_run_id, {
        "lineage.registered_model": f"{result.get('registered_model_name')}/{result.get('registered_model_version')}",
        "lineage.registered_model_alias": (result.get("promotion") or {}).get("alias", ""),
        "lineage.export_uri": result["bundle_uri"]})
    write_pointer(onnx_model, {**result, "uri": result["bundle_uri"]})
    return show(report, result, run_ctx.tracking)
