"""Masks of MIST (algorithms.md §4.4-4.7): which entries may train, the per-step random drop, and the across-task state.

Vocabulary:
- *selected*: per task, per tensor, the entries whose importance score is >= the (1 - select_rate) quantile;
- *exempt* ("always trainable") tensors take a full mask (official rule: the name contains
  ``fc.weight``, ``fc.sigma``, ``bias``, ``norm`` or ``simclr``; structural rule: ``param.ndim < 2``);
- *frozen*: entries whose score reached the freeze quantile in an earlier task; their gradient is zero
  in every later task (only ever grows);
- *update count*: per entry, the number of earlier tasks that selected it; gradients are multiplied by
  ``0.9 ** count`` (the overlap penalty);
- *eligible*: in one task, the selected entries that are not frozen; only they can receive a gradient.

Storage (issue 7): the across-task state keeps frozen sets as bit-packed ``uint8`` (1 bit per entry) and
update counts as ``uint8``, for non-exempt tensors only (exempt tensors are never frozen or counted). The
per-task constants are folded once, right after the scoring pass, into a :class:`GradientPlan` (flat int32
positions of the eligible entries and their float32 ``0.9 ** count``), so the float scores can be
released before the sparse epochs. Per step, the plan draws the random keep decisions only for the
eligible entries (geometric gaps between kept positions) and masks a flat gradient buffer with one
gather, one fill and one scatter, with no host synchronisation.
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

from models.sparse.plan import GradientPlan

EXEMPT_SUBSTRINGS = ("fc.weight", "fc.sigma", "bias", "norm", "simclr")  # official, algorithms.md §4.5
OVERLAP_BASE = 0.9  # official penalty base, algorithms.md §4.6 step 3.2
QUANTILE_MAX_NUMEL = 2**24  # torch.quantile refuses larger inputs (algorithms.md §9.12)
MAX_COUNT = 255  # update counts are uint8 and saturate here (0.9**255 ~ 2e-12)
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


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
    """``torch.quantile(values.flatten(), q)`` (linear interpolation) for any size (algorithms.md §9.12 fix).

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


#: parameter-name parts of input embeddings, never selected by the ported PIECE (algorithms.md §13.2, §13.7: the
#: analogue of an LLM's input embedding, which PIECE skips by ``"embed" in name`` in
#: param_protection/extract_and_save_new.py and freezes in training/main.py): ViT patch/position embeddings, class and
#: register tokens; a CNN's stem conv
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape, n entries) -> uint8 (ceil(n / 8),), entry i at bit i % 8 of byte i // 8."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 (ceil(n / 8),) -> bool tensor of ``shape``."""
    n = math.prod(shape)
    bits = packed[:, None].bitwise_and(_BIT_WEIGHTS.to(packed.device)).ne(0)
    return bits.reshape(-1)[:n].reshape(shape)


def overlap_penalty(counts: torch.Tensor) -> torch.Tensor:
    """``0.9 ** count`` as float32, bitwise equal to the official ``0.9 ** int32_count`` (algorithms.md §9.11)."""
    return torch.pow(OVERLAP_BASE, counts.float())


