"""Masks of MIST (SPEC 4.4-4.7): which entries may train, the per-step random drop, and the across-task state.

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
import re
from types import MappingProxyType
from typing import Iterable, Mapping, Optional

import torch
from torch import nn

EXEMPT_SUBSTRINGS = ("fc.weight", "fc.sigma", "bias", "norm", "simclr")  # official, SPEC 4.5
OVERLAP_BASE = 0.9  # official penalty base, SPEC 4.6 step 3.2
QUANTILE_MAX_NUMEL = 2**24  # torch.quantile refuses larger inputs (SPEC 9.12)
MAX_COUNT = 255  # update counts are uint8 and saturate here (0.9**255 ~ 2e-12)
_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
# extra draws beyond the expected number of kept entries: the chance that a step needs more is < 1e-20
_GAP_MARGIN_SIGMAS, _GAP_MARGIN_ABS = 10.0, 64


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


#: parameter-name parts of input embeddings, never selected by the ported PIECE (SPEC 13.2, 13.7: the analogue of
#: an LLM's input embedding, which PIECE skips by ``"embed" in name`` in param_protection/extract_and_save_new.py
#: and freezes in training/main.py): ViT patch/position embeddings, class and register tokens; a CNN's stem conv
EMBEDDING_PARTS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "conv_stem")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def is_embedding(name: str) -> bool:
    """True for the input-embedding tensors of :data:`EMBEDDING_PARTS` (e.g. ``convnet.pos_embed``)."""
    return any(part in name for part in EMBEDDING_PARTS)


def block_of(name: str) -> str:
    """The group of a parameter for per-block selection: ``"blocks.<i>"`` (the first ``blocks.<i>.`` in the name:
    a ViT's transformer block, an EfficientNet's stage), else ``"outside"`` (embeddings, stem, final norm)."""
    match = _BLOCK.search(name)
    return f"blocks.{match.group(1)}" if match else "outside"


def select_global(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """PIECE's global selection (SPEC 13.3): exactly the ``k`` largest scores over all tensors of ``scores``.

    The scores are flattened and concatenated in the mapping's order and ``torch.topk`` picks k positions
    (ties broken by topk, so exactly k entries are selected); the official code stores per-tensor index
    lists from the same topk (github wanglingxiang0717/PIECE, training/PIECE/param_protection/
    extract_and_save_new.py, ``topk_threshold_indices`` and ``unravel_indices``).

    Args:
        scores: name -> float scores (any shapes, one device); the candidates only.
        k: entries to select, 0 <= k <= total.

    Returns:
        name -> bool mask of the tensor's shape.

    Raises:
        ValueError: k outside [0, total].
    """
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"global selection of k={k} entries out of {total}")
    flat = torch.cat([scores[n].reshape(-1).float() for n in names]) if names else torch.zeros(0)
    chosen = torch.zeros(total, dtype=torch.bool, device=flat.device)
    if k:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    return {n: part.view(scores[n].shape) for n, part in zip(names, torch.split(chosen, sizes))}


def select_per_block(scores: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """Per-block selection: within each group of :func:`block_of`, the floor(rate * n_group) largest scores
    (PIECE's per-layer variant ``generation_mask_file_layer`` in training/PIECE/param_protection/
    extract_and_save_new.py, not wired into its pipeline, SPEC 13.3; entries outside every block form one
    more group)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, s in scores.items():
        groups.setdefault(block_of(name), {})[name] = s
    out: dict[str, torch.Tensor] = {}
    for members in groups.values():
        n = sum(s.numel() for s in members.values())
        out.update(select_global(members, int(math.floor(rate * n))))
    return {name: out[name] for name in scores}


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
    """``0.9 ** count`` as float32, bitwise equal to the official ``0.9 ** int32_count`` (SPEC 9.11)."""
    return torch.pow(OVERLAP_BASE, counts.float())


class SparsityState:
    """Per-entry state that persists across tasks: frozen sets and update counts (SPEC 4.1, 4.7).

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
        """Per-tensor selection masks (SPEC 4.5): exempt tensors full, others ``select_top(score, rate)``."""
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
        selection to the update counts (``count``), for every non-exempt tensor (SPEC 4.7; MIST does both)."""
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


class GradientPlan:
    """One task's gradient masking in compact form (SPEC 4.6), built by :meth:`SparsityState.plan`.

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

    def apply_(self, flat_grad: torch.Tensor, positions: torch.Tensor, backbone_numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a flat gradient in place: keep ``g * scale`` at the given eligible positions, zero elsewhere.

        Bitwise equal to the official per-tensor sequence (SPEC 4.6) with the same keep decisions.

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


class FlatGradients:
    """Gradients of a list of parameters as views into one flat float32 buffer (plus a dummy zero slot).

    Autograd accumulates into an existing ``.grad`` in place, so after :meth:`attach` a backward pass
    fills the buffer directly (as the official ``zero_grad()`` that keeps zero tensors); a step's masking
    is then a few operations on the buffer instead of a loop over every tensor.

    Args:
        params: name -> parameter, in flat-layout order (float32, one device).

    Raises:
        ValueError: parameters of another dtype or on several devices.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        devices = {p.device for p in self.params.values()}
        if len(devices) > 1 or any(p.dtype != torch.float32 for p in self.params.values()):
            raise ValueError("flat gradients need float32 parameters on one device")
        device = devices.pop() if devices else torch.device("cpu")
        self.numel = sum(p.numel() for p in self.params.values())
        self.buffer = torch.zeros(self.numel + 1, dtype=torch.float32, device=device)

    def attach(self) -> None:
        """Zero the buffer and point every parameter's ``.grad`` at its slice."""
        self.buffer.zero_()
        offset = 0
        for p in self.params.values():
            p.grad = self.buffer[offset: offset + p.numel()].view_as(p)
            offset += p.numel()

    def detach(self) -> None:
        """Set every ``.grad`` back to None (the buffer is kept for the next :meth:`attach`)."""
        for p in self.params.values():
            p.grad = None

    def attached(self) -> bool:
        """True if every parameter's ``.grad`` still views the buffer (e.g. no ``zero_grad(set_to_none=True)``)."""
        offset = 0
        for p in self.params.values():
            g = p.grad
            if g is None or g.data_ptr() != self.buffer[offset:].data_ptr():
                return False
            offset += p.numel()
        return True
