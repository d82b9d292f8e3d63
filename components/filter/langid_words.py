"""The word-level evidence of the language rule (components/filter/langid.py): a caption's common words, the
function words per language, the English word list and how much of a caption's wording is English.

    word_evidence("Croque monsieur for lunch", against="fr")   # Evidence(english=2.0, other=0.6)
    without_loans("Dior Sauvage eau de parfum 100ml")          # ("Dior Sauvage   100ml", 1)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
FUNCTION_WORDS = DATA / "function_words.tsv"  # language <TAB> space-separated function words (hand-written)
ENGLISH_WORDS = DATA / "english_words.tsv"  # one English word a line, made by data/make_english_words.py

UNKNOWN_WEIGHT = 0.6  # word evidence: the weight against English of a lowercase word in no list (a foreign word,
                      # or an English one the generated list lacks, such as a loanword: "espresso")
TITLE_SHARE = 0.8  # word evidence: a caption whose words are this capitalised is title-cased ("Cast Iron Skillet")
NAME_WEIGHT = 0.25  # word evidence: the weight of a capitalised word inside the caption (a brand, a place)
# measures and their units, neutral in the word evidence ("60 ml", "70cl" is a number and counts for nothing)
UNITS = frozenset("ml cl dl l mm cm km m kg g mg lb lbs oz fl qt gal gb tb mb mah w kw v hz mhz ghz pcs pc x".split())
# phrases English borrows whole, which count as one English word and whose own words count nothing (their
# "de", "au", "pour" are not French function words in "Dior Sauvage eau de parfum 100ml"): the trade terms of
# perfume and cosmetics and the borrowings of English dictionaries (hand-written; matched case-insensitively,
# accents optional)
LOAN_PHRASES = ("eau de parfum", "eau de toilette", "eau de cologne", "eau fraiche", "extrait de parfum",
                "pour homme", "pour femme", "a la carte", "a la mode",
                "au gratin", "au lait", "au jus", "au naturel", "du jour", "de luxe", "al dente", "al fresco",
                "con carne", "creme fraiche", "creme brulee", "creme caramel", "pain au chocolat",
                "pains au chocolat", "fleur de sel", "en suite", "en route", "bon appetit", "deja vu",
                "joie de vivre", "haute couture", "pret a porter", "art nouveau", "art deco", "belle epoque",
                "hors d'oeuvres", "objet d'art", "tour de force", "piece de resistance", "trompe l'oeil",
                "papier mache", "fleur de lis", "creme de la creme", "savoir faire", "coup de grace")
# lowercase words that are part of a name when they stand between two name tokens ("Lula da Silva")
NAME_PARTICLES = frozenset("d da das de del dela della dell dei degli delle den der des di do dos du e el "
                           "la las le les lo los ob op te ten ter van von y zu".split())



@lru_cache(maxsize=1)
def function_words(path: Path = FUNCTION_WORDS) -> dict[str, frozenset[str]]:
    """{language: its function words} from data/function_words.tsv."""
    out = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if line.startswith("#"):
            continue
        lang, sep, words = line.partition("\t")
        if not sep or not words.split():
            raise ValueError(f"{path}: line {number} {line!r} is not LANGUAGE<TAB>words")
        out[lang] = frozenset(words.split())
    return out


def common_words(text: str) -> list[str]:
    """The caption's lowercase words that are not names: without hashtags, mentions, tokens with digits,
    capitals (brands, places, names, acronyms) or no letters (emoji), nor name particles between two
    such tokens ("Lago di Braies", "Rothenburg ob der Tauber")."""
    tokens = text.split()
    named = [t[0] in "#@" or not any(c.isalpha() for c in t) or any(c.isdigit() or c.isupper() for c in t)
             for t in tokens]
    words = [t.strip(".,;:!?()[]\"'«»“”‘’").lower() for t in tokens]
    if tokens and any(words[0] in vocab for vocab in function_words().values()):
        named[0] = False  # "The", "Les", "Ein": a capital that only starts the sentence
    for i, word in enumerate(words):
        if named[i] or word not in NAME_PARTICLES or i == 0 or not named[i - 1]:
            continue
        j = i
        while j < len(words) and not named[j] and words[j] in NAME_PARTICLES and j - i < 2:
            j += 1
        if j < len(words) and named[j] and tokens[j][0] not in "#@" and any(c.isalpha() for c in tokens[j]):
            for m in range(i, j):
                named[m] = True
    return [w for w, n in zip(words, named) if not n and any(c.isalpha() for c in w)]


def fold(text: str) -> str:
    """`text` lowercased without accents, character for character ("Crème" -> "creme", "’" -> "'"), so that
    positions in it are positions in `text`."""
    out = []
    for char in text.lower():
        base = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        out.append("'" if char in "’‘" else base if len(base) == 1 else char)
    return "".join(out)


@lru_cache(maxsize=1)
def _loan_pattern() -> re.Pattern:
    phrases = sorted(LOAN_PHRASES, key=len, reverse=True)
    return re.compile(r"(?<![\w'])(?:" + "|".join(re.escape(p).replace(r"\ ", r"[\s-]+") for p in phrases)
                      + r")(?![\w'])")


def without_loans(text: str) -> tuple[str, int]:
    """(`text` without the `LOAN_PHRASES` it holds, how many it held): "Chanel No. 5 eau de parfum" ->
    ("Chanel No. 5 ", 1)."""
    found = list(_loan_pattern().finditer(fold(text)))
    for match in reversed(found):
        text = text[:match.start()] + " " + text[match.end():]
    return text, len(found)


@lru_cache(maxsize=1)
def english_words(path: Path = ENGLISH_WORDS) -> frozenset[str]:
    """The English word list of data/english_words.tsv (generated; see data/make_english_words.py)."""
    return frozenset(line for line in path.read_text(encoding="utf-8").splitlines() if line and line[0] != "#")


@dataclass(frozen=True)
class Evidence:
    """How much of a caption's wording is English: `english` and `other` are weighted word counts."""
    english: float
    other: float

    @property
    def share(self) -> float:
        total = self.english + self.other
        return self.english / total if total else 0.0


