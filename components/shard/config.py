"""The shard stage's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from clip_model.image_ops import SHORTER_SIDE_FACTOR, stored_shorter_side
from components.common.rayjob import DataCluster

# Settings that change how the work runs, not the bytes it writes: left out of the manifest's `config`, so that
# a run on Ray, in-process or on any cluster writes the same manifest
EXECUTION_FIELDS = ("runner", "in_process_max_bytes", "num_cpus", "cluster", "fail_after_slots", "multipart_threshold")


@dataclass
class ShardConfig:
    """How the kept pairs become shards: shard size, stored image size, split, tokenizer."""

    samples_per_shard: int = 10_000  # samples per webdataset tar (10,000 is DataComp's / img2dataset's)
    max_shard_bytes: int = 1 << 30  # a shard is closed before its file would grow past this many bytes
    train_image_size: int | None = 224  # the training resolution: training images are stored with their shorter side
                                        # at about train_resize_factor x this (258 px for 224, as img2dataset does),
                                        # when larger; None = training images as they come
    train_resize_factor: float = SHORTER_SIDE_FACTOR  # stored shorter side of training images / train_image_size
                                                      # (room for crops)
    image_max_side: int | None = None  # longer side cap of every stored image in pixels; the validation split is
                                       # otherwise kept as it comes, for the evaluation transform; None = no cap
    jpeg_quality: int = 90  # JPEG quality of re-encoded images
    val_fraction: float = 0.05  # validation share, 0 to < 1, by a hash of the key (stable across seeds and reruns)
    seed: int = 0  # sample order within each split
    vocab_size: int = 49408  # tokens in the BPE vocabulary trained on the training captions
    tokenizer: str = ""  # "" = train a BPE of vocab_size on the training captions; "openai" = OpenAI's CLIP
                         # vocabulary (for OpenAI / OpenCLIP weights); a tokenizer.json URI; or a checkpoint URI
                         # (the one training starts from): the tokenizer.json beside it, else OpenAI's
    init_checkpoint: str = ""  # the checkpoint training starts from: with tokenizer "", its tokenizer is used
                               # (the tokenizer.json beside it, else OpenAI's) instead of training one
    tokenizer_sample: int = 2_000_000  # a trained tokenizer learns from this many training captions at most: the
                                       # first ones of the seeded sample order (a deterministic sample)
    runner: str = "auto"  # ray: Ray tasks sort through storage, Ray tasks write (any size; no per-row state in the
                          # driver) |
                          # local: in this process without Ray, the same rows, order and writer serially (it holds
                          # every kept row in memory, so it refuses kept parts over in_process_max_bytes) |
                          # auto: local when the kept parts total at most in_process_max_bytes, else ray
    in_process_max_bytes: int = 64 * 2**20  # bytes of kept parquet parts up to which auto runs in this process:
                                            # about this much memory, and a serial write that takes less time than
                                            # Ray's fixed 20-30 s a call (64 MiB: a few thousand web images)
    num_cpus: int | None = None  # CPUs of a local Ray started for this stage (one shard writer each; None = all);
                                 # ignored when a Ray cluster is joined (RAY_ADDRESS, the RayJob's)
    cluster: DataCluster = field(default_factory=DataCluster)  # where it runs: local Ray or a RayJob's workers
    fail_after_slots: int | None = None  # testing: stop (RuntimeError) once this many shard slots are written, as a
                                         # crash would; a rerun resumes. None = off
    multipart_threshold: int | None = None  # bytes above which uploads go in parts; None = storage's default

    @property
    def tokenizer_spec(self) -> str:
        """What the dataset's tokenizer comes from: `tokenizer`, else the checkpoint's, else "" (train one)."""
        return self.tokenizer or self.init_checkpoint

    def __post_init__(self) -> None:
        if self.runner not in ("auto", "local", "ray"):
            raise ValueError(f"ShardConfig.runner={self.runner!r}: use 'auto', 'local' or 'ray'")
        if self.in_process_max_bytes < 0:
            raise ValueError(f"in_process_max_bytes={self.in_process_max_bytes}: must be >= 0")
        if self.samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={self.samples_per_shard}: must be >= 1")
        if self.tokenizer_sample < 1:
            raise ValueError(f"tokenizer_sample={self.tokenizer_sample}: must be >= 1")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes={self.max_shard_bytes}: must be >= 1")
        if self.image_max_side is not None and self.image_max_side < 8:
            raise ValueError(f"image_max_side={self.image_max_side}: must be >= 8 or None")
        if self.train_image_size is not None and self.train_image_size < 8:
            raise ValueError(f"train_image_size={self.train_image_size}: must be >= 8 or None")
        if not 1.0 <= self.train_resize_factor <= 4.0:
            raise ValueError(f"train_resize_factor={self.train_resize_factor}: must be in [1, 4]")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction}: must be in [0, 1)")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality={self.jpeg_quality}: must be in [1, 100]")

    @property
    def train_shorter_side(self) -> int | None:
        """The shorter side training images are brought down to (None: not resized for training)."""
        if self.train_image_size is None:
            return None
        return stored_shorter_side(self.train_image_size, self.train_resize_factor)
