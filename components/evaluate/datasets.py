"""The evaluation sets a suite names, read as they are.

`open_set(uri, format="auto", split=None, ...)` opens one of
- an ImageFolder directory: ``<location>/<class folder>/<image>``, with an optional ``classnames.txt`` (one
  name per line in class-index order, the folder names themselves, or ``folder<TAB>name`` lines; see
  `map_folders`);
- webdataset tars in LAION's CLIP_benchmark layout, unchanged: ``<uri>/<split>/{0..n-1}.tar`` (``nshards.txt``
  beside them, when present, is checked), ``classnames.txt`` and ``zeroshot_classification_templates.txt`` in
  ``<uri>``, and ``dataset_type.txt`` saying ``retrieval`` for caption sets. A classification sample holds an
  image (webp/png/jpg/jpeg) and ``cls`` (the integer class index); a retrieval sample an image and ``txt``
  (its captions, one per line). Tars directly in ``<uri>`` work too;
- a CSV (``.csv``; ``.tsv`` = tab-separated; `components.evaluate.csvset`) with an image column (a path
  relative to the file, absolute or s3://) and a label column (a class index or a class name) and/or a
  caption column.

`split`: None picks ``<uri>/test`` where that folder holds tars or class folders (CLIP_benchmark's evaluation
split), else ``<uri>`` itself; "" is ``<uri>`` itself; any other name is the folder ``<uri>/<split>`` (for a CSV:
the rows whose ``split`` column holds it). Local paths or s3://.

Iterating a set yields `Sample`s. A record that cannot be used (an unreadable image, a missing or out-of-range
label) is skipped and noted in `set.bad` (the record and the rule), so one bad record loses nothing else.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field


from components.common import storage
from components.common.dataset import IMAGE_EXTS, iter_samples, split_samples
from components.common.tar_reader import ShardFormatError
from components.common.tar_samples import tar_samples

from components.evaluate.csvset import open_csv
from components.evaluate.evalset import EvalSet, Sample, decode_image, first_existing, map_folders, read_lines

TAR_IMAGE_MEMBERS = ("webp", "png", "jpg", "jpeg")


@dataclass
class FolderSet(EvalSet):
    items: list[tuple[str, int]] = field(default_factory=list)  # (image URI, label)

    def _size(self) -> int | None:
        return len(self.items)

    def _records(self) -> Iterator[Sample]:
        for uri, label in self.items:
            try:
                yield Sample(uri, decode_image(storage.read_bytes(uri), uri), label, None)
            except ValueError as exc:
                self.skip(uri, str(exc))


@dataclass
class WdsSet(EvalSet):
    shards: list[str] = field(default_factory=list)

    def _records(self) -> Iterator[Sample]:
        for shard in self.shards:
            try:
                for members in tar_samples(shard):
                    key = members["__key__"]
                    sample = self._sample(f"{shard} sample {key!r}", key, members)
                    if sample is not None:
                        yield sample
            except (ShardFormatError, OSError) as exc:
                self.skip(shard, f"unreadable tar ({exc}); the rest of this shard is skipped")

    def _sample(self, where: str, key: str, members: dict[str, bytes]) -> Sample | None:
        image = next((members[e] for e in TAR_IMAGE_MEMBERS if e in members), None)
        if image is None:
            self.skip(where, f"no image member ({'/'.join(TAR_IMAGE_MEMBERS)}); has {sorted(members)}")
            return None
        label = captions = None
        if self.has_labels:
            if "cls" not in members:
                self.skip(where, f"a labelled sample needs a .cls member; has {sorted(members)}")
                return None
            label = self._label(members["cls"].decode("utf-8", "replace"), where)
            if label is None:
                return None
        if self.has_captions:
            if "txt" not in members:
                self.skip(where, f"a caption sample needs a .txt member; has {sorted(members)}")
                return None
            captions = [c.strip() for c in members["txt"].decode("utf-8", "replace").splitlines() if c.strip()]
            if not captions:
                self.skip(where, "empty .txt: no caption")
                return None
        try:
            return Sample(key, decode_image(image, where), label, captions)
        except ValueError as exc:
            self.skip(where, str(exc))
            return None


# --------------------------------------------------------------------------- opening a set

def _shard_order(uri: str) -> tuple[int, str]:
    stem = posixpath.basename(uri).removesuffix(".tar")
    return (int(stem), "") if stem.isdigit() else (1 << 62, stem)



def open_set(uri: str, format: str = "auto", split: str | None = None, classnames: Sequence[str] | None = None,
             limit: int | None = None, columns: dict[str, str] | None = None) -> EvalSet:
    """Open an evaluation set (see the module docstring). `classnames` override the set's own
    ``classnames.txt``; `columns` names a CSV's ``image`` / ``label`` / ``caption`` columns."""
    if format not in ("auto", "folder", "wds", "csv"):
        raise ValueError(f"evaluation set {uri}: format {format!r}: choose auto, folder, wds or csv")
    if format == "csv" or (format == "auto" and uri.lower().endswith((".csv", ".tsv"))):
        return open_csv(uri, split, classnames, limit, columns or {})
    root = uri.rstrip("/")
    files = storage.list_files(root)
    if not files:
        raise FileNotFoundError(f"evaluation set {uri}: no files there")
    rel = [(f, f[len(root) + 1:].replace("\\", "/")) for f in files]
    if split is None:  # a split folder holds tars or class folders (not images: that is a class called "test")
        split = "test" if any(r.startswith("test/") and (r.endswith(".tar") or r.count("/") >= 2)
                              for _f, r in rel) else ""
    location = storage.join(root, split) if split else root
    prefix = f"{split}/" if split else ""
    inside = [(f, r[len(prefix):]) for f, r in rel if r.startswith(prefix)]
    if not inside:
        raise FileNotFoundError(f"evaluation set {uri}: no split folder {split!r} there")
    names_file = first_existing(storage.join(location, "classnames.txt"), storage.join(root, "classnames.txt"))
    given = list(classnames) if classnames else (read_lines(names_file) if names_file else None)
    templates_file = first_existing(storage.join(location, "zeroshot_classification_templates.txt"),
                            storage.join(root, "zeroshot_classification_templates.txt"))
    templates = read_lines(templates_file) if templates_file else None
    tars = [f for f, r in inside if r.endswith(".tar") and "/" not in r]
    if format == "wds" or (format == "auto" and tars):
        return _open_wds(uri, root, location, tars, [r for _f, r in inside], given, templates, limit)
    by_folder: dict[str, list[str]] = {}
    for f, r in inside:
        parts = r.split("/")
        if len(parts) >= 2 and r.lower().endswith(IMAGE_EXTS):
            by_folder.setdefault(parts[0], []).append(f)
    if not by_folder:
        nested = sorted({r.split("/")[0] for _f, r in inside if r.endswith(".tar") and "/" in r})
        hint = f"; tars sit in {nested}: set the split to one of them" if nested else ""
        raise ValueError(f"evaluation set {uri}: no <class folder>/<image> files and no .tar shards in "
                         f"{location}{hint}")
    names, label_of = map_folders(list(by_folder), given, f"evaluation set {uri}")
    folders = sorted(by_folder, key=lambda f: label_of[f])
    items = [(f, label_of[folder]) for folder in folders for f in sorted(by_folder[folder])]
    if limit and limit < len(items):  # a class-balanced subset: the first images of every class in turn
        order = sorted((i, label_of[folder], f) for folder in folders for i, f in enumerate(sorted(by_folder[folder])))
        items = sorted(((f, label) for _i, label, f in order[:limit]), key=lambda it: (it[1], it[0]))
    return FolderSet(root=uri, location=location, kind="folder", classnames=names, has_captions=False,
                     templates=templates, items=items)


