"""The per-step-mask phase: the official CE ablations (algorithms.md §5) and dense CE fine-tuning.

``epochs`` epochs of cross-entropy on a cosine head over the task's new classes (targets y - known; the head's rows
start at zero from task 1 on, random on task 0; its sigma persists across tasks), each step's gradient multiplied by
the mask of the preset's registered ``step_rule`` (none: dense fine-tuning, ``run``/``cerun``/``ce_finetune``).
Of the dense ablations SimpleCIL dispatches only ``run`` and RanPAC only ``cerun``; both dispatch ``rand``, ``l2`` and
``grad`` (see ``models.sparse.tuner_for``).

A step rule is a registered function ``rule(params, generator) -> name -> float32 0/1 multipliers`` over the
parameters that have a gradient this step.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.loop import FlatGradients, TrainAccuracy, cross_entropy
from models.sparse.losses import head_logits
from models.sparse.optim import MaskedStep, step_decay
from utils.registry import STEP_RULES

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

logger = logging.getLogger(__name__)

#: per-step keep ratios of simplecil_mist.py
KEEP_RATIO = {"rand": 0.05, "l2": 0.005, "grad": 0.005}

Masks = dict[str, torch.Tensor]


@STEP_RULES.register("rand")
def random_entries(params: dict[str, nn.Parameter], generator: torch.Generator) -> Masks:
    """Per tensor, a fresh uniformly random max(1, int(0.05 n)) entries."""
    out = {}
    for n, p in params.items():
        k = max(1, int(KEEP_RATIO["rand"] * p.numel()))
        idx = torch.randperm(p.numel(), generator=generator, device=p.device)[:k]
        out[n] = torch.zeros(p.numel(), device=p.device).index_fill_(0, idx, 1.0).view_as(p)
    return out


@STEP_RULES.register("l2")
def largest_weights(params: dict[str, nn.Parameter], generator: torch.Generator) -> Masks:
    """Per tensor, the int(0.005 n) entries of largest |theta| (none if that is 0)."""
    out = {}
    for n, p in params.items():
        k = int(KEEP_RATIO["l2"] * p.numel())
        if k == 0:
            out[n] = torch.zeros_like(p)
        else:
            thr = torch.topk(p.detach().abs().flatten(), k).values[-1]
            out[n] = (p.detach().abs() >= thr).float()
    return out


@STEP_RULES.register("grad")
def largest_gradients(params: dict[str, nn.Parameter], generator: torch.Generator) -> Masks:
    """Globally, the int(0.005 N) entries of largest |g| (none if that is 0)."""
    flat = torch.cat([p.grad.abs().flatten() for p in params.values()])
    k = int(KEEP_RATIO["grad"] * flat.numel())
    if k == 0:
        return {n: torch.zeros_like(p) for n, p in params.items()}
    thr = torch.topk(flat, k).values[-1]
    return {n: (p.grad.abs() >= thr).float() for n, p in params.items()}


class PerStepPhase:
    """One task of a per-step preset, run by a :class:`~models.sparse.tuner.SparseTuner` (its network, optimizer
    factory, random streams, loop)."""

    def __init__(self, tuner: SparseTuner) -> None:
        self.tuner = tuner

    def masks(self, params: dict[str, nn.Parameter]) -> Masks:
        """This step's multipliers for the recipe's ``step_rule`` (empty for dense fine-tuning)."""
        rule = self.tuner.recipe.step_rule
        if rule is None:
            return {}
        return STEP_RULES.get(rule)({n: p for n, p in params.items() if p.grad is not None},
                                    self.tuner.mask_generator)

    def run(self, loader: DataLoader, task: TaskView, head_rows: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Train the task (algorithms.md §5, §9.16, §9.24); returns its accounting for results.json. ``head_rows``: see
        :func:`models.sparse.network.official_head`."""
        tuner, cfg, t = self.tuner, self.tuner.cfg, task.task_id
        epochs = tuner.recipe.epochs
        head = tuner.make_head(task, head_rows)
        new = slice(task.known, task.seen) if head_rows is not None else slice(None)  # CE on the new classes
        optimizer, scheduler = tuner.make_optimizer(head)
        backbone = {n: p for n, p in tuner.network.named_parameters() if n.startswith("convnet.")}
        params = {**backbone, **{f"fc.{n}": p for n, p in head.named_parameters()}}
        rule = MaskedStep(params, lambda: self.masks(params), step_decay(tuner), cfg.sparse_weight_decay,
                          cfg.hard_freeze, tuner.device)
        accuracy = TrainAccuracy(tuner.device)

        def forward(batch):
            targets = batch.y.to(tuner.device, non_blocking=True) - task.known
            logits = head_logits(tuner, head, batch, new)
            accuracy.add(logits, targets)
            return cross_entropy(logits, targets, batch)

        def log(epoch: int, loss: float) -> None:
            logger.info("Task %d, Epoch %d/%d => Loss %.3f, Train_accy %.2f", t, epoch, epochs, loss, accuracy.take())

        losses, steps, nonzero = tuner.loop.run(
            loader, range(1, epochs + 1), forward, optimizer, grads=[FlatGradients(params)], rule=rule,
            scheduler=scheduler, module=tuner.network, where=f"task {t}", label=tuner.policy, on_epoch=log)
        tuner.sigma = float(head.sigma.detach())
        # the learner's old rows after the phase (weight decay and momentum moved them, as in the official fc)
        tuner.trained_rows = head.weight.detach()[: task.known].clone() if head_rows is not None else None
        tuner.network.eval()
        return {"method": tuner.policy,
                "updated_fraction_per_step": float(nonzero) / max(steps, 1) / tuner.backbone_numel if steps else 0.0,
                "backbone_entries": tuner.backbone_numel, "steps": steps, "epoch_losses": losses}
