"""Per-record filter rules: image decoding, caption checks, language and privacy.

`analyse(record, uid, cfg)` applies every rule that needs only the record itself and returns one row
of metadata (no image bytes) with the first failing rule as `reason` ("" when the record passes). The
rules that need the whole dataset (duplicates, CLIP score, concept cap, language quota) are in
decide.py; language identification is in langid.py.
"""

from __future__ import annotations

import io
import re
import warnings

from PIL import Image

from components.common.image_hash import phash
from components.filter.config import PRIVACY_KINDS, FilterConfig
from components.filter.dedup import normalize_caption, sha256_bytes
from components.filter.langid import Decision, identifier
from components.filter.sources import RawRecord

# --------------------------------------------------------------------------- privacy
# Personal data the privacy rule finds (PRIVACY_KINDS). What is *not* personal data stays in the caption:
# a bare domain name of a venue, shop or brand ("Crypto.com Arena", "Booking.com"), any link in a credit
# ("Photo: flickr.com/photos/...", "via https://unsplash.com/..."), years, sizes, scores, model numbers.

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# a link: a scheme or www., or a domain followed by a path; a bare domain ("Booking.com") is not one
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"']*[^\s<>\"'.,;:!?)\]]|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*"
                  r"\.(?:com|org|net|io|co|de|fr|es|uk|info|biz)/[^\s<>\"']*[^\s<>\"'.,;:!?)\]]", re.IGNORECASE)
# words that open a credit or a source line: a link after one of them is attribution, not personal data
_CREDIT = re.compile(r"(?:\b(?:photo(?:graph)?s?|image|picture|pic|credits?|source|via|courtesy|copyright|"
                     r"foto|bild|quelle|fuente|crédito|fonte)\b|©|\(c\)|📷|📸)[^.!?\n]{0,40}$", re.IGNORECASE)
_DIGITS = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{5,}\d(?!\w)")
_PHONES = (
    re.compile(r"(?<![\w+])\+\d{1,3}[\s.-]?\(?\d{1,4}\)?(?:[\s.-]?\d{2,4}){2,4}(?!\w)"),   # +1 415-555-0132
    re.compile(r"(?<![\w(])\(?\d{3}\)?[\s.-]\d{3}[\s.-]\d{4}(?!\w)"),                    # (415) 555-0132
    re.compile(r"(?<![\w.])0\d{1,4}(?:[\s./-]?\d{2,4}){2,4}(?![\w.])"),                  # 020 7946 0958
    re.compile(r"(?:\b(?:tel|phone|call|mobile|cell|whatsapp|fax|ph|telefon|téléphone|tél|teléfono|handy)\b"
               r"\.?:?\s*)(\+?\(?\d[\d\s().-]{4,}\d)", re.IGNORECASE),                   # call 5550132
)
_ID = (
    re.compile(r"\b\d{3}-\d{2}-\d{4}\b"),                                                   # US SSN
    re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,3})?\b"),             # IBAN
    re.compile(r"\b(?:passport|ssn|social security|national insurance|ni number|nino|driver'?s? licen[cs]e|"
               r"licen[cs]e|tax id|tin|dni|nie|nif|personalausweis|ausweis|steuer-?id|codice fiscale|bsn|pesel|"
               r"ahv|id card|identity card|id)(?:\s*(?:no\.?|number|nr\.?|#|:))+\s*[A-Z0-9][A-Z0-9 -]{3,}\d",
               re.IGNORECASE),                                                              # passport no. X1234567
    re.compile(r"\b(?:passport|ssn|personalausweis|dni|nie|pesel|bsn)\s+[A-Z]{0,3}\d{6,}\b", re.IGNORECASE),
)
_STREET = (r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Place|Pl|Terrace|Crescent|"
           r"Close|Way|Parkway|Pkwy|Highway|Hwy)\b\.?")
