"""Heads against closed forms: streaming ridge, ridge search, class means, cosine logits
(algorithms.md §3.2, §6, §7)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

import models.ranpac as ranpac
from models.base import TaskData
from models.ridge import one_hot
from models.heads import CosineLinear
from models.ranpac import RIDGE_GRID, RanPAC, RidgeAccumulator, select_ridge
from models.heads import class_means
from models.simplecil import SimpleCIL


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# RidgeAccumulator
# ---------------------------------------------------------------------------------------------
def test_streaming_ridge_equals_one_solve_on_concatenated_rows():
    g = gen(0)
    M, C = 16, 6
    H1, H2 = torch.relu(torch.randn(30, M, generator=g)), torch.relu(torch.randn(25, M, generator=g))
    Y1 = one_hot(torch.randint(0, 3, (30,), generator=g), C)  # task 0: classes 0-2
    Y2 = one_hot(torch.randint(3, 6, (25,), generator=g), C)  # task 1: classes 3-5

    streaming = RidgeAccumulator(M, C)
    streaming.update(H1, Y1)
    streaming.update(H2, Y2)
    once = RidgeAccumulator(M, C)
    once.update(torch.cat([H1, H2]), torch.cat([Y1, Y2]))

    torch.testing.assert_close(streaming.G, once.G, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(streaming.Q, once.Q, rtol=1e-5, atol=1e-4)
    for ridge in (1e-2, 1.0, 100.0):
        torch.testing.assert_close(streaming.solve(ridge), once.solve(ridge), rtol=1e-4, atol=1e-5)


def test_ridge_solve_matches_closed_form_in_float64():
    g = gen(1)
    M, C, ridge = 12, 4, 0.5
    H = torch.randn(40, M, generator=g)
    Y = one_hot(torch.randint(0, C, (40,), generator=g), C)
    acc = RidgeAccumulator(M, C)
    acc.update(H, Y)
    W = acc.solve(ridge)
    assert W.shape == (C, M) and W.dtype == torch.float32
    Hd, Yd = H.double(), Y.double()
    expected = (torch.linalg.inv(Hd.T @ Hd + ridge * torch.eye(M, dtype=torch.float64)) @ Hd.T @ Yd).T
    torch.testing.assert_close(W.double(), expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# select_ridge
# ---------------------------------------------------------------------------------------------
def holdout_losses(H: torch.Tensor, Y: torch.Tensor, grid, train_fraction: float = 0.8) -> np.ndarray:
    """Hold-out MSE of ridge fits on the first 80% of rows, computed independently via the SVD."""
    H, Y = H.double().numpy(), Y.double().numpy()
    k = int(train_fraction * len(H))
    U, s, Vt = np.linalg.svd(H[:k], full_matrices=False)
    losses = []
    for lam in grid:
        W = Vt.T @ np.diag(s / (s**2 + lam)) @ U.T @ Y[:k]  # (M, C) = (Ha^T Ha + lam I)^-1 Ha^T Ya
        losses.append(np.mean((Y[k:] - H[k:] @ W) ** 2))
    return np.asarray(losses)


NOISY_GRID = [1e-3, 1e-1, 1.0, 10.0, 30.0, 100.0, 1e3, 1e5]


def noisy_linear_problem(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H (50, 20) and Y = H W + 3 * noise (50, 3), float64: a problem whose best ridge is inside the grid."""
    g = gen(seed)
    H = torch.randn(50, 20, generator=g, dtype=torch.float64)
    W = torch.randn(20, 3, generator=g, dtype=torch.float64)
    return H, H @ W + 3.0 * torch.randn(50, 3, generator=g, dtype=torch.float64)


def test_select_ridge_returns_the_holdout_argmin():
    H, Y = noisy_linear_problem(2)
    grid = NOISY_GRID
    losses = holdout_losses(H, Y, grid)
    best, second = np.sort(losses)[:2]
    assert second > best * 1.01  # the constructed problem has a clear winner
    assert 0 < int(np.argmin(losses)) < len(grid) - 1  # ... that is not at the edge of the grid
    assert select_ridge(H, Y, grid) == grid[int(np.argmin(losses))]


def test_select_ridge_uses_only_the_first_rows_to_fit():
    H, Y = noisy_linear_problem(3)
    grid = NOISY_GRID
    for fraction in (0.8, 0.6):
        assert select_ridge(H, Y, grid, fraction) == grid[int(np.argmin(holdout_losses(H, Y, grid, fraction)))]


