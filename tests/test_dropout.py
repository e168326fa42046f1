"""FastDropout: torch's dropout semantics (rate, scaling, gradient, eval mode) with a cheaper CPU mask."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from airlora.dropout import FastDropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_drop_rate_and_expectation_match_torch_dropout(p):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    out = FastDropout(p)(x)
    dropped = (out == 0).float().mean().item()
    assert abs(dropped - p) < 0.002
    assert abs(out.mean().item() - 1.0) < 0.005  # survivors are scaled so E[out] = x
    zero, kept = torch.unique(out).tolist()
    assert zero == 0.0 and kept == pytest.approx(1 / (1 - round(p * 65536) / 65536))


def test_every_lane_of_a_random_word_drops_at_p():
    # four 16-bit lanes come from one 64-bit word: a biased sign bit in any lane would show in one column
    torch.manual_seed(1)
    out = FastDropout(0.25)(torch.ones(400_000, 4))
    rates = (out == 0).float().mean(0)
    assert torch.allclose(rates, torch.full((4,), 0.25), atol=0.005), rates


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(2)
    layer = FastDropout(0.3)
    x = torch.randn(64, 33, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    mask = (out != 0).float()
    assert torch.allclose(x.grad, mask * layer.keep_scale)
    assert torch.allclose(out, x.detach() * mask * layer.keep_scale)


def test_eval_mode_p0_and_p1():
    x = torch.randn(8, 16)
    layer = FastDropout(0.4).eval()
    assert layer(x) is x
    assert FastDropout(0.0)(x) is x
    assert torch.equal(FastDropout(1.0)(x), torch.zeros_like(x))


def test_same_seed_same_mask_and_odd_sizes():
    x = torch.randn(7, 13, 5)  # 455 elements: not a multiple of the four lanes
    torch.manual_seed(3)
    a = FastDropout(0.2)(x)
    torch.manual_seed(3)
    b = FastDropout(0.2)(x)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.equal(a, FastDropout(0.2)(x))


def test_use_fast_dropout_swaps_every_plain_dropout_and_keeps_eval_outputs():
    torch.manual_seed(4)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    ids = torch.randint(0, 50, (3, 9))
    before = model(input_ids=ids).logits
    assert use_fast_dropout(model) == plain > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert all(not m.training for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)
    model.train()
    assert not torch.equal(model(input_ids=ids).logits, before)  # dropout is live in training
