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

The budget (`TrainConfig.budget`: steps, epochs or samples) is resolved from the manifest's train split
and the world size. The data is read by epochs (every sample once per epoch across all ranks and reader
workers) or resampled (`components.train.sampler`).

A checkpoint (`state.pt` in the reported directory, with a small `meta.json` beside it) holds the model,
optimizer, scheduler and grad scaler state, the step, and the data position (`sampler.DataPosition`: the
epoch, and for every reader of every rank the samples it delivered to training steps, in shard terms as
well). `restore` puts all of it back: after a restart the readers continue exactly where the checkpoint's
steps had left them, so the resumed run trains on the same samples, in the same order and with the same
crops, as an uninterrupted one (the steps after the checkpoint are trained again on the very same batches).
The checkpoint restored is this run's latest (a Ray Train restart or a resubmission: the newer of Ray Train's
registered one and the newest complete one on storage, see `components.train.worker`), else the one
`resume_from` names (another run's, resolved by the driver).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

import torch

from components.train.sampler import DataPosition
from components.train.worker import META_FILE, STATE_FILE, checkpoint_name


def data_layout(cfg: Any, world_size: int, manifest: dict) -> dict:
    """What reader positions are valid for: a checkpoint's positions continue only under the same layout."""
    return {"sampling": cfg.sampling, "world_size": world_size, "loader_workers": max(1, cfg.loader_workers),
            "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "seed": cfg.seed,
            "manifest_content_hash": str(manifest.get("content_hash", ""))}


def restore(state: dict | None, raw_model, optimizer, scheduler, scaler, layout: dict,
            steps_per_epoch: int) -> tuple[int, DataPosition]:
    """Put a checkpoint's state back (model, optimizer, schedule, scaler); -> (the step it was taken at, the
    data position to continue from). No state: step 0 at the start of epoch 0."""
    if state is None:
        return 0, DataPosition(layout=layout)
    raw_model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    step = int(state["step"])
    position = DataPosition.from_dict(state.get("data", {}).get("position"))
    if not position.layout:  # a checkpoint without reader positions: the start of the epoch of its step
        return step, DataPosition(epoch=step // steps_per_epoch if layout["sampling"] == "epochs" else 0,
                                  layout=layout)
    if position.layout != layout:
        changed = {k: (position.layout.get(k), v) for k, v in layout.items() if position.layout.get(k) != v}
        raise ValueError(f"the checkpoint at step {step} was written with another data layout, so its reader positions "
                         f"cannot continue (checkpoint -> now: {changed}); resume with the same settings, or start "
                         "a new run from its weights with init_checkpoint")
    return step, position


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

    cfg = configs.from_dict(TrainConfig, config["cfg"])  # serialised once by the driver, rebuilt once here
    run_worker_loop(config, RayWorker(use_gpu=cfg.use_gpu), cfg)


def run_worker_loop(config: dict[str, Any], worker, cfg: Any = None) -> None:
    """The training loop of one worker (`worker`: `components.train.worker.RayWorker` or `LocalWorker`);
    `cfg`: the TrainConfig the caller already rebuilt from `config["cfg"]` (else it is rebuilt here)."""
    from components.common import config as configs
    from components.common.dataset import load_manifest, load_tokenizer
    from components.common.progress import Progress
    from components.common.tracking import MetricsQueue
    from components.train import attempts
    from components.train.config import TrainConfig
    from components.train.initial_model import initial_model
    from components.train.loader import make_loader
    from components.train.optim import build_optimizer, build_scheduler
    from components.train.train_step import TrainStep

    cfg = cfg if cfg is not None else configs.from_dict(TrainConfig, config["cfg"])
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
    manifest = load_manifest(config["manifest_uri"])
    budget = cfg.budget(int(manifest["splits"]["train"]["samples"]), world_size)
    steps, spe = budget.steps, budget.steps_per_epoch
    model = initial_model(cfg)  # from scratch or init_checkpoint, towers locked
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    model = worker.prepare_model(model)  # to device; DDP when world_size > 1
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = build_optimizer(raw_model, ocfg)
    scheduler = build_scheduler(optimizer, ocfg, steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    layout = data_layout(cfg, world_size, manifest)
    state = load_state(worker, config, world_size)
    start_step, position = restore(state, raw_model, optimizer, scheduler, scaler, layout, spe)
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    samples_seen = start_step * global_batch
    attempts.begin(config, rank, start_step)  # a restart shows: console, MLflow (components/train/attempts.py)
    trainer = TrainStep(model, optimizer, scheduler, scaler, precision, device, cfg.grad_accum, ocfg.grad_clip,
                        compile=cfg.torch_compile)

    # ---- data: this rank's readers from the restored position on (epoch by epoch, or resampled), as uint8
    # batches normalised on the device
    tokenizer = load_tokenizer(manifest["tokenizer"], raw_model.vocab_size, f"model {cfg.model_config!r}")
    loader = make_loader(manifest, "train", tokenizer, raw_model.visual.image_size, cfg.batch_size,
                         train=True, resample=cfg.sampling == "resampled", num_workers=cfg.loader_workers,
                         rank=rank, world_size=world_size, seed=cfg.seed, prefetch=cfg.loader_prefetch,
                         pin_memory=device.type == "cuda", train_crop=cfg.train_crop, grad_accum=cfg.grad_accum,
                         device_resample=device.type == "cuda")
    batches = loader.on_device(device, epoch=position.epoch, start=position.for_rank(rank, max(1, cfg.loader_workers)))

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
    progress = Progress(steps - start_step, "steps", every_s=cfg.progress_every_s,
                        label=f"train rank0{' resumed@' + str(start_step) if start_step else ''}",
                        stream=out) if rank == 0 else None
    nodes = len(set(_gather(worker.node_id, world_size)))  # how many machines the workers span
    if rank == 0:
        print(f"[train] world_size={world_size} on {nodes} node(s) device={device} precision={precision} steps={steps} "
              f"({budget.epochs:.3g} epochs of {spe} steps, {budget.dropped_per_epoch} samples per epoch left out; "
              f"{cfg.sampling}) start_step={start_step} epoch={position.epoch}", file=out, flush=True)

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
                                         "train/samples_seen": samples_seen,
                                         "train/epoch": done / spe})
                progress.update(interval_steps, step=done, loss=last["loss"],
                                samples_s=round(last["samples_per_s"], 1), data_wait_s=interval_wait / interval_steps)
                loss_sum.zero_()
                interval_steps, interval_wait, interval_t0, paused = 0, 0.0, time.perf_counter(), 0.0

            if done % cfg.checkpoint_every == 0 or done == steps:
                t = time.perf_counter()
                data = _position(loader, done, spe, layout, world_size)
                if metrics is not None:  # queued before the end's drain, so it is sent with the rest
                    metrics.add(done, **{"train/shard_read_resumes": data["shard_read_resumes"]})
                if metrics is not None and done == steps:  # the end: drain the queue (bounded), count drops
                    last["metrics_dropped"] = metrics.close()["dropped"]
                elif metrics is not None:
                    metrics.flush()  # bounded, and skipped while the server is down
                data["nodes"] = nodes
                _report(worker, done, start_step, samples_seen, data, config.get("run_id"),
                        raw_model, optimizer, scheduler, scaler, last, throughput)
                paused += time.perf_counter() - t
        if start_step >= steps:  # resubmitted after the run had finished: nothing left to train
            if rank == 0:
                print(f"[train] the latest checkpoint is at step {start_step} >= steps={steps}: nothing to train",
                      file=out, flush=True)
            worker.report({"step": start_step, "resumed_from_step": start_step, "samples_seen": samples_seen,
                           "loss": float("nan"), "samples_per_s": 0.0, "epoch": start_step / spe},
                          None, checkpoint_name(start_step))
    finally:
        if metrics is not None:
            metrics.close(timeout_s=10)  # done already on success; after an error, do not hold up a restart
        if monitor is not None:
            monitor.finish()
    if progress is not None:
        progress.close(loss=last["loss"])


