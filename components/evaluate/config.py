"""The evaluate stage's settings: which suite of datasets, which prompts, and the evaluations' knobs."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EvalConfig:
    eval_suite: str = ""  # the datasets for zero-shot, linear probe and retrieval: "" = none (retrieval on the
                          # manifest's validation split still runs); "synthetic" = the built-in synthetic suite
                          # (the evaluation split and five shifted variants, generated); a suite file (.yaml,
                          # .yml, .json); or one dataset's URI (ImageFolder, labelled tars in CLIP_benchmark
                          # layout, or a .csv); local or s3://
    synthetic_per_class: int = 20  # images per class of each generated synthetic set
    templates: str = ""  # prompt templates for datasets whose suite entry names none: imagenet | cifar | simple |
                         # synthetic | a file; "" = the data's own file, else its class-name preset's, else simple
    tokenizer_uri: str | None = None  # None = the manifest's tokenizer, else <model dir>/tokenizer.json
    eval_batch_size: int = 64  # images per forward pass
    max_images: int | None = None  # cap on each dataset (class-balanced for folders and CSVs); None = all
    retrieval_max_samples: int = 5000  # validation pairs of the manifest used for retrieval
    retrieval_examples: int = 6  # queries shown in the retrieval PNG
    retrieval_top_k: int = 5  # images shown per query in the retrieval PNG
    linear_probe: bool = True  # run the suite's linear-probe tasks (False skips them; the report says so)
    probe_shots: tuple[int, ...] = (1, 2, 4, 8, 16)  # k-shot probes besides the full one (the few-shot curve)
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
        if self.synthetic_per_class < 2:
            raise ValueError(f"EvalConfig.synthetic_per_class={self.synthetic_per_class}: must be >= 2")
        if not 0.0 < self.probe_test_fraction < 1.0:
            raise ValueError(f"EvalConfig.probe_test_fraction={self.probe_test_fraction}: must be in (0, 1)")
