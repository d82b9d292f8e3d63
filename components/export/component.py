"""The export stage in the pipeline: `run` (plain, testable without KFP) and the KFP component `export`."""

from typing import Any

from kfp.dsl import Dataset, Input, Model, Output

from components.common.kfp_component import component


def run(ctx: str, dataset: Any, model: Any, onnx_model: Any, **settings: Any) -> dict:
    """Export ONNX encoders, check parity, register the model; tags close the lineage chain."""
    from components.common import config
    from components.common.context import RunContext, read_pointer, write_pointer
    from components.common.tracking import tag_run
    from components.export.config import ExportConfig
    from components.export.stage import export

    run_ctx = RunContext.from_json(ctx)
    cfg = config.from_dict(ExportConfig, settings)
    data, trained = read_pointer(dataset), read_pointer(model)
    result = export(trained["uri"], data["tokenizer"], run_ctx.uri("export"), cfg, run_ctx.tracking,
                    dataset_content_hash=data["content_hash"], training_run_id=trained["run_id"])
    tag_run(run_ctx.tracking, run_ctx.parent_run_id, {
        "lineage.registered_model": f"{result.get('registered_model_name')}/{result.get('registered_model_version')}",
        "lineage.export_uri": result["bundle_uri"]})
    write_pointer(onnx_model, {**result, "uri": result["bundle_uri"]})
    return result


@component
def export(ctx: str, dataset: Input[Dataset], model: Input[Model], registered_model_name: str,
           onnx_model: Output[Model]):
    """Export the image and text encoders to ONNX, check parity with PyTorch, register them in MLflow."""
    settings = dict(locals())
    from components.export.component import run
    run(**settings)
