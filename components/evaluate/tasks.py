"""The evaluations run on encoded features: zero-shot classification, retrieval with one or more captions
per image, and where zero-shot accuracy meets the few-shot linear-probe curve (the CLIP paper's Figure 6).
The linear probe itself is `components.evaluate.probe`."""

from __future__ import annotations

import math

import numpy as np
import torch

from clip_model.zeroshot import accuracy, zeroshot_classifier, zeroshot_logits

CONFUSION_MAX_CLASSES = 100  # a larger confusion matrix is left out of the report (it would be huge)


def zero_shot(model, tokenizer, features: torch.Tensor, labels: np.ndarray, classnames: list[str],
              templates: list[str], device: str) -> tuple[dict, np.ndarray]:
    """(the JSON-able result, the predicted class of every image)."""
    classifier = zeroshot_classifier(model, tokenizer, classnames, templates, device=device)
    logits = zeroshot_logits(features.to(device), classifier).cpu()
    top1, top5 = accuracy(logits, torch.as_tensor(labels), topk=(1, 5))
    pred = logits.argmax(dim=1).numpy()
    n = len(classnames)
    matrix = np.zeros((n, n), dtype=int)
    np.add.at(matrix, (labels, pred), 1)
    support = matrix.sum(axis=1)
    per_class = np.where(support > 0, np.diag(matrix) / np.maximum(support, 1), np.nan)
    result = {"top1": top1, "top5": top5, "mean_per_class": float(np.nanmean(per_class[support > 0])),
              "n": int(len(labels)), "num_classes": n, "num_templates": len(templates), "chance": 1.0 / n,
              "classnames": classnames, "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class]}
    if n <= CONFUSION_MAX_CLASSES:
        result["confusion_matrix"] = {"categories": classnames, "matrix": matrix.tolist()}
    return result, pred


def caption_retrieval(image_features: torch.Tensor, text_features: torch.Tensor, text_image: np.ndarray,
                      chunk: int = 1024) -> dict[str, float]:
    """Recall@1/5/10 and mean / median rank (1-based) of image->text and text->image retrieval, where caption
    m belongs to image `text_image[m]` and an image may have several captions. Text->image ranks each
    caption's image among all images; image->text ranks, for each image, its best-placed caption among all
    captions. Ties count in the query's favour. With one caption per image this is
    `clip_model.zeroshot.retrieval_metrics`."""
    owner = torch.as_tensor(np.asarray(text_image, dtype=np.int64))
    n_img, n_txt = image_features.shape[0], text_features.shape[0]
    if n_txt == 0 or n_img == 0 or owner.shape[0] != n_txt:
        raise ValueError(f"retrieval: {n_img} images, {n_txt} captions and {owner.shape[0]} caption owners")
    img, txt = image_features.float(), text_features.float()
    t2i = []
    for start in range(0, n_txt, chunk):
        scores = txt[start:start + chunk] @ img.T  # [c, n_img]
        own = owner[start:start + chunk]
        correct = scores.gather(1, own.unsqueeze(1))
        t2i.append((scores > correct).sum(dim=1) + 1)
    i2t = []
    for start in range(0, n_img, chunk):
        scores = img[start:start + chunk] @ txt.T  # [c, n_txt]
        mine = owner.unsqueeze(0) == torch.arange(start, start + scores.shape[0]).unsqueeze(1)
        best = scores.masked_fill(~mine, -math.inf).max(dim=1, keepdim=True).values
        i2t.append((scores > best).sum(dim=1) + 1)
    metrics: dict[str, float] = {}
    for name, ranks in (("image_to_text", torch.cat(i2t).double()), ("text_to_image", torch.cat(t2i).double())):
        for k in (1, 5, 10):
            metrics[f"{name}_R@{k}"] = (ranks <= k).double().mean().item()
        metrics[f"{name}_mean_rank"] = ranks.mean().item()
        metrics[f"{name}_median_rank"] = torch.quantile(ranks, 0.5).item()
    return metrics


def shots_matching_zero_shot(settings: dict[str, dict], zeroshot_top1: float, num_classes: int) -> dict:
    """Where zero-shot accuracy meets the linear probe's accuracy against shots per class.

    The curve is the k-shot probes and "full" (at its average samples per class); between two points it is
    linear in log2(shots), as the paper plots it. Returns ``{"shots": k or None, "relation": ...}``:
    "matches" (k interpolated), "below" (zero-shot is under the 1st point: k = its shots, an upper bound) or
    "above" (zero-shot beats every probe, full included: k None)."""
    points = sorted((float(s["shots"]) if s.get("shots") else s["n_train"] / num_classes, s["top1"])
                    for s in settings.values())
    if not points:
        return {"shots": None, "relation": "no probe"}
    if zeroshot_top1 <= points[0][1]:
        return {"shots": points[0][0], "relation": "below"}
    for (k0, a0), (k1, a1) in zip(points, points[1:]):
        if a0 < zeroshot_top1 <= a1:
            t = (zeroshot_top1 - a0) / (a1 - a0)
            return {"shots": float(2 ** (math.log2(k0) + t * (math.log2(k1) - math.log2(k0)))), "relation": "matches"}
    return {"shots": None, "relation": "above"}