def test_select_ridge_pure_noise_targets_pick_a_large_ridge():
    g = gen(0)
    H = torch.randn(100, 90, generator=g)  # 80 fit rows for 90 weights: a small ridge interpolates noise
    Y = torch.randn(100, 10, generator=g)  # targets independent of H: predicting ~0 is best
    chosen = select_ridge(H, Y)
    assert chosen in RIDGE_GRID
    assert chosen >= 1e3


def test_select_ridge_noiseless_linear_targets_pick_a_tiny_ridge():
    g = gen(0)
    H = torch.randn(200, 10, generator=g)  # N >> M, well conditioned
    Y = H @ torch.randn(10, 4, generator=g)  # exactly linear: any shrinkage only hurts
    assert select_ridge(H, Y) <= 1e-4


# ---------------------------------------------------------------------------------------------
# SimpleCIL prototypes, cosine heads
# ---------------------------------------------------------------------------------------------
def test_class_means_equal_per_class_means():
    g = gen(4)
    features = torch.randn(20, 5, generator=g)
    labels = torch.tensor([3, 1, 3, 2] * 5)
    classes = torch.tensor([1, 2, 3])
    expected = np.stack([features.numpy()[labels.numpy() == c].mean(axis=0) for c in (1, 2, 3)])
    torch.testing.assert_close(class_means(features, labels, classes), torch.from_numpy(expected))
    # requested order is kept
    torch.testing.assert_close(class_means(features, labels, torch.tensor([3, 1]))[0], torch.from_numpy(expected[2]))


def test_cosine_linear_gives_cosine_similarities():
    torch.manual_seed(0)
    head = CosineLinear(6, 4)
    assert head.weight.shape == (4, 6)
    assert head.weight.abs().max() <= 1 / np.sqrt(6)  # U(-1/sqrt(D), 1/sqrt(D)) init
    assert head.sigma.item() == 1.0
    x = torch.randn(5, 6)
    expected = np.array([[np.dot(a, w) / (np.linalg.norm(a) * np.linalg.norm(w)) for w in head.weight.detach().numpy()]
                         for a in x.numpy()])
    logits = head(x)
    torch.testing.assert_close(logits.detach(), torch.from_numpy(expected).float(), rtol=1e-5, atol=1e-6)
    assert logits.abs().max() <= 1 + 1e-6
    # logits do not depend on feature scale, sigma scales them, an all-zero row gives zero logits
    torch.testing.assert_close(head(3.0 * x), logits, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        head.sigma.fill_(2.0)
        head.weight[1] = 0.0
    torch.testing.assert_close(head(x)[:, [0, 2, 3]], 2 * logits[:, [0, 2, 3]], rtol=1e-5, atol=1e-6)
    assert torch.all(head(x)[:, 1] == 0)


# ---------------------------------------------------------------------------------------------
# the learners' head updates on known features (identity backbone)
# ---------------------------------------------------------------------------------------------
class FeatureDataset(Dataset):
    """Items (i, feature vector, label), as a TaskDataset with an identity backbone sees them."""

    def __init__(self, features: torch.Tensor, labels: np.ndarray) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, self.features[i], np.int64(self.labels[i])


class IdentityBackbone(nn.Identity):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.out_dim = dim


def make_tasks(dim: int = 8, per_class: int = 10, n_classes: int = 4, per_task: int = 2):
    g = gen(5)
    centres = 3 * torch.randn(n_classes, dim, generator=g)
    tasks, test_feats, test_labels = [], [], []
    for t in range(n_classes // per_task):
        known, seen = t * per_task, (t + 1) * per_task
        labels = np.repeat(np.arange(known, seen), per_class)
        feats = centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g)
        test_feats.append(centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g))
        test_labels.append(labels)
        train = FeatureDataset(feats, labels)
        test = FeatureDataset(torch.cat(test_feats), np.concatenate(test_labels))
        tasks.append(TaskData(t, known, seen, n_classes, train=train, train_eval=train, test=test))
    return tasks


def test_simplecil_prototypes_are_class_means_and_old_rows_stay(make_config, tmp_path):
    cfg = make_config(tmp_path, model_name="simplecil")
    learner = SimpleCIL(cfg, IdentityBackbone(8), torch.device("cpu"), seed=1993)
    tasks = make_tasks()
    learner.learn_task(tasks[0])
    first = learner.prototypes.clone()
    assert first.shape == (2, 8)
    data = tasks[0].train
    torch.testing.assert_close(first, class_means(data.features, torch.as_tensor(data.labels), torch.tensor([0, 1])))

    learner.learn_task(tasks[1])
    assert learner.prototypes.shape == (4, 8)
    torch.testing.assert_close(learner.prototypes[:2], first)  # old prototypes never recomputed
    data = tasks[1].train
    torch.testing.assert_close(learner.prototypes[2:],
                               class_means(data.features, torch.as_tensor(data.labels), torch.tensor([2, 3])))

    x = tasks[1].test.features[:5]
    expected = F.normalize(x, dim=1) @ F.normalize(learner.prototypes, dim=1).T
    torch.testing.assert_close(learner.logits(x), expected)
    y_topk, y_true = learner.predict(tasks[1].test)
    assert y_topk.shape == (len(y_true), 4)
    assert (y_topk[:, 0] == y_true).mean() > 0.9  # well separated clusters


