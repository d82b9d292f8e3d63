"""Where training starts: a freshly initialised model, or a checkpoint's weights, with towers locked.

    model = initial_model(cfg)   # each worker, before DDP and the optimiser (components/train/loop.py)

- `init_checkpoint`: an OpenAI or OpenCLIP state dict (plain, or OpenCLIP's training checkpoint) or one of
  our `model.pt`, local or s3://, loaded strictly into `model_config`: every tensor must be there with
  its shape, and a file that carries its config (ours) must carry model_config's architecture. With
  `init_checkpoint_sha256` the file must have that digest (the pipeline pins it: `pin_checkpoint`).
- `lock_image` / `lock_text` (LiT, OpenCLIP's --lock-image / --lock-text): the tower's parameters stop
  requiring gradients, so the optimiser never holds them (`components.train.optim.param_groups`) and they
  stay bit-identical; a locked ResNet's BatchNorm layers keep their running statistics (always in eval
  mode). `lock_image_unlocked_groups` / `lock_text_unlocked_layers` leave the last n groups trainable,
  grouped as OpenCLIP groups them: the stem / embeddings first, one group per residual block, the last block
  with the final LayerNorm, the projection last (a ResNet: stem, layer1..layer4, attention pool).
  `logit_scale` always trains.

Before training from a checkpoint the pipeline's train step calls `pin_checkpoint` (the file's sha256 into
the config, for the workers to check and the lineage to record) and `check_dataset_tokenizer` (the dataset
must have been tokenised with the checkpoint's tokenizer, else its ids mean nothing to the weights).
"""

from __future__ import annotations

import dataclasses
import sys

import torch
from torch import nn

from clip_model.checkpoint import read_weights
from clip_model.model import CLIP, ModifiedResNet, build_model
from components.common import storage
from components.train.config import TrainConfig

Group = list  # modules and parameters that lock and unlock together


def initial_model(cfg: TrainConfig) -> CLIP:
    """`model_config` initialised from scratch or from `init_checkpoint`, with the towers `cfg` locks."""
    model = build_model(cfg.model_config)
    notes = [f"model {cfg.model_config}"]
    if cfg.init_checkpoint:
        digest = load_checkpoint(model, cfg.init_checkpoint, cfg.model_config, cfg.init_checkpoint_sha256)
        notes.append(f"weights from {cfg.init_checkpoint} (sha256 {digest[:12]})")
    if cfg.lock_image:
        groups = image_groups(model)
        lock(groups, cfg.lock_image_unlocked_groups, "lock_image_unlocked_groups")
        notes.append(f"image tower locked ({cfg.lock_image_unlocked_groups} of {len(groups)} groups trainable)")
    if cfg.lock_text:
        groups = text_groups(model)
        lock(groups, cfg.lock_text_unlocked_layers, "lock_text_unlocked_layers")
        notes.append(f"text tower locked ({cfg.lock_text_unlocked_layers} of {len(groups)} groups trainable)")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not distributed or torch.distributed.get_rank() == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        print(f"[train] {'; '.join(notes)}; {trainable:,} of {total:,} parameters trainable", file=sys.__stdout__,
              flush=True)
    return model


def load_checkpoint(model: CLIP, uri: str, model_config: str, sha256: str = "") -> str:
    """Load the weights at `uri` into `model` strictly; returns the file's sha256 (checked against
    `sha256` when given). Errors name the file and the model config."""
    with storage.local_copy(uri) as path:
        digest = storage.sha256_file(path)
        if sha256 and digest != sha256:
            raise ValueError(f"init_checkpoint {uri}: sha256 {digest}, expected {sha256} (the file changed "
                             "since the run was set up)")
        state_dict, file_config = read_weights(path)
    if file_config is not None:
        ours, theirs = _architecture(model.config), _architecture(file_config)
        if ours != theirs:
            differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
            raise ValueError(f"init_checkpoint {uri} holds a {theirs} model; model_config {model_config!r} is "
                             f"{ours}: they differ in {differ}. Set model_config to the checkpoint's architecture")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise ValueError(f"init_checkpoint {uri} does not fit model_config {model_config!r}: {e}") from e
    return digest


