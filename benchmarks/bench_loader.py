"""The training reader against the JPEG-decode limit, with and without the shard-time resize.

    PYTHONPATH=. python benchmarks/bench_loader.py [--workers 2] [--images 768] [--size 640x480] [--rounds 3]

Builds a corpus of photo-like JPEGs (the synthetic scenes at `--size`, with noise so that they
compress like photographs), then shards it with the shard stage twice: with the default shard-time
resize (training images' shorter side at 1.15 x 224 = 258 px) and without it (the JPEGs as they
come). For each dataset it prints:

- bytes per sample (shard bytes / samples) and decode time per sample (one process, PIL open + load,
  CPU time, no draft mode);
- decode limit: a pool of `--workers` processes, each reading whole shards, decoding every JPEG and
  centre-cropping it to a 224 x 224 uint8 array (the arrays stay in the pool: only their count comes
  back, so the limit carries no transfer cost at all);
- decode only: the same pool decoding alone (no crop, no copy out of Pillow): a stricter bound, for reference;
- same work: the same pool doing the reader's own per-sample work with the default crop (draft decode,
  the paper's random 224 x 224 crop written into a batch row): what the reader would deliver with no
  overhead at all;
- the reader: `make_loader(train=True, num_workers=--workers)` uint8 batches of `--batch` with
  persistent workers (epoch mode), timed over whole epochs after a warm-up epoch, with each training
  crop: `random` (the default, the CLIP paper's random square crop of the image at a shorter side of
  1.15 x 224, which is how the shard stage stores training images: no resampling) and `random_resized`
  (OpenCLIP's: a bicubic resize of a random box per sample), once with the resample on the device (the
  default: the workers send canvases and boxes; the host's share is timed, and the resample's cost on this
  CPU is printed beside it) and once in the workers (as before).

Rounds alternate them; the medians and the ratios to the decode limit (the goal is >= 0.8 with the default
crop) and reader / same work (the reader's own overhead) are printed. Each rate is also counted per
CPU-second of all the processes doing the work (this one and its children: the pool, or the reader's
workers and the process taking its batches): on a machine other work shares, wall-clock rounds swing with
that work, the CPU ratio much less. On the "original" dataset (no shard-time resize) the default crop has
to resize every image, and so does `random_resized` in the workers: that bicubic resize is the gap to the
decode limit, which only decodes and crops. `--data DIR` keeps the corpus and datasets for later runs.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZE = 224


def photo_jpegs(n: int, width: int, height: int, seed: int = 0) -> list[dict]:
    """`n` photo-like JPEG pairs (scenes with sensor-like noise), in write_filter_output's form."""
    from components.synthetic.scenes import random_scene, render

    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        w, h = (width, height) if rng.random() < 0.7 else (height, width)  # some portrait images
        scene = random_scene(rng, width=w, height=h)
        noisy = np.asarray(render(scene), dtype=np.int16) + rng.normal(0, 10, (h, w, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        pairs.append({"image": buf.getvalue(), "ext": "jpg", "phash": f"{int(rng.integers(2**62)):016x}",
                      "caption": scene.caption(rng), "width": w, "height": h})
    return pairs


def _jpegs_of(shard: str) -> list[bytes]:
    from components.common.tar_reader import shard_samples  # how the reader reads shards

    return [sample["jpg"] for sample in shard_samples(shard)]


def decode_and_centre_crop(shard: str) -> int:
    """The decode limit's task: every JPEG of a shard decoded (no draft) and centre-cropped to 224."""
    n = 0
    for data in _jpegs_of(shard):
        img = Image.open(io.BytesIO(data))
        img.load()
        left, top = (img.width - SIZE) // 2, (img.height - SIZE) // 2
        n += len(np.asarray(img.convert("RGB").crop((left, top, left + SIZE, top + SIZE)))) > 0
    return n


def readers_own_work(shard: str) -> int:
    """The reader's per-sample work without the reader (no batching, tokenizing or transfer): its own
    sample function (`components.train.loader._ToPair.into`: draft decode, the default random crop written
    into a batch row)."""
    from clip_model.transforms import image_transform
    from components.common.tar_reader import shard_samples
    from components.train.loader import _ToPair

    to_pair = _ToPair(image_transform(SIZE, train=True, train_crop="random"))
    rows, geometry = np.empty((32, SIZE, SIZE, 3), dtype=np.uint8), np.zeros((32, 6))
    return sum(len(to_pair.into(sample, rows[i % 32], geometry[i % 32])[1]) > 0
               for i, sample in enumerate(shard_samples(shard)))


def decode_only(shard: str) -> int:
    """Every JPEG of a shard decoded (no draft, no crop, no copy out of Pillow): a stricter bound than the limit,
    printed for reference."""
    n = 0
    for data in _jpegs_of(shard):
        img = Image.open(io.BytesIO(data))
        img.load()
        n += img.width > 0
    return n


def decode_seconds_per_sample(shards: list[str], limit: int = 200) -> float:
    """CPU seconds to decode one stored JPEG at full size, in this process."""
    jpegs = [data for s in shards for data in _jpegs_of(s)][:limit]
    t = time.process_time()
    for data in jpegs:
        Image.open(io.BytesIO(data)).load()
    return (time.process_time() - t) / len(jpegs)


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and all its children alive now (pool processes, reader
    workers)."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def timed(count) -> tuple[float, float]:
    """(samples per second, samples per CPU-second) of `count()`, which returns the samples it handled."""
    t, c = time.perf_counter(), cpu_seconds()
    n = count()
    return n / (time.perf_counter() - t), n / max(cpu_seconds() - c, 1e-9)


def pool_rate(pool, fn, shards: list[str]) -> tuple[float, float]:
    return timed(lambda: sum(pool.imap_unordered(fn, shards)))


def reader_rate(loader) -> tuple[float, float]:
    return timed(lambda: sum(batch[0].shape[0] for batch in loader))


def device_resample_ms(loader) -> float:
    """CPU milliseconds per sample of `resample_boxes` on one batch of the loader's canvases, in this process on
    one thread: what the device does instead of the workers (on a GPU a small fraction of a training step)."""
    import torch

    canvas, _tokens, geometry = next(iter(loader))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        finish = loader.normalize
        finish(canvas, geometry)  # warm-up
        t = time.process_time()
        finish(canvas, geometry)
        return 1000 * (time.process_time() - t) / canvas.shape[0]
    finally:
        torch.set_num_threads(threads)


READERS = {"reader": ("random", True), "reader_random_resized": ("random_resized", True),
           "reader_random_resized_cpu": ("random_resized", False)}  # train_crop, device_resample


def measure(name: str, manifest_path: str, args) -> dict:
    from components.common.dataset import load_manifest, shard_uris, split_samples
    from components.train.loader import make_loader

    m = load_manifest(manifest_path)
    shards = shard_uris(m, "train")
    per_sample_bytes = sum(s["bytes"] for s in m["splits"]["train"]["shards"]) / split_samples(m, "train")
    decode_ms = 1000 * decode_seconds_per_sample(shards)
    loaders = {key: make_loader(m, "train", None, SIZE, args.batch, train=True, num_workers=args.workers,
                                prefetch=args.prefetch, train_crop=crop, device_resample=on_device)
               for key, (crop, on_device) in READERS.items()}
    pools = {"limit": decode_and_centre_crop, "decode_only": decode_only, "same_work": readers_own_work}
    rates: dict[str, list[float]] = {k: [] for k in [*pools, *loaders]}
    per_cpu: dict[str, list[float]] = {k: [] for k in rates}
    with get_context("fork").Pool(args.workers) as pool:
        pool_rate(pool, decode_and_centre_crop, shards[:args.workers])  # warm-up: the pool's processes
        for loader in loaders.values():
            reader_rate(loader)  # warm-up: the reader's persistent workers start
        for r in range(args.rounds):
            for key in rates:
                wall, cpu = pool_rate(pool, pools[key], shards) if key in pools else reader_rate(loaders[key])
                rates[key].append(wall)
                per_cpu[key].append(cpu)
            print(f"  [{name}] round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s ({per_cpu[k][-1]:.0f}/cpu-s)"
                                                          for k, v in rates.items()), flush=True)
    return {"name": name, "bytes": per_sample_bytes, "decode_ms": decode_ms,
            "wall": {k: statistics.median(v) for k, v in rates.items()},
            "cpu": {k: statistics.median(v) for k, v in per_cpu.items()},
            "device_resample_ms": device_resample_ms(loaders["reader_random_resized"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="reader DataLoader workers = pool processes")
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--size", default="640x480", help="stored JPEG size before the shard stage (WxH)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prefetch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default="resized,original", help="resized (shard-time resize), original")
    ap.add_argument("--data", default=None, help="folder to keep the corpus and datasets in and reuse on later runs "
                                                  "(same --images and --size); default: a temporary folder")
    args = ap.parse_args()

    from components.common import config
    from components.shard.config import ShardConfig
    from components.shard.stage import shard
    from tests.fixtures_data import write_filter_output

    load_start = os.getloadavg()[0]
    width, height = (int(v) for v in args.size.split("x"))
    per_shard = max(8, args.images // (4 * args.workers))  # >= 4 shards per reader, many pool tasks
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        base = Path(args.data or tmp) / f"{args.images}-{args.size}-{per_shard}"
        filtered = base / "filtered"
        if not (filtered / "stats.json").exists():
            t = time.perf_counter()
            write_filter_output(filtered, photo_jpegs(args.images, width, height))
            print(f"corpus: {args.images} JPEGs of {args.size} in {time.perf_counter() - t:.1f}s", flush=True)
        rows = []
        for variant in args.variants.split(","):
            settings = {"samples_per_shard": per_shard, "val_fraction": 0.0, "vocab_size": 1000,
                        "runner": "local", "in_process_max_bytes": 2**40,  # this process: no Ray start-up
                        "train_image_size": SIZE if variant == "resized" else None}
            out = base / variant
            if not (out / "manifest.json").exists():
                t = time.perf_counter()
                shard(str(filtered), str(out), config.from_dict(ShardConfig, settings))
                print(f"[{variant}] sharded in {time.perf_counter() - t:.1f}s", flush=True)
            rows.append(measure(variant, str(out / "manifest.json"), args))

    print(f"\n{args.workers} workers/processes, {os.cpu_count()} CPUs, batch {args.batch}, {SIZE}x{SIZE} uint8, "
          f"source JPEGs {args.size}; medians of {args.rounds} rounds")
    labels = {"limit": "decode limit (decode + centre crop)", "decode_only": "decode only (stricter, reference)",
              "same_work": "same work (reader's per-sample work, bare)", "reader": "reader, train_crop=random (default)",
              "reader_random_resized": "reader, random_resized, resample on the device",
              "reader_random_resized_cpu": "reader, random_resized, resample in the workers"}
    for r in rows:
        wall, cpu = r["wall"], r["cpu"]
        print(f"[{r['name']}] {r['bytes']:.0f} bytes/sample, decode {r['decode_ms']:.2f} ms/sample (one process)")
        print(f"  {'':50s} {'samples/s':>10s} {'per CPU-s':>10s} {'CPU ms/sample':>14s} {'/limit':>7s} "
              f"{'/limit per CPU-s':>17s}")
        for key, label in labels.items():
            print(f"  {label:50s} {wall[key]:>10.0f} {cpu[key]:>10.0f} {1000 / cpu[key]:>14.3f} "
                  f"{wall[key] / wall['limit']:>7.2f} {cpu[key] / cpu['limit']:>17.2f}")
        print(f"  reader / same work {wall['reader'] / wall['same_work']:.2f} (wall), "
              f"{cpu['reader'] / cpu['same_work']:.2f} (per CPU-s); random_resized CPU per sample: "
              f"{cpu['reader_random_resized'] / cpu['reader_random_resized_cpu']:.2f}x less with the resample on the "
              f"device, which costs {r['device_resample_ms']:.3f} ms/sample when that device is this CPU (1 thread)")
    print(f"(load average {os.getloadavg()[0]:.1f} at the end, {load_start:.1f} at the start, on {os.cpu_count()} CPUs;"
          " goal: reader / decode limit >= 0.8 with the default crop)")


if __name__ == "__main__":
    main()
