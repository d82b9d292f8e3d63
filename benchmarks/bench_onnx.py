"""onnxruntime vs PyTorch eager latency on CPU for the exported encoders (random weights).

    .venv/bin/python benchmarks/bench_onnx.py                       # tiny and ViT-B-32, batch 1 and 32
    .venv/bin/python benchmarks/bench_onnx.py --models tiny --threads 1

For each model, encoder and batch size: the median latency of PyTorch (``torch.no_grad``, eval mode) and of
onnxruntime (CPUExecutionProvider, same thread count) on the same inputs, the speed-up ratio
(PyTorch / onnxruntime) and the parity of the outputs (max abs difference, min cosine). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from clip_model.model import build_model
from components.inference.onnx_clip import IMAGE_INPUT, IMAGE_OUTPUT, TEXT_INPUT, TEXT_OUTPUT
from components.export.stage import Encoder, export_onnx


def _median_s(fns, repeats: int, warmup: int = 1) -> list[float]:
    """Median seconds of each function; the calls are interleaved so that load from other processes
    hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def bench_model(name: str, batches: list[int], threads: int, budget_s: float) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(name).eval()
    s, ctx = model.visual.image_size, model.context_length
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"image": Path(tmp) / "image.onnx", "text": Path(tmp) / "text.onnx"}
        t0 = time.perf_counter()
        export_onnx(Encoder(model, "image"), torch.zeros(2, 3, s, s), paths["image"], IMAGE_INPUT, IMAGE_OUTPUT, 17)
        tokens2 = torch.randint(1, model.vocab_size - 1, (2, ctx))
        tokens2[:, 20] = model.vocab_size - 1
        export_onnx(Encoder(model, "text"), tokens2, paths["text"], TEXT_INPUT, TEXT_OUTPUT, 17)
        print(f"[{name}] exported both encoders in {time.perf_counter() - t0:.1f}s", flush=True)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
                    for k, p in paths.items()}
        for batch in batches:
            pixels = torch.randn(batch, 3, s, s)
            tokens = torch.randint(1, model.vocab_size - 1, (batch, ctx))
            tokens[:, 12:] = 0
            tokens[:, 12] = model.vocab_size - 1  # end-of-text: the largest id
            for enc, module, x, inp, out in (("image", Encoder(model, "image"), pixels, IMAGE_INPUT, IMAGE_OUTPUT),
                                             ("text", Encoder(model, "text"), tokens, TEXT_INPUT, TEXT_OUTPUT)):
                sess, feed = sessions[enc], {inp: x.numpy()}
                with torch.no_grad():
                    t0 = time.perf_counter()
                    ref = module(x).numpy()
                    once = time.perf_counter() - t0
                repeats = int(max(3, min(20, budget_s / max(once, 1e-4))))

                def run_torch() -> None:
                    with torch.no_grad():
                        module(x)

                torch_s, onnx_s = _median_s([run_torch, lambda: sess.run([out], feed)], repeats)
                got = sess.run([out], feed)[0]
                cos = float(((ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))).min())
                row = {"model": name, "encoder": enc, "batch": batch, "torch_ms": torch_s * 1e3,
                       "onnx_ms": onnx_s * 1e3, "speedup": torch_s / onnx_s,
                       "max_abs": float(np.abs(ref - got).max()), "min_cos": cos, "repeats": repeats}
                rows.append(row)
                print(f"[{name}] {enc:5s} batch {batch:3d}: torch {row['torch_ms']:9.2f} ms  onnxruntime "
                      f"{row['onnx_ms']:9.2f} ms  ratio torch/ort {row['speedup']:5.2f}x  "
                      f"max|d| {row['max_abs']:.1e}  min cos {cos:.7f}", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,ViT-B-32")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=3.0, help="rough time per measurement")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        rows += bench_model(name.strip(), [int(b) for b in args.batches.split(",")], args.threads, args.budget_s)
    print(f"\nCPU, {args.threads} threads, median latency (PyTorch eager vs onnxruntime), ratio = torch / ort")
    print(f"{'model':10s} {'encoder':7s} {'batch':>5s} {'torch ms':>10s} {'ort ms':>10s} {'ratio':>7s} {'min cos':>10s}")
    for r in rows:
        print(f"{r['model']:10s} {r['encoder']:7s} {r['batch']:5d} {r['torch_ms']:10.2f} {r['onnx_ms']:10.2f} "
              f"{r['speedup']:6.2f}x {r['min_cos']:10.7f}")


if __name__ == "__main__":
    main()