def _open_wds(uri: str, root: str, location: str, tars: list[str], rel: list[str], given: list[str] | None,
              templates: list[str] | None, limit: int | None) -> WdsSet:
    if not tars:
        raise ValueError(f"evaluation set {uri}: no .tar shards in {location}")
    tars = sorted(tars, key=_shard_order)
    nshards_file = storage.join(location, "nshards.txt")
    if "nshards.txt" in rel:
        want = int(storage.read_text(nshards_file).strip())
        missing = [f"{i}.tar" for i in range(want) if storage.join(location, f"{i}.tar") not in tars]
        if missing:
            raise FileNotFoundError(f"evaluation set {uri}: nshards.txt says {want} shards, missing {missing[:5]}")
    type_file = first_existing(storage.join(location, "dataset_type.txt"), storage.join(root, "dataset_type.txt"))
    dataset_type = storage.read_text(type_file).strip().lower() if type_file else "classification"
    if dataset_type not in ("classification", "retrieval"):
        raise ValueError(f"evaluation set {uri}: dataset_type.txt says {dataset_type!r}; only classification "
                         "and retrieval sets are supported")
    retrieval = dataset_type == "retrieval"
    if not retrieval and not given:
        raise ValueError(f"evaluation set {uri}: labelled tars need class names (classnames.txt beside them or "
                         "in the set's root, or the suite's classnames)")
    names = None if retrieval else [n.split("\t")[-1].strip() for n in given or []]
    return WdsSet(root=uri, location=location, kind="wds", classnames=names, has_captions=retrieval,
                  templates=None if retrieval else templates, limit=limit, shards=tars)


@dataclass
class ManifestSet(EvalSet):
    """The validation split of a dataset manifest (the shard stage's output) as a caption set."""

    manifest: dict = field(default_factory=dict)

    def _size(self) -> int | None:
        return split_samples(self.manifest, "validation")

    def _records(self) -> Iterator[Sample]:
        for key, image, caption, _meta in iter_samples(self.manifest, "validation"):
            yield Sample(key, image, None, [caption])


def manifest_set(manifest: dict, manifest_uri: str, limit: int | None) -> ManifestSet:
    return ManifestSet(root=manifest_uri, location=f"{manifest_uri} (validation split)", kind="manifest",
                       classnames=None, has_captions=True, limit=limit, manifest=manifest)
