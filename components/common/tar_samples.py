"""Webdataset tars made elsewhere (the filter's tar sources, the evaluation suite's CLIP_benchmark sets), read
with Python's `tarfile` in streaming mode ("r|*": plain, gzip, bz2 or xz), as webdataset itself reads them.

Decoding the images dominates the cost of reading such tars, so the full tar format (PAX records of every
kind, GNU names, hard links) is worth more here than speed; the project's own training shards, where the
per-sample cost of parsing counts, go through `components.common.tar_reader`. Samples come out as
webdataset's dicts, ``{"__key__", "__url__", "<extension>": bytes, ...}``, grouped by key (the member's path up
to the first dot of its file name; extensions in lower case). A tar that does not read raises
`ShardFormatError` naming it.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator

from components.common import storage
from components.common.tar_reader import ShardFormatError, group_members


def tar_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, data) of every regular file in one tar, local or s3:// (streamed through `storage.open_read`),
    in tar order; directories, links and devices hold no sample data."""
    try:
        with storage.open_read(url) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if info.isreg():
                    yield info.name, tar.extractfile(info).read()
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise ShardFormatError(f"{url}: not a readable tar ({exc})") from exc


def tar_samples(url: str) -> Iterator[dict]:
    """The samples of one tar, local or s3://."""
    yield from group_members(tar_members(url), url)
