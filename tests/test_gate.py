"""The update-magnitude gate (models/sparse/gate.py, algorithms.md §14.3) against closed forms.

- cosine_similarity: parallel = 1, orthogonal = 0, opposite = -1, a zero vector = 0, sizes must match;
- the first task gets the large budget with no similarity; later tasks pick "frozen" (cos >= tau, small
  budget) or "initialized" (cos < tau, large budget) on constructed gradients;
- the reference: "previous" keeps the last gradient, "ema" keeps m = ema * m + (1 - ema) * g;
- state_dict round trip; bad memory rules and budgets raise ValueError.
"""

from __future__ import annotations

import math

import pytest
import torch

from models.sparse.gate import FROZEN, INITIALIZED, GateDecision, MagnitudeGate, cosine_similarity

E1, E2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])


# ---------------------------------------------------------------------------------------------
# cosine_similarity
# ---------------------------------------------------------------------------------------------
def test_cosine_closed_forms():
    a = torch.tensor([1.0, -2.0, 3.0, 0.5])
    assert cosine_similarity(a, 2.5 * a) == pytest.approx(1.0, abs=1e-12)
    assert cosine_similarity(a, -a) == pytest.approx(-1.0, abs=1e-12)
    assert cosine_similarity(E1, E2) == 0.0
    assert cosine_similarity(E1, E1 + E2) == pytest.approx(1 / math.sqrt(2), abs=1e-12)


def test_cosine_of_a_zero_vector_is_zero():
    assert cosine_similarity(torch.zeros(4), torch.randn(4)) == 0.0
    assert cosine_similarity(torch.zeros(4), torch.zeros(4)) == 0.0


def test_cosine_ignores_shape_but_not_size():
    a = torch.arange(6.0)
    assert cosine_similarity(a.reshape(2, 3), a) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="different sizes"):
        cosine_similarity(torch.ones(3), torch.ones(4))


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
def test_first_task_is_initialized_with_no_similarity():
    gate = MagnitudeGate(0.5, budget_large=0.8, budget_small=0.1)
    decision = gate.decide(torch.tensor([3.0, 4.0]))
    assert decision == GateDecision(None, INITIALIZED, 0.8)
    assert decision.to_dict() == {"similarity": None, "regime": INITIALIZED, "budget": 0.8}
    assert torch.equal(gate.reference, torch.tensor([3.0, 4.0]))


def test_constructed_gradients_pick_each_regime():
    gate = MagnitudeGate(0.5, budget_large=1.0, budget_small=0.25)
    gate.decide(E1)
    close = E1 + 0.1 * E2  # cos = 1 / sqrt(1.01) >= 0.5
    d = gate.decide(close)
    assert (d.regime, d.budget) == (FROZEN, 0.25)
    assert d.similarity == pytest.approx(1 / math.sqrt(1.01), abs=1e-7)
    d = gate.decide(E2)  # reference is now `close`: cos = 0.1 / sqrt(1.01) < 0.5
    assert (d.regime, d.budget) == (INITIALIZED, 1.0)
    assert d.similarity == pytest.approx(0.1 / math.sqrt(1.01), abs=1e-7)
    d = gate.decide(-E2)  # opposite of the reference: cos = -1
    assert (d.regime, d.similarity) == (INITIALIZED, pytest.approx(-1.0, abs=1e-12))


def test_similarity_equal_to_the_threshold_is_frozen():
    """The rule is "cos < tau -> initialized", so cos == tau gives the frozen regime."""
    gate = MagnitudeGate(0.0, 1.0, 0.25)
    gate.decide(E1)
    d = gate.decide(E2)
    assert (d.similarity, d.regime) == (0.0, FROZEN)


@pytest.mark.parametrize("threshold, regime", [(-1.01, FROZEN), (1.01, INITIALIZED)])
def test_extreme_thresholds_force_one_regime(threshold, regime):
    """tau just outside [-1, 1] forces one regime, even for gradients (anti)parallel to the reference."""
    gate = MagnitudeGate(threshold, 1.0, 0.25)
    gen = torch.Generator().manual_seed(0)
    gate.decide(torch.randn(50, generator=gen))
    for sign in (1.0, -1.0):
        g = sign * gate.reference  # cos = +-1, the extremes
        assert gate.decide(g).regime == regime
        assert gate.decide(torch.randn(50, generator=gen)).regime == regime


