"""A decoder fine-tuned as a language model on label words (``data.label_words``): no new head, only the adapter.

Each example is the prompt (``data.prompt`` with the sentence in it, e.g. "Tweet: {sentence}\\nSentiment:"); the
model's next-token logits at the last real token, restricted to the first token of each label word (" negative",
" positive"), are the K class logits. The trainer, the evaluation and the edge call it as they call a sequence
classifier: ``forward(input_ids, attention_mask, labels=None)`` returns ``.logits`` (B, K) and ``.loss``.

Loss: cross-entropy over the K label logits, not the LM loss over the whole vocabulary at the label token. The K
logits are what is scored (argmax over them), so this is the classifier's loss on exactly that decision; the LM loss
adds a term that pushes down every other token of the vocabulary, which spends the small adapter's capacity on
tokens the prediction never reads. (Both have the same gradient on the margin between the label tokens.)

Why a wrapper and not ``AutoModelForCausalLM`` itself: its logits are (B, L, V) over the whole vocabulary at every
position (V = 49,152 for SmolLM2: 200 MB of fp32 for a batch of 16 × 64 tokens); here only the K rows of the output
embedding at one position are computed, which equal the full logits' entries. The wrapper takes the causal LM's
children as its own (``model``, ``lm_head``), so its module names are the causal LM's and a delivery's PEFT keys fit
``AutoModelForCausalLM`` as they are: any tool loads it on the plain causal LM.

Shapes: B batch, L tokens, H hidden size, K label words.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from airlora.errors import AirloraError


class LabelWordLM(nn.Module):
    """A causal LM scoring the first token of each label word at the last real token; no parameters of its own."""

    def __init__(self, causal_lm: nn.Module, label_token_ids: list[int]) -> None:
        super().__init__()
        for name, child in causal_lm.named_children():
            self.add_module(name, child)
        self.__dict__["causal_lm"] = causal_lm  # not a submodule: its children are already ours, by the same names
        self.config = causal_lm.config
        self.register_buffer("label_token_ids", torch.tensor(label_token_ids, dtype=torch.long), persistent=False)

    def train(self, mode: bool = True) -> LabelWordLM:
        """Train/eval mode for the children and the causal LM object itself (which is not a submodule)."""
        super().train(mode)
        self.causal_lm.training = mode
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        """(B, K) label-word logits at each row's last real token; ``.loss``: cross-entropy over them."""
        hidden = self.causal_lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask * positions).argmax(-1)  # (B,) the last real token, on either padding side
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        head = self.causal_lm.get_output_embeddings()
        bias = None if head.bias is None else head.bias[self.label_token_ids]
        logits = F.linear(h.to(head.weight.dtype), head.weight[self.label_token_ids], bias)  # (B, K)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def label_token_ids(tokenizer: Any, prompt: str, label_words: Sequence[str]) -> list[int]:
    """The first token of each label word as it follows the prompt (tokenised in context, so a SentencePiece or
    byte-level BPE tokenizer's word-initial space is what it is after the prompt); one clear error when two label
    words share it or the prompt's own tokens change."""
    before = prompt.format(sentence="a")
    prefix = tokenizer(before, add_special_tokens=False)["input_ids"]
    ids = []
    for word in label_words:
        full = tokenizer(before + word, add_special_tokens=False)["input_ids"]
        if full[:len(prefix)] != prefix or len(full) == len(prefix):
            raise AirloraError(f"data.label_words {label_words!r}: {word!r} merges with the end of data.prompt "
                               f"{prompt!r} when tokenised; start each label word with a space (e.g. ' positive')")
        ids.append(full[len(prefix)])
    if len(set(ids)) != len(ids):
        tokens = tokenizer.convert_ids_to_tokens(ids)
        raise AirloraError(f"data.label_words {label_words!r} begin with the same token ({tokens}); the model scores "
                           "each word's first token, so they must differ")
    return ids
