"""Importance estimators: per-entry scores from one pass over a task's data without optimizer steps.

- :func:`mi_fisher`: MIST's score (SPEC 4.4), sum_b g_b^2 / n_b^2;
- :func:`gradient_moments`: the sums S1 = sum_b g_b and S2 = sum_b g_b^2 of the same pass (PIECE, SPEC 13.2),
  from which :func:`fisher` (S2), :func:`second_order` (|S1| / sqrt(S2 + 1)) and the task's mean gradient
  S1 / n_b (update-magnitude control, SPEC 14.3) follow;
- :func:`magnitude` (|theta|) and :func:`random_scores` need no pass.
"""

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
    acc, loss = _scoring_pass(network, batches, n_batches, loss_fn, state, device, progress, where, moments=False)
    return {name: a / n_batches for name, a in acc[0].items()}, loss


def gradient_moments(network: nn.Module, batches: Iterable, n_batches: int, loss_fn: LossFn, state: SparsityState,
                     device: torch.device, progress: bool = False, where: str = ""
                     ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """One scoring pass (no optimizer step) returning the gradient sums of PIECE (SPEC 13.2).

    Same pass as :func:`mi_fisher` (frozen entries zeroed, gradients summed over torchrun ranks per batch).

    Returns:
        (S1: name -> float32 sum_b g_b, S2: name -> float32 sum_b g_b^2, both of the parameter's shape;
        mean batch loss).

    Raises:
        NonFiniteError: a batch loss was NaN or infinite.
    """
    acc, loss = _scoring_pass(network, batches, n_batches, loss_fn, state, device, progress, where, moments=True)
    return acc[0], acc[1], loss


def fisher(s2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PIECE-F (SPEC 13.2): the empirical diagonal Fisher as PIECE computes it, F = S2 = sum_b g_b^2 (a sum,
    not a mean; the ranking does not depend on the scale). NaN -> 0. Official: github wanglingxiang0717/PIECE, training/PIECE/param_protection/
    process_mask_file.py (gradient hooks accumulate the squares, ``nan_to_num``)."""
    return {name: torch.nan_to_num(v, nan=0.0) for name, v in s2.items()}


def second_order(s1: dict[str, torch.Tensor], s2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PIECE-S (SPEC 13.2): s = |S1| / sqrt(S2 + 1) with sums over the batches (not means, so the weight of
    the +1 depends on the number of batches and the gradient scale, as in the official code). NaN -> 0.
    Official: github wanglingxiang0717/PIECE, training/PIECE/param_protection/get_parameters_import_files.py (the active one of four commented variants)."""
    return {name: torch.nan_to_num(s1[name].abs() / torch.sqrt(s2[name] + 1.0), nan=0.0) for name in s1}


def magnitude(network: nn.Module) -> dict[str, torch.Tensor]:
    """|theta| of every trainable parameter at the task's start (float32, parameter shape)."""
    return {name: p.detach().abs().float() for name, p in network.named_parameters() if p.requires_grad}


def random_scores(network: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Uniform [0, 1) scores from ``generator`` (on the parameters' device), one per entry, in parameter order."""
    return {name: torch.rand(p.shape, generator=generator, device=p.device)
            for name, p in network.named_parameters() if p.requires_grad}


def _scoring_pass(network, batches, n_batches, loss_fn, state, device, progress, where, moments: bool):
    """The pass behind :func:`mi_fisher` (``moments`` False: acc += g^2 / n_b) and :func:`gradient_moments`
    (True: S1 += g, S2 += g^2). Returns ([accumulators], mean batch loss)."""
    network.train()
    params = {name: p for name, p in network.named_parameters() if p.requires_grad}
    acc = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    sums = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()} if moments else None
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
    firsts = [sums[n] for n in names] if moments else None
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
        if moments:
            torch._foreach_add_(firsts, grads)
        else:
            torch._foreach_div_(squares, float(n_batches))
        torch._foreach_add_(accs, squares)
        monitor.add(loss)
    if not flat.attached():
        raise RuntimeError("the scoring pass's gradient buffer was detached by the loss function")
    flat.detach()
    return ([sums, acc] if moments else [acc]), monitor.mean(n_batches)