def test_ranpac_head_accumulates_all_tasks_and_searches_ridge_on_current_rows(make_config, tmp_path, monkeypatch):
    calls = []
    real_select = ranpac.select_ridge

    def spy(H, Y, *args, **kwargs):
        ridge = real_select(H, Y, *args, **kwargs)
        calls.append((H.clone(), Y.clone(), ridge))
        return ridge

    monkeypatch.setattr(ranpac, "select_ridge", spy)
    cfg = make_config(tmp_path, model_name="ranpac", M=16)
    learner = RanPAC(cfg, IdentityBackbone(8), torch.device("cpu"), seed=1993)
    tasks = make_tasks()
    for task in tasks:
        learner.learn_task(task)

    assert learner.W_rand.shape == (8, 16)
    assert len(calls) == 2
    G = sum(H.T @ H for H, _, _ in calls)
    Q = sum(H.T @ Y for H, Y, _ in calls)
    torch.testing.assert_close(learner.accumulator.G, G, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(learner.accumulator.Q, Q, rtol=1e-5, atol=1e-4)
    for (H, Y, _), task in zip(calls, tasks):
        assert H.shape == (len(task.train), 16)  # the ridge search sees the current task's rows only
        assert Y.shape == (len(task.train), 4)  # one-hot over every class of the data set
        assert set(Y.argmax(1).tolist()) == set(range(task.known, task.seen))
        # H = ReLU(F W_rand) of this task's features, rows in the (shuffled) loader order
        proj = torch.relu(task.train.features @ learner.W_rand)
        dist = torch.cdist(H, proj)
        match = dist.argmin(1)
        assert sorted(match.tolist()) == list(range(len(proj)))  # a permutation of the task's rows
        assert dist.min(1).values.max() < 1e-4

    ridge = calls[-1][2]
    torch.testing.assert_close(learner.W_o, learner.accumulator.solve(ridge)[:4])
    x = tasks[1].test.features[:5]
    torch.testing.assert_close(learner.logits(x), torch.relu(x @ learner.W_rand) @ learner.W_o.T)
    y_topk, y_true = learner.predict(tasks[1].test)
    assert (y_topk[:, 0] == y_true).mean() > 0.9


def test_ranpac_without_projection_uses_raw_features(make_config, tmp_path):
    """M <= 0 with RP on: ridge on the raw features (use_RP false is the official cosine-prototype head)."""
    cfg = make_config(tmp_path, model_name="ranpac", M=0)
    learner = RanPAC(cfg, IdentityBackbone(8), torch.device("cpu"), seed=1993)
    tasks = make_tasks()
    learner.learn_task(tasks[0])
    assert learner.W_rand is None
    assert learner.W_o.shape == (2, 8)
    data = tasks[0].train
    x = data.features
    torch.testing.assert_close(learner.logits(x), x @ learner.W_o.T)
    torch.testing.assert_close(learner.accumulator.G, x.T @ x, rtol=1e-5, atol=1e-4)


def test_ranpac_w_rand_is_standard_normal_and_independent_of_the_global_rng(make_config, tmp_path):
    cfg = make_config(tmp_path, model_name="ranpac", M=4000)
    first = RanPAC(cfg, IdentityBackbone(8), torch.device("cpu"), seed=1993)
    first.setup_random_projection(4)
    torch.rand(1000)  # whatever else consumed the global RNG (e.g. a tuning phase) does not matter
    second = RanPAC(cfg, IdentityBackbone(8), torch.device("cpu"), seed=1993)
    second.setup_random_projection(4)
    assert torch.equal(first.W_rand, second.W_rand)
    w = first.W_rand.double()
    assert abs(w.mean().item()) < 0.01 and abs(w.std().item() - 1.0) < 0.01  # 32,000 N(0,1) draws
    other = RanPAC(cfg, IdentityBackbone(8), torch.device("cpu"), seed=7)
    other.setup_random_projection(4)
    assert not torch.equal(first.W_rand, other.W_rand)
