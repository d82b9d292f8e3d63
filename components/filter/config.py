"""The filter stage's settings: what to read, every rule and its threshold, and the presets.

    cfg = config.from_dict(FilterConfig, {"source_uri": "/data/pairs", "preset": "basic_only"})
"""

from __future__ import annotations

from dataclasses import dataclass, field

from components.common.rayjob import DataCluster
from components.filter.langid import METHODS as LANGUAGE_METHODS

# Every rejection reason, in the order the rules run (the first failing rule names the reason).
REASONS = (
    "missing_image", "unreadable", "missing_caption", "caption_encoding", "decompression_bomb", "corrupt_image",
    "too_small",
    "aspect_ratio", "empty_caption", "privacy", "caption_too_short", "language",
    "duplicate_key", "duplicate_exact", "near_duplicate", "clip_score", "concept_cap", "language_quota",
)
# Settings that change how the work runs, not its result (a rerun with other values resumes the units done)
EXECUTION_FIELDS = ("runner", "num_cpus", "reject_samples", "shuffle_partitions", "partition_rows",
                    "model_actors_per_node")
WIT_PAIRS_PER_LANGUAGE = 20000  # clip_wit's quota: CLIP's WIT kept at most 20,000 pairs per query
PRIVACY_KINDS = ("email", "phone", "card", "id", "address", "url")  # rules.find_private says what each is


@dataclass
class SourceConfig:
    """How a source is read: table column names (None = the first match of sources.py's defaults) and unit size."""
    caption_column: str | None = None        # caption column of a table (None = the first of CAPTION_FIELDS)
    image_column: str | None = None          # column of encoded image bytes (None = the first of IMAGE_FIELDS)
    image_path_column: str | None = None     # column of image paths relative to the table
    key_column: str | None = None            # column of record keys (None = the first of KEY_FIELDS, else row ids)
    files_per_unit: int = 128                # image files per parallel work unit
    caption_encodings: tuple[str, ...] = ()  # encodings tried, in order, for a caption that is not UTF-8
                                             # (e.g. cp1252); () = such captions are rejected (caption_encoding)

    def __post_init__(self) -> None:
        import codecs

        self.caption_encodings = tuple(self.caption_encodings)
        for name in self.caption_encodings:
            try:
                codecs.lookup(name)
            except LookupError:
                raise ValueError(f"SourceConfig.caption_encodings: unknown encoding {name!r}") from None
        if self.files_per_unit < 1:
            raise ValueError("SourceConfig.files_per_unit must be >= 1")


