"""SLCA (models/slca.py; algorithms.md §17) on a tiny random ViT, CPU: learning rates, statistics, sampling, alignment,
and SLCA +- MIST end to end with checkpoint and resume (issue 12)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import trainer
from models import build_learner
from models.base import TaskData
from models.slca import COV_RIDGE, SAMPLES_PER_CLASS, SLCA
from utils.errors import RunStopped
from utils.loaders import Batch

CPU = torch.device("cpu")


@pytest.fixture
def cub_root(image_folder) -> Path:
    return image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=2)


def slca_cfg(make_config, root: Path, **overrides):
    base = dict(model_name="slca", epochs=2, milestones=[1], ca_epochs=2, use_config_batch_size=True, batch_size=4)
    return make_config(root, **{**base, **overrides})


def tasks_of(cfg, seed: int = 1993) -> list[TaskData]:
    from trainer import _data_manager

    data = _data_manager(cfg, seed)
    out = []
    for t in range(data.nb_tasks):
        known, seen = data.task_classes(t)
        out.append(TaskData(t, known, seen, data.n_classes,
                            train=data.get_dataset(range(known, seen), "train", "train"),
                            train_eval=data.get_dataset(range(known, seen), "train", "test"),
                            test=data.get_dataset(range(0, seen), "test", "test")))
    return out


def test_the_fresh_final_norm_replaces_the_pretrained_one(make_config, cub_root):
    cfg = slca_cfg(make_config, cub_root)
    model = SLCA.build_backbone(cfg)
    assert isinstance(model.norm, nn.LayerNorm) and model.norm.eps == 1e-5
    assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
    kept = SLCA.build_backbone(slca_cfg(make_config, cub_root, slca_keep_pretrained_norm=True))
    assert kept.norm.eps == 1e-6  # timm ViT's own


def test_slow_and_fast_learning_rates_reach_the_right_groups(make_config, cub_root, monkeypatch):
    cfg = slca_cfg(make_config, cub_root, epochs=1, milestones=[])
    learner = build_learner(cfg, CPU, 1993)
    seen = []
    real = torch.optim.SGD

    def spy(groups, **kwargs):
        opt = real(groups, **kwargs)
        seen.append(opt)
        return opt

    monkeypatch.setattr(torch.optim, "SGD", spy)
    task0, task1 = tasks_of(cfg)
    learner.learn_task(task0)
    learner.learn_task(task1)
    assert len(seen) == 3  # task 0: stage 1; task 1: stage 1, then the alignment
    stage1 = seen[1]
    backbone, head = stage1.param_groups
    assert backbone["lr"] == pytest.approx(1e-4) and head["lr"] == pytest.approx(1e-2)
    assert {id(p) for p in backbone["params"]} == {id(p) for p in learner.backbone.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in learner.heads[1].parameters()}  # old head not there
    for group in stage1.param_groups:
        assert group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    (align,) = seen[2].param_groups
    assert align["lr"] == pytest.approx(0.01 * (1 + math.cos(math.pi * 2 / 2)) / 2)  # cosine annealed to 0
    assert len(align["params"]) == 4  # both heads, weights and biases
    assert not any(p.requires_grad for p in learner.heads[0].parameters())  # frozen once a new task starts


def test_class_statistics_equal_mean_and_covariance_of_the_features(make_config, cub_root):
    cfg = slca_cfg(make_config, cub_root)
    learner = build_learner(cfg, CPU, 1993)
    task0 = tasks_of(cfg)[0]
    learner.add_class_statistics(task0)
    feats, labels = learner.extract_features(task0.train_eval)
    for c in range(3):
        rows = feats[labels == c]
        torch.testing.assert_close(learner.means[c], torch.mean(rows.double(), dim=0))
        want = torch.cov(rows.double().T) + COV_RIDGE * torch.eye(rows.shape[1], dtype=torch.float64)
        torch.testing.assert_close(learner.covs[c], want.float())


def test_samples_have_the_scaled_mean_and_the_covariance(make_config, cub_root, monkeypatch):
    cfg = slca_cfg(make_config, cub_root)
    learner = build_learner(cfg, CPU, 1993)
    d = learner.feature_dim
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=gen) / math.sqrt(d)
    cov = a @ a.T + 0.1 * torch.eye(d)
    learner.means = torch.stack([torch.full((d,), 2.0), torch.full((d,), -1.0)]).double()
    learner.covs = torch.stack([cov, cov])
    learner.heads = nn.ModuleList([nn.Linear(d, 1), nn.Linear(d, 1)])
    monkeypatch.setattr("models.slca.SAMPLES_PER_CLASS", 20000)
    task1 = TaskData(1, 1, 2, 2, None, None, None)
    x, y = learner.sample_features(task1, [torch.linalg.cholesky(c) for c in learner.covs])
    assert x.shape == (40000, d) and torch.equal(y[:20000], torch.zeros(20000, dtype=torch.int64))
    # class 0 is task 0 of 2: mean shrunk by 0.9 + 0.1 * 1 / 2; class 1 (current task): unscaled
    torch.testing.assert_close(x[:20000].mean(0), torch.full((d,), 2.0 * 0.95), atol=0.05, rtol=0)
    torch.testing.assert_close(x[20000:].mean(0), torch.full((d,), -1.0), atol=0.05, rtol=0)
    torch.testing.assert_close(torch.cov(x[20000:].T), cov, atol=0.1, rtol=0)  # ~5 sd of the estimate


def test_task_index_of_a_class_official_quirk_and_fix(make_config, cub_root):
    """Official t_c = c // current task size: with tasks of 2 and 3 classes (current size 3) class 2 counts as task 0;
    the fix uses the real boundaries (task 1)."""
    scales = {}
    for fix in (False, True):
        learner = build_learner(slca_cfg(make_config, cub_root, slca_ca_task_boundaries=fix), CPU, 1993)
        d = learner.feature_dim
        learner.heads = nn.ModuleList([nn.Linear(d, 2), nn.Linear(d, 3)])
        learner.means = torch.ones(5, d, dtype=torch.float64)
        learner.covs = torch.stack([1e-12 * torch.eye(d)] * 5)
        x, _ = learner.sample_features(TaskData(1, 2, 5, 5, None, None, None), [c.sqrt() for c in learner.covs])
        scales[fix] = [round(float(x[c * SAMPLES_PER_CLASS: (c + 1) * SAMPLES_PER_CLASS].mean()), 4) for c in range(5)]
    assert scales[False] == [0.95, 0.95, 0.95, 1.0, 1.0]
    assert scales[True] == [0.95, 0.95, 1.0, 1.0, 1.0]


def test_logit_normalised_alignment_loss_by_hand(make_config, cub_root):
    learner = build_learner(slca_cfg(make_config, cub_root, ca_with_logit_norm=0.1), CPU, 1993)
    d = learner.feature_dim
    learner.heads = nn.ModuleList([nn.Linear(d, 2), nn.Linear(d, 1)])
    z = torch.tensor([[3.0, 4.0, -2.0], [0.0, 1.0, 1.0]])
    y = torch.tensor([0, 2])
    # sample 1: n_0 = 5, n_1 = 2 -> n_bar 3.5; sample 2: n_0 = 1, n_1 = 1 -> 1
    scaled = [[v / (3.5 * 0.1) for v in z[0].tolist()], [v / (1.0 * 0.1) for v in z[1].tolist()]]
    want = sum(-s[t] + math.log(sum(math.exp(v) for v in s)) for s, t in zip(scaled, y.tolist())) / 2
    got = learner.alignment_loss(z, y, Batch(torch.arange(2), z, y, None))
    assert float(got) == pytest.approx(want, rel=1e-5)
    plain = build_learner(slca_cfg(make_config, cub_root, ca_with_logit_norm=0.0), CPU, 1993)
    plain.heads = learner.heads
    assert float(plain.alignment_loss(z, y, Batch(torch.arange(2), z, y, None))) == pytest.approx(
        float(nn.functional.cross_entropy(z, y)), rel=1e-6)


def test_alignment_changes_only_the_head_copy(make_config, cub_root):
    cfg = slca_cfg(make_config, cub_root)
    learner = build_learner(cfg, CPU, 1993)
    task0, task1 = tasks_of(cfg)
    learner.learn_task(task0)
    learner.train_task(task1, learner.loop)
    learner.add_class_statistics(task1)
    backbone = {n: p.detach().clone() for n, p in learner.backbone.named_parameters()}
    raw = [p.detach().clone() for p in learner.heads.parameters()]
    aligned = learner.align(task1)
    assert all(torch.equal(p, backbone[n]) for n, p in learner.backbone.named_parameters())
    assert all(torch.equal(p, q) for p, q in zip(learner.heads.parameters(), raw))  # the raw heads are kept
    assert any(not torch.equal(p, q) for p, q in zip(aligned.parameters(), raw))
    learner.aligned = aligned
    f = torch.randn(2, learner.feature_dim)
    torch.testing.assert_close(learner.logits(f), torch.cat([h(f) for h in aligned], dim=1))


def run(cfg, out: Path) -> dict:
    (path,) = trainer.run(cfg, out)
    return json.loads(path.read_text())


def check_runs_checkpoints_and_resumes_identically(cfg, tmp_path: Path, spr: str) -> None:
    """A 2-task run of a learner that trains (12 images, batch 4, 2 epochs) completes with finite losses, and a run
    stopped after task 0 and resumed gives the uninterrupted run's curves, matrix, class order and losses."""
    whole = run(cfg, tmp_path / "whole")
    assert whole["complete"] and len(whole["tasks"]) == 2
    assert [t["training"]["steps"] for t in whole["tasks"]] == [2 * 3, 2 * 3]  # 12 images, batch 4, 2 epochs
    assert ("tuning" in whole["tasks"][0]) == (spr == "mist")
    assert all(math.isfinite(v) for t in whole["tasks"] for v in t["training"]["epoch_losses"])
    with pytest.raises(RunStopped):
        trainer.run(cfg.replace(stop_after_task=0), tmp_path / "parts")
    (run_dir,) = (tmp_path / "parts").glob("*/*")
    (path,) = trainer.resume(run_dir)
    resumed = json.loads(path.read_text())
    for key in ("top1_curve", "top5_curve", "accuracy_matrix", "class_order"):
        assert resumed[key] == whole[key], key
    for a, b in zip(resumed["tasks"], whole["tasks"]):
        assert a["training"]["epoch_losses"] == b["training"]["epoch_losses"]
        assert a.get("tuning", {}).get("epoch_losses") == b.get("tuning", {}).get("epoch_losses")


