"""The tuning phases (models/sparse/tuner.py, selective.py, estimators.py) and MIST end to end through trainer.run.

Everything runs on the CPU with a tiny random timm ViT (32x32 inputs, 8x8 patches, width 32, 2 blocks:
32,224 backbone entries, 11 maskable tensors). Closed forms come from algorithms.md §4.4-4.7 and §5:
- per tensor of n distinct scores, ``score >= quantile(score, q)`` keeps n - ceil(q (n - 1)) entries;
- a gradient entry with multiplier 0 and SGD without momentum and weight decay leaves its weight bit-identical;
- the overlap factor is 0.9**count; the drop keeps an entry with probability 1 - drop_rate, unscaled;
- the scoring pass returns sum_b g_b^2 / n_b^2 and takes no optimizer step.
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import trainer
from backbones import build_backbone
from models.base import TaskData
from models.sparse import build_tuner
from models.loop import TuningLoop
from models.sparse.estimators import mi_fisher, scoring_pass
from models.sparse.losses import SecondViewAugment, supervised_nt_xent, two_views
from models.sparse.masks import SparsityState
from models.sparse.optim import MaskedStep, SGDSettings, step_decay
from models.sparse.tuner import OFFICIAL_SGD, SparseTuner
from utils.config import load_config

REPO = Path(__file__).resolve().parents[1]
VIT = "vit_base_patch16_224.augreg_in21k"
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
CPU = torch.device("cpu")
BASE = ["device=cpu", "progress=false", "num_workers=0", "pretrained=false", "mi_epochs=3"]
RANPAC_DEFAULTS = {"freeze_quantile": 1 - 0.0005}
NO_MOMENTUM_NO_DECAY = SGDSettings(momentum=0.0, weight_decay=0.0)

# Tiny-ViT closed forms (width 32, mlp 128, 16 patches + cls = 17 tokens, 2 blocks):
# entries = cls 32 + pos 17*32 + patch 32*3*8*8 + patch bias 32
#           + 2 * (qkv 96*32 + 96 + proj 32*32 + 32 + fc1 128*32 + 128 + fc2 32*128 + 32 + norm1/norm2 4*32)
#           + final norm 2*32 = 6752 + 2 * 12704 + 64
TINY_ENTRIES = 6752 + 2 * 12704 + 64
# maskable tensors: cls_token, pos_embed, patch_embed.proj.weight + 4 weights per block
TINY_MASKABLE = 3 + 2 * 4
# RanPAC freezes n - ceil(0.9995 (n - 1)) entries per maskable tensor and task:
# cls (32) 1, pos (544) 1, patch (6144) 4, per block qkv (3072) 2 + proj (1024) 1 + fc1 (4096) 3 + fc2 (4096) 3
RANPAC_FROZEN_PER_TASK = 1 + 1 + 4 + 2 * (2 + 1 + 3 + 3)
# SimpleCIL's quantile 1.0 freezes each maskable tensor's maximum
SIMPLECIL_FROZEN_PER_TASK = TINY_MASKABLE




# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def make_cfg(*overrides: str):
    return load_config(None, [*BASE, *overrides])


def tiny_backbone(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_backbone(VIT, pretrained=False, **TINY)


class RandomImages(Dataset):
    """Items ``(index, image (3,32,32) in [0,1), label)``; labels cycle through ``first .. first+n_classes-1``."""

    def __init__(self, n: int, n_classes: int, seed: int = 0, first: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 32, 32, generator=gen)
        self.y = first + torch.arange(n) % n_classes

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return i, self.x[i], self.y[i]


def make_loader(n: int = 16, batch: int = 8, n_classes: int = 4, seed: int = 0, first: int = 0) -> DataLoader:
    return DataLoader(RandomImages(n, n_classes, seed, first), batch_size=batch, shuffle=False)


def make_task(t: int, loader: DataLoader, n_classes: int = 4) -> TaskData:
    ds = loader.dataset
    return TaskData(t, t * n_classes, (t + 1) * n_classes, 2 * n_classes, ds, ds, ds)


def make_tuner(cfg, sgd: SGDSettings = OFFICIAL_SGD, seed: int = 7, defaults=None, backbone_seed: int = 0):
    return SparseTuner(cfg, tiny_backbone(backbone_seed), CPU, seed, defaults or RANPAC_DEFAULTS, sgd=sgd)


def snapshot(tuner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in tuner.network.named_parameters()}


def maskable(tuner) -> list[str]:
    return [n for n in tuner.backbone_names if not tuner.state.exempt[n]]


def kept_by_quantile(n: int, q: float) -> int:
    """Entries of n distinct scores at or above their linear-interpolation q-quantile: n - ceil(q (n - 1))."""
    pos = q * (n - 1)
    assert abs(pos - round(pos)) > 1e-6, "closed form needs a non-integer position"
    return n - math.ceil(pos)


@pytest.fixture
def record_select(monkeypatch):
    """Record (scores, selection) of every ``SparsityState.select`` call (one per MIST task)."""
    calls = []
    original = SparsityState.select

    def wrapper(self, scores, rate):
        out = original(self, scores, rate)
        calls.append(({n: s.clone() for n, s in scores.items()}, {n: m.clone() for n, m in out.items()}))
        return out

    monkeypatch.setattr(SparsityState, "select", wrapper)
    return calls


# ---------------------------------------------------------------------------------------------
# per-step random drop (algorithms.md §4.6 step 3.1)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("drop_rate", [0.9, 0.5, 0.0])
def test_step_keep_fraction_is_keep_prob(drop_rate):
    """Each eligible entry is kept with probability 1 - drop_rate, unscaled, with a fresh draw every step."""
    cfg = make_cfg(f"drop_rate={drop_rate}")
    tuner = make_tuner(cfg)
    p = 1.0 - drop_rate
    assert cfg.keep_prob == pytest.approx(p)
    state = tuner.state
    plan = state.plan({n: torch.ones(s, dtype=torch.bool) for n, s in state.shapes.items()}, CPU)
    e = plan.eligible
    draws = [plan.sample(cfg.keep_prob, tuner.drop_generator) for _ in range(5)]
    kept = [pos[pos < e] for pos, _ in draws]
    total = sum(k.numel() for k in kept)
    n = 5 * e
    for (pos, short), k in zip(draws, kept):
        assert int(short) == 0
        assert torch.equal(k, torch.unique(k))  # distinct, ascending
        multipliers = plan.dense(pos)
        assert all(torch.equal(m, (m > 0).float()) for m in multipliers.values())  # 0/1 only: no 1/p rescaling
    if drop_rate == 0.0:
        assert total == n
    else:
        assert abs(total - n * p) < 5 * math.sqrt(n * p * (1 - p))
        assert not torch.equal(kept[0], kept[1])  # a fresh draw every step


# ---------------------------------------------------------------------------------------------
# sparse SGD: which entries move (algorithms.md §4.6, quirk 9.4 and its fixes)
# ---------------------------------------------------------------------------------------------
def _assert_unselected_unchanged(tuner, before, after, selected) -> int:
    """Every unselected entry of every maskable backbone tensor is bit-identical; returns #selected that moved."""
    moved = 0
    for name in maskable(tuner):
        sel = selected[name]
        assert 0 < int(sel.sum()) < sel.numel()
        assert torch.equal(after[name][~sel], before[name][~sel]), name
        moved += int((after[name][sel] != before[name][sel]).sum())
    return moved


