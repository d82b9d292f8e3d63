"""Language identification on short captions, measured on the committed evaluation set."""

from __future__ import annotations

from collections import Counter

import pytest

from components.filter.data.make_langid_eval import build
from components.filter.langid import EVAL_SET, LanguageIdentifier, load_eval_set


def test_the_evaluation_set_is_what_its_script_makes():
    rows = load_eval_set()
    assert rows == build(), "langid_eval.tsv is stale: run components/filter/data/make_langid_eval.py"
    per_language = Counter(lang for lang, _ in rows)
    assert len(rows) >= 1000 and len(per_language) >= 8 and per_language["en"] >= 300
    assert len({text for _, text in rows}) == len(rows)
    spaced = [text for lang, text in rows if lang not in ("zh", "ja")]
    assert all(3 <= len(text.split()) <= 12 for text in spaced)
    assert EVAL_SET.name == "langid_eval.tsv"


def test_cascade_keeps_english_and_rejects_the_rest():
    """The default rule (only English allowed): <= 1 % of English lost, >= 95 % of the others rejected."""
    rows = load_eval_set()
    ident = LanguageIdentifier("cascade", allowed=("en",))
    predicted = [ident.identify(text)[0] for _, text in rows]
    english = [p for (lang, _), p in zip(rows, predicted) if lang == "en"]
    others = [p for (lang, _), p in zip(rows, predicted) if lang != "en"]
    assert sum(p != "en" for p in english) <= 0.01 * len(english)
    assert sum(p != "en" for p in others) >= 0.95 * len(others)
    assert ident.lingua_calls < len(rows)  # fastText settles the confident English captions alone
    assert ident.identify("a photo of a rusty bicycle on a snowy street")[0] == "en"  # fastText alone: pl 0.66


def test_fasttext_alone_is_what_the_cascade_fixes():
    fast = LanguageIdentifier("fasttext")
    assert fast.identify("a photo of a rusty bicycle on a snowy street")[0] == "pl"
    with pytest.raises(ValueError, match="language identifier"):
        LanguageIdentifier("cld3")
    assert LanguageIdentifier("cascade").identify("   ") == ("", 0.0)
