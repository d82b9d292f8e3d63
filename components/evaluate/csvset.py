"""CSV evaluation sets: one row per image, with an image column (a path relative to the CSV, absolute or s3://)
and a label column (a class index or a class name) and/or a caption column; ``.tsv`` is tab-separated.
Columns are found by name (`CSV_COLUMNS`) unless the suite names them. Class names: the suite's, else
``classnames.txt`` beside the CSV, else the sorted distinct labels (class names, not indices). A ``split``
column selects rows when a split is asked for.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from components.common import storage
from components.evaluate.evalset import EvalSet, Sample, decode_image, first_existing, read_lines

CSV_COLUMNS = {"image": ("image", "filepath", "image_path", "path", "file", "filename"),
               "label": ("label", "cls", "class", "classname", "target"),
               "caption": ("caption", "text", "title", "txt")}


@dataclass
class CsvSet(EvalSet):
    rows: list[tuple[int, str, str | None, str | None]] = field(default_factory=list)  # (line, image, label, caption)

    def _size(self) -> int | None:
        return len(self.rows)

    def _records(self) -> Iterator[Sample]:
        for line, image_uri, label_text, caption in self.rows:
            where = f"{self.location} line {line}"
            label = None
            if self.has_labels:
                label = self._label(label_text or "", where)
                if label is None:
                    continue
            if self.has_captions and not (caption or "").strip():
                self.skip(where, "empty caption")
                continue
            try:
                image = decode_image(storage.read_bytes(image_uri), f"{where} ({image_uri})")
            except (ValueError, FileNotFoundError) as exc:
                self.skip(where, str(exc))
                continue
            yield Sample(image_uri, image, label, [caption.strip()] if self.has_captions and caption else None)


def _column(header: list[str], role: str, chosen: str | None, where: str, required: bool) -> int | None:
    if chosen:
        if chosen not in header:
            raise ValueError(f"{where}: no column {chosen!r} (the {role} column); columns: {header}")
        return header.index(chosen)
    lower = [h.strip().lower() for h in header]
    found = next((lower.index(c) for c in CSV_COLUMNS[role] if c in lower), None)
    if found is None and required:
        raise ValueError(f"{where}: no {role} column: name one of {list(CSV_COLUMNS[role])} or set it in the "
                         f"suite; columns: {header}")
    return found


def open_csv(uri: str, split: str | None, classnames: Sequence[str] | None, limit: int | None,
              columns: dict[str, str]) -> CsvSet:
    text = storage.read_text(uri)
    reader = csv.reader(io.StringIO(text), delimiter="\t" if uri.lower().endswith(".tsv") else ",")
    header = next(reader, None)
    if not header:
        raise ValueError(f"evaluation set {uri}: empty CSV (it needs a header row)")
    image_col = _column(header, "image", columns.get("image"), uri, required=True)
    label_col = _column(header, "label", columns.get("label"), uri, required=False)
    caption_col = _column(header, "caption", columns.get("caption"), uri, required=False)
    if label_col is None and caption_col is None:
        raise ValueError(f"evaluation set {uri}: a CSV needs a label column or a caption column; columns: {header}")
    split_col = header.index("split") if "split" in header else None
    if split and split_col is None:
        raise ValueError(f"evaluation set {uri}: split {split!r} asked for, but the CSV has no 'split' column")
    base = uri.rsplit("/", 1)[0] if "/" in uri else "."
    rows = []
    for line, row in enumerate(reader, start=2):
        if not row or (split and row[split_col] != split):  # type: ignore[index]
            continue
        path = row[image_col]  # type: ignore[index]
        image_uri = path if storage.is_s3(path) or path.startswith("/") else storage.join(base, path)
        rows.append((line, image_uri, row[label_col] if label_col is not None else None,
                     row[caption_col] if caption_col is not None else None))
    if not rows:
        raise ValueError(f"evaluation set {uri}: no rows" + (f" with split {split!r}" if split else ""))
    names = None
    if label_col is not None:
        names_file = first_existing(storage.join(base, "classnames.txt"))
        names = list(classnames) if classnames else (read_lines(names_file) if names_file else None)
        if names is None:
            labels = sorted({r[2].strip() for r in rows if r[2]})
            if any(re.fullmatch(r"-?\d+", lb) for lb in labels):
                raise ValueError(f"evaluation set {uri}: integer labels need class names (classnames.txt beside "
                                 "the CSV or the suite's classnames)")
            names = labels
    if limit:
        rows = rows[:limit] if names is None else _balanced(rows, limit)
    return CsvSet(root=uri, location=uri, kind="csv", classnames=names, has_captions=caption_col is not None,
                  rows=rows)


def _balanced(rows: list, limit: int) -> list:
    by_label: dict[str, list] = {}
    for r in rows:
        by_label.setdefault((r[2] or "").strip(), []).append(r)
    order = sorted((i, label, r) for label, rs in by_label.items() for i, r in enumerate(rs))
    return sorted((r for _i, _label, r in order[:limit]), key=lambda r: r[0])
