"""Evaluation stage: zero-shot classification, image<->text retrieval and a linear probe.

``evaluate(model_uri, manifest_uri, output_uri, cfg, tracking) -> report``
(the report dict written to report.json; its "metrics" entry is the flat metrics dict)

- zero-shot top-1/top-5 with a prompt-template ensemble on the labelled set ``cfg.eval_data_uri``
  (ImageFolder directory or labelled webdataset tars, local or s3://; see ``components.evaluate.data``;
  "synthetic" generates the bundled split; "" skips zero-shot and the probe, and the report says so).
  ``cfg.dataset`` picks class names and templates: "cifar10"/"cifar100"/"imagenet" (CLIP-paper names
  and templates), "synthetic" (the synthetic colour classes), "custom" (names from the data);
- retrieval recall@1/5/10 and mean/median rank on the manifest's validation shards;
- a linear probe (``components.evaluate.probe``) with k-shot variants on the labelled set's features.

Outputs: ``<output_uri>/report.json`` (metrics, per-class accuracy, confusion matrix with class names),
PNGs under ``<output_uri>/plots/``, and an MLflow run "evaluate" with the same metrics, figures and
report. ``report.to_kfp_artifacts`` turns the report into KFP ``Metrics`` / ``ClassificationMetrics``.
Metric names: ``zeroshot_top1``, ``zeroshot_top5``, ``zeroshot_mean_per_class``,
``retrieval_{image_to_text,text_to_image}_R_at_{1,5,10}``, ``retrieval_*_{mean,median}_rank``,
``linear_probe_top1_{k}shot``, ``linear_probe_top1_full`` (MLflow forbids '@' in names).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_model.checkpoint import load_model
from clip_model.transforms import image_transform
from clip_model.zeroshot import accuracy, retrieval_metrics, zeroshot_classifier, zeroshot_logits
from components.common import config, storage
from components.common import tracking as mltrack
from components.common.context import SYNTHETIC
from components.common.dataset import iter_samples, load_manifest, load_tokenizer, split_samples
from components.common.progress import Progress
from components.common.tracking import TrackingConfig
from components.evaluate.config import EvalConfig
from components.evaluate.data import LabelledSet, load_labelled_set
from components.evaluate.probe import ProbeConfig, linear_probe
from components.evaluate.report import flat_metrics, write_figures
from components.evaluate.templates import dataset_defaults, resolve_templates

THUMB = 64


# --------------------------------------------------------------------------- inputs

def _model_file(model_uri: str) -> str:
    return model_uri if model_uri.endswith((".pt", ".pth", ".bin")) else storage.join(model_uri, "model.pt")


def load_eval_model(model_uri: str, device: str = "cpu"):
    uri = _model_file(model_uri)
    with storage.local_copy(uri) as path:
        return load_model(path, map_location=device)


def _tokenizer_uri(cfg: EvalConfig, manifest: dict | None, model_uri: str) -> str:
    if cfg.tokenizer_uri:
        return cfg.tokenizer_uri
    if manifest and manifest.get("tokenizer"):
        return manifest["tokenizer"]
    sibling = storage.join(os.path.dirname(_model_file(model_uri)) if not storage.is_s3(model_uri)
                           else _model_file(model_uri).rsplit("/", 1)[0], "tokenizer.json")
    if storage.exists(sibling):
        return sibling
    raise ValueError(f"evaluate: no tokenizer: give cfg.tokenizer_uri or a manifest (none beside {model_uri})")


@torch.no_grad()
def _encode_images(model, images: list[Image.Image], transform, device: str) -> torch.Tensor:
    batch = torch.stack([transform(im) for im in images]).to(device)
    return F.normalize(model.encode_image(batch).float(), dim=-1).cpu()


def image_features(model, data: LabelledSet, cfg: EvalConfig) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised image features [N, D] and labels [N] of a labelled set."""
    transform = image_transform(model.visual.image_size, train=False)
    progress = Progress(len(data) if data.size_known else None, "images", label="evaluate")
    feats, labels, batch = [], [], []
    for _key, image, label in data:
        batch.append(image)
        labels.append(label)
        if len(batch) == cfg.eval_batch_size:
            feats.append(_encode_images(model, batch, transform, cfg.device))
            progress.update(len(batch))
            batch = []
    if batch:
        feats.append(_encode_images(model, batch, transform, cfg.device))
        progress.update(len(batch))
    if not feats:
        raise ValueError(f"labelled set {data.root}: no images")
    progress.close()
    return torch.cat(feats), np.asarray(labels, dtype=int)


