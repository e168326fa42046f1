"""Data complexity of a batch or a dataset (paper §III): lexical entropy H and OOV rate ρ, measured on words.

Both statistics are word-level on purpose. A sub-word tokenizer (BPE, SentencePiece) never emits an unknown id, so
counting UNK ids would report ρ = 0 for every text; instead ρ is the share of word tokens missing from a real
word-level vocabulary: a word list file, or the tokenizer's whole-word tokens (see ``reference_vocabulary``).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from airlora.errors import AirloraError

WORD_PATTERN = re.compile(r"[^\W\d_]+")
"""Fast first pass for ``words``: runs of word characters that are not digits or '_' (letters, plus a few numeric
symbols such as '²' or '½' that ``words`` then drops)."""


def words(text: str) -> list[str]:
    r"""Lowercase words of ``text``: maximal runs of letters (``str.isalpha``) in its NFC-normalised, lowercased form.

    Digits, underscores, apostrophes, hyphens, punctuation, emoji and numeric symbols all separate words:
    "Don't stop-believing, 2 times!" -> don, t, stop, believing, times. The regex ``[^\W\d_]+`` finds the runs; the
    rare run holding a non-letter such as '²' is split again. ``reference_vocabulary`` keeps only tokens made of
    letters, so text words and vocabulary entries are comparable by construction.
    """
    found = []
    for run in WORD_PATTERN.findall(unicodedata.normalize("NFC", text).lower()):
        if run.isalpha():
            found.append(run)
        else:
            found.extend("".join(c if c.isalpha() else " " for c in run).split())
    return found


def lexical_entropy(words: list[str]) -> float:
    """Entropy H = −Σ p̂(w) ln p̂(w) of the empirical word distribution, in nats (0 for no words)."""
    if not words:
        return 0.0
    return entropy_from_counts(np.fromiter(Counter(words).values(), dtype=np.int64))


def entropy_from_counts(counts: np.ndarray) -> float:
    """Entropy in nats of the empirical distribution with these (positive) counts; shared by the batch statistics."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts / total
    return float(-(p * np.log(p)).sum())


def normalise_entropy(entropy: float, n_words: int) -> float:
    """H / ln(n): n words can have at most n distinct values, so ln(n) is the largest entropy possible; 0 if n < 2."""
    if n_words < 2:
        return 0.0
    return min(1.0, max(0.0, entropy / math.log(n_words)))


def normalised_lexical_entropy(words: list[str]) -> float:
    """Lexical entropy divided by ln(n), n = number of word tokens, so samples of any length land in [0, 1]."""
    return normalise_entropy(lexical_entropy(words), len(words))


def oov_rate(words: list[str], vocabulary: set[str]) -> float:
    """Share of word tokens (not distinct words) missing from ``vocabulary``; 0 for no words."""
    if not words:
        return 0.0
    return sum(w not in vocabulary for w in words) / len(words)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character map, used by every byte-level BPE vocabulary (OPT, GPT-2)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _decode_byte_level(token: str, decoder: dict[str, int]) -> str | None:
    try:
        return bytes(decoder[ch] for ch in token).decode("utf-8")
    except (KeyError, UnicodeDecodeError):
        return None


def reference_vocabulary(tokenizer: Any) -> set[str]:
    """The tokenizer's whole-word tokens, lowercased and alphabetic: a real word-level vocabulary for the OOV rate.

    Which tokens are whole words depends on the tokenizer family, recognised from its vocabulary:
    - byte-level BPE (GPT-2, OPT): tokens starting with 'Ġ' (an encoded leading space), marker stripped and the
      byte-level characters decoded back to UTF-8 ('ĠcafÃ©' -> 'café');
    - SentencePiece (Llama, T5): tokens starting with '▁' (the word-boundary marker), marker stripped;
    - WordPiece (BERT, MiniLM): tokens without the '##' continuation prefix.
    Only entries made entirely of letters are kept (no punctuation, digits, special or byte-fallback tokens).

    Why this is a real vocabulary: the tokenizer gives a word its own id only if the word was frequent in the
    pretraining corpus; any other word is spelled out of several sub-word pieces. A text word is in-vocabulary here
    exactly when the tokenizer would encode it (after a space) as one token, i.e. when the model has seen it as a
    unit — the word-level notion of "out of vocabulary" that UNK counting cannot give for sub-word tokenizers.
    The set also holds some word-initial pieces that are only prefixes ('Ġun'); they matter only for a text word
    spelt exactly like that piece, so ρ is at worst slightly low, never inflated.
    """
    tokens = list(tokenizer.get_vocab())
    if any(t.startswith("Ġ") for t in tokens):
        decoder = _byte_decoder()
        candidates = (_decode_byte_level(t[1:], decoder) for t in tokens if t.startswith("Ġ"))
    elif any(t.startswith("▁") for t in tokens):
        candidates = (t[1:] for t in tokens if t.startswith("▁"))
    else:
        candidates = (t for t in tokens if not t.startswith("##"))
    return {w.lower() for w in candidates if w and w.isalpha()}


def load_vocabulary(path: str) -> set[str]:
    """Read a word list (UTF-8, one word per line, blank lines ignored), lowercased, for the OOV rate."""
    file = Path(path)
    if not file.is_file():
        raise AirloraError(f"data.vocab_file {path!r} does not exist; expected a UTF-8 text file with one word a line")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise AirloraError(f"data.vocab_file {path!r}: byte {err.start} is not valid UTF-8; "
                           "re-save the word list as UTF-8") from None
    vocabulary = {line.strip().lower() for line in text.splitlines()} - {""}
    if not vocabulary:
        raise AirloraError(f"data.vocab_file {path!r} is empty; expected one word a line")
    return vocabulary
