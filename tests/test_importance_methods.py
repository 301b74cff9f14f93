"""PIECE-F/S, the selection scopes, the composition keys and update-magnitude control in the tuner (issue 6).

CPU, tiny random ViT (tests/test_sparse_tuning.py helpers). Closed forms:
- the scoring pass's sums are S1 = sum_b g_b and S2 = sum_b g_b^2 of the per-batch gradients, with no update;
- PIECE-F = S2, PIECE-S = |S1| / sqrt(S2 + 1) (algorithms.md §13.2);
- global top-k selects exactly k = floor(top_ratio * backbone entries) entries, none in an excluded tensor;
- per-block selects floor(rate * n_block) entries inside each block;
- default (PIECE) masks leave a tensor with no selected entry fully trainable; strict masks leave it frozen;
- Adam with weight decay 0 leaves every unselected entry bit-identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import trainer
from models.sparse import build_tuner
from models.sparse.estimators import PassSums, fisher, magnitude, mi_fisher, random_scores, scoring_pass, second_order
from models.sparse.presets import resolve_recipe
from models.sparse.scopes import block_of, is_embedding, select_global, select_per_block
from models.sparse.selective import SelectivePhase
from utils.config import load_config
from utils.errors import ConfigError
from utils.registry import PRESETS

SPR_CHOICES = ("none", *PRESETS.names())
#: the presets of the official code (algorithms.md §4, §5): a fact about it, not a list a new preset must join
OFFICIAL_PRESETS = {"mist", "rand", "l2", "grad", "run", "cerun"}

from test_sparse_tuning import (CPU, RANPAC_DEFAULTS, make_cfg, make_loader, make_task, snapshot, tiny_backbone,
                                tiny_overrides, write_image_folder)


def tuner_for_cfg(*overrides: str, seed: int = 3):
    return build_tuner(make_cfg(*overrides), tiny_backbone(), CPU, seed, RANPAC_DEFAULTS)


def batch_gradients(tuner, loader, task) -> list[dict[str, torch.Tensor]]:
    """Per-batch gradients of the CE loss on a prototype head, computed one batch at a time (no update)."""
    head = tuner.prototype_head(loader, task)
    tuner.network.train()
    grads = []
    for _, x, y in loader:
        tuner.network.zero_grad(set_to_none=True)
        tuner.ce_loss(head, task.known, x, y).backward()
        grads.append({n: p.grad.detach().clone() for n, p in tuner.network.named_parameters() if p.grad is not None})
    tuner.network.zero_grad(set_to_none=True)
    return grads, head


# ---------------------------------------------------------------------------------------------
# estimators
# ---------------------------------------------------------------------------------------------
def test_gradient_sums_fisher_and_second_order_closed_forms():
    tuner = tuner_for_cfg("spr=piece_f")
    loader = make_loader(n=24, batch=8)
    task = make_task(0, loader)
    before = snapshot(tuner)
    grads, head = batch_gradients(tuner, loader, task)
    loss_fn = lambda batch: tuner.ce_loss(head, task.known, batch.x, batch.y, batch.rows)  # noqa: E731
    sums = scoring_pass(tuner.loop, tuner.network, loader, loss_fn, tuner.state, moments=True)
    s1, s2 = sums.firsts, sums.squares
    for name, w in snapshot(tuner).items():
        assert torch.equal(w, before[name])  # no update in the scoring pass
    checked = 0
    for name in grads[0]:
        want_s1 = sum(g[name] for g in grads)
        want_s2 = sum(g[name] ** 2 for g in grads)
        torch.testing.assert_close(s1[name], want_s1, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(s2[name], want_s2, rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(fisher(sums, None, None)[name], s2[name], rtol=0, atol=0)
        torch.testing.assert_close(second_order(sums, None, None)[name],
                                   s1[name].abs() / torch.sqrt(s2[name] + 1.0), rtol=0, atol=0)
        checked += 1
    assert checked > 10 and any(float(v.abs().sum()) > 0 for v in s1.values())


def test_mi_fisher_from_the_sums_equals_mists_own_pass():
    """sum_b g_b^2 / n_b^2 from S2 matches the MIST pass (a different float order, so to rounding)."""
    tuner = tuner_for_cfg()
    loader = make_loader(n=16, batch=8)
    gen_state = tuner.augment.generator.get_state()
    forward = lambda batch: tuner.loss(batch.x, batch.y, batch.rows)  # noqa: E731
    own = scoring_pass(tuner.loop, tuner.network, loader, forward, tuner.state, moments=False)
    scores = mi_fisher(own, tuner.network, None)
    tuner.augment.generator.set_state(gen_state)  # same second views
    sums = scoring_pass(tuner.loop, tuner.network, loader, forward, tuner.state, moments=True)
    again = mi_fisher(sums, tuner.network, None)
    assert own.scaled and not sums.scaled
    for name in scores:
        torch.testing.assert_close(again[name], scores[name], rtol=1e-5, atol=1e-12)


def test_magnitude_and_random_estimators():
    tuner = tuner_for_cfg("importance=magnitude")
    mags = magnitude(PassSums({}, None, 1, 0.0), tuner.network, None)
    for name, p in tuner.network.named_parameters():
        assert torch.equal(mags[name], p.detach().abs())
    a = random_scores(PassSums({}, None, 1, 0.0), tuner.network, torch.Generator().manual_seed(1))
    b = random_scores(PassSums({}, None, 1, 0.0), tuner.network, torch.Generator().manual_seed(1))
    assert all(torch.equal(a[n], b[n]) and 0 <= float(a[n].min()) and float(a[n].max()) < 1 for n in a)


# ---------------------------------------------------------------------------------------------
# selection scopes
# ---------------------------------------------------------------------------------------------
def distinct_scores(tuner) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {n: torch.rand(s, generator=gen) for n, s in tuner.state.shapes.items()}


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.2])
def test_global_top_k_picks_exactly_k_entries_never_an_embedding(ratio):
    tuner = tuner_for_cfg("spr=piece_f", f"top_ratio={ratio}", "strict_mask=true")
    scores = distinct_scores(tuner)
    selected, fully = SelectivePhase(tuner).select(scores, ratio)
    k = math.floor(ratio * tuner.backbone_numel)
    assert fully == 0
    assert sum(int(selected[n].sum()) for n in tuner.backbone_names) == k
    embeddings = [n for n in tuner.backbone_names if is_embedding(n)]
    assert embeddings == ["convnet.cls_token", "convnet.pos_embed", "convnet.patch_embed.proj.weight",
                          "convnet.patch_embed.proj.bias"]
    assert all(not bool(selected[n].any()) for n in embeddings)
    # the k entries are the k largest candidate scores
    pool = torch.cat([scores[n].flatten() for n in tuner.backbone_names if not is_embedding(n)])
    threshold = torch.topk(pool, k).values[-1]
    for n in tuner.backbone_names:
        if not is_embedding(n):
            assert torch.equal(selected[n], scores[n] >= threshold)
    assert bool(selected["simclr.weight"].all())  # the loss head is always trainable


def test_global_top_k_takes_at_least_one_entry_as_piece():
    """k = max(1, floor(N x top_ratio)) (PIECE's extract_and_save_new.py): a ratio below 1 / N selects one entry."""
    tuner = tuner_for_cfg("spr=piece_f", "top_ratio=1e-9", "strict_mask=true")
    scores = distinct_scores(tuner)
    selected, _ = SelectivePhase(tuner).select(scores, 1e-9)
    assert sum(int(selected[n].sum()) for n in tuner.backbone_names) == 1
    best = max((float(scores[n].max()), n) for n in tuner.backbone_names if not is_embedding(n))[1]
    assert bool(selected[best].any())


def test_select_global_ties_still_give_exactly_k():
    scores = {"a": torch.ones(10), "b": torch.ones(3, 2)}
    picked = select_global(scores, 7)
    assert sum(int(m.sum()) for m in picked.values()) == 7 and picked["b"].shape == (3, 2)
    with pytest.raises(ValueError, match="k=17"):
        select_global(scores, 17)


def test_per_block_picks_the_fraction_inside_each_block():
    tuner = tuner_for_cfg("spr=piece_f", "selection_scope=per_block", "strict_mask=true")
    scores = distinct_scores(tuner)
    rate = 0.05
    selected, _ = SelectivePhase(tuner).select(scores, rate)
    groups: dict[str, list[str]] = {}
    for n in tuner.backbone_names:
        if not is_embedding(n):
            groups.setdefault(block_of(n), []).append(n)
    assert sorted(groups) == ["blocks.0", "blocks.1", "outside"]
    for names in groups.values():
        n_group = sum(scores[n].numel() for n in names)
        assert sum(int(selected[n].sum()) for n in names) == math.floor(rate * n_group)
    assert block_of("convnet.blocks.12.attn.qkv.weight") == "blocks.12" and block_of("convnet.norm.weight") == "outside"
    direct = select_per_block({n: scores[n] for n in groups["blocks.0"]}, rate)
    assert all(torch.equal(direct[n], selected[n]) for n in direct)


def test_default_mask_leaves_tensors_without_a_selected_entry_fully_trainable_strict_does_not():
    scores = None
    results = {}
    for strict in (False, True):
        tuner = tuner_for_cfg("spr=piece_f", f"strict_mask={str(strict).lower()}")
        scores = scores or distinct_scores(tuner)
        results[strict] = SelectivePhase(tuner).select(scores, 0.001)
    (loose, n_full), (strict_sel, n_strict) = results[False], results[True]
    empty = [n for n in strict_sel if n.startswith("convnet.") and not is_embedding(n) and not strict_sel[n].any()]
    assert len(empty) == n_full > 0 and n_strict == 0
    for n in empty:
        assert bool(loose[n].all())  # PIECE: no index file -> all-ones mask (algorithms.md §13.4)
    for n in loose:
        if n not in empty:
            assert torch.equal(loose[n], strict_sel[n])


# ---------------------------------------------------------------------------------------------
# a whole task: Adam with weight decay 0
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spr", ["piece_f", "piece_s"])
def test_adam_with_weight_decay_0_leaves_unselected_entries_bit_identical(monkeypatch, spr):
    tuner = tuner_for_cfg(f"spr={spr}", "top_ratio=0.02", "strict_mask=true", "mi_epochs=3", "adam_lr=1e-3")
    captured = {}
    original = SelectivePhase.select

    def spy(self, scores, budget):
        out = original(self, scores, budget)
        captured["selected"] = out[0]
        return out

    monkeypatch.setattr(SelectivePhase, "select", spy)
    loader = make_loader(n=16, batch=8)
    before = snapshot(tuner)
    report = tuner.tune(loader, make_task(0, loader))
    after = snapshot(tuner)
    moved = 0
    for name in tuner.backbone_names:
        mask = captured["selected"][name]
        assert torch.equal(after[name][~mask], before[name][~mask]), name
        moved += int((after[name][mask] != before[name][mask]).sum())
    assert moved > 0.5 * sum(int(captured["selected"][n].sum()) for n in tuner.backbone_names)
    assert report["method"] == spr and report["steps"] == 2 * len(loader) and report["fully_trainable_tensors"] == 0
    assert report["selected_fraction"] == pytest.approx(math.floor(0.02 * tuner.backbone_numel) / tuner.backbone_numel)
    assert isinstance(tuner.make_optimizer()[0], torch.optim.Adam)


# ---------------------------------------------------------------------------------------------
# composition keys and presets
# ---------------------------------------------------------------------------------------------
def test_every_registered_preset_resolves_to_its_parts():
    """Each registered preset (the registry is the list: a new preset needs no edit here) resolves to a recipe of its
    own parts; exactly the official code's presets are marked official."""
    assert {name for name, p in PRESETS.items() if p.official} == OFFICIAL_PRESETS
    assert set(SPR_CHOICES) == {"none", *PRESETS.names()}
    for spr, p in PRESETS.items():
        recipe = resolve_recipe(make_cfg(f"spr={spr}"))
        assert recipe.preset == spr and recipe.selective == p.selective
        assert {k: getattr(recipe, k) for k in p.parts} == p.parts
    piece = resolve_recipe(make_cfg("spr=piece_s"))
    assert (piece.importance, piece.scope, piece.budget, piece.optimizer, piece.loss) == \
        ("second_order", "global", 0.001, "adam", "ce")
    assert not (piece.drop or piece.overlap or piece.freeze) and piece.exclude_embeddings
    assert not piece.strict_mask and resolve_recipe(make_cfg("spr=piece_f", "strict_mask=true")).strict_mask
    assert resolve_recipe(make_cfg("spr=magnitude_gate")).strict_mask  # else a small budget trains more
    mist = resolve_recipe(make_cfg("importance=fisher", "gradient_drop=false", "budget=0.2"))
    assert (mist.importance, mist.drop, mist.budget, mist.overlap) == ("fisher", False, 0.2, True)


def test_composition_keys_are_refused_where_they_do_not_apply():
    with pytest.raises(ConfigError, match="key 'importance' is set but spr 'rand'"):
        make_cfg("spr=rand", "importance=fisher")
    with pytest.raises(ConfigError, match="takes its budget from the gate"):
        make_cfg("spr=magnitude_gate", "budget=0.1")
    with pytest.raises(ConfigError, match="key 'importance' has value 'fishr'.*did you mean 'fisher'"):
        make_cfg("importance=fishr")
    with pytest.raises(ConfigError, match="key 'selection_scope'"):
        make_cfg("selection_scope=layer")


def test_mist_with_importance_random_equals_the_mist_random_preset():
    reports, weights = [], []
    for overrides in (("spr=mist_random",), ("spr=mist", "importance=random")):
        tuner = tuner_for_cfg(*overrides)
        for t in range(2):
            loader = make_loader(seed=t, first=4 * t)
            report = tuner.tune(loader, make_task(t, loader))
        report.pop("method")
        reports.append(report)
        weights.append(snapshot(tuner))
    assert reports[0] == reports[1]
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])


