"""GPU check of CLIP training: ViT-B/32, bf16, batch 256 on one GPU (run through gpu_check.sh).

Parts (each reports PASS/FAIL; the exit status is non-zero if any failed):
  synthetic  random tensors already on the GPU -> TrainStep (the loop's own step: bf16 autocast,
             ClipLoss, AdamW fused, grad clipping, logit-scale clamp), in this process without Ray:
             the model's ceiling;
  shards     a synthetic shape corpus written with the project's own shard stage to a local dir,
             streamed through components.train.loader.make_loader with DataLoader workers -> the same
             step, in this process without Ray;
  ray        components.train.stage.train (Ray Train TorchTrainer, 1 GPU worker, checkpoints, MLflow to
             a local sqlite store) on those shards; checks the steps, checkpoint and model file.

Printed: samples/s/GPU, ms/step, peak memory, data-wait share and the fraction of peak FLOP/s
(model FLOPs per training sample = 3 x forward FLOPs, counted with torch.utils.flop_counter and
cross-checked with an analytic count; peak 989 TFLOP/s dense bf16 for H100/H200 SXM unless
--peak-tflops is given).
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


def build_step(args, device):
    import torch

    from clip_model.model import build_model
    from components.common import config
    from components.train.config import OptimConfig
    from components.train.train_step import TrainStep
    from components.train.optim import build_optimizer, build_scheduler

    torch.manual_seed(0)
    model = build_model(args.model).to(device)
    model.set_grad_checkpointing(args.grad_checkpointing)
    ocfg = config.from_dict(OptimConfig, {"lr": 5e-4, "warmup_steps": 10})
    opt = build_optimizer(model, ocfg, fused=device.type == "cuda")
    step = TrainStep(model, opt, build_scheduler(opt, ocfg, 10_000), torch.amp.GradScaler(device.type, enabled=False),
                     "bf16", device, grad_accum=1, grad_clip=1.0, compile=args.compile)
    model.train()
    return model, step


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batches, args, label: str, device) -> dict:
    import torch

    cuda = device.type == "cuda"
    t = time.perf_counter()
    for _ in range(args.warmup):
        loss, _ = step.step(batches)
    sync(device)
    print(f"  [{label}] warm-up ({args.warmup} steps{', compile' if args.compile else ''}) "
          f"{time.perf_counter() - t:.1f}s, loss {loss.item():.3f}", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wait = 0.0
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss, w = step.step(batches)
        wait += w
    sync(device)
    elapsed = time.perf_counter() - t0
    loss_value = loss.item()
    if not math.isfinite(loss_value):
        raise RuntimeError(f"[{label}] loss is {loss_value}")
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else float("nan")
    return {"samples_per_s": args.steps * args.batch / elapsed, "ms_per_step": 1000 * elapsed / args.steps,
            "data_wait_share": wait / elapsed, "peak_mem_gib": peak_mem, "loss": loss_value}


def part_synthetic(args, device, ctx: dict) -> dict:
    import torch

    model, step = build_step(args, device)
    ctx["fwd_flops"] = counted_forward_flops(model, device)
    s = model.visual.image_size
    images = torch.randn(args.batch, 3, s, s, device=device)
    tokens = torch.randint(1, model.vocab_size - 2, (args.batch, model.context_length), device=device)
    tokens[:, 20] = model.vocab_size - 1  # end of text: the largest id
    tokens[:, 21:] = 0

    def forever():
        while True:
            yield images, tokens

    out = timed(step, forever(), args, "synthetic", device)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def part_shards(args, device, ctx: dict) -> dict:
    import torch

    from components.common.dataset import load_manifest, load_tokenizer
    from components.train.loader import make_loader
    from tests.fixtures_data import make_shards

    t = time.perf_counter()
    manifest_path = make_shards(Path(ctx["work"]), n=args.corpus, samples_per_shard=256, size=256,
                                num_threads=max(1, (os.cpu_count() or 2) - 2), fmt="JPEG")
    ctx["manifest"] = manifest_path
    print(f"  [shards] corpus of {args.corpus} images sharded in {time.perf_counter() - t:.1f}s", flush=True)
    model, step = build_step(args, device)
    m = load_manifest(manifest_path)
    loader = make_loader(m, "train", load_tokenizer(m["tokenizer"]), model.visual.image_size, args.batch,
                         train=True, resample=True, num_workers=args.loader_workers, seed=0)
    out = timed(step, iter(loader), args, "shards", device)
    del model, step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def part_ray(args, device, ctx: dict) -> dict:
    import mlflow

    from clip_model.checkpoint import load_model
    from components.common import config
    from components.common.ray_runtime import ray_session
    from components.common.tracking import TrackingConfig
    from components.train.config import TrainConfig
    from components.train.stage import train

    if "manifest" not in ctx:
        raise RuntimeError("needs the shards part's corpus (it failed)")
    work = Path(ctx["work"])
    uri = f"sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("gpu-check", artifact_location=str(work / "mlartifacts"))
    steps = args.warmup + args.steps
    cpus = max(2, (os.cpu_count() or 4) - 2)
    gpu = device.type == "cuda"
    # one training process: 1 worker with 1 GPU (or 1 CPU worker in the dry run), `cpus` CPUs for it
    cfg = config.from_dict(TrainConfig, {
        "model_config": args.model, "steps": steps, "batch_size": args.batch, "num_workers": 1,
        "gpus_per_worker": 1 if gpu else 0, "cpus_per_process": cpus, "precision": "bf16",
        "loader_workers": args.loader_workers, "grad_checkpointing": args.grad_checkpointing,
        "torch_compile": args.compile, "checkpoint_every": steps, "keep_checkpoints": 1,
        "log_every": max(1, args.warmup), "optim.warmup_steps": 5, "run_name": "gpu-check",
        "progress_every_s": 5.0})
    with ray_session(num_cpus=cpus + 1, num_gpus=1 if gpu else None):
        t = time.perf_counter()
        tracking = TrackingConfig(tracking_uri=uri, experiment="gpu-check")
        res = train(ctx["manifest"], str(work / "ray-out"), cfg, tracking)
    wall = time.perf_counter() - t
    if res["steps"] != steps:
        raise RuntimeError(f"expected {steps} steps, result says {res['steps']}")
    model = load_model(res["model_uri"])
    print(f"  [ray] model file loads ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params), "
          f"checkpoint {res['checkpoint_uri']}, wall {wall:.1f}s incl. Ray start-up", flush=True)
    return {"samples_per_s": res["samples_per_s"], "ms_per_step": 1000 * args.batch / max(res["samples_per_s"], 1e-9),
            "data_wait_share": float("nan"), "peak_mem_gib": float("nan"), "loss": res["final_loss"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--corpus", type=int, default=4096, help="images in the synthetic corpus for the shards part")
    ap.add_argument("--loader-workers", type=int, default=max(1, min(12, (os.cpu_count() or 4) - 3)))
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (adds ~1 min)")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--parts", default="synthetic,shards,ray")
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
    peak, why = peak_tflops(name, args.peak_tflops)
    from clip_model.config import load_config

    analytic = analytic_forward_flops(load_config(args.model))
    print(f"GPU: {name} | torch {torch.__version__} CUDA {torch.version.cuda} | {os.cpu_count()} CPUs | "
          f"peak {peak:.0f} TFLOP/s ({why})", flush=True)
    print(f"model {args.model}, bf16 autocast, batch {args.batch}, {args.steps} timed steps after {args.warmup} "
          f"warm-up, loader workers {args.loader_workers}", flush=True)

    results: dict[str, dict | str] = {}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx: dict = {"work": work}
        for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
            fn = {"synthetic": part_synthetic, "shards": part_shards, "ray": part_ray}.get(part)
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
    print(f"\nFLOPs per sample: forward {fwd / 1e9:.2f} GFLOP "
          f"({'counted' if 'fwd_flops' in ctx else 'analytic'}; analytic {analytic / 1e9:.2f}), "
          f"training = 3 x forward = {train_flops / 1e9:.1f} GFLOP")
    print(f"{'part':<10} {'samples/s/GPU':>14} {'ms/step':>9} {'data wait':>10} {'peak mem':>9} {'MFU':>7}  loss")
    failed = False
    for part, r in results.items():
        if isinstance(r, str):
            failed = True
            print(f"{part:<10} {r}")
            continue
        mfu = r["samples_per_s"] * train_flops / (peak * 1e12)
        print(f"{part:<10} {r['samples_per_s']:>14.1f} {r['ms_per_step']:>9.1f} {r['data_wait_share']:>9.0%} "
              f"{r['peak_mem_gib']:>8.1f}G {mfu:>7.1%}  {r['loss']:.3f}")
    print("GPU CHECK " + ("FAILED" if failed else "PASSED"), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
