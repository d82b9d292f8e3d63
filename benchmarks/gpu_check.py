"""GPU check of CLIP training: ViT-B/32, bf16, batch 512 on one GPU (run through gpu_check.sh).

Parts (each reports PASS/FAIL; the exit status is non-zero if any failed). Everything runs in this
process without Ray: Ray's wheel (79 MB) is larger than what may travel to the GPU machine (64 MiB),
so the Ray Train stage itself is not run here; `loop` runs the same per-worker loop without it.

  synthetic  random tensors already on the GPU -> TrainStep (the loop's own step: bf16 autocast,
             ClipLoss, fused AdamW, grad clipping, logit-scale clamp), eager: the model's ceiling.
             Then a few steps with CUDA's sync debug mode on "error": a step that waits for the
             device (a host synchronisation) fails the part;
  compiled   the same with each residual block compiled (regional, inductor); after the warm-up the
             timed steps run with torch.compiler's "fail_on_recompile" stance;
  accum      grad_accum=2 micro-batches of batch/2: the same 512 negatives through accumulation (one
             extra forward pass per micro-batch; MFU counts the useful 3 x forward only);
  shards     photo-like JPEGs sharded by the project's shard stage (training images stored at 1.15 x
             224 on the shorter side), streamed through components.train.loader (uint8, pinned,
             persistent workers, `--train-crop`) and DeviceBatches (side-stream copy, normalised on the
             GPU) -> the same step;
  loop       components.train.loop.run_worker_loop with a LocalWorker (no Ray): the loop the Ray Train
             workers run, with its reader, logging and final checkpoint, on those shards;
  loader     benchmarks/bench_loader.measure on those shards: the reader (both training crops) against
             the decode-and-crop pool of as many processes (goal >= 0.8), and against a pool doing the
             reader's own work;
  openclip   benchmarks/bench_vs_openclip.compare: our step against OpenCLIP's, same model
             (ViT-B-32-quickgelu), batch, bf16, loss and optimiser, alternating rounds (goal >= 1.2).

Printed: samples/s/GPU, ms/step, peak memory, data-wait share and the fraction of peak FLOP/s
(model FLOPs per training sample = 3 x forward FLOPs, counted with torch.utils.flop_counter and
cross-checked with an analytic count; peak 989 TFLOP/s dense bf16 for H100/H200 SXM unless
--peak-tflops is given). `--device cpu` is a dry run of every code path with the tiny model.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def peak_tflops(name: str, override: float | None) -> tuple[float, str]:
    if override:
        return override, "given by --peak-tflops"
    for key, value in PEAK_TFLOPS.items():  # first match wins: "H100 PCIe" before "H100"
        if key in name:
            return value, f"dense bf16 peak of {key}"
    return 989.0, "unknown GPU: assuming H100 SXM dense bf16 (pass --peak-tflops)"


def analytic_forward_flops(cfg) -> float:
    """Matmul FLOPs of one sample's forward pass (2 per multiply-add), both towers, dense attention."""
    def tower(n: int, d: int, layers: int, mlp_ratio: float) -> float:
        per_layer = 2 * n * d * (3 * d + d + 2 * mlp_ratio * d) + 2 * 2 * n * n * d
        return layers * per_layer

    v, t = cfg.vision, cfg.text
    n_patches = (v.image_size // v.patch_size) ** 2
    vision = tower(n_patches + 1, v.width, v.layers, v.mlp_ratio) + 2 * n_patches * 3 * v.patch_size ** 2 * v.width
    vision += 2 * v.width * cfg.embed_dim
    text = tower(t.context_length, t.width, t.layers, t.mlp_ratio) + 2 * t.width * cfg.embed_dim
    return vision + text


def counted_forward_flops(model, device) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    s = model.visual.image_size
    images = torch.randn(2, 3, s, s, device=device)
    tokens = torch.randint(1, 1000, (2, model.context_length), device=device)
    tokens[:, -1] = model.vocab_size - 1
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16), FlopCounterMode(display=False) as fc:
        model(images, tokens)
    return fc.get_total_flops() / 2


# --------------------------------------------------------------------------- the step, timed

