"""CLIP: an image tower and a text tower projected into one embedding space.

Read top to bottom:
  1. building blocks: QuickGELU, multi-head self-attention, the residual attention block, the
     Transformer stack (with optional gradient checkpointing);
  2. image towers: the Vision Transformer and CLIP's modified ResNet (3-conv stem, anti-aliased
     bottlenecks that downsample by average pooling, attention pooling instead of global pooling);
  3. the text tower (a causal Transformer read out at the end-of-text token) and ``CLIP`` itself.

Parameter names follow OpenAI's CLIP exactly, so OpenAI and OpenCLIP state dicts load with
``strict=True`` (see ``checkpoint.py``). Attention is computed batch-first with
``F.scaled_dot_product_attention``; the layout of tensors does not change the weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import CLIPConfig, VisionConfig, load_config


# --------------------------------------------------------------------------- building blocks

class QuickGELU(nn.Module):
    """The GELU approximation OpenAI trained with: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with the parameter names of ``nn.MultiheadAttention``.

    ``in_proj_weight`` stacks the query, key and value projections ([3 * width, width]).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        # [B, L, C] -> [B, heads, L, C / heads]
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(x.transpose(1, 2).reshape(B, L, C))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm Transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        mlp_width = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width)),
        ]))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)])

    def init_weights(self) -> None:
        """CLIP's init: std width^-0.5 for attention inputs, (2 width)^-0.5 for the MLP input,
        and width^-0.5 * (2 layers)^-0.5 for both output projections into the residual stream."""
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            for bias in (block.attn.in_proj_bias, block.attn.out_proj.bias, block.mlp.c_fc.bias, block.mlp.c_proj.bias):
                nn.init.zeros_(bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x [B, L, width]; ``causal``: token i attends to tokens <= i only."""
        for block in self.resblocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, causal, use_reentrant=False)
            else:
                x = block(x, causal)
        return x


# --------------------------------------------------------------------------- image tower: ViT

class VisionTransformer(nn.Module):
    """Patchify with a strided conv, prepend a class token, Transformer, project the class token."""

    def __init__(self, cfg: VisionConfig, output_dim: int, quick_gelu: bool = False):
        super().__init__()
        width, patch = cfg.width, cfg.patch_size
        self.image_size = cfg.image_size
        self.grid_size = cfg.image_size // patch
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [B, width, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [B, grid * grid, width]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


# --------------------------------------------------------------------------- image tower: ResNet

class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1, 3x3, 1x1 convs, expansion 4). A stride > 1 is done by an average
    pool after the 3x3 conv (anti-aliasing), and the shortcut pools before its 1x1 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            # named "-1", "0", "1" so the weights are downsample.0 / downsample.1, as in OpenAI's files
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride) if stride > 1 else nn.Identity()),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Pool a feature map with one attention query: the mean of the map (plus its position)."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, H * W, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        L, h = x.shape[1], self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, h, C // h).transpose(1, 2)
        k = self.k_proj(x).view(B, L, h, C // h).transpose(1, 2)
        v = self.v_proj(x).view(B, L, h, C // h).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, 1, C / h]
        return self.c_proj(out.reshape(B, C))


class ModifiedResNet(nn.Module):
    """CLIP's ResNet: a 3-conv stem with an average pool, four stages of anti-aliased
    bottlenecks (total stride 32), and an attention pool in place of global average pooling."""

    def __init__(self, cfg: VisionConfig, output_dim: int):
        super().__init__()
        width = cfg.width
        self.image_size = cfg.image_size
        # stem: three 3x3 convs (the first with stride 2), then a 2x2 average pool
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)

        self._inplanes = width
        self.layer1 = self._make_layer(width, cfg.layers[0])
        self.layer2 = self._make_layer(width * 2, cfg.layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, cfg.layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, cfg.layers[3], stride=2)

        embed_dim = width * 32  # the ResNet feature dimension
        self.attnpool = AttentionPool2d(cfg.image_size // 32, embed_dim, cfg.heads, output_dim)
        self.init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        std = self.attnpool.c_proj.in_features ** -0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        # each residual branch starts as zero, so every bottleneck starts as (ReLU of) its shortcut
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.avgpool(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.attnpool(x)


# --------------------------------------------------------------------------- CLIP

class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.config = cfg
        v, t = cfg.vision, cfg.text

        # image tower
        if v.is_resnet:
            self.visual = ModifiedResNet(v, cfg.embed_dim)
        else:
            self.visual = VisionTransformer(v, cfg.embed_dim, cfg.quick_gelu)

        # text tower: token + position embeddings, a causal Transformer, final LayerNorm, projection
        self.context_length = t.context_length
        self.vocab_size = t.vocab_size
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, cfg.embed_dim))
        # The text Transformer is causal. The mask is not stored anywhere (so it is not in the state
        # dict): attention gets is_causal=True, which also lets GPUs use fused flash kernels.

        # learned temperature, starts at 1 / 0.07
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))

        self.init_text_weights()
        self.set_grad_checkpointing(cfg.grad_checkpointing)

    def init_text_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute Transformer blocks in the backward pass (less memory, ~30% more compute).
        Applies to both Transformers in training mode; the ResNet tower (BatchNorm) is never
        checkpointed."""
        self.config.grad_checkpointing = bool(enable)
        self.transformer.grad_checkpointing = bool(enable)
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = bool(enable)

    def residual_blocks(self) -> list[ResidualAttentionBlock]:
        """Every Transformer block of both towers (the ResNet tower has none)."""
        towers = [self.transformer] + ([self.visual.transformer] if isinstance(self.visual, VisionTransformer) else [])
        return [block for tower in towers for block in tower.resblocks]

    def compile_blocks(self, backend: str = "inductor", mode: str | None = None) -> None:
        """Regional compilation: ``torch.compile`` each residual block in place, the rest stays eager.

        Every block runs the same code, so the compiled graph is reused by all blocks of a tower: one
        compilation per tower (and grad mode), not per block and not per step. ``fullgraph=True``
        makes a graph break an error; ``dynamic=False`` specialises on the two towers' shapes instead
        of recompiling them as dynamic."""
        for block in self.residual_blocks():
            block.compile(backend=backend, mode=mode, fullgraph=True, dynamic=False)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """images [B, 3, S, S] (S = ``visual.image_size``) -> features [B, embed_dim]."""
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[-1] != self.visual.image_size \
                or images.shape[-2] != self.visual.image_size:
            s = self.visual.image_size
            raise ValueError(f"encode_image: expected images [B, 3, {s}, {s}], got {list(images.shape)}")
        x = self.visual(images)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """tokens [B, L <= context_length] (long) -> features [B, embed_dim], read out at the
        end-of-text token, which has the largest id in each sequence (so ``argmax`` finds it)."""
        if tokens.ndim != 2 or tokens.shape[1] > self.context_length:
            raise ValueError(f"encode_text: expected tokens [B, <= {self.context_length}], got {list(tokens.shape)}")
        L = tokens.shape[1]
        x = self.token_embedding(tokens) + self.positional_embedding[:L]
        x = self.transformer(x, causal=True)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        """-> (image_features, text_features, logit_scale.exp()), features L2-normalised."""
        image_features = self.encode_image(images, normalize=True)
        text_features = self.encode_text(tokens, normalize=True)
        return image_features, text_features, self.logit_scale.exp()


def build_model(name_or_cfg: str | Path | CLIPConfig) -> CLIP:
    """A freshly initialised CLIP from a config name (``"tiny"``, ``"ViT-B-32"``), JSON path or config."""
    cfg = name_or_cfg if isinstance(name_or_cfg, CLIPConfig) else load_config(name_or_cfg)
    return CLIP(cfg)
