"""ACL, SPU and GPS as presets of the tuning phase (issue 14; algorithms.md §19.1, §19.2, §19.5).

CPU, tiny random ViT (tests/test_sparse_tuning.py helpers). Every expected value is computed here independently of the
production code path (plain autograd per batch, explicit loops over anchors), so that swapping two estimators, two
losses or two scopes fails a test:
- SPU's score is |sum_b grad of mean ||logits||^2| (not a sum of squares), over floor(0.25 N) + 2 batches, and only
  first-MLP entries are selected: top int(0.1 n) per weight, bias full;
- GPS's SupCon equals the formula written with loops; its selection keeps exactly K entries per output row of every
  weight, norms / position embedding / class token frozen, biases full; its score is |sum g|, not sum |g|;
- ACL moves every backbone tensor, its first loss is CE over cosine(feature, class mean) / 0.1 of the untouched
  network, and its prototypes are the class means;
- every unselected entry stays bit-identical under SPU (AdamW weight decay included) and GPS.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import trainer

from models.sparse import build_tuner
from models.sparse.estimators import PassSums, scoring_pass
from models.sparse.gps import row_top_k, signed_sum, supervised_contrastive
from models.sparse.presets import resolve_recipe
from models.sparse.spu import is_first_mlp
from utils.config import load_config
from utils.registry import ESTIMATORS, LOSSES

from test_sparse_tuning import CPU, RANPAC_DEFAULTS, make_cfg, make_loader, make_task, snapshot, tiny_backbone


def tuner_for(*overrides: str, seed: int = 3):
    return build_tuner(make_cfg(*overrides), tiny_backbone(), CPU, seed, RANPAC_DEFAULTS)


def tune_one_task(*overrides: str):
    """(tuner, weights before, weights after, report) of one tuned task on 16 random images, batches of 4."""
    tuner = tuner_for(*overrides)
    loader = make_loader(n=16, batch=4)
    before = snapshot(tuner)
    report = tuner.tune(loader, make_task(0, loader))
    return tuner, before, snapshot(tuner), report


# ---------------------------------------------------------------------------------------------
# SPU
# ---------------------------------------------------------------------------------------------
def test_spu_score_is_the_signed_gradient_sum_of_the_logit_norm_over_a_quarter_of_the_batches():
    tuner = tuner_for("spr=spu")
    loader = make_loader(n=40, batch=4)  # N = 10 batches: the pass stops after batch k = 3 (k > 2.5), 4 batches
    task = make_task(0, loader)
    head = tuner.prototype_head(loader, task)
    tuner.network.train()
    want = {}
    for i, (_, x, _) in enumerate(loader):
        if i == math.floor(0.25 * len(loader)) + 2:
            break
        tuner.network.zero_grad(set_to_none=True)
        logits = head(tuner.network.convnet(x))
        (logits ** 2).sum(dim=1).mean().backward()
        for n, p in tuner.network.named_parameters():
            if p.grad is not None:
                want[n] = want.get(n, 0) + p.grad.detach().clone()
    tuner.network.zero_grad(set_to_none=True)
    estimator = ESTIMATORS.get("spu")
    sums = scoring_pass(tuner.loop, tuner.network, loader, LOSSES.get("logit_norm")(tuner, head, task), tuner.state,
                        moments=True, stop=estimator.stop)
    assert sums.n_batches == 4
    scores = estimator.score(sums, tuner.network, None)
    checked = 0
    for name, g in want.items():
        torch.testing.assert_close(scores[name], g.abs(), rtol=1e-5, atol=1e-9)
        checked += 1
    assert checked > 10 and any(float(v.abs().sum()) > 0 for v in want.values())


def test_spu_pass_runs_on_while_a_first_mlp_entry_has_no_score():
    tuner = tuner_for("spr=spu")
    loader = make_loader(n=40, batch=4)
    task = make_task(0, loader)
    head = tuner.prototype_head(loader, task)
    with torch.no_grad():  # a dead input feature of fc1: its column gets no gradient, ever
        tuner.network.convnet.blocks[0].norm2.weight[0] = 0.0
        tuner.network.convnet.blocks[0].norm2.bias[0] = 0.0
    estimator = ESTIMATORS.get("spu")
    sums = scoring_pass(tuner.loop, tuner.network, loader, LOSSES.get("logit_norm")(tuner, head, task), tuner.state,
                        moments=True, stop=estimator.stop)
    assert sums.n_batches == len(loader)  # the official rule never stops: the whole epoch is scored


def test_spu_stop_checks_every_trainable_entry_biases_included():
    """trainer/spu.py stops only once no trainable parameter (c_fc weight or bias) has an entry with |sum| < 1e-12:
    a first-MLP bias entry still at zero keeps the pass going; other tensors do not count."""
    from types import SimpleNamespace

    from models.sparse.spu import spu_stop

    w, b = "convnet.blocks.0.mlp.fc1.weight", "convnet.blocks.0.mlp.fc1.bias"
    scored = {w: torch.ones(4, 2), b: torch.ones(4), "convnet.blocks.0.attn.qkv.weight": torch.zeros(6, 2)}
    assert spu_stop(3, 10, SimpleNamespace(firsts=scored))  # k = 3 > 2.5, every first-MLP entry scored
    assert not spu_stop(2, 10, SimpleNamespace(firsts=scored))  # k = 2 is not > 2.5
    scored[b][1] = 0.0
    assert not spu_stop(3, 10, SimpleNamespace(firsts=scored))


def test_spu_selects_only_first_mlp_entries_top_tenth_per_weight_and_full_bias():
    tuner = tuner_for("spr=spu")
    recipe = resolve_recipe(tuner.cfg)
    assert (recipe.importance, recipe.scope, recipe.budget) == ("spu", "first_mlp", 0.1)
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.rand(s, generator=gen) for n, s in tuner.state.shapes.items()}
    from models.sparse.selective import SelectivePhase

    selected, _ = SelectivePhase(tuner).select(scores, 0.1)
    names = set(tuner.state.shapes)
    first = [n for n in names if is_first_mlp(n, names)]
    assert sorted(first) == sorted(f"convnet.blocks.{i}.mlp.fc1.{k}" for i in (0, 1) for k in ("weight", "bias"))
    for name, mask in selected.items():
        if name.endswith("mlp.fc1.weight"):
            k = int(0.1 * mask.numel())
            assert int(mask.sum()) == k
            assert torch.equal(mask.reshape(-1).nonzero().squeeze(1).sort().values,
                               scores[name].reshape(-1).topk(k).indices.sort().values)
        elif name.endswith("mlp.fc1.bias"):
            assert bool(mask.all())
        else:
            assert not bool(mask.any()), name


def test_spu_leaves_every_unselected_entry_bit_identical_under_adamw_weight_decay():
    tuner, before, after, report = tune_one_task("spr=spu", "mi_epochs=3", "spu_lr=1e-3")
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved == {f"convnet.blocks.{i}.mlp.fc1.{k}" for i in (0, 1) for k in ("weight", "bias")}
    for i in (0, 1):
        name = f"convnet.blocks.{i}.mlp.fc1.weight"
        changed = (before[name] != after[name]).sum()
        assert 0 < int(changed) <= int(0.1 * before[name].numel())
    assert report["moved_fraction"] == pytest.approx(
        sum(int((before[n] != after[n]).sum()) for n in tuner.backbone_names) / tuner.backbone_numel)
    # the shipped AdamW also shrinks the unselected fc1 entries
    _, before, after, _ = tune_one_task("spr=spu", "mi_epochs=3", "spu_lr=1e-3", "spu_decay_masked_entries=true")
    w = "convnet.blocks.0.mlp.fc1.weight"
    assert int((before[w] != after[w]).sum()) > int(0.1 * before[w].numel())


# ---------------------------------------------------------------------------------------------
# GPS
# ---------------------------------------------------------------------------------------------
def supcon_by_loops(features: torch.Tensor, labels: torch.Tensor, tau: float) -> float:
    z = [f / f.norm() for f in features.double()]
    y = labels.repeat(2).tolist()
    total = 0.0
    for a in range(len(z)):
        denominator = sum(math.exp(float(z[a] @ z[b]) / tau) for b in range(len(z)) if b != a)
        positives = [p for p in range(len(z)) if p != a and y[p] == y[a]]
        total += -sum(math.log(math.exp(float(z[a] @ z[p]) / tau) / denominator) for p in positives) / len(positives)
    return total / len(z)


def test_gps_supcon_equals_the_formula_written_with_loops():
    gen = torch.Generator().manual_seed(1)
    features, labels = torch.randn(10, 6, generator=gen), torch.tensor([0, 1, 0, 2, 1])
    got = supervised_contrastive(features, labels, temperature=0.07)
    assert float(got) == pytest.approx(supcon_by_loops(features, labels, 0.07), rel=1e-5)
    assert float(supervised_contrastive(features, labels, temperature=0.5)) == pytest.approx(
        supcon_by_loops(features, labels, 0.5), rel=1e-5)
    with pytest.raises(ValueError, match="2B features"):
        supervised_contrastive(features[:9], labels)


def test_gps_scoring_loss_is_supcon_at_tau_0_07_by_default(monkeypatch):
    """The registered scoring loss (no temperature given) equals the loop formula at GPS's tau = base tau = 0.07
    (utils/loss_utils.py), on the features the phase embeds."""
    import models.sparse.gps as gps

    gen = torch.Generator().manual_seed(2)
    features, labels = torch.randn(8, 6, generator=gen), torch.tensor([0, 1, 0, 1])
    monkeypatch.setattr(gps, "two_view_embeddings", lambda tuner, batch, embed: (features, labels))
    tuner = tuner_for("spr=gps")
    got = float(LOSSES.get("supcon")(tuner, None, None)(None))
    assert got == pytest.approx(supcon_by_loops(features, labels, 0.07), rel=1e-5)
    assert abs(got - supcon_by_loops(features, labels, 0.1)) > 1e-2


def test_gps_score_is_the_absolute_signed_sum_not_the_sum_of_absolute_values():
    firsts = {"w": torch.tensor([3.0, -3.0, 0.5])}  # e.g. batches (+2, +1), (-1, -2), (+1, -0.5)
    squares = {"w": torch.tensor([5.0, 5.0, 1.25])}
    sums = PassSums(squares, firsts, 2, 0.0)
    assert torch.equal(signed_sum(sums, None, None)["w"], torch.tensor([3.0, 3.0, 0.5]))
    assert ESTIMATORS.get(resolve_recipe(make_cfg("spr=gps")).importance).score is signed_sum


def test_gps_keeps_exactly_k_entries_per_output_row_and_freezes_norms_and_embeddings():
    for k in (1, 3):
        tuner = tuner_for("spr=gps", f"gps_k={k}")
        gen = torch.Generator().manual_seed(0)
        scores = {n: torch.rand(s, generator=gen) for n, s in tuner.state.shapes.items()}
        from models.sparse.selective import SelectivePhase

        selected, _ = SelectivePhase(tuner).select(scores, tuner.recipe.budget)
        for name, mask in selected.items():
            if "norm" in name or "pos_embed" in name or "cls_token" in name or name.startswith("simclr"):
                assert not bool(mask.any()), name
            elif "bias" in name:
                assert bool(mask.all()), name
            else:
                rows = mask.reshape(mask.shape[0], -1)
                assert rows.sum(dim=1).tolist() == [k] * rows.shape[0], name
                s = scores[name].reshape(mask.shape[0], -1)
                # each kept entry scores at least as high as every dropped entry of its row
                assert bool((s.masked_fill(~rows, float("inf")).min(1).values
                             >= s.masked_fill(rows, -float("inf")).max(1).values).all())
        assert tuner.state.shapes["convnet.patch_embed.proj.weight"][0] == 32  # conv rows are output channels


def test_row_top_k_of_a_conv_weight_counts_output_channels():
    scores = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    mask = row_top_k(scores, 2)
    assert mask.reshape(2, -1).sum(1).tolist() == [2, 2]
    assert mask.reshape(2, -1)[:, -2:].all()


def test_gps_trains_only_its_selection():
    tuner, before, after, report = tune_one_task("spr=gps", "mi_epochs=3", "gps_lr=1e-3")
    for name in tuner.backbone_names:
        changed = before[name] != after[name]
        if "norm" in name or "pos_embed" in name or "cls_token" in name:
            assert not bool(changed.any()), name
        elif "bias" not in name:
            rows = changed.reshape(changed.shape[0], -1).sum(1)
            assert int(rows.max()) <= 1, name  # K = 1 entry per output row at most
            assert int(rows.sum()) > 0, name
    assert 0 < report["moved_fraction"] == report["selected_fraction"] < 0.1


# ---------------------------------------------------------------------------------------------
# ACL
# ---------------------------------------------------------------------------------------------
def test_acl_first_loss_is_cross_entropy_over_cosine_to_the_class_means_over_tau():
    loader = make_loader(n=8, batch=8, first=4)  # one batch: the epoch's loss is the loss at the untouched weights
    task = make_task(1, loader)  # known = 4: targets are y - 4
    tuner = tuner_for("spr=acl")
    network = tuner.network
    network.eval()
    with torch.no_grad():
        _, x, y = next(iter(loader))
        features = network.convnet(x)
        means = torch.stack([features[y == c].mean(0) for c in range(task.known, task.seen)])
        logits = F.normalize(features, dim=1) @ F.normalize(means, dim=1).T / 0.1
        want = F.cross_entropy(logits, y - task.known)
        # tau enters as 1 / tau, not as a scale of 0.1 or a plain cosine
        assert abs(float(want) - float(F.cross_entropy(logits * 0.01, y - task.known))) > 1e-3
    report = tuner.tune(loader, task)
    assert report["epoch_losses"][0] == pytest.approx(float(want), rel=1e-5)
    assert report["steps"] == 1


def test_acl_moves_every_backbone_tensor_and_only_the_backbone():
    tuner, before, after, report = tune_one_task("spr=acl", "warm_epochs=2")
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == name.startswith("convnet."), name
    assert report["steps"] == 8 and len(report["epoch_losses"]) == 2
    assert report["moved_fraction"] > 0.9 and report["relative_change"] > 0


def test_acl_learning_rate_and_weight_decay_are_the_hosts():
    from models.sparse.acl import host_values

    for name in ("simplecil", "simplecil_mist"):
        assert host_values(make_cfg("spr=acl", f"model_name={name}")) == (1e-4, 5e-4)
    for name in ("ranpac", "ranpac_mist"):  # an alias is the same learner (issue 24: ranpac_mist got 5e-4)
        assert host_values(make_cfg("spr=acl", f"model_name={name}")) == (1e-4, 5e-3)
    assert host_values(make_cfg("spr=acl", "model_name=l2p_mist")) == (1e-6, 0.0)
    assert host_values(make_cfg("spr=acl", "warm_weight_decay=0.01"))[1] == 0.01


def test_acl_two_steps_are_sgd_with_momentum_0_9_and_the_hosts_weight_decay_by_hand():
    """Two SGD steps written out (PyTorch's SGD with dampening 0: v_1 = g_1 + wd w_0, v_2 = 0.9 v_1 + g_2 + wd w_1,
    w_i = w_(i-1) - lr v_i) on CE over cosine(feature, class mean) / 0.1, every gradient by plain autograd."""
    lr, decay, momentum, tau = 0.05, 5e-3, 0.9, 0.1  # RanPAC's weight decay in ACL's configs
    loader = make_loader(n=8, batch=4)
    task = make_task(0, loader)
    tuner = tuner_for("spr=acl", f"warm_lr={lr}")
    convnet = copy.deepcopy(tuner.network.convnet)
    with torch.no_grad():
        xs, ys = zip(*[(x, y) for _, x, y in loader])
        feats, labels = convnet(torch.cat(xs)), torch.cat(ys)
        means = torch.stack([feats[labels == c].mean(0) for c in range(task.known, task.seen)])

    def grads(x, y):
        convnet.zero_grad(set_to_none=True)
        logits = F.normalize(convnet(x), dim=1) @ F.normalize(means, dim=1).T / tau
        F.cross_entropy(logits, y - task.known).backward()
        return {n: p.grad.detach().clone() for n, p in convnet.named_parameters()}

    def by_hand(m: float) -> dict[str, torch.Tensor]:
        net = copy.deepcopy(convnet)
        params = dict(net.named_parameters())
        velocity: dict[str, torch.Tensor] = {}
        for x, y in zip(xs, ys):
            convnet.load_state_dict(net.state_dict())
            g = grads(x, y)
            with torch.no_grad():
                for n, p in params.items():
                    step = g[n] + decay * p
                    velocity[n] = step if n not in velocity else m * velocity[n] + step
                    p -= lr * velocity[n]
        return {f"convnet.{n}": p.detach().clone() for n, p in params.items()}

    start = copy.deepcopy(convnet.state_dict())
    want = by_hand(momentum)
    convnet.load_state_dict(start)
    other = by_hand(0.5)
    report = tuner.tune(loader, task)
    assert report["steps"] == 2
    got = snapshot(tuner)
    worst = max(float((got[n] - w).abs().max()) for n, w in want.items())
    apart = max(float((other[n] - w).abs().max()) for n, w in want.items())
    assert worst < 1e-6 < apart / 10, (worst, apart)


# ---------------------------------------------------------------------------------------------
# SPG
# ---------------------------------------------------------------------------------------------
def test_spg_normalisation_is_abs_tanh_of_the_z_score_with_unbiased_std():
    from statistics import mean, stdev

    from models.sparse.spg import standardised_importance

    h = torch.tensor([[0.5, -2.0, 3.0], [0.0, 1.0, -0.25]])
    values = h.reshape(-1).tolist()
    m, s = mean(values), stdev(values)  # stdev: the n - 1 estimator
    want = torch.tensor([abs(math.tanh((v - m) / s)) for v in values]).view(2, 3)
    torch.testing.assert_close(standardised_importance(h), want, rtol=1e-6, atol=1e-7)
    assert not bool(standardised_importance(torch.zeros(4)).any())
    assert not bool(standardised_importance(torch.full((5,), 2.0)).any())


def test_spg_importance_of_the_first_task_is_the_normalised_signed_sum_of_its_ce_gradients():
    from models.sparse.spg import SoftMaskPhase, standardised_importance

    tuner = tuner_for("spr=spg")
    loader = make_loader(n=12, batch=4)
    task = make_task(0, loader)
    head = tuner.prototype_head(loader, task)
    head.requires_grad_(False)
    tuner.network.train()
    sums = {}
    for _, x, y in loader:
        tuner.network.zero_grad(set_to_none=True)
        F.cross_entropy(head(tuner.network.convnet(x)), y - task.known).backward()
        for n in tuner.backbone_names:
            sums[n] = sums.get(n, 0) + tuner.network.get_parameter(n).grad.detach().clone()
    tuner.network.zero_grad(set_to_none=True)
    gamma = SoftMaskPhase(tuner).importance(loader, task, head)
    offset = 0
    for n in tuner.backbone_names:
        part = gamma[offset: offset + sums[n].numel()].view_as(sums[n])
        torch.testing.assert_close(part, standardised_importance(sums[n]), rtol=1e-4, atol=1e-5)
        offset += sums[n].numel()
    assert float(gamma.max()) > 0.5


def z_tanh(h: torch.Tensor) -> torch.Tensor:
    """|tanh((h - mean) / std)| of one tensor, the unbiased std; 0 for a constant tensor (SPG's spg.py)."""
    h = h.double()
    return torch.zeros_like(h) if float(h.std()) == 0 else torch.tanh((h - h.mean()) / h.std()).abs()


def summed_gradients(network, loader, loss) -> dict[str, torch.Tensor]:
    """Signed sums over ``loader``'s batches of the backbone gradients of ``loss(features, labels)``, plain autograd."""
    sums: dict[str, torch.Tensor] = {}
    for _, x, y in loader:
        network.zero_grad(set_to_none=True)
        loss(network.convnet(x), y).backward()
        for n, p in network.named_parameters():
            if n.startswith("convnet.") and p.grad is not None:
                sums[n] = sums.get(n, 0) + p.grad.detach().double()
    network.zero_grad(set_to_none=True)
    return sums


def test_spg_second_task_by_hand_soft_mask_head_scale_and_max_of_maxes(monkeypatch):
    """Task 1 of SPG written out: one SGD step moves each backbone entry by -lr (1 - a) g and the new linear head by
    -lr (1 - mean a) g_head; afterwards a <- max(a, gamma) with gamma the entrywise max of the recent term (CE of the
    trained head) and the old task's term (sum of its stored head's logits), each |tanh(z-score)| of the signed
    gradient sum of its tensor."""
    lr = 0.1
    tuner = tuner_for("spr=spg", "mi_epochs=1", f"spg_lr={lr}")
    first = make_loader(n=8, batch=8)
    tuner.tune(first, make_task(0, first))
    a0 = tuner.phase_state["spg_a"].clone()
    assert 0 <= float(a0.min()) and 0.5 < float(a0.max()) <= 1  # float32 tanh saturates at 1, as the original
    second = make_loader(n=8, batch=8, seed=1, first=4)  # one batch: one step
    task = make_task(1, second)
    made, real = [], tuner.task_head
    monkeypatch.setattr(tuner, "task_head", lambda loader, t: made.append(real(loader, t)) or
                        made.append(copy.deepcopy(made[-1])) or made[-2])
    start = copy.deepcopy(tuner.network)
    before = snapshot(tuner)
    tuner.tune(second, task)
    head, head0 = made
    assert isinstance(head0, torch.nn.Linear)  # the authors' per-task linear heads
    # the step
    start.zero_grad(set_to_none=True)
    head0.zero_grad(set_to_none=True)
    _, x, y = next(iter(second))
    F.cross_entropy(head0(start.convnet(x)), y - task.known).backward()
    after, offset = snapshot(tuner), 0
    for n in tuner.backbone_names:
        g = start.get_parameter(n).grad
        keep = (1 - a0[offset: offset + g.numel()]).view_as(g)
        torch.testing.assert_close(after[n] - before[n], -lr * keep * g, rtol=1e-3, atol=1e-7)
        offset += g.numel()
    scale = 1 - float(a0.double().mean())
    assert 0.05 < 1 - scale < 0.95  # the head's scale is far from 1
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(head, name).detach() - getattr(head0, name).detach(),
                                   -lr * scale * getattr(head0, name).grad, rtol=1e-4, atol=1e-8)
    # the importance after the task, at the trained weights
    state = tuner.phase_state
    assert state["spg_sizes"].tolist() == [4, 4] and state["spg_heads"].shape == (8, 32)
    old_w, old_b = state["spg_heads"][:4], state["spg_bias"][:4]
    torch.testing.assert_close(state["spg_heads"][4:], head.weight.detach())
    recent = summed_gradients(tuner.network, second, lambda f, y: F.cross_entropy(head(f), y - task.known))
    other = summed_gradients(tuner.network, second, lambda f, y: F.linear(f, old_w, old_b).sum())
    r = torch.cat([z_tanh(recent[n]).reshape(-1) for n in tuner.backbone_names])
    o = torch.cat([z_tanh(other[n]).reshape(-1) for n in tuner.backbone_names])
    gamma = torch.maximum(r, o)
    assert float((o - r).clamp(min=0).max()) > 0.1  # the old task's term decides some entries
    want = torch.maximum(a0.double(), gamma)
    torch.testing.assert_close(state["spg_a"].double(), want, rtol=0, atol=2e-4)
    assert float((want - a0.double()).max()) > 0.1  # the running max grew


