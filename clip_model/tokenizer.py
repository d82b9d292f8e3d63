"""CLIP text tokenizer on Hugging Face `tokenizers` (byte-level BPE).

Conventions (those of OpenAI CLIP):

- text is cleaned before tokenisation exactly as OpenAI's tokenizer does it: ``ftfy.fix_text``, HTML
  entities unescaped twice, whitespace runs collapsed to one space, stripped, lower-cased;
- every sequence is ``<start_of_text> ... <end_of_text>``, padded with id 0 to the context length
  (77 by default); truncation drops tokens from the end but keeps ``<end_of_text>`` last;
- the end-of-text id is the LARGEST id in the vocabulary, because the text tower pools at
  ``tokens.argmax(-1)``.

Two kinds of vocabulary:

- ``ClipTokenizer.openai()`` (the preset ``"openai"``): OpenAI's CLIP vocabulary, read from the BPE
  merges shipped in ``clip_model/data/bpe_simple_vocab_16e6.txt.gz`` (MIT, see the NOTICE beside it).
  Its ids are OpenAI's and OpenCLIP's, so pretrained OpenAI / OpenCLIP weights can be used and
  fine-tuned: 49,408 ids, words end in ``</w>``, ``<start_of_text>`` = 49406, ``<end_of_text>`` = 49407.
- ``ClipTokenizer.train(captions, vocab_size)``: a byte-level BPE trained on our own captions, laid
  out as ``<pad>`` (id 0), the byte alphabet and merges, then ``<start_of_text>``, ``<end_of_text>``.

Both are saved and loaded as a Hugging Face ``tokenizer.json``. Deviation from OpenAI's tokenizer: a
caption that literally contains ``<start_of_text>`` / ``<end_of_text>`` (after cleaning) gets a space
there instead of the special id, so no caption can move the pooling position.

This module does not import torch at load time (`encode_np` serves torch-free ONNX inference);
`encode_batch` / calling the tokenizer returns a torch LongTensor.

Foreign ``tokenizer.json`` files (e.g. OpenAI's CLIP tokenizer exported by Hugging Face, which uses
``<|startoftext|>``/``<|endoftext|>``) load too, as long as they have start and end tokens and the end
token has the largest id.
"""

from __future__ import annotations

import gzip
import html
import re
import time
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import ftfy
import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

if TYPE_CHECKING:
    import torch

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
PAD_TOKEN = "<pad>"
DEFAULT_CONTEXT_LENGTH = 77
DEFAULT_VOCAB_SIZE = 49408
# A cleaned text longer than context_length * this many characters is first tokenised from its leading
# whole words only; if those do not fill the context, the whole text is tokenised.
_MAX_CHARS_PER_TOKEN = 64

# Names under which other tokenizers spell the start/end tokens (ours first).
_SOT_ALIASES = (SOT_TOKEN, "<|startoftext|>", "<start_of_text>", "<s>", "<|begin_of_text|>")
_EOT_ALIASES = (EOT_TOKEN, "<|endoftext|>", "<end_of_text>", "</s>", "<|end_of_text|>")

# Bundled tokenizers by name (the name is also the ClipTokenizer classmethod that builds it).
PRESETS = {"openai": "OpenAI's CLIP vocabulary (49,408 ids), that of OpenAI's and OpenCLIP's models"}

OPENAI_BPE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
OPENAI_MERGES = 49152 - 256 - 2  # merges OpenAI's vocabulary uses (the file holds more)
WORD_SUFFIX = "</w>"  # OpenAI's vocabulary marks the end of a word
# OpenAI's pre-tokenisation: contractions, letter runs, single digits, runs of anything else. OpenAI's
# pattern is case-insensitive; on lower-cased text that only lets "'s" match the long s too ("'ſ"), which is
# spelled out here: a case-insensitive Oniguruma pattern takes twice as long.
OPENAI_SPLIT = r"'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


# ---------------------------------------------------------------------------------------------
# Text cleaning (OpenAI's: ftfy, html.unescape twice, whitespace, lower case)
# ---------------------------------------------------------------------------------------------
_SURROGATE = re.compile("[\ud800-\udfff]")


