"""Importance estimators: per-entry scores from one pass over a task's data without optimizer steps."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from tqdm import tqdm

from models.sparse.losses import LossMonitor
from models.sparse.masks import FlatGradients, SparsityState
from utils import distributed

LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def mi_fisher(network: nn.Module, batches: Iterable, n_batches: int, loss_fn: LossFn, state: SparsityState,
              device: torch.device, progress: bool = False, where: str = "") -> tuple[dict[str, torch.Tensor], float]:
    """MIST's scoring pass, "epoch 1" (SPEC 4.4): mean squared mini-batch gradient of the contrastive loss.

    For each batch: loss, backward, zero the frozen entries of every gradient, then A += g^2 / n_b (one
    ``torch._foreach`` call per operation over all tensors; the loss is summed on the device and read once).
    The score is R = A / n_b, i.e. sum_b g_b^2 / n_b^2 (the original divides by n_b twice; per-tensor
    quantiles do not depend on the scale, SPEC 9.6). This is the squared gradient of *mini-batch* losses,
    not a per-sample (empirical) Fisher. No optimizer step is taken: the weights do not change.
    Under torchrun each batch's gradient is summed over the ranks before it is squared, so the scores are
    those of one process (utils/distributed.py).

    Args:
        network: module whose named parameters are scored (train mode is set here).
        batches: iterable of ``(index, images (B,3,H,W), labels (B,))``.
        n_batches: n_b, the number of batches.
        loss_fn: (images on device, labels on device, batch number) -> scalar loss.
        state: frozen masks to zero before accumulating.
        device: where the images go.
        progress: show a tqdm bar.
        where: the task, for the error message.

    Returns:
        (scores: name -> float32 tensor of the parameter's shape, >= 0; mean batch loss).

    Raises:
        NonFiniteError: a batch loss was NaN or infinite (checked once, after the pass).
    """
    network.train()
    params = {name: p for name, p in network.named_parameters() if p.requires_grad}
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    frozen = {}  # unpacked once per pass, only for tensors with frozen entries
    for name in params:
        if name in state.shapes and not state.exempt[name]:
            mask = state.frozen_mask(name)
            if bool(mask.any()):
                frozen[name] = mask
    flat = FlatGradients(params)  # the backward accumulates into one buffer (one all-reduce under torchrun)
    names = list(params)
    flat.attach()
    grads = [params[n].grad for n in names]
    accs = [acc[n] for n in names]
    monitor = LossMonitor(device, f"scoring pass ({where})")
    for step, (_, x, y) in enumerate(tqdm(distributed.fill_empty(batches), total=n_batches, desc="scoring",
                                          leave=False, disable=not progress)):
        flat.buffer.zero_()
        loss = loss_fn(x.to(device, non_blocking=True), y.to(device, non_blocking=True), step)
        loss.backward()
        distributed.all_reduce_sum_(flat.buffer)
        for name, mask in frozen.items():
            params[name].grad.masked_fill_(mask, 0.0)
        squares = torch._foreach_pow(grads, 2)
        torch._foreach_div_(squares, float(n_batches))
        torch._foreach_add_(accs, squares)
        monitor.add(loss)
    if not flat.attached():
        raise RuntimeError("the scoring pass's gradient buffer was detached by the loss function")
    flat.detach()
    return {name: a / n_batches for name, a in acc.items()}, monitor.mean(n_batches)
