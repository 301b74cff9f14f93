"""Masks of MIST (SPEC 4.4-4.7): which entries may train, the per-step random drop, and the across-task state.

Vocabulary:
- *selected*: per task, per tensor, the entries whose importance score is >= the (1 - select_rate) quantile;
- *exempt* ("always trainable") tensors take a full mask (official rule: the name contains
  ``fc.weight``, ``fc.sigma``, ``bias``, ``norm`` or ``simclr``; structural rule: ``param.ndim < 2``);
- *frozen*: entries whose score reached the freeze quantile in an earlier task; their gradient is zero
  in every later task (only ever grows);
- *update count*: per entry, the number of earlier tasks that selected it; gradients are multiplied by
  ``0.9 ** count`` (the overlap penalty).
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

import torch
from torch import nn

EXEMPT_SUBSTRINGS = ("fc.weight", "fc.sigma", "bias", "norm", "simclr")  # official, SPEC 4.5
OVERLAP_BASE = 0.9  # official penalty base, SPEC 4.6 step 3.2
QUANTILE_MAX_NUMEL = 2**24  # torch.quantile refuses larger inputs (SPEC 9.12)


def is_always_trainable(name: str, param: torch.Tensor, rule: str = "name") -> bool:
    """The single exemption predicate.

    Args:
        name: full parameter name as in the official network, e.g. ``convnet.blocks.0.mlp.fc1.weight``
            (not exempt: a digit sits between ``fc`` and ``.weight``) or ``simclr.weight`` (exempt).
        param: the parameter (used by the structural rule).
        rule: ``"name"`` (official substrings) or ``"ndim"`` (tensors with fewer than 2 dims: biases and
            norm scales of any backbone, e.g. BatchNorm in timm CNNs); the projection head stays exempt.
    """
    if rule == "ndim":
        return param.ndim < 2 or "simclr" in name
    return any(s in name for s in EXEMPT_SUBSTRINGS)


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values.flatten(), q)`` (linear interpolation) for any size (SPEC 9.12 fix).

    Above 2^24 elements it interpolates between the two order statistics from ``kthvalue``.
    Returns a 0-dim tensor on ``values``' device.
    """
    flat = values.flatten().float()
    if flat.numel() <= QUANTILE_MAX_NUMEL:
        return torch.quantile(flat, q)
    pos = q * (flat.numel() - 1)
    lo, hi = int(pos // 1), min(int(pos // 1) + 1, flat.numel() - 1)
    v_lo = flat.kthvalue(lo + 1).values
    v_hi = flat.kthvalue(hi + 1).values
    return v_lo + (v_hi - v_lo) * (pos - lo)


def select_top(scores: torch.Tensor, rate: float) -> torch.Tensor:
    """Bool mask of the entries at or above the (1 - rate) quantile of ``scores`` (ties included)."""
    return scores >= quantile(scores, 1.0 - rate)


class SparsityState:
    """Per-entry state that persists across tasks: frozen masks and update counts (SPEC 4.1, 4.7).

    Args:
        params: the named parameters present at learner construction (backbone and projection head).
        rule: exemption rule (see :func:`is_always_trainable`).

    Attributes:
        frozen: name -> bool tensor, True where the entry is frozen.
        update_count: name -> int32 tensor, number of earlier tasks that selected the entry.
    """

    def __init__(self, params: Iterable[tuple[str, nn.Parameter]], rule: str = "name") -> None:
        self.rule = rule
        self.exempt: dict[str, bool] = {}
        self.frozen: dict[str, torch.Tensor] = {}
        self.update_count: dict[str, torch.Tensor] = {}
        for name, p in params:
            self.exempt[name] = is_always_trainable(name, p, rule)
            self.frozen[name] = torch.zeros_like(p, dtype=torch.bool)
            self.update_count[name] = torch.zeros_like(p, dtype=torch.int32)

    def select(self, scores: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
        """Per-tensor selection masks (SPEC 4.5): exempt tensors full, others ``select_top(score, rate)``."""
        return {name: torch.ones_like(s, dtype=torch.bool) if self.exempt.get(name, True) else select_top(s, rate)
                for name, s in scores.items()}

    def multipliers(self, selected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Static gradient multipliers for a task: ``selected * 0.9**count * (not frozen)``, float32.

        Multiplying a gradient by this and by a 0/1 keep mask is bitwise equal to the official sequence
        (zero frozen, mask and drop, scale by 0.9**count, zero frozen), since every factor but
        ``0.9**count`` is 0 or 1.
        """
        out = {}
        for name, mask in selected.items():
            mult = mask.float()
            if name in self.update_count:
                mult = mult * torch.pow(OVERLAP_BASE, self.update_count[name].float())
                mult = mult.masked_fill(self.frozen[name], 0.0)
            out[name] = mult
        return out

    def end_task(self, scores: Mapping[str, torch.Tensor], selected: Mapping[str, torch.Tensor],
                 freeze_quantile: float) -> None:
        """Grow frozen masks by ``score >= quantile(score, freeze_quantile)`` and add this task's selection
        to the update counts, for every non-exempt tensor (SPEC 4.7)."""
        for name, s in scores.items():
            if name not in self.frozen or self.exempt[name]:
                continue
            self.frozen[name] |= s >= quantile(s, freeze_quantile)
            self.update_count[name] += selected[name].to(torch.int32)

    def zero_frozen_(self, grads: Mapping[str, Optional[torch.Tensor]]) -> None:
        """Set frozen entries of the given gradients to zero in place (scoring pass, SPEC 4.4)."""
        for name, g in grads.items():
            if g is not None and name in self.frozen:
                g.masked_fill_(self.frozen[name], 0.0)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Frozen masks and update counts, for checkpoints."""
        return {"frozen": dict(self.frozen), "update_count": dict(self.update_count)}