def basic_clean(text: str) -> str:
    """OpenAI's ``basic_clean``: ftfy's fixes (mojibake, curly quotes, ligatures, full-width forms,
    control characters, NFC), HTML entities unescaped twice, surrounding whitespace stripped."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    if not text.isascii() and _SURROGATE.search(text):  # ftfy repairs surrogates; never hand one to Rust
        text = _SURROGATE.sub("\ufffd", text)
    return text.strip()


def clean_text(text: str) -> str:
    """The full CLIP cleaning: `basic_clean`, whitespace runs collapsed to one space, lower-cased."""
    return " ".join(basic_clean(text).split()).lower()


def _first_words(text: str, limit: int) -> str:
    """The longest prefix of whole words of `text` within `limit` characters (cut at `limit` when the
    first word alone is longer)."""
    if len(text) <= limit:
        return text
    space = text.rfind(" ", 0, limit + 1)
    return text[:space] if space > 0 else text[:limit]


def _byte_symbols() -> list[str]:
    """The printable stand-in of each byte value (GPT-2's byte-level alphabet), in the order of
    OpenAI's vocabulary: bytes that are printable Latin-1 characters stand for themselves, in byte
    order; the other 68 are mapped, in byte order, to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    rest = sorted(set(range(256)) - set(printable))
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


@lru_cache(maxsize=1)
def _openai_tokenizer_json() -> str:
    """OpenAI's vocabulary as a `tokenizer.json` text (built once per process)."""
    with gzip.open(OPENAI_BPE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1:OPENAI_MERGES + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + WORD_SUFFIX for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != DEFAULT_VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise ValueError(f"{OPENAI_BPE}: not OpenAI's CLIP vocabulary ({len(vocab)} tokens, expected "
                         f"{DEFAULT_VOCAB_SIZE})")
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=WORD_SUFFIX))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(OPENAI_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(SOT_TOKEN, special=True), AddedToken(EOT_TOKEN, special=True)])
    return backend.to_str()


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
        # Names of special tokens that captions must not smuggle in (compared after lower-casing).
        self._specials = tuple({t.lower() for t in (self._sot_token, self._eot_token, SOT_TOKEN, EOT_TOKEN, PAD_TOKEN)})
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
    def openai(cls) -> ClipTokenizer:
        """OpenAI's CLIP tokenizer (the preset "openai"): the ids OpenAI's and OpenCLIP's models were
        trained with (49,408: start 49406, end 49407)."""
        return cls.from_str(_openai_tokenizer_json(), source="openai")

    @classmethod
    def from_preset(cls, name: str) -> ClipTokenizer:
        """A bundled tokenizer by name (`PRESETS`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; known: {', '.join(PRESETS)}")
        return getattr(cls, name)()

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
        return self._tokenizer.encode(self._clean(text)).ids

    def encode_np(self, texts: list[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
        """int64 array [B, context_length]: ``<sot> tokens <eot> 0 0 ...``; too long texts are cut so
        that ``<eot>`` is the last token. Any ``str`` is accepted. Stateless (safe to share between threads)."""
        if context_length < 2:
            raise ValueError(f"context_length={context_length}: must be at least 2 (start and end tokens)")
        if isinstance(texts, str):
            texts = [texts]
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text #{i}: expected str, got {type(text).__name__}")
        cleaned = [self._clean(t) for t in texts]
        # Only the first tokens survive truncation: tokenise a long text's leading whole words (a prefix
        # of its tokens); should they not fill the context, the whole text after all.
        limit = context_length * _MAX_CHARS_PER_TOKEN
        heads = [_first_words(t, limit) for t in cleaned]
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        rows = [e.ids for e in encode(heads)]
        short = [i for i, (head, text) in enumerate(zip(heads, cleaned))
                 if len(head) < len(text) and len(rows[i]) < context_length]
        for i, encoding in zip(short, encode([cleaned[i] for i in short])):
            rows[i] = encoding.ids
        out = np.full((len(rows), context_length), self.pad_token_id, dtype=np.int64)
        for row, ids in zip(out, rows):
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eot_token_id]
            row[:len(ids)] = ids
        return out

    def encode_batch(self, texts: list[str] | str, context_length: int = DEFAULT_CONTEXT_LENGTH) -> torch.Tensor:
        """LongTensor[B, context_length], as `encode_np`."""
        import torch

        return torch.from_numpy(self.encode_np(texts, context_length))

    __call__ = encode_batch

    def _clean(self, text: str) -> str:
        """`clean_text`, then the special tokens' names blanked out: a caption that literally contains
        the end token would otherwise move the pooling position."""
        text = clean_text(text)
        if "<" in text and any(t in text for t in self._specials):
            for token in self._specials:
                text = text.replace(token, " ")
            text = " ".join(text.split())
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
            text = " ".join(text.replace(self._word_suffix, " ").split())
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
