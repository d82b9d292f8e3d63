"""CLIP's contrastive loss: symmetric InfoNCE, with features gathered across workers.

Single process: logits = s * I @ T^T over the batch, loss = mean of the image->text and
text->image cross-entropies with the diagonal as the targets.

Distributed (torch.distributed initialised, world size W > 1, local batch B on every rank):
every rank all-gathers the image and text features of all ranks (W*B rows each).

- ``local_loss=True`` (the default, as in the paper's large-batch setup): each rank scores only its
  own B rows against all W*B columns, targets ``arange(B) + rank * B``. The mean of these per-rank
  losses equals the loss of the global batch, at O(B * W*B) memory per rank instead of O((W*B)^2).
- ``local_loss=False``: every rank computes the full (W*B)x(W*B) matrix.
- ``gather_with_grad=True`` makes the gather differentiable (the backward pass sums every rank's
  gradient for a rank's slice), so that gradients averaged across ranks (what DDP does) equal the
  gradients of the global-batch loss. With ``False`` the gathered copies are constants and only the
  rank's own features (put back in place) carry gradient: cheaper, but an approximation.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward hands every rank the summed gradient of its own slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        world_size = dist.get_world_size()
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty((ctx.rows, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        # gloo has no reduce-scatter: all-reduce (a copy of) the whole gradient, keep our slice.
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_features(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    gather_with_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D] per rank -> [W*B, D] on every rank, rank r's rows at r*B:(r+1)*B. Every rank must pass
    the same batch size (drop the last partial batch)."""
    if gather_with_grad:
        return _GatherWithGrad.apply(image_features), _GatherWithGrad.apply(text_features)
    world_size, rank = dist.get_world_size(), dist.get_rank()
    gathered = []
    for features in (image_features, text_features):
        parts = [torch.empty_like(features) for _ in range(world_size)]
        with torch.no_grad():
            dist.all_gather(parts, features.detach().contiguous())
        parts[rank] = features  # keep the gradient of our own rows
        gathered.append(torch.cat(parts, dim=0))
    return gathered[0], gathered[1]


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ClipLoss(nn.Module):
    """``loss = ClipLoss()(image_features, text_features, logit_scale_exp)``.

    Features are expected L2-normalised ([B, D] each, row i of both is a pair); ``logit_scale_exp``
    is the multiplier (``model.logit_scale.exp()``), a scalar tensor.
    """

    def __init__(self, local_loss: bool = True, gather_with_grad: bool = True, cache_labels: bool = True):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self._labels: dict[tuple[torch.device, int, int], torch.Tensor] = {}

    def labels(self, device: torch.device, batch_size: int, offset: int = 0) -> torch.Tensor:
        """Targets ``arange(batch_size) + offset``, cached per (device, batch size, offset)."""
        key = (device, batch_size, offset)
        cached = self._labels.get(key)
        if cached is not None:
            return cached
        labels = torch.arange(batch_size, device=device, dtype=torch.long) + offset
        if self.cache_labels:
            self._labels[key] = labels
        return labels

    def logits(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(logits_per_image, logits_per_text, label offset) for this rank."""
        world_size, rank = _distributed()
        if world_size == 1:
            logits_per_image = logit_scale * image_features @ text_features.T
            return logits_per_image, logits_per_image.T, 0
        all_images, all_texts = gather_features(image_features, text_features, self.gather_with_grad)
        if self.local_loss:
            logits_per_image = logit_scale * image_features @ all_texts.T
            logits_per_text = logit_scale * text_features @ all_images.T
            return logits_per_image, logits_per_text, rank * image_features.shape[0]
        logits_per_image = logit_scale * all_images @ all_texts.T
        return logits_per_image, logits_per_image.T, 0

    def forward(
        self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        if image_features.shape != text_features.shape or image_features.dim() != 2:
            raise ValueError(
                f"ClipLoss: image features {tuple(image_features.shape)} and text features "
                f"{tuple(text_features.shape)} must both be [B, D] with the same B and D"
            )
        logits_per_image, logits_per_text, offset = self.logits(image_features, text_features, logit_scale)
        labels = self.labels(logits_per_image.device, logits_per_image.shape[0], offset)
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