# ---------------------------------------------------------------------------------------------
# SparCL
# ---------------------------------------------------------------------------------------------
def test_sparcl_prune_keeps_the_most_important_and_regrows_only_pruned_positions():
    from models.sparse.sparcl import prune_and_regrow, sparsity_at

    assert [sparsity_at(e) for e in (0, 4, 5, 10, 15)] == [(0.96, 0.95), (0.96, 0.95)] + [(0.95, 0.95)] * 3
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(50, 40, generator=gen)
    g = torch.randn(50, 40, generator=gen)
    for p, q in ((0.96, 0.95), (0.95, 0.95), (0.5, 0.2)):
        mask = prune_and_regrow(w, g, p, q, torch.Generator().manual_seed(1))
        n = w.numel()
        assert int(mask.sum()) == int((1 - q) * n)  # density exactly 1 - q after the regrowth
        importance = (w.abs() + 0.5 * g.abs()).reshape(-1)
        top = importance.topk(int((1 - p) * n)).indices
        assert bool(mask.reshape(-1)[top].all())
        regrown = mask.reshape(-1).clone()
        regrown[top] = False  # what is left was drawn among the pruned positions only
        assert int(regrown.sum()) == int((1 - q) * n) - int((1 - p) * n)
    magnitude_only = prune_and_regrow(w, None, 0.9, 0.9, gen)
    assert torch.equal(magnitude_only.reshape(-1).nonzero().squeeze(1).sort().values,
                       w.abs().reshape(-1).topk(199).indices.sort().values)  # int((1 - 0.9) * 2000): 1 - 0.9 < 0.1
    with pytest.raises(ValueError, match="q <= p"):
        prune_and_regrow(w, None, 0.5, 0.9, gen)


