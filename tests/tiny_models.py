"""Tiny randomly initialised sequence classifiers of each supported family, built from configs (no hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
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
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    config = tiny_config("bert")
    config.vocab_size = len(vocab)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    return folder
