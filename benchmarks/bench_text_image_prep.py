"""Throughput of the data-side pieces of clip_model, each against a baseline measured in this run.

- tokenizer: `ClipTokenizer(texts)` (cleaning + encode + pad/truncate to [B, 77]) vs the bare
  `tokenizers` encode_batch of already-cleaned texts (the floor we build on);
- eval transform: `image_transform(S, train=False)` vs a bare PIL resize + crop + numpy conversion;
- train transform: random resized crop vs the eval transform.

Run: .venv/bin/python benchmarks/bench_text_image_prep.py  (not collected by pytest; nothing asserted)
"""

from __future__ import annotations

import os
import random
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from clip_model.tokenizer import ClipTokenizer, clean_text  # noqa: E402
from clip_model.transforms import image_transform  # noqa: E402

WORDS = ("a the dog cat red blue kettle table wooden photo of on in with big small running man woman child "
         "tree car house street sunset beach bicycle mountain river snow city night").split()


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_tokenizer(n: int = 20_000) -> None:
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20))) for _ in range(n)]
    tok = ClipTokenizer.train(captions[:5000], vocab_size=2000)
    cleaned = [clean_text(c) for c in captions]
    ours = best_of(lambda: tok(captions))
    bare = best_of(lambda: tok.backend.encode_batch(cleaned))
    print(f"tokenizer  : {n / ours:9.0f} captions/s  (bare encode_batch {n / bare:9.0f}/s, ratio {bare / ours:.2f})")


def bench_transforms(size: int = 224, n: int = 60) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)) for _ in range(4)]
    eval_tf, train_tf = image_transform(size, train=False), image_transform(size, train=True, seed=0)

    def bare(image: Image.Image) -> torch.Tensor:
        resized = image.resize((round(640 * size / 480), size), Image.Resampling.BICUBIC)
        left = (resized.width - size) // 2
        array = np.asarray(resized.crop((left, 0, left + size, size)), dtype=np.float32) / 255.0
        return torch.from_numpy(array).permute(2, 0, 1)

    t_bare = best_of(lambda: [bare(images[i % 4]) for i in range(n)])
    t_eval = best_of(lambda: [eval_tf(images[i % 4]) for i in range(n)])
    t_train = best_of(lambda: [train_tf(images[i % 4]) for i in range(n)])
    print(f"eval tf    : {n / t_eval:9.1f} images/s  (bare PIL+numpy {n / t_bare:.1f}/s, ratio {t_bare / t_eval:.2f})")
    print(f"train tf   : {n / t_train:9.1f} images/s  (eval transform ratio {t_eval / t_train:.2f})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    bench_tokenizer()
    bench_transforms()
