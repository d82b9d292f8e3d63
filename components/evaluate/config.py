"""The evaluate stage's settings: which labelled set, which prompts, and the three evaluations' knobs."""

from __future__ import annotations

from dataclasses import dataclass

from components.evaluate.templates import DATASETS


@dataclass
class EvalConfig:
    eval_data_uri: str = ""  # labelled set for zero-shot + linear probe: an ImageFolder dir or labelled tars,
                             # local or s3://; "synthetic" = the generated synthetic split; "" = skip both
    synthetic_per_class: int = 20  # images per class of the generated synthetic split
    dataset: str = ""  # class names + default templates: cifar10 | cifar100 | imagenet | custom | synthetic;
                       # "" = by the data (synthetic for the generated split, else custom)
    templates: str = ""  # prompt templates: imagenet | cifar | simple | synthetic | a file; "" = the dataset's
    classnames_uri: str | None = None  # overrides <eval_data>/classnames.txt
    tokenizer_uri: str | None = None  # None = the manifest's tokenizer, else <model dir>/tokenizer.json
    eval_batch_size: int = 64  # images per forward pass
    max_images: int | None = None  # cap on the labelled set (class-balanced for folders)
    retrieval_max_samples: int = 5000  # validation pairs used for retrieval
    retrieval_examples: int = 6  # queries shown in the retrieval PNG
    retrieval_top_k: int = 5  # images shown per query in the retrieval PNG
    linear_probe: bool = True  # fit a logistic-regression probe on the labelled set's features
    probe_shots: tuple[int, ...] = (1, 4, 16)  # k-shot probes besides the full one
    probe_test_fraction: float = 0.5  # share of each class held out to test the probe
    probe_c_grid: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation strengths tried
    seed: int = 0  # probe splits
    device: str = "cpu"  # torch device for encoding
    num_threads: int | None = None  # torch intra-op threads; None = torch's default

    def __post_init__(self) -> None:
        self.probe_shots = tuple(int(s) for s in self.probe_shots)
        self.probe_c_grid = tuple(float(c) for c in self.probe_c_grid)
        if self.eval_batch_size < 1:
            raise ValueError(f"EvalConfig.eval_batch_size={self.eval_batch_size}: must be >= 1")
        if not 0.0 < self.probe_test_fraction < 1.0:
            raise ValueError(f"EvalConfig.probe_test_fraction={self.probe_test_fraction}: must be in (0, 1)")
        if self.dataset and self.dataset not in DATASETS:
            raise ValueError(f"EvalConfig.dataset={self.dataset!r}: choose one of {list(DATASETS)} (or '')")

    @property
    def resolved_dataset(self) -> str:
        if self.dataset:
            return self.dataset
        return "synthetic" if self.eval_data_uri == "synthetic" else "custom"
