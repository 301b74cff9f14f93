"""EASE, L2P and DualPrompt (models/ease.py, models/l2p.py, models/dualprompt.py; algorithms.md §18) on a tiny random
ViT, CPU: the timm parts they add, what trains, the selection and completion formulas against hand computations, and
each host with and without MIST end to end, checkpointed and resumed (issue 13)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from backbones.vit_parts import (ADAPTER_SLOT, PREFIX_SLOT, PrefixAttention, add_adapter_slots, add_prefix_slots,
                                 attached, forward_with_tokens)
from models import build_learner
from models.dualprompt import DualPromptNet
from tests.test_slca import check_runs_checkpoints_and_resumes_identically, run, tasks_of
from utils.errors import ConfigError

CPU = torch.device("cpu")
HOSTS = ("ease", "l2p", "dualprompt")
TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)


@pytest.fixture
def cub_root(image_folder) -> Path:
    return image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=2)


def host_cfg(make_config, root: Path, model: str, **overrides):
    base = {"ease": dict(init_epochs=2, later_epochs=2, init_lr=0.05, later_lr=0.05),
            "l2p": dict(prompt_epochs=2, pool_size=4, top_k=2, prompt_length=2, prompt_lr=0.01),
            "dualprompt": dict(prompt_epochs=2, pool_size=4, prompt_length=2, g_prompt_layers=[0],
                               e_prompt_layers=[1], g_prompt_length=3, prompt_lr=0.01)}[model]
    return make_config(root, **{"model_name": model, "batch_size": 4, **base, **overrides})


def vit() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY).eval()
    model.out_dim = model.num_features
    return model


# ---- the timm parts ---------------------------------------------------------------------------------------------
def test_the_parts_compute_timm_exactly_while_nothing_is_attached():
    plain, model = vit(), vit()
    add_adapter_slots(model)
    add_prefix_slots(model, [0, 1])
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(plain(x), model(x))
    assert list(plain.state_dict()) == list(model.state_dict())  # same names: the tuning phase sees the plain ViT


def test_the_adapter_reads_the_residual_after_attention_and_adds_to_the_block_output():
    model = vit()
    block = model.blocks[0]
    x = torch.randn(2, 17, 32)
    seen = {}
    handle = block.norm2.register_forward_pre_hook(lambda m, args: seen.setdefault("h", args[0].clone()))
    plain = block(x)  # timm's own block: what norm2 reads is h
    handle.remove()
    add_adapter_slots(model)

    class Constant(nn.Module):
        def forward(self, h):
            seen["adapter_input"] = h
            return torch.full_like(h, 0.25)

    with attached(ADAPTER_SLOT, {block: Constant()}):
        out = block(x)
    torch.testing.assert_close(seen["adapter_input"], seen["h"], rtol=0, atol=0)
    torch.testing.assert_close(out, plain + 0.25)


def test_a_prefix_acts_as_extra_tokens_seen_only_as_keys_and_values():
    """PrefixAttention with prefixes equal to the keys/values that timm's Attention computes for extra tokens z gives
    the rows of the real tokens of timm's attention over [z, x]."""
    model = vit()
    attn = model.blocks[0].attn
    x, z = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    joint = attn(torch.cat([z, x], dim=1))[:, 3:]
    heads, d = attn.num_heads, attn.head_dim
    _, k, v = attn.qkv(z).reshape(2, 3, 3, heads, d).unbind(2)  # (B, L, H, d) each
    add_prefix_slots(model, [0])
    assert isinstance(attn, PrefixAttention)
    with attached(PREFIX_SLOT, {attn: torch.stack([k, v])}):
        out = attn(x)
    torch.testing.assert_close(out, joint, rtol=1e-5, atol=1e-6)


def test_prompt_tokens_enter_after_cls_with_the_cls_position_embedding():
    model = vit()
    x = torch.randn(2, 3, 32, 32)
    none = forward_with_tokens(model, x, torch.zeros(2, 0, 32), torch.zeros(32))
    torch.testing.assert_close(none, model.forward_features(x), rtol=0, atol=0)
    # a prompt token equal to the [CLS] token behaves exactly as a second [CLS]: its output equals [CLS]'s
    tokens = model.cls_token.expand(2, 1, -1)
    out = forward_with_tokens(model, x, tokens, model.pos_embed[0, 0])
    assert out.shape == (2, 1 + 1 + 16, 32)
    torch.testing.assert_close(out[:, 1], out[:, 0], rtol=1e-5, atol=1e-6)