def test_sparcl_trains_only_its_mask_inside_weight_matrices():
    from models.sparse.sparcl import in_scope

    tuner, before, after, report = tune_one_task("spr=sparcl", "mi_epochs=2", "sparcl_lr=1e-3")
    total = 0
    for name in tuner.backbone_names:
        changed = int((before[name] != after[name]).sum())
        param = tuner.network.get_parameter(name)
        if in_scope(name, param):
            assert 0 < changed <= int(0.05 * param.numel()), name  # density 5% (4% + 1% regrown)
        else:
            assert changed == 0, name
        total += changed
    assert report["trainable_fraction_per_update"] == [report["selected_fraction"]]
    assert report["moved_fraction"] == total / tuner.backbone_numel
    assert "sparcl_generator" in tuner.phase_state


def test_sparcl_reselection_at_epoch_5_ranks_by_weight_plus_half_the_last_masked_gradient(monkeypatch):
    """At phase epoch 5 (p = q = 0.95: no regrowth) each tensor keeps exactly the top 5% of |w| + 0.5 |g| with g the
    gradient of the step before, masked by the mask of epochs 0-4; g is recomputed here by autograd from the weights
    that step saw (one batch, so every step sees the same images) and the phase's fixed head."""
    import models.sparse.sparcl as sparcl

    calls, weights_seen, heads, real_prune, real_head = [], [], [], sparcl.prune_and_regrow, None

    def prune(weight, grad, p, q, generator):
        mask = real_prune(weight, grad, p, q, generator)
        calls.append((weight.detach().clone(), None if grad is None else grad.detach().clone(), p, q, mask))
        return mask

    monkeypatch.setattr(sparcl, "prune_and_regrow", prune)
    loader = make_loader(n=8, batch=8)
    task = make_task(0, loader)
    tuner = tuner_for("spr=sparcl", "mi_epochs=6", "sparcl_lr=1e-3")
    real_head = tuner.task_head
    monkeypatch.setattr(tuner, "task_head", lambda ld, t: heads.append(real_head(ld, t)) or heads[-1])
    tuner.network.convnet.register_forward_pre_hook(
        lambda module, args: weights_seen.append(copy.deepcopy(module.state_dict())) if module.training else None)
    tuner.tune(loader, task)
    per_update = len(calls) // 2
    assert len(calls) == 2 * per_update and per_update > 4 and len(weights_seen) == 6  # updates at e = 0 and 5
    assert all(c[1] is None for c in calls[:per_update]) and all(c[1] is not None for c in calls[per_update:])
    (head,), (_, x, y) = heads, next(iter(loader))
    net = copy.deepcopy(tuner.network.convnet)
    net.load_state_dict(weights_seen[4])  # the weights of the step before the update at epoch 5
    F.cross_entropy(head(net(x)), y - task.known).backward()
    in_scope = [n for n, p in tuner.network.convnet.named_parameters() if sparcl.in_scope(f"convnet.{n}", p)]
    assert len(in_scope) == per_update
    for name, first, second in zip(in_scope, calls[:per_update], calls[per_update:]):
        w, g, p, q, mask = second
        assert (p, q) == (0.95, 0.95) and first[2:4] == (0.96, 0.95)
        want_g = net.get_parameter(name).grad * first[4]  # masked by the mask of epochs 0-4
        torch.testing.assert_close(g, want_g, rtol=1e-4, atol=1e-9)
        k = int(0.05 * w.numel())
        top = (w.abs() + 0.5 * want_g.abs()).reshape(-1).topk(k).indices
        assert int(mask.sum()) == k and bool(mask.reshape(-1)[top].all()), name


