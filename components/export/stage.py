"""Export stage: the image and text encoders as ONNX, checked against PyTorch, logged and registered.

``export(model_uri, tokenizer_uri, output_uri, cfg, tracking, dataset_content_hash, training_run_id)``
writes the bundle (the layout ``components.export.serving.OnnxClip`` and the filter stage's CLIP-score filter
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

MLflow: one run "export" (nested under the pipeline run) with the parity metrics; each encoder is an
ONNX-flavour logged model (``mlflow.onnx.log_model(name="image_encoder" / "text_encoder")``, with
tokenizer.json and preprocess.json as extra files). The image encoder is registered as
``<registered_model_name>`` (the entry point) and the text encoder as ``<registered_model_name>-text-encoder``;
both versions carry the tags ``training_run_id``, ``dataset_content_hash``, ``export_run_id``, ``bundle_uri``,
``encoder`` and ``sibling_model`` / ``sibling_version`` (the other encoder's registry entry).
`fetch_bundle` rebuilds the bundle directory from the registry.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

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
from components.export.serving import BUNDLE_FILES, IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT, OnnxClip

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
        from components.evaluate.data import IMAGE_EXTS, decode_image

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
    for name in ("image", "image_batch1", "text", "image_pipeline", "text_pipeline"):
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


# --------------------------------------------------------------------------- MLflow

def _log_and_register(bundle: Path, settings: dict, cfg: ExportConfig, tags: dict[str, str]) -> dict:
    import mlflow
    import mlflow.onnx
    import onnx
    import onnxruntime
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    s, d = settings["image_size"], settings["embed_dim"]
    specs = {
        "image_encoder": (TensorSpec(np.dtype(np.float32), (-1, 3, s, s), IMAGE_INPUT),
                          TensorSpec(np.dtype(np.float32), (-1, d), IMAGE_OUTPUT)),
        "text_encoder": (TensorSpec(np.dtype(np.int64), (-1, settings["context_length"]), TEXT_INPUT),
                         TensorSpec(np.dtype(np.float32), (-1, d), TEXT_OUTPUT)),
    }
    requirements = [f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}", "numpy"]
    extra = [str(bundle / "tokenizer.json"), str(bundle / "preprocess.json")]
    out: dict[str, Any] = {}
    for name, (inp, outp) in specs.items():
        registered = registered_names(cfg.registered_model_name)[name] if cfg.register else None
        info = mlflow.onnx.log_model(onnx.load(str(bundle / f"{name}.onnx")), name=name,
                                     registered_model_name=registered, save_as_external_data=False,
                                     signature=ModelSignature(inputs=Schema([inp]), outputs=Schema([outp])),
                                     pip_requirements=requirements, extra_files=extra)
        out[name] = {"model_uri": info.model_uri, "registered_model_name": registered,
                     "version": str(info.registered_model_version) if registered else None}
    if cfg.register:
        client = mlflow.MlflowClient()
        names = list(out)
        for name in names:
            sibling = out[names[1 - names.index(name)]]
            version_tags = {**tags, "sibling_model": sibling["registered_model_name"],
                            "sibling_version": sibling["version"], "encoder": name}
            for key, value in version_tags.items():
                client.set_model_version_tag(out[name]["registered_model_name"], out[name]["version"], key,
                                             str(value))
    return out


def registered_names(base: str) -> dict[str, str]:
    """The registry names of the two encoders: the image encoder is the entry point under the base name."""
    return {"image_encoder": base, "text_encoder": f"{base}-text-encoder"}


def fetch_bundle(registered_model_name: str, version: str | int, dst: str | os.PathLike) -> Path:
    """Rebuild a bundle directory from the registry: ``<name>`` version `version` (the image encoder) and the
    text encoder version recorded in its ``sibling_model`` / ``sibling_version`` tags."""
    import mlflow

    client = mlflow.MlflowClient()
    image_name = registered_names(registered_model_name)["image_encoder"]
    mv = client.get_model_version(image_name, str(version))
    text_name, text_version = mv.tags["sibling_model"], mv.tags["sibling_version"]
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, ver, target in ((image_name, version, "image_encoder.onnx"), (text_name, text_version,
                                                                                "text_encoder.onnx")):
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{ver}", dst_path=os.path.join(tmp, target)))
            shutil.copyfile(local / "model.onnx", dst / target)
            for extra in ("tokenizer.json", "preprocess.json"):
                shutil.copyfile(local / "extra_files" / extra, dst / extra)
    return dst


# --------------------------------------------------------------------------- the stage

def export(model_uri: str, tokenizer_uri: str, output_uri: str, cfg: ExportConfig,
           tracking: TrackingConfig | None = None, dataset_content_hash: str = "",
           training_run_id: str = "") -> dict:
    """Export, check, write the bundle to `output_uri`, log and register. Returns {"bundle_uri", "parity",
    "models": {encoder: {model_uri, registered_model_name, version}}, "run_id", "bytes",
    "registered_model_name" (the base name), "registered_model_version" (the image encoder's version; with
    the base name it is what `fetch_bundle` takes)}."""
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

        mlflow.log_metrics({f"parity_{k}_{m}": v for k in ("image", "image_batch1", "text", "image_pipeline",
                                                             "text_pipeline") for m, v in parity[k].items()})
        mltrack.log_json(parity, "parity.json")
        mltrack.log_json(settings, "preprocess.json")
        if storage.is_s3(output_uri):
            storage.upload_dir(str(bundle), output_uri)
        else:
            os.makedirs(output_uri, exist_ok=True)
            for f in (*BUNDLE_FILES, "parity.json"):
                shutil.copyfile(bundle / f, os.path.join(output_uri, f))
        models = _log_and_register(bundle, settings, cfg,
                                   {**tags, "export_run_id": run.info.run_id, "bundle_uri": output_uri})
        sizes = {f: (bundle / f).stat().st_size for f in BUNDLE_FILES}
        mlflow.log_metric("export_seconds", time.perf_counter() - start)
    image = models["image_encoder"]
    result = {"bundle_uri": output_uri, "parity": parity, "models": models, "run_id": run.info.run_id,
              "bytes": sizes,
              # fetch_bundle(registered_model_name, registered_model_version) rebuilds this bundle
              "registered_model_name": cfg.registered_model_name if cfg.register else None,
              "registered_model_version": image["version"]}
    print(f"[export] bundle {output_uri}: image max|d|={parity['image']['max_abs']:.2e} "
          f"text max|d|={parity['text']['max_abs']:.2e}; registered "
          + ", ".join(f"{m['registered_model_name']} v{m['version']}" for m in models.values() if m["version"]),
          flush=True)
    return result