def load_state(worker, config: dict[str, Any], world_size: int) -> dict | None:
    """The state to continue from: this run's latest checkpoint (a restart or a resubmission: Ray Train's
    registered one, or a newer complete one in `config["checkpoints_uri"]`, looked up by rank 0 and the same
    for every rank), else the checkpoint folder `config["resume_from"]` names (another run's), else None."""
    from components.train.worker import latest_checkpoint, read_state_uri

    where = config.get("checkpoints_uri")
    newer = latest_checkpoint(where) if where and worker.rank == 0 else None
    state = worker.load_state(newer=_gather(newer, world_size)[0])
    if state is None and config.get("resume_from"):
        state = read_state_uri(config["resume_from"])
    return state


def _gather(obj: Any, world_size: int) -> list:
    """Every rank's `obj` (a collective: all ranks call it), rank order."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [obj]
    out: list = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _position(loader, done: int, spe: int, layout: dict, world_size: int) -> dict:
    """The data position after `done` steps, every rank's readers gathered (a collective), with where each
    reader stands in shard terms, and the shard reads resumed after storage failures on all ranks."""
    per_rank = _gather((list(loader.positions), sum(loader.resumes)), world_size)
    epochs = layout["sampling"] == "epochs"
    at_epoch_end = epochs and done % spe == 0
    readers = [[0] * len(p) if at_epoch_end else p for p, _ in per_rank]
    position = DataPosition(epoch=done // spe if epochs else 0, readers=readers, layout=layout)
    if epochs:
        r = loader.reader
        position.shards = r.table.shard_positions(r.seed, position.epoch, readers, r.batch_size, r.batches_per_rank)
    return {"position": position.to_dict(), "shard_read_resumes": sum(n for _, n in per_rank)}


def _report(worker, step: int, start_step: int, samples_seen: int, data: dict, run_id: str | None,
            raw_model, optimizer, scheduler, scaler, last: dict, throughput: list[float]) -> None:
    """Every worker reports; rank 0 attaches the checkpoint directory."""
    steady = throughput[1:] or throughput
    report = {"step": step, "resumed_from_step": start_step, "samples_seen": samples_seen,
              "loss": last["loss"], "samples_per_s": sum(steady) / len(steady) if steady else 0.0,
              "metrics_dropped": last.get("metrics_dropped", 0), "epoch": data["position"]["epoch"],
              "shard_read_resumes": data["shard_read_resumes"], "nodes": data["nodes"]}
    name = checkpoint_name(step)
    if worker.rank != 0:
        worker.report(report, None, name)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save({"model": raw_model.state_dict(), "model_config": raw_model.config.to_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "step": step, "run_id": run_id,
                    "data": {"samples_seen": samples_seen, **data}},
                   os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:  # what lineage needs, without loading the state;
            json.dump({"step": step, "run_id": run_id, "samples_seen": samples_seen,  # the state's size tells a
                       "epoch": data["position"]["epoch"],  # whole upload from one cut short
                       "state_bytes": os.path.getsize(os.path.join(tmp, STATE_FILE))}, f)
        worker.report(report, tmp, name)
