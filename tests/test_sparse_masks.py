"""Exemption rule, per-tensor selection, quantile fallback, multipliers and across-task state (models/sparse/masks.py).

Closed forms from algorithms.md §3.1 (ViT-B/16 inventory), 4.5 (selection), 4.6 (0.9**count) and 4.7 (frozen masks and
update counts).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.sparse import masks
from models.sparse.masks import SparsityState, is_always_trainable, pack_bits, quantile, select_top, unpack_bits




def _meta_model(name: str) -> nn.Module:
    import timm

    with torch.device("meta"):  # no allocation: 86M parameters cost nothing
        return timm.create_model(name, pretrained=False, num_classes=0)


@pytest.fixture(scope="module")
def vit_b16_params() -> list[tuple[str, torch.Tensor]]:
    """Named parameters of the official network: ``convnet.*`` (timm ViT-B/16) + ``simclr`` (768 -> 128)."""
    model = _meta_model("vit_base_patch16_224")
    params = [(f"convnet.{n}", p) for n, p in model.named_parameters()]
    params += [("simclr.weight", torch.empty(128, 768, device="meta")),
               ("simclr.bias", torch.empty(128, device="meta"))]
    return params


# ---------------------------------------------------------------------------------------------
# exemption rule (algorithms.md §3.1, §4.5, §9.10)
# ---------------------------------------------------------------------------------------------
def test_vit_b16_inventory_name_rule(vit_b16_params):
    convnet = [(n, p) for n, p in vit_b16_params if n.startswith("convnet.")]
    maskable = [(n, p) for n, p in convnet if not is_always_trainable(n, p)]
    exempt = [(n, p) for n, p in convnet if is_always_trainable(n, p)]
    assert len(maskable) == 51
    assert sum(p.numel() for _, p in maskable) == 85_676_544
    assert len(exempt) == 99
    assert sum(p.numel() for _, p in exempt) == 122_112
    assert sum(p.numel() for _, p in convnet) == 85_798_656
    # the 51 maskable tensors are exactly: cls_token, pos_embed, patch_embed.proj.weight, 4 weights x 12 blocks
    expected = {"convnet.cls_token", "convnet.pos_embed", "convnet.patch_embed.proj.weight"}
    for i in range(12):
        expected |= {f"convnet.blocks.{i}.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert {n for n, _ in maskable} == expected
    assert all(is_always_trainable(n, p) for n, p in vit_b16_params if n.startswith("simclr."))


def test_vit_b16_ndim_rule_gives_the_same_partition(vit_b16_params):
    """On a ViT every bias and LayerNorm tensor is 1-D and every maskable tensor has >= 2 dims."""
    by_name = {n for n, p in vit_b16_params if is_always_trainable(n, p, "name")}
    by_ndim = {n for n, p in vit_b16_params if is_always_trainable(n, p, "ndim")}
    assert by_name == by_ndim


def test_state_exempt_flags_on_vit_b16(vit_b16_params):
    state = SparsityState(vit_b16_params)
    assert sum(not e for e in state.exempt.values()) == 51
    assert sum(state.exempt.values()) == 99 + 2
    assert state.frozen["convnet.blocks.0.mlp.fc1.weight"].dtype == torch.bool
    assert state.update_count["convnet.blocks.0.mlp.fc1.weight"].dtype == torch.int32
    # storage (issue 7): 1 bit per frozen flag and 1 byte per count, maskable tensors only
    maskable_numel = sum(p.numel() for n, p in vit_b16_params if not state.exempt[n])
    assert state.nbytes() == {"frozen_bits": maskable_numel // 8, "update_counts": maskable_numel}


@pytest.mark.parametrize("name,exempt", [
    ("convnet.blocks.3.mlp.fc1.weight", False),  # a digit between 'fc' and '.weight'
    ("convnet.blocks.3.mlp.fc2.weight", False),
    ("convnet.blocks.3.attn.qkv.weight", False),
    ("convnet.cls_token", False),
    ("convnet.pos_embed", False),
    ("convnet.patch_embed.proj.weight", False),
    ("convnet.blocks.3.mlp.fc1.bias", True),
    ("convnet.blocks.3.norm1.weight", True),
    ("convnet.norm.weight", True),
    ("fc.weight", True),
    ("fc.sigma", True),
    ("rpfc.weight", True),
    ("rpfc.sigma", True),
    ("simclr.weight", True),
    ("simclr.bias", True),
])
def test_name_rule_substrings(name, exempt):
    assert is_always_trainable(name, torch.zeros(2, 2)) is exempt


def test_ndim_rule_exempts_batchnorm_of_a_cnn():
    model = _meta_model("tf_efficientnet_lite0")
    params = [(f"convnet.{n}", p) for n, p in model.named_parameters()]
    bn_weights = [(n, p) for n, p in params if n.endswith(".weight") and p.ndim == 1]
    assert bn_weights and all("bn" in n.split(".")[-2] for n, _ in bn_weights)
    assert all(is_always_trainable(n, p, "ndim") for n, p in bn_weights)
    assert not any(is_always_trainable(n, p, "name") for n, p in bn_weights)  # 'bn1.weight' has no 'norm'
    convs = [(n, p) for n, p in params if p.ndim == 4]
    assert convs and not any(is_always_trainable(n, p, "ndim") or is_always_trainable(n, p, "name") for n, p in convs)
    biases = [(n, p) for n, p in params if n.endswith(".bias")]
    assert biases and all(is_always_trainable(n, p, "ndim") and is_always_trainable(n, p, "name") for n, p in biases)
    # the projection head stays exempt under the structural rule although its weight is 2-D
    assert is_always_trainable("simclr.weight", torch.zeros(128, 768), "ndim")


# ---------------------------------------------------------------------------------------------
# selection (algorithms.md §4.5) and the quantile fallback (algorithms.md §9.12)
# ---------------------------------------------------------------------------------------------
SHAPES = [(7,), (13, 11), (4, 5, 6), (2, 3, 8, 8)]
RATES = [0.1, 0.25, 0.5, 0.05]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rate", RATES)
def test_select_top_is_scores_at_or_above_quantile(shape, rate):
    scores = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape) * 100 + int(rate * 100)))
    mask = select_top(scores, rate)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    assert torch.equal(mask, scores >= torch.quantile(scores.flatten(), 1 - rate))
    n = scores.numel()
    pos = (1 - rate) * (n - 1)  # linear-interpolation position; distinct scores: ranks >= ceil(pos) selected
    if abs(pos - round(pos)) > 1e-3:
        assert int(mask.sum()) == n - math.ceil(pos)
        assert int(mask.sum()) == pytest.approx(rate * (n - 1) + 1, abs=1)  # algorithms.md §4.5: ~ rate (n-1) + 1


def test_select_top_includes_ties_and_rate_one():
    flat = torch.ones(10)
    assert select_top(flat, 0.1).all()  # every entry equals the quantile
    scores = torch.tensor([0.0, 0.0, 1.0, 2.0, 2.0, 2.0])
    assert torch.equal(select_top(scores, 0.1), scores == 2.0)
    assert select_top(torch.rand(20), 1.0).all()  # quantile 0 = minimum


def test_state_select_exempt_full_and_maskable_by_quantile():
    params = [("convnet.pos_embed", torch.zeros(1, 5, 4)), ("convnet.blocks.0.mlp.fc1.weight", torch.zeros(16, 4)),
              ("convnet.blocks.0.mlp.fc1.bias", torch.zeros(16)), ("convnet.norm.weight", torch.zeros(4)),
              ("simclr.weight", torch.zeros(8, 4)), ("simclr.bias", torch.zeros(8))]
    state = SparsityState(params)
    gen = torch.Generator().manual_seed(3)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in params}
    scores["not_in_state.weight"] = torch.rand(3, 3, generator=gen)
    selected = state.select(scores, 0.1)
    assert set(selected) == set(scores)
    for name, s in scores.items():
        if name in ("convnet.pos_embed", "convnet.blocks.0.mlp.fc1.weight"):
            assert torch.equal(selected[name], s >= torch.quantile(s.flatten(), 0.9))
            assert 0 < int(selected[name].sum()) < s.numel()
        else:  # exempt (or unknown) tensors get a full mask
            assert selected[name].dtype == torch.bool and selected[name].all()


@pytest.mark.parametrize("n", [1, 2, 9, 100, 1001])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.9995, 1.0])
def test_quantile_small_equals_torch(n, q):
    values = torch.randn(n, generator=torch.Generator().manual_seed(n))
    assert torch.equal(quantile(values, q), torch.quantile(values, q))
    assert quantile(values.view(1, -1), q).dim() == 0


@pytest.mark.parametrize("n", [11, 100, 1001, 4096])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.9995, 1.0])
def test_quantile_kthvalue_path_equals_torch(monkeypatch, n, q):
    """Force the > 2^24 branch on small tensors (kthvalue + linear interpolation) and compare."""
    monkeypatch.setattr(masks, "QUANTILE_MAX_NUMEL", 10)
    values = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
    got = quantile(values.view(-1, 1), q)
    want = torch.quantile(values.double(), q)  # float64: no float32 rounding of the position
    assert got.dim() == 0
    assert float(got) == pytest.approx(float(want), abs=1e-5)
    # thresholding at the fallback's value selects what torch.quantile's value selects
    assert torch.equal(values >= got, values >= want.float())
    if 0 < q < 1:
        assert torch.equal(select_top(values, 1 - q), values >= torch.quantile(values, 1 - (1 - q)))


def test_quantile_kthvalue_path_with_ties(monkeypatch):
    monkeypatch.setattr(masks, "QUANTILE_MAX_NUMEL", 4)
    values = torch.tensor([3.0, 1.0, 1.0, 2.0, 3.0, 3.0, 0.0, 1.0])
    for q in (0.0, 0.3, 0.5, 0.75, 0.9, 1.0):
        assert float(quantile(values, q)) == pytest.approx(float(torch.quantile(values.double(), q)), abs=1e-6)


def test_quantile_above_2_pow_24_closed_form():
    """A permutation of 0..n-1 (exact in float32 for n - 1 = 2^24): the q-quantile is q (n - 1)."""
    n = 2**24 + 1
    assert n > masks.QUANTILE_MAX_NUMEL
    values = torch.randperm(n, generator=torch.Generator().manual_seed(0)).float()
    for q in (0.1, 0.9):
        got = float(quantile(values, q))
        assert got == pytest.approx(q * (n - 1), abs=1.0)  # float32 spacing at 1.5e7 is 1
    del values


# ---------------------------------------------------------------------------------------------
# multipliers and across-task bookkeeping (algorithms.md §4.6, §4.7)
# ---------------------------------------------------------------------------------------------
def _state() -> tuple[SparsityState, list[tuple[str, torch.Tensor]]]:
    params = [("convnet.blocks.0.attn.qkv.weight", torch.zeros(6, 5)), ("convnet.pos_embed", torch.zeros(1, 9, 4)),
              ("convnet.blocks.0.attn.qkv.bias", torch.zeros(6)), ("simclr.weight", torch.zeros(3, 5))]
    return SparsityState(params), params


def test_multipliers_are_mask_times_point_nine_pow_count_with_frozen_zero():
    state, params = _state()
    name = "convnet.blocks.0.attn.qkv.weight"
    counts = torch.arange(30, dtype=torch.int32).view(6, 5) % 5  # 0..4
    state.set_update_count(name, counts)
    frozen = torch.zeros(6, 5, dtype=torch.bool)
    frozen[0, 1] = frozen[3, 4] = frozen[5, 0] = True
    state.set_frozen(name, frozen)
    gen = torch.Generator().manual_seed(1)
    selected = {n: torch.rand(p.shape, generator=gen) < 0.6 for n, p in params}
    selected["convnet.blocks.0.attn.qkv.bias"] = torch.ones(6, dtype=torch.bool)
    mult = state.multipliers(selected)
    assert set(mult) == set(selected)
    m = mult[name]
    assert m.dtype == torch.float32
    for idx in range(30):
        i, j = divmod(idx, 5)
        want = 0.0 if frozen[i, j] or not selected[name][i, j] else 0.9 ** int(counts[i, j])
        assert float(m[i, j]) == pytest.approx(want, rel=1e-6, abs=0)
    # untouched tensors: count 0, nothing frozen -> the mask itself
    assert torch.equal(mult["convnet.pos_embed"], selected["convnet.pos_embed"].float())
    assert torch.equal(mult["convnet.blocks.0.attn.qkv.bias"], torch.ones(6))


def test_end_task_frozen_union_and_counts_over_several_tasks():
    state, params = _state()
    gen = torch.Generator().manual_seed(2)
    q = 0.8
    union = {n: torch.zeros(p.shape, dtype=torch.bool) for n, p in params}
    count = {n: torch.zeros(p.shape, dtype=torch.int32) for n, p in params}
    previous = {n: f.clone() for n, f in state.frozen.items()}
    for _ in range(4):
        scores = {n: torch.rand(p.shape, generator=gen) for n, p in params}
        selected = state.select(scores, 0.3)
        state.end_task(scores, selected, q)
        for n, s in scores.items():
            if state.exempt[n]:
                continue
            union[n] |= s >= torch.quantile(s.flatten(), q)
            count[n] += selected[n].int()
        for n in state.frozen:
            assert torch.equal(state.frozen[n] & previous[n], previous[n])  # frozen only grows
            previous[n] = state.frozen[n].clone()
    for n, _ in params:
        assert torch.equal(state.frozen[n], union[n])
        assert torch.equal(state.update_count[n], count[n])
        if state.exempt[n]:  # biases and the head: never frozen, never counted
            assert not state.frozen[n].any() and not state.update_count[n].any()
        else:
            assert state.frozen[n].any() and int(state.update_count[n].max()) >= 1


def test_end_task_freeze_quantile_one_freezes_the_maximum_only():
    """SimpleCIL's quantile 1.0: only each tensor's arg-max (algorithms.md §4.7)."""
    state, params = _state()
    scores = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) for n, p in params}
    state.end_task(scores, state.select(scores, 0.1), 1.0)
    for n, s in scores.items():
        if state.exempt[n]:
            assert not state.frozen[n].any()
        else:
            assert int(state.frozen[n].sum()) == 1 and bool(state.frozen[n].flatten()[s.argmax()])


def test_end_task_ignores_names_outside_the_state():
    state, params = _state()
    scores = {"fc.weight": torch.rand(3, 3), **{n: torch.rand(p.shape) for n, p in params}}
    state.end_task(scores, state.select(scores, 0.5), 0.5)
    assert "fc.weight" not in state.frozen


def test_state_dict_holds_frozen_and_counts():
    state, params = _state()
    name = "convnet.blocks.0.attn.qkv.weight"
    frozen = torch.zeros(6, 5, dtype=torch.bool)
    frozen[2, 3] = True
    state.set_frozen(name, frozen)
    state.set_update_count(name, torch.arange(30).view(6, 5) % 3)
    sd = state.state_dict()
    assert set(sd) == {"frozen", "update_count"}
    assert set(sd["frozen"]) == {n for n, _ in params if not state.exempt[n]} == set(sd["update_count"])
    other, _ = _state()
    other.load_state_dict(sd)
    for n, _ in params:
        assert (torch.equal(other.frozen[n], state.frozen[n])
                and torch.equal(other.update_count[n], state.update_count[n]))
    with pytest.raises(ValueError, match="update_count"):
        other.load_state_dict({"frozen": sd["frozen"], "update_count": {}})


def test_state_views_are_read_only_and_setters_validate():
    state, _ = _state()
    with pytest.raises(TypeError):
        state.frozen["convnet.pos_embed"] = torch.ones(1, 9, 4, dtype=torch.bool)  # type: ignore[index]
    with pytest.raises(ValueError, match="0..255"):
        state.set_update_count("convnet.pos_embed", torch.full((1, 9, 4), 256))
    with pytest.raises(KeyError):
        state.set_frozen("simclr.weight", torch.ones(3, 5, dtype=torch.bool))  # exempt: never frozen


def test_update_counts_saturate_at_255():
    state, params = _state()
    name = "convnet.pos_embed"
    state.set_update_count(name, torch.full((1, 9, 4), 255))
    scores = {n: torch.rand(p.shape) for n, p in params}
    state.end_task(scores, {n: torch.ones(p.shape, dtype=torch.bool) for n, p in params}, 1.0)
    assert int(state.update_count[name].max()) == 255


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 4099])
def test_pack_bits_round_trip(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) < 0.3
    packed = pack_bits(mask.view(1, n))
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, torch.Size([1, n])), mask.view(1, n))
