"""Zero-shot CLIP inference from an exported ONNX bundle, with onnxruntime + numpy + PIL + tokenizers + ftfy.

No torch, boto3, scipy, ray or mlflow: this module (and everything it imports) must load without them,
so the bundle can be served from a slim image (a test runs the CLI where importing them fails). Only an
``s3://`` bundle brings in the project's storage layer (boto3), to download it first. The
bundle is the directory ``components.export.stage.export`` writes::

    image_encoder.onnx   pixel_values float32 [B, 3, S, S] -> image_embeds float32 [B, D] (L2-normalised)
    text_encoder.onnx    input_ids int64 [B, context_length] -> text_embeds float32 [B, D] (L2-normalised)
    tokenizer.json       the Hugging Face tokenizer (clip_model.tokenizer conventions)
    preprocess.json      image_size, mean, std, resize_mode, interpolation, context_length,
                         sot/eot token ids, logit_scale

Python::

    clip = OnnxClip("bundle/")
    idx, probs = clip.classify([Image.open("x.jpg")], ["red circle", "blue square"], ["a photo of a {}."])

CLI (``clipflow zeroshot``)::

    clipflow zeroshot --bundle bundle/ --classes "red circle,blue square" --templates synthetic x.jpg y.png
    clipflow zeroshot --bundle s3://bucket/runs/RUN/export --classes "red circle,blue square" x.jpg
    MLFLOW_TRACKING_URI=... clipflow zeroshot --model models:/clip@champion --classes "red circle,blue square" x.jpg
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from clip_model.image_ops import center_crop, resize_shorter_side, to_rgb
from clip_model.templates import fill_template
from clip_model.tokenizer import ClipTokenizer
from components.inference.prompts import resolve_templates

BUNDLE_FILES = ("image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "preprocess.json")
IMAGE_INPUT, TEXT_INPUT = "pixel_values", "input_ids"
IMAGE_OUTPUT, TEXT_OUTPUT = "image_embeds", "text_embeds"


# --------------------------------------------------------------------------- preprocessing (numpy)

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}


def preprocess_image(image: Image.Image, cfg: dict) -> np.ndarray:
    """PIL image -> float32 [3, S, S]: RGB, resize the shorter side to S, centre crop, /255, normalise.
    `cfg` is the bundle's preprocess.json (only resize_mode "shortest" is written by export). The
    geometry is clip_model.image_ops', the same as training's eval transform."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    size = int(cfg["image_size"])
    mode = cfg.get("resize_mode", "shortest")
    if mode != "shortest":
        raise ValueError(f"preprocess.json: resize_mode={mode!r} is not supported (only 'shortest')")
    resample = _RESAMPLE[cfg.get("interpolation", "bicubic")]
    image = center_crop(resize_shorter_side(to_rgb(image), size, resample), size)
    x = np.asarray(image, dtype=np.float32) / 255.0  # [S, S, 3]
    mean = np.asarray(cfg["mean"], dtype=np.float32)
    std = np.asarray(cfg["std"], dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1).astype(np.float32, copy=False)


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# --------------------------------------------------------------------------- the bundle

def check_bundle(bundle_dir: str | os.PathLike) -> Path:
    bundle = Path(bundle_dir)
    missing = [f for f in BUNDLE_FILES if not (bundle / f).is_file()]
    if missing:
        raise FileNotFoundError(f"ONNX bundle {bundle}: missing {missing} (a bundle has {list(BUNDLE_FILES)}; "
                                "write one with the export stage: clipflow export)")
    return bundle


