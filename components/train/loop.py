"""The per-worker training loop run by Ray Train's TorchTrainer (one process per worker).

Everything the loop needs comes in through its `config` dict (built by `components.train.stage.train`):
the TrainConfig as a dict, the manifest and output URIs, and the MLflow run to log into. Rank 0
queues metrics for MLflow (`MetricsQueue`: a background thread sends them; training never waits on the
tracking server), prints progress lines (Ray forwards them to the driver) and writes the
checkpoints; every worker calls `ray.train.report` the same number of times (once per checkpoint).

A checkpoint (`state.pt` in the reported directory) holds the model, optimizer, scheduler and
grad scaler state, the step, and the data position: the number of samples consumed and the
resample epoch. The training stream is an endless resample of the shards; after a restart the loop
opens a fresh epoch of it (a new seed) so it continues with other samples instead of replaying the
ones it has already seen.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

STATE_FILE = "state.pt"


def _seed_for(base_seed: int, data_epoch: int) -> int:
    return (base_seed * 1_000_003 + data_epoch * 7919) % (2 ** 31 - 1)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class TrainStep:
    """One optimizer step of CLIP training: `grad_accum` micro-batches (DDP gradient sync only on the
    last), autocast in bf16/fp16 (fp16 with a GradScaler), loss in fp32 over features gathered
    across workers, gradient clipping, AdamW, the lr schedule, and the logit scale clamped to ln(100).

    `model` may be DDP-wrapped (from `ray.train.torch.prepare_model`) or a plain CLIP."""

    def __init__(self, model: torch.nn.Module, optimizer, scheduler, scaler, precision: str,
                 device: torch.device, grad_accum: int = 1, grad_clip: float | None = None,
                 compile: bool = False) -> None:
        from clip_model.loss import ClipLoss

        self.model = model
        self.raw_model = model.module if hasattr(model, "module") else model
        self.forward = torch.compile(model) if compile else model
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.precision, self.device = precision, device
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)

    def step(self, batches: Iterator) -> tuple[torch.Tensor, float]:
        """-> (the step's loss as a detached tensor, seconds spent waiting for data)."""
        from components.train.optim import clamp_logit_scale

        wait = 0.0
        total = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            t = time.perf_counter()
            images, tokens = next(batches)
            wait += time.perf_counter() - t
            images = images.to(self.device, non_blocking=True)
            tokens = tokens.to(self.device, non_blocking=True)
            inner = micro < self.grad_accum - 1 and hasattr(self.model, "no_sync")
            with (self.model.no_sync() if inner else nullcontext()):
                with _autocast(self.precision, self.device):
                    image_f, text_f, scale = self.forward(images, tokens)
                loss = self.loss_fn(image_f.float(), text_f.float(), scale.float()) / self.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        clamp_logit_scale(self.raw_model)
        return total, wait


def _maybe_inject_failure(cfg: Any, step: int, rank: int, world_size: int, output_uri: str) -> None:
    """Test hook: with `fail_at_step`, the last worker raises once when it reaches that step. A marker
    file under the output URI makes the failure happen on the first attempt only."""
    if cfg.fail_at_step is None or step != cfg.fail_at_step or rank != world_size - 1:
        return
    from components.common import storage

    marker = storage.join(output_uri, f"_injected_failure_step{step}.marker")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"worker {rank} failed on purpose at step {step}\n")
    raise RuntimeError(f"injected failure (fail_at_step={step}) on worker rank {rank}")


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from components.common import config as configs
    from components.common.dataset import load_manifest, load_tokenizer
    from components.common.progress import Progress
    from components.common.tracking import MetricsQueue
    from components.train.config import TrainConfig
    from components.train.init import initial_model
    from components.train.loader import make_loader
    from components.train.optim import build_optimizer, build_scheduler

    cfg = configs.from_dict(TrainConfig, config["cfg"])
    ocfg = cfg.optim
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.cpus_per_process)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers (loss, optimizer) use TF32
        torch.backends.cudnn.allow_tf32 = True
    precision = cfg.resolved_precision()
    torch.manual_seed(cfg.seed + rank)

    # ---- model, optimizer, schedule, scaler (restored from the latest checkpoint if any)
    model = initial_model(cfg)  # from scratch or init_checkpoint, towers locked
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
    model = ray.train.torch.prepare_model(model)  # to device; DDP when world_size > 1
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(raw_model, ocfg, fused=device.type == "cuda")
    scheduler = build_scheduler(optimizer, ocfg, cfg.steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    start_step, samples_seen, data_epoch = 0, 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_step = int(state["step"])
        samples_seen = int(state["data"]["samples_seen"])
        data_epoch = int(state["data"]["epoch"]) + 1
    trainer = TrainStep(model, optimizer, scheduler, scaler, precision, device, cfg.grad_accum, ocfg.grad_clip,
                        compile=cfg.torch_compile)

    # ---- data: every worker streams its own resampled split of the shards (never runs dry)
    manifest = load_manifest(config["manifest_uri"])
    tokenizer = load_tokenizer(manifest["tokenizer"], raw_model.vocab_size, f"model {cfg.model_config!r}")
    data_seed = _seed_for(cfg.seed, data_epoch)
    loader = make_loader(manifest, "train", tokenizer, raw_model.visual.image_size, cfg.batch_size,
                             train=True, resample=True, num_workers=cfg.loader_workers, rank=rank,
                             world_size=world_size, seed=data_seed)
    batches = iter(loader)

    # ---- rank-0 bookkeeping: MLflow metrics, system metrics, progress lines
    metrics = MetricsQueue(config.get("tracking_uri"), config["run_id"]) if rank == 0 and config.get("run_id") else None
    monitor = None
    if rank == 0 and config.get("run_id") and cfg.system_metrics:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(config["run_id"], sampling_interval=5, resume_logging=state is not None,
                                       tracking_uri=config.get("tracking_uri"))
        monitor.start()
    # Ray Train patches print() and tees it when stdout is wrapped, doubling every line: write to the
    # process's real stdout (which Ray forwards to the driver) instead.
    out = sys.__stdout__
    progress = Progress(cfg.steps - start_step, "steps", every_s=cfg.progress_every_s,
                        label=f"train rank0{' resumed@' + str(start_step) if start_step else ''}",
                        stream=out) if rank == 0 else None
    if rank == 0:
        print(f"[train] world_size={world_size} device={device} precision={precision} start_step={start_step} "
              f"samples_seen={samples_seen} data_epoch={data_epoch}", file=out, flush=True)

    steps, global_batch = cfg.steps, cfg.batch_size * cfg.grad_accum * world_size
    loss_sum = torch.zeros((), device=device)
    interval_steps, interval_wait, interval_t0 = 0, 0.0, time.perf_counter()
    paused = 0.0  # seconds spent checkpointing in the current interval (not training throughput)
    throughput: list[float] = []
    last = {"loss": float("nan"), "samples_per_s": 0.0}
    try:
        model.train()
        for step in range(start_step, steps):
            loss, wait = trainer.step(batches)
            loss_sum += loss
            samples_seen += global_batch
            done = step + 1
            interval_steps += 1
            interval_wait += wait
            _maybe_inject_failure(cfg, done, rank, world_size, config["output_uri"])

            if rank == 0 and (done % cfg.log_every == 0 or done == steps):
                elapsed = time.perf_counter() - interval_t0 - paused
                last = {"loss": loss_sum.item() / interval_steps,
                        "samples_per_s": interval_steps * global_batch / max(elapsed, 1e-9)}
                throughput.append(last["samples_per_s"])
                if metrics is not None:  # queued: sent by a background thread, never waited on here
                    metrics.add(done, **{"train/loss": last["loss"], "train/lr": scheduler.get_last_lr()[0],
                                         "train/logit_scale": raw_model.logit_scale.exp().item(),
                                         "train/samples_per_s": last["samples_per_s"],
                                         "train/data_wait_s": interval_wait / interval_steps,
                                         "train/samples_seen": samples_seen})
                progress.update(interval_steps, step=done, loss=last["loss"],
                                samples_s=round(last["samples_per_s"], 1), data_wait_s=interval_wait / interval_steps)
                loss_sum.zero_()
                interval_steps, interval_wait, interval_t0, paused = 0, 0.0, time.perf_counter(), 0.0
            elif rank != 0 and done % cfg.log_every == 0:
                loss_sum.zero_()

            if done % cfg.checkpoint_every == 0 or done == steps:
                t = time.perf_counter()
                if metrics is not None and done == steps:  # the end: drain the queue (bounded), count drops
                    last["metrics_dropped"] = metrics.close()["dropped"]
                elif metrics is not None:
                    metrics.flush()  # bounded, and skipped while the server is down
                _report(ray.train, Checkpoint, rank, done, start_step, samples_seen, data_epoch, data_seed,
                        raw_model, optimizer, scheduler, scaler, last, throughput)
                paused += time.perf_counter() - t
        if start_step >= steps:  # resubmitted after the run had finished: nothing left to train
            if rank == 0:
                print(f"[train] the latest checkpoint is at step {start_step} >= steps={steps}: nothing to train",
                      file=out, flush=True)
            ray.train.report({"step": start_step, "resumed_from_step": start_step, "samples_seen": samples_seen,
                              "loss": float("nan"), "samples_per_s": 0.0})
    finally:
        if metrics is not None:
            metrics.close(timeout_s=10)  # done already on success; after an error, do not hold up a restart
        if monitor is not None:
            monitor.finish()
    if progress is not None:
        progress.close(loss=last["loss"])


def _report(train_api, checkpoint_cls, rank: int, step: int, start_step: int, samples_seen: int,
            data_epoch: int, data_seed: int, raw_model, optimizer, scheduler, scaler, last: dict,
            throughput: list[float]) -> None:
    """Every worker reports; rank 0 attaches the checkpoint directory."""
    steady = throughput[1:] or throughput
    report = {"step": step, "resumed_from_step": start_step, "samples_seen": samples_seen,
              "loss": last["loss"], "samples_per_s": sum(steady) / len(steady) if steady else 0.0,
              "metrics_dropped": last.get("metrics_dropped", 0)}
    name = f"checkpoint_{step:08d}"
    if rank != 0:
        train_api.report(report, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": raw_model.state_dict(), "model_config": raw_model.config.to_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step,
                    "data": {"samples_seen": samples_seen, "epoch": data_epoch, "seed": data_seed}},
                   os.path.join(tmp, STATE_FILE))
        train_api.report(report, checkpoint=checkpoint_cls.from_directory(tmp), checkpoint_dir_name=name)
