"""Module resolution per architecture family, and clear errors for what cannot be adapted."""

import pytest
from torch import nn

from airlora.errors import AirloraError
from airlora.models import (
    _meta_model,
    count_parameters,
    head_parameters,
    module_map_without_weights,
    resolve_modules,
    shapes_without_weights,
)
from airlora.ranks import MODULES
from tests.tiny_models import tiny_config, tiny_model

EXPECTED = {
    "bert": ("bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"),
    "opt": ("model.decoder.layers.1.self_attn.out_proj", "model.decoder.layers.1.fc2"),
    "llama": ("model.layers.1.self_attn.o_proj", "model.layers.1.mlp.down_proj"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_six_modules_per_layer_with_canonical_keys(family):
    module_map = resolve_modules(tiny_model(family))
    assert module_map.family == family
    assert module_map.num_layers == 2
    assert list(module_map.names) == [f"layers.{i}.{m}" for i in range(2) for m in MODULES]
    assert (module_map.names["layers.1.o"], module_map.names["layers.1.fc2"]) == EXPECTED[family]
    assert module_map.shapes["layers.0.fc1"] == (32, 48) and module_map.shapes["layers.0.fc2"] == (48, 32)


def test_bert_pooler_is_never_adapted():
    names = resolve_modules(tiny_model("bert")).names.values()
    assert not any("pooler" in n for n in names)


class _Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = type("C", (), {"hidden_size": 8})()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"wq": nn.Linear(8, 8), "wk": nn.Linear(8, 8), "wv": nn.Linear(8, 8),
                           "wo": nn.Linear(8, 8), "up": nn.Linear(8, 16), "down": nn.Linear(16, 8)})
            for _ in range(2)
        )


def test_unknown_architecture_lists_linears_and_how_to_map():
    with pytest.raises(AirloraError) as err:
        resolve_modules(_Odd())
    message = str(err.value)
    assert "wq" in message and "down" in message and "target_modules" in message


def test_unknown_architecture_with_a_mapping():
    mapping = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "fc1": "up", "fc2": "down"}
    module_map = resolve_modules(_Odd(), mapping)
    assert module_map.family == "custom" and module_map.names["layers.1.fc1"] == "blocks.1.up"


def test_a_mapping_naming_missing_modules_is_an_error():
    mapping = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "fc1": "nope", "fc2": "down"}
    with pytest.raises(AirloraError, match="target_modules"):
        resolve_modules(_Odd(), mapping)


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_shapes_come_from_config_json_alone_on_the_meta_device(family, tmp_path):
    """`airlora channel` and the sweep's planning read a checkpoint's shapes without its weights: the same module map
    and head size as the real model, from a folder holding only config.json, with no parameter storage."""
    tiny_config(family).save_pretrained(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no weights to read
    real = tiny_model(family)
    module_map, head = shapes_without_weights(str(tmp_path))
    assert module_map == resolve_modules(real) == module_map_without_weights(str(tmp_path))
    assert head == count_parameters(head_parameters(real, module_map)) > 0
    meta = _meta_model(str(tmp_path))
    assert all(p.is_meta for p in meta.parameters())
    assert sum(p.numel() for p in meta.parameters()) == sum(p.numel() for p in real.parameters())
