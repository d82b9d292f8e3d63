"""What the train stage's KFP component runs, as a plain function: KFP's small values and artifacts
in, a call of the stage, lineage on the parent MLflow run, a JSON pointer out. No kfp import, so the
component's process can import it (kfp.dsl has no decorators at run time)."""

from typing import Any


def run(ctx: str, dataset: Any, model: Any, report: Any = None, **settings: Any) -> dict:
    """Train CLIP on the dataset's train split; `settings` are TrainConfig fields by name."""
    from components.common import config, storage
    from components.common.context import RunContext, read_pointer, write_pointer
    from components.common.tracking import tag_run
    from components.train.config import TrainConfig
    from components.train.stage import train
    from components.train.view import show

    run_ctx = RunContext.from_json(ctx)
    cfg = config.stage_config(TrainConfig, settings, "train")  # + the object in train_settings
    data = read_pointer(dataset)
    out = run_ctx.uri("model")
    lineage = {}
    if cfg.init_checkpoint:  # fine-tuning: the right tokenizer, and the exact file, recorded
        from components.train.initial_model import check_dataset_tokenizer, pin_checkpoint

        check_dataset_tokenizer(cfg, data["tokenizer"])
        cfg = pin_checkpoint(cfg)
        lineage = {"lineage.init_checkpoint": cfg.init_checkpoint,
                   "lineage.init_checkpoint_sha256": cfg.init_checkpoint_sha256}
    if cfg.resume_from:  # continuing another run's checkpoint (the train run's tags name the checkpoint)
        lineage["lineage.resumed_from"] = cfg.resume_from
    if cfg.resolved_launcher() == "rayjob":
        from components.common.rayjob import run_training_rayjob

        result = run_training_rayjob(data["uri"], out, cfg, run_ctx)
    else:
        result = train(data["uri"], out, cfg, run_ctx.tracking)
    # The model folder is self-contained: a later run can start from it (init_checkpoint) with its tokenizer.
    storage.write_text(storage.join(out, "tokenizer.json"), storage.read_text(data["tokenizer"]))
    tag_run(run_ctx.tracking, run_ctx.parent_run_id, {"lineage.training_run_id": result["run_id"],
                                                      "lineage.model_uri": result["model_uri"], **lineage})
    return show(report, write_pointer(model, {**result, "uri": result["model_uri"],
                                              "dataset_content_hash": data["content_hash"],
                                              "tokenizer": data["tokenizer"], "manifest_uri": data["uri"],
                                              **lineage}), run_ctx.tracking)
