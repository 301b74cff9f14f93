"""MIST's objective: supervised NT-Xent on two views, and the batched on-device second-view augmentation.

Sources: algorithms.md §4.2 (``simclr_aug``: flip, grayscale, random resized crop) and algorithms.md §4.3
(``Supervised_NT_xent_n``), read from the official ``utils/contrastive_learning.py`` and ``utils/tao.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from models.loop import cross_entropy
from utils import distributed
from utils.loaders import Batch
from utils.registry import LOSSES
from utils.runtime import autocast

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

TEMPERATURE = 0.07  # official tau
NORM_EPS = 1e-8  # z = p / (||p|| + 1e-8)
LOG_EPS = 1e-8  # l_ab = -log(E_ab / (D_a + eps) + eps)
GRAY_P = 0.25
CROP_SCALE = (0.3, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
LUMA = (0.299, 0.587, 0.114)


def supervised_nt_xent(proj: torch.Tensor, labels: torch.Tensor, temperature: float = TEMPERATURE,
                       exclude_self_positive: bool = False) -> torch.Tensor:
    """Supervised NT-Xent of the official code (algorithms.md §4.3), on 2B projections of B originals and B views.

    With z_a = p_a / (||p_a|| + 1e-8), S = Z Z^T, S' = S - max_c S_ac (detached), E_ab = exp(S'_ab / tau)
    for b != a and E_aa = 0, D_a = sum_b E_ab, l_ab = -log(E_ab / (D_a + eps) + eps), y the labels
    repeated twice, P(a) = {b : y_b = y_a} (a itself included, as the original), w_ab = 1[b in P(a)] / (|P(a)| + eps):

        L = 1/(2B) sum_i (l_{i,i+B} + l_{i+B,i}) + 1/B sum_a sum_b w_ab l_ab

    The self term l_aa = -log(eps) ~ 18.42 has zero gradient and shifts the loss by a constant.

    Args:
        proj: (2B, d) float projections; rows 0..B-1 originals, B..2B-1 their views in the same order.
        labels: (B,) int64 labels of the originals (only equality matters).
        temperature: tau (official 0.07).
        exclude_self_positive: drop a from P(a) (fix for algorithms.md §9.5; default reproduces the original).

    Returns:
        Scalar loss tensor.

    Raises:
        ValueError: odd number of rows, or labels not of length B.
    """
    n = proj.shape[0]
    if n % 2 or labels.shape[0] * 2 != n:
        raise ValueError(f"expected 2B projections and B labels, got {n} and {labels.shape[0]}")
    b = n // 2
    z = proj / (proj.norm(dim=1, keepdim=True) + NORM_EPS)
    sim = z @ z.T
    sim = sim - sim.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(n, device=proj.device, dtype=sim.dtype)
    exp = torch.exp(sim / temperature) * not_self
    nll = -torch.log(exp / (exp.sum(dim=1, keepdim=True) + LOG_EPS) + LOG_EPS)
    idx = torch.arange(b, device=proj.device)
    instance = (nll[idx, idx + b].sum() + nll[idx + b, idx].sum()) / (2 * b)
    y = labels.repeat(2)
    positives = (y[:, None] == y[None, :]).to(sim.dtype)
    if exclude_self_positive:
        positives = positives * not_self
    weights = positives / (positives.sum(dim=1, keepdim=True) + LOG_EPS)
    return instance + (weights * nll).sum() / b


class SecondViewAugment(nn.Module):
    """The official batched augmentation ``simclr_aug`` (algorithms.md §4.2), every sample drawn independently.

    1. horizontal flip with p = 0.5 (an exact index mirror; the original resamples with an affine grid,
       which equals the mirror up to float rounding);
    2. grayscale L = 0.299 R + 0.587 G + 0.114 B, copied to 3 channels, with p = 0.25, on the values as
       they are (normalised inputs stay normalised);
    3. random resized crop, scale (0.3, 1), ratio (3/4, 4/3): 10N trials of area U(0.3, 1) * S^2 and
       log-uniform aspect, w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)), the first N
       trials with 0 < w, h <= S kept (full-size crops pad a shortfall); offsets are integers in
       [w - S, S - w] divided by S; the crop is an affine grid [[w/S, 0, dx], [0, h/S, dy]] resampled
       with bilinear interpolation, reflection padding, align_corners False.

    All draws come from ``generator`` (the original used numpy's global RNG for the crop and the CUDA RNG
    for the rest; bitwise parity is not attainable either way, algorithms.md §9.19).

    Args:
        generator: a torch generator on the images' device.
    """

    def __init__(self, generator: torch.Generator) -> None:
        super().__init__()
        self.generator = generator
        self._luma_cache: dict = {}

    def _luma(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The (1, 3, 1, 1) luma weights on ``device``, built once (no host-to-device copy per step)."""
        key = (device, dtype)
        if key not in self._luma_cache:
            self._luma_cache[key] = torch.tensor(LUMA, dtype=dtype).view(1, 3, 1, 1).to(device)
        return self._luma_cache[key]

    def _rand(self, *shape: int, device: torch.device) -> torch.Tensor:
        return torch.rand(*shape, generator=self.generator, device=device)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Augmented views of x: (n, 3, H, W) float -> the same shape and dtype.

        Args:
            rows: ``(offset, total)`` when x holds rows offset..offset+n-1 of a batch of ``total`` images (one
                rank's share under torchrun): the draws are made for the whole batch, as one process would,
                and this share's rows are used, so every rank keeps the generator in step. Default (0, n).
        """
        n, dev = x.shape[0], x.device
        offset, total = rows if rows is not None else (0, n)
        mine = slice(offset, offset + n)
        flip = (self._rand(total, device=dev) < 0.5)[mine]
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        luma = self._luma(dev, x.dtype)
        gray = (x * luma).sum(dim=1, keepdim=True).expand_as(x)
        x = torch.where((self._rand(total, device=dev) < GRAY_P)[mine][:, None, None, None], gray, x)
        return self.crop(x, (offset, total))

    def crop(self, x: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The random resized crop step on (n, 3, H, W); output has the input's shape (``rows`` as in forward)."""
        n, _, height, width = x.shape
        dev = x.device
        offset, total = rows if rows is not None else (0, n)
        mine = slice(offset, offset + n)
        trials = 10 * total
        area = (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * self._rand(trials, device=dev)) * height * width
        log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * self._rand(trials, device=dev))
        w = torch.round(torch.sqrt(area * aspect))
        h = torch.round(torch.sqrt(area / aspect))
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        # first n valid trials in order, padded with full-size crops
        order = torch.argsort((~ok).to(torch.int8), stable=True)[:total]
        take = ok[order]
        w = torch.where(take, w[order], torch.full_like(w[order], width))
        h = torch.where(take, h[order], torch.full_like(h[order], height))
        # integer offsets uniform in [w - S, S - w], divided by S
        dx = torch.floor(self._rand(total, device=dev) * (2 * (width - w) + 1)) + (w - width)
        dy = torch.floor(self._rand(total, device=dev) * (2 * (height - h) + 1)) + (h - height)
        w, h, dx, dy = w[mine], h[mine], dx[mine], dy[mine]
        theta = torch.zeros(n, 2, 3, device=dev, dtype=x.dtype)
        theta[:, 0, 0] = w / width
        theta[:, 0, 2] = dx / width
        theta[:, 1, 1] = h / height
        theta[:, 1, 2] = dy / height
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def two_views(x: torch.Tensor, augment: SecondViewAugment, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Pair formation of algorithms.md §4.2: concat(x, aug(x)) along the batch axis, originals first. (2B, 3, H, W).

    ``rows``: see :meth:`SecondViewAugment.forward` (one rank's share of a batch under torchrun).
    """
    return torch.cat([x, augment(x, rows)], dim=0)


# ---- the tuning phase's losses, registered (``scoring_loss``): (tuner, CE head or None, task) -> batch -> loss ----
def contrastive_loss(tuner: SparseTuner, batch: Batch) -> torch.Tensor:
    """MIST's loss: supervised NT-Xent of the projections of (x, aug(x)) (algorithms.md §4.2-4.3).

    Under torchrun (``batch.rows`` set) x and y are this process's share of a global batch: the views are drawn for
    the whole batch and the projections of every process are gathered (differentiably), so each process computes
    the one-process loss.
    """
    proj, y = two_view_embeddings(tuner, batch, tuner.network)
    return supervised_nt_xent(proj, y, exclude_self_positive=tuner.cfg.exclude_self_positive)


def two_view_embeddings(tuner: SparseTuner, batch: Batch, embed: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``embed`` of (x, aug(x)) as (2B, d) float32, originals first, and the B labels (algorithms.md §4.2).

    Under torchrun (``batch.rows`` set) the views are drawn for the whole batch and the embeddings and labels of
    every process are gathered (differentiably), so each process computes the one-process loss from them.
    """
    x, y = batch.x.to(tuner.device, non_blocking=True), batch.y.to(tuner.device, non_blocking=True)
    views = two_views(x, tuner.augment, batch.rows)
    with autocast(tuner.device, tuner.cfg.precision):
        out = embed(views).float()
    if batch.rows is not None:
        counts, n = distributed.shares(batch.rows[1]), x.shape[0]
        out = torch.cat([distributed.gather_rows(out[:n], counts), distributed.gather_rows(out[n:], counts)])
        y = distributed.gather_rows(y, counts)
    return out, y


def head_logits(tuner: SparseTuner, head: Callable[[torch.Tensor], torch.Tensor], batch: Batch,
                columns: slice = slice(None)) -> torch.Tensor:
    """``head(backbone(x))[:, columns]``: (B, C) float32 logits of the batch's images; ``head`` maps the (B, D)
    float32 backbone features (computed under the config's ``precision``) to logits (a module or a function)."""
    with autocast(tuner.device, tuner.cfg.precision):
        features = tuner.network.convnet(batch.x.to(tuner.device, non_blocking=True)).float()
    return head(features)[:, columns]


@LOSSES.register("contrastive")
def contrastive(tuner: SparseTuner, head: Optional[nn.Module], task: TaskView) -> Callable[[Batch], torch.Tensor]:
    """MIST's loss as a registered loss: batch -> :func:`contrastive_loss` (``head`` and ``task`` unused)."""
    return lambda batch: contrastive_loss(tuner, batch)


@LOSSES.register("ce")
def ce(tuner: SparseTuner, head: nn.Module, task: TaskView) -> Callable[[Batch], torch.Tensor]:
    """Cross-entropy of ``head`` (over the task's classes) on the backbone features; targets y - known."""
    def forward(batch: Batch) -> torch.Tensor:
        targets = batch.y.to(tuner.device, non_blocking=True) - task.known
        return cross_entropy(head_logits(tuner, head, batch), targets, batch)

    return forward
