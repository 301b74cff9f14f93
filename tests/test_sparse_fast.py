"""The compact sparse-gradient step (issue 7) against the plain per-tensor reference of algorithms.md §4.6
(models/sparse/reference.py).

- given the same keep decisions, the masked gradients equal the reference's bit for bit, on a tiny ViT's
  parameter set and on odd shapes (1 entry, primes, 4-D);
- the kept fraction and its per-tensor and per-position distribution match independent Bernoulli(p) draws
  (seeded binomial bound and chi-square tests);
- a whole MIST task with the drop off (masks, frozen sets, counts, weights) equals the reference tuner's;
- the state between tasks and the plan during the sparse epochs stay under 0.75x the parameter bytes.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from models.sparse.reference import ReferenceMistTuner, ReferenceState, reference_masked_grads_, reference_select
from models.loop import FlatGradients
from models.sparse.masks import SparsityState
from tests.test_sparse_tuning import (CPU, RANPAC_DEFAULTS, make_cfg, make_loader, make_task, snapshot,
                                      tiny_backbone)
from models.sparse.tuner import SparseTuner

ODD = [("convnet.cls_token", (1, 1, 1)), ("convnet.blocks.0.attn.qkv.weight", (7, 13)),
       ("convnet.blocks.0.attn.qkv.bias", (7,)), ("convnet.patch_embed.proj.weight", (5, 3, 2, 3)),
       ("convnet.blocks.0.norm1.weight", (1,)), ("convnet.blocks.0.mlp.fc1.weight", (31, 2)),
       ("simclr.weight", (3, 5)), ("simclr.bias", (3,))]


def odd_params():
    gen = torch.Generator().manual_seed(0)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen))) for n, s in ODD]


def vit_params():
    net = SparseTuner(make_cfg(), tiny_backbone(), CPU, 0, RANPAC_DEFAULTS).network
    return list(net.named_parameters())


def random_states(params, seed: int):
    """The same random frozen sets and counts (0..5) in the compact state and in the reference state."""
    gen = torch.Generator().manual_seed(seed)
    state, ref = SparsityState(params), ReferenceState(params)
    for name, p in params:
        if state.exempt[name]:
            continue
        frozen = torch.rand(p.shape, generator=gen) < 0.1
        counts = torch.randint(0, 6, p.shape, generator=gen)
        state.set_frozen(name, frozen)
        state.set_update_count(name, counts)
        ref.frozen[name] = frozen.clone()
        ref.overlap[name] = counts.to(torch.int32)
    return state, ref


@pytest.mark.parametrize("make_params", [odd_params, vit_params])
@pytest.mark.parametrize("keep_prob", [0.1, 0.5, 1.0])
def test_masked_gradients_equal_the_reference_bit_for_bit(make_params, keep_prob):
    params = make_params()
    state, ref = random_states(params, seed=1)
    gen = torch.Generator().manual_seed(2)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in params}
    selected = state.select(scores, 0.3)
    assert all(torch.equal(selected[n], m) for n, m in reference_select(scores, 0.3).items())
    plan = state.plan(selected, CPU)
    flat = FlatGradients(dict(params))
    backbone_numel = sum(p.numel() for n, p in params if n.startswith("convnet."))
    for step in range(3):
        flat.attach()
        raw = {n: torch.randn(p.shape, generator=gen) for n, p in params}
        for n, p in params:
            p.grad.copy_(raw[n])
        positions, short = plan.sample(keep_prob, gen)
        assert int(short) == 0
        # the same keep decisions as dense 0/1 draws for the reference
        keep = {n: (m != 0).float() for n, m in plan.dense(positions).items()}
        want = {n: g.clone() for n, g in raw.items()}
        reference_masked_grads_(want, selected, ref, keep)
        _, nonzero = plan.apply_(flat.buffer, positions, backbone_numel)
        for n, p in params:
            assert torch.equal(p.grad, want[n]), (n, step)
            assert p.grad.data_ptr() == flat.buffer[state.offsets[n]:].data_ptr()  # still the flat views
        assert float(flat.buffer[-1]) == 0.0  # dummy slot
        assert int(nonzero) == sum(int(torch.count_nonzero(want[n])) for n, _ in params if n.startswith("convnet."))
        if keep_prob == 1.0:  # every eligible entry kept: the gradient times the per-task multipliers
            mult = state.multipliers(selected)
            assert all(torch.equal(p.grad, raw[n] * mult[n]) for n, p in params)


def test_plan_clear_leaves_a_zero_buffer_for_the_next_backward():
    params = odd_params()
    state = SparsityState(params)
    plan = state.plan(state.select({n: torch.rand(p.shape) for n, p in params}, 0.5), CPU)
    flat = FlatGradients(dict(params))
    flat.attach()
    flat.buffer[:-1] = torch.randn(flat.numel)
    idx, _ = plan.apply_(flat.buffer, plan.sample(0.5, torch.Generator().manual_seed(0))[0], flat.numel)
    assert int(torch.count_nonzero(flat.buffer)) > 0
    plan.clear_(flat.buffer, idx)
    assert int(torch.count_nonzero(flat.buffer)) == 0
    assert flat.attached()
    flat.detach()
    assert all(p.grad is None for _, p in params) and not flat.attached()


def test_kept_entries_are_independent_bernoulli_draws():
    """Over many steps: total kept is within a binomial bound; per tensor and per position block the counts
    pass a chi-square test against p * eligible (seeded, so the test is deterministic)."""
    params = vit_params()
    state, _ = random_states(params, seed=3)
    selected = state.select({n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) for n, p in params},
                            0.1)
    plan = state.plan(selected, CPU)
    e, p, steps = plan.eligible, 0.1, 400
    gen = torch.Generator().manual_seed(5)
    hits = torch.zeros(e + 1, dtype=torch.int64)
    for _ in range(steps):
        positions, short = plan.sample(p, gen)
        assert int(short) == 0
        hits.index_add_(0, positions, torch.ones_like(positions))
    hits = hits[:e]
    total, n = int(hits.sum()), steps * e
    assert abs(total - n * p) < 4.5 * math.sqrt(n * p * (1 - p))  # binomial bound
    # per tensor: kept counts vs p * (eligible entries of the tensor) * steps
    index = plan.index[:e].long()
    observed, expected = [], []
    for name, offset in state.offsets.items():
        in_tensor = (index >= offset) & (index < offset + math.prod(state.shapes[name]))
        if int(in_tensor.sum()) == 0:
            continue
        observed.append(int(hits[in_tensor].sum()))
        expected.append(p * steps * int(in_tensor.sum()))
    chi2 = sum((o - x) ** 2 / (x * (1 - p)) for o, x in zip(observed, expected))
    assert stats.chi2.sf(chi2, len(observed)) > 1e-4, (chi2, len(observed))
    # per position: 50 equal blocks of the eligible list (the geometric gaps must not favour any region)
    blocks = torch.tensor_split(hits, 50)
    chi2 = sum((int(b.sum()) - p * steps * b.numel()) ** 2 / (p * (1 - p) * steps * b.numel()) for b in blocks)
    assert stats.chi2.sf(chi2, 50) > 1e-4, chi2


@pytest.mark.parametrize("keep_prob", [1e-3, 0.1, 0.9, 1.0])
def test_sample_positions_are_distinct_and_in_range(keep_prob):
    params = odd_params()
    state = SparsityState(params)
    plan = state.plan(state.select({n: torch.rand(p.shape) for n, p in params}, 0.9), CPU)
    positions, short = plan.sample(keep_prob, torch.Generator().manual_seed(1))
    assert positions.dtype == torch.int64 and positions.numel() == plan.draws(keep_prob)
    valid = positions[positions < plan.eligible]
    assert int(positions.max()) <= plan.eligible and torch.equal(valid, torch.unique(valid))
    assert int(short) == 0
    if keep_prob == 1.0:
        assert torch.equal(positions, torch.arange(plan.eligible))


def test_mist_task_with_the_drop_off_equals_the_reference():
    """Selections, frozen sets, counts and weights after each of three tasks (momentum and weight decay on) are
    bit-equal to the literal per-tensor implementation (the fix keys are pinned in test_sparse_tuning.py)."""
    cfg = make_cfg("drop_rate=0.0", "freeze_quantile=0.95")
    fast = SparseTuner(cfg, tiny_backbone(), CPU, 7, RANPAC_DEFAULTS)
    ref = ReferenceMistTuner(cfg, tiny_backbone(), CPU, 7, RANPAC_DEFAULTS)
    selections = []
    original = fast.state.select

    def spy(scores, rate):
        out = original(scores, rate)
        selections.append(out)
        return out

    fast.state.select = spy
    for t in range(3):
        loader = make_loader(seed=t, first=4 * t)
        report = fast.tune(loader, make_task(t, loader))
        ref_selected = ref.tune(loader, make_task(t, loader))["selected"]
        assert report["steps"] == 2 * len(loader)
        assert all(torch.equal(selections[t][n], ref_selected[n]) for n in ref_selected)
        weights = snapshot(fast)
        for n, w in snapshot(ref).items():
            assert torch.equal(weights[n], w), (t, n)
            assert torch.equal(fast.state.frozen[n], ref.reference.frozen[n]), (t, n)
            assert torch.equal(fast.state.update_count[n], ref.reference.overlap[n]), (t, n)
    assert sum(int(f.sum()) for f in ref.reference.frozen.values()) > 0
    assert max(int(c.max()) for c in ref.reference.overlap.values()) == 3


def test_state_bytes_are_under_three_quarters_of_the_parameter_bytes():
    """Between tasks: frozen bits + uint8 counts; in the sparse epochs: plus the plan (int32 index, fp32 scale)."""
    cfg = make_cfg()
    tuner = SparseTuner(cfg, tiny_backbone(), CPU, 0, RANPAC_DEFAULTS)
    param_bytes = 4 * tuner.state.numel
    between = sum(tuner.state.nbytes().values())
    scores = {n: torch.rand(s) for n, s in tuner.state.shapes.items()}
    plan = tuner.state.plan(tuner.state.select(scores, cfg.select_rate), CPU)
    assert between / param_bytes < 0.35
    assert (between + plan.nbytes()) / param_bytes < 0.75
    official = ReferenceState(tuner.network.named_parameters()).nbytes() + param_bytes  # + float32 scores
    assert official / param_bytes == pytest.approx(1 + 1 + 0.25, rel=1e-9)  # scores, int32 counts, bool frozen