@pytest.mark.parametrize("spr", ["none", "mist"])
def test_slca_with_and_without_mist_runs_checkpoints_and_resumes_identically(make_config, cub_root, tmp_path, spr):
    check_runs_checkpoints_and_resumes_identically(slca_cfg(make_config, cub_root, spr=spr, mi_epochs=2), tmp_path,
                                                   spr)


class BatchNormNet(nn.Module):
    """conv -> BatchNorm -> pooled 8-d feature: a CNN backbone whose running statistics the slow learner may move."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("freeze", [False, True])
def test_the_slow_learner_keeps_batchnorm_statistics_with_freeze_bn_stats(make_config, cub_root, freeze):
    cfg = slca_cfg(make_config, cub_root, epochs=1, milestones=[], freeze_bn_stats=freeze)
    torch.manual_seed(0)
    learner = build_learner(cfg, CPU, 1993, backbone=BatchNormNet())
    bn = learner.backbone.body[1]
    mean0, conv0 = bn.running_mean.clone(), learner.backbone.body[0].weight.detach().clone()
    learner.train_task(tasks_of(cfg)[0], learner.loop)
    assert not torch.equal(learner.backbone.body[0].weight, conv0)
    if freeze:  # the weights train, the running statistics stay
        assert torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) == 0
    else:  # official: backbone.train() updates them on every batch
        assert not torch.equal(bn.running_mean, mean0) and int(bn.num_batches_tracked) > 0
