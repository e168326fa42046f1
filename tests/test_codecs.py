"""The codecs: their sizes against the bytes written to disk, their error bounds, the delivery overhead's reserve."""

import hashlib
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from airlora import bundle
from airlora.codecs import (
    CODECS,
    GROUP,
    decode,
    encode,
    fake_quantise,
    pack_int4,
    quantise_rows,
    round_trip,
    unpack_int4,
)
from airlora.models import module_map_without_weights
from airlora.ranks import MODULES, rank_key


def written_tensor_bytes(tmp_path, tensors):
    """Bytes of the tensor data in a safetensors file of ``tensors``: the file's size less its header."""
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    raw = path.read_bytes()
    return len(raw) - 8 - int.from_bytes(raw[:8], "little")


@given(bits=st.sampled_from(sorted(CODECS)), rank=st.integers(1, 9), d_in=st.integers(1, 300),
       d_out=st.integers(1, 300), seed=st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_unit_bits_are_the_bytes_a_module_takes_on_disk(tmp_path_factory, bits, rank, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for part, shape in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank)), ("lora_E", (rank, 1))):
        encoded, _ = bundle.encode_tensor(f"m.{part}", torch.randn(shape, generator=g), bits)
        tensors.update(encoded)
    on_disk = written_tensor_bytes(tmp_path_factory.mktemp("c"), tensors)
    assert 8 * on_disk == rank * CODECS[bits].unit_bits(d_in, d_out)


@given(bits=st.sampled_from(sorted(CODECS)), shape=st.lists(st.integers(1, 200), min_size=1, max_size=3))
@settings(max_examples=40, deadline=None)
def test_tensor_bits_are_the_bytes_a_head_tensor_takes_on_disk(tmp_path_factory, bits, shape):
    encoded, _ = bundle.encode_tensor("head.weight", torch.randn(shape), bits)
    assert 8 * written_tensor_bytes(tmp_path_factory.mktemp("h"), encoded) == CODECS[bits].tensor_bits(tuple(shape))


@given(bits=st.sampled_from([8, 4]), n=st.integers(1, 5), d=st.integers(1, 200), scale=st.floats(1e-30, 1e30),
       seed=st.integers(0, 2**16))
@settings(max_examples=100, deadline=None)
def test_integer_round_trip_is_within_half_a_step_of_its_group(bits, n, d, scale, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) * scale
    c = CODECS[bits]
    q, s = quantise_rows(c, x)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= c.q_max and s.dtype == torch.bfloat16
    x_hat = round_trip(c, x)
    for g in range(math.ceil(d / GROUP)):
        group, group_hat = x[:, g * GROUP:(g + 1) * GROUP], x_hat[:, g * GROUP:(g + 1) * GROUP]
        amax, step = group.abs().amax(dim=1), s[:, g].float()
        assert torch.all(step * c.q_max >= amax)  # rounded up: nothing clips
        assert torch.all(step <= amax / c.q_max * (1 + 2 ** -7))
        assert torch.all((group_hat - group).abs().amax(dim=1) <= step / 2 * (1 + 1e-6))
        assert torch.all((group_hat - group).abs().amax(dim=1) <= c.relative_error * amax * (1 + 1e-6))
    assert torch.equal(decode(c, encode(c, x), tuple(x.shape)), x_hat)  # what the edge decodes is the round trip


def test_float_codecs_and_zeros():
    x = torch.randn(4, 70, generator=torch.Generator().manual_seed(1))
    assert torch.equal(round_trip(CODECS[32], x), x)
    half = round_trip(CODECS[16], x)
    assert torch.all((half - x).abs() <= x.abs() * 2 ** -11)
    for bits in (8, 4):
        assert torch.equal(round_trip(CODECS[bits], torch.zeros(2, 130)), torch.zeros(2, 130))


@given(d=st.integers(1, 99), seed=st.integers(0, 2**16))
@settings(max_examples=50, deadline=None)
def test_int4_packs_two_values_per_byte_losslessly(d, seed):
    q = torch.randint(-7, 8, (3, d), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, math.ceil(d / 2))
    assert torch.equal(unpack_int4(packed, d), q)


def test_fake_quantisation_is_the_round_trip_forward_and_the_identity_backward():
    x = torch.randn(3, 100, requires_grad=True)
    y = fake_quantise(CODECS[4], x)
    assert torch.equal(y.detach(), round_trip(CODECS[4], x))
    weights = torch.randn(3, 100)
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)


def test_stored_specs_and_the_rendered_header_are_what_safetensors_writes(tmp_path):
    tensors, codecs, specs = {}, {}, []
    g = torch.Generator().manual_seed(0)
    cases = [(4, (3, 130), "lora_A"), (8, (70, 3), "lora_B"), (16, (3, 1), "lora_E"), (32, (2, 130), None),
             (4, (2,), None), (8, (5, 3), "lora_A"), (4, (65, 2), "lora_B"), (8, (2, 1), "lora_E")]
    for i, (bits, shape, part) in enumerate(cases):
        key = f"base_model.model.m{i}.{part or 'weight'}"
        encoded, codecs[key] = bundle.encode_tensor(key, torch.randn(shape, generator=g), bits)
        assert [(k, tuple(v.shape)) for k, v in encoded.items()] == [(k, s) for k, _, s in
                                                                      bundle.stored_specs(key, shape, bits)]
        tensors |= encoded
        specs += bundle.stored_specs(key, shape, bits)
    path = tmp_path / "p.safetensors"
    save_file(tensors, str(path), metadata=bundle.payload_metadata(codecs))
    meta = bundle.payload_metadata(codecs)
    # safetensors keeps the metadata in a Rust HashMap: its two entries come out in either order
    assert bundle.header_bytes_of(path) in {bundle.render_header(specs, meta),
                                            bundle.render_header(specs, dict(reversed(meta.items())))}
    decoded = bundle.decode_tensors(tensors, codecs)
    assert {k: tuple(v.shape) for k, v in decoded.items()} == {k: tuple(shape) for k, (_, *shape) in codecs.items()}