class OnnxClip:
    """The exported image and text encoders, the tokenizer and the preprocessing of one bundle."""

    def __init__(self, bundle_dir: str | os.PathLike, providers: Sequence[str] = ("CPUExecutionProvider",),
                 intra_op_threads: int = 0):
        self.bundle = check_bundle(bundle_dir)
        self.preprocess_cfg: dict = json.loads((self.bundle / "preprocess.json").read_text())
        opts = ort.SessionOptions()
        if intra_op_threads:
            opts.intra_op_num_threads = intra_op_threads
        self.image_session = ort.InferenceSession(str(self.bundle / "image_encoder.onnx"), opts,
                                                  providers=list(providers))
        self.text_session = ort.InferenceSession(str(self.bundle / "text_encoder.onnx"), opts,
                                                 providers=list(providers))
        self.tokenizer = ClipTokenizer.from_file(self.bundle / "tokenizer.json")
        self.context_length = int(self.preprocess_cfg["context_length"])
        self.logit_scale = float(self.preprocess_cfg.get("logit_scale", 100.0))

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        return np.stack([preprocess_image(im, self.preprocess_cfg) for im in images]) if images else \
            np.zeros((0, 3, self.preprocess_cfg["image_size"], self.preprocess_cfg["image_size"]), np.float32)

    def encode_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        out = [self.image_session.run([IMAGE_OUTPUT], {IMAGE_INPUT: pixels[i:i + batch_size]})[0]
               for i in range(0, len(pixels), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def encode_images(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        """L2-normalised image embeddings [N, D] (float32)."""
        out = [self.encode_pixels(self.preprocess(images[i:i + batch_size]), batch_size)
               for i in range(0, len(images), batch_size)]
        return _l2(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        return self.tokenizer.encode_np(list(texts), context_length=self.context_length)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised text embeddings [N, D] (float32)."""
        out = [self.text_session.run([TEXT_OUTPUT], {TEXT_INPUT: self.tokenize(texts[i:i + batch_size])})[0]
               for i in range(0, len(texts), batch_size)]
        return _l2(np.concatenate(out)) if out else np.zeros((0, 0), np.float32)

    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        """[C, D]: per class, the mean of its normalised prompt embeddings, normalised again (the CLIP
        paper's prompt ensemble)."""
        if not classnames or not templates:
            raise ValueError("zero-shot classification needs at least one class name and one template")
        rows = []
        for name in classnames:
            emb = self.encode_texts([fill_template(t, name) for t in templates])
            rows.append(_l2(emb.mean(axis=0)))
        return np.stack(rows).astype(np.float32)

    def classify(self, images: Sequence[Image.Image], classnames: Sequence[str],
                 templates: Sequence[str] = ("a photo of a {}.",)) -> tuple[np.ndarray, np.ndarray]:
        """-> (predicted class indices [N], class probabilities [N, C] = softmax(logit_scale * cosine))."""
        weights = self.class_embeddings(classnames, templates)
        logits = self.logit_scale * self.encode_images(images) @ weights.T
        probs = _softmax(logits)
        return probs.argmax(axis=1), probs


def fetch_remote_bundle(bundle: str, tmp: str) -> str:
    """A local directory for `bundle`: the path itself, or an s3:// bundle's files downloaded into `tmp`
    (through the project's storage layer: boto3 is imported only here, only for an s3:// bundle)."""
    if not bundle.startswith("s3://"):
        return bundle
    from components.common import storage

    for name in BUNDLE_FILES:
        try:
            storage.download_file(storage.join(bundle, name), os.path.join(tmp, name))
        except storage.StorageNotFound as e:
            raise FileNotFoundError(f"ONNX bundle {bundle}: missing {name} ({e})") from e
    return tmp


def fetch_model_bundle(model_uri: str, dst: str | os.PathLike) -> Path:
    """Rebuild a bundle directory from a logged or registered CLIP pyfunc: `models:/NAME/VERSION`,
    `models:/NAME@ALIAS` (e.g. @champion), `runs:/RUN/clip` (the store: MLFLOW_TRACKING_URI)."""
    import mlflow  # only for a registered model: the bundle CLI stays mlflow-free
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per file of the model's code
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))
        except MlflowException as exc:
            raise FileNotFoundError(f"model {model_uri} at MLflow {mlflow.get_tracking_uri()}: {exc.message}") from exc
        if not (local / "artifacts").is_dir() or not list((local / "artifacts").rglob(BUNDLE_FILES[0])):
            raise FileNotFoundError(f"model {model_uri}: not an exported CLIP (no {BUNDLE_FILES[0]} in its artifacts)")
        (image_encoder,) = (local / "artifacts").rglob(BUNDLE_FILES[0])
        for name in BUNDLE_FILES:
            shutil.copyfile(image_encoder.parent / name, dst / name)
    return dst


# --------------------------------------------------------------------------- CLI

def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="clipflow zeroshot", description="Zero-shot classify images with an ONNX CLIP bundle "
                                "(onnxruntime only, no torch).")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--bundle", help="bundle written by the export stage: a directory, or an s3:// prefix "
                       "(downloaded first; endpoint and credentials from AWS_ENDPOINT_URL and the AWS_* variables)")
    where.add_argument("--model", help="a registered CLIP: models:/NAME@champion, models:/NAME/VERSION (the MLflow "
                       "store in MLFLOW_TRACKING_URI; needs mlflow, not torch)")
    p.add_argument("--classes", required=True,
                   help="comma-separated class names, or @FILE with one class name per line")
    p.add_argument("--templates", default="simple",
                   help="template set (imagenet, cifar, synthetic, simple) or a file with one '{}' template per line")
    p.add_argument("--top-k", type=int, default=3, help="how many classes to print per image")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text lines")
    p.add_argument("images", nargs="+", help="image files")
    return p.parse_args(argv)


def _classes(spec: str) -> list[str]:
    if spec.startswith("@"):
        names = [ln.strip() for ln in Path(spec[1:]).read_text().splitlines()]
    else:
        names = [c.strip() for c in spec.split(",")]
    names = [n for n in names if n]
    if not names:
        raise SystemExit(f"--classes {spec!r}: no class names")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    classnames = _classes(args.classes)
    templates = resolve_templates(args.templates)
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except (OSError, Image.DecompressionBombError) as exc:
            raise SystemExit(f"image {path}: cannot be read ({exc})") from exc
    with tempfile.TemporaryDirectory(prefix="clip-bundle-") as tmp:
        if args.model:
            clip = OnnxClip(fetch_model_bundle(args.model, tmp))
        else:
            clip = OnnxClip(fetch_remote_bundle(args.bundle, tmp))
    indices, probs = clip.classify(images, classnames, templates)
    k = max(1, min(args.top_k, len(classnames)))
    results = []
    for path, idx, p in zip(args.images, indices, probs):
        order = np.argsort(-p)[:k]
        results.append({"image": path, "prediction": classnames[int(idx)], "index": int(idx),
                        "top": [{"class": classnames[int(j)], "prob": round(float(p[j]), 6)} for j in order]})
    if args.json:
        print(json.dumps({"classes": classnames, "templates": len(templates), "results": results}, indent=2))
    else:
        for r in results:
            tops = ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"])
            print(f"{r['image']}\t{r['prediction']}\t({tops})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
