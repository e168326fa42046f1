"""Tiny randomly initialised sequence classifiers of each supported family, built from configs (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    OPTConfig,
)


def tiny_config(family: str):
    """A 2-layer config of ``family`` ('bert', 'opt' or 'llama') with non-square FFN matrices."""
    if family == "bert":
        return BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=48, max_position_embeddings=64, num_labels=2)
    if family == "opt":
        return OPTConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=48,
                         max_position_embeddings=64, word_embed_proj_dim=32, num_labels=2, pad_token_id=1)
    if family == "llama":
        return LlamaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, intermediate_size=48, max_position_embeddings=64, num_labels=2,
                           pad_token_id=0)
    raise ValueError(family)


def tiny_model(family: str, seed: int = 0):
    """A tiny randomly initialised classifier of ``family``, in eval mode."""
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(family)).eval()


def save_tiny_bert(folder: Path) -> Path:
    """Save a tiny BERT classifier with a matching WordPiece tokenizer as a local checkpoint folder."""
    from transformers import BertTokenizerFast

    words = ["good", "bad", "great", "awful", "movie", "film", "the", "a", "is", "was", "not", "very", "fun", "dull"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    folder.mkdir(parents=True, exist_ok=True)
    # transformers 5 takes the vocabulary itself; a vocab_file argument is ignored and leaves only the special
    # tokens, so every word would be [UNK]
    tokenizer = BertTokenizerFast(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(folder)
    config = tiny_config("bert")
    config.vocab_size = len(vocab)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder


TINY_WORDS = ["the", "movie", "film", "was", "is", "a", "not", "very", "good", "great", "fun", "bad", "awful", "dull"]
"""Every word of the tiny data (conftest's CSV), so the sub-word tokenizers below learn them as whole tokens."""


def save_tiny(family: str, folder: Path, causal_lm: bool = False) -> Path:
    """A tiny ``family`` classifier with a tokenizer of its kind, saved as a local checkpoint folder.

    OPT: a byte-level BPE tokenizer whose pad token is its eos '</s>' (the classifier pools the last token that is
    not pad, and a sequence never ends in eos here); Llama: a SentencePiece-style BPE without a pad token, so airlora
    pads with eos as it does for real Llama checkpoints. Both have a `score` head, or with ``causal_lm`` an LM head
    (a decoder for ``data.label_words``).
    """
    if family == "bert":
        return save_tiny_bert(folder)
    from tokenizers import ByteLevelBPETokenizer, SentencePieceBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(TINY_WORDS)] * 20
    if family == "opt":
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=["<unk>", "</s>"])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", pad_token="</s>",
                                            unk_token="<unk>")
    elif family == "llama":
        spm = SentencePieceBPETokenizer()
        spm.train_from_iterator(corpus, vocab_size=150, min_frequency=1, special_tokens=["<unk>", "</s>"])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=spm._tokenizer, eos_token="</s>", unk_token="<unk>")
    else:
        raise ValueError(family)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = tiny_config(family)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    config.vocab_size, config.eos_token_id, config.bos_token_id = len(tokenizer), eos, eos
    config.pad_token_id = eos if family == "opt" else None
    torch.manual_seed(0)
    (AutoModelForCausalLM if causal_lm else AutoModelForSequenceClassification).from_config(config).save_pretrained(
        folder)
    return folder
