"""Config loading and validation: unknown keys, wrong types and out-of-range values name the field."""

import json

import pytest

from airlora.config import ChannelConfig, RunConfig, TrainConfig, from_dict, load_config, merge
from airlora.errors import AirloraError


def test_defaults_round_trip_through_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(RunConfig().to_dict()))
    assert load_config(path) == RunConfig()


def test_yaml_with_nested_sections(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("allocator: random\nchannel:\n  snr_db: [-5, 10]\n  fading: awgn\ntrain:\n  steps: 7\n")
    config = load_config(path)
    assert config.allocator == "random" and config.channel.snr_db == (-5.0, 10.0)
    assert config.channel.fading == "awgn" and config.train.steps == 7


@pytest.mark.parametrize(
    "data, field",
    [
        ({"chanel": {}}, "chanel"),
        ({"channel": {"bandwith_hz": 1e6}}, "channel.bandwith_hz"),
        ({"train": {"steps": "ten"}}, "train.steps"),
        ({"train": {"steps": True}}, "train.steps"),
        ({"channel": {"fading": "nakagami"}}, "channel.fading"),
        ({"channel": {"t_max_s": 0}}, "channel.t_max_s"),
        ({"channel": {"bandwidth_hz": -1.0}}, "channel.bandwidth_hz"),
        ({"channel": {"snr_db": [float("nan")]}}, "channel.snr_db"),
        ({"adapter": {"r_max": 0}}, "adapter.r_max"),
        ({"adapter": {"init_rank": 9}}, "adapter.init_rank"),
        ({"allocator": "greedy"}, "allocator"),
        ({"channel": {"snr_schedule": "trace"}}, "channel.snr_trace"),
        ({"train": []}, "train"),
        ({"data": {"val_subset": 0}}, "data.val_subset"),
        ({"train": {"eval_on_change": "yes"}}, "train.eval_on_change"),
    ],
)
def test_bad_values_name_the_field(data, field):
    with pytest.raises(AirloraError) as err:
        from_dict(RunConfig, data)
    assert field in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(AirloraError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(AirloraError, match="not valid"):
        load_config(bad)
    txt = tmp_path / "c.txt"
    txt.write_text("{}")
    with pytest.raises(AirloraError, match="yaml"):
        load_config(txt)


def test_merge_overrides_and_revalidates():
    config = merge(RunConfig(), {"channel.t_max_s": 0.5, "train.steps": 3})
    assert config.channel.t_max_s == 0.5 and config.train.steps == 3
    with pytest.raises(AirloraError, match="train.steps"):
        merge(RunConfig(), {"train.steps": 0})


def test_int_accepted_for_float_fields():
    assert ChannelConfig(t_max_s=2).t_max_s == 2
    assert from_dict(TrainConfig, {"lr": 1}).lr == 1.0


def test_device_names_are_checked():
    with pytest.raises(AirloraError, match="train.device"):
        TrainConfig(device="gpu")
    assert TrainConfig(device="cuda:1").device == "cuda:1"


def test_cuda_without_a_gpu_is_a_clear_error():
    import torch

    from airlora.session import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(AirloraError, match="no CUDA device"):
            resolve_device("cuda")


def test_bits_is_a_sorted_set_of_codecs_and_bits_per_param_its_old_name(tmp_path):
    assert RunConfig().channel.bits == (32,) and RunConfig().channel.bits_per_param == 32
    config = merge(RunConfig(), {"channel.bits": [32, 4, 8, 4]})
    assert config.channel.bits == (4, 8, 32) and config.channel.bits_per_param == 32
    assert merge(RunConfig(), {"channel.bits": 8}).channel.bits == (8,)  # one value is a list of one
    # an old config (or a run's config.json from before the codecs) still reads, as a list of one
    path = tmp_path / "old.yaml"
    path.write_text("channel:\n  bits_per_param: 16\n")
    assert load_config(path).channel.bits == (16,)
    assert "bits_per_param" not in RunConfig().to_dict()["channel"]  # written under its new name only
    assert merge(RunConfig(), {"channel.bits_per_param": 8}).channel.bits == (8,)  # --set with the old name
    with pytest.raises(AirloraError, match="channel.bits_per_param and channel.bits are both given"):
        from_dict(RunConfig, {"channel": {"bits_per_param": 8, "bits": [8]}})
    with pytest.raises(AirloraError, match=r"channel.bits_per_param = 3 is not allowed; expected one of 4, 8, 16, 32"):
        from_dict(RunConfig, {"channel": {"bits_per_param": 3}})
    with pytest.raises(AirloraError, match=r"channel.bits = \[3, 8\] is not allowed"):
        ChannelConfig(bits=(3, 8))
