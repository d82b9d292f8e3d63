"""Export stage: the image and text encoders as ONNX, checked against PyTorch, logged and registered.

``export(model_uri, tokenizer_uri, output_uri, cfg, tracking, dataset_content_hash, training_run_id)``
writes the bundle (the layout ``components.inference.onnx_clip.OnnxClip`` and the filter stage's CLIP-score filter
read) to ``output_uri``::

    image_encoder.onnx   pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, D], L2-normalised
    text_encoder.onnx    input_ids int64 [B, context_length] -> text_embeds float32 [B, D], L2-normalised
    tokenizer.json       the tokenizer the model was trained with
    preprocess.json      image_size, mean, std, resize_mode, interpolation, context_length, sot/eot ids,
                         logit_scale (exp), embed_dim, input/output names, opset
    parity.json          the PyTorch-vs-onnxruntime check

Exporter: ``torch.onnx.export(..., dynamo=False)`` (the TorchScript exporter). torch 2.13 defaults to the
dynamo exporter, which on this model writes an opset-18 ``Split(num_outputs)`` into a graph stamped with
the requested opset 17 (onnxruntime rejects it) and splits weights into external data; the TorchScript
exporter gives one self-contained file per encoder with a dynamic batch axis.

Parity: both encoders run in PyTorch and in onnxruntime on real inputs (preprocessed images, tokenized
captions) at batch 1 and batch N (the batch axis is dynamic); the stage raises `ParityError` with the
numbers when the max abs difference exceeds ``cfg.parity_max_abs`` or a cosine falls below
``cfg.parity_min_cosine``.

MLflow: one run "export" (nested under the pipeline run) with the parity metrics, the raw bundle files under
``onnx/`` and one model ``clip``: an MLflow pyfunc holding both encoders, the tokenizer and the preprocessing
(`components.export.pyfunc`; signature and input example), registered as ``<registered_model_name>``. The
version carries the tags ``training_run_id``, ``dataset_content_hash``, ``export_run_id``, ``bundle_uri`` and
``source_model_uri`` and a description with the headline figures (training, evaluation, parity;
`components.export.registry`). The new version takes the alias ``candidate``, and ``champion`` too when its
``cfg.promotion_metric`` (of the evaluate run beside it) is at least the champion's + ``cfg.promotion_min_delta``
on the same evaluation suite; a first version simply takes it (`registry.promote`: the decision goes into the
description). `fetch_bundle` rebuilds the bundle directory from the registry.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from clip_model.checkpoint import load_model
from clip_model.transforms import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform
from components.common import storage
from components.common import tracking as mltrack
from components.common.dataset import load_tokenizer
from components.common.tracking import TrackingConfig
from components.export.config import ExportConfig
from components.export.registry import describe, headline_figures, log_and_register, promote
from components.inference.onnx_clip import BUNDLE_FILES, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT, OnnxClip

# the comparisons check_parity makes: encoders (batch, batch of 1) and the torch-free pipelines
PARITY_CHECKS = ("image", "image_batch1", "text", "image_pipeline", "text_pipeline")


class ParityError(RuntimeError):
    """The ONNX encoders disagree with PyTorch beyond the configured tolerances."""


class Encoder(nn.Module):
    """One tower of a CLIP (`tower` "image" or "text") returning L2-normalised embeddings: what ONNX exports."""

    def __init__(self, model: nn.Module, tower: str):
        super().__init__()
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', got {tower!r}")
        self.model, self.tower = model, tower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        encode = self.model.encode_image if self.tower == "image" else self.model.encode_text
        return F.normalize(encode(x), dim=-1)


# --------------------------------------------------------------------------- ONNX files

def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, output_name: str,
                opset: int) -> None:
    # The exporter restores the module's train/eval flag recursively afterwards: a fresh wrapper is in
    # training mode and would switch the wrapped model's BatchNorm layers (ResNet towers) to training.
    module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shape checks in encode_*
        torch.onnx.export(module, (example,), str(path), input_names=[input_name], output_names=[output_name],
                          opset_version=opset, dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                          do_constant_folding=True, dynamo=False)
    import onnx

    onnx.checker.check_model(str(path))


def preprocess_settings(model, tokenizer, opset: int) -> dict:
    return {"image_size": int(model.visual.image_size), "mean": list(OPENAI_DATASET_MEAN),
            "std": list(OPENAI_DATASET_STD), "resize_mode": "shortest", "interpolation": "bicubic",
            "context_length": int(model.context_length), "sot_token_id": int(tokenizer.sot_token_id),
            "eot_token_id": int(tokenizer.eot_token_id), "pad_token_id": 0,
            "logit_scale": float(model.logit_scale.detach().exp()), "embed_dim": int(model.config.embed_dim),
            "normalized_outputs": True, "inputs": {"image": IMAGE_INPUT, "text": TEXT_INPUT},
            "outputs": {"image": IMAGE_OUTPUT, "text": TEXT_OUTPUT}, "opset": opset}


# --------------------------------------------------------------------------- parity

def parity_images(cfg: ExportConfig) -> list[Image.Image]:
    """Real images: the first `parity_num_images` from `parity_images_uri`, or synthetic-corpus scenes."""
    n = cfg.parity_num_images
    if cfg.parity_images_uri:
        from components.common.dataset import IMAGE_EXTS, decode_image

        uris = [u for u in storage.list_files(cfg.parity_images_uri) if u.lower().endswith(IMAGE_EXTS)][:n]
        if len(uris) < 2:
            raise ValueError(f"parity_images_uri={cfg.parity_images_uri}: needs >= 2 images, found {len(uris)}")
        return [decode_image(storage.read_bytes(u), u) for u in uris]
    from components.synthetic.scenes import random_scene, render

    rng = np.random.default_rng(1234)
    return [render(random_scene(rng)) for _ in range(n)]


def _compare(ref: np.ndarray, got: np.ndarray) -> dict[str, float]:
    cos = (ref * got).sum(-1) / np.maximum(np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1), 1e-12)
    return {"max_abs": float(np.abs(ref - got).max()), "min_cosine": float(cos.min())}


@torch.no_grad()
def check_parity(model, tokenizer, bundle: Path, cfg: ExportConfig) -> dict:
    """Compare PyTorch and onnxruntime on real inputs; raise ParityError with the numbers on failure."""
    clip = OnnxClip(bundle)
    images = parity_images(cfg)
    transform = image_transform(model.visual.image_size, train=False)
    pixels = torch.stack([transform(im) for im in images])
    tokens = tokenizer(list(cfg.parity_texts), context_length=model.context_length)
    ref_img = Encoder(model, "image")(pixels).numpy()
    ref_txt = Encoder(model, "text")(tokens).numpy()
    result = {
        # batch N and batch 1 through the ONNX encoders on the PyTorch-preprocessed inputs
        "image": _compare(ref_img, clip.encode_pixels(pixels.numpy(), batch_size=len(images))),
        "image_batch1": _compare(ref_img[:1], clip.encode_pixels(pixels[:1].numpy())),
        "text": _compare(ref_txt, clip.text_session.run([TEXT_OUTPUT], {TEXT_INPUT: tokens.numpy()})[0]),
        # the whole torch-free path: numpy preprocessing + numpy tokens + onnxruntime
        "image_pipeline": _compare(ref_img, clip.encode_images(images)),
        "text_pipeline": _compare(ref_txt, clip.encode_texts(list(cfg.parity_texts))),
        "num_images": len(images), "num_texts": len(cfg.parity_texts),
        "thresholds": {"max_abs": cfg.parity_max_abs, "min_cosine": cfg.parity_min_cosine},
    }
    failures = []
    for name in PARITY_CHECKS:
        r = result[name]
        if cfg.parity_max_abs is not None and r["max_abs"] > cfg.parity_max_abs:
            failures.append(f"{name}: max abs diff {r['max_abs']:.3g} > {cfg.parity_max_abs:.3g}")
        if r["min_cosine"] < cfg.parity_min_cosine:
            failures.append(f"{name}: min cosine {r['min_cosine']:.7f} < {cfg.parity_min_cosine}")
    result["passed"] = not failures
    if failures:
        raise ParityError("ONNX export parity check failed: " + "; ".join(failures)
                          + f" (on {len(images)} images, {len(cfg.parity_texts)} texts)")
    return result


# --------------------------------------------------------------------------- the stage

def export(model_uri: str, tokenizer_uri: str, output_uri: str, cfg: ExportConfig,
           tracking: TrackingConfig | None = None, dataset_content_hash: str = "",
           training_run_id: str = "") -> dict:
    """Export, check, write the bundle to `output_uri`, log and register. Returns {"bundle_uri", "parity",
    "model_uri" (the logged pyfunc), "run_id", "bytes", "headline" (the figures in the version's description),
    "registered_model_name", "registered_model_version" (both None when `cfg.register` is off): serve it with
    `mlflow models serve -m models:/<name>/<version>`, or rebuild the bundle with `registry.fetch_bundle`}."""
    tcfg = tracking or TrackingConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()
    model_file = model_uri if model_uri.endswith((".pt", ".pth", ".bin")) else storage.join(model_uri, "model.pt")
    with storage.local_copy(model_file) as path:
        model = load_model(path).float().eval()
    tokenizer = load_tokenizer(tokenizer_uri, model.vocab_size, f"model {model_uri}")
    tags = {"training_run_id": training_run_id, "dataset_content_hash": dataset_content_hash,
            "source_model_uri": model_uri}
    with tempfile.TemporaryDirectory(prefix="clip-export-") as tmp, \
            mltrack.stage_run("export", tcfg, params=cfg, tags=tags) as run:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        s = model.visual.image_size
        export_onnx(Encoder(model, "image"), torch.zeros(2, 3, s, s), bundle / "image_encoder.onnx",
                    IMAGE_INPUT, IMAGE_OUTPUT, cfg.opset)
        example_tokens = tokenizer(["a photo", "two shapes"], context_length=model.context_length)
        export_onnx(Encoder(model, "text"), example_tokens, bundle / "text_encoder.onnx", TEXT_INPUT, TEXT_OUTPUT,
                    cfg.opset)
        (bundle / "tokenizer.json").write_bytes(storage.read_bytes(tokenizer_uri))
        settings = preprocess_settings(model, tokenizer, cfg.opset)
        (bundle / "preprocess.json").write_text(json.dumps(settings, indent=2))
        parity = check_parity(model, tokenizer, bundle, cfg)
        (bundle / "parity.json").write_text(json.dumps(parity, indent=2))
        import mlflow

        mlflow.log_metrics({f"parity_{k}_{m}": v for k in PARITY_CHECKS for m, v in parity[k].items()})
        mltrack.log_json(parity, "parity.json")
        mltrack.log_json(settings, "preprocess.json")
        storage.upload_dir(str(bundle), output_uri)  # BUNDLE_FILES + parity.json, local or s3://
        figures = headline_figures(training_run_id, tcfg.parent_run_id)
        model = log_and_register(bundle, cfg.registered_model_name if cfg.register else None,
                                 {**tags, "export_run_id": run.info.run_id, "bundle_uri": output_uri},
                                 describe(figures, parity, dataset_content_hash, training_run_id))
        promotion = (promote(model["registered_model_name"], model["version"], cfg.promotion_metric,
                             cfg.promotion_min_delta, tcfg.parent_run_id) if model["version"] else None)
        if promotion:
            mlflow.set_tags({"promotion": promotion["alias"], "promotion.reason": promotion["reason"]})
        sizes = {f: (bundle / f).stat().st_size for f in BUNDLE_FILES}
        mlflow.log_metric("export_seconds", time.perf_counter() - start)
    result = {"bundle_uri": output_uri, "parity": parity, "model_uri": model["model_uri"], "run_id": run.info.run_id,
              "bytes": sizes, "headline": figures,
              # models:/<registered_model_name>/<registered_model_version> serves it; fetch_bundle rebuilds the bundle
              "registered_model_name": model["registered_model_name"],
              "registered_model_version": model["version"],
              # {"alias" (champion or candidate), "promoted", "reason", "value", "champion_value", ...}; None unregistered
              "promotion": promotion}
    print(f"[export] bundle {output_uri}: image max|d|={parity['image']['max_abs']:.2e} "
          f"text max|d|={parity['text']['max_abs']:.2e}; "
          + (f"registered models:/{model['registered_model_name']}/{model['version']}, alias "
             f"{promotion['alias']} ({promotion['reason']})" if model["version"] else "not registered"), flush=True)
    return result