def _architecture(cfg) -> dict:
    """A model config without the settings that do not change the weights or the function."""
    return {k: v for k, v in cfg.to_dict().items() if k != "grad_checkpointing"}


# --------------------------------------------------------------------------- locking

def image_groups(model: CLIP) -> list[Group]:
    """The image tower in layer groups, input side first."""
    v = model.visual
    if isinstance(v, ModifiedResNet):
        stem = [v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3]
        return [stem, [v.layer1], [v.layer2], [v.layer3], [v.layer4], [v.attnpool]]
    blocks = list(v.transformer.resblocks)
    return [[v.conv1, v.class_embedding, v.positional_embedding, v.ln_pre], *([b] for b in blocks[:-1]),
            [blocks[-1], v.ln_post], [v.proj]]


def text_groups(model: CLIP) -> list[Group]:
    """The text tower in layer groups, input side first."""
    blocks = list(model.transformer.resblocks)
    return [[model.token_embedding, model.positional_embedding], *([b] for b in blocks[:-1]),
            [blocks[-1], model.ln_final], [model.text_projection]]


def _parameters(group: Group) -> list[nn.Parameter]:
    return [p for item in group for p in ([item] if isinstance(item, nn.Parameter) else item.parameters())]


def lock(groups: list[Group], unlocked: int, setting: str) -> None:
    """Freeze every group but the last `unlocked`; BatchNorm layers of frozen groups stop updating their
    running statistics."""
    if unlocked >= len(groups):
        raise ValueError(f"{setting}={unlocked} leaves all {len(groups)} groups of the tower trainable: lower it, "
                         "or do not lock the tower")
    frozen = groups[:len(groups) - unlocked]
    for group in frozen:
        for p in _parameters(group):
            p.requires_grad_(False)
        for module in (m for item in group if isinstance(item, nn.Module) for m in item.modules()):
            if isinstance(module, nn.BatchNorm2d):
                module.register_forward_pre_hook(_keep_eval)


def _keep_eval(module: nn.Module, _inputs) -> None:
    """A frozen BatchNorm normalises with its running statistics and never updates them, even when
    `model.train()` is called."""
    module.train(False)


# --------------------------------------------------------------------------- before training (the train step)

def pin_checkpoint(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with the sha256 of `init_checkpoint` filled in (checked against a given one): the workers
    refuse any other file, and the MLflow run records which weights training started from."""
    digest = storage.sha256(cfg.init_checkpoint)
    if cfg.init_checkpoint_sha256 and cfg.init_checkpoint_sha256 != digest:
        raise ValueError(f"init_checkpoint {cfg.init_checkpoint}: sha256 {digest}, expected "
                         f"{cfg.init_checkpoint_sha256}")
    return dataclasses.replace(cfg, init_checkpoint_sha256=digest)


def check_dataset_tokenizer(cfg: TrainConfig, tokenizer_uri: str) -> None:
    """Refuse a dataset tokenised with another tokenizer than the checkpoint's (see
    `components.common.dataset.tokenizer_source`): its ids would mean nothing to the weights."""
    from clip_model.tokenizer import ClipTokenizer
    from components.common.dataset import load_tokenizer, read_tokenizer_json, tokenizer_source

    expected = ClipTokenizer.from_str(read_tokenizer_json(cfg.init_checkpoint))
    if load_tokenizer(tokenizer_uri).to_str() != expected.to_str():
        raise ValueError(f"the dataset's tokenizer {tokenizer_uri} is not the one init_checkpoint "
                         f"{cfg.init_checkpoint} was trained with ({tokenizer_source(cfg.init_checkpoint)}): shard "
                         f"with tokenizer={cfg.init_checkpoint!r} (or the tokenizer.json / preset it used)")
