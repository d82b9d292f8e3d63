"""What every evaluation set is: `EvalSet` (iterate it for `Sample`s; a record that cannot be used is
skipped and noted in `set.bad`, with the record and the rule, so one bad record loses nothing else) and
the helpers the formats share. The formats are in `components.evaluate.datasets` and
`components.evaluate.csvset`."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from components.common import storage
from components.common.dataset import decode_image as decode_rgb

MAX_BAD_LISTED = 20


def read_lines(uri: str) -> list[str]:
    """Non-empty lines of a text file (classnames.txt, templates)."""
    return [ln.strip() for ln in storage.read_text(uri).splitlines() if ln.strip()]


def norm_classname(name: str) -> str:
    """A class name for matching: case, surrounding space and '_' vs ' ' ignored."""
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
    by_norm = {norm_classname(n): i for i, n in enumerate(names)}
    if all(norm_classname(f) in by_norm for f in folders):
        return [n.strip() for n in names], {f: by_norm[norm_classname(f)] for f in folders}
    if len(names) != len(folders):
        raise ValueError(f"{where}: {len(folders)} class folders but {len(names)} class names, and the folder "
                         "names are not class names; give one name per folder (sorted folder order) or "
                         "'folder<TAB>name' lines")
    return [n.strip() for n in names], {f: i for i, f in enumerate(folders)}


def decode_image(data: bytes, where: str) -> Image.Image:
    """RGB as training and serving see it (`components.common.dataset.decode_image`: transparency over
    white, 16-bit and palette images converted the same way); an unreadable image names `where`."""
    try:
        return decode_rgb(data, where)
    except ValueError as exc:
        raise ValueError(f"{where}: not a readable image ({exc.__cause__ or exc})") from exc


@dataclass
class Sample:
    key: str
    image: Image.Image
    label: int | None  # class index, None in a caption-only set
    captions: list[str] | None  # None in a set without captions


# --------------------------------------------------------------------------- sets

@dataclass
class EvalSet:
    """An evaluation set: iterate it for `Sample`s. `classnames` is None for a caption-only set;
    `templates` are the ones shipped with the data (CLIP_benchmark's file), else None."""

    root: str  # the URI given
    location: str  # where the records are read (the split folder, or the file)
    kind: str  # "folder" | "wds" | "csv" | "manifest"
    classnames: list[str] | None
    has_captions: bool
    templates: list[str] | None = None
    limit: int | None = None
    bad: list[dict] = field(default_factory=list)  # the first MAX_BAD_LISTED skipped records
    bad_count: int = 0
    _name_index: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def has_labels(self) -> bool:
        return self.classnames is not None

    def __len__(self) -> int:
        n = self._size()
        return min(n, self.limit) if (self.limit and n is not None) else (n or 0)

    @property
    def size_known(self) -> bool:
        return self._size() is not None

    def _size(self) -> int | None:
        return None

    def _records(self) -> Iterator[Sample]:
        raise NotImplementedError

    def skip(self, record: str, rule: str) -> None:
        self.bad_count += 1
        if len(self.bad) < MAX_BAD_LISTED:
            self.bad.append({"record": record, "rule": rule})

    def __iter__(self) -> Iterator[Sample]:
        self.bad, self.bad_count = [], 0
        count = 0
        for sample in self._records():
            if self.limit and count >= self.limit:
                return
            count += 1
            yield sample

    def _label(self, value: str, where: str) -> int | None:
        """A class index from a label string: an index, or a class name; None (and noted) if unusable."""
        names = self.classnames or []
        text = value.strip()
        if re.fullmatch(r"-?\d+", text):
            label = int(text)
            if 0 <= label < len(names):
                return label
            self.skip(where, f"class index {label} outside [0, {len(names)}) of the class names")
            return None
        if len(self._name_index) != len(names):
            self._name_index = {norm_classname(n): i for i, n in enumerate(names)}
        if norm_classname(text) in self._name_index:
            return self._name_index[norm_classname(text)]
        self.skip(where, f"label {text!r} is neither a class index nor one of the class names")
        return None



def first_existing(*uris: str | None) -> str | None:
    return next((u for u in uris if u and storage.exists(u)), None)