def word_evidence(text: str, against: str = "") -> Evidence:
    """English word evidence for a caption. Each word, split at hyphens and slashes, without a trailing "'s":
    an English function word or listed English word counts 1 for English; another language's function word
    or an unknown lowercase word ("monsieur", "aperitivo") counts `UNKNOWN_WEIGHT` against; a function word
    of English and of another language ("in", "a") half each. Hashtags, mentions, emoji, tokens with digits
    (model numbers, sizes), units (ml, cl, GB) and acronyms count nothing. A capitalised word is a name
    (nothing) unless it is a known word, which counts `NAME_WEIGHT` ("Classic", "Les"), or fully where the
    capital says nothing: the first word ("Sunset over ...") and every word of a title-cased caption
    ("Smooth Leather Lace Up Boots"). A first word that is another language's article or preposition before
    a capitalised word starts a name ("Le Creuset", "La Boqueria", "El Calafate"). With `against`, the
    language English is weighed against (the first answer's), only that language's function words count
    against English, and an English function word that is not one of its own counts for English in full
    ("for" in "Crème brûlée for two", against fr; against sv, "for" counts half each)."""
    vocab, english = function_words(), english_words()
    text, loans = without_loans(text)
    ours = vocab.get("en", frozenset())
    theirs = vocab[against] if against in vocab and against != "en" else _foreign_function_words()
    tokens = [t for t in text.split() if t[0] not in "#@" and not any(c.isdigit() for c in t)
              and any(c.isalpha() for c in t)]
    capitals = [any(c.isupper() for c in t) for t in tokens]  # "Duna-parton": a name, all of it
    title = len(tokens) >= 3 and sum(capitals) >= TITLE_SHARE * len(tokens)
    en, other = float(loans), 0.0
    for i, token in enumerate(tokens):
        for part in token.replace("/", "-").split("-"):
            word = part.strip(".,;:!?()[]{}\"'«»“”‘’*…").removesuffix("'s").removesuffix("’s")
            if not word or (len(word) > 1 and word.isupper()) or word.lower() in UNITS:
                continue
            low = word.lower()
            if not capitals[i] and low in NAME_PARTICLES and _between_names(capitals, i):
                continue  # "Acqua di Parma", "Plaza de la Reina": part of a name
            known_en = low in ours or low in english or (len(low) >= 4 and not low.isascii() and fold(low) in english)
            known_other = low in theirs
            if not capitals[i]:
                weight = 1.0 if known_en or known_other else 0.0
            elif not (known_en or known_other):
                continue  # a name
            elif i == 0 and known_other and not known_en and len(tokens) > 1 and capitals[1]:
                continue  # "Le Creuset": the article of a name
            else:
                weight = 1.0 if title or (i == 0 and token[1:].islower()) else NAME_WEIGHT
            if low in ours and known_other:
                en, other = en + weight / 2, other + weight / 2
            elif known_other:
                other += weight
            elif known_en:
                en += weight
            else:  # another language's function word ("uz" against pl) counts in full, an unknown word less
                other += 1.0 if low in _foreign_function_words() else UNKNOWN_WEIGHT
    return Evidence(en, other)


def _between_names(capitals: list[bool], i: int) -> bool:
    """Whether token `i` stands between two capitalised tokens, with at most one other token beside it."""
    before = i > 0 and capitals[i - 1]
    after = next((capitals[j] for j in range(i + 1, min(i + 3, len(capitals))) if capitals[j]), False)
    return bool(before and after)


@lru_cache(maxsize=1)
def _foreign_function_words() -> frozenset[str]:
    return frozenset().union(*(words for lang, words in function_words().items() if lang != "en"))



@lru_cache(maxsize=8)
def _allowed_function_words(allowed: tuple[str, ...]) -> frozenset[str]:
    vocab = function_words()
    return frozenset().union(*(vocab.get(lang, ()) for lang in allowed))
