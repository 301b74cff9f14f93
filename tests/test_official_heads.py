"""RanPAC's official heads and the official parameter counts (algorithms.md §1.1 step 9, 3.2, 6, 7; issue 6).

- ``use_RP: false`` is the official cosine-prototype classifier (``replace_fc`` else-branch): fc rows = class
  means of the raw features of the task that brought the class, old rows kept, logits = cos(f, row_c);
  no G, Q, ridge search or ``Optimal lambda`` line.
- ``M <= 0`` with ``use_RP: true`` is ridge regression on the raw features.
- The logged parameter counts are those of the official network: convnet + simclr + fc (+ rpfc).

Derivation of the expected counts (D = width, p = patch, N = patches, L = blocks, MLP ratio 4):
  ViT(num_classes=0) = patch_embed D(3p^2 + 1) + cls_token D + pos_embed (N + 1) D
                       + L (12 D^2 + 13 D)  [2 LayerNorms 4D, qkv 3D^2 + 3D, proj D^2 + D, fc1 4D^2 + 4D, fc2 4D^2 + D]
                       + final LayerNorm 2D.
  ViT-B/16 (D 768, p 16, N 196, L 12): 85,798,656 (algorithms.md §3.1); the tiny ViT (D 32, p 8, N 16, L 2): 32,224.
  simclr = Linear(D, 128) = 128 D + 128: 98,432 for ViT-B/16, 4,224 for the tiny ViT (always: is_clr=True).
  fc = CosineLinear(D, seen) = seen D + 1; rpfc (use_RP) after replace_fc = seen P + 1, P = M (D if M <= 0).
  Log points: ``All params`` at the start of task t counts the heads of task t - 1 (none at task 0); RanPAC's
  ``total parameters.`` after task t's head update counts the heads of task t.
  ViT-B/16 examples: every task-0 start 85,897,088; RanPAC M = 10000, 10 classes after task 0: 86,004,770,
  100 classes: 86,973,890; SimpleCIL start of task t: 85,897,089 + 768 seen_(t-1).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import trainer
from models.ranpac import RanPAC
from models.simplecil import SimpleCIL
from tests.test_heads import IdentityBackbone, make_tasks
from tests.test_resilience import comparable, images, overrides  # noqa: F401  (images: fixture)
from utils.config import load_config

CPU = torch.device("cpu")


def vit_params(D: int, patch: int, n_patches: int, depth: int) -> int:
    """Parameters of a timm ViT with num_classes=0, MLP ratio 4 (formula in the module docstring)."""
    return D * (3 * patch * patch + 1) + D + (n_patches + 1) * D + depth * (12 * D * D + 13 * D) + 2 * D


def simclr_params(D: int) -> int:
    return 128 * D + 128


def test_vit_formula_gives_the_official_vit_b16_count(tiny_vit):
    assert vit_params(768, 16, 196, 12) == 85_798_656  # algorithms.md §3.1
    assert vit_params(32, 8, 16, 2) == sum(p.numel() for p in tiny_vit.parameters()) == 32_224
    assert vit_params(768, 16, 196, 12) + simclr_params(768) == 85_897_088


def hand_means(features: torch.Tensor, labels: np.ndarray, classes) -> torch.Tensor:
    f = features.double().numpy()
    return torch.from_numpy(np.stack([f[labels == c].mean(axis=0) for c in classes])).float()


# ---------------------------------------------------------------------------------------------
# use_RP false: cosine prototypes
# ---------------------------------------------------------------------------------------------
def test_ranpac_without_rp_is_the_cosine_prototype_classifier(make_config, tmp_path, caplog):
    cfg = make_config(tmp_path, model_name="ranpac", use_RP=False)
    learner = RanPAC(cfg, IdentityBackbone(8), CPU, seed=1993)
    tasks = make_tasks()
    with caplog.at_level(logging.INFO, logger="models.ranpac"):
        learner.learn_task(tasks[0])
    first = learner.prototypes.clone()
    data = tasks[0].train
    torch.testing.assert_close(first, hand_means(data.features, data.labels, [0, 1]))
    assert learner.W_rand is None and learner.W_o is None and learner.accumulator is None  # no G, Q
    assert "Optimal lambda" not in caplog.text
    assert "total parameters." in caplog.text and "training parameters." in caplog.text

    learner.learn_task(tasks[1])
    assert learner.prototypes.shape == (4, 8)
    assert torch.equal(learner.prototypes[:2], first)  # old rows kept as they were
    data = tasks[1].train
    torch.testing.assert_close(learner.prototypes[2:], hand_means(data.features, data.labels, [2, 3]))

    x = tasks[1].test.features
    rows = learner.prototypes
    cos = torch.tensor([[float(a @ r / (a.norm() * r.norm())) for r in rows] for a in x])  # sigma = 1
    torch.testing.assert_close(learner.logits(x), cos, rtol=1e-5, atol=1e-6)
    y_topk, y_true = learner.predict(tasks[1].test)
    np.testing.assert_array_equal(y_topk[:, 0], cos.argmax(1).numpy())
    assert (y_topk[:, 0] == y_true).mean() > 0.9
    assert not learner.prototypes.is_inference()  # built from inference-mode features, still an ordinary tensor
    learner.prototypes.add_(0.0)


def test_ranpac_without_rp_head_state_round_trips(make_config, tmp_path):
    cfg = make_config(tmp_path, model_name="ranpac", use_RP=False)
    learner = RanPAC(cfg, IdentityBackbone(8), CPU, seed=1993)
    learner.learn_task(make_tasks()[0])
    other = RanPAC(cfg, IdentityBackbone(8), CPU, seed=1993)
    other.load_head_state(learner.head_state())
    assert torch.equal(other.prototypes, learner.prototypes)
    assert other.count_parameters() == learner.count_parameters()


# ---------------------------------------------------------------------------------------------
# M <= 0 with RP on: ridge on raw features
# ---------------------------------------------------------------------------------------------
def test_ranpac_m0_with_rp_is_ridge_on_raw_features(make_config, tmp_path, caplog):
    cfg = make_config(tmp_path, model_name="ranpac", use_RP=True, M=0)
    learner = RanPAC(cfg, IdentityBackbone(8), CPU, seed=1993)
    tasks = make_tasks()
    with caplog.at_level(logging.INFO, logger="models.ranpac"):
        learner.learn_task(tasks[0])
    assert "Optimal lambda" in caplog.text
    assert learner.W_rand is None and learner.prototypes is None
    assert learner.W_o.shape == (2, 8)
    x = tasks[0].train.features
    torch.testing.assert_close(learner.logits(x), x @ learner.W_o.T)
    torch.testing.assert_close(learner.accumulator.G, x.T @ x, rtol=1e-5, atol=1e-4)
    # rpfc is seen x D here: fc 2*8+1, rpfc 2*8+1, simclr 8*128+128, no backbone parameters
    assert learner.count_parameters() == (simclr_params(8) + 2 * (2 * 8 + 1),) * 2


# ---------------------------------------------------------------------------------------------
# parameter counts in the logs, tiny ViT (D 32, M 64), 6 classes in 2 tasks of 3
# ---------------------------------------------------------------------------------------------
TINY_BASE = vit_params(32, 8, 16, 2) + simclr_params(32)  # 36,448: convnet + simclr


def fc(seen: int) -> int:
    return seen * 32 + 1


def expected_counts(model_name: str, use_rp: bool, M: int) -> tuple[list[int], list[int]]:
    """(All params at the start of tasks 0, 1; RanPAC's total parameters after tasks 0, 1)."""
    width = M if M > 0 else 32

    def heads(seen: int) -> int:
        if seen == 0:
            return 0
        return fc(seen) + (seen * width + 1 if model_name == "ranpac" and use_rp else 0)

    starts = [TINY_BASE + heads(0), TINY_BASE + heads(3)]
    after = [TINY_BASE + heads(3), TINY_BASE + heads(6)] if model_name == "ranpac" else []
    return starts, after


CASES = [("ranpac", "mist", True, 64), ("ranpac", "none", True, 64), ("ranpac", "none", False, 64),
         ("ranpac", "none", True, 0), ("simplecil", "mist", True, 64), ("simplecil", "none", True, 64)]


@pytest.mark.parametrize("model_name,spr,use_rp,M", CASES)
def test_logged_parameter_counts_are_the_official_networks(images, tmp_path, model_name, spr, use_rp, M):  # noqa: F811 (images: the pytest fixture imported above)
    from tests.test_sparse_tuning import tiny_overrides

    cfg = load_config(None, tiny_overrides(images, model_name, spr=spr, use_RP=use_rp, M=M, mi_epochs=1))
    (path,) = trainer.run(cfg, tmp_path)
    text = (path.parent / f"{model_name}_{spr}_cub_seed1993.log").read_text()
    starts, after = expected_counts(model_name, use_rp, M)
    assert [int(v) for v in re.findall(r"All params: (\d+)", text)] == starts
    assert [int(v) for v in re.findall(r"Trainable params: (\d+)", text)] == starts  # all trainable, as the official
    totals = [int(v.replace(",", "")) for v in re.findall(r"([\d,]+) total parameters\.", text)]
    trainable = [int(v.replace(",", "")) for v in re.findall(r"([\d,]+) training parameters\.", text)]
    assert totals == trainable == after
    assert ("Optimal lambda" in text) == (model_name == "ranpac" and use_rp)
    if model_name == "ranpac" and use_rp and M == 64:
        assert after == [36_738, 37_026]
    if model_name == "simplecil":
        assert starts == [36_448, 36_545]


def test_counts_do_not_depend_on_the_tuner_object(make_config, tmp_path, tiny_vit):
    tiny_vit.out_dim = 32
    for spr in ("none", "mist"):
        cfg = make_config(tmp_path, model_name="simplecil", spr=spr)
        learner = SimpleCIL(cfg, tiny_vit, CPU, seed=1993)
        assert (learner.tuner is None) == (spr == "none")
        assert learner.count_parameters() == (TINY_BASE, TINY_BASE)


# ---------------------------------------------------------------------------------------------
# checkpoints: use_RP false resumes to the uninterrupted result
# ---------------------------------------------------------------------------------------------
def test_ranpac_without_rp_resumes_to_the_uninterrupted_run(images, tmp_path):  # noqa: F811 (images: the pytest fixture imported above)
    import json

    full_cfg = load_config(None, overrides(images, "ranpac", "spr=mist", "use_RP=false"))
    (full_path,) = trainer.run(full_cfg, tmp_path / "full")
    full = json.loads(full_path.read_text())
    assert full["status"] == "complete" and len(full["tasks"]) == 3

    stop_cfg = load_config(None, overrides(images, "ranpac", "spr=mist", "use_RP=false", "stop_after_task=0"))
    with pytest.raises(trainer.RunStopped):
        trainer.run(stop_cfg, tmp_path / "stopped")
    (seed_dir,) = (tmp_path / "stopped").glob("*/*/seed1993")
    (resumed_path,) = trainer.resume(seed_dir.parent)
    resumed = json.loads(resumed_path.read_text())
    assert resumed["status"] == "complete"
    assert comparable(resumed) == comparable(full)


# ---------------------------------------------------------------------------------------------
# ridge_lambdas: the ridge lambda fixed per task (issue 15's "no lambda flips" comparisons)
# ---------------------------------------------------------------------------------------------
def test_ranpac_records_its_ridge_lambda_and_ridge_lambdas_fixes_it(make_config, tmp_path):
    from utils.errors import ConfigError

    tasks = make_tasks()  # 4 classes, 2 tasks of 2
    searched = RanPAC(make_config(tmp_path, model_name="ranpac", M=16, init_cls=2, increment=2), IdentityBackbone(8),
                      CPU, seed=1993)
    reports = [searched.learn_task(t) for t in tasks]
    found = [r["head"]["ridge_lambda"] for r in reports]
    assert all(r["head"]["ridge_fixed"] is False for r in reports) and all(v > 0 for v in found)
    # the searched lambdas, fixed: the same heads; another lambda: the solve with that lambda
    same = RanPAC(make_config(tmp_path, model_name="ranpac", M=16, init_cls=2, increment=2, ridge_lambdas=found),
                  IdentityBackbone(8), CPU, seed=1993)
    for t in tasks:
        head = same.learn_task(t)["head"]
        assert {k: head[k] for k in ("ridge_lambda", "ridge_fixed")} == {"ridge_lambda": found[t.task_id],
                                                                          "ridge_fixed": True}
        # ridge_rho: float32 eps * (trace(G) + lambda) / lambda, G the Gram matrix after this task
        trace = float(same.accumulator.G.double().diagonal().sum())
        assert head["ridge_rho"] == pytest.approx(2.0 ** -23 * (trace + found[t.task_id]) / found[t.task_id],
                                                  rel=1e-6)
    torch.testing.assert_close(same.W_o, searched.W_o)
    other = [found[0], found[1] * 1000.0]
    fixed = RanPAC(make_config(tmp_path, model_name="ranpac", M=16, init_cls=2, increment=2, ridge_lambdas=other),
                   IdentityBackbone(8), CPU, seed=1993)
    for t in tasks:
        fixed.learn_task(t)
    H = torch.cat([fixed.project(t.train.features) for t in tasks])
    Y = F.one_hot(torch.as_tensor(np.concatenate([t.train.labels for t in tasks])), 4).float()
    # the reference in float64; the head solves in float32, whose error on this ill-conditioned system depends on the
    # CPU's kernels (AVX2: within 1e-5; scalar kernels, ATEN_CPU_CAPABILITY=default: 2e-5 on one entry of 64), so the
    # bound is relative to the solution's size; another lambda (x1000) moves the solution far beyond it
    want = torch.linalg.solve(H.double().T @ H.double() + other[1] * torch.eye(16, dtype=torch.float64),
                              H.double().T @ Y.double()).T
    torch.testing.assert_close(fixed.W_o.double(), want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    for bad in ([1.0], [1.0, 0.0], [1.0, 2.0, 3.0]):
        learner = RanPAC(make_config(tmp_path, model_name="ranpac", M=16, init_cls=2, increment=2, ridge_lambdas=bad),
                         IdentityBackbone(8), CPU, seed=1993)
        with pytest.raises(ConfigError, match="key 'ridge_lambdas'.*expected 2 positive numbers"):
            learner.learn_task(tasks[0])
