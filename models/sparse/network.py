"""The network a tuning phase trains (backbone + MIST's projection head) and its cosine CE heads."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

import torch
from torch import nn

from models.heads import PROJECTION_DIM, CosineLinear
from models.loop import keep_batchnorm_in_eval
from utils import distributed
from utils.loaders import batches
from utils.runtime import autocast

if TYPE_CHECKING:  # it imports this module
    from models.sparse.tuner import TaskView


class TunedNetwork(nn.Module):
    """``convnet`` (the backbone) + ``simclr`` projection head; parameter names match the official network.

    Args:
        backbone: feature extractor with ``out_dim``.
        proj_dim: projection width (official 128).
        freeze_bn_stats: keep BatchNorm layers in eval mode when the network trains, so their running
            statistics do not move (the official ``network.train()`` updates them; ViTs have none).
    """

    def __init__(self, backbone: nn.Module, proj_dim: int = PROJECTION_DIM, freeze_bn_stats: bool = False) -> None:
        super().__init__()
        self.convnet = backbone
        self.simclr = nn.Linear(int(backbone.out_dim), proj_dim)
        self.freeze_bn_stats = freeze_bn_stats

    def train(self, mode: bool = True) -> "TunedNetwork":
        """``nn.Module.train``; with ``freeze_bn_stats`` the BatchNorm layers stay in eval mode. Returns self."""
        super().train(mode)
        if mode and self.freeze_bn_stats:
            keep_batchnorm_in_eval(self)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) -> projections (N, proj_dim)."""
        return self.simclr(self.convnet(x))


@torch.no_grad()
def prototype_head(network: TunedNetwork, loader: Iterable, task: TaskView, device: torch.device,
                   precision: str) -> CosineLinear:
    """A cosine head over the task's classes whose rows are their mean features (one pass over ``loader`` in eval
    mode, no gradients): the CE of the ported methods starts from the classifier SimpleCIL would build, so its
    gradients are those of a working head (our choice, docs/deviations.md).

    ``loader``: batches ``(index, x, y)`` of the task's images, x (B, 3, H, W) float32, y (B,) int64 in
    [known, seen). The head's weight is (seen - known, D) float32 (summed over torchrun processes), sigma 1.
    """
    dim, n_new = int(network.convnet.out_dim), task.seen - task.known
    sums = torch.zeros(n_new, dim, device=device)
    counts = torch.zeros(n_new, device=device)
    network.eval()
    for batch in batches(loader):
        with autocast(device, precision):
            features = network.convnet(batch.x.to(device, non_blocking=True)).float()
        rows = batch.y.to(device, non_blocking=True) - task.known
        sums.index_add_(0, rows, features)
        counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
    if distributed.active():
        distributed.all_reduce_sum_(sums)
        distributed.all_reduce_sum_(counts)
    head = CosineLinear(dim, n_new).to(device)
    head.weight.copy_(sums / counts.clamp(min=1.0)[:, None])
    head.sigma.fill_(1.0)
    return head


def official_head(dim: int, task: TaskView, sigma: float, device: torch.device, random_rows: bool = False,
                  head_rows: Optional[torch.Tensor] = None) -> CosineLinear:
    """The cosine head the CE ablations are computed on (official ``update_fc``, algorithms.md §3.2, §5).

    Without ``head_rows``: a head over the task's new classes. With them (SimpleCIL): the learner's full head over
    every seen class, rows [0, known) holding ``head_rows`` (the class prototypes, (known, D) float32) and the new
    rows zero from task 1 on (random on task 0, or always with ``random_rows``: the algorithms.md §9.24 fix), as the
    official ``fc``; the CE then uses the new-class logits only, and every mask budget counts the whole tensor.
    """
    full = head_rows is not None
    head = CosineLinear(dim, task.seen if full else task.seen - task.known).to(device)
    with torch.no_grad():
        if task.task_id > 0 and not random_rows:
            head.weight.zero_()  # official update_fc: new rows are zeros (algorithms.md §9.24)
        if full:
            head.weight[: task.known] = head_rows.to(device)
        head.sigma.fill_(sigma)
    return head