@dataclass
class FilterConfig:
    """Every rule of the filter stage; `preset` gives the starting values (see `presets`)."""
    source_uri: str = "synthetic"         # raw pairs: a folder, a parquet/jsonl/csv table or webdataset
                                          # tars, local or s3:// ("synthetic" = generate the bundled corpus)
    synthetic_samples: int = 600          # pairs in the generated corpus when source_uri is "synthetic"
    preset: str = "datacomp_basic"        # the rules' starting values (a rule set explicitly wins):
                                          # datacomp_basic (DataComp's basic filter + privacy drop + exact
                                          # and near-duplicate removal) | clip_wit (CLIP's WIT: any language
                                          # by quota, any non-empty caption, privacy drop) | basic_only |
                                          # none (only unusable records go)
    # image
    min_side: int = 200                   # shorter side >= min_side pixels
    max_aspect: float = 3.0               # longer / shorter side <= max_aspect; 0 = no limit
    max_pixels: int = 0                   # 0 = Pillow's Image.MAX_IMAGE_PIXELS; larger images are bombs
    # caption
    min_words: int = 3                    # > 2 words
    min_chars: int = 6                    # > 5 characters
    languages: tuple[str, ...] = ("en",)  # allowed languages (ISO 639-1 codes); () or "" = any
    language_identifier: str = "cascade"  # cascade (fastText, then lingua where it is unsure) | lingua | fasttext
                                          # (measured: benchmarks/bench_langid.py)
    language_confident_score: float = 0.5  # cascade: fastText's answer stands at or above this score when it
                                           # names an allowed language; everything else goes to lingua
    min_language_score: float = 0.0       # also reject when the identifier's score is below this (0 = off)
    language_quota: tuple[str, ...] = ()  # CLIP's WIT balancing by language: "LANG=N" (at most N pairs) or
                                          # "LANG=0.3" (at most that share of the pairs left by the other rules);
                                          # "*=..." for every language not named, e.g. "en=0.5,*=1000";
                                          # () = off
    privacy: str = "drop"                 # drop | scrub | off (what is private: rules.find_private)
    privacy_kinds: tuple[str, ...] = PRIVACY_KINDS  # which kinds of personal data the privacy rule looks for
    # whole-dataset rules
    exact_dedup: bool = True              # same image sha256 and same normalised caption
    near_dedup: bool = True               # pHash within near_dup_max_distance bits
    near_dup_max_distance: int = 6        # near-duplicate threshold in pHash bits (0-63)
    near_dup_key_bits: int = 0            # bits of a multi-index table key (0 = chosen from a sample of the
                                          # pHashes: >= log2(n) - 2 and long enough for <= 32 expected
                                          # comparisons per pHash; dedup.choose_plan)
    near_dup_bucket_cap: int = 5000       # a bucket larger than this is verified on its first members only
                                          # (counted in stats near_duplicates.capped_*); 0 = no cap
    concept_queries: tuple[str, ...] = ()  # CLIP's WIT balancing: at most concept_cap pairs per query
    concept_cap: int = 0                   # 0 = off
    concept_keep_unmatched: bool = True    # keep pairs that match no concept query
    clip_bundle: str = ""                  # ONNX bundle dir (image/text encoders); "" = no CLIP-score rule
    clip_min_score: float | None = None    # keep cosine >= this
    clip_top_fraction: float | None = None  # or keep this best fraction
    clip_batch_size: int = 32              # pairs per ONNX call of the CLIP-score rule
    model_actors_per_node: int = 0         # Ray actors per node that hold the language and CLIP-score models
                                           # (loaded once per actor; units call one on their node); 0 = each
                                           # worker process loads its own (models.py)
    # input, output, execution
    source: SourceConfig = field(default_factory=SourceConfig)  # table columns and unit size
    reject_samples: int = 20               # rejected records kept per reason in rejects/<reason>.jsonl
    runner: str = "ray"                    # ray: units run as Ray tasks (joins RAY_ADDRESS or a running Ray,
                                           # else starts one) | local: in this process, one unit at a time
    num_cpus: int | None = None            # CPUs for a local Ray started by the filter (None = all)
    shuffle_partitions: int = 0            # partitions of the whole-dataset rules' shuffles (0 = one per
                                           # partition_rows records, at least min(units, 16))
    partition_rows: int = 1_000_000        # records per shuffle partition when shuffle_partitions is 0
    cluster: DataCluster = field(default_factory=DataCluster)  # where it runs: local Ray or a RayJob's workers

    def __post_init__(self) -> None:
        if not self.source_uri:
            raise ValueError("FilterConfig.source_uri is empty: name a folder, table or tars (or 'synthetic')")
        self.languages = tuple(lang.lower() for lang in self.languages)
        self.privacy_kinds = tuple(self.privacy_kinds)
        self.concept_queries = tuple(self.concept_queries)
        if len(self.concept_queries) > 63:
            raise ValueError("FilterConfig.concept_queries: at most 63 queries (one bit each in a 64-bit mask)")
        if self.privacy not in ("drop", "scrub", "off"):
            raise ValueError(f"FilterConfig.privacy={self.privacy!r}: use 'drop', 'scrub' or 'off'")
        unknown = set(self.privacy_kinds) - set(PRIVACY_KINDS)
        if unknown:
            raise ValueError(f"FilterConfig.privacy_kinds: unknown {sorted(unknown)}; known {PRIVACY_KINDS}")
        if not 0 <= self.near_dup_max_distance < 64:
            raise ValueError("FilterConfig.near_dup_max_distance must be in [0, 63]")
        if self.clip_top_fraction is not None and not 0 < self.clip_top_fraction <= 1:
            raise ValueError("FilterConfig.clip_top_fraction must be in (0, 1]")
        if self.clip_bundle and self.clip_min_score is None and self.clip_top_fraction is None:
            raise ValueError("FilterConfig.clip_bundle is set: also set clip_min_score or clip_top_fraction")
        if self.language_identifier not in LANGUAGE_METHODS:
            raise ValueError(f"FilterConfig.language_identifier={self.language_identifier!r}: use one of "
                             f"{LANGUAGE_METHODS}")
        self.language_quota = tuple(self.language_quota)
        self.language_quotas()  # checks the entries
        if self.runner not in ("ray", "local"):
            raise ValueError(f"FilterConfig.runner={self.runner!r}: use 'ray' or 'local'")
        if self.near_dup_key_bits < 0 or self.near_dup_bucket_cap < 0 or self.shuffle_partitions < 0 \
                or self.partition_rows < 1:
            raise ValueError("FilterConfig: near_dup_key_bits, near_dup_bucket_cap and shuffle_partitions must be "
                             ">= 0 and partition_rows >= 1")
        if self.max_aspect and self.max_aspect < 1:
            raise ValueError("FilterConfig.max_aspect must be >= 1 (or 0 for no limit)")

    def language_quotas(self) -> dict[str, float]:
        """{language or "*": limit} from `language_quota`; a limit < 1 is a share, >= 1 a count."""
        out: dict[str, float] = {}
        for entry in self.language_quota:
            lang, sep, value = entry.partition("=")
            try:
                limit = float(value)
            except ValueError:
                limit = -1.0
            if not sep or not lang.strip() or limit <= 0 or (limit >= 1 and limit != int(limit)):
                raise ValueError(f"FilterConfig.language_quota: {entry!r} is not LANG=N (a count >= 1) or "
                                 "LANG=S (a share in (0, 1)), e.g. en=0.5 or *=1000")
            out[lang.strip().lower()] = limit
        return out

    @classmethod
    def presets(cls) -> dict[str, dict]:
        """What each preset is for (the README's preset table says what each drops):
        `datacomp_basic` (the default): DataComp's basic filter (English, > 2 words, > 5 characters, shorter
        side >= 200 px, aspect <= 3) plus privacy (drop) and exact + near-duplicate removal.
        `clip_wit`: CLIP's WIT as the paper describes it: any language, balanced by a quota (at most
        `WIT_PAIRS_PER_LANGUAGE` pairs per language, after the paper's 20,000 pairs per query), no minimum
        word count beyond a non-empty caption, privacy (drop), the image and duplicate rules.
        `basic_only`: DataComp's basic filter alone. `none`: only unusable records go (undecodable or
        missing image, no caption, decompression bombs)."""
        return {"datacomp_basic": {},
                "clip_wit": dict(min_words=1, min_chars=1, languages=(),
                                 language_quota=(f"*={WIT_PAIRS_PER_LANGUAGE}",)),
                "basic_only": dict(privacy="off", exact_dedup=False, near_dedup=False),
                "none": dict(min_side=1, max_aspect=0, min_words=0, min_chars=1, languages=(), privacy="off",
                             exact_dedup=False, near_dedup=False)}