# ---------------------------------------------------------------------------------------------
# the head each rival trains on (issue 24, item 3) and the tuning phase's batch (item 4)
# ---------------------------------------------------------------------------------------------
def untouched_cosines(tuner, loader, task) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos(f, class mean) (B, C), targets) of the only batch of ``loader`` at the untouched network, by hand."""
    with torch.no_grad():
        _, x, y = next(iter(loader))
        f = tuner.network.convnet(x)
        means = torch.stack([f[y == c].mean(0) for c in range(task.known, task.seen)])
    return F.normalize(f, dim=1) @ F.normalize(means, dim=1).T, y - task.known


@pytest.mark.parametrize("spr", ["spu", "sparcl"])
def test_spu_and_sparcl_logits_are_the_prototype_cosines_at_clips_logit_scale_100(spr):
    loader = make_loader(n=8, batch=8)  # one batch: each epoch's loss is taken before its step
    task = make_task(0, loader)
    tuner = tuner_for(f"spr={spr}", "mi_epochs=2")
    cos, targets = untouched_cosines(tuner, loader, task)
    report = tuner.tune(loader, task)
    if spr == "spu":  # the scoring pass: mean_i ||z_i||^2 with z = 100 cos
        want = float((100 * cos).pow(2).sum(1).mean())
    else:  # SparCL's first training epoch: CE of 100 cos
        want = float(F.cross_entropy(100 * cos, targets))
    assert report["epoch_losses"][0] == pytest.approx(want, rel=1e-4)
    assert abs(want - float(F.cross_entropy(cos, targets))) > 0.1  # not the plain cosine logits


@pytest.mark.parametrize("spr,init", [("gps", "timm"), ("spg", "torch")])
def test_gps_and_spg_train_a_new_linear_head(spr, init, monkeypatch):
    """GPS: a new linear head as timm's ViT head (trunc-normal 0.02, zero bias), trained by the phase's Adam; SPG: the
    authors' per-task nn.Linear heads (torch's default init, |w|, |b| <= 1/sqrt(D)), trained by its SGD."""
    loader = make_loader(n=8, batch=4)
    task = make_task(0, loader)
    tuner = tuner_for(f"spr={spr}", "mi_epochs=2", f"{spr}_lr=1e-2")
    made, real = [], tuner.task_head
    monkeypatch.setattr(tuner, "task_head", lambda ld, t: made.append(real(ld, t)) or
                        made.append(copy.deepcopy(made[-1])) or made[-2])
    tuner.tune(loader, task)
    head, start = made
    start.requires_grad_(False)
    assert type(start) is torch.nn.Linear and start.weight.shape == (task.seen - task.known, 32)
    bound = 1 / math.sqrt(32)
    if init == "timm":
        assert float(start.weight.abs().max()) < 0.1 and not bool(start.bias.any())  # cut at +-2: no effect at 0.02
        assert 0.01 < float(start.weight.std()) < 0.03
    else:
        assert float(start.weight.abs().max()) <= bound and float(start.bias.abs().max()) <= bound
        assert float(start.weight.std()) > 0.1  # U(-1/sqrt(32), 1/sqrt(32)): std 0.10
    assert not torch.equal(head.weight, start.weight) and not torch.equal(head.bias, start.bias)


def test_tuning_batch_size_sets_the_tuning_phases_batch_only(tmp_path):
    from tests.test_sparse_tuning import tiny_overrides, write_image_folder

    images = write_image_folder(tmp_path / "images")  # 4 training images per class, 3 classes per task
    steps = {}
    for size in (None, 2):
        extra = dict(spr="spu", mi_epochs=2) | ({} if size is None else dict(tuning_batch_size=size))
        (path,) = trainer.run(load_config(None, tiny_overrides(images, "ranpac", **extra)), tmp_path / str(size))
        results = json.loads(path.read_text())
        steps[size] = [t["tuning"]["steps"] for t in results["tasks"]]
    assert steps == {None: [3, 3], 2: [6, 6]}  # 12 images per task: batch 4 (the learner's) or 2, one epoch