_ADDRESS = (
    # 221B Baker Street, 1600 Amphitheatre Parkway, 12 Elm St, apt 4
    re.compile(r"\b\d{1,5}[A-Za-z]?,? (?:[A-Z][\w'’-]+ ){1,3}" + _STREET + r"(?:,? (?:apt|unit|suite|flat)\.? ?\w+)?"),
    # Hauptstraße 12, Kalverstraat 5a, Via Roma 10, Rua Augusta 120, Calle Mayor 3, ul. Długa 5
    re.compile(r"\b(?:[A-ZÄÖÜ][\wäöüß-]*(?:stra(?:ß|ss)e|str\.|weg|gasse|allee|platz|straat|gracht|laan|plein|"
               r"vej|gatan|gata|veien)|(?:Via|Viale|Piazza|Rua|Avenida|Calle|Carrer|Rue|ul\.|ulica) [A-Z][\w'’-]+"
               r"(?: [A-Z][\w'’-]+)?),? \d{1,4}[a-zA-Z]?\b(?![.,]\d)"),
    # 12 rue de la Paix, 3 avenue Foch, 10 place des Vosges
    re.compile(r"\b\d{1,4}(?: ?bis| ?ter)?,? (?:rue|avenue|av\.|boulevard|bd|place|chemin|allée|impasse|quai) "
               r"(?:d[eu]s? |de la |de l'|du )?[A-Z][\w'’-]+", re.IGNORECASE),
)
# famous official or landmark addresses that news and travel captions name (not anyone's private data)
PUBLIC_ADDRESSES = ("10 downing street", "1600 pennsylvania avenue", "221b baker street", "55 rue du faubourg")


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum used by payment card numbers."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _in_credit(text: str, start: int) -> bool:
    return bool(_CREDIT.search(text[max(0, start - 60):start]))


