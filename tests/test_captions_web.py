"""Captions as the web writes them (components/filter/data/web_captions.tsv, hand-written): the set itself,
the language rule's goals on its held-out part, the rejection's detail and what each preset drops."""

from __future__ import annotations

import io
import re
from collections import Counter

import pytest
from PIL import Image

from components.common import config
from components.filter.config import FilterConfig
from components.filter.data.web_captions import (HELDOUT_PERCENT, WEB_CAPTIONS, WEB_CAPTIONS_FRESH, WEB_CAPTIONS_HELDOUT,
                                                 WEB_CAPTIONS_TUNE, load)
from components.filter.langid import LanguageIdentifier
from components.filter.rules import analyse
from components.filter.sources import RawRecord

KINDS = {"product", "news", "social", "short", "travel", "alt", "brand"}


def test_the_set_is_large_varied_and_its_held_out_part_stable(tmp_path):
    rows = load()
    languages = Counter(r.language for r in rows)
    assert languages["en"] >= 1000 and len(rows) - languages["en"] >= 600 and len(languages) >= 25
    assert {r.kind for r in rows} == KINDS and len({r.caption for r in rows}) == len(rows)
    assert {r.kind for r in rows if r.language != "en"} == KINDS
    held, tune = load("heldout"), load("tune")
    assert sorted(held + tune, key=rows.index) == rows and not set(held) & set(tune)
    assert abs(len(held) / len(rows) - HELDOUT_PERCENT / 100) < 0.05
    lines = WEB_CAPTIONS.read_text(encoding="utf-8").splitlines()
    header = [line for line in lines if line.startswith("#") or line.startswith("language\t")]
    shuffled = tmp_path / "shuffled.tsv"  # the split depends on the caption, not on its row
    shuffled.write_text("\n".join(header + [line for line in lines if line not in header][::-1]), encoding="utf-8")
    assert set(load("heldout", shuffled)) == set(held)
    assert "hand-written" in " ".join(lines[:4]).lower()
    bad = tmp_path / "bad.tsv"
    bad.write_text("language\tkind\tcaption\nen\tshort\n", encoding="utf-8")
    with pytest.raises(ValueError, match="row 2"):
        load(path=bad)


def test_the_held_out_set_is_large_varied_and_new():
    """web_captions_heldout.tsv: written by hand and committed (a914ca8) before the language rules were changed
    again, never tuned on and never edited (its header says so; the commit order is the evidence). At least
    700 English and 420 other captions, >= 20 in each of the 12 most common other languages, and no caption
    that any other set holds."""
    held = load(path=WEB_CAPTIONS_HELDOUT)
    languages = Counter(r.language for r in held)
    foreign = Counter({lang: n for lang, n in languages.items() if lang != "en"})
    assert languages["en"] >= 700 and sum(foreign.values()) >= 420 and len(foreign) >= 25
    assert all(n >= 20 for _, n in foreign.most_common(12))
    assert {"de", "fr", "es", "it", "pt", "nl", "pl", "sv", "tr", "id", "ru", "ja"} == {l for l, _ in foreign.most_common(12)}
    assert {r.kind for r in held if r.language == "en"} == (KINDS - {"brand"}) | {"food", "recipe"}
    assert {r.kind for r in held if r.language != "en"} == (KINDS - {"travel"}) | {"recipe"}
    assert len({r.caption.lower() for r in held}) == len(held)
    others = load() + load(path=WEB_CAPTIONS_TUNE) + load(path=WEB_CAPTIONS_FRESH)
    assert not {r.caption.lower() for r in held} & {r.caption.lower() for r in others}
    header = " ".join(line for line in WEB_CAPTIONS_HELDOUT.read_text(encoding="utf-8").splitlines() if line[:1] == "#")
    assert "written by hand" in header and "never edited" in header and "licence" in header


def test_the_fresh_set_is_large_varied_and_new():
    """web_captions_fresh.tsv: written by hand and committed before the language rules were changed in the
    second round, and held out for that round only; its errors were looked at afterwards, so it is tuning
    data now (web_captions_heldout.tsv is the clean set). It shares no caption with web_captions.tsv."""
    fresh = load(path=WEB_CAPTIONS_FRESH)
    languages = Counter(r.language for r in fresh)
    assert languages["en"] >= 500 and len(fresh) - languages["en"] >= 300 and len(languages) - 1 >= 12
    assert {r.kind for r in fresh if r.language == "en"} == KINDS - {"brand"}
    assert {r.kind for r in fresh if r.language != "en"} == KINDS - {"travel"}
    assert len({r.caption for r in fresh}) == len(fresh)
    older = {r.caption.lower() for r in load() + load(path=WEB_CAPTIONS_TUNE)}
    assert not {r.caption.lower() for r in fresh} & older
    header = " ".join(line for line in WEB_CAPTIONS_FRESH.read_text(encoding="utf-8").splitlines() if line[:1] == "#")
    assert "written by hand" in header and "never edited" in header and "licence" in header


