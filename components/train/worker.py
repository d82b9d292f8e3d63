"""Where the per-worker training loop runs: under Ray Train, or in a plain process without Ray.

`components.train.loop.run_worker_loop(config, worker)` needs five things from its surroundings: its
rank and the world size, its device, the state of the latest checkpoint, the model made ready for
that world (DDP), and a way to report metrics with an optional checkpoint directory.

Which checkpoint is the latest: Ray Train hands a restarted group only the checkpoints its controller
*registered*, and it registers one when a poll (every 2 s) has collected that report from every rank. A
checkpoint can be complete on storage and not registered yet: a node lost in that gap made the group restart
from an older checkpoint, or from step 0 (seen on a loaded machine with checkpoints 4 steps apart). So the
state restored is the newer of Ray Train's registered checkpoint and the newest *complete* checkpoint folder
of the run on storage (`latest_checkpoint`: its `meta.json` records the size of its `state.pt`, and the
stored `state.pt` has that size; the folder's files are uploaded one by one, so either can be there alone).

- `RayWorker`: `ray.train` (what `train_loop_per_worker`, the TorchTrainer's function, uses);
- `LocalWorker`: one process, rank 0 of 1, no Ray: checkpoints are copied to `<directory>/<name>/`
  and the latest one is resumed. The GPU check runs the loop this way (Ray's wheel cannot travel
  to the GPU machine), and so can anyone who wants the loop without a cluster.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # beside the state: step, MLflow run id, samples seen, epoch, state_bytes (its size)
CHECKPOINT_PREFIX = "checkpoint_"  # checkpoint folders are checkpoint_<step, 8 digits>


def read_state(directory: str | Path) -> dict:
    """The training state (`state.pt`) in a checkpoint directory."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def read_state_uri(checkpoint_uri: str) -> dict:
    """The training state of a checkpoint folder anywhere (local or s3://)."""
    import io

    from components.common import storage

    data = storage.read_bytes(storage.join(checkpoint_uri, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint taken after `step` steps (names sort by step)."""
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def checkpoint_step(path: str) -> int:
    """The step of a checkpoint folder (path or URI ending in `checkpoint_<step>`)."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    if not re.fullmatch(CHECKPOINT_PREFIX + r"\d+", name):
        raise ValueError(f"{path!r} is not a checkpoint folder (its name is not {CHECKPOINT_PREFIX}<step>)")
    return int(name[len(CHECKPOINT_PREFIX):])


def _step_or_none(path: str) -> int | None:
    try:
        return checkpoint_step(path)
    except ValueError:
        return None


def latest_checkpoint(uri: str) -> str | None:
    """The newest complete checkpoint folder at `uri` (local or s3://): `uri` itself when it holds a state,
    else its newest `checkpoint_*` subfolder whose `meta.json` is there and whose `state.pt` has the size that
    records (folders written before `state_bytes` was recorded: their `state.pt` is there); None when none is."""
    from components.common import storage

    if storage.exists(storage.join(uri, STATE_FILE)):
        return uri.rstrip("/")
    files = dict(storage.list_sizes(uri))
    names = {f.rsplit("/", 2)[-2] for f in files if f.endswith("/" + STATE_FILE)}
    for name in sorted((n for n in names if _step_or_none(n) is not None), reverse=True):
        folder = storage.join(uri, name)
        meta_uri = storage.join(folder, META_FILE)
        if meta_uri not in files:
            continue  # still being uploaded (its folder's files go one by one)
        try:
            expected = storage.read_json(meta_uri).get("state_bytes")
        except ValueError:  # a meta.json cut short
            continue
        if expected is None or files[storage.join(folder, STATE_FILE)] == expected:
            return folder
    return None


class RayWorker:
    """The loop's surroundings under Ray Train (TorchTrainer)."""

    def __init__(self, use_gpu: bool) -> None:
        import ray
        import ray.train
        import ray.train.torch

        self._train, self._torch = ray.train, ray.train.torch
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
        self.node_id = ray.get_runtime_context().get_node_id()  # the Ray node this worker runs on

    def load_state(self, newer: str | None = None) -> dict | None:
        """The state of Ray Train's latest registered checkpoint, or of `newer` (a complete checkpoint folder
        of this run on storage, `latest_checkpoint`) when that one was taken at a later step (a registered folder
        not named by its step, not this loop's, is taken as it is)."""
        checkpoint = self._train.get_checkpoint()
        registered = -1 if checkpoint is None else _step_or_none(checkpoint.path)
        if newer and registered is not None and checkpoint_step(newer) > registered:
            if self.rank == 0:
                import sys

                print(f"[train] restoring {newer}: complete on storage, newer than the checkpoint Ray Train had "
                      f"registered ({checkpoint.path if checkpoint else 'none'})", file=sys.__stdout__, flush=True)
            return read_state_uri(newer)
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return read_state(d)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return self._torch.prepare_model(model)  # to the device; DDP when world_size > 1

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        from ray.train import Checkpoint

        checkpoint = Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)


class LocalWorker:
    """The loop's surroundings in this process, without Ray: rank 0 of 1 on `device`. Checkpoints are
    copied to `<directory>/<name>/` (the newest `keep` are kept); `load_state` resumes the latest.
    `reports` collects every reported metrics dict."""

    rank, world_size, node_id = 0, 1, "local"

    def __init__(self, directory: str | Path, device: torch.device | str = "cpu", keep: int = 1) -> None:
        self.directory, self.device, self.keep = Path(directory), torch.device(device), keep
        self.reports: list[dict[str, Any]] = []

    def _checkpoints(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.iterdir() if (p / STATE_FILE).is_file())

    def load_state(self, newer: str | None = None) -> dict | None:
        """The newest checkpoint in the directory (`newer`: unused, every one here is already known)."""
        found = self._checkpoints()
        return read_state(found[-1]) if found else None

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None, name: str) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir:
            dst = self.directory / name
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(checkpoint_dir, dst)
            for old in self._checkpoints()[:-self.keep]:
                shutil.rmtree(old)
