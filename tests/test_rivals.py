"""ACL, SPU and GPS as presets of the tuning phase (issue 14; SPEC 19.1, 19.2, 19.5).

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

import math

import pytest
import torch
import torch.nn.functional as F

from models.sparse import build_tuner
from models.sparse.estimators import PassSums, scoring_pass
from models.sparse.gps import row_top_k, signed_sum, supervised_contrastive
from models.sparse.presets import resolve_recipe
from models.sparse.spu import is_first_mlp
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
    for i, (_, x, y) in enumerate(loader):
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


def test_acl_weight_decay_is_the_hosts():
    from models.sparse.acl import acl_weight_decay

    assert acl_weight_decay(make_cfg("spr=acl", "model_name=simplecil")) == 5e-4
    assert acl_weight_decay(make_cfg("spr=acl", "model_name=ranpac")) == 5e-3
    assert acl_weight_decay(make_cfg("spr=acl", "warm_weight_decay=0.01")) == 0.01


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


def test_spg_soft_mask_scales_each_gradient_entry_and_only_grows_across_tasks():
    tuner = tuner_for("spr=spg", "mi_epochs=1", "spg_lr=0.1")
    first = make_loader(n=8, batch=8)
    tuner.tune(first, make_task(0, first))
    a0 = tuner.phase_state["spg_a"].clone()
    assert 0 <= float(a0.min()) and 0.5 < float(a0.max()) <= 1  # float32 tanh saturates at 1, as the original
    second = make_loader(n=8, batch=8, seed=1, first=4)  # one step: the update is -lr (1 - a) g
    task = make_task(1, second)
    head = tuner.prototype_head(second, task)
    tuner.network.train()
    tuner.network.zero_grad(set_to_none=True)
    _, x, y = next(iter(second))
    F.cross_entropy(head(tuner.network.convnet(x)), y - task.known).backward()
    grads = {n: tuner.network.get_parameter(n).grad.detach().clone() for n in tuner.backbone_names}
    tuner.network.zero_grad(set_to_none=True)
    before = snapshot(tuner)
    tuner.tune(second, task)
    after = snapshot(tuner)
    offset = 0
    for n in tuner.backbone_names:
        size = grads[n].numel()
        keep = (1 - a0[offset: offset + size]).view_as(grads[n])
        torch.testing.assert_close(after[n] - before[n], -0.1 * keep * grads[n], rtol=1e-3, atol=1e-7)
        offset += size
    a1 = tuner.phase_state["spg_a"]
    assert bool((a1 >= a0).all()) and bool((a1 > a0).any())
    assert tuner.phase_state["spg_sizes"].tolist() == [4, 4] and tuner.phase_state["spg_heads"].shape[0] == 8


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
