"""Where the per-worker training loop runs: under Ray Train, or in a plain process without Ray.

`components.train.loop.run_worker_loop(config, worker)` needs five things from its surroundings: its
rank and the world size, its device, the state of the latest checkpoint, the model made ready for
that world (DDP), and a way to report metrics with an optional checkpoint directory.

- `RayWorker`: `ray.train` (what `train_loop_per_worker`, the TorchTrainer's function, uses);
- `LocalWorker`: one process, rank 0 of 1, no Ray: checkpoints are copied to `<directory>/<name>/`
  and the latest one is resumed. The GPU check runs the loop this way (Ray's wheel cannot travel
  to the GPU machine), and so can anyone who wants the loop without a cluster.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"  # beside the state: step, MLflow run id, samples seen, epoch (for lineage, without the state)


def read_state(directory: str | Path) -> dict:
    """The training state (`state.pt`) in a checkpoint directory."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def read_state_uri(checkpoint_uri: str) -> dict:
    """The training state of a checkpoint folder anywhere (local or s3://)."""
    import io

    from components.common import storage

    data = storage.read_bytes(storage.join(checkpoint_uri, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


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

    def load_state(self) -> dict | None:
        checkpoint = self._train.get_checkpoint()
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

    def load_state(self) -> dict | None:
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