def test_hosts_refuse_a_backbone_that_is_not_a_vit(make_config, cub_root):
    for model in HOSTS:
        cfg = host_cfg(make_config, cub_root, model, convnet_type="resnet18", backbone_kwargs={})
        with pytest.raises(ConfigError, match="VisionTransformer"):
            build_learner(cfg, CPU, 1993)


# ---- L2P and DualPrompt selection -------------------------------------------------------------------------------
def test_selection_is_the_top_k_keys_by_cosine_and_the_batch_vote(make_config, cub_root):
    learner = build_learner(host_cfg(make_config, cub_root, "l2p", pool_size=5, top_k=2,
                                     prompt_vote_ties="smaller_id"), CPU, 1993)
    net = learner.backbone
    rng = np.random.default_rng(0)
    keys, q = rng.normal(size=(5, 32)), rng.normal(size=(6, 32))
    with torch.no_grad():
        net.keys.copy_(torch.tensor(keys))
    sim = net.similarity(torch.tensor(q, dtype=torch.float32))
    cos = np.array([[a @ b / np.linalg.norm(a) / np.linalg.norm(b) for b in keys] for a in q])
    np.testing.assert_allclose(sim.detach().numpy(), cos, rtol=1e-5, atol=1e-6)
    ids = net.select(sim, batchwise=False)
    assert [set(r) for r in ids.tolist()] == [set(np.argsort(-row)[:2].tolist()) for row in cos]
    counts = np.bincount(np.argsort(-cos, axis=1)[:, :2].ravel(), minlength=5)
    order = sorted(range(5), key=lambda m: (-counts[m], m))[:2]  # most frequent, ties to the smaller id
    assert net.select(sim, batchwise=True).tolist() == [order] * 6


def port_vote(ids: torch.Tensor, pool_size: int, top_k: int) -> list[int]:
    """The batch vote as l2p-pytorch / dualprompt-pytorch ``prompt.py`` writes it: ``torch.unique`` ids and counts,
    padded to the pool size with (smallest id, 0), then ``torch.topk`` of the counts."""
    prompt_id, id_counts = torch.unique(ids, return_counts=True, sorted=True)
    if prompt_id.shape[0] < pool_size:
        prompt_id = torch.cat([prompt_id, torch.full((pool_size - prompt_id.shape[0],), int(ids.min()))])
        id_counts = torch.cat([id_counts, torch.zeros(pool_size - id_counts.shape[0], dtype=id_counts.dtype)])
    return prompt_id[torch.topk(id_counts, k=top_k).indices].tolist()


def test_the_batch_vote_breaks_count_ties_as_the_ports_by_default(make_config, cub_root):
    from models.prompt_hosts import batch_vote

    gen = torch.Generator().manual_seed(0)
    differ = 0
    for trial in range(300):
        pool, k = 10, int(torch.randint(1, 6, (1,), generator=gen))
        ids = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(int(torch.randint(1, 9, (1,),
                                                                                                      generator=gen)))])
        counts = torch.bincount(ids.reshape(-1), minlength=pool)
        want = port_vote(ids, pool, k)
        assert batch_vote(counts, k).tolist() == want, trial
        smaller = batch_vote(counts, k, "smaller_id").tolist()
        assert smaller == sorted(range(pool), key=lambda m: (-int(counts[m]), m))[:k]
        differ += set(smaller) != set(want)
    assert differ > 30  # ties are common: the two rules pick different sets often (docs/deviations.md section 7)
    for ties in ("official", "smaller_id"):  # the key reaches the backbone's vote
        cfg = host_cfg(make_config, cub_root, "l2p", pool_size=5, top_k=2, prompt_vote_ties=ties)
        assert build_learner(cfg, CPU, 1993).backbone.vote_ties == ties


def test_new_linear_heads_draw_timms_truncated_normal(make_config, cub_root, monkeypatch, tmp_path):
    """SLCA's and the prompt hosts' heads (and GPS's): timm's trunc_normal_ (std 0.02) from the global generator, bias
    0 (official ``linears.py`` / the ports' timm head); torch's own trunc_normal_ draws other values."""
    from timm.layers import trunc_normal_

    from models.heads import timm_linear_head

    torch.manual_seed(5)
    head = timm_linear_head(32, 7)
    torch.manual_seed(5)
    want = nn.Linear(32, 7).weight.detach()  # the official heads are nn.Linear modules, re-initialised
    trunc_normal_(want, std=0.02)
    assert torch.equal(head.weight.detach(), want) and not bool(head.bias.any())
    torch.manual_seed(5)
    other = nn.Linear(32, 7).weight.detach()
    torch.nn.init.trunc_normal_(other, std=0.02)
    assert not torch.allclose(other, want)
    import models.prompt_hosts as prompt_hosts
    import models.slca as slca

    made = []
    for module in (slca, prompt_hosts):
        monkeypatch.setattr(module, "timm_linear_head", lambda *a, **k: made.append(a) or timm_linear_head(*a, **k))
    run(make_config(cub_root, model_name="slca", batch_size=4, epochs=1, ca_epochs=0), tmp_path / "slca")
    run(host_cfg(make_config, cub_root, "l2p", prompt_epochs=1), tmp_path / "l2p")
    assert len(made) >= 3  # one SLCA head per task, the L2P head once


