"""The dataset the shard stage writes, as every later stage reads it: manifest, tokenizer, samples.

A dataset is a folder (local or s3://) with ``train-*.tar`` / ``validation-*.tar`` webdataset shards,
``tokenizer.json`` and ``manifest.json`` (format in docs/interfaces.md). Shards stream straight from
S3 through boto3 (`components.common.tar_reader` over `storage.open_read`; no AWS CLI, no ``pipe:``);
local paths are opened as files. The training loader is `components.train.loader`.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

from PIL import Image

from clip_model.image_ops import draft_shorter_side, to_rgb
from components.common import storage

FORMAT = "clip-wds/1"


# --------------------------------------------------------------------------- manifest

def load_manifest(uri: str) -> dict:
    """Read and check a ``manifest.json`` (a URI of the file or of the folder holding it)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, "manifest.json")
    m = storage.read_json(uri)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{uri}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    for split, info in m.get("splits", {}).items():
        for i, s in enumerate(info.get("shards", [])):
            missing = [k for k in ("uri", "samples", "sha256") if k not in s]
            if missing:
                raise ValueError(f"{uri}: split {split!r} shard #{i} lacks {missing}")
    return m


def shard_uris(manifest_or_uris: dict | str | Sequence[str], split: str) -> list[str]:
    """The shard URIs of ``split``: from a manifest dict, a manifest URI, or a list of URIs as is."""
    if isinstance(manifest_or_uris, str):
        manifest_or_uris = load_manifest(manifest_or_uris)
    if isinstance(manifest_or_uris, dict):
        splits = manifest_or_uris.get("splits", {})
        if split not in splits:
            raise ValueError(f"manifest has no split {split!r} (has {sorted(splits)})")
        return [s["uri"] for s in splits[split]["shards"]]
    return list(manifest_or_uris)


def split_samples(manifest_or_uris: dict | str | Sequence[str], split: str) -> int | None:
    """Number of samples in ``split`` when known from a manifest, else None."""
    if isinstance(manifest_or_uris, str):
        manifest_or_uris = load_manifest(manifest_or_uris)
    if isinstance(manifest_or_uris, dict):
        return int(manifest_or_uris["splits"][split]["samples"])
    return None


IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # image files by name


def decode_image(data: bytes, key: str, min_side: int | None = None) -> Image.Image:
    """Encoded bytes -> RGB PIL image. With ``min_side``, a JPEG much larger than needed is decoded at
    1/2, 1/4 or 1/8 scale (DCT-domain draft mode) keeping its shorter side >= ``min_side``."""
    try:
        img = Image.open(io.BytesIO(data))
        if min_side is not None:
            draft_shorter_side(img, min_side)
        img.load()
    except Exception as e:
        raise ValueError(f"sample {key!r}: cannot decode image ({type(e).__name__}: {e})") from e
    return to_rgb(img)


def load_tokenizer(uri: str, model_vocab_size: int | None = None, model: str = "the model"):
    """A ClipTokenizer from a ``tokenizer.json`` at a local path or s3:// URI. With `model_vocab_size`,
    a tokenizer whose ids do not fit the model's text embedding is refused here, before any work."""
    from clip_model.tokenizer import ClipTokenizer

    tokenizer = ClipTokenizer.from_str(storage.read_text(uri), source=uri)
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"tokenizer {uri} has {tokenizer.vocab_size} ids but {model} has text.vocab_size="
                         f"{model_vocab_size}: use a model config with a larger vocabulary, or shard with a "
                         "smaller vocab_size")
    return tokenizer


def tokenizer_source(spec: str) -> str:
    """Where a tokenizer setting points: a preset name (``"openai"``) or the URI of a ``tokenizer.json``.
    A ``.json`` URI is taken as is; any other URI names a checkpoint (one of our ``model.pt`` or an OpenAI /
    OpenCLIP state dict), whose tokenizer is the ``tokenizer.json`` beside it, else OpenAI's (the one
    OpenAI's and OpenCLIP's weights were trained with)."""
    from clip_model.tokenizer import PRESETS

    if spec in PRESETS or spec.endswith(".json"):
        return spec
    if not storage.exists(spec):
        raise FileNotFoundError(f"tokenizer {spec!r}: neither a preset ({', '.join(PRESETS)}), "
                                "a tokenizer.json nor an existing checkpoint file")
    beside = storage.join(spec.rsplit("/", 1)[0] if "/" in spec else ".", "tokenizer.json")
    return beside if storage.exists(beside) else "openai"


def read_tokenizer_json(spec: str) -> str:
    """The ``tokenizer.json`` text a tokenizer setting names (see `tokenizer_source`), checked to load."""
    from clip_model.tokenizer import PRESETS, ClipTokenizer

    source = tokenizer_source(spec)
    text = ClipTokenizer.from_preset(source).to_str() if source in PRESETS else storage.read_text(source)
    ClipTokenizer.from_str(text, source=source)
    return text


# --------------------------------------------------------------------------- plain iteration

def iter_samples(manifest_or_uris: dict | str | Sequence[str], split: str
                 ) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """Every sample of ``split`` in shard order: ``(key, PIL RGB image, caption, metadata)``."""
    from components.common.tar_reader import shard_samples

    for url in shard_uris(manifest_or_uris, split):
        for sample in shard_samples(url):
            key = sample["__key__"]
            meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
            yield key, decode_image(sample["jpg"], key), sample["txt"].decode("utf-8"), meta
