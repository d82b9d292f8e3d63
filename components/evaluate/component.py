"""The evaluate stage's KFP component: a thin wrapper of `components.evaluate.task.run`."""

from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components.common.kfp_component import component


@component
def evaluate(ctx: str, dataset: Input[Dataset], model: Input[Model], eval_suite: str, templates: str,
             synthetic_per_class: int, evaluate_settings: str, metrics: Output[Metrics],
             classification: Output[ClassificationMetrics], report: Output[Markdown]):
    """Evaluate the way the CLIP paper does, on a suite of datasets: zero-shot with prompt ensembles, few-shot
    and full linear probes, retrieval, and robustness under distribution shift."""
    settings = dict(locals())
    from components.common.console import run_stage
    from components.evaluate.task import run
    run_stage("evaluate", run, settings)