class SparsityState:
    """Per-entry state that persists across tasks: frozen sets and update counts (algorithms.md §4.1, §4.7).

    Args:
        params: the named parameters present at learner construction (backbone and projection head),
            in the network's order; this order is also the flat gradient layout of :class:`GradientPlan`.
        rule: exemption rule (see :func:`is_always_trainable`).

    Attributes:
        exempt: name -> True for always-trainable tensors.
        shapes: name -> parameter shape; ``offsets``: name -> first position in the flat layout;
        numel: entries of all tensors together.

    Storage: for each non-exempt tensor of n entries, ceil(n / 8) bytes of frozen bits and n bytes of
    uint8 counts (counts saturate at 255). :attr:`frozen` and :attr:`update_count` give unpacked copies.
    """

    def __init__(self, params: Iterable[tuple[str, nn.Parameter]], rule: str = "name") -> None:
        self.rule = rule
        self.exempt: dict[str, bool] = {}
        self.shapes: dict[str, torch.Size] = {}
        self.offsets: dict[str, int] = {}
        self._frozen_bits: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self.numel = 0
        self.device = torch.device("cpu")
        for name, p in params:
            self.device = p.device
            self.exempt[name] = is_always_trainable(name, p, rule)
            self.shapes[name] = p.shape
            self.offsets[name] = self.numel
            self.numel += p.numel()
            if not self.exempt[name]:
                self._frozen_bits[name] = torch.zeros((p.numel() + 7) // 8, dtype=torch.uint8, device=p.device)
                self._counts[name] = torch.zeros(p.shape, dtype=torch.uint8, device=p.device)

    # ---- read access -------------------------------------------------------------------------
    def frozen_mask(self, name: str) -> torch.Tensor:
        """Bool tensor of the parameter's shape, True where frozen (all False for exempt tensors)."""
        if name in self._frozen_bits:
            return unpack_bits(self._frozen_bits[name], self.shapes[name])
        return torch.zeros(self.shapes[name], dtype=torch.bool, device=self.device)

    def counts(self, name: str) -> torch.Tensor:
        """int32 update counts of the parameter's shape (zeros for exempt tensors)."""
        if name in self._counts:
            return self._counts[name].to(torch.int32)
        return torch.zeros(self.shapes[name], dtype=torch.int32, device=self.device)

    @property
    def frozen(self) -> Mapping[str, torch.Tensor]:
        """Read-only name -> bool tensor (unpacked copies: change the state with :meth:`set_frozen`)."""
        return MappingProxyType({name: self.frozen_mask(name) for name in self.shapes})

    @property
    def update_count(self) -> Mapping[str, torch.Tensor]:
        """Read-only name -> int32 tensor (copies: change the state with :meth:`set_update_count`)."""
        return MappingProxyType({name: self.counts(name) for name in self.shapes})

    def frozen_entries(self, names: Optional[Iterable[str]] = None) -> int:
        """Number of frozen entries over ``names`` (default: every tensor)."""
        names = self._frozen_bits if names is None else [n for n in names if n in self._frozen_bits]
        return sum(int(self.frozen_mask(n).sum()) for n in names)

    def nbytes(self) -> dict[str, int]:
        """Bytes held between tasks: ``frozen_bits`` and ``update_counts``."""
        return {"frozen_bits": sum(t.numel() for t in self._frozen_bits.values()),
                "update_counts": sum(t.numel() for t in self._counts.values())}

    # ---- write access ------------------------------------------------------------------------
    def set_frozen(self, name: str, mask: torch.Tensor) -> None:
        """Replace the frozen set of a non-exempt tensor by ``mask`` (bool, the parameter's shape).

        Raises:
            KeyError: ``name`` is exempt or unknown (exempt tensors are never frozen).
        """
        self._frozen_bits[name] = pack_bits(mask.to(self._frozen_bits[name].device))

    def set_update_count(self, name: str, counts: torch.Tensor) -> None:
        """Replace the update counts of a non-exempt tensor (integers in 0..255, the parameter's shape).

        Raises:
            KeyError: ``name`` is exempt or unknown. ValueError: a count outside 0..255.
        """
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > MAX_COUNT):
            raise ValueError(f"update counts of {name} must lie in 0..{MAX_COUNT}")
        self._counts[name] = counts.to(device=self._counts[name].device, dtype=torch.uint8).reshape(self.shapes[name])

    # ---- per task ----------------------------------------------------------------------------
    def select(self, scores: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
        """Per-tensor selection masks (algorithms.md §4.5): exempt tensors full, others ``select_top(score, rate)``."""
        return {name: torch.ones_like(s, dtype=torch.bool) if self.exempt.get(name, True) else select_top(s, rate)
                for name, s in scores.items()}

    def multipliers(self, selected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense per-task gradient multipliers ``selected * 0.9**count * (not frozen)``, float32.

        Multiplying a gradient by this and by a 0/1 keep mask is bitwise equal to the official sequence
        (zero frozen, mask and drop, scale by 0.9**count, zero frozen), since every factor but
        ``0.9**count`` is 0 or 1. The tuning phase uses the compact :meth:`plan` instead.
        """
        out = {}
        for name, mask in selected.items():
            mult = mask.float()
            if name in self._counts:
                mult = mult * overlap_penalty(self._counts[name])
                mult = mult.masked_fill(self.frozen_mask(name), 0.0)
            out[name] = mult
        return out

    def plan(self, selected: Mapping[str, torch.Tensor], device: torch.device | str = "cpu") -> "GradientPlan":
        """Fold a task's selection with the current frozen sets and counts into a :class:`GradientPlan`.

        Call it before :meth:`end_task` of the same task (the plan uses the state at the task's start).

        Raises:
            KeyError: a selected name that is not part of the state.
        """
        unknown = set(selected) - set(self.shapes)
        if unknown:
            raise KeyError(f"selection names tensors outside the sparsity state: {sorted(unknown)[:3]}")
        positions, scales = [], []
        for name in self.shapes:  # flat-layout order
            if name not in selected:
                continue
            eligible = selected[name].reshape(-1)
            if name in self._frozen_bits:
                eligible = eligible & ~self.frozen_mask(name).reshape(-1).to(eligible.device)
            local = torch.nonzero(eligible).squeeze(1)
            positions.append((local + self.offsets[name]).to(torch.int32))
            if name in self._counts:
                scales.append(overlap_penalty(self._counts[name].reshape(-1)[local.to(self._counts[name].device)]))
            else:
                scales.append(torch.ones(local.numel(), dtype=torch.float32, device=local.device))
        index = torch.cat(positions).to(device) if positions else torch.zeros(0, dtype=torch.int32, device=device)
        scale = torch.cat(scales).to(device) if scales else torch.zeros(0, dtype=torch.float32, device=device)
        return GradientPlan(index, scale, self.numel, self.offsets, self.shapes)

    def end_task(self, scores: Mapping[str, torch.Tensor], selected: Mapping[str, torch.Tensor],
                 freeze_quantile: float, freeze: bool = True, count: bool = True) -> None:
        """Grow frozen sets by ``score >= quantile(score, freeze_quantile)`` (``freeze``) and add this task's
        selection to the update counts (``count``), for every non-exempt tensor (algorithms.md §4.7; MIST does both)."""
        for name, s in scores.items():
            if name not in self._frozen_bits:
                continue
            if freeze:
                frozen = self.frozen_mask(name).to(s.device) | (s >= quantile(s, freeze_quantile))
                self._frozen_bits[name] = pack_bits(frozen).to(self._frozen_bits[name].device)
            if count:
                counts = self._counts[name]
                self._counts[name] = torch.clamp(counts.to(torch.int16) + selected[name].to(counts.device),
                                                 max=MAX_COUNT).to(torch.uint8)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Compact state for checkpoints: ``frozen`` (packed uint8 bits) and ``update_count`` (uint8), by name."""
        return {"frozen": dict(self._frozen_bits), "update_count": dict(self._counts)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: names or sizes that do not match this state.
        """
        for key, mine in (("frozen", self._frozen_bits), ("update_count", self._counts)):
            theirs = state[key]
            if set(theirs) != set(mine) or any(theirs[n].shape != mine[n].shape for n in mine):
                raise ValueError(f"sparsity state '{key}' does not match this network's maskable tensors")
            for n in mine:
                mine[n] = theirs[n].to(device=mine[n].device, dtype=torch.uint8).clone()
