"""The export stage's MLflow side: the raw bundle as run artifacts, one registered CLIP (the pyfunc of
`components.export.pyfunc`), its version's lineage tags and a description with the headline figures, and
`fetch_bundle`, which rebuilds a bundle directory from the registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from components.inference.onnx_clip import BUNDLE_FILES, fetch_model_bundle

HEADLINE_DATASETS_MAX = 4  # zero-shot figures named in a version's description; the rest are counted


def headline_figures(training_run_id: str, parent_run_id: str | None) -> dict[str, Any]:
    """What a model version's description reports: the training run's model, steps and final loss, and the
    evaluate stage's figures (`evaluation_figures` of the sibling run under the same pipeline run)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    out: dict[str, Any] = {}
    if training_run_id:
        try:
            run = client.get_run(training_run_id)
            out.update(model=run.data.params.get("model_config"), steps=run.data.params.get("steps"),
                       final_loss=run.data.metrics.get("final_loss"))
        except MlflowException:
            pass  # a run id from another store: no figures
    evaluation = evaluate_run(parent_run_id)
    if evaluation is not None:
        out.update(evaluation_figures(evaluation.data.metrics, evaluation.data.tags))
    return {k: v for k, v in out.items() if v is not None}


def evaluate_run(parent_run_id: str | None) -> Any:
    """The latest evaluate run under pipeline run `parent_run_id` (None: no parent, or none ran)."""
    import mlflow

    if not parent_run_id:
        return None
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'evaluate'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def evaluation_figures(metrics: dict[str, float], tags: dict[str, str]) -> dict[str, Any]:
    """An evaluate run's headline figures from its metrics and tags (names: `components.evaluate.metrics`):
    "zeroshot_top1" ({dataset: top-1} for each dataset in the `eval_datasets` tag that has it) and the
    validation split's retrieval R@1 ("image_to_text_R1", "text_to_image_R1")."""
    names = [n for n in tags.get("eval_datasets", "").split(",") if f"{n}/zeroshot_top1" in metrics]
    return {"zeroshot_top1": {n: metrics[f"{n}/zeroshot_top1"] for n in names} or None,
            "image_to_text_R1": metrics.get("validation/retrieval_image_to_text_R_at_1"),
            "text_to_image_R1": metrics.get("validation/retrieval_text_to_image_R_at_1")}


def describe(figures: dict[str, Any], parity: dict, dataset_content_hash: str, training_run_id: str) -> str:
    """The model version's description: what it is, where it came from and how good it is."""
    def num(key: str) -> str:
        return f"{figures[key]:.3f}"

    lines = [f"CLIP ({figures.get('model', 'model')}) as one pyfunc: ONNX image and text encoders, tokenizer and "
             "preprocessing. Input `image` (encoded bytes) and/or `text`; output L2-normalised "
             "`image_embedding` / `text_embedding`."]
    origin = f"Trained in MLflow run {training_run_id or '?'}"
    if "steps" in figures:
        origin += f" for {figures['steps']} steps"
    if "final_loss" in figures:
        origin += f" (final loss {num('final_loss')})"
    lines.append(origin + f" on dataset {dataset_content_hash[:12] or '?'}.")
    if figures.get("zeroshot_top1"):
        per_set = list(figures["zeroshot_top1"].items())
        shown = ", ".join(f"{v:.3f} on {n}" for n, v in per_set[:HEADLINE_DATASETS_MAX])
        more = len(per_set) - HEADLINE_DATASETS_MAX
        lines.append(f"Zero-shot top-1 {shown}" + (f" (and {more} more datasets)." if more > 0 else "."))
    if "image_to_text_R1" in figures:
        lines.append(f"Validation retrieval R@1 image→text {num('image_to_text_R1')}, "
                     f"text→image {num('text_to_image_R1')}.")
    lines.append(f"ONNX vs PyTorch: max |Δ| {parity['image']['max_abs']:.1e} (image), "
                 f"{parity['text']['max_abs']:.1e} (text).")
    return " ".join(lines)


def log_and_register(bundle: Path, registered_model_name: str | None, tags: dict[str, str],
                     description: str) -> dict[str, Any]:
    """Log the raw bundle files under `onnx/` of the active run, the pyfunc CLIP as its model `clip`
    (registered as `registered_model_name` unless None), and tag + describe the new version."""
    from importlib import metadata

    import mlflow
    import onnx
    import onnxruntime
    import tokenizers
    import PIL

    from components.export.pyfunc import log_clip_model

    for name in BUNDLE_FILES:
        mlflow.log_artifact(str(bundle / name), "onnx")
    requirements = [f"mlflow=={mlflow.__version__}", f"onnxruntime=={onnxruntime.__version__}",
                    f"onnx=={onnx.__version__}", f"tokenizers=={tokenizers.__version__}",
                    f"pillow=={PIL.__version__}", f"ftfy=={metadata.version('ftfy')}", "numpy", "pandas"]
    info = log_clip_model(bundle, registered_model_name, requirements)
    version = str(info.registered_model_version) if registered_model_name else None
    if registered_model_name:
        client = mlflow.MlflowClient()
        for key, value in tags.items():
            client.set_model_version_tag(registered_model_name, version, key, str(value))
        client.update_model_version(registered_model_name, version, description=description)
    return {"model_uri": info.model_uri, "registered_model_name": registered_model_name, "version": version}