def test_ease_trains_with_the_init_values_on_every_task_when_init_cls_equals_increment(make_config, cub_root, caplog):
    """Official ease.py ``_train``: init_epochs / init_lr on task 0 and whenever init_cls == increment; later_* (null:
    the init values) otherwise; set-but-ignored later_* values get a warning."""
    from models.ease import task_schedule

    cfg = host_cfg(make_config, cub_root, "ease", init_epochs=3, init_lr=0.1, later_epochs=5, later_lr=0.2)
    assert cfg.init_cls == cfg.increment
    assert [task_schedule(cfg, t) for t in (0, 1, 2)] == [(3, 0.1)] * 3
    with caplog.at_level("WARNING"):
        build_learner(cfg, CPU, 1993)
    assert "later_epochs = 5 and later_lr = 0.2 ignored" in caplog.text
    cfg = host_cfg(make_config, cub_root, "ease", init_cls=4, increment=2, init_epochs=3, init_lr=0.1,
                   later_epochs=5, later_lr=0.2)
    assert [task_schedule(cfg, t) for t in (0, 1)] == [(3, 0.1), (5, 0.2)]
    cfg = host_cfg(make_config, cub_root, "ease", init_cls=4, increment=2, init_epochs=3, init_lr=0.1,
                   later_epochs=None, later_lr=None)
    assert task_schedule(cfg, 1) == (3, 0.1)


def test_dualprompt_prefixes_reach_exactly_the_configured_layers(make_config, cub_root, monkeypatch):
    cfg = host_cfg(make_config, cub_root, "dualprompt", backbone_kwargs={**TINY, "depth": 4}, g_prompt_layers=[0],
                   e_prompt_layers=[2, 3], g_prompt_length=3, prompt_length=2)
    net = build_learner(cfg, CPU, 1993).backbone
    assert [type(b.attn) is PrefixAttention for b in net.vit.blocks] == [True, False, True, True]
    lengths = {}
    real = PrefixAttention.forward

    def spy(self, x, *args, **kwargs):
        prefix = self.__dict__.get(PREFIX_SLOT)
        lengths[list(net.vit.blocks).index(next(b for b in net.vit.blocks if b.attn is self))] = (
            None if prefix is None else tuple(prefix.shape))
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(PrefixAttention, "forward", spy)
    net.features(torch.randn(2, 3, 32, 32), torch.tensor([[1], [3]]))
    assert lengths == {0: (2, 2, 3, 2, 16), 2: (2, 2, 2, 2, 16), 3: (2, 2, 2, 2, 16)}


@pytest.mark.parametrize("fix", [False, True])
def test_dualprompt_e_prefix_reshape_reproduces_the_port_and_the_fix(make_config, cub_root, fix):
    cfg = host_cfg(make_config, cub_root, "dualprompt", dualprompt_prefix_fix=fix)
    net: DualPromptNet = build_learner(cfg, CPU, 1993).backbone
    e = net.e_prefixes(torch.zeros(4, 1, dtype=torch.int64))  # every image takes slot 0, as in training
    k_prefix, v_prefix = net.e_prompt[0, 0, 0], net.e_prompt[0, 1, 0]
    for b in range(4):
        if fix:
            expected = (k_prefix, v_prefix)
        else:  # port: the first half of the batch gets K = V = p_K, the second half K = V = p_V (algorithms.md §18.3)
            expected = (k_prefix, k_prefix) if b < 2 else (v_prefix, v_prefix)
        assert torch.equal(e[0, 0, b], expected[0]) and torch.equal(e[0, 1, b], expected[1])


