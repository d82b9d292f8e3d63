"""CLIP text tokenizer on Hugging Face `tokenizers` (byte-level BPE).

Conventions (those of OpenAI CLIP):

- text is cleaned before tokenisation: a few ftfy-like fixes (html entities, common mojibake,
  curly quotes, ligatures, control characters), whitespace collapsed, lower-cased;
- every sequence is ``<start_of_text> ... <end_of_text>``, padded with id 0 to the context length
  (77 by default); truncation drops tokens from the end but keeps ``<end_of_text>`` last;
- the end-of-text id is the LARGEST id in the vocabulary, because the text tower pools at
  ``tokens.argmax(-1)``. A trained vocabulary is laid out as ``<pad>`` (id 0), the byte alphabet and
  merges, then ``<start_of_text>``, ``<end_of_text>`` last (49406 and 49407 at the default size,
  the same ids as OpenAI's tokenizer).

This module does not import torch at load time (`encode_np` serves torch-free ONNX inference);
`encode_batch` / calling the tokenizer returns a torch LongTensor.

Foreign ``tokenizer.json`` files (e.g. OpenAI's CLIP tokenizer exported by Hugging Face, which uses
``<|startoftext|>``/``<|endoftext|>``) load too, as long as they have start and end tokens and the end
token has the largest id.
"""

from __future__ import annotations

import html
import re
import time
import unicodedata
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    import torch

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
PAD_TOKEN = "<pad>"
DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_VOCAB_SIZE = 49408
_MAX_CHARS_PER_TOKEN = 64  # texts are cut to context_length * this many characters before tokenising

# Names under which other tokenizers spell the start/end tokens (ours first).
_SOT_ALIASES = (SOT_TOKEN, "<|startoftext|>", "<start_of_text>", "<s>", "<|begin_of_text|>")
_EOT_ALIASES = (EOT_TOKEN, "<|endoftext|>", "<end_of_text>", "</s>", "<|end_of_text|>")

# ---------------------------------------------------------------------------------------------
# Text cleaning (ftfy-like basics, without the ftfy dependency)
# ---------------------------------------------------------------------------------------------
try:  # use the real thing when it happens to be installed
    import ftfy as _ftfy  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None

_WHITESPACE = re.compile(r"\s+")
# UTF-8 text wrongly decoded as cp1252/latin-1 ("Ã©" for "é", "â€™" for "’"): a lead-byte character
# followed by 1-3 continuation-byte characters. Each such run is re-encoded and decoded as UTF-8.
_CONTINUATION = "\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc" \
    "\u2013\u2014\u2018\u2019\u201a\u201c\u201d\u201e\u2020\u2021\u2022\u2026\u2030\u2039\u203a\u20ac\u2122"
_MOJIBAKE = re.compile(f"[\u00c2-\u00f4][{_CONTINUATION}]{{1,3}}")
_FULLWIDTH = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F)}  # fullwidth ASCII -> ASCII
_CONTROL = re.compile("[\u0000-\u0008\u000e-\u001f\u007f-\u009f\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRANSLATE = str.maketrans(
    {
        "\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'",  # curly single quotes
        "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"',  # curly double quotes
        "\u00a0": " ", "\u2007": " ", "\u202f": " ",  # non-breaking spaces
        "\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",  # ligatures
        "\ufb05": "st", "\ufb06": "st",
        "\u00ad": "",  # soft hyphen
    }
)


def _undo_mojibake(match: re.Match[str]) -> str:
    run = match.group(0)
    try:
        raw = bytes(ord(c) if ord(c) < 256 else c.encode("cp1252")[0] for c in run)
        return raw.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return run


def basic_clean(text: str) -> str:
    """ftfy-like fixes: html entities (twice, as CLIP does), mojibake, quotes, ligatures, NFC."""
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    if not text.isascii():
        text = _MOJIBAKE.sub(_undo_mojibake, text)
        text = text.translate(_TRANSLATE).translate(_FULLWIDTH)
        text = unicodedata.normalize("NFC", text)
    return _CONTROL.sub("", text)