def fetch_bundle(registered_model_name: str, version: str | int, dst: str | os.PathLike) -> Path:
    """Rebuild a bundle directory (what `clipflow zeroshot --bundle` reads) from a registered version."""
    return fetch_model_bundle(f"models:/{registered_model_name}/{version}", dst)


# --------------------------------------------------------------------------- promotion by alias

CANDIDATE, CHAMPION = "candidate", "champion"  # the registered model's aliases: the newest version, the one serving


def suite_identity(run: Any) -> tuple[str, tuple[tuple[str, str], ...]]:
    """What "the same evaluation suite" means for an evaluate run: the suite's name and the (name, digest) of
    each suite dataset it read (its MLflow dataset inputs); the validation split, which follows each run's
    training data, is left out."""
    import json

    sets = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        profile = json.loads(item.dataset.profile or "{}")
        if profile.get("kind") != "manifest":
            sets.append((item.dataset.name, item.dataset.digest))
    return run.data.tags.get("eval_suite", ""), tuple(sorted(sets))


def version_evaluation(name: str, version: str) -> Any:
    """The evaluate run of the pipeline run that exported version `version` of `name` (its `export_run_id`
    tag -> that run's parent -> its evaluate run), with its inputs; None where there is none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        mv = client.get_model_version(name, version)
        export_run = client.get_run(mv.tags.get("export_run_id") or mv.run_id)
    except MlflowException:
        return None
    run = evaluate_run(export_run.data.tags.get("mlflow.parentRunId"))
    return client.get_run(run.info.run_id) if run is not None else None


def _gate(metric: str, min_delta: float, mine: Any, theirs: Any, champion: str) -> tuple[bool, str]:
    """(promote?, why) for a version evaluated in `mine` against the champion's `theirs`."""
    value = mine.data.metrics.get(metric) if mine is not None else None
    theirs_value = theirs.data.metrics.get(metric) if theirs is not None else None
    if value is None:
        return False, f"this version has no {metric} (no evaluate run in its pipeline run)"
    if theirs_value is None:
        return False, (f"champion v{champion} has no {metric} to compare with; move the alias by hand "
                       f"(MlflowClient().set_registered_model_alias) to replace it")
    if suite_identity(mine) != suite_identity(theirs):
        ours, other = suite_identity(mine), suite_identity(theirs)
        return False, (f"evaluated on another suite than champion v{champion} ({ours[0] or '-'} with "
                       f"{len(ours[1])} datasets vs {other[0] or '-'} with {len(other[1])}, or other data): "
                       "not comparable")
    delta = value - theirs_value
    verdict = "at least as good as" if delta >= min_delta else "worse than"
    return delta >= min_delta, (f"{metric} {value:.4f} vs {theirs_value:.4f} of champion v{champion} (Δ {delta:+.4f}, "
                                f"min Δ {min_delta:+.4f}): {verdict} the champion")


def promote(name: str, version: str, metric: str, min_delta: float, parent_run_id: str | None) -> dict[str, Any]:
    """Give the new version `version` of `name` the alias `candidate`, and `champion` too when its `metric`
    (an evaluate-run metric, higher is better) is at least the champion's + `min_delta` on the same evaluation
    suite (`suite_identity`); a first version simply takes `champion`. The decision and both figures are
    appended to the version's description and tagged on it (`promotion`). Returns {"alias" (the best alias
    this version holds), "promoted", "reason", "metric", "min_delta", "value", "champion_version" (before),
    "champion_value"}."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    client.set_registered_model_alias(name, CANDIDATE, version)
    mine = evaluate_run(parent_run_id)
    mine = client.get_run(mine.info.run_id) if mine is not None else None
    try:
        holder = client.get_model_version_by_alias(name, CHAMPION).version
    except MlflowException:
        holder = None
    theirs = None
    if holder is None:
        promoted, reason = True, "the first version with an evaluation gate: no champion to compare with"
    elif str(holder) == str(version):
        promoted, reason = True, "already the champion"
    else:
        theirs = version_evaluation(name, str(holder))
        promoted, reason = _gate(metric, min_delta, mine, theirs, str(holder))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    out = {"alias": CHAMPION if promoted else CANDIDATE, "promoted": promoted, "reason": reason, "metric": metric,
           "min_delta": min_delta, "value": mine.data.metrics.get(metric) if mine is not None else None,
           "champion_version": str(holder) if holder is not None else None,
           "champion_value": theirs.data.metrics.get(metric) if theirs is not None else None}
    description = client.get_model_version(name, version).description or ""
    client.update_model_version(name, version, description=f"{description}\n\n{promotion_text(out)}".strip())
    client.set_model_version_tag(name, version, "promotion", out["alias"])
    return out


def promotion_text(promotion: dict[str, Any]) -> str:
    """One sentence: which aliases the version took, and why."""
    took = f"`{CANDIDATE}` and `{CHAMPION}`" if promotion["promoted"] else f"`{CANDIDATE}` only"
    return f"Promotion: took {took}: {promotion['reason']}."
