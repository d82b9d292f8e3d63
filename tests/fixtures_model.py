"""A tiny CLIP trained briefly on the synthetic corpus (import the fixture into a test module).

`trained_tiny` (session): renders clean scenes of the synthetic corpus (components.synthetic: coloured
shapes on patterned backgrounds, captions naming colour, shape, count, place), writes them in the filter
stage's output format, shards them with the real shard stage (webdataset shards, tokenizer, manifest with
a validation split), then trains the "tiny" config with a plain PyTorch loop (no Ray) for a few hundred
steps on 64 px images, and writes ``model/model.pt`` (clip_model.checkpoint format) with
``model/tokenizer.json`` beside it. It also writes the synthetic labelled evaluation split. Takes
roughly 30-60 s on two CPU cores.
"""

from __future__ import annotations

import io
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass
class TrainedTiny:
    root: Path
    manifest_uri: str
    model_uri: str  # .../model/model.pt
    tokenizer_uri: str  # .../model/tokenizer.json (a copy of the manifest's)
    eval_dir: str  # ImageFolder synthetic evaluation split
    train_seconds: float
    first_loss: float
    final_loss: float
    content_hash: str


def write_synthetic_kept(out_dir: Path, n: int, seed: int) -> Path:
    """`n` clean synthetic-corpus pairs as the filter stage's output (kept/*.parquet + stats.json)."""
    from PIL import Image

    from components.synthetic.scenes import random_scene, render
    from tests.fixtures_data import write_filter_output

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        scene = random_scene(rng)
        img = render(scene).resize((96, 96), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=92)
        pairs.append({"image": buf.getvalue(), "ext": "jpg", "phash": f"{int(rng.integers(2**62)):016x}",
                      "caption": scene.caption(rng), "width": 96, "height": 96})
    return write_filter_output(out_dir, pairs)


def build_trained_tiny(root: Path, n: int = 640, steps: int = 250, batch_size: int = 48, lr: float = 2e-3,
                       seed: int = 0, eval_per_class: int = 24) -> TrainedTiny:
    import torch

    from clip_model.checkpoint import save_model
    from clip_model.loss import ClipLoss
    from clip_model.model import build_model
    from clip_model.transforms import image_transform
    from components.common.dataset import iter_samples, load_tokenizer
    from components.shard.config import ShardConfig
    from components.shard.stage import shard
    from components.synthetic.corpus import generate_eval_split

    torch.manual_seed(seed)
    random.seed(seed)
    filtered = write_synthetic_kept(root / "filtered", n, seed)
    manifest = shard(str(filtered), str(root / "shards"),
                     ShardConfig(samples_per_shard=256, image_max_side=96, val_fraction=0.1, vocab_size=1000,
                                 num_cpus=1))
    manifest_uri = str(root / "shards" / "manifest.json")
    tokenizer = load_tokenizer(manifest["tokenizer"])

    model = build_model("tiny")
    transform = image_transform(model.visual.image_size, train=False)
    images, captions = [], []
    for _key, image, caption, _meta in iter_samples(manifest, "train"):
        images.append(transform(image))
        captions.append(caption)
    x = torch.stack(images)
    t = tokenizer(captions, context_length=model.context_length)
    # The text tower is causal and pools at the end-of-text token, so the padding after the longest
    # caption changes nothing: dropping it makes each step ~3x cheaper.
    t = t[:, : int((t != 0).sum(dim=1).max())]

    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    losses = []
    for _step in range(steps):
        idx = torch.randperm(len(x), generator=gen)[:batch_size]
        img_f, txt_f, scale = model(x[idx], t[idx])
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, float(np.log(100)))
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.eval()
    model_dir = root / "model"
    save_model(model_dir / "model.pt", model)
    shutil.copyfile(manifest["tokenizer"], model_dir / "tokenizer.json")
    eval_dir = root / "eval-split"
    generate_eval_split(eval_dir, per_class=eval_per_class, seed=seed + 1)
    return TrainedTiny(root=root, manifest_uri=manifest_uri, model_uri=str(model_dir / "model.pt"),
                       tokenizer_uri=str(model_dir / "tokenizer.json"), eval_dir=str(eval_dir),
                       train_seconds=seconds, first_loss=float(np.mean(losses[:10])),
                       final_loss=float(np.mean(losses[-10:])), content_hash=manifest["content_hash"])


_BUILT: dict[str, TrainedTiny] = {}


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory) -> TrainedTiny:
    """Built once per test session. Each test module that imports this fixture gets its own pytest
    fixture definition, so the result is cached here to train only once."""
    import torch

    if "tiny" not in _BUILT:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _BUILT["tiny"] = build_trained_tiny(tmp_path_factory.mktemp("trained-tiny"))
        finally:
            torch.set_num_threads(threads)
    return _BUILT["tiny"]
