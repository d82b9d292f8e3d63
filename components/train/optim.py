"""CLIP's optimisation recipe: AdamW with weight decay on matrices only, linear warmup then cosine,
and the learned temperature clamped to ln(100).

CLIP decays every weight matrix (and conv kernel) but not gains, biases, embeddings (token,
positional, class) or ``logit_scale``. A parameter is "no decay" when it has fewer than 2 dimensions
(gains, biases, the class embedding, ``logit_scale``) or its name marks it as an embedding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from components.train.config import OptimConfig

LOGIT_SCALE_MAX = math.log(100.0)
NO_DECAY_NAME_PARTS = ("embedding", "logit_scale")


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or any(part in name for part in NO_DECAY_NAME_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weight matrices, and everything CLIP does not decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if is_no_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


FUSED_DEVICES = ("cpu", "cuda")  # where torch's fused AdamW runs


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`, fused (every parameter updated in one kernel rather than one per tensor
    or per tensor list) wherever the parameters live on a CPU or a CUDA device."""
    fused = all(p.device.type in FUSED_DEVICES for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.peak_lr, betas=cfg.betas,
                             eps=cfg.eps, fused=fused)


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at `step` (0-based): linear warmup to 1, then cosine down to min_lr_ratio."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.warmup_for(total_steps), total_steps, cfg.min_lr_ratio))


@torch.no_grad()
def clamp_logit_scale(model: nn.Module) -> None:
    """CLIP clips the temperature so logits are scaled by at most 100."""
    model.logit_scale.clamp_(0, LOGIT_SCALE_MAX)
