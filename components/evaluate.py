"""Evaluation stage: zero-shot classification, image<->text retrieval and a linear probe.

``evaluate(model_uri, manifest_uri, eval_data_uri, output_uri, cfg, tracking) -> report``
(the report dict written to report.json; its "metrics" entry is the flat metrics dict)

- zero-shot top-1/top-5 with a prompt-template ensemble on a labelled set (ImageFolder directory or
  labelled webdataset tars, local or s3://; see ``components.eval_data``). ``cfg.dataset`` picks class
  names and templates: "cifar10"/"cifar100"/"imagenet" (CLIP-paper names and templates), "synthetic"
  (the synthetic colour classes; with no `eval_data_uri` the split is generated on the fly), "custom";
- retrieval recall@1/5/10 and mean/median rank on the manifest's validation shards;
- a linear probe (``components.linear_probe``) with k-shot variants on the labelled set's features.

Outputs: ``<output_uri>/report.json`` (metrics, per-class accuracy, confusion matrix with class names),
PNGs under ``<output_uri>/plots/``, and an MLflow run "evaluate" with the same metrics, figures and
report. ``to_kfp_artifacts`` turns the report into KFP ``Metrics`` / ``ClassificationMetrics``.
Metric names: ``zeroshot_top1``, ``zeroshot_top5``, ``zeroshot_mean_per_class``,
``retrieval_{image_to_text,text_to_image}_R_at_{1,5,10}``, ``retrieval_*_{mean,median}_rank``,
``linear_probe_top1_{k}shot``, ``linear_probe_top1_full`` (MLflow forbids '@' in names).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_model.checkpoint import load_model
from clip_model.transforms import image_transform
from clip_model.zeroshot import accuracy, retrieval_metrics, zeroshot_classifier, zeroshot_logits
from components.config import config_from_dict
from components import eval_plots, storage, wds
from components import tracking as mltrack
from components.eval_data import LabelledSet, dataset_defaults, load_labelled_set, resolve_templates
from components.linear_probe import ProbeConfig, linear_probe
from components.progress import Progress
from components.tracking import TrackingConfig

THUMB = 64


@dataclass
class EvalConfig:
    dataset: str = "synthetic"  # synthetic | cifar10 | cifar100 | imagenet | custom (names + templates)
    templates: str | None = None  # template set name or file URI; None = the dataset's default
    classnames_uri: str | None = None  # overrides <eval_data>/classnames.txt
    tokenizer_uri: str | None = None  # None = the manifest's tokenizer, else <model dir>/tokenizer.json
    batch_size: int = 64
    max_images: int | None = None  # cap on the labelled set (class-balanced for folders)
    synthetic_per_class: int = 40  # size of the generated synthetic split (dataset=synthetic, no data)
    retrieval_max_samples: int = 5000
    retrieval_examples: int = 6  # queries shown in the retrieval PNG
    retrieval_top_k: int = 5
    linear_probe: bool = True
    probe_shots: tuple[int, ...] = (1, 4, 16)
    probe_test_fraction: float = 0.5
    probe_c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    seed: int = 0
    device: str = "cpu"
    num_threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        self.probe_shots = tuple(int(s) for s in self.probe_shots)
        self.probe_c_grid = tuple(float(c) for c in self.probe_c_grid)
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size}: must be >= 1")
        if not 0.0 < self.probe_test_fraction < 1.0:
            raise ValueError(f"probe_test_fraction={self.probe_test_fraction}: must be in (0, 1)")
        dataset_defaults(self.dataset)  # validates the name

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalConfig:
        return config_from_dict(cls, d)


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
        if len(batch) == cfg.batch_size:
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
    total = wds.split_samples(manifest, "validation")
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

    for _key, image, caption, _meta in wds.iter_samples(manifest, "validation"):
        if len(captions) >= cfg.retrieval_max_samples:
            break
        images.append(image)
        texts.append(caption)
        captions.append(caption)
        thumb = image.copy()
        thumb.thumbnail((THUMB, THUMB))
        thumbs.append(thumb)
        if len(images) == cfg.batch_size:
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


def flat_metrics(report: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    zs = report.get("zeroshot")
    if zs:
        out.update(zeroshot_top1=zs["top1"], zeroshot_top5=zs["top5"], zeroshot_mean_per_class=zs["mean_per_class"])
    for k, v in (report.get("retrieval") or {}).items():
        if k != "n":
            out["retrieval_" + k.replace("@", "_at_")] = float(v)
    for name, s in ((report.get("linear_probe") or {}).get("settings") or {}).items():
        out[f"linear_probe_top1_{name}"] = s["top1"]
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- outputs

def to_kfp_artifacts(report: dict, metrics_artifact: Any = None, classification_artifact: Any = None) -> None:
    """Fill KFP ``dsl.Metrics`` (every metric) and ``dsl.ClassificationMetrics`` (the zero-shot
    confusion matrix) from a report (either artifact may be None; a flat metrics dict fills Metrics only)."""
    metrics = report["metrics"] if isinstance(report.get("metrics"), dict) else \
        {k: v for k, v in report.items() if isinstance(v, (int, float))}
    if metrics_artifact is not None:
        for name, value in sorted(metrics.items()):
            metrics_artifact.log_metric(name, float(value))
    cm = (report.get("zeroshot") or {}).get("confusion_matrix")
    if classification_artifact is not None and cm:
        classification_artifact.log_confusion_matrix(list(cm["categories"]),
                                                     [[int(v) for v in row] for row in cm["matrix"]])


def _save_figure(fig, output_uri: str, name: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    storage.write_bytes(storage.join(output_uri, "plots", name), buf.getvalue())
    mltrack.log_figure(fig, f"plots/{name}")


def _figures(report: dict, examples: dict | None, output_uri: str) -> None:
    zs = report.get("zeroshot")
    if zs:
        cm = zs["confusion_matrix"]
        _save_figure(eval_plots.confusion_matrix_figure(cm["matrix"], cm["categories"],
                                                        f"zero-shot confusion matrix (top-1 {zs['top1']:.3f})"),
                     output_uri, "confusion_matrix.png")
        acc = [a if a is not None else 0.0 for a in zs["per_class_accuracy"]]
        _save_figure(eval_plots.per_class_accuracy_figure(acc, zs["classnames"], zs["chance"]),
                     output_uri, "per_class_accuracy.png")
    lp = report.get("linear_probe")
    if lp and lp.get("settings"):
        _save_figure(eval_plots.linear_probe_figure(lp["settings"], zs["top1"] if zs else None,
                                                    lp["chance"]), output_uri, "linear_probe.png")
    if examples and examples["captions"]:
        _save_figure(eval_plots.retrieval_examples_figure(examples["captions"], examples["ranked"],
                                                          examples["thumbnails"], examples["targets"]),
                     output_uri, "retrieval_examples.png")


def evaluate(model_uri: str, manifest_uri: str | None, eval_data_uri: str | None, output_uri: str,
             cfg: EvalConfig, tracking: TrackingConfig | None = None) -> dict[str, Any]:
    """Run the evaluations that have inputs (zero-shot + probe need a labelled set, retrieval a manifest);
    write ``<output_uri>/report.json`` and log an MLflow run. Returns the report: ``report["metrics"]`` is
    the flat metrics dict; "zeroshot" (per-class accuracy, confusion matrix with class names), "retrieval",
    "linear_probe", "report_uri", "mlflow_run_id" hold the rest."""
    tcfg = tracking or TrackingConfig()
    manifest_uri, eval_data_uri = manifest_uri or None, eval_data_uri or None
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()
    manifest = wds.load_manifest(manifest_uri) if manifest_uri else None
    model = load_eval_model(model_uri, cfg.device)
    tokenizer = wds.load_tokenizer(_tokenizer_uri(cfg, manifest, model_uri))
    dataset_names, default_templates = dataset_defaults(cfg.dataset)
    templates = resolve_templates(cfg.templates or default_templates)
    report: dict[str, Any] = {"model_uri": model_uri, "manifest_uri": manifest_uri, "eval_data_uri": eval_data_uri,
                              "dataset": cfg.dataset, "templates": cfg.templates or default_templates,
                              "config": dataclasses.asdict(cfg),
                              "dataset_content_hash": (manifest or {}).get("content_hash", ""),
                              "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    examples = None
    with tempfile.TemporaryDirectory(prefix="eval-") as tmp, \
            mltrack.stage_run("evaluate", tcfg, params=cfg,
                               tags={"dataset_content_hash": report["dataset_content_hash"],
                                     "model_uri": model_uri}) as run:
        data_uri = eval_data_uri
        if data_uri is None and cfg.dataset == "synthetic":
            from components.synthetic import generate_eval_split

            data_uri = os.path.join(tmp, "synthetic-eval")
            generate_eval_split(data_uri, per_class=cfg.synthetic_per_class, seed=cfg.seed)
            report["eval_data_uri"] = f"generated: synthetic, {cfg.synthetic_per_class} per class, seed {cfg.seed}"
        if data_uri is not None:
            data = load_labelled_set(data_uri, classnames=dataset_names, classnames_uri=cfg.classnames_uri,
                                     limit=cfg.max_images)
            feats, labels = image_features(model, data, cfg)
            report["zeroshot"] = zero_shot(model, tokenizer, feats, labels, data.classnames, templates, cfg.device)
            if cfg.linear_probe:
                probe = linear_probe(feats.numpy(), labels, ProbeConfig(
                    shots=cfg.probe_shots, test_fraction=cfg.probe_test_fraction, c_grid=cfg.probe_c_grid,
                    seed=cfg.seed))
                report["linear_probe"] = {**probe, "chance": 1.0 / len(data.classnames)}
        if manifest is not None:
            report["retrieval"], examples = retrieval(model, tokenizer, manifest, cfg)
        if "zeroshot" not in report and "retrieval" not in report:
            raise ValueError("evaluate: nothing to evaluate: give a manifest (retrieval) and/or a labelled set "
                             "(eval_data_uri, or dataset='synthetic')")
        report["metrics"] = flat_metrics(report)
        report["mlflow_run_id"] = run.info.run_id
        report["seconds"] = round(time.perf_counter() - start, 2)
        report["report_uri"] = storage.join(output_uri, "report.json")
        import mlflow

        mlflow.log_metrics(report["metrics"])
        _figures(report, examples, output_uri)
        storage.write_json(storage.join(output_uri, "report.json"), report)
        mltrack.log_json(report, "report.json")
    print("[evaluate] " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(report["metrics"].items())), flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate a CLIP checkpoint (zero-shot, retrieval, linear probe).")
    p.add_argument("--model", required=True, help="model.pt URI (or the train output folder)")
    p.add_argument("--manifest", default=None, help="dataset manifest URI (retrieval on its validation split)")
    p.add_argument("--eval-data", default=None, help="labelled set: ImageFolder dir or labelled tars")
    p.add_argument("--output", required=True)
    p.add_argument("--config", default="{}", help="EvalConfig as a JSON string or file")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--experiment", default="clip")
    args = p.parse_args(argv)
    raw = open(args.config).read() if os.path.isfile(args.config) else args.config
    cfg = EvalConfig.from_dict(json.loads(raw))
    evaluate(args.model, args.manifest, args.eval_data, args.output, cfg,
             TrackingConfig(tracking_uri=args.tracking_uri, experiment=args.experiment))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
