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


def test_common_words_drop_names_and_keep_a_sentence_start():
    from components.filter.langid_words import common_words

    assert common_words("Ikea Kallax shelf") == ["shelf"]
    assert common_words("The Alhambra from the Mirador de San Nicolás") == ["the", "from", "the"]
    assert common_words("Lula da Silva speaks at the Planalto Palace") == ["speaks", "at", "the"]
    assert common_words("Sunday brunch vibes ☕🥐 #brunch @cafe 2024") == ["brunch", "vibes"]
    assert common_words("Verkaufe mein iPhone 13 mit Hülle") == ["mein", "mit"]


def test_the_second_look_keeps_english_carried_by_names_and_says_why():
    ident = LanguageIdentifier("cascade", allowed=("en",))
    fast = LanguageIdentifier("fasttext")
    caption = "A Deutsche Bahn ICE train at Frankfurt Hauptbahnhof."
    assert fast.identify(caption)[0] == "de"  # the names alone carry it
    decision = ident.decide(caption)
    assert decision.language == "en" and decision.runner_up == "de" and "function words" in decision.why
    german = ident.decide("Verkaufe mein altes Fahrrad mit Korb und Licht")
    assert german.language == "de" and german.runner_up and german.detail().startswith("language de (")
    batch = ident.identify_batch(["Ikea Kallax shelf", "Il mio gatto che dorme"])
    single = ident.identify("Il mio gatto che dorme")
    assert [lang for lang, _ in batch] == ["en", "it"] and batch[1] == (single[0], pytest.approx(single[1]))


def test_the_english_word_list_is_what_its_script_makes():
    from components.filter.data.make_english_words import build
    from components.filter.langid_words import english_words

    words = english_words()
    assert sorted(words) == build(), "english_words.tsv is stale: run components/filter/data/make_english_words.py"
    assert {"the", "shelf", "sneakers", "lunch", "espresso", "dog", "sky"} <= words  # lingua alone drops dog, sky
    assert not {"de", "und", "que", "casa", "avec", "playa", "monsieur"} & words     # foreign, or function words


def test_word_evidence_weighs_words_not_names_numbers_or_units():
    from components.filter.langid_words import NAME_WEIGHT, UNKNOWN_WEIGHT, word_evidence

    assert word_evidence("Heineken 0.0 alcohol free lager 6 x 330ml") == word_evidence("alcohol free lager")
    gaggia = word_evidence("a Gaggia Classic machine")  # "a": English and Portuguese; "Classic": a known word, capitalised
    assert (gaggia.english, gaggia.other) == (0.5 + NAME_WEIGHT + 1, 0.5)
    croque = word_evidence("Croque monsieur for lunch", against="fr")  # "Croque": a name; "monsieur": unknown
    assert (croque.english, croque.other) == (2.0, UNKNOWN_WEIGHT) and croque.share == 2 / (2 + UNKNOWN_WEIGHT)
    assert word_evidence("Smooth Leather Lace Up Boots").english == 5.0  # title case: the capitals say nothing
    assert word_evidence("Le Creuset Dutch oven").other == 0.0          # an article that starts a name
    assert word_evidence("Le chat dormait").other == 1 + UNKNOWN_WEIGHT  # a French article, an unknown word
    assert word_evidence("Šetnja uz more").other == 1.0  # "uz": a Croatian function word counts in full
    assert word_evidence("Huawei Watch GT 4 46mm #smartwatch @huawei").english == 1.0  # title-cased
    fish = "Bowl of bouillabaisse for two"  # "bouillabaisse": an unknown word, weighed UNKNOWN_WEIGHT
    assert word_evidence(fish, against="fr").share == pytest.approx(4 / (4 + UNKNOWN_WEIGHT))  # "for": not French
    assert word_evidence(fish, against="da").share == pytest.approx(3.5 / (4 + UNKNOWN_WEIGHT))  # ... but Danish
    # a loan phrase is one English word, and its own words ("de", "pour") count nothing
    perfume = word_evidence("Kilian Black Phantom eau de parfum pour homme 50ml", against="fr")
    assert perfume.other == 0.0 and perfume.english >= 2.0
    assert word_evidence("Crème brûlée for two", against="fr").share == 1.0
    assert word_evidence("Acqua di Parma Colonia 100ml") == word_evidence("")  # "di" between two names
    assert word_evidence("Sunday café crawl").other == 0.0  # "café" is "cafe" without its accent
    assert word_evidence("Cupra Formentor VZ2 2.0 TSI") == word_evidence("")  # nothing but names and numbers


def test_english_words_keep_a_caption_the_identifiers_give_away_and_say_why():
    ident = LanguageIdentifier("cascade", allowed=("en",))
    decision = ident.decide("Porto Ribeira riverside")  # lingua: pt 0.72
    assert decision.language == "en" and decision.runner_up == "pt" and decision.why.startswith("English words")
    names = ident.decide("Lenovo ThinkPad X1 Carbon Gen 11")
    assert names.language == "en"
    for foreign in ("Verkaufe mein altes Fahrrad mit Korb und Licht", "Dimanche matin au marché avec les enfants",
                    "Paseo por el parque con mi perro"):
        assert ident.identify(foreign)[0] != "en", ident.decide(foreign)


def test_loan_phrases_foreign_function_words_and_names_that_guess_english():
    from components.filter.langid_words import fold, without_loans

    assert fold("Crème Brûlée’s") == "creme brulee's" and len(fold("Crème Brûlée’s")) == len("Crème Brûlée’s")
    assert without_loans("YSL Libre Eau-de-Parfum 90ml") == ("YSL Libre   90ml", 1)
    assert without_loans("Beau de parfum") == ("Beau de parfum", 0)  # whole words only
    ident = LanguageIdentifier("cascade", allowed=("en",))
    for english in ("Dior Homme Intense eau de parfum 100ml", "Red door in Dublin", "Croissant and café crème"):
        assert ident.identify(english)[0] == "en", ident.decide(english)
    french = ident.decide("Mon chat qui dort")  # lingua: en 0.10 against fr 0.13, but "mon" and "qui" are French
    assert french.language == "fr" and french.runner_up == "en" and "fr function words (mon, qui)" in french.why
    for foreign in ("Frisch gebackenes Brot",  # no English word at all: lingua's English is a guess
                    "Šetnja uz more"):         # "uz" is Croatian as much as "more" is English
        assert ident.identify(foreign)[0] != "en", ident.decide(foreign)