def clean_text(text: str) -> str:
    """The full CLIP cleaning: `basic_clean`, whitespace collapsed and stripped, lower-cased."""
    return _WHITESPACE.sub(" ", basic_clean(text)).strip().lower()


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------
def _find_token(tokenizer: Tokenizer, aliases: tuple[str, ...]) -> tuple[str, int] | None:
    for name in aliases:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None:
            return name, token_id
    return None


class ClipTokenizer:
    """Byte-level BPE tokenizer with CLIP's conventions. Call it on a string or a list of strings."""

    def __init__(self, tokenizer: Tokenizer, source: str = "<memory>"):
        sot = _find_token(tokenizer, _SOT_ALIASES)
        eot = _find_token(tokenizer, _EOT_ALIASES)
        missing = [what for what, found in (("start", sot), ("end", eot)) if found is None]
        if missing:
            raise ValueError(
                f"tokenizer {source}: no {' or '.join(missing)}-of-text token; a CLIP tokenizer needs "
                f"a start token (one of {list(_SOT_ALIASES)}) and an end token (one of {list(_EOT_ALIASES)})"
            )
        assert sot is not None and eot is not None
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        if eot[1] != vocab_size - 1:
            raise ValueError(
                f"tokenizer {source}: the end-of-text token {eot[0]!r} has id {eot[1]} but the largest id is "
                f"{vocab_size - 1}; CLIP pools text features at tokens.argmax(-1), so the end token must "
                "have the largest id"
            )
        self._tokenizer = tokenizer
        self._sot_token, self.sot_token_id = sot
        self._eot_token, self.eot_token_id = eot
        self.pad_token_id = 0
        # Does id 0 mean a dedicated padding token (ours) or a real token (OpenAI's "!")?
        self._pad_is_special = tokenizer.id_to_token(0) == PAD_TOKEN
        # OpenAI's vocabulary marks word ends with "</w>" (a BPE suffix) rather than a leading space.
        self._word_suffix = getattr(tokenizer.model, "end_of_word_suffix", None) or None
        # Padding and truncation are ours (a foreign file may pad with its end token, e.g. HF's CLIP).
        tokenizer.no_padding()
        tokenizer.no_truncation()
        # Every sequence gets <sot> ... <eot>.
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{self._sot_token} $A {self._eot_token}",
            special_tokens=[(self._sot_token, self.sot_token_id), (self._eot_token, self.eot_token_id)],
        )
        self.source = source

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = DEFAULT_VOCAB_SIZE,
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> ClipTokenizer:
        """Train a byte-level BPE on captions. `vocab_size` counts every token (pad, alphabet, merges,
        start and end); a small corpus may stop short of it, the ids stay laid out the same way."""
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 3:
            raise ValueError(f"vocab_size={vocab_size}: must be at least {len(alphabet) + 3} "
                             f"(pad + {len(alphabet)} byte symbols + start + end)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 2,  # leave room for <start_of_text>, <end_of_text> at the end
            min_frequency=min_frequency,
            special_tokens=[PAD_TOKEN],  # id 0
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )
        tokenizer.train_from_iterator(_cleaned(texts), trainer=trainer)
        # Added after training, so they take the two largest ids; end-of-text last.
        tokenizer.add_special_tokens([AddedToken(SOT_TOKEN, special=True), AddedToken(EOT_TOKEN, special=True)])
        return cls(tokenizer, source="<trained>")

    @classmethod
    def from_file(cls, path: str | Path) -> ClipTokenizer:
        """Load a Hugging Face ``tokenizer.json`` (ours or a foreign one)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"tokenizer file {path}: not a valid Hugging Face tokenizer.json ({exc})") from exc
        return cls(tokenizer, source=str(path))

    @classmethod
    def from_str(cls, json_text: str, source: str = "<string>") -> ClipTokenizer:
        """Load from the JSON text of a ``tokenizer.json`` (e.g. read from object storage)."""
        try:
            tokenizer = Tokenizer.from_str(json_text)
        except Exception as exc:
            raise ValueError(f"tokenizer {source}: not a valid Hugging Face tokenizer.json ({exc})") from exc
        return cls(tokenizer, source=source)

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (parent folders are created)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(path))

    def to_str(self) -> str:
        return self._tokenizer.to_str()

    # -- properties -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    # -- encoding -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of one text with start and end tokens, neither truncated nor padded."""
        return self._tokenizer.encode(clean_text(self._strip_specials(text))).ids

    def encode_np(self, texts: list[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
        """int64 array [B, context_length]: ``<sot> tokens <eot> 0 0 ...``; too long texts are cut so
        that ``<eot>`` is the last token. Stateless (safe to share between threads)."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: must be at least 2 (start and end tokens)")
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{i}: expected str, got {type(text).__name__}")
        # Only the first tokens survive truncation: don't tokenise megabytes of a pathological caption.
        max_chars = context_length * _MAX_CHARS_PER_TOKEN
        cleaned = [clean_text(self._strip_specials(t[:max_chars])) for t in texts]
        out = np.full((len(cleaned), context_length), self.pad_token_id, dtype=np.int64)
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        for row, encoding in zip(out, encode(cleaned)):
            ids = encoding.ids
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eot_token_id]
            row[:len(ids)] = ids
        return out

    def encode_batch(self, texts: list[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor[B, context_length], as `encode_np`."""
        import torch

        return torch.from_numpy(self.encode_np(texts, context_length))

    __call__ = encode_batch

    def _strip_specials(self, text: str) -> str:
        # A caption that literally contains the end token would otherwise move the pooling position.
        if "<" in text:
            for token in {self._sot_token, self._eot_token, SOT_TOKEN, EOT_TOKEN, PAD_TOKEN}:
                text = text.replace(token, " ")
        return text

    def decode(self, ids: torch.Tensor | np.ndarray | Iterable[int]) -> str:
        """Text of one sequence of ids, without start, end and padding tokens (stops at the end token)."""
        if hasattr(ids, "shape") and hasattr(ids, "tolist"):  # torch tensor or numpy array
            if len(ids.shape) != 1:
                raise ValueError(f"decode takes one sequence (1-D ids), got shape {tuple(ids.shape)}; use decode_batch")
            ids = ids.tolist()
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if i == self.eot_token_id:
                break
            if i == self.sot_token_id or (self._pad_is_special and i == self.pad_token_id):
                continue
            kept.append(i)
        text = self._tokenizer.decode(kept, skip_special_tokens=True)
        if self._word_suffix:
            text = _WHITESPACE.sub(" ", text.replace(self._word_suffix, " "))
        return text.strip()

    def decode_batch(self, ids: torch.Tensor | np.ndarray | Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(row) for row in ids]

    def __repr__(self) -> str:
        return (f"ClipTokenizer(vocab_size={self.vocab_size}, sot={self.sot_token_id}, "
                f"eot={self.eot_token_id}, source={self.source!r})")


def _cleaned(texts: Iterable[str], every_s: float = 5.0) -> Iterator[str]:
    """Clean training texts; on long corpora print a progress line every `every_s` seconds."""
    start = last = time.perf_counter()
    count = 0
    for count, text in enumerate(texts, start=1):
        if not isinstance(text, str):
            raise TypeError(f"training text #{count - 1}: expected str, got {type(text).__name__}")
        yield clean_text(text)
        if count % 1000 == 0 and time.perf_counter() - last >= every_s:
            last = time.perf_counter()
            print(f"[tokenizer] read {count} texts, {count / (last - start):.0f} texts/s", flush=True)
    if last > start:
        print(f"[tokenizer] read {count} texts in {time.perf_counter() - start:.1f} s; merging", flush=True)
