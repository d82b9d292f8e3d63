"""Labelled evaluation sets and their class names.

A labelled set is either
- an ImageFolder-style directory (local or s3://): ``<root>/<class folder>/<image>``, with an optional
  ``classnames.txt`` (one name per line, in class-index order; either the folder names themselves, or
  ``folder<TAB>name`` lines; plain names that are not folder names map to the sorted folders in order);
- webdataset tars (``<root>/*.tar``) whose samples have an image member (jpg/jpeg/png/webp) and a ``.cls``
  member (the integer class index), with the class names in ``classnames.txt`` beside them (or given).

Class indices follow the class-name list when its names are the folder names, else the sorted folder
names (the torchvision ImageFolder convention, which is also the order of the CIFAR-10/100 and ImageNet
(wnid) class lists); see `map_folders`.
"""

from __future__ import annotations

import io
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from components.common import storage

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def read_classnames(uri: str) -> list[str]:
    lines = [ln.rstrip("\r") for ln in storage.read_text(uri).splitlines()]
    return [ln for ln in lines if ln.strip()]


def _norm(name: str) -> str:
    return name.replace("_", " ").strip().lower()


def map_folders(folders: Sequence[str], names: Sequence[str] | None, where: str) -> tuple[list[str], dict[str, int]]:
    """(class names in class-index order, folder -> class index) for the class `folders` of a set.

    - no names: the sorted folders (underscores read as spaces);
    - ``folder<TAB>name`` lines: the lines' order;
    - names that match the folder names (case and '_' vs ' ' ignored): the names' order; names without
      a folder stay classes (e.g. a labelled subset of ImageNet is still classified among all 1000);
    - otherwise one name per sorted folder.
    """
    folders = sorted(folders)
    if not names:
        return [f.replace("_", " ") for f in folders], {f: i for i, f in enumerate(folders)}
    if all("\t" in n for n in names):
        pairs = [tuple(p.strip() for p in n.split("\t", 1)) for n in names]
        index = {folder: i for i, (folder, _name) in enumerate(pairs)}
        missing = [f for f in folders if f not in index]
        if missing:
            raise ValueError(f"{where}: class folders {missing[:5]} have no line in the class-name mapping")
        return [name for _folder, name in pairs], index
    by_norm = {_norm(n): i for i, n in enumerate(names)}
    if all(_norm(f) in by_norm for f in folders):
        return [n.strip() for n in names], {f: by_norm[_norm(f)] for f in folders}
    if len(names) != len(folders):
        raise ValueError(f"{where}: {len(folders)} class folders but {len(names)} class names, and the folder "
                         "names are not class names; give one name per folder (sorted folder order) or "
                         "'folder<TAB>name' lines")
    return [n.strip() for n in names], {f: i for i, f in enumerate(folders)}


# --------------------------------------------------------------------------- labelled sets

@dataclass
class LabelledSet:
    """A labelled image set: `classnames[label]` names class `label`. Iterate it for
    ``(key, PIL RGB image, label)``; ImageFolder sets know their size up front."""

    root: str
    classnames: list[str]
    kind: str  # "folder" | "wds"
    items: list[tuple[str, int]] = field(default_factory=list)  # folder: (uri, label)
    shards: list[str] = field(default_factory=list)  # wds: tar URIs
    limit: int | None = None

    def __len__(self) -> int:
        n = len(self.items) if self.kind == "folder" else 0
        return min(n, self.limit) if self.limit else n

    @property
    def size_known(self) -> bool:
        return self.kind == "folder"

    def __iter__(self) -> Iterator[tuple[str, Image.Image, int]]:
        count = 0
        for key, image, label in (self._iter_folder() if self.kind == "folder" else self._iter_wds()):
            if self.limit and count >= self.limit:
                return
            count += 1
            yield key, image, label

    def _iter_folder(self) -> Iterator[tuple[str, Image.Image, int]]:
        for uri, label in self.items:
            yield uri, decode_image(storage.read_bytes(uri), uri), label

    def _iter_wds(self) -> Iterator[tuple[str, Image.Image, int]]:
        num_classes = len(self.classnames)
        for shard in self.shards:
            for key, members in _tar_samples(shard):
                where = f"{shard} sample {key!r}"
                image_member = next((members[e] for e in ("jpg", "jpeg", "png", "webp") if e in members), None)
                if image_member is None or "cls" not in members:
                    raise ValueError(f"{where}: a labelled sample needs an image (jpg/png/webp) and a .cls member; "
                                     f"has {sorted(members)}")
                try:
                    label = int(members["cls"].decode("utf-8").strip())
                except ValueError as exc:
                    raise ValueError(f"{where}: .cls must hold an integer class index") from exc
                if not 0 <= label < num_classes:
                    raise ValueError(f"{where}: class index {label} outside [0, {num_classes}) of the class names")
                yield key, decode_image(image_member, where), label


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"{where}: not a readable image ({exc})") from exc


def _tar_samples(uri: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key (webdataset convention: key = path up to the first dot of
    the basename)."""
    current, members = None, {}
    with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            dirname, base = posixpath.split(info.name)
            stem, _, ext = base.partition(".")
            key = posixpath.join(dirname, stem)
            if key != current and current is not None:
                yield current, members
                members = {}
            current = key
            members[ext.lower()] = tar.extractfile(info).read()  # type: ignore[union-attr]
    if current is not None:
        yield current, members


def load_labelled_set(uri: str, classnames: Sequence[str] | None = None, classnames_uri: str | None = None,
                      limit: int | None = None) -> LabelledSet:
    """Open an ImageFolder directory or a folder of labelled webdataset tars (see the module docstring).
    `classnames` (e.g. the CIFAR-10 list) or `classnames_uri` override ``<uri>/classnames.txt``."""
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"labelled set {uri}: no files there")
    root = uri.rstrip("/")
    rel = [(f, f[len(root) + 1:].replace("\\", "/")) for f in files]
    names_file = classnames_uri or next((f for f, r in rel if r == "classnames.txt"), None)
    given = list(classnames) if classnames else (read_classnames(names_file) if names_file else None)
    tars = [f for f, r in rel if r.endswith(".tar")]
    if tars:
        if not given:
            raise ValueError(f"labelled set {uri}: webdataset tars need class names (classnames.txt beside them, "
                             "or a dataset / classnames option)")
        return LabelledSet(root=uri, classnames=[n.split("\t")[-1].strip() for n in given], kind="wds",
                           shards=sorted(tars), limit=limit)
    by_folder: dict[str, list[str]] = {}
    for f, r in rel:
        parts = r.split("/")
        if len(parts) >= 2 and r.lower().endswith(IMAGE_EXTS):
            by_folder.setdefault(parts[0], []).append(f)
    if not by_folder:
        raise ValueError(f"labelled set {uri}: no <class folder>/<image> files and no .tar shards")
    names, label_of = map_folders(list(by_folder), given, f"labelled set {uri}")
    folders = sorted(by_folder, key=lambda f: label_of[f])
    items = [(f, label_of[folder]) for folder in folders for f in sorted(by_folder[folder])]
    if limit and limit < len(items):  # a class-balanced subset: the first images of every class in turn
        order = [(i, label_of[folder], f) for folder in folders for i, f in enumerate(sorted(by_folder[folder]))]
        items = sorted((f, label) for _i, label, f in sorted(order)[:limit])
        items.sort(key=lambda it: it[1])
    return LabelledSet(root=uri, classnames=names, kind="folder", items=items)