# --------------------------------------------------------------------------- the three evaluations

def zero_shot(model, tokenizer, feats: torch.Tensor, labels: np.ndarray, classnames: list[str],
              templates: list[str], device: str) -> dict:
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device=device)
    logits = zeroshot_logits(feats.to(device), classifier).cpu()
    targets = torch.as_tensor(labels)
    top1, top5 = accuracy(logits, targets, topk=(1, 5))
    pred = logits.argmax(dim=1).numpy()
    n = len(classnames)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (labels, pred), 1)
    support = matrix.sum(axis=1)
    per_class = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)
    present = support > 0
    return {"top1": top1, "top5": top5, "mean_per_class": float(np.nanmean(per_class[present])),
            "n": int(len(labels)), "classnames": classnames, "num_templates": len(templates),
            "chance": 1.0 / n, "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
            "confusion_matrix": {"categories": classnames, "matrix": matrix.tolist()}}


@torch.no_grad()
def retrieval(model, tokenizer, manifest: dict, cfg: EvalConfig) -> tuple[dict, dict]:
    """Retrieval metrics on the validation split, and what the example PNG needs."""
    transform = image_transform(model.visual.image_size, train=False)
    total = split_samples(manifest, "validation")
    total = min(total, cfg.retrieval_max_samples) if total else cfg.retrieval_max_samples
    progress = Progress(total, "pairs", label="evaluate/retrieval")
    img_feats, txt_feats, captions, thumbs = [], [], [], []
    images: list[Image.Image] = []
    texts: list[str] = []

    def flush() -> None:
        if images:
            img_feats.append(_encode_images(model, images, transform, cfg.device))
            tokens = tokenizer(texts, context_length=model.context_length).to(cfg.device)
            txt_feats.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
            progress.update(len(images))
            images.clear()
            texts.clear()

    for _key, image, caption, _meta in iter_samples(manifest, "validation"):
        if len(captions) >= cfg.retrieval_max_samples:
            break
        images.append(image)
        texts.append(caption)
        captions.append(caption)
        thumb = image.copy()
        thumb.thumbnail((THUMB, THUMB))
        thumbs.append(thumb)
        if len(images) == cfg.eval_batch_size:
            flush()
    flush()
    if not captions:
        raise ValueError("retrieval: the manifest's validation split has no samples")
    progress.close()
    img, txt = torch.cat(img_feats), torch.cat(txt_feats)
    metrics = retrieval_metrics(img, txt)
    metrics["n"] = len(captions)
    n_q = min(cfg.retrieval_examples, len(captions))
    queries = np.linspace(0, len(captions) - 1, n_q).round().astype(int).tolist() if n_q else []
    k = min(cfg.retrieval_top_k, len(captions))
    ranked = (txt[queries] @ img.T).topk(k, dim=1).indices.tolist() if queries else []
    examples = {"captions": [captions[q] for q in queries], "ranked": ranked, "targets": queries,
                "thumbnails": thumbs}
    return metrics, examples


def labelled_data(cfg: EvalConfig, output_uri: str) -> tuple[str | None, str]:
    """(URI of the labelled set or None, how the report names it). "synthetic" generates the bundled
    split under `<output_uri>/data`; "" evaluates no labelled set (never anything else instead)."""
    if not cfg.eval_data_uri:
        return None, "none: eval_data_uri is empty, so zero-shot and the linear probe are skipped"
    if cfg.eval_data_uri != SYNTHETIC:
        return cfg.eval_data_uri, cfg.eval_data_uri
    from components.synthetic.corpus import EVAL_SEED, generate_eval_split, write_to

    uri = write_to(storage.join(output_uri, "data"),
                   lambda d: generate_eval_split(d, per_class=cfg.synthetic_per_class, seed=EVAL_SEED))
    return uri, f"synthetic: generated, {cfg.synthetic_per_class} images per class, seed {EVAL_SEED}, at {uri}"