def test_dualprompt_e_prefixes_equal_the_ports_reshape_and_its_share_under_torchrun(make_config, cub_root):
    net: DualPromptNet = build_learner(host_cfg(make_config, cub_root, "dualprompt"), CPU, 1993).backbone
    ids = torch.tensor([[3], [0], [2], [1], [0]])
    n_e, _, _, length, heads, d = net.e_prompt.shape
    gathered = net.e_prompt[:, :, ids]  # (n_e, 2, B, 1, L, H, d), the port's batched_prompt_raw
    port = gathered.reshape(n_e, 5, 2, length, heads, d)  # the port's reshape
    assert torch.equal(net.e_prefixes(ids), port.transpose(1, 2))
    same = torch.full((6, 1), 2)  # training: one slot for the whole global batch
    whole = net.e_prefixes(same)
    for offset, stop in ((0, 3), (3, 6), (0, 4), (4, 6)):
        assert torch.equal(net.e_prefixes(same[offset:stop], (offset, 6)), whole[:, :, offset:stop])


def test_dualprompt_trains_slot_t_starting_from_slot_t_minus_1(make_config, cub_root):
    cfg = host_cfg(make_config, cub_root, "dualprompt")
    learner = build_learner(cfg, CPU, 1993)
    task0, task1 = tasks_of(cfg)
    keys0 = learner.backbone.keys.detach().clone()
    learner.learn_task(task0)
    pool = learner.backbone.e_prompt
    slot0, untouched = pool[:, :, 0].detach().clone(), pool[:, :, 2:].detach().clone()
    learner.before_training(task1)
    assert torch.equal(pool[:, :, 1], slot0)
    sim = torch.zeros(3, 4)
    assert learner.train_ids(sim, task1).tolist() == [[1]] * 3  # the task's slot, whatever the query
    learner.learn_task(task1)
    assert torch.equal(pool[:, :, 2:], untouched)  # future slots never train
    assert torch.equal(learner.backbone.keys[2:], keys0[2:])


# ---- what trains --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", HOSTS)
def test_only_the_hosts_own_parameters_train_without_a_tuning_phase(make_config, cub_root, model):
    cfg = host_cfg(make_config, cub_root, model)
    learner = build_learner(cfg, CPU, 1993)
    vit_before = copy.deepcopy(learner.backbone.vit.state_dict())
    own_before = {n: p.detach().clone() for n, p in learner.backbone.named_parameters() if not n.startswith(
        ("vit.", "query."))}
    for task in tasks_of(cfg):
        learner.learn_task(task)
    for name, tensor in learner.backbone.vit.state_dict().items():
        assert torch.equal(tensor, vit_before[name]), name
    assert all(p.requires_grad for p in learner.backbone.vit.parameters())  # flags restored for a tuning phase
    assert all(p.grad is None for p in learner.backbone.vit.parameters())  # no backward into the frozen weights
    own_after = {n: p for n, p in learner.backbone.named_parameters() if not n.startswith(("vit.", "query."))}
    moved = [n for n in own_after if n not in own_before or not torch.equal(own_after[n], own_before[n])]
    assert moved, "the host trained nothing"
    if model != "ease":
        assert not torch.equal(learner.backbone.keys, own_before["keys"])
        assert learner.head is not None and learner.logits(torch.zeros(1, 32)).shape == (1, 6)


@pytest.mark.parametrize("model", ["l2p", "dualprompt"])
def test_the_query_model_stays_the_pretrained_vit_under_mist(make_config, cub_root, model):
    cfg = host_cfg(make_config, cub_root, model, spr="mist", mi_epochs=2, select_rate=0.5)
    learner = build_learner(cfg, CPU, 1993)
    start = copy.deepcopy(learner.backbone.vit.state_dict())
    learner.learn_task(tasks_of(cfg)[0])
    tuned = learner.backbone.vit.state_dict()
    assert any(not torch.equal(tuned[n], start[n]) for n in start)  # MIST tuned the backbone that carries prompts
    for name, tensor in learner.backbone.query.state_dict().items():
        assert torch.equal(tensor, start[name]), name
    shared = build_learner(host_cfg(make_config, cub_root, model, query_model="tuned"), CPU, 1993)
    assert shared.backbone.query is None


# ---- EASE ---------------------------------------------------------------------------------------------------------
def test_ease_grows_one_subspace_per_task(make_config, cub_root):
    cfg = host_cfg(make_config, cub_root, "ease")
    learner = build_learner(cfg, CPU, 1993)
    x = torch.randn(2, 3, 32, 32)
    for t, task in enumerate(tasks_of(cfg)):
        learner.learn_task(task)
        assert len(learner.backbone.adapters) == t + 1
        assert learner.backbone(x).shape == (2, 32 * (t + 1))
        assert learner.prototypes.shape == (task.seen, 32 * (t + 1))
        assert learner.logits(learner.backbone(x)).shape == (2, task.seen)
    # adapter set 0 was frozen after task 0 and is still what it was then: subspace 0 of an old image is unchanged
    assert not any(p.requires_grad for p in learner.backbone.adapters.parameters())


