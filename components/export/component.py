"""The export stage's KFP component: a thin wrapper of `components.export.task.run`."""

from kfp.dsl import Dataset, Input, Markdown, Model, Output

from components.common.kfp_component import component


@component
def export(ctx: str, dataset: Input[Dataset], model: Input[Model], registered_model_name: str,
           promotion_metric: str, promotion_min_delta: float, export_settings: str, onnx_model: Output[Model], report: Output[Markdown]):
    """Export the image and text encoders to ONNX, check parity with PyTorch, register them in MLflow (alias
    `candidate`; `champion` too when at least as good as the champion)."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.export.task import run
    run_stage("export", run, settings)