def test_cosine_stays_within_the_unit_interval():
    """Unclamped, cos(+-1, 1) of ones(3) is +-1.0000000000000002 in float64 and tau = -1.0 would not force
    'frozen' for an exactly opposite gradient."""
    g = torch.ones(3)
    values = [cosine_similarity(g, g), cosine_similarity(-g, g)]
    assert all(-1.0 <= v <= 1.0 for v in values)
    gate = MagnitudeGate(-1.0, 1.0, 0.25)
    gate.decide(g)
    assert gate.decide(-g).regime == FROZEN


def test_gradient_of_another_size_raises():
    gate = MagnitudeGate(0.5, 1.0, 0.25)
    gate.decide(torch.ones(3))
    with pytest.raises(ValueError, match="different sizes"):
        gate.decide(torch.ones(4))


# ---------------------------------------------------------------------------------------------
# memory rules
# ---------------------------------------------------------------------------------------------
def test_previous_memory_keeps_the_last_gradient():
    gate = MagnitudeGate(0.5, 1.0, 0.25, memory="previous")
    g0, g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])
    gate.decide(g0)
    gate.decide(g1)
    assert torch.equal(gate.reference, g1)
    assert gate.decide(g2).similarity == pytest.approx(1 / math.sqrt(2), abs=1e-7)  # against g1, not g0
    assert torch.equal(gate.reference, g2)


def test_ema_memory_closed_form():
    ema = 0.25
    gate = MagnitudeGate(0.5, 1.0, 0.25, memory="ema", ema=ema)
    g0, g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])
    gate.decide(g0)
    assert torch.equal(gate.reference, g0)  # m_0 = g_0
    d1 = gate.decide(g1)
    assert d1.similarity == pytest.approx(0.0, abs=1e-12)  # against m_0 = g_0
    m1 = ema * g0 + (1 - ema) * g1  # (0.25, 1.5)
    assert torch.allclose(gate.reference, m1)
    d2 = gate.decide(g2)
    want = float(torch.dot(m1, g2) / (m1.norm() * g2.norm()))
    assert d2.similarity == pytest.approx(want, abs=1e-7)
    assert torch.allclose(gate.reference, ema * m1 + (1 - ema) * g2)


def test_reference_is_float32_and_a_copy():
    gate = MagnitudeGate(0.5, 1.0, 0.25, memory="ema")
    g = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    gate.decide(g)
    assert gate.reference.dtype == torch.float32 and gate.reference.shape == (4,)
    g.zero_()
    assert torch.equal(gate.reference, torch.tensor([1.0, 2.0, 3.0, 4.0]))


# ---------------------------------------------------------------------------------------------
# state and validation
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["previous", "ema"])
def test_state_dict_round_trip(memory):
    gen = torch.Generator().manual_seed(1)
    grads = [torch.randn(20, generator=gen) for _ in range(4)]
    a = MagnitudeGate(0.1, 1.0, 0.25, memory=memory, ema=0.5)
    for g in grads[:3]:
        a.decide(g)
    state = a.state_dict()
    b = MagnitudeGate(0.1, 1.0, 0.25, memory=memory, ema=0.5)
    b.load_state_dict(state)
    state["reference"].zero_()  # the state is a copy: changing it changes neither gate
    assert torch.equal(a.reference, b.reference) and a.reference.abs().sum() > 0
    assert a.decide(grads[3]) == b.decide(grads[3])


def test_empty_state_means_first_task():
    a = MagnitudeGate(0.1, 1.0, 0.25)
    assert a.state_dict() == {"reference": None}
    b = MagnitudeGate(0.1, 0.9, 0.25)
    b.decide(torch.ones(3))
    b.load_state_dict(a.state_dict())
    assert b.decide(torch.ones(5)) == GateDecision(None, INITIALIZED, 0.9)


def test_bad_memory_rule_raises():
    with pytest.raises(ValueError, match="memory"):
        MagnitudeGate(0.5, 1.0, 0.25, memory="mean")


@pytest.mark.parametrize("large, small", [(0.0, 0.25), (1.0, 0.0), (1.5, 0.25), (1.0, -0.1), (1.0, 1.01)])
def test_budget_outside_unit_interval_raises(large, small):
    with pytest.raises(ValueError, match="budget"):
        MagnitudeGate(0.5, large, small)


def test_budget_of_one_is_allowed():
    gate = MagnitudeGate(0.5, 1.0, 1.0)
    assert (gate.budget_large, gate.budget_small) == (1.0, 1.0)