def _losses(rows) -> tuple[int, int, Counter, Counter]:
    """(English lost, English total, other languages kept as English per language, their totals) under the
    default preset's rule, only English allowed."""
    ident = LanguageIdentifier("cascade", allowed=("en",))
    decided = [(r.language, ident.decide(r.caption).language) for r in rows]
    english = [p for lang, p in decided if lang == "en"]
    kept = Counter(lang for lang, p in decided if lang != "en" and p == "en")
    return sum(p != "en" for p in english), len(english), kept, Counter(lang for lang, _ in decided if lang != "en")


def test_held_out_figures_of_the_english_only_rule():
    """On web_captions_heldout.tsv (the clean set: committed before the rules were last changed, never tuned on;
    only these aggregate figures were read), measured once when the rules were final and held here as bounds
    equal to the measurement. Before that round's changes (rules of commit a914ca8): English lost 12 of 750,
    other languages kept 4 of 433 (French 1 of 24, Indonesian 2 of 25, Danish 1 of 11).
    After: English lost 2 of 750 (0.27 %): issue 22's goal of <= 1 % is met. Other languages kept 3 of 433
    (0.7 %), none in 25 of the 27 languages, but Indonesian 2 of 25 (8 %) and Danish 1 of 11 (9 %): the
    goal of <= 5 % in every language is NOT met for those two."""
    lost, english, kept, totals = _losses(load(path=WEB_CAPTIONS_HELDOUT))
    assert english == 750 and lost <= 2
    assert sum(totals.values()) == 433 and sum(kept.values()) <= 3
    assert {lang for lang in kept if kept[lang]} <= {"id", "da"} and kept["id"] <= 2 and kept["da"] <= 1


def test_fresh_figures_of_the_english_only_rule():
    """On web_captions_fresh.tsv, now tuning data: English lost 3 of 600 (13 before this round's changes; the
    three are dish names, "Risotto alla milanese"), other languages kept 0 of 318 (5 before)."""
    lost, english, kept, totals = _losses(load(path=WEB_CAPTIONS_FRESH))
    assert english == 600 and lost <= 3
    assert sum(kept.values()) == 0 and sum(totals.values()) == 318


def test_the_first_sets_held_out_part_meets_the_goals():
    """On web_captions.tsv's held-out part (looked at while tuning before, so no longer clean; the fresh set
    above is the clean one): English lost <= 1 % (measured 0 of 460), other languages kept <= 5 % (1 of 228).
    Issue 22's own examples are kept."""
    lost, english, kept, totals = _losses(load("heldout"))
    assert lost <= 0.01 * english
    assert sum(kept.values()) <= 0.05 * sum(totals.values())
    ident = LanguageIdentifier("cascade", allowed=("en",))
    for caption in ("Ikea Kallax shelf", "Adidas Samba OG sneakers", "Used Volkswagen Golf GTI",
                    "Oktoberfest beer tent", "Dr. Martens 1460 boots", "Outside the Rijksmuseum, Amsterdam",
                    "Inside the Hofbräuhaus München beer hall"):
        assert ident.identify(caption)[0] == "en", (caption, ident.decide(caption))


def _record(key: str, caption: str) -> RawRecord:
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG")
    return RawRecord(key=key, source_uri=f"mem://{key}", image=buf.getvalue(), caption=caption)


def _reason(caption: str, preset: str) -> tuple[str, str]:
    row = analyse(_record("k", caption), 0, config.from_dict(FilterConfig, {"preset": preset}))
    return row["reason"], row["detail"]


def test_a_language_rejection_says_language_score_and_runner_up():
    reason, detail = _reason("Verkaufe mein altes Fahrrad mit Korb und Licht", "datacomp_basic")
    assert reason == "language"
    assert re.fullmatch(r"language de \(\d\.\d\d\), runner-up [a-z]{2,3} \(\d\.\d\d\): .+; not in \['en'\]", detail)


def test_what_each_preset_drops():
    venue = "LeBron James dunks against the Boston Celtics during the second half at Crypto.com Arena."
    for preset in ("datacomp_basic", "clip_wit"):
        assert _reason(venue, preset)[0] == ""  # a venue's domain name is not personal data
        assert _reason("Selling my bike, email jane.doe84@gmail.com", preset)[0] == "privacy"
    assert _reason("Koi pond", "datacomp_basic")[0] == "caption_too_short"  # DataComp: > 2 words
    assert _reason("Koi pond", "clip_wit")[0] == ""                         # any non-empty caption
    assert _reason("Unser neuer Hund", "datacomp_basic")[0] == "language"
    assert _reason("Unser neuer Hund", "clip_wit")[0] == ""                 # any language, balanced by quota
    wit = config.from_dict(FilterConfig, {"preset": "clip_wit"})
    assert wit.languages == () and wit.language_quotas() == {"*": 20000.0} and wit.privacy == "drop"
    assert config.from_dict(FilterConfig, {"preset": "none"}).privacy == "off"
    for dead in ("default", "permissive"):
        with pytest.raises(config.ConfigError, match=f"unknown preset '{dead}'"):
            config.from_dict(FilterConfig, {"preset": dead})
