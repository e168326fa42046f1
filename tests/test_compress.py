"""`compress`: every triplet trains; the delivery keeps the highest-energy triplets and the precisions that fit."""

import numpy as np
import pytest
import torch

from airlora.allocators import make_allocator
from airlora.config import merge
from airlora.session import build_session
from airlora.trainer import context

pytestmark = pytest.mark.integration  # end-to-end on the tiny model: see pyproject.toml


@pytest.fixture
def session_with_energies(tiny_config):
    session = build_session(merge(tiny_config, {"allocator": "compress", "channel.bits": [4, 8, 16, 32]}))
    rng = np.random.default_rng(0)
    with torch.no_grad():  # distinct |λ| per triplet, so the energy order is unambiguous
        for m in session.adapters.modules.values():
            m.lam.copy_(torch.from_numpy(rng.permutation(m.r_max) + rng.uniform(0.1, 0.9, m.r_max)).float())
    allocator = make_allocator(session.config)
    allocator.observe(type("Outcome", (), {"model": session.model})())
    return session, allocator


@pytest.mark.parametrize("snr_db", [-5.0, 5.0, 15.0])
@pytest.mark.parametrize("bits", [(32,), (4, 8, 16, 32)])
def test_compress_fits_the_budget_and_is_maximal(session_with_energies, snr_db, bits):
    session, allocator = session_with_energies
    budget = session.budget(snr_db)
    if bits == (32,):
        budget = type(budget).for_model(session.module_map.shapes, budget.r_max, 32, budget.capacity_bps,
                                        budget.t_max_s, session.head_params)
    ctx = context(session, 0, session.adapters.ranks())
    ctx = type(ctx)(**{**ctx.__dict__, "budget": budget, "snr_db": snr_db})
    decision = allocator.deliver(ctx)
    ranks, precisions = decision if isinstance(decision, tuple) else (decision, dict.fromkeys(budget.keys, 32))
    # feasible, recomputed from the bits of each module's triplets (or nothing sent where the head does not fit)
    used = sum(ranks[k] * int(budget.unit_bits_at(precisions)[i]) for i, k in enumerate(budget.keys))
    if budget.reserved_bits > budget.capacity_bps * budget.t_max_s:
        assert used == 0
        return
    assert used + budget.reserved_bits <= budget.capacity_bps * budget.t_max_s and used > 0
    # maximal: no module can take one more triplet, or go one precision up, and still fit
    for key in budget.keys:
        if ranks[key] < budget.r_max:
            assert not budget.feasible(ranks | {key: ranks[key] + 1}, precisions)
        level = budget.allowed_bits.index(precisions[key])
        if ranks[key] and level + 1 < len(budget.allowed_bits):
            assert not budget.feasible(ranks, precisions | {key: budget.allowed_bits[level + 1]})


def test_compress_spends_the_budget_on_energy(session_with_energies):
    """Against uniform at the same budget, the kept energy of ΔW is at least as large (what it optimises)."""
    session, allocator = session_with_energies
    ctx = context(session, 0, session.adapters.ranks())
    budget = session.budget(5.0)
    ctx = type(ctx)(**{**ctx.__dict__, "budget": budget, "snr_db": 5.0})
    energy = allocator.energies()

    def kept(ranks):
        return sum(np.sort(energy[k])[::-1][:r].sum() for k, r in ranks.items())

    ranks, _ = allocator.deliver(ctx)
    uniform = dict.fromkeys(budget.keys, budget.uniform_pair()[0])
    assert kept(ranks) >= kept(uniform) and sum(ranks.values()) > 0
