"""Zero-shot classification and retrieval metrics.

- `zeroshot_classifier`: one weight vector per class = the renormalised mean of the normalised text
  embeddings of every prompt template filled with the class name (the CLIP paper's prompt ensembling).
  ``logits = 100 * normalize(image_features) @ weights``.
- `accuracy`: top-k accuracy as fractions in [0, 1].
- `retrieval_metrics`: image<->text recall@K and ranks for paired features (row i of both is a pair).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from clip_model.templates import Template, fill_template



class _TextEncoder(Protocol):
    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def zeroshot_classifier(
    model: _TextEncoder,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: str | torch.device = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Tensor[D, C] of L2-normalised class weights (column c for ``classnames[c]``).

    Prompts of all classes are encoded in batches of `batch_size`; each prompt embedding is
    normalised, the C x T embeddings averaged over templates and renormalised.
    """
    if not classnames:
        raise ValueError("zeroshot_classifier: no class names")
    if not templates:
        raise ValueError("zeroshot_classifier: no prompt templates")
    texts = [fill_template(t, c) for c in classnames for t in templates]
    was_training = bool(getattr(model, "training", False))
    if hasattr(model, "eval"):
        model.eval()  # type: ignore[attr-defined]
    try:
        chunks = []
        for start in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[start:start + batch_size]).to(device)
            chunks.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        embeddings = torch.cat(chunks).view(len(classnames), len(templates), -1)
    finally:
        if was_training:
            model.train()  # type: ignore[attr-defined]
    weights = F.normalize(embeddings.mean(dim=1), dim=-1)  # [C, D]
    return weights.T.contiguous()


def zeroshot_logits(image_features: torch.Tensor, classifier: torch.Tensor, scale: float = 100.0) -> torch.Tensor:
    """[N, C] logits of (unnormalised) image features against a `zeroshot_classifier` output."""
    return scale * F.normalize(image_features.float(), dim=-1) @ classifier.to(image_features.device)


def accuracy(logits: torch.Tensor, targets: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Top-k accuracies (fractions in [0, 1]), one per k. With fewer than k classes, top-k is top-C
    (every prediction counts, so it is 1.0)."""
    if logits.dim() != 2 or targets.dim() != 1 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"accuracy: logits {tuple(logits.shape)} must be [N, C] and targets "
                         f"{tuple(targets.shape)} must be [N]")
    n, num_classes = logits.shape
    if n == 0:
        raise ValueError("accuracy: no samples")
    max_k = min(max(topk), num_classes)
    top = logits.topk(max_k, dim=1).indices  # [N, max_k]
    hits = top.eq(targets.view(-1, 1).to(top.device))
    return [hits[:, :min(k, num_classes)].any(dim=1).float().mean().item() for k in topk]


def _ranks(queries: torch.Tensor, keys: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """1-based rank of keys[i] among all keys for query i (ties counted in the query's favour)."""
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        scores = queries[start:start + chunk] @ keys.T  # [c, N]
        rows = torch.arange(start, start + scores.shape[0], device=scores.device)
        correct = scores[torch.arange(scores.shape[0], device=scores.device), rows].unsqueeze(1)
        ranks.append((scores > correct).sum(dim=1) + 1)
    return torch.cat(ranks)


def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, Any]:
    """Recall@1/5/10, mean and median rank (1-based) for image->text and text->image retrieval.

    Row i of `image_features` and row i of `text_features` are a pair; features are L2-normalised
    here (cosine similarity). Recalls are fractions in [0, 1]; the median of an even count is the
    mean of the two middle ranks.
    """
    if image_features.dim() != 2 or image_features.shape != text_features.shape:
        raise ValueError(f"retrieval_metrics: image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must both be [N, D] with the same N (paired)")
    if image_features.shape[0] == 0:
        raise ValueError("retrieval_metrics: no pairs")
    images = F.normalize(image_features.float(), dim=-1)
    texts = F.normalize(text_features.float().to(images.device), dim=-1)
    metrics: dict[str, Any] = {}
    for name, ranks in (("image_to_text", _ranks(images, texts)), ("text_to_image", _ranks(texts, images))):
        ranks = ranks.double()
        for k in (1, 5, 10):
            metrics[f"{name}_R@{k}"] = (ranks <= k).double().mean().item()
        metrics[f"{name}_mean_rank"] = ranks.mean().item()
        metrics[f"{name}_median_rank"] = torch.quantile(ranks, 0.5).item()
    return metrics