def build_step(args, device, batch_accum: int = 1, compile: bool = False):
    import torch

    from clip_model.model import build_model
    from components.common import config
    from components.train.config import OptimConfig
    from components.train.optim import build_optimizer, build_scheduler
    from components.train.train_step import TrainStep

    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    ocfg = config.from_dict(OptimConfig, {"lr": 5e-4, "warmup_steps": 10})
    opt = build_optimizer(model, ocfg)
    precision = "bf16" if device.type == "cuda" else "fp32"  # CPU bf16 is slow: the dry run checks code paths
    step = TrainStep(model, opt, build_scheduler(opt, ocfg, 10_000), torch.amp.GradScaler(device.type, enabled=False),
                     precision, device, grad_accum=batch_accum, grad_clip=1.0, compile=compile)
    model.train()
    return model, step


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, args, label: str, device, per_step: int, guard=None) -> dict:
    """Warm-up steps, then `args.steps` timed ones (inside `guard()`, a context manager, if given)."""
    import contextlib

    import torch

    cuda = device.type == "cuda"
    t = time.perf_counter()
    for _ in range(args.warmup):
        loss, _ = step.step(batches)
    sync(device)
    print(f"  [{label}] warm-up ({args.warmup} steps) {time.perf_counter() - t:.1f}s, loss {loss.item():.3f}", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wait = 0.0
    with guard() if guard is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss, w = step.step(batches)
            wait += w
        sync(device)
        elapsed = time.perf_counter() - t0
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise RuntimeError(f"[{label}] loss is {loss_value}")
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
    return {"samples_per_s": args.steps * per_step / elapsed, "ms_per_step": 1000 * elapsed / args.steps,
            "data_wait_share": wait / elapsed, "peak_mem_gib": peak_mem, "loss": loss_value}


def synthetic_batches(model, batch: int, device):
    import torch

    s = model.visual.image_size
    images = torch.randn(batch, 3, s, s, device=device)
    tokens = torch.randint(1, model.vocab_size - 2, (batch, model.context_length), device=device)
    tokens[:, 20] = model.vocab_size - 1  # end of text: the largest id
    tokens[:, 21:] = 0
    while True:
        yield images, tokens


def release(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- parts

def part_synthetic(args, device, ctx: dict) -> dict:
    import torch

    model, step = build_step(args, device)
    ctx["fwd_flops"] = counted_forward_flops(model, device)
    batches = synthetic_batches(model, args.batch, device)
    out = timed(step, batches, args, "synthetic", device, args.batch)
    if device.type == "cuda":  # any host synchronisation inside a step raises
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step.step(batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        out["note"] = "no host sync in 3 steps (sync debug mode 'error')"
    else:
        out["note"] = "host syncs: checked on CUDA only (tests/test_train.py checks the step on CPU)"
    ctx["synthetic"] = out["samples_per_s"]
    del model, step
    release(device)
    return out


def part_compiled(args, device, ctx: dict) -> dict:
    import torch

    model, step = build_step(args, device, compile=True)
    out = timed(step, synthetic_batches(model, args.batch, device), args, "compiled", device, args.batch,
                guard=lambda: torch.compiler.set_stance("fail_on_recompile"))  # it takes effect when made
    out["note"] = f"regional compile, no recompile in {args.steps} steps; x{out['samples_per_s'] / ctx.get('synthetic', math.nan):.2f} eager"
    del model, step
    release(device)
    return out


def part_accum(args, device, ctx: dict) -> dict:
    model, step = build_step(args, device, batch_accum=2)
    out = timed(step, synthetic_batches(model, args.batch // 2, device), args, "accum", device, args.batch)
    out["note"] = f"2 x {args.batch // 2}, {args.batch} negatives; x{out['samples_per_s'] / ctx.get('synthetic', math.nan):.2f} of one batch"
    del model, step
    release(device)
    return out


def make_corpus(args, work: Path) -> Path:
    """Photo-like JPEGs as the filter stage's output (rendered in a pool of processes)."""
    from multiprocessing import get_context

    from benchmarks.bench_loader import photo_jpegs
    from tests.fixtures_data import write_filter_output

    width, height = (int(v) for v in args.source_size.split("x"))
    chunks = [(args.corpus // 16 + (i < args.corpus % 16), width, height, i) for i in range(16)]
    with get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
        pairs = [p for part in pool.starmap(photo_jpegs, chunks) for p in part]
    return write_filter_output(work / "filtered", pairs)


def part_shards(args, device, ctx: dict) -> dict:
    from components.common import config
    from components.common.dataset import load_manifest, load_tokenizer
    from components.shard.config import ShardConfig
    from components.shard.stage import shard
    from components.train.loader import make_loader

    work = Path(ctx["work"])
    t = time.perf_counter()
    ctx["filtered"] = make_corpus(args, work)
    cfg = config.from_dict(ShardConfig, {"samples_per_shard": max(16, args.corpus // (2 * args.loader_workers)),
                                         "val_fraction": 0.0, "vocab_size": 1000,
                                         "num_cpus": max(1, (os.cpu_count() or 2) - 2)})
    shard(str(ctx["filtered"]), str(work / "shards"), cfg)
    ctx["manifest"] = str(work / "shards" / "manifest.json")
    print(f"  [shards] {args.corpus} JPEGs of {args.source_size} rendered and sharded in "
          f"{time.perf_counter() - t:.1f}s", flush=True)
    model, step = build_step(args, device, compile=args.compile)
    m = load_manifest(ctx["manifest"])
    loader = make_loader(m, "train", load_tokenizer(m["tokenizer"]), model.visual.image_size, args.batch,
                         train=True, resample=True, num_workers=args.loader_workers, seed=0,
                         prefetch=args.prefetch, pin_memory=device.type == "cuda", train_crop=args.train_crop)
    out = timed(step, loader.on_device(device), args, "shards", device, args.batch)
    out["note"] = (f"x{out['samples_per_s'] / ctx.get('synthetic', math.nan):.2f} synthetic (goal >= 0.9); "
                   f"train_crop {args.train_crop}")
    del model, step, loader
    release(device)
    return out


def part_loop(args, device, ctx: dict) -> dict:
    from components.common import config
    from components.train.config import TrainConfig
    from components.train.loop import run_worker_loop
    from components.train.worker import LocalWorker

    if "manifest" not in ctx:
        raise RuntimeError("needs the shards part's dataset (it failed or was not run)")
    steps = args.warmup + args.steps
    cfg = config.from_dict(TrainConfig, {
        "model_config": args.model, "steps": steps, "batch_size": args.batch, "num_workers": 1,
        "gpus_per_worker": 1 if device.type == "cuda" else 0, "precision": "auto",
        "cpus_per_process": max(1, (os.cpu_count() or 2) - args.loader_workers),
        "loader_workers": args.loader_workers, "loader_prefetch": args.prefetch, "train_crop": args.train_crop,
        "grad_checkpointing": args.grad_checkpointing, "torch_compile": args.compile, "checkpoint_every": steps,
        "log_every": max(1, args.warmup), "optim.warmup_steps": 5, "system_metrics": False, "progress_every_s": 5.0})
    work = Path(ctx["work"])
    worker = LocalWorker(work / "loop-checkpoints", device=device)
    t = time.perf_counter()
    run_worker_loop({"cfg": config.to_dict(cfg), "manifest_uri": ctx["manifest"], "output_uri": str(work / "loop"),
                     "run_id": None, "tracking_uri": None}, worker)
    final = worker.reports[-1]
    if final["step"] != steps or worker.load_state() is None:
        raise RuntimeError(f"expected {steps} steps and a checkpoint, got {final}")
    rate = final["samples_per_s"]
    release(device)
    return {"samples_per_s": rate, "ms_per_step": 1000 * args.batch / max(rate, 1e-9), "data_wait_share": math.nan,
            "peak_mem_gib": math.nan, "loss": final["loss"],
            "note": f"without Ray; x{rate / ctx.get('synthetic', math.nan):.2f} synthetic; wall "
                    f"{time.perf_counter() - t:.0f}s incl. worker start"}


def part_loader(args, device, ctx: dict) -> dict:
    from benchmarks.bench_loader import measure

    if "manifest" not in ctx:
        raise RuntimeError("needs the shards part's dataset (it failed or was not run)")
    bench = argparse.Namespace(workers=args.loader_workers, batch=min(args.batch, 64), prefetch=args.prefetch,
                               rounds=2)
    r = measure("resized", ctx["manifest"], bench)
    return {"ratio": r["ratio"], "note": f"reader {r['reader']:.0f}/s vs decode-and-crop pool {r['limit']:.0f}/s "
            f"= {r['ratio']:.2f} with the default crop (goal >= 0.8; random_resized: {r['ratio_random_resized']:.2f}); "
            f"vs a pool doing the "
            f"reader's work {r['same_work']:.0f}/s = {r['overhead_ratio']:.2f}; {r['bytes']:.0f} B and "
            f"{r['decode_ms']:.2f} ms decode per sample"}


def part_openclip(args, device, ctx: dict) -> dict:
    from benchmarks.bench_vs_openclip import compare

    r = compare(args.model, args.batch, steps=max(2, args.steps // 4), warmup=max(1, args.warmup), rounds=4,
                device=str(device))
    return {"ratio": r["ratio"], "note": f"ours {r['ours']:.0f}/s vs OpenCLIP {r['openclip']:.0f}/s = {r['ratio']:.2f} "
            f"(rounds' median {r['paired_ratio']:.2f}; goal >= 1.2)"}


PARTS = {"synthetic": part_synthetic, "compiled": part_compiled, "accum": part_accum, "shards": part_shards,
         "loop": part_loop, "loader": part_loader, "openclip": part_openclip}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="default: ViT-B-32 on GPU, tiny for --device cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 512 on GPU, 16 for --device cpu")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--corpus", type=int, default=4096, help="JPEGs in the corpus for the shards part")
    ap.add_argument("--source-size", default="500x375", help="size of the corpus's JPEGs before sharding (WxH)")
    ap.add_argument("--loader-workers", type=int, default=max(1, min(14, (os.cpu_count() or 4) - 2)))
    ap.add_argument("--prefetch", type=int, default=2, help="batches each loader worker prepares ahead")
    ap.add_argument("--train-crop", default="random", help="the shards and loop parts' training crop: "
                    "random (the default; no resampling) | random_resized (bicubic per sample)")
    ap.add_argument("--compile", action="store_true", help="shards and loop parts with the compiled step too")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script's code paths (tiny model)")
    args = ap.parse_args()

    import torch

    if args.device == "cpu":
        device, name = torch.device("cpu"), "CPU (dry run)"
    elif not torch.cuda.is_available():
        print("GPU CHECK FAILED: torch.cuda.is_available() is False", flush=True)
        return 2
    else:
        device = torch.device("cuda", 0)
        name = torch.cuda.get_device_name(device)
    args.model = args.model or ("ViT-B-32" if device.type == "cuda" else "tiny")
    args.batch = args.batch or (512 if device.type == "cuda" else 16)
    peak, why = peak_tflops(name, args.peak_tflops)
    from clip_model.config import load_config

    analytic = analytic_forward_flops(load_config(args.model))
    print(f"GPU: {name} | torch {torch.__version__} CUDA {torch.version.cuda} | {os.cpu_count()} CPUs | "
          f"peak {peak:.0f} TFLOP/s ({why})", flush=True)
    print(f"model {args.model}, bf16 autocast, batch {args.batch}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, loader workers {args.loader_workers}, prefetch {args.prefetch}; no Ray (its wheel cannot "
          "travel): the loop part runs the per-worker loop in this process", flush=True)

    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx: dict = {"work": work}
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            fn = PARTS.get(part)
            if fn is None:
                results[part] = "FAIL: unknown part"
                continue
            print(f"== {part}", flush=True)
            t = time.perf_counter()
            try:
                results[part] = fn(args, device, ctx)
                print(f"   PASS in {time.perf_counter() - t:.1f}s", flush=True)
            except Exception as e:  # report every part, fail at the end
                traceback.print_exc()
                results[part] = f"FAIL: {type(e).__name__}: {e}"
                print(f"   FAIL in {time.perf_counter() - t:.1f}s: {results[part]}", flush=True)

    fwd = ctx.get("fwd_flops") or analytic
    train_flops = 3 * fwd
    how = f"counted; analytic {analytic / 1e9:.2f}" if "fwd_flops" in ctx else "analytic"
    print(f"\nFLOPs per sample: forward {fwd / 1e9:.2f} GFLOP ({how}), training = 3 x forward = "
          f"{train_flops / 1e9:.1f} GFLOP")
    print(f"{'part':<10} {'samples/s/GPU':>14} {'ms/step':>9} {'data wait':>10} {'peak mem':>9} {'MFU':>7}  "
          f"{'loss':>6}  notes")
    failed = False
    for part, r in results.items():
        if isinstance(r, str):
            failed = True
            print(f"{part:<10} {r}")
        elif "samples_per_s" in r:
            mfu = r["samples_per_s"] * train_flops / (peak * 1e12)
            print(f"{part:<10} {r['samples_per_s']:>14.1f} {r['ms_per_step']:>9.1f} {r['data_wait_share']:>9.0%} "
                  f"{r['peak_mem_gib']:>8.1f}G {mfu:>7.1%}  {r['loss']:>6.3f}  {r.get('note', '')}")
        else:
            print(f"{part:<10} {'':>14} {'':>9} {'':>10} {'':>9} {'':>7}  {'':>6}  {r['note']}")
    print("GPU CHECK " + ("FAILED" if failed else "PASSED"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