def find_private(text: str, kinds: tuple[str, ...] = PRIVACY_KINDS) -> list[tuple[str, int, int]]:
    """(kind, start, end) spans of personal data in `text`, without overlaps: e-mail addresses, phone
    numbers (international, North American, national with a leading 0, or after "call"/"tel"), card
    numbers (13-19 digits passing Luhn), ID numbers (SSN, IBAN, or a number after passport/ID no./...),
    street addresses (a house number with a street) and links to pages (a scheme, www. or a path; a bare
    domain such as "Booking.com" and a link in a credit are not personal data)."""
    spans: list[tuple[str, int, int]] = []
    if "email" in kinds:
        spans += [("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if "url" in kinds:
        spans += [("url", m.start(), m.end()) for m in _URL.finditer(text) if not _in_credit(text, m.start())]
    if "card" in kinds:
        for m in _DIGITS.finditer(text):
            digits = re.sub(r"\D", "", m.group())
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                spans.append(("card", m.start(), m.end()))
    if "id" in kinds:
        spans += [("id", m.start(), m.end()) for pattern in _ID for m in pattern.finditer(text)]
    if "phone" in kinds:
        for pattern in _PHONES:
            for m in pattern.finditer(text):
                start, end = m.span(m.lastindex or 0)
                digits = re.sub(r"\D", "", text[start:end])
                if 7 <= len(digits) <= 15 and not (pattern is _PHONES[2] and len(digits) < 9):
                    spans.append(("phone", start, end))
    if "address" in kinds:
        lowered = text.lower()
        spans += [("address", m.start(), m.end()) for pattern in _ADDRESS for m in pattern.finditer(text)
                  if not any(lowered.startswith(p, m.start()) for p in PUBLIC_ADDRESSES)]
    order = {kind: i for i, kind in enumerate(("email", "url", "card", "id", "phone", "address"))}
    spans.sort(key=lambda s: (s[1], -(s[2] - s[1]), order[s[0]]))
    out: list[tuple[str, int, int]] = []
    for s in spans:
        if not out or s[1] >= out[-1][2]:
            out.append(s)
    return out


def scrub(text: str, spans: list[tuple[str, int, int]]) -> str:
    """Replace each span with a placeholder such as <email>."""
    for kind, start, end in sorted(spans, key=lambda s: s[1], reverse=True):
        text = text[:start] + f"<{kind}>" + text[end:]
    return text


# --------------------------------------------------------------------------- images

_OBJECT_AT = re.compile(r" at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f..>": differs run to run

def decode_image(data: bytes, max_pixels: int = 0) -> tuple[Image.Image | None, str, str]:
    """(image, reason, detail): decode fully under the pixel limit. reason is "" on success,
    else decompression_bomb or corrupt_image (verify() does not decode, so reopen and load())."""
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as probe:
                w, h = probe.size
                if limit and w * h > limit:
                    return None, "decompression_bomb", f"{w}x{h} = {w * h} pixels > limit {limit}"
                probe.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
        return img, "", ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return None, "decompression_bomb", str(e)
    except Exception as e:  # noqa: BLE001 - any decoder failure is a corrupt image
        return None, "corrupt_image", _OBJECT_AT.sub("", f"{type(e).__name__}: {e}")


# --------------------------------------------------------------------------- one record

def empty_row(uid: int, key: str, source_uri: str, caption: str | None = None) -> dict:
    """A record's metadata row before any rule ran (`reason` "" = passes so far)."""
    return {"uid": uid, "key": key, "source_uri": source_uri, "reason": "", "detail": "",
            "caption": caption, "caption_norm": "", "width": 0, "height": 0, "language": "",
            "language_score": 0.0, "sha256": "", "phash": 0}


def analyse(rec: RawRecord, uid: int, cfg: FilterConfig, language: bool = True) -> dict:
    """Apply the per-record rules; the row's `reason` is the first failing rule ("" = passes). With
    `language=False` the last rule, language, is left to the caller (`language_rule`, e.g. with the
    answers of a model actor for a whole batch)."""
    row = empty_row(uid, rec.key, rec.source_uri, rec.caption if isinstance(rec.caption, str) else None)

    def reject(reason: str, detail: str) -> dict:
        row["reason"], row["detail"] = reason, detail
        return row

    if rec.error or rec.image is None:
        return reject(rec.error_reason or "unreadable", rec.error or "no image bytes")
    if rec.caption is None:
        return reject("missing_caption", f"{rec.key}: no caption")
    img, reason, detail = decode_image(rec.image, cfg.max_pixels)
    if img is None:
        return reject(reason, detail)
    w, h = img.size
    row["width"], row["height"] = w, h
    row["sha256"] = sha256_bytes(rec.image)
    try:
        row["phash"] = phash(img)
    except Exception as e:  # noqa: BLE001
        return reject("corrupt_image", f"cannot hash the decoded image: {e}")
    if min(w, h) < cfg.min_side:
        return reject("too_small", f"{w}x{h}: shorter side {min(w, h)} < {cfg.min_side}")
    if cfg.max_aspect and max(w, h) / min(w, h) > cfg.max_aspect:
        return reject("aspect_ratio", f"{w}x{h}: aspect {max(w, h) / min(w, h):.2f} > {cfg.max_aspect}")
    caption = rec.caption.strip()
    if not caption:
        return reject("empty_caption", "caption is empty or whitespace")
    if cfg.privacy != "off":
        spans = find_private(caption, cfg.privacy_kinds)
        if spans:
            if cfg.privacy == "drop":  # the decision table keeps the caption without the personal data
                row["caption"] = scrub(caption, spans)
                return reject("privacy", "caption contains " + ", ".join(sorted({s[0] for s in spans})))
            caption = scrub(caption, spans)
    row["caption"] = caption
    row["caption_norm"] = normalize_caption(caption)
    words = len(caption.split())
    if words < cfg.min_words or len(caption) < cfg.min_chars:
        return reject("caption_too_short", f"{words} words, {len(caption)} characters "
                      f"(need >= {cfg.min_words} words and >= {cfg.min_chars} characters)")
    if not language:
        return row
    return language_rule(row, identifier(cfg.language_identifier, cfg.language_confident_score,
                                         cfg.languages).decide(caption), cfg)


def language_rule(row: dict, decision: Decision, cfg: FilterConfig) -> dict:
    """The language rule on a row that passed every other per-record rule, given its language decision."""
    score = round(decision.score, 9)  # the identifier's last bits vary from process to process; decisions must not
    lang = decision.language
    row["language"], row["language_score"] = lang, score
    if cfg.languages and lang not in cfg.languages:  # detail: language (score), runner-up (score): the rule
        row["reason"], row["detail"] = "language", f"{decision.detail()}; not in {list(cfg.languages)}"
    elif score < cfg.min_language_score:
        row["reason"], row["detail"] = "language", f"language {lang} scored {score:.2f} < min_language_score " \
                                                   f"{cfg.min_language_score}"
    return row
