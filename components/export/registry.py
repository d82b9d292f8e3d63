"""The export stage's MLflow side: the raw bundle as run artifacts, one registered CLIP (the pyfunc of
`components.export.pyfunc`), its version's lineage tags and a description with the headline figures, and
`fetch_bundle`, which rebuilds a bundle directory from the registry."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from components.inference.onnx_clip import BUNDLE_FILES

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
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        runs = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.stage = 'evaluate'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs:
            out.update(evaluation_figures(runs[0].data.metrics, runs[0].data.tags))
    return {k: v for k, v in out.items() if v is not None}


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
    import mlflow

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(f"models:/{registered_model_name}/{version}", dst_path=tmp))
        (image_encoder,) = (local / "artifacts").rglob(BUNDLE_FILES[0])
        for name in BUNDLE_FILES:
            shutil.copyfile(image_encoder.parent / name, dst / name)
    return dst