def test_unselected_and_frozen_entries_bit_identical_without_momentum_and_decay(record_select):
    cfg = make_cfg("freeze_quantile=0.95")  # 5% frozen per tensor, so task 1 has many frozen entries
    tuner = make_tuner(cfg, NO_MOMENTUM_NO_DECAY)
    before = snapshot(tuner)
    tuner.tune(make_loader(seed=0), make_task(0, make_loader()))
    after = snapshot(tuner)
    moved = _assert_unselected_unchanged(tuner, before, after, record_select[0][1])
    assert moved > 0  # the selected entries did train
    exempt = [n for n in tuner.backbone_names if tuner.state.exempt[n]]
    assert any(not torch.equal(after[n], before[n]) for n in exempt)  # exempt tensors train densely

    frozen0 = {n: f.clone() for n, f in tuner.state.frozen.items()}
    assert sum(int(frozen0[n].sum()) for n in maskable(tuner)) > 0
    loader1 = make_loader(seed=1, first=4)
    before1 = snapshot(tuner)
    tuner.tune(loader1, make_task(1, loader1))
    after1 = snapshot(tuner)
    scores1, selected1 = record_select[1]
    _assert_unselected_unchanged(tuner, before1, after1, selected1)
    for name in maskable(tuner):
        f = frozen0[name]
        assert torch.equal(after1[name][f], before1[name][f]), name  # frozen in task 0: bit-unchanged in task 1
        assert torch.equal(scores1[name][f], torch.zeros(int(f.sum())))  # and scored 0 (algorithms.md §4.4)


def test_default_sgd_moves_unselected_entries(record_select):
    """The documented quirk: weight decay and momentum act on every entry, so the update is not sparse."""
    tuner = make_tuner(make_cfg())
    before = snapshot(tuner)
    tuner.tune(make_loader(), make_task(0, make_loader()))
    after = snapshot(tuner)
    selected = record_select[0][1]
    changed = sum(int((after[n][~selected[n]] != before[n][~selected[n]]).sum()) for n in maskable(tuner))
    unselected = sum(int((~selected[n]).sum()) for n in maskable(tuner))
    assert changed > 0.5 * unselected


@pytest.mark.parametrize("fixes", [("hard_freeze=true", "sparse_weight_decay=true"), ("hard_freeze=true",),
                                   ("sparse_weight_decay=true",)])