def evaluate(model_uri: str, manifest_uri: str | None, output_uri: str, cfg: EvalConfig,
             tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """Run the evaluations that have inputs (zero-shot + probe need `cfg.eval_data_uri`, retrieval a
    manifest); write ``<output_uri>/report.json`` and log an MLflow run. Returns the report:
    ``report["metrics"]`` is the flat metrics dict; "dataset" and "eval_data" name what was evaluated,
    "skipped" what was not and why; "zeroshot" (per-class accuracy, confusion matrix with class names),
    "retrieval", "linear_probe", "report_uri", "mlflow_run_id" hold the rest."""
    tcfg = tracking or TrackingConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()
    manifest = load_manifest(manifest_uri) if manifest_uri else None
    model = load_eval_model(model_uri, cfg.device)
    tokenizer = load_tokenizer(_tokenizer_uri(cfg, manifest, model_uri), model.vocab_size)
    dataset_names, default_templates = dataset_defaults(cfg.resolved_dataset)
    templates = resolve_templates(cfg.templates or default_templates)
    report: dict[str, Any] = {"model_uri": model_uri, "manifest_uri": manifest_uri, "dataset": cfg.resolved_dataset,
                              "templates": cfg.templates or default_templates, "config": config.to_dict(cfg),
                              "dataset_content_hash": (manifest or {}).get("content_hash", ""), "skipped": {},
                              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    examples = None
    with mltrack.stage_run("evaluate", tcfg, params=cfg, tags={"dataset_content_hash": report["dataset_content_hash"],
                                                               "model_uri": model_uri}) as run:
        data_uri, report["eval_data"] = labelled_data(cfg, output_uri)
        if data_uri is None:
            report["skipped"].update(zeroshot="no eval_data_uri", linear_probe="no eval_data_uri")
        else:
            data = load_labelled_set(data_uri, classnames=dataset_names, classnames_uri=cfg.classnames_uri,
                                     limit=cfg.max_images)
            feats, labels = image_features(model, data, cfg)
            report["zeroshot"] = zero_shot(model, tokenizer, feats, labels, data.classnames, templates, cfg.device)
            if cfg.linear_probe:
                probe = linear_probe(feats.numpy(), labels, ProbeConfig(
                    shots=cfg.probe_shots, test_fraction=cfg.probe_test_fraction, c_grid=cfg.probe_c_grid,
                    seed=cfg.seed))
                report["linear_probe"] = {**probe, "chance": 1.0 / len(data.classnames)}
            else:
                report["skipped"]["linear_probe"] = "linear_probe is off"
        if manifest is not None:
            report["retrieval"], examples = retrieval(model, tokenizer, manifest, cfg)
        else:
            report["skipped"]["retrieval"] = "no dataset manifest"
        if "zeroshot" not in report and "retrieval" not in report:
            raise ValueError("evaluate: nothing to evaluate: give a manifest (retrieval) and/or a labelled set "
                             "(eval_data_uri)")
        report["metrics"] = flat_metrics(report)
        report["mlflow_run_id"] = run.info.run_id
        report["seconds"] = round(time.perf_counter() - start, 2)
        report["report_uri"] = storage.join(output_uri, "report.json")
        import mlflow

        mlflow.log_metrics(report["metrics"])
        mlflow.set_tags({"eval_dataset": report["dataset"], "eval_data": report["eval_data"]})
        write_figures(report, examples, output_uri)
        storage.write_json(storage.join(output_uri, "report.json"), report)
        mltrack.log_json(report, "report.json")
    skipped = "; ".join(f"{k} skipped ({v})" for k, v in report["skipped"].items())
    print("[evaluate] " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(report["metrics"].items()))
          + (f"  [{skipped}]" if skipped else ""), flush=True)
    return report