def _cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("recalc", [True, False])
def test_ease_completes_old_prototypes_by_the_similarity_weighted_mean(make_config, cub_root, recalc):
    learner = build_learner(host_cfg(make_config, cub_root, "ease", recalc_sim=recalc), CPU, 1993)
    d, bounds = 32, [0, 2, 4, 7]  # tasks of 2, 2 and 3 classes; subspaces 0..2
    rng = np.random.default_rng(1)
    real = rng.normal(size=(7, 3 * d))
    learner.prototypes, learner.bounds = torch.tensor(real, dtype=torch.float32), bounds
    learner.complete_prototypes()
    expected = real.copy()
    for t in range(2):
        for s in (range(t + 1, 3) if recalc else [2]):
            newer = range(bounds[s] if recalc else bounds[2], 7)
            for o in range(bounds[t], bounds[t + 1]):
                w = np.array([math.exp(_cos(real[o, t * d:(t + 1) * d], real[n, t * d:(t + 1) * d])) for n in newer])
                w /= w.sum()
                expected[o, s * d:(s + 1) * d] = sum(wi * real[n, s * d:(s + 1) * d] for wi, n in zip(w, newer))
    np.testing.assert_allclose(learner.prototypes.numpy(), expected, rtol=1e-5, atol=1e-6)
    # the real prototypes (each class in the subspaces up to its own task's) are never rewritten
    for c, own in ((0, 0), (2, 1), (5, 2)):
        np.testing.assert_array_equal(learner.prototypes.numpy()[c, : (own + 1) * d],
                                      real.astype(np.float32)[c, : (own + 1) * d])


def test_ease_logit_weighs_the_own_subspace_1_and_the_others_alpha_over_t(make_config, cub_root):
    learner = build_learner(host_cfg(make_config, cub_root, "ease", alpha=0.3), CPU, 1993)
    d, bounds = 32, [0, 2, 4, 7]
    rng = np.random.default_rng(2)
    protos, feats = rng.normal(size=(7, 3 * d)), rng.normal(size=(4, 3 * d))
    learner.prototypes, learner.bounds = torch.tensor(protos, dtype=torch.float32), bounds
    out = learner.logits(torch.tensor(feats, dtype=torch.float32)).numpy()
    for b in range(4):
        for c in range(7):
            own = next(t for t in range(3) if bounds[t] <= c < bounds[t + 1])
            want = sum((1.0 if j == own else 0.3 / 2) * _cos(feats[b, j * d:(j + 1) * d], protos[c, j * d:(j + 1) * d])
                       for j in range(3))
            assert out[b, c] == pytest.approx(want, rel=1e-5, abs=1e-6)


# ---- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spr", ["none", "mist"])
@pytest.mark.parametrize("model", HOSTS)
def test_hosts_with_and_without_mist_run_checkpoint_and_resume_identically(make_config, cub_root, tmp_path, model,
                                                                            spr):
    check_runs_checkpoints_and_resumes_identically(host_cfg(make_config, cub_root, model, spr=spr, mi_epochs=2),
                                                   tmp_path, spr)


def test_the_demo_summary_pairs_each_host_with_its_mist_twin_by_seed(make_config, cub_root, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", Path(__file__).parents[1] / "exps/demo_vit/summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)
    finals = {}
    for seed in (1, 2, 3):
        for spr in ("none", "mist"):
            cfg = host_cfg(make_config, cub_root, "ease", spr=spr, mi_epochs=2, seed=[seed])
            finals[(spr, seed)] = run(cfg, tmp_path / f"seed{seed}" / spr)["last_accuracy"]
    runs = summarize.collect(tmp_path)
    assert sorted(runs) == [("ease", "mist"), ("ease", "none")] and sorted(runs[("ease", "none")]) == [1, 2, 3]
    text = summarize.report(runs)
    row = next(line for line in text.splitlines() if line.startswith("| EASE | 3 |"))
    diffs = [finals[("mist", s)] - finals[("none", s)] for s in (1, 2, 3)]
    assert f"{sum(diffs) / 3:+.2f}" in row.split("|")[3]
    mist_row = next(line for line in text.splitlines() if line.startswith("| EASE | mist | 3 |"))
    assert mist_row.split("|")[8].strip() != "-"  # the share of entries MIST moved is reported
