"""The one place that starts or joins Ray: `with ray_session(num_cpus=4): ...`.

A Ray that is already initialised in this process is used as it is. Otherwise `RAY_ADDRESS` (a
running cluster, e.g. the RayJob's) is joined, or a local Ray is started with the resources asked
for. Workers of a local Ray get this project on their PYTHONPATH, so they can import it even when it
is not pip-installed. Ray is stopped on exit only when this session started it.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PROJECT_ROOT = str(Path(__file__).resolve().parents[2])


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: the project importable (the same value every call, so Ray can
    reuse its worker processes)."""
    path = os.pathsep.join(p for p in (PROJECT_ROOT, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


@contextmanager
def ray_session(num_cpus: float | None = None, num_gpus: float | None = None,
                log_to_driver: bool = True) -> Iterator[bool]:
    """Use, join or start Ray for the duration of the block; yields True when it started Ray here.

    `num_cpus` / `num_gpus` size a Ray started here (None = what the machine has); they are ignored
    when Ray is already up or RAY_ADDRESS names a cluster. `log_to_driver=False` keeps the workers'
    output out of this process's console."""
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING,
                        "log_to_driver": log_to_driver, "runtime_env": {"env_vars": worker_env()}}
        if os.environ.get("RAY_ADDRESS"):
            kwargs["address"] = os.environ["RAY_ADDRESS"]
        else:
            if num_cpus:
                kwargs["num_cpus"] = num_cpus
            if num_gpus:
                kwargs["num_gpus"] = num_gpus
        ray.init(**kwargs)
        started = True
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
