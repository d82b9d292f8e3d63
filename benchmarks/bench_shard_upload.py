"""Shard + upload throughput against a plain boto3 ``upload_file`` of the same bytes.

Starts an S3-protocol server on loopback (moto), writes a fake filter output of N JPEG pairs, then
times, against the same endpoint:
  baseline   boto3 ``upload_file`` of the finished shard tars (what the bytes cost to move);
  pack       shard() with no resize (train_image_size and image_max_side None: JPEG bytes kept: tar
             packing, hashing, upload);
  resize     shard() re-encoding every image to image_max_side (adds JPEG decode/encode);
  rerun      shard() again onto the same output (every upload skipped: size + recorded sha256).
Every run is the Ray stage (a Ray Data sort, then one writer task per shard) on one local Ray.
Prints MB/s of shard bytes and the ratio to the baseline. Not collected by pytest.

    .venv/bin/python benchmarks/bench_shard_upload.py --n 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def fake_filter_output(root: str, n: int, side: int, seed: int = 0) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageFilter

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = side, int(side * rng.uniform(0.6, 1.0))
        arr = nrng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)  # smooth-ish, photo-like size
        img = Image.fromarray(arr).resize((w, h), Image.Resampling.BILINEAR).filter(ImageFilter.SMOOTH)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        rows.append({"key": f"{i:09d}", "source_uri": f"raw/{i}.jpg", "sha256": f"{i:064x}", "phash": i,
                     "caption": f"a photo of thing number {i} on a table", "width": w, "height": h,
                     "language": "en", "image": buf.getvalue()})
    os.makedirs(os.path.join(root, "kept"))
    for p in range(4):
        pq.write_table(pa.Table.from_pylist(rows[p::4]), os.path.join(root, "kept", f"part-{p:05d}.parquet"))
    with open(os.path.join(root, "stats.json"), "w") as f:
        f.write('{"kept": %d}' % n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="image-text pairs")
    ap.add_argument("--side", type=int, default=384, help="longer side of the input JPEGs")
    ap.add_argument("--resize-to", type=int, default=256, help="image_max_side of the resize run")
    ap.add_argument("--samples-per-shard", type=int, default=250)
    args = ap.parse_args()

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")

    from components.common import config, storage
    from components.common.ray_runtime import ray_session
    from components.shard.config import ShardConfig
    from components.shard.stage import shard

    storage.ensure_bucket("bench")
    with ray_session(log_to_driver=False), tempfile.TemporaryDirectory() as tmp:  # one Ray for every run
        src = os.path.join(tmp, "filtered")
        t = time.perf_counter()
        fake_filter_output(src, args.n, args.side)
        print(f"fake filter output: {args.n} pairs in {time.perf_counter() - t:.1f}s")
        # The tokenizer is trained in every shard() run; keep it out of the I/O comparison.
        common = dict(samples_per_shard=args.samples_per_shard, val_fraction=0.05, vocab_size=300,
                      train_image_size=None)
        tok = os.path.join(tmp, "tok")
        shard(src, tok, config.from_dict(ShardConfig, common, image_max_side=None))
        tok_uri = os.path.join(tok, "tokenizer.json")

        def timed(name: str, out: str, cfg: ShardConfig) -> tuple[float, int]:
            t0 = time.perf_counter()
            m = shard(src, out, dataclasses.replace(cfg, tokenizer=tok_uri))
            dt = time.perf_counter() - t0
            nbytes = sum(s["bytes"] for sp in m["splits"].values() for s in sp["shards"])
            return dt, nbytes

        pack_cfg = config.from_dict(ShardConfig, common, image_max_side=None)
        pack_s, pack_bytes = timed("pack", "s3://bench/pack", pack_cfg)
        resize_s, resize_bytes = timed("resize", "s3://bench/resize",
                                       config.from_dict(ShardConfig, common, image_max_side=args.resize_to))
        rerun_s, _ = timed("rerun", "s3://bench/pack", pack_cfg)

        # Baseline: the same shard bytes, uploaded with boto3's upload_file and nothing else.
        local = os.path.join(tmp, "tars")
        storage.download_dir("s3://bench/pack", local)
        tars = sorted(os.path.join(local, f) for f in os.listdir(local) if f.endswith(".tar"))
        client = storage.client()  # a plain boto3 S3 client
        t0 = time.perf_counter()
        for p in tars:
            client.upload_file(p, "bench", f"baseline/{os.path.basename(p)}")
        base_s = time.perf_counter() - t0
        base_bytes = sum(os.path.getsize(p) for p in tars)

    server.stop()
    mb = 1e6
    base_rate = base_bytes / mb / base_s
    print(f"\n{'run':<10} {'seconds':>8} {'MB':>8} {'MB/s':>8} {'x baseline':>10}")
    print(f"{'baseline':<10} {base_s:8.2f} {base_bytes / mb:8.1f} {base_rate:8.1f} {1.0:10.2f}")
    for name, s, b in (("pack", pack_s, pack_bytes), ("resize", resize_s, resize_bytes), ("rerun", rerun_s, pack_bytes)):
        rate = b / mb / s
        print(f"{name:<10} {s:8.2f} {b / mb:8.1f} {rate:8.1f} {rate / base_rate:10.2f}")
    print(f"\nbaseline = boto3 upload_file of the {len(tars)} shard tars to the same loopback endpoint; "
          f"{args.n} pairs, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