MINILM_MAP = module_map_without_weights("minilm")
MINILM_HEAD = {"classifier.weight": (2, 384), "classifier.bias": (2,)}


@given(data=st.data(), allowed=st.sets(st.sampled_from(sorted(CODECS)), min_size=1), r_max=st.sampled_from([4, 8]))
@settings(max_examples=25, deadline=None)
def test_a_real_deliverys_overhead_stays_within_the_reserve(tmp_path_factory, data, allowed, r_max):
    """Random ranks and precisions of MiniLM's 36 modules, written as the exporter writes them: the compressed header,
    config and manifest never exceed what the budget reserved."""
    allowed = tuple(sorted(allowed))
    names, shapes = MINILM_MAP.names, MINILM_MAP.shapes
    model_dir = "/work/models/all-MiniLM-L6-v2"
    reserve = bundle.overhead_bound_bytes(names, shapes, MINILM_HEAD, allowed, r_max, 1.0, model_dir, 300)
    ranks = {k: data.draw(st.integers(0, r_max)) for k in names}
    precisions = {k: data.draw(st.sampled_from(allowed)) for k in names}
    head_bits = max(allowed)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    tensors, codecs = {}, {}
    for key, rank in ranks.items():
        if rank:
            d_in, d_out = shapes[key]
            for part, shape in (("lora_A", (rank, d_in)), ("lora_B", (d_out, rank)), ("lora_E", (rank, 1))):
                name = f"{bundle.PEFT_PREFIX}{names[key]}.{part}"
                encoded, codecs[name] = bundle.encode_tensor(name, torch.randn(shape, generator=g), precisions[key])
                tensors |= encoded
    for name, shape in MINILM_HEAD.items():
        encoded, codecs[f"{bundle.PEFT_PREFIX}{name}"] = bundle.encode_tensor(f"{bundle.PEFT_PREFIX}{name}",
                                                                              torch.randn(shape), head_bits)
        tensors |= encoded
    out = tmp_path_factory.mktemp("d")
    payload = bundle.payload_file(codecs)
    save_file(tensors, str(out / payload), metadata=bundle.payload_metadata(codecs))
    config = bundle.json_bytes(bundle.adapter_config({names[k]: r for k, r in ranks.items()}, r_max, 1.0, model_dir,
                                                     list(MINILM_HEAD), 300))
    sums = {payload: hashlib.sha256((out / payload).read_bytes()).hexdigest(),
            bundle.CONFIG_FILE: hashlib.sha256(config).hexdigest()}
    sent = bundle.json_bytes(bundle.manifest(payload, sums, ranks, precisions, head_bits, model_dir))
    overhead = bundle.overhead_on_air_bytes(bundle.header_bytes_of(out / payload), config, sent)
    assert overhead <= reserve
    assert reserve < 2.0 * overhead + 1024 or not any(ranks.values())  # a bound, not a blank cheque


def test_the_reserve_is_a_few_kilobytes_for_minilm():
    """Today's uncompressed header + config of a full MiniLM delivery is ~20 KB; compressed it is a fifth of that."""
    names, shapes = MINILM_MAP.names, MINILM_MAP.shapes
    reserve = bundle.overhead_bound_bytes(names, shapes, MINILM_HEAD, (32,), 8, 1.0, "/m", 300)
    raw = bundle.render_header(
        [s for k in names for part, shape in (("lora_A", (8, shapes[k][0])), ("lora_B", (shapes[k][1], 8)),
                                              ("lora_E", (8, 1)))
         for s in bundle.stored_specs(f"{bundle.PEFT_PREFIX}{names[k]}.{part}", shape, 32)], {"format": "pt"})
    assert len(raw) > 10_000 and 2_000 < reserve < 6_000


def test_keys_of_a_minilm_map():
    assert list(MINILM_MAP.names)[:6] == [rank_key(0, m) for m in MODULES]
    assert np.all(np.array([MINILM_MAP.shapes[rank_key(0, m)] for m in ("q", "fc1", "fc2")]) ==
                  np.array([(384, 384), (384, 1536), (1536, 384)]))


def test_each_codec_s_error_bound_holds_and_is_tight():
    """The channel heuristic weighs codecs by ``relative_error``: measured on 2,000 random groups, the worst error of
    each lossy codec reaches at least 90 % of its bound and never passes it, and fewer bits measure worse."""
    x = torch.randn(2000, GROUP, generator=torch.Generator().manual_seed(0))
    worst = {}
    for bits, c in CODECS.items():
        error = (round_trip(c, x) - x).abs()
        if c.integer:  # relative to the group's largest value
            relative = error / x.abs().amax(dim=1, keepdim=True)
        else:  # relative to the value itself, where fp16 is normal: below 2^-14 its spacing is fixed, not relative
            relative = (error / x.abs())[x.abs() >= 2.0**-14]
        worst[bits] = float(relative.max())
        assert worst[bits] <= c.relative_error * (1 + 1e-6), bits
        if bits != 32:  # fp32 → fp32 is exact
            assert worst[bits] >= 0.9 * c.relative_error, (bits, worst[bits], c.relative_error)
    assert worst[32] == 0.0 < worst[16] < worst[8] < worst[4]