def test_fixes_keep_unselected_and_frozen_entries_with_default_sgd(record_select, fixes):
    tuner = make_tuner(make_cfg("freeze_quantile=0.95", *fixes))
    before = snapshot(tuner)
    tuner.tune(make_loader(), make_task(0, make_loader()))
    after = snapshot(tuner)
    assert _assert_unselected_unchanged(tuner, before, after, record_select[0][1]) > 0
    frozen0 = {n: f.clone() for n, f in tuner.state.frozen.items()}
    loader1 = make_loader(seed=1, first=4)
    tuner.tune(loader1, make_task(1, loader1))
    after1 = snapshot(tuner)
    _assert_unselected_unchanged(tuner, after, after1, record_select[1][1])
    for name in maskable(tuner):
        assert torch.equal(after1[name][frozen0[name]], after[name][frozen0[name]]), name


def masked_step(tuner, optimizer, params, keep):
    """One optimizer step through the tuning phase's masked step (``MaskedStep``), as the phases take it."""
    cfg = tuner.cfg
    rule = MaskedStep(params, lambda: keep, step_decay(tuner), cfg.sparse_weight_decay, cfg.hard_freeze, tuner.device)
    nonzero = rule.before_step([])
    optimizer.step()
    rule.after_step([])
    return nonzero


def _one_backward(tuner, seed: int = 0):
    _, x, y = next(iter(make_loader(seed=seed)))
    optimizer, _ = tuner.make_optimizer()
    optimizer.zero_grad(set_to_none=True)
    tuner.loss(x, y).backward()
    return optimizer


def test_overlap_factor_and_frozen_zero_applied_to_gradients():
    tuner = make_tuner(make_cfg(), NO_MOMENTUM_NO_DECAY)
    state = tuner.state
    fc1, pos, qkv = "convnet.blocks.0.mlp.fc1.weight", "convnet.pos_embed", "convnet.blocks.1.attn.qkv.weight"
    counts = (torch.arange(state.update_count[fc1].numel()) % 4).to(torch.int32).view_as(state.update_count[fc1])
    state.set_update_count(fc1, counts)
    state.set_update_count(pos, torch.full(state.shapes[pos], 2))
    frozen_qkv = torch.zeros(state.shapes[qkv], dtype=torch.bool)
    frozen_qkv.view(-1)[::7] = True
    state.set_frozen(qkv, frozen_qkv)
    params = tuner.named_trainables()
    selected = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    keep = {n: m * torch.ones_like(m) for n, m in state.multipliers(selected).items()}  # a keep mask of ones

    optimizer = _one_backward(tuner)
    raw = {n: p.grad.clone() for n, p in params.items()}
    before = {n: p.detach().clone() for n, p in params.items()}
    nonzero = masked_step(tuner, optimizer, params, keep)

    factor = {n: torch.ones_like(raw[n], dtype=torch.float64) for n in params}
    factor[fc1] = 0.9 ** counts.double()
    factor[pos] = torch.full_like(factor[pos], 0.9**2)
    factor[qkv] = (~state.frozen[qkv]).double()
    for name, p in params.items():
        want = raw[name].double() * factor[name]
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=0.0)
        lr = 1e-4 if name.startswith("convnet.") else 1e-2
        torch.testing.assert_close(p.detach().double(), before[name].double() - lr * p.grad.double(),
                                   rtol=1e-6, atol=1e-9)
    assert torch.equal(params[qkv].detach()[state.frozen[qkv]], before[qkv][state.frozen[qkv]])
    assert int(nonzero) == sum(int(torch.count_nonzero(params[n].grad)) for n in tuner.backbone_names)


def test_weight_decay_quirk_and_fixes_in_one_step():
    """A zero multiplier still shrinks the weight by exactly lr * wd * w (momentum 0); sparse_weight_decay
    decays only entries with a non-zero multiplier; hard_freeze restores zero-multiplier entries."""
    sgd = SGDSettings(backbone_lr=0.1, head_lr=0.1, weight_decay=0.01, momentum=0.0)
    lr, wd = sgd.backbone_lr, sgd.weight_decay
    name = "convnet.blocks.0.attn.proj.weight"
    half = torch.zeros(32, 32)
    half[:, :16] = 1.0

    # official: decay on every entry
    tuner = make_tuner(make_cfg(), sgd)
    params = tuner.named_trainables()
    optimizer = _one_backward(tuner)
    w0 = params[name].detach().clone()
    masked_step(tuner, optimizer, params, {name: torch.zeros(32, 32)})
    torch.testing.assert_close(w0 - params[name].detach(), lr * wd * w0, rtol=1e-3, atol=1e-9)

    # sparse_weight_decay: zero-multiplier entries bit-unchanged, the others take lr (g + wd w)
    tuner = make_tuner(make_cfg("sparse_weight_decay=true"), sgd)
    params = tuner.named_trainables()
    optimizer = _one_backward(tuner)
    w0, g0 = params[name].detach().clone(), params[name].grad.clone()
    masked_step(tuner, optimizer, params, {name: half})
    w1 = params[name].detach()
    assert torch.equal(w1[:, 16:], w0[:, 16:])
    torch.testing.assert_close(w1[:, :16], w0[:, :16] - lr * (g0[:, :16] + wd * w0[:, :16]), rtol=1e-5, atol=1e-8)

    # hard_freeze with momentum: zero-multiplier entries bit-unchanged
    tuner = make_tuner(make_cfg("hard_freeze=true"), SGDSettings(backbone_lr=0.1, weight_decay=0.01))
    params = tuner.named_trainables()
    optimizer = _one_backward(tuner)
    w0 = params[name].detach().clone()
    masked_step(tuner, optimizer, params, {name: half})
    assert torch.equal(params[name].detach()[:, 16:], w0[:, 16:])
    assert (params[name].detach()[:, :16] != w0[:, :16]).any()