def test_overrides_switch_mists_rules_off():
    tuner = tuner_for_cfg("gradient_drop=false", "overlap_penalty=false", "freeze_rule=false")
    for t in range(2):
        loader = make_loader(seed=t, first=4 * t)
        report = tuner.tune(loader, make_task(t, loader))
    assert report["frozen_entries"] == 0
    assert all(int(c.sum()) == 0 for c in tuner.state.update_count.values())
    # no drop: every eligible entry has a gradient every step (minus exact zeros)
    assert report["updated_fraction_per_step"] > 0.9 * report["selected_fraction"]


# ---------------------------------------------------------------------------------------------
# end to end: results.json, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("importance_images"))


def test_magnitude_gate_writes_its_decisions_and_resumes_exactly(images, tmp_path):
    extra = dict(spr="magnitude_gate", mi_epochs=2, gate_threshold=0.3, gate_budget_large=0.05,
                 gate_budget_small=0.002)
    (full_path,) = trainer.run(load_config(None, tiny_overrides(images, "simplecil", **extra)), tmp_path / "full")
    full = json.loads(full_path.read_text())
    gates = [task["tuning"]["gate"] for task in full["tasks"]]
    assert gates[0] == {"similarity": None, "regime": "initialized", "budget": 0.05}
    s = gates[1]["similarity"]
    assert -1 <= s <= 1 and gates[1]["regime"] == ("initialized" if s < 0.3 else "frozen")
    assert gates[1]["budget"] == (0.05 if s < 0.3 else 0.002)
    stop = load_config(None, tiny_overrides(images, "simplecil", stop_after_task=0, **extra))
    with pytest.raises(trainer.RunStopped, match="stopped after task 0"):
        trainer.run(stop, tmp_path / "stopped")
    (seed_dir,) = (tmp_path / "stopped").glob("*/*/seed1993")
    (resumed_path,) = trainer.resume(seed_dir.parent)
    resumed = json.loads(resumed_path.read_text())
    assert [t["tuning"]["gate"] for t in resumed["tasks"]] == gates
    assert resumed["top1_curve"] == full["top1_curve"]
    assert ([t["tuning"]["epoch_losses"] for t in resumed["tasks"]]
            == [t["tuning"]["epoch_losses"] for t in full["tasks"]])


