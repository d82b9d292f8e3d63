"""Training throughput on CPU: Ray Train (components.train.stage.train, 1 worker) against a plain
single-process PyTorch loop with the same model, batch, data reader and training step.

    .venv/bin/python benchmarks/bench_train.py [--models tiny:32:12:3,ViT-B-32:4:3:1] [--threads 2]

Each model is MODEL:BATCH:STEPS:WARMUP (timed steps after warm-up steps). ViT-B/32 does about
0.5 samples/s on 2 loaded CPU cores, so it gets a small batch and few steps.

Both sides read the same synthetic shards through components.train.loader.make_loader and run the same
TrainStep (fp32 on CPU). Printed per model: samples/s of the plain loop, of the Ray Train loop in
steady state (rank 0's own measurement, first logging interval excluded) and end to end (including
Ray worker start-up, checkpoints and model export), and the ratios = the framework's overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def plain_loop(manifest: str, model_name: str, batch: int, steps: int, warmup: int, threads: int) -> float:
    """Samples/s of a single-process loop: no Ray, no DDP, no checkpoints, no MLflow."""
    import torch

    from clip_model.model import build_model
    from components.common import config
    from components.common.dataset import load_manifest, load_tokenizer
    from components.train.config import OptimConfig
    from components.train.loader import make_loader
    from components.train.train_step import TrainStep
    from components.train.optim import build_optimizer, build_scheduler

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(model_name)
    ocfg = config.from_dict(OptimConfig, {"lr": 5e-4, "warmup_steps": 2})
    opt = build_optimizer(model, ocfg)
    step = TrainStep(model, opt, build_scheduler(opt, ocfg, steps + warmup), torch.amp.GradScaler("cpu", enabled=False),
                     "fp32", torch.device("cpu"), grad_accum=1, grad_clip=1.0)
    m = load_manifest(manifest)
    batches = make_loader(m, "train", load_tokenizer(m["tokenizer"]), model.visual.image_size, batch,
                          train=True, resample=True, num_workers=0).on_device("cpu")
    model.train()
    for _ in range(warmup):
        step.step(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
        loss, _ = step.step(batches)
    loss.item()
    return steps * batch / (time.perf_counter() - t0)


def ray_loop(manifest: str, model_name: str, batch: int, steps: int, warmup: int, threads: int,
             work: Path) -> tuple[float, float]:
    """(steady samples/s, end-to-end samples/s) of components.train.stage.train with one worker."""
    import mlflow

    from components.common import config
    from components.common.tracking import TrackingConfig
    from components.train.config import TrainConfig
    from components.train.stage import train

    uri = f"sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("bench-train") is None:
        mlflow.create_experiment("bench-train", artifact_location=str(work / "artifacts"))
    total = steps + warmup
    cfg = config.from_dict(TrainConfig, {
        "model_config": model_name, "steps": total, "batch_size": batch, "num_workers": 1, "gpus_per_worker": 0,
        "cpus_per_process": threads, "loader_workers": 0, "checkpoint_every": total, "keep_checkpoints": 1,
        "log_every": max(1, warmup), "optim.warmup_steps": 2, "run_name": f"bench-{model_name}",
        "system_metrics": False})
    t0 = time.perf_counter()
    tracking = TrackingConfig(tracking_uri=uri, experiment="bench-train")
    res = train(manifest, str(work / f"out-{model_name}"), cfg, tracking)
    end_to_end = total * batch / (time.perf_counter() - t0)
    return res["samples_per_s"], end_to_end


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny:32:12:3,ViT-B-32:4:3:1", help="comma-separated MODEL:BATCH:STEPS:WARMUP")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (plain) = CPUs of the Ray worker")
    args = ap.parse_args()

    from components.common.ray_runtime import ray_session
    from tests.fixtures_data import make_shards

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        t = time.perf_counter()
        manifest = make_shards(work, n=512, samples_per_shard=64, size=128)
        print(f"shards ready in {time.perf_counter() - t:.1f}s", flush=True)
        rows = []
        with ray_session(num_cpus=args.threads + 1):  # one local Ray for every model; train() joins it
            for item in args.models.split(","):
                name, batch, steps, warmup = item.split(":")
                batch, steps, warmup = int(batch), int(steps), int(warmup)
                # plain before and after the Ray run, best of the two: the machine may be shared
                plain = plain_loop(manifest, name, batch, steps, warmup, args.threads)
                print(f"[{name} b={batch}] plain loop: {plain:.1f} samples/s", flush=True)
                steady, e2e = ray_loop(manifest, name, batch, steps, warmup, args.threads, work)
                print(f"[{name} b={batch}] Ray Train: {steady:.1f} samples/s steady, {e2e:.1f} end to end", flush=True)
                plain = max(plain, plain_loop(manifest, name, batch, steps, warmup, args.threads))
                rows.append((name, batch, plain, steady, e2e))

    print("\nmodel       batch  plain s/s  ray steady s/s  ray/plain  ray end-to-end s/s  e2e/plain")
    for name, batch, plain, steady, e2e in rows:
        print(f"{name:<11} {batch:>5}  {plain:>9.1f}  {steady:>14.1f}  {steady / plain:>9.2f}  "
              f"{e2e:>18.1f}  {e2e / plain:>9.2f}")
    print(f"(CPU, {args.threads} threads, {os.cpu_count()} cores visible; steady = rank 0's own timing, "
          "e2e includes Ray start-up, checkpoint and model export)")


if __name__ == "__main__":
    main()