# ---------------------------------------------------------------------------------------------
# scoring pass (algorithms.md §4.4)
# ---------------------------------------------------------------------------------------------
class LinearNet(nn.Module):
    """A 3 -> 2 linear map under the official name ``convnet`` plus an untrainable extra layer."""

    def __init__(self) -> None:
        super().__init__()
        self.convnet = nn.Linear(3, 2)
        self.extra = nn.Linear(2, 2)
        self.extra.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convnet(x)


def test_mi_fisher_equals_hand_derived_squared_gradients():
    torch.manual_seed(0)
    net = LinearNet()
    with torch.no_grad():
        net.convnet.weight.copy_(torch.tensor([[0.5, -1.0, 0.25], [1.5, 0.2, -0.3]]))
        net.convnet.bias.copy_(torch.tensor([0.1, -0.2]))
    gen = torch.Generator().manual_seed(1)
    sizes = [4, 4, 2]
    batches = [(torch.arange(k), torch.randn(k, 3, generator=gen), torch.randn(k, 2, generator=gen)) for k in sizes]

    def loss_fn(x, y, step):  # 0.5 * mean_i ||W x_i + b - y_i||^2
        return 0.5 * ((net(x) - y) ** 2).sum(dim=1).mean()

    state = SparsityState(net.named_parameters())
    frozen = torch.zeros(2, 3, dtype=torch.bool)
    frozen[1, 2] = True
    state.set_frozen("convnet.weight", frozen)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    sums = scoring_pass(TuningLoop(CPU), net, batches, lambda b: loss_fn(b.x, b.y, None), state, moments=False)
    scores, mean_loss = mi_fisher(sums, net, None), sums.loss

    W, b = before["convnet.weight"].double(), before["convnet.bias"].double()
    acc_w, acc_b, losses = torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), []
    for _, x, y in batches:
        x, y = x.double(), y.double()
        r = x @ W.T + b - y  # (n, 2) residuals
        gw, gb = r.T @ x / len(x), r.mean(dim=0)  # d loss / dW, d loss / db
        gw[1, 2] = 0.0  # frozen entry
        acc_w += gw**2
        acc_b += gb**2
        losses.append(float(0.5 * (r**2).sum(dim=1).mean()))
    nb = len(batches)
    assert set(scores) == {"convnet.weight", "convnet.bias"}  # requires_grad False is not scored
    torch.testing.assert_close(scores["convnet.weight"].double(), acc_w / nb**2, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(scores["convnet.bias"].double(), acc_b / nb**2, rtol=1e-5, atol=1e-9)
    assert float(scores["convnet.weight"][1, 2]) == 0.0
    assert mean_loss == pytest.approx(sum(losses) / nb, rel=1e-6)
    for n, p in net.named_parameters():  # no optimizer step: bit-identical weights, gradients cleared
        assert torch.equal(p.detach(), before[n])
        assert p.grad is None
    assert net.training


@pytest.mark.parametrize("exclude_self", [False, True])
def test_scoring_loss_is_mean_supervised_nt_xent_of_the_pairs(record_select, exclude_self):
    """epoch_losses[0] = mean over batches of the NT-Xent of (x, aug(x)) at the start-of-task weights."""
    tuner = make_tuner(make_cfg("mi_epochs=1", f"exclude_self_positive={str(exclude_self).lower()}"))
    net = copy.deepcopy(tuner.network)  # the start-of-task weights
    gen = torch.Generator()
    gen.set_state(tuner.augment.generator.get_state())
    augment = SecondViewAugment(gen)
    loader = make_loader(n=24, batch=8)
    with torch.no_grad():
        want = [float(supervised_nt_xent(net(two_views(x, augment)), y, exclude_self_positive=exclude_self))
                for _, x, y in loader]
    report = tuner.tune(loader, make_task(0, loader))
    assert report["steps"] == 0 and report["updated_fraction_per_step"] == 0.0
    assert report["epoch_losses"] == [pytest.approx(sum(want) / len(want), rel=1e-5)]


# ---------------------------------------------------------------------------------------------
# the report of a MIST task (algorithms.md §4.5-4.8)
# ---------------------------------------------------------------------------------------------
def test_tune_report_closed_forms(record_select):
    cfg = make_cfg()
    tuner = make_tuner(cfg)
    loader = make_loader(n=16, batch=8)
    report = tuner.tune(loader, make_task(0, loader))
    scores, selected = record_select[0]
    net = dict(tuner.network.named_parameters())
    names = tuner.backbone_names
    total = sum(net[n].numel() for n in names)
    masked = maskable(tuner)
    assert len(masked) == TINY_MASKABLE and total == TINY_ENTRIES

    assert report["method"] == "mist"
    assert report["backbone_entries"] == total
    assert report["steps"] == (cfg.mi_epochs - 1) * len(loader)
    assert len(report["epoch_losses"]) == cfg.mi_epochs
    assert all(math.isfinite(v) for v in report["epoch_losses"])

    # selection: n - ceil(0.9 (n - 1)) per maskable tensor, full exempt tensors
    counts = {n: kept_by_quantile(net[n].numel(), 1 - cfg.select_rate) for n in masked}
    for n in masked:
        assert int(selected[n].sum()) == counts[n]
        assert torch.equal(selected[n], scores[n] >= torch.quantile(scores[n].flatten(), 1 - cfg.select_rate))
    exempt_numel = sum(net[n].numel() for n in names if n not in masked)
    maskable_numel = total - exempt_numel
    assert report["selected_fraction"] == pytest.approx((sum(counts.values()) + exempt_numel) / total, abs=1e-12)
    assert report["selected_fraction_maskable"] == pytest.approx(sum(counts.values()) / maskable_numel, abs=1e-12)
    assert report["selected_fraction_maskable"] == pytest.approx(cfg.select_rate, abs=0.01)

    # updated entries per step ~ (selected backbone entries) * keep_prob, a binomial over all steps
    trials = report["steps"] * sum(int(selected[n].sum()) for n in names)
    p = cfg.keep_prob
    expected = trials * p / report["steps"] / total
    sigma = math.sqrt(trials * p * (1 - p)) / report["steps"] / total
    assert abs(report["updated_fraction_per_step"] - expected) < 6 * sigma
    assert report["updated_fraction_per_step"] == pytest.approx(report["selected_fraction"] * p, rel=0.25)

    # end of task: frozen = score >= quantile(score, 0.9995); counts = this task's selection
    q = RANPAC_DEFAULTS["freeze_quantile"]
    assert report["frozen_entries"] == sum(kept_by_quantile(net[n].numel(), q) for n in masked)
    assert report["frozen_entries"] == RANPAC_FROZEN_PER_TASK
    for n in masked:
        assert torch.equal(tuner.state.frozen[n], scores[n] >= torch.quantile(scores[n].flatten(), q))
        assert torch.equal(tuner.state.update_count[n], selected[n].to(torch.int32))
    for n in tuner.state.exempt:
        if tuner.state.exempt[n]:
            assert not tuner.state.frozen[n].any() and not tuner.state.update_count[n].any()
    assert not tuner.network.training


def test_second_task_uses_counts_and_frozen_from_the_first(record_select):
    """Task 1's multipliers: 0.9 on entries task 0 selected, 0 on frozen ones; frozen grows by as much again."""
    tuner = make_tuner(make_cfg())
    seen = []
    original = tuner.state.plan

    def spy(selected, device):
        out = original(selected, device)
        seen.append(out.dense())  # the task's multipliers, from its compact plan
        return out

    tuner.state.plan = spy
    loader0, loader1 = make_loader(seed=0), make_loader(seed=1, first=4)
    r0 = tuner.tune(loader0, make_task(0, loader0))
    sel0 = record_select[0][1]
    frozen0 = {n: f.clone() for n, f in tuner.state.frozen.items()}
    r1 = tuner.tune(loader1, make_task(1, loader1))
    sel1 = record_select[1][1]
    assert r0["frozen_entries"] == RANPAC_FROZEN_PER_TASK and r1["frozen_entries"] == 2 * RANPAC_FROZEN_PER_TASK
    for n in maskable(tuner):
        want = sel1[n].double() * torch.where(sel0[n], 0.9, 1.0).double() * (~frozen0[n]).double()
        torch.testing.assert_close(seen[1][n].double(), want, rtol=1e-6, atol=0.0)
        assert torch.equal(tuner.state.update_count[n], sel0[n].int() + sel1[n].int())


def test_build_tuner_dispatch_and_learner_default_freeze_quantile():
    tuner = build_tuner(make_cfg(), tiny_backbone(), CPU, 0, {"freeze_quantile": 1.0})
    assert isinstance(tuner, SparseTuner) and tuner.recipe.importance == "mi_fisher" and tuner.recipe.drop
    assert build_tuner(make_cfg(), tiny_backbone(), CPU, 0, {"freeze_quantile": 1.0}).freeze_quantile == 1.0
    assert build_tuner(make_cfg("freeze_quantile=0.5"), tiny_backbone(), CPU, 0, {"freeze_quantile": 1.0}
                       ).freeze_quantile == 0.5
    for spr in ("rand", "l2", "grad", "run", "cerun"):
        tuner = build_tuner(make_cfg(f"spr={spr}"), tiny_backbone(), CPU, 0, {})
        assert isinstance(tuner, SparseTuner) and not tuner.recipe.selective and tuner.recipe.loss == "ce"


class SmallCNN(nn.Module):
    """conv (maskable) -> BatchNorm (1-D weight: maskable by name, exempt by ndim) -> pooled 8-d feature."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("rule", ["name", "ndim"])
def test_exempt_rule_on_a_batchnorm_backbone(record_select, rule):
    torch.manual_seed(0)
    cfg = make_cfg(f"exempt_rule={rule}", "mi_epochs=2")
    tuner = SparseTuner(cfg, SmallCNN(), CPU, 0, RANPAC_DEFAULTS)
    loader = make_loader()
    tuner.tune(loader, make_task(0, loader))
    selected = record_select[0][1]
    bn_w = "convnet.body.1.weight"
    assert selected["convnet.body.0.bias"].all() and selected["convnet.body.1.bias"].all()
    assert int(selected["convnet.body.0.weight"].sum()) == kept_by_quantile(8 * 3 * 3 * 3, 0.9)
    if rule == "ndim":
        assert tuner.state.exempt[bn_w] and selected[bn_w].all()
        assert not tuner.state.frozen[bn_w].any() and not tuner.state.update_count[bn_w].any()
    else:  # "bn" contains none of the official substrings: 1 of 8 entries (n - ceil(0.9 * 7))
        assert not tuner.state.exempt[bn_w] and int(selected[bn_w].sum()) == kept_by_quantile(8, 0.9) == 1
        assert int(tuner.state.frozen[bn_w].sum()) == 1


@pytest.mark.parametrize("freeze", [False, True])
def test_freeze_bn_stats(freeze):
    torch.manual_seed(0)
    tuner = SparseTuner(make_cfg(f"freeze_bn_stats={str(freeze).lower()}", "mi_epochs=2"), SmallCNN(), CPU, 0,
                      RANPAC_DEFAULTS)
    bn = tuner.network.convnet.body[1]
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    tuner.network.train()
    assert bn.training is not freeze and tuner.network.convnet.body[0].training
    loader = make_loader()
    tuner.tune(loader, make_task(0, loader))
    if freeze:
        assert torch.equal(bn.running_mean, mean0) and torch.equal(bn.running_var, var0)
        assert int(bn.num_batches_tracked) == 0
    else:  # official network.train(): every forward (scoring + training) updates the statistics
        assert not torch.equal(bn.running_mean, mean0)
        assert int(bn.num_batches_tracked) == 2 * len(loader)


# ---------------------------------------------------------------------------------------------
# CE ablations (algorithms.md §5)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def record_masks(monkeypatch):
    """Record every CE-ablation step: (masks, weights, gradients) as seen by ``PerStepPhase.masks``."""
    from models.sparse.per_step import PerStepPhase

    calls = []
    original = PerStepPhase.masks

    def wrapper(self, params):
        out = original(self, params)
        calls.append(({n: m.clone() for n, m in out.items()},
                      {n: p.detach().clone() for n, p in params.items()},
                      {n: p.grad.clone() for n, p in params.items() if p.grad is not None}))
        return out

    monkeypatch.setattr(PerStepPhase, "masks", wrapper)
    return calls


@pytest.mark.parametrize("spr", ["rand", "l2", "grad", "run", "cerun"])
def test_ce_ablation_runs_and_masks(record_masks, spr):
    cfg = make_cfg(f"spr={spr}", "ablation_epochs=2")
    tuner = make_tuner(cfg)
    loader = make_loader(n=16, batch=8)
    before = snapshot(tuner)
    report = tuner.tune(loader, make_task(0, loader))
    total = tuner.backbone_numel
    assert report["method"] == spr and report["backbone_entries"] == total == TINY_ENTRIES
    assert report["steps"] == 2 * len(loader) == len(record_masks)
    assert len(report["epoch_losses"]) == 2 and all(math.isfinite(v) for v in report["epoch_losses"])
    assert any(not torch.equal(p.detach(), before[n]) for n, p in tuner.network.named_parameters()
               if n.startswith("convnet."))

    # the counted entries are exactly the backbone's non-zero masked gradients
    nonzero = 0
    for masks, _, grads in record_masks:
        for n in tuner.backbone_names:
            g = grads[n] * masks[n] if n in masks else grads[n]
            nonzero += int(torch.count_nonzero(g))
    assert report["updated_fraction_per_step"] == pytest.approx(nonzero / report["steps"] / total, rel=1e-12)

    for masks, weights, grads in record_masks:
        assert set(grads) >= set(tuner.backbone_names) and "fc.weight" in grads and "fc.sigma" in grads
        if spr in ("run", "cerun"):
            assert masks == {}
            continue
        assert set(masks) == set(grads)
        if spr == "rand":  # per tensor, max(1, int(0.05 n)) uniformly random entries
            for m in masks.values():
                assert int(m.sum()) == max(1, int(0.05 * m.numel())) and torch.equal(m, (m > 0).float())
        elif spr == "l2":  # per tensor, the int(0.005 n) largest |theta|; none when that is 0
            for n, m in masks.items():
                k = int(0.005 * m.numel())
                assert int(m.sum()) == k
                if k:
                    assert torch.equal(m > 0, weights[n].abs() >= weights[n].abs().flatten().topk(k).values[-1])
        else:  # grad: globally, the int(0.005 N) largest |g|
            flat = torch.cat([g.abs().flatten() for g in grads.values()])
            k = int(0.005 * flat.numel())
            assert sum(int(m.sum()) for m in masks.values()) == k
            thr = flat.topk(k).values[-1]
            for n, m in masks.items():
                assert torch.equal(m > 0, grads[n].abs() >= thr)

    frac = report["updated_fraction_per_step"]
    if spr == "rand":  # ~5% of every tensor
        per_step = sum(max(1, int(0.05 * before[n].numel())) for n in tuner.backbone_names)
        assert 0.95 * per_step / total <= frac <= per_step / total
        assert frac == pytest.approx(0.05, abs=0.005)
    elif spr == "l2":
        assert frac <= sum(int(0.005 * before[n].numel()) for n in tuner.backbone_names) / total
    elif spr == "grad":  # ~0.5% of all entries with a gradient (the cosine head included)
        assert 0.003 < frac <= int(0.005 * (total + 4 * 32 + 1)) / total
    else:
        assert frac > 0.99


@pytest.mark.parametrize("random_rows", [False, True])
def test_ce_ablation_head_rows_and_sigma_across_tasks(random_rows):
    """Task 0's cosine rows are U(-1/sqrt(D), 1/sqrt(D)); later tasks start from zero rows (algorithms.md §9.24) unless
    ablation_random_init_rows; sigma carries over from the previous task's trained head."""
    cfg = make_cfg("spr=grad", "ablation_epochs=1", f"ablation_random_init_rows={str(random_rows).lower()}")
    tuner = make_tuner(cfg)
    loader0, loader1 = make_loader(seed=0), make_loader(seed=1, first=4)
    head0 = tuner.make_head(make_task(0, loader0))
    bound = 1 / math.sqrt(32)
    assert head0.weight.shape == (4, 32) and 0 < float(head0.weight.detach().abs().max()) <= bound
    assert float(head0.sigma.detach()) == 1.0
    tuner.tune(loader0, make_task(0, loader0))
    assert tuner.sigma != 1.0  # sigma trained with lr 1e-2
    head1 = tuner.make_head(make_task(1, loader1))
    assert float(head1.sigma.detach()) == pytest.approx(tuner.sigma)
    if random_rows:
        assert 0 < float(head1.weight.detach().abs().max()) <= bound
    else:
        assert not head1.weight.any()
    report = tuner.tune(loader1, make_task(1, loader1))  # zero rows: 1e12-scaled head gradients, finite loss
    assert all(math.isfinite(v) for v in report["epoch_losses"])
    assert all(torch.isfinite(p).all() for p in tuner.network.parameters())


# ---------------------------------------------------------------------------------------------
# end to end through trainer.run (algorithms.md §4 in both learners)
# ---------------------------------------------------------------------------------------------
def write_image_folder(root: Path, n_classes: int = 6, train_per_class: int = 4, test_per_class: int = 2,
                       size: int = 16) -> Path:
    """Real PNGs in ImageFolder layout ``<root>/cub/{train,test}/<class>/*.png``: a colour per class + noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        for c in range(n_classes):
            folder = root / "cub" / split / f"class_{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([40 + 200 * (c % 2), 40 + 100 * (c % 3), 40 + 60 * c], dtype=np.float64)
            for i in range(per_class):
                pixels = np.clip(colour + rng.normal(0, 20, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels, mode="RGB").save(folder / f"{i:02d}.png")
    return root


def tiny_overrides(data_root: Path, model_name: str, **extra) -> list[str]:
    values = {"dataset": "cub", "data_root": str(data_root), "init_cls": 3, "increment": 3, "model_name": model_name,
              "convnet_type": VIT, "pretrained": False, "backbone_kwargs": TINY, "input_size": 32, "spr": "mist",
              "mi_epochs": 2, "M": 64, "device": "cpu", "seed": [1993], "batch_size": 4, "num_workers": 0,
              "progress": False, "download": False, **extra}
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def tiny_vit_closed_forms(select_rate: float) -> tuple[float, float]:
    """(selected_fraction, selected_fraction_maskable) of the tiny ViT with distinct scores."""
    with torch.device("meta"):
        model = build_backbone(VIT, pretrained=False, **TINY)
    from models.sparse.masks import is_always_trainable

    sel = mask_total = total = 0
    for n, p in model.named_parameters():
        total += p.numel()
        if is_always_trainable(f"convnet.{n}", p):
            sel += p.numel()
        else:
            k = kept_by_quantile(p.numel(), 1 - select_rate)
            sel += k
            mask_total += p.numel()
    exempt = total - mask_total
    return sel / total, (sel - exempt) / mask_total


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("mist_images"))


LEARNER_CASES = [("ranpac_mist", 4, RANPAC_FROZEN_PER_TASK), ("simplecil_mist", 32, SIMPLECIL_FROZEN_PER_TASK)]


@pytest.mark.parametrize("model_name,batch,frozen", LEARNER_CASES)  # frozen: per task
def test_mist_end_to_end_and_reproducible(cub_root, tmp_path, record_select, model_name, batch, frozen):
    cfg = load_config(None, tiny_overrides(cub_root, model_name))
    assert cfg.tuning == "mist"
    results = []
    for run in ("a", "b"):
        paths = trainer.run(cfg, tmp_path / run)
        assert len(paths) == 1 and paths[0].is_file() and paths[0].name == "results.json"
        results.append(json.loads(paths[0].read_text()))
    frac, frac_maskable = tiny_vit_closed_forms(cfg.select_rate)
    res = results[0]
    assert res["complete"] is True and len(res["tasks"]) == 2
    n_train = 3 * 4  # 3 classes x 4 images per task
    for t, task in enumerate(res["tasks"]):
        tuning = task["tuning"]
        assert tuning["method"] == "mist"
        assert tuning["selected_fraction"] == pytest.approx(frac, abs=0.01)
        assert tuning["selected_fraction_maskable"] == pytest.approx(cfg.select_rate, abs=0.01)
        assert tuning["selected_fraction_maskable"] == pytest.approx(frac_maskable, abs=0.01)
        assert tuning["steps"] == (cfg.mi_epochs - 1) * math.ceil(n_train / batch)
        assert len(tuning["epoch_losses"]) == cfg.mi_epochs
        assert tuning["frozen_entries"] == frozen * (t + 1)  # new entries only: frozen ones score 0
        for key in ("top1", "top5", "new"):
            assert 0.0 <= task[key] <= 100.0
    assert all(0.0 <= v <= 100.0 for row in res["accuracy_matrix"] for v in row)
    assert [len(row) for row in res["accuracy_matrix"]] == [1, 2]
    # same seed: identical accuracies, tuning reports and masks
    assert results[0]["accuracy_matrix"] == results[1]["accuracy_matrix"]
    assert results[0]["top1_curve"] == results[1]["top1_curve"]
    assert [t["tuning"] for t in results[0]["tasks"]] == [t["tuning"] for t in results[1]["tasks"]]
    assert len(record_select) == 4  # 2 runs x 2 tasks
    for first, second in ((record_select[0], record_select[2]), (record_select[1], record_select[3])):
        assert set(first[1]) == set(second[1])
        assert all(torch.equal(first[1][n], second[1][n]) for n in first[1])


def test_mist_first_task_only(cub_root, tmp_path, record_select):
    cfg = load_config(None, tiny_overrides(cub_root, "simplecil_mist", mist_tasks="first"))
    (path,) = trainer.run(cfg, tmp_path / "runs")
    tasks = json.loads(path.read_text())["tasks"]
    assert "tuning" in tasks[0] and "tuning" not in tasks[1]
    assert len(record_select) == 1


def write_fake_cifar100(root: Path, train_per_class: int = 2, test_per_class: int = 1) -> Path:
    """torchvision's on-disk CIFAR-100: ``<root>/cifar-100-python/{train,test,meta}`` pickles."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(100), per_class)
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        data[:, :1024] = (labels[:, None] * 2).astype(np.uint8)  # red channel encodes the class
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist()}, fh)
    with open(folder / "meta", "wb") as fh:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)]}, fh)
    return root


