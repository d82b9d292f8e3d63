"""The per-worker training loop run by Ray Train's TorchTrainer (one process per worker).

Everything the loop needs comes in through its `config` dict (built by `components.train.stage.train`):
the TrainConfig as a dict, the manifest and output URIs, and the MLflow run to log into. Rank 0
queues metrics for MLflow (`MetricsQueue`: a background thread sends them; training never waits on the
tracking server), prints progress lines (Ray forwards them to the driver) and writes the
checkpoints; every worker calls `ray.train.report` the same number of times (once per checkpoint).
`train_loop_per_worker(config)` is the TorchTrainer's function; `run_worker_loop(config, worker)` is
the same loop with its surroundings given (`components.train.worker`: Ray Train, or one process
without Ray).

Steps do not wait for the device: the loss is summed on the device and read (with the other metrics)
every `log_every` steps, and metrics go to MLflow without blocking the loop.

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
from typing import Any

import torch

from components.train.worker import STATE_FILE


def _seed_for(base_seed: int, data_epoch: int) -> int:
    return (base_seed * 1_000_003 + data_epoch * 7919) % (2 ** 31 - 1)


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
    """The TorchTrainer's function: the loop under Ray Train."""
    from components.common import config as configs
    from components.train.config import TrainConfig
    from components.train.worker import RayWorker

    run_worker_loop(config, RayWorker(use_gpu=configs.from_dict(TrainConfig, config["cfg"]).use_gpu))


def run_worker_loop(config: dict[str, Any], worker) -> None:
    """The training loop of one worker (`worker`: `components.train.worker.RayWorker` or `LocalWorker`)."""
    from components.common import config as configs
    from components.common.dataset import load_manifest, load_tokenizer
    from components.common.progress import Progress
    from components.common.tracking import MetricsQueue
    from components.train import attempts
    from components.train.config import TrainConfig
    from components.train.init import initial_model
    from components.train.loader import make_loader
    from components.train.optim import build_optimizer, build_scheduler
    from components.train.train_step import TrainStep

    cfg = configs.from_dict(TrainConfig, config["cfg"])
    ocfg = cfg.optim
    rank, world_size, device = worker.rank, worker.world_size, worker.device
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
    state = worker.load_state()
    if state is not None:
        model.load_state_dict(state["model"])
    model = worker.prepare_model(model)  # to device; DDP when world_size > 1
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(raw_model, ocfg)
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
    attempts.begin(config, rank, start_step)  # a restart shows: console, MLflow (components/train/attempts.py)
    trainer = TrainStep(model, optimizer, scheduler, scaler, precision, device, cfg.grad_accum, ocfg.grad_clip,
                        compile=cfg.torch_compile)

    # ---- data: every worker streams its own resampled split of the shards (never runs dry), as uint8
    # batches normalised on the device
    manifest = load_manifest(config["manifest_uri"])
    tokenizer = load_tokenizer(manifest["tokenizer"], raw_model.vocab_size, f"model {cfg.model_config!r}")
    data_seed = _seed_for(cfg.seed, data_epoch)
    loader = make_loader(manifest, "train", tokenizer, raw_model.visual.image_size, cfg.batch_size,
                         train=True, resample=True, num_workers=cfg.loader_workers, rank=rank,
                         world_size=world_size, seed=data_seed, prefetch=cfg.loader_prefetch,
                         pin_memory=device.type == "cuda", train_crop=cfg.train_crop)
    batches = loader.on_device(device)

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
            if rank == 0:  # only rank 0 reads it
                loss_sum += loss
            samples_seen += global_batch
            done = step + 1
            interval_steps += 1
            interval_wait += wait
            _maybe_inject_failure(cfg, done, rank, world_size, config["output_uri"])

            if rank == 0 and (done % cfg.log_every == 0 or done == steps):
                loss_value = loss_sum.item() / interval_steps  # waits for the device: the interval's work is done
                elapsed = time.perf_counter() - interval_t0 - paused
                last = {"loss": loss_value, "samples_per_s": interval_steps * global_batch / max(elapsed, 1e-9)}
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

            if done % cfg.checkpoint_every == 0 or done == steps:
                t = time.perf_counter()
                if metrics is not None and done == steps:  # the end: drain the queue (bounded), count drops
                    last["metrics_dropped"] = metrics.close()["dropped"]
                elif metrics is not None:
                    metrics.flush()  # bounded, and skipped while the server is down
                _report(worker, done, start_step, samples_seen, data_epoch, data_seed,
                        raw_model, optimizer, scheduler, scaler, last, throughput)
                paused += time.perf_counter() - t
        if start_step >= steps:  # resubmitted after the run had finished: nothing left to train
            if rank == 0:
                print(f"[train] the latest checkpoint is at step {start_step} >= steps={steps}: nothing to train",
                      file=out, flush=True)
            worker.report({"step": start_step, "resumed_from_step": start_step, "samples_seen": samples_seen,
                           "loss": float("nan"), "samples_per_s": 0.0}, None, f"checkpoint_{start_step:08d}")
    finally:
        if metrics is not None:
            metrics.close(timeout_s=10)  # done already on success; after an error, do not hold up a restart
        if monitor is not None:
            monitor.finish()
    if progress is not None:
        progress.close(loss=last["loss"])


def _report(worker, step: int, start_step: int, samples_seen: int,
            data_epoch: int, data_seed: int, raw_model, optimizer, scheduler, scaler, last: dict,
            throughput: list[float]) -> None:
    """Every worker reports; rank 0 attaches the checkpoint directory."""
    steady = throughput[1:] or throughput
    report = {"step": step, "resumed_from_step": start_step, "samples_seen": samples_seen,
              "loss": last["loss"], "samples_per_s": sum(steady) / len(steady) if steady else 0.0,
              "metrics_dropped": last.get("metrics_dropped", 0)}
    name = f"checkpoint_{step:08d}"
    if worker.rank != 0:
        worker.report(report, None, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": raw_model.state_dict(), "model_config": raw_model.config.to_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step,
                    "data": {"samples_seen": samples_seen, "epoch": data_epoch, "seed": data_seed}},
                   os.path.join(tmp, STATE_FILE))
        worker.report(report, tmp, name)
