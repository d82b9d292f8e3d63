"""Features of an evaluation set, computed once for every task on it.

`encode_set(model, data, batch_size, device)` reads the set once and runs the image encoder once per batch
of images; zero-shot, the linear probe and retrieval all read the same `Encoded` features. `encode_texts`
encodes captions (retrieval) in batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_model.transforms import image_transform
from components.common.progress import Progress
from components.evaluate.evalset import EvalSet

THUMB = 64  # side of the thumbnails kept for the retrieval-examples figure


@dataclass
class Encoded:
    """L2-normalised image features [N, D] (CPU, float32) with what each image came with."""

    features: torch.Tensor
    labels: np.ndarray | None  # [N] class indices (labelled sets)
    captions: list[list[str]] | None  # per image (caption sets)
    thumbnails: list[Image.Image] | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])


@torch.no_grad()
def _encode_batch(model, images: list[Image.Image], transform, device: str) -> torch.Tensor:
    batch = torch.stack([transform(im) for im in images]).to(device)
    return F.normalize(model.encode_image(batch).float(), dim=-1).cpu()


def encode_set(model, data: EvalSet, batch_size: int, device: str = "cpu", label: str = "evaluate",
               thumbnails: bool = False) -> Encoded:
    """Encode every image of `data` once (batches of `batch_size`), keeping labels and captions beside."""
    transform = image_transform(model.visual.image_size, train=False)
    progress = Progress(len(data) if data.size_known else None, "images", label=label)
    feats: list[torch.Tensor] = []
    batch: list[Image.Image] = []
    labels: list[int] = []
    captions: list[list[str]] = []
    thumbs: list[Image.Image] = []
    for sample in data:
        batch.append(sample.image)
        if sample.label is not None:
            labels.append(sample.label)
        if sample.captions is not None:
            captions.append(sample.captions)
        if thumbnails:
            thumb = sample.image.copy()
            thumb.thumbnail((THUMB, THUMB))
            thumbs.append(thumb)
        if len(batch) == batch_size:
            feats.append(_encode_batch(model, batch, transform, device))
            progress.update(len(batch))
            batch = []
    if batch:
        feats.append(_encode_batch(model, batch, transform, device))
        progress.update(len(batch))
    if not feats:
        raise ValueError(f"evaluation set {data.root}: no usable images in {data.location}"
                         + (f" ({data.bad_count} records skipped, e.g. {data.bad[0]})" if data.bad else ""))
    progress.close()
    return Encoded(features=torch.cat(feats), labels=np.asarray(labels, dtype=int) if data.has_labels else None,
                   captions=captions if data.has_captions else None, thumbnails=thumbs if thumbnails else None)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int, device: str = "cpu") -> torch.Tensor:
    """L2-normalised text features [len(texts), D] (CPU, float32)."""
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[start:start + batch_size], context_length=model.context_length).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, 0)
