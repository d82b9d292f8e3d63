"""What the evaluate stage's KFP component runs, as a plain function: KFP's small values and artifacts
in, a call of the stage, the KFP metrics and Markdown artifacts out. No kfp import, so the
component's process can import it (kfp.dsl has no decorators at run time)."""

from typing import Any


def run(ctx: str, dataset: Any, model: Any, metrics: Any, classification: Any, report: Any,
        **settings: Any) -> dict:
    """The evaluation suite and the validation-split retrieval; fills the KFP metrics and Markdown artifacts."""
    from components.common import config
    from components.common.context import RunContext, read_pointer
    from components.evaluate.config import EvalConfig
    from components.evaluate.report import to_kfp_artifacts
    from components.evaluate.stage import evaluate
    from components.evaluate.view import show

    run_ctx = RunContext.from_json(ctx)
    cfg = config.stage_config(EvalConfig, settings, "evaluate")  # + the object in evaluate_settings
    result = evaluate(read_pointer(model)["uri"], read_pointer(dataset)["uri"], run_ctx.uri("eval"), cfg,
                      run_ctx.tracking)
    to_kfp_artifacts(result, metrics, classification)
    return show(report, result, run_ctx.tracking)
