"""The evaluate stage in the pipeline: `run` (plain, testable without KFP) and the KFP component `evaluate`."""

from typing import Any

from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.common.kfp_component import component


def run(ctx: str, dataset: Any, model: Any, metrics: Any, classification: Any, report: Any,
        **settings: Any) -> dict:
    """Zero-shot, retrieval and linear-probe evaluation; fills the KFP metrics and Markdown artifacts."""
    from pathlib import Path

    from components.common import config
    from components.common.context import RunContext, read_pointer
    from components.evaluate.config import EvalConfig
    from components.evaluate.report import markdown_report, to_kfp_artifacts
    from components.evaluate.stage import evaluate

    run_ctx = RunContext.from_json(ctx)
    cfg = config.from_dict(EvalConfig, settings)
    result = evaluate(read_pointer(model)["uri"], read_pointer(dataset)["uri"], run_ctx.uri("eval"), cfg,
                      run_ctx.tracking)
    to_kfp_artifacts(result, metrics, classification)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    Path(report.path).write_text(markdown_report(result))
    return result


@component
def evaluate(ctx: str, dataset: Input[Dataset], model: Input[Model], eval_data_uri: str, templates: str,
             synthetic_per_class: int, metrics: Output[Metrics], classification: Output[ClassificationMetrics],
             report: Output[Markdown]):
    """Evaluate the way the CLIP paper does: zero-shot with prompt ensembles, retrieval, linear probe."""
    settings = dict(locals())
    from components.evaluate.component import run
    run(**settings)
