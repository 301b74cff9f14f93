"""RanPAC: random projection + streaming ridge regression head (SPEC 6; McDonnell et al., NeurIPS 2023).

After the tuning phase of task 0 a random matrix W_rand ~ N(0, 1)^(D x M) is drawn once. Every task
adds its features to the Gram matrix G = sum H^T H and Q = sum H^T Y, with H = ReLU(F W_rand) and Y the
one-hot labels over all classes of the data set. The ridge lambda is chosen on an 80/20 split of the
*current* task's rows; then W_o = ((G + lambda I)^-1 Q)^T and logits = ReLU(f W_rand) W_o^T (sigma = 1).

Faithful quirk (SPEC 9.20): G and Q accumulate features of a backbone that keeps changing when the
tuning phase runs on every task; old-task features are never re-extracted.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from models import register_learner
from models.base import Learner, TaskData, one_hot
from utils.runtime import make_generator

logger = logging.getLogger(__name__)

RIDGE_GRID = tuple(10.0 ** np.arange(-8, 9))  # 1e-8 .. 1e8, 17 values (SPEC 6, step 6.3.4)
RIDGE_TRAIN_FRACTION = 0.8


class RidgeAccumulator:
    """Streaming statistics G = sum_t H_t^T H_t (M x M) and Q = sum_t H_t^T Y_t (M x C), float32.

    Args:
        dim: projected width M.
        n_classes: C, all classes of the data set.
        device: where G and Q live (official: CPU).
    """

    def __init__(self, dim: int, n_classes: int, device: torch.device | str = "cpu") -> None:
        self.G = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.Q = torch.zeros(dim, n_classes, dtype=torch.float32, device=device)

    def update(self, H: torch.Tensor, Y: torch.Tensor) -> None:
        """Add a task's rows. H: (N, M) float32, Y: (N, C) float32 one-hot, both on the accumulator's device."""
        self.Q += H.T @ Y
        self.G += H.T @ H

    def solve(self, ridge: float) -> torch.Tensor:
        """W_o = (solve(G + ridge I, Q))^T, shape (C, M) float32."""
        eye = torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device)
        return torch.linalg.solve(self.G + ridge * eye, self.Q).T


def select_ridge(H: torch.Tensor, Y: torch.Tensor, grid: Sequence[float] = RIDGE_GRID,
                 train_fraction: float = RIDGE_TRAIN_FRACTION) -> float:
    """Pick the ridge by hold-out MSE on the given rows (official ``optimise_ridge_parameter``).

    The first ``int(train_fraction * N)`` rows fit ``W = (solve(H_a^T H_a + l I, H_a^T Y_a))^T``; the
    loss is the mean squared error over every entry of the remaining rows x all C columns. The first
    grid value with the smallest loss wins.

    Args:
        H: (N, M) float32 features, in the (shuffled) loader order.
        Y: (N, C) float32 one-hot targets.
        grid: candidate ridge values.
        train_fraction: share of rows used to fit.

    Returns:
        The chosen ridge value (a Python float).
    """
    n_fit = int(train_fraction * H.shape[0])
    Ha, Ya, Hb, Yb = H[:n_fit], Y[:n_fit], H[n_fit:], Y[n_fit:]
    G, Q = Ha.T @ Ha, Ha.T @ Ya
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    losses = []
    for ridge in grid:
        W = torch.linalg.solve(G + ridge * eye, Q).T
        losses.append(torch.mean((Yb - Hb @ W.T) ** 2).item())
    return float(grid[int(np.argmin(np.asarray(losses)))])


@register_learner("ranpac", "ranpac_mist")
class RanPAC(Learner):
    """RanPAC with an optional tuning phase before each head update (official ``ranpac_mist.Learner``).

    ``DEFAULTS["freeze_quantile"]`` = 0.9995 is the official RanPAC-MIST frozen-mask quantile (SPEC 4.7).
    ``use_RP`` false or ``M <= 0`` gives ridge regression on the raw features (no projection, no ReLU),
    as upstream RanPAC's decorrelated-prototype mode.
    """

    DEFAULTS = {"freeze_quantile": 1 - 0.0005}

    def __init__(self, cfg, backbone, device, seed) -> None:
        super().__init__(cfg, backbone, device, seed)
        self.use_projection = bool(cfg.use_RP) and cfg.M > 0
        self.proj_dim = cfg.M if self.use_projection else self.feature_dim
        self.ridge_device = torch.device("cpu") if cfg.ridge_device == "cpu" else device
        self.W_rand: Optional[torch.Tensor] = None  # (D, M) float32, drawn after task 0's tuning phase
        self.W_o: Optional[torch.Tensor] = None  # (seen, M) float32 on device
        self.accumulator: Optional[RidgeAccumulator] = None

    def setup_random_projection(self, n_classes: int) -> None:
        """Draw W_rand ~ N(0,1)^(D x M) on the CPU and reset G, Q (official ``setup_RP``).

        The original draws from the global CPU generator; here it is the run's "projection" stream, so the
        same seed gives the same W_rand with or without a tuning phase (a fair MIST vs baseline comparison).
        """
        if self.use_projection:
            gen = make_generator(self.seed, stream="projection")
            self.W_rand = torch.randn(self.feature_dim, self.proj_dim, generator=gen).to(self.device)
        self.accumulator = RidgeAccumulator(self.proj_dim, n_classes, self.ridge_device)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """H = ReLU(f W_rand) (N, M) float32, on ``features``' device; identity without projection."""
        if self.W_rand is None:
            return features
        return torch.relu(features @ self.W_rand.to(features.device))

    def announce(self, task: TaskData) -> None:
        logger.info("Starting CIL Task %d", task.task_id + 1)
        logger.info("Learning on classes %d-%d", task.known, task.seen - 1)

    def update_head(self, task: TaskData) -> None:
        if task.task_id == 0:
            self.setup_random_projection(task.n_classes)
        # shuffled loader order, as the official "CPs" loader: it decides the 80/20 ridge split
        feats, labels = self.extract_features(task.train_eval, shuffle=True, desc="ridge features")
        H = self.project(feats.to(self.ridge_device))
        Y = one_hot(labels.to(self.ridge_device), task.n_classes)
        self.accumulator.update(H, Y)
        ridge = select_ridge(H, Y)
        logger.info("Optimal lambda: %s", ridge)
        self.W_o = self.accumulator.solve(ridge)[: task.seen].to(self.device)
        total, trainable = self.count_parameters()
        logger.info("%s total parameters.", f"{total:,}")
        logger.info("%s training parameters.", f"{trainable:,}")

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.project(features) @ self.W_o.T
