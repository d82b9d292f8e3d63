"""The hand-written web caption set (`web_captions.tsv`) and its fixed held-out part.

    rows = load()                      # every WebCaption
    held = load(split="heldout")       # about 35 %: report on it, never tune on it

The TSV was written by hand for this project (licence: the project's): product titles with brands and
sizes, news captions with names and places, hashtags and emoji, 3-5-word captions, English travel
captions with foreign place names, alt text, and non-English captions that carry English brand names,
in English and 32 other languages. Lines starting with "#" are its header comment.

`web_captions_fresh.tsv` (`load(path=WEB_CAPTIONS_FRESH)`): 918 captions written later, held out for one round
of tuning; its errors were then looked at, so it is tuning data now.
`web_captions_tune.tsv` (`load(path=WEB_CAPTIONS_TUNE)`): 400 more hand-written captions, all for tuning
(English carried by foreign brands, places and dishes), none repeating a row of the other files.
`web_captions_heldout.tsv` (`load(path=WEB_CAPTIONS_HELDOUT)`): the clean held-out set, 1,183 captions (750
English, 433 in 27 other languages, also perfume and cosmetics titles, English food captions with foreign
dish names, recipe titles), committed before the rules were changed again; only its aggregate figures are
read (issue 22), and nothing is tuned on it.

The held-out part is chosen by a stable hash of the caption (sha1, so it does not depend on row order
or on Python's hash seed): adding captions never moves an existing one between the parts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

WEB_CAPTIONS = Path(__file__).resolve().parent / "web_captions.tsv"
WEB_CAPTIONS_FRESH = Path(__file__).resolve().parent / "web_captions_fresh.tsv"  # held out once, tuned on since
WEB_CAPTIONS_TUNE = Path(__file__).resolve().parent / "web_captions_tune.tsv"  # more tuning captions, none held out
WEB_CAPTIONS_HELDOUT = Path(__file__).resolve().parent / "web_captions_heldout.tsv"  # the clean held-out set
HELDOUT_PERCENT = 35  # captions whose hash bucket (0-99) is below this are held out
SPLITS = ("all", "tune", "heldout")
COLUMNS = ["language", "kind", "caption"]


@dataclass(frozen=True)
class WebCaption:
    language: str  # ISO 639-1 code of the caption's language
    kind: str      # product | news | social | short | travel | alt | brand, and in the held-out set also food |
                   # recipe (see the module doc and the files' headers)
    caption: str   # the caption as the web writes it


def is_heldout(caption: str) -> bool:
    """True for captions in the fixed held-out part (a stable hash bucket below HELDOUT_PERCENT)."""
    return int(hashlib.sha1(caption.encode("utf-8")).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def load(split: str = "all", path: str | Path = WEB_CAPTIONS) -> list[WebCaption]:
    """The set's rows in file order: `all`, `tune` (never held out) or `heldout`."""
    if split not in SPLITS:
        raise ValueError(f"web captions split {split!r}: choose one of {SPLITS}")
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    if not lines or lines[0].split("\t") != COLUMNS:
        raise ValueError(f"{path}: the first line after the comment must be the header {COLUMNS}")
    rows = []
    for number, line in enumerate(lines[1:], start=2):
        parts = line.split("\t")
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"{path}: row {number} {line!r} needs three non-empty tab-separated columns {COLUMNS}")
        rows.append(WebCaption(*parts))
    if split == "all":
        return rows
    return [r for r in rows if is_heldout(r.caption) == (split == "heldout")]
