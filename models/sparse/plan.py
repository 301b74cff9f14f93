"""The fast path of MIST's per-step gradient masking (algorithms.md §4.6; issue 7):
a flat gradient buffer and a task's plan.

- the gradients of every tuned parameter live in one flat buffer (:class:`models.loop.FlatGradients`), so a
  backward pass fills it directly, the torchrun all-reduce is one call, and a step's masking is a few operations;
- :class:`GradientPlan`: the task's eligible entries (selected, not frozen) as flat positions with their
  ``0.9 ** count`` factors; per step it draws the keep decisions for those entries only and masks the buffer with
  one gather, one fill and one scatter, with no host synchronisation.

``models/sparse/reference.py`` holds the plain per-tensor sequence of algorithms.md §4.6 that this path is tested equal
to (``tests/test_sparse_fast.py``) and measured against (``bench/mist_step.py``).
"""

from __future__ import annotations

import math
from typing import Mapping, Optional

import torch

# extra draws beyond the expected number of kept entries: the chance that a step needs more is < 1e-20
_GAP_MARGIN_SIGMAS, _GAP_MARGIN_ABS = 10.0, 64


class GradientPlan:
    """One task's gradient masking in compact form (algorithms.md §4.6), built by :meth:`SparsityState.plan`.

    The eligible entries (selected and not frozen) of every tensor are listed by their position in the
    flat layout of all tuned parameters (``index``, int32, ascending within each tensor), with their
    static factor ``scale = 0.9 ** count`` (float32; 1 for exempt tensors). One extra slot at the end of
    both lists points at a dummy position past the parameters, with scale 0: positions that a step does
    not need are sent there, so every step works on fixed-size tensors and never waits on the host.

    Args:
        index: (E,) int32 flat positions of the eligible entries.
        scale: (E,) float32 factors.
        numel: N, entries of the flat layout (the dummy slot is position N).
        offsets, shapes: the flat layout (name -> first position, shape).
    """

    def __init__(self, index: torch.Tensor, scale: torch.Tensor, numel: int,
                 offsets: Mapping[str, int], shapes: Mapping[str, torch.Size]) -> None:
        self.eligible = int(index.numel())
        self.numel = numel
        self.offsets, self.shapes = dict(offsets), dict(shapes)
        self.index = torch.cat([index.to(torch.int32), index.new_full((1,), numel, dtype=torch.int32)])
        self.scale = torch.cat([scale.float(), scale.new_zeros(1, dtype=torch.float32)])

    @property
    def device(self) -> torch.device:
        """Where the plan's index and scale live (the gradients' device)."""
        return self.index.device

    def nbytes(self) -> int:
        """Bytes of the plan (index and scale)."""
        return self.index.numel() * self.index.element_size() + self.scale.numel() * self.scale.element_size()

    def draws(self, keep_prob: float) -> int:
        """K, the fixed number of candidate positions drawn per step for ``keep_prob`` (E when p = 1)."""
        e = self.eligible
        if keep_prob >= 1.0 or e == 0:
            return e
        mean, sd = e * keep_prob, math.sqrt(e * keep_prob * (1.0 - keep_prob))
        return min(e, int(math.ceil(mean + _GAP_MARGIN_SIGMAS * sd)) + _GAP_MARGIN_ABS)

    def sample(self, keep_prob: float, generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw one step's kept entries: each eligible entry independently with probability ``keep_prob``.

        The gaps between consecutive kept positions are geometric, gap = floor(log(U) / log(1 - p)) + 1
        with U uniform on (0, 1], so only about p E random numbers are drawn (E with p = 1: every
        eligible entry, no draw). Positions past E go to the dummy slot.

        Returns:
            (positions (K,) int64 indices into ``index``/``scale``, with E for the dummy slot;
            shortfall () int64: 1 if the K draws ended before the last eligible entry, in which case the
            entries after the last drawn position were not kept this step (probability < 1e-20)).
        """
        e, k = self.eligible, self.draws(keep_prob)
        if keep_prob >= 1.0 or e == 0:
            return torch.arange(e, device=self.device), torch.zeros((), dtype=torch.int64, device=self.device)
        u = 1.0 - torch.rand(k, generator=generator, device=self.device, dtype=torch.float64)  # (0, 1]
        gaps = torch.floor(torch.log(u) / math.log1p(-keep_prob)).to(torch.int64) + 1
        positions = torch.cumsum(gaps, 0) - 1
        shortfall = (positions[-1] < e - 1).to(torch.int64) if k < e else torch.zeros((), dtype=torch.int64,
                                                                                         device=self.device)
        return positions.clamp_(max=e), shortfall

    def apply_(self, flat_grad: torch.Tensor, positions: torch.Tensor,
               backbone_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a flat gradient in place: keep ``g * scale`` at the given eligible positions, zero elsewhere.

        Bitwise equal to the official per-tensor sequence (algorithms.md §4.6) with the same keep decisions.

        Args:
            flat_grad: (N + 1,) float32 gradients in the flat layout plus the dummy slot (which is 0).
            positions: (K,) int64 from :meth:`sample` (or any positions into the plan, E = dummy).
            backbone_numel: flat positions below this are backbone entries (the rest: projection head).

        Returns:
            (flat indices (K,) int64 of the written entries, for :meth:`clear_`; non-zero backbone
            gradient entries after masking, a 0-dim int64 tensor on the device).
        """
        idx = torch.index_select(self.index, 0, positions).long()
        values = torch.index_select(flat_grad, 0, idx) * torch.index_select(self.scale, 0, positions)
        flat_grad.zero_()
        if flat_grad.is_cuda and torch.are_deterministic_algorithms_enabled():
            flat_grad.index_put_((idx,), values)  # index_copy_ has no deterministic CUDA kernel
        else:
            flat_grad.index_copy_(0, idx, values)  # duplicates only at the dummy slot, all writing 0
        nonzero = ((values != 0) & (idx < backbone_numel)).sum()
        return idx, nonzero

    @staticmethod
    def clear_(flat_grad: torch.Tensor, idx: torch.Tensor) -> None:
        """Zero the entries written by :meth:`apply_`, leaving the whole buffer zero for the next backward."""
        flat_grad.index_fill_(0, idx, 0.0)

    def dense(self, positions: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """Per-tensor float32 multipliers: ``scale`` at the kept (default: all eligible) entries, 0 elsewhere."""
        flat = torch.zeros(self.numel + 1, dtype=torch.float32, device=self.device)
        pos = torch.arange(self.eligible, device=self.device) if positions is None else positions
        flat[self.index[pos].long()] = self.scale[pos]
        return {name: flat[o: o + math.prod(self.shapes[name])].view(self.shapes[name])
                for name, o in self.offsets.items()}
