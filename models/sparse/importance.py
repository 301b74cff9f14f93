"""Importance estimators: per-entry scores from one pass over a task's data without optimizer steps."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from models.sparse.masks import SparsityState

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mi_fisher(network: nn.Module, batches: Iterable, n_batches: int, loss_fn: LossFn, state: SparsityState,
              device: torch.device, progress: bool = False) -> tuple[dict[str, torch.Tensor], float]:
    """MIST's scoring pass, "epoch 1" (SPEC 4.4): mean squared mini-batch gradient of the contrastive loss.

    For each batch: loss, backward, zero the frozen entries of every gradient, then A += g^2 / n_b.
    The score is R = A / n_b, i.e. sum_b g_b^2 / n_b^2 (the original divides by n_b twice; per-tensor
    quantiles do not depend on the scale, SPEC 9.6). This is the squared gradient of *mini-batch* losses,
    not a per-sample (empirical) Fisher. No optimizer step is taken: the weights do not change.

    Args:
        network: module whose named parameters are scored (train mode is set here).
        batches: iterable of ``(index, images (B,3,H,W), labels (B,))``.
        n_batches: n_b, the number of batches.
        loss_fn: (images on device, labels on device) -> scalar loss.
        state: frozen masks to zero before accumulating.
        device: where the images go.
        progress: show a tqdm bar.

    Returns:
        (scores: name -> float32 tensor of the parameter's shape, >= 0; mean batch loss).
    """
    network.train()
    params = {name: p for name, p in network.named_parameters() if p.requires_grad}
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    total_loss = 0.0
    for _, x, y in tqdm(batches, total=n_batches, desc="scoring", leave=False, disable=not progress):
        loss = loss_fn(x.to(device, non_blocking=True), y.to(device))
        network.zero_grad(set_to_none=True)
        loss.backward()
        grads = {name: p.grad for name, p in params.items()}
        state.zero_frozen_(grads)
        for name, g in grads.items():
            if g is not None:
                acc[name] += g.float().pow(2) / n_batches
        total_loss += loss.item()
    network.zero_grad(set_to_none=True)
    return {name: a / n_batches for name, a in acc.items()}, total_loss / max(n_batches, 1)
