"""Importance estimators: per-entry scores from one scoring pass over a task's data, without optimizer steps.

The pass (:class:`ScoringRule` in the project's :class:`~models.loop.TuningLoop`, optimizer None) sums per batch,
after the frozen entries of every gradient are zeroed and the gradient is summed over the torchrun processes:

- ``mean_squares`` (MIST's own pass, algorithms.md §4.4): A += g_b^2 / n_b;
- ``moments`` (PIECE, algorithms.md §13.2; and whenever the gate needs the task's mean gradient): S1 += g_b,
  S2 += g_b^2, with each batch's NaN gradient entries set to 0 first, as PIECE's gradient hook does.

Each estimator is a registered :class:`Estimator`: the pass it wants and a function from the pass's sums to
float32 scores of every scored parameter's shape. Adding one is one ``ESTIMATORS.register`` call
(``docs/extending.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from models.loop import FlatGradients, Forward, TuningLoop
from models.sparse.masks import SparsityState
from utils.loaders import batches
from utils.registry import ESTIMATORS

Scores = dict[str, torch.Tensor]


@dataclass
class PassSums:
    """What a scoring pass leaves: ``squares`` (A = sum g^2 / n_b for ``mean_squares``, S2 = sum g^2 for
    ``moments``), ``firsts`` (S1 = sum g, ``moments`` only), the number of batches n_b and the mean batch loss."""

    squares: Scores
    firsts: Optional[Scores]
    n_batches: int
    loss: float

    @property
    def scaled(self) -> bool:
        """True when ``squares`` holds sum g^2 / n_b (MIST's pass) rather than sum g^2."""
        return self.firsts is None


@dataclass(frozen=True)
class Estimator:
    """A registered importance estimator.

    Attributes:
        name: the ``importance`` value.
        score: (pass sums, the tuned network, the tuner's "importance" random stream) -> name -> float32 scores.
        mean_squares: True if it can use MIST's cheaper pass (no first moments).
        source: paper / official file / algorithms.md section.
        stop: (0-based batch k, batches per epoch n, sums so far) -> True to end the pass after batch k (SPU scores
            a part of the task); None: the whole epoch. It must give the same answer on every torchrun process
            (decide from the summed gradients or from k and n only).
    """

    name: str
    score: Callable[[PassSums, nn.Module, torch.Generator], Scores]
    mean_squares: bool = False
    source: str = ""
    stop: Optional[Callable[[int, int, "ScoringRule"], bool]] = None


def mi_fisher(sums: PassSums, network: nn.Module, generator: torch.Generator) -> Scores:
    """MIST (algorithms.md §4.4): R = sum_b g_b^2 / n_b^2, the mean squared mini-batch gradient divided once more by n_b
    (the original divides twice; per-tensor quantiles do not depend on the scale, algorithms.md §9.6).
    Not a per-sample Fisher."""
    n = sums.n_batches
    if sums.scaled:
        return {name: a / n for name, a in sums.squares.items()}
    return {name: v / n / n for name, v in sums.squares.items()}


def fisher(sums: PassSums, network: nn.Module, generator: torch.Generator) -> Scores:
    """PIECE-F (algorithms.md §13.2): the empirical diagonal Fisher as PIECE computes it, F = S2 = sum_b g_b^2 (a sum,
    not a mean). NaN -> 0. Official: github wanglingxiang0717/PIECE,
    training/PIECE/param_protection/process_mask_file.py."""
    return {name: torch.nan_to_num(v, nan=0.0) for name, v in sums.squares.items()}


def second_order(sums: PassSums, network: nn.Module, generator: torch.Generator) -> Scores:
    """PIECE-S (algorithms.md §13.2): s = |S1| / sqrt(S2 + 1) with sums over the batches (not means). NaN -> 0.
    Official: github wanglingxiang0717/PIECE, training/PIECE/param_protection/get_parameters_import_files.py."""
    s1, s2 = sums.firsts, sums.squares
    return {name: torch.nan_to_num(s1[name].abs() / torch.sqrt(s2[name] + 1.0), nan=0.0) for name in s1}


def magnitude(sums: PassSums, network: nn.Module, generator: torch.Generator) -> Scores:
    """|theta| of every trainable parameter at the task's start (float32, parameter shape)."""
    return {name: p.detach().abs().float() for name, p in network.named_parameters() if p.requires_grad}


def random_scores(sums: PassSums, network: nn.Module, generator: torch.Generator) -> Scores:
    """Uniform [0, 1) scores from ``generator`` (on the parameters' device), one per entry, in parameter order."""
    return {name: torch.rand(p.shape, generator=generator, device=p.device)
            for name, p in network.named_parameters() if p.requires_grad}


ESTIMATORS.register("mi_fisher", Estimator("mi_fisher", mi_fisher, mean_squares=True,
                                           source="MIST, algorithms.md §4.4"))
ESTIMATORS.register("fisher", Estimator("fisher", fisher, source="PIECE-F, algorithms.md §13.2"))
ESTIMATORS.register("second_order", Estimator("second_order", second_order, source="PIECE-S, algorithms.md §13.2"))
ESTIMATORS.register("magnitude", Estimator("magnitude", magnitude, source="|theta| (ours)"))
ESTIMATORS.register("random", Estimator("random", random_scores, source="uniform scores (ours)"))


class ScoringRule:
    """The step rule of a scoring pass: zero the frozen entries of the summed gradients, then accumulate.

    One ``torch._foreach`` call per operation over all tensors; the buffers are zeroed after each step.

    Args:
        params: name -> parameter of the scored network (those with ``requires_grad``).
        state: the frozen masks to zero first.
        n_batches: n_b.
        moments: sum g and g^2 (True) or g^2 / n_b (False, MIST's pass).
    """

    def __init__(self, params: dict[str, nn.Parameter], state: SparsityState, n_batches: int, moments: bool) -> None:
        self.params, self.n_batches, self.moments = params, n_batches, moments
        self.squares = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
        self.firsts = ({name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
                       if moments else None)
        self.frozen = {}  # unpacked once per pass, only for tensors with frozen entries
        for name in params:
            if name in state.shapes and not state.exempt[name]:
                mask = state.frozen_mask(name)
                if bool(mask.any()):
                    self.frozen[name] = mask

    def before_step(self, grads: Sequence[FlatGradients]) -> None:
        """Zero the frozen entries of the summed gradients (and, in the moments pass, their NaN entries), then add
        g to ``firsts`` and g^2 to ``squares`` (moments) or g^2 / n_b to ``squares`` (MIST's pass); counts nothing."""
        for name, mask in self.frozen.items():
            self.params[name].grad.masked_fill_(mask, 0.0)
        if self.moments:  # PIECE's hook zeroes a batch's NaN gradient entries before accumulating (algorithms.md §13.2)
            for flat in grads:  # the gradients are views of these buffers: one call each
                torch.nan_to_num_(flat.buffer, nan=0.0)
        g = [p.grad for p in self.params.values()]
        squares = torch._foreach_pow(g, 2)
        if self.moments:
            torch._foreach_add_(list(self.firsts.values()), g)
        else:
            torch._foreach_div_(squares, float(self.n_batches))
        torch._foreach_add_(list(self.squares.values()), squares)
        return None

    def after_step(self, grads: Sequence[FlatGradients]) -> None:
        """Zero the gradient buffers (no optimizer step ran)."""
        for flat in grads:
            flat.buffer.zero_()


def scoring_pass(loop: TuningLoop, network: nn.Module, loader: Union[DataLoader, Sequence[Any]], forward: Forward,
                 state: SparsityState, moments: bool, where: str = "", of: Optional[int] = None,
                 scheduler: Optional[LRScheduler] = None,
                 stop: Optional[Callable[[int, int, "ScoringRule"], bool]] = None) -> PassSums:
    """One pass over ``loader`` without optimizer steps, accumulating the sums of :class:`ScoringRule`.

    Args:
        loop: the :class:`~models.loop.TuningLoop`.
        network: the scored module (train mode is set); its parameters with ``requires_grad`` are scored.
        loader: a loader of ``(index, x, y)`` batches, or a list of them (one process).
        forward: batch -> scalar loss.
        state: frozen masks to zero before accumulating.
        moments: see :class:`ScoringRule`.
        where, of: the task and the phase's epoch count, for messages.
        scheduler: stepped once after the pass (the official code steps it after epoch 1, algorithms.md §9.7).
        stop: ends the pass early (see :class:`Estimator`); n_b is then the number of batches used.

    Raises:
        ValueError: ``stop`` without ``moments``.
        NonFiniteError: a batch loss was NaN or infinite (checked once, after the pass).
    """
    params = {name: p for name, p in network.named_parameters() if p.requires_grad}
    total = len(loader)
    if stop is not None and not moments:
        raise ValueError("an early-stopping scoring pass needs the moments pass (n_b is not known in advance)")
    rule = ScoringRule(params, state, total, moments)
    used = 0

    def until_stop():
        nonlocal used
        for k, batch in enumerate(batches(loader)):
            yield batch  # resumed after the loop has taken the step of this batch
            used = k + 1
            if stop is not None and stop(k, total, rule):
                return

    losses, _, _ = loop.run(until_stop(), [1], forward, None, grads=[FlatGradients(params)], rule=rule,
                            scheduler=scheduler, module=network, where=where, of=of, label="scoring", n_batches=total)
    loss = losses[0] if used == total else losses[0] * total / max(used, 1)  # the monitor divides by ``total``
    return PassSums(rule.squares, rule.firsts, used, loss)
