"""The export stage's KFP component: a thin wrapper of `components.export.step.run`."""

from kfp.dsl import Dataset, Input, Model, Output

from components.common.kfp_component import component


@component
def export(ctx: str, dataset: Input[Dataset], model: Input[Model], registered_model_name: str,
           onnx_model: Output[Model]):
    """Export the image and text encoders to ONNX, check parity with PyTorch, register them in MLflow."""
    settings = dict(locals())
    from components.export.step import run
    run(**settings)
