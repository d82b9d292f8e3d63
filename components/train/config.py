"""The train stage's settings: the model, the optimisation recipe, and where and how wide it runs.

Policy lives here with its default, not in the glue: the recipe (`OptimConfig.peak_lr`, `warmup_for`: from
scratch CLIP's, from `init_checkpoint` OpenCLIP's fine-tuning recipes), the number of training processes
(`TrainConfig.processes`) and the launcher (`TrainConfig.resolved_launcher`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from clip_model.image_ops import CROPS
from components.common.rayjob import LAUNCHERS, RayJobPolicy, resolve_launcher
from components.train.sampler import SAMPLINGS, Budget, resolve_budget

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class OptimConfig:
    """CLIP's optimiser recipe: AdamW, decay on weight matrices only, linear warmup then cosine. Fine-tuning
    (`TrainConfig.init_checkpoint` set) follows OpenCLIP's published fine-tuning recipes instead: a lower
    peak learning rate (`finetune_lr`) and a short warmup."""

    lr: float = 5e-4  # peak learning rate from scratch (a run from init_checkpoint uses finetune_lr)
    finetune_lr: float = 1e-5  # peak learning rate when starting from init_checkpoint (OpenCLIP's fine-tuning
                               # recipes: 1e-5 to 3e-5)
    warmup_steps: int | None = None  # linear warmup steps; None = 10 % of the steps (1..2000) from scratch,
                                     # 2 % (1..500) when fine-tuning
    weight_decay: float = 0.2  # AdamW weight decay (not on gains, biases, embeddings, logit_scale)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas
    eps: float = 1e-6  # AdamW epsilon
    grad_clip: float | None = 1.0  # max global gradient norm; None or 0 = no clipping
    min_lr_ratio: float = 0.0  # the cosine ends at lr * min_lr_ratio

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # JSON gives a list
        # Not a setting: TrainConfig sets it from init_checkpoint (one source of truth).
        self.fine_tuning = False
        for name in ("lr", "finetune_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"optim.{name} must be > 0, got {getattr(self, name)}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")

    @property
    def peak_lr(self) -> float:
        """The learning rate the schedule warms up to: `lr` from scratch, `finetune_lr` when fine-tuning."""
        return self.finetune_lr if self.fine_tuning else self.lr

    def warmup_for(self, steps: int) -> int:
        """The warmup of a run of `steps` optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        if self.fine_tuning:
            return max(1, min(steps // 50, 500))
        return max(1, min(steps // 10, 2000))


@dataclass
class TrainConfig:
    """Every training setting, logged whole to MLflow. The image size comes from the model config."""

    model_config: str = "tiny"  # a bundled model config (tiny, tiny-rn, RN50, RN101, ViT-B-32, ViT-B-16, ViT-L-14)
                                # or a JSON file
    steps: int = 0  # optimizer steps
    epochs: float = 0  # passes over the training split. The budget is exactly one of steps, epochs and samples
                       # (0 = not given; none given = the paper's 32 epochs); the others are derived and logged
    samples: int = 0  # samples to train on (rounded up to whole global batches)
    sampling: str = "epochs"  # epochs (every sample once per epoch across all ranks and readers, reshuffled each
                              # epoch; fewer than one global batch per epoch left out) | resampled (shards drawn with
                              # replacement, OpenCLIP's --dataset-resampled)
    batch_size: int = 64  # samples per training process and micro-step; global = batch_size x grad_accum x processes
    grad_accum: int = 1  # micro-batches per optimizer step
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16
    grad_checkpointing: bool = False  # recompute activations in the backward pass (less memory, more compute)
    torch_compile: bool = False  # torch.compile each residual block (regional: one graph per tower, compiled once;
                                 # the first steps take longer)
    optim: OptimConfig = field(default_factory=OptimConfig)  # CLIP's optimiser recipe
    checkpoint_every: int = 500  # steps between checkpoints; a final checkpoint is always written
    keep_checkpoints: int = 3  # checkpoints kept on storage
    # where and how wide
    launcher: str = "auto"  # auto (a KubeRay RayJob inside Kubernetes, a local Ray elsewhere) | local | rayjob
    num_workers: int = 2  # Ray workers: pods of the RayJob; locally, training processes
    gpus_per_worker: int = 0  # GPUs per worker, one training process each; 0 = CPU training
    cpus_per_worker: str = ""  # RayJob worker CPU request and limit, in cores (e.g. "8"); "" keeps the k8s/ template's
    memory_per_worker: str = ""  # RayJob worker memory request and limit, a Kubernetes quantity (e.g. "64Gi"); ""
                                 # keeps the template's
    image: str = ""  # the RayJob's container image; "" = the component image (its -cu128 CUDA build on GPUs)
    rayjob: RayJobPolicy = field(default_factory=RayJobPolicy)  # the RayJob's deadline, retries and TTL
    cpus_per_process: float = 1.0  # CPUs Ray reserves for each training process (also its torch threads on CPU)
    loader_workers: int = 2  # DataLoader processes per training process (they decode and crop; uint8 to the device)
    loader_prefetch: int = 2  # the reader's prefetch depth: batches each DataLoader process prepares ahead
    train_crop: str = "random"  # random (the CLIP paper's: a random square crop of the image resized to a shorter
                                # side of 1.15x; no resampling for images the shard stage stored so) |
                                # random_resized (area 0.9-1 of the image, bicubic, as OpenCLIP; more CPU per sample)
    seed: int = 0  # model init and data order
    run_name: str = "clip-train"  # Ray Train run name: resubmitting the same name and storage resumes
    storage_path: str | None = None  # checkpoints (local dir or s3://); None = <output>/ray
    resume_from: str = ""  # continue a previous run: a checkpoint folder (checkpoint_*), the Ray run folder holding
                           # them (local or s3://), or the run's MLflow run id; "" = start fresh. This run's own
                           # checkpoints (a restart or resubmission) come first
    max_failures: int = 2  # worker-group restarts from the latest checkpoint; -1 = unlimited
    log_every: int = 10  # steps between MLflow metric batches
    progress_every_s: float = 5.0  # seconds between progress lines
    system_metrics: bool = True  # log CPU / GPU / memory use to MLflow
    fail_at_step: int | None = None  # test hook: the last worker raises once at this step
    # where training starts (fine-tuning)
    init_checkpoint: str = ""  # weights to start from: an OpenAI or OpenCLIP state dict or one of our model.pt,
                               # local or s3://, fitting model_config; "" = random init. Switches the
                               # optimiser to the fine-tuning recipe (finetune_lr, short warmup)
    init_checkpoint_sha256: str = ""  # the sha256 init_checkpoint must have ("" = any; the pipeline pins it)
    lock_image: bool = False  # freeze the image tower (LiT; OpenCLIP's --lock-image); needs init_checkpoint
    lock_image_unlocked_groups: int = 0  # with lock_image: the last n layer groups of the image tower stay trainable
    lock_text: bool = False  # freeze the text tower; needs init_checkpoint
    lock_text_unlocked_layers: int = 0  # with lock_text: the last n layer groups of the text tower stay trainable

    def __post_init__(self) -> None:
        checks = {"steps": self.steps >= 0, "epochs": self.epochs >= 0, "samples": self.samples >= 0,
                  "batch_size": self.batch_size >= 1, "grad_accum": self.grad_accum >= 1,
                  "checkpoint_every": self.checkpoint_every >= 1, "keep_checkpoints": self.keep_checkpoints >= 1,
                  "num_workers": self.num_workers >= 1, "gpus_per_worker": self.gpus_per_worker >= 0,
                  "cpus_per_process": self.cpus_per_process > 0, "loader_workers": self.loader_workers >= 0,
                  "loader_prefetch": self.loader_prefetch >= 1,
                  "max_failures": self.max_failures >= -1, "log_every": self.log_every >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is out of range")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r}: expected one of {PRECISIONS}")
        given = [name for name in ("steps", "epochs", "samples") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"TrainConfig: the budget is given twice ({' and '.join(given)}): set exactly one of "
                             "steps, epochs and samples (0 = not given)")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"TrainConfig.sampling={self.sampling!r}: expected one of {SAMPLINGS}")
        if self.train_crop not in CROPS:
            raise ValueError(f"TrainConfig.train_crop={self.train_crop!r}: expected one of {CROPS}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"TrainConfig.launcher={self.launcher!r}: expected one of {LAUNCHERS}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"TrainConfig.run_name={self.run_name!r}: must be a non-empty name without '/'")
        self._check_fine_tuning()
        self.optim.fine_tuning = bool(self.init_checkpoint)

    def _check_fine_tuning(self) -> None:
        for tower, unlocked_name in (("image", "lock_image_unlocked_groups"), ("text", "lock_text_unlocked_layers")):
            locked, unlocked = getattr(self, f"lock_{tower}"), getattr(self, unlocked_name)
            if unlocked < 0:
                raise ValueError(f"TrainConfig.{unlocked_name}={unlocked}: must be >= 0")
            if unlocked and not locked:
                raise ValueError(f"TrainConfig.{unlocked_name}={unlocked} needs lock_{tower}=true")
            if locked and not self.init_checkpoint:
                raise ValueError(f"TrainConfig.lock_{tower}=true would freeze a randomly initialised {tower} tower: "
                                 "set init_checkpoint")
        if self.init_checkpoint_sha256:
            if not self.init_checkpoint:
                raise ValueError("TrainConfig.init_checkpoint_sha256 is set but init_checkpoint is empty")
            if not re.fullmatch(r"[0-9a-f]{64}", self.init_checkpoint_sha256):
                raise ValueError(f"TrainConfig.init_checkpoint_sha256={self.init_checkpoint_sha256!r}: "
                                 "expected 64 lower-case hex digits")

    def budget(self, num_samples: int, world_size: int | None = None) -> Budget:
        """Steps, epochs and samples of this run over a training split of `num_samples` (`sampler.resolve_budget`)."""
        return resolve_budget(steps=self.steps, epochs=self.epochs, samples=self.samples, num_samples=num_samples,
                              world_size=world_size or self.processes, batch_size=self.batch_size,
                              grad_accum=self.grad_accum)

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    @property
    def processes(self) -> int:
        """Training processes (Ray Train workers): one per GPU, or one per worker on CPUs."""
        return self.num_workers * self.gpus_per_worker if self.use_gpu else self.num_workers

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def process_resources(self) -> dict[str, float]:
        """What Ray reserves for each training process."""
        return {"CPU": self.cpus_per_process, **({"GPU": 1} if self.use_gpu else {})}

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if self.use_gpu else "fp32"
        return self.precision

    def resolved_launcher(self) -> str:
        """'auto' is a RayJob inside Kubernetes and a local Ray elsewhere."""
        return resolve_launcher(self.launcher)