@pytest.mark.parametrize("learner", ["ranpac", "simplecil"])
@pytest.mark.parametrize("spr", ["piece_f", "piece_s", "mist_random"])
def test_new_presets_run_end_to_end(images, tmp_path, learner, spr):
    (path,) = trainer.run(load_config(None, tiny_overrides(images, learner, spr=spr, mi_epochs=2)), tmp_path)
    results = json.loads(path.read_text())
    assert results["status"] == "complete" and len(results["top1_curve"]) == 2
    for task in results["tasks"]:
        assert task["tuning"]["method"] == spr and task["tuning"]["steps"] > 0
        assert 0 < task["tuning"]["selected_fraction"] <= 1


def test_comparison_runner_jobs_and_configs():
    """exps/importance: the demo configs cover every method for both learners; --base expands each base
    config into one run per method, dense fine-tuning with ablation_epochs = mi_epochs - 1."""
    import importlib.util

    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("importance_run", repo / "exps" / "importance" / "run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    configs = sorted((repo / "exps" / "importance").glob("fmnist_*.json"))  # the EfficientNet demo (not dinov2_*)
    seen = set()
    for path in configs:
        cfg = load_config(str(path), [])
        seen.add((cfg.model_name, cfg.spr))
        assert cfg.seed == [1993, 1994, 1995] and cfg.dataset == "fmnist"
        if cfg.spr == "ce_finetune":
            assert cfg.ablation_epochs == cfg.mi_epochs - 1
    assert seen == {(learner, m) for learner in ("ranpac", "simplecil") for m in run.METHODS}
    base = repo / "exps" / "ranpac" / "cub.json"
    jobs = run.jobs([], [base], ["mist", "ce_finetune"])
    assert [extra for _, _, extra in jobs] == [["spr=mist"], ["spr=ce_finetune", "ablation_epochs=19"]]
    assert run.main(["--base", str(repo / "exps" / "nowhere.json")]) == 2