def test_ranpac_cifar_headline_config_runs_on_cpu(tmp_path, record_select):
    path = REPO / "exps" / "ranpac" / "cifar.json"
    official = load_config(path)
    assert (official.model_name, official.dataset, official.spr) == ("ranpac_mist", "cifar224", "mist")
    assert (official.select_rate, official.drop_rate, official.mi_epochs) == (0.1, 0.9, 20)
    assert (official.init_cls, official.increment, official.batch_size, official.M) == (10, 10, 56, 10000)
    assert official.use_RP is True and official.seed == [1993]

    root = write_fake_cifar100(tmp_path / "data")
    cfg = load_config(path, [f"data_root={root}", "device=cpu", "pretrained=false",
                             f"backbone_kwargs={json.dumps(TINY)}", "input_size=32", "mi_epochs=2", "M=64",
                             "num_workers=0", "progress=false", "download=false"])
    (results_path,) = trainer.run(cfg, tmp_path / "runs")
    res = json.loads(results_path.read_text())
    assert res["complete"] is True
    assert res["task_sizes"] == [10] * 10 and len(res["tasks"]) == 10
    assert sorted(res["class_order"]) == list(range(100))
    for t, task in enumerate(res["tasks"]):
        tuning = task["tuning"]
        assert tuning["selected_fraction_maskable"] == pytest.approx(0.1, abs=0.01)
        assert tuning["steps"] == 1  # 20 images, batch 56: one scoring and one training batch
        assert tuning["frozen_entries"] == RANPAC_FROZEN_PER_TASK * (t + 1)  # quantile 0.9995, new entries per task
        assert 0.0 <= task["top1"] <= 100.0
    assert [len(r) for r in res["accuracy_matrix"]] == list(range(1, 11))
    assert len(record_select) == 10
