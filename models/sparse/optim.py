"""Optimizers of the tuning phase (``tuning_optimizer``) and the masked step with the fixes of algorithms.md §9.4.

Each optimizer is a registered function ``make(tuner, head) -> (optimizer, scheduler)``, rebuilt every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from models.loop import FlatGradients
from models.sparse.presets import unread_by_preset
from utils.config import ConfigKeys, config_keys, key
from utils.registry import OPTIMIZERS

if TYPE_CHECKING:  # it imports this module
    from models.sparse.tuner import SparseTuner


@config_keys("Adam tuning optimizer (models/sparse/optim.py)", unused_because=unread_by_preset)
class AdamKeys(ConfigKeys):
    adam_lr: float = key(1e-5, "Adam tuning optimizer: backbone learning rate (PIECE's 1e-5, algorithms.md §13.5).",
                         gt=0)
    adam_head_lr: float = key(1e-3, "Adam tuning optimizer: learning rate of the CE head and projection head.", gt=0)
    mist_lr: Optional[float] = key(
        None, "MIST's SGD (MIST, its ablations, dense CE fine-tuning): backbone learning rate; null: the official "
        "module constant 1e-4 (algorithms.md §4.1).", gt=0)


@dataclass(frozen=True)
class SGDSettings:
    """The optimizer of algorithms.md §4.1, rebuilt every task: SGD with three parameter groups and MultiStepLR.

    The milestones are never reached in 20 epochs, so the learning rates are constant.
    """

    backbone_lr: float = 1e-4
    head_lr: float = 1e-2  # fc and simclr groups
    momentum: float = 0.9
    weight_decay: float = 5e-4  # module constant; the JSON weight_decay is not read (algorithms.md §1.2)
    milestones: tuple[int, ...] = (60, 100, 140)
    gamma: float = 0.1


@dataclass(frozen=True)
class AdamSettings:
    """PIECE's optimizer (algorithms.md §13.4-13.5): Adam, betas (0.9, 0.95), weight decay 0, constant learning rate
    (github wanglingxiang0717/PIECE, training/PIECE/training/main.py and the scripts' ``--weight_decay 0.0``).

    With weight decay 0, an entry whose gradient is always zero keeps zero moments and never moves.
    """

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


def _groups(tuner: SparseTuner, head: Optional[nn.Module], backbone_lr: float, head_lr: float,
            **extra: Any) -> list[dict]:
    """Groups convnet, fc (the CE head, when there is one) and simclr, in the official order."""
    groups = [{"params": list(tuner.network.convnet.parameters()), "lr": backbone_lr, **extra}]
    if head is not None:
        groups.append({"params": list(head.parameters()), "lr": head_lr, **extra})
    groups.append({"params": list(tuner.network.simclr.parameters()), "lr": head_lr, **extra})
    return groups


@OPTIMIZERS.register("mist_sgd")
def mist_sgd(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """algorithms.md §4.1: SGD with groups convnet (lr 1e-4, or ``mist_lr``), fc (lr 1e-2), simclr (lr 1e-2),
    momentum 0.9, weight decay 5e-4 (0 with ``sparse_weight_decay``: the step adds it where an entry may move),
    and MultiStepLR."""
    sgd = tuner.sgd
    wd = 0.0 if tuner.cfg.sparse_weight_decay else sgd.weight_decay
    backbone_lr = sgd.backbone_lr if tuner.cfg.mist_lr is None else tuner.cfg.mist_lr
    optimizer = torch.optim.SGD(_groups(tuner, head, backbone_lr, sgd.head_lr, weight_decay=wd), lr=0.01,
                                momentum=sgd.momentum)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, list(sgd.milestones), gamma=sgd.gamma)


class ClippedAdam(torch.optim.Adam):
    """Adam whose step first scales every gradient of its groups so that their global L2 norm is at most
    ``max_norm`` (``torch.nn.utils.clip_grad_norm_``; DeepSpeed's ``gradient_clipping`` of PIECE's run). The
    gradients are clipped after the step rule masked them, as PIECE's hooks mask them before DeepSpeed clips."""

    def __init__(self, groups: list[dict], max_norm: float, **kw) -> None:
        super().__init__(groups, **kw)
        self.max_norm = max_norm
        self._clipped = [p for g in self.param_groups for p in g["params"]]  # clip_grad_norm_ skips absent grads

    @torch.no_grad()
    # one implementation of Optimizer.step's two overloads (closure None -> None, a closure -> its float loss)
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Clip the global L2 norm of the groups' gradients at ``max_norm``, then take Adam's step (``closure``:
        re-evaluates the loss, as ``torch.optim.Adam.step``; returns its loss or None)."""
        torch.nn.utils.clip_grad_norm_(self._clipped, self.max_norm)
        return super().step(closure)


@OPTIMIZERS.register("adam")
def adam(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """algorithms.md §13.4: Adam with betas (0.9, 0.95), weight decay 0, groups convnet (``adam_lr``), fc and simclr
    (``adam_head_lr``), constant learning rate; with the recipe's ``piece_port`` and ``piece_clip_norm`` > 0, the
    global gradient norm is clipped at ``piece_clip_norm`` before each step (:class:`ClippedAdam`)."""
    settings, cfg = AdamSettings(), tuner.cfg
    groups = _groups(tuner, head, cfg.adam_lr, cfg.adam_head_lr)
    kw = dict(lr=cfg.adam_lr, betas=settings.betas, eps=settings.eps, weight_decay=settings.weight_decay)
    clip = cfg.piece_clip_norm if tuner.recipe.piece_port else 0.0
    optimizer = ClippedAdam(groups, clip, **kw) if clip > 0 else torch.optim.Adam(groups, **kw)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [], gamma=1.0)


class MaskedStep:
    """A step rule (``models.loop``) applying per-entry gradient multipliers, with the fixes of algorithms.md §9.4.

    Before the optimizer step: each gradient is multiplied by its ``keep`` tensor (0 drops an entry; names absent
    keep their full gradient); with ``sparse_weight_decay`` the decay term is added only where the multiplier is
    non-zero; with ``hard_freeze`` every entry whose multiplier is zero is saved, and restored after the step, so
    momentum and weight decay cannot move it (Adam has weight decay 0, so only ``hard_freeze`` acts there).

    Args:
        params: name -> parameter (official names; ``convnet.*`` are the backbone's).
        keep: () -> name -> float multiplier of the gradient's shape, called once per step.
        decay: the optimizer's weight decay (for ``sparse_weight_decay``).
        sparse_weight_decay, hard_freeze: the fixes.
        device: where the non-zero count lives.
    """

    def __init__(self, params: dict[str, nn.Parameter], keep: Callable[[], dict[str, torch.Tensor]], decay: float,
                 sparse_weight_decay: bool, hard_freeze: bool, device: torch.device) -> None:
        self.params, self.keep, self.decay = params, keep, decay
        self.sparse_weight_decay, self.hard_freeze, self.device = sparse_weight_decay, hard_freeze, device
        self._saved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def before_step(self, grads: Sequence[FlatGradients]) -> torch.Tensor:
        """Mask the gradients; returns the backbone gradient entries non-zero after masking (0-dim int64)."""
        keep = self.keep()
        nonzero = torch.zeros((), dtype=torch.int64, device=self.device)
        self._saved = {}
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            if name in keep:
                g.mul_(keep[name])
                if self.sparse_weight_decay:
                    g.add_(p.detach() * (keep[name] != 0), alpha=self.decay)
                if self.hard_freeze:
                    self._saved[name] = (p.detach().clone(), keep[name] == 0)
            elif self.sparse_weight_decay:
                g.add_(p.detach(), alpha=self.decay)
            if name.startswith("convnet."):
                nonzero += torch.count_nonzero(g)
        return nonzero

    def after_step(self, grads: Sequence[FlatGradients]) -> None:
        """Restore the hard-frozen entries and zero the gradient buffers."""
        with torch.no_grad():
            for name, (old, frozen) in self._saved.items():
                self.params[name].copy_(torch.where(frozen, old, self.params[name]))
        self._saved = {}
        for flat in grads:
            flat.buffer.zero_()


def step_decay(tuner: SparseTuner) -> float:
    """The weight decay that ``sparse_weight_decay`` adds by hand: MIST SGD's 5e-4, 0 for any other optimizer."""
    return tuner.sgd.weight_decay if tuner.recipe.optimizer == "mist_sgd" else 0.0
