"""SparCL, Sparse Continual Learning (Wang et al., NeurIPS 2022), as a preset with re-selection inside a task
(algorithms.md §19.4, "Port preset").

Official code: github neu-spiral/SparCL (``retrain.py``, ``utils_pr.py``,
``main_sparse_train_w_data_gradient_efficient.py``); its port for pre-trained transformers in github wx-zhang/spu
(``trainer/sparsecl.py``). Per task, over the phase's ``mi_epochs`` epochs (0-based epoch e):

- **scope**: every weight matrix of the backbone outside the embeddings (a ViT's attention and MLP weights, a CNN's
  conv and linear weights); every other tensor is frozen;
- **task-aware dynamic masking** at every e with e % 5 == 0, per tensor: importance |w| + 0.5 |g| (g: the masked
  gradient of the previous step, none at the task's first update), keep the top ``int((1 - p) numel)`` (prune to
  sparsity p), then regrow uniformly at random among the other entries until the density is 1 - q (the schedule of
  the pre-trained port: e < 5 gives (p, q) = (0.96, 0.95), i.e. 4% by importance and 1% at random; from e = 5 on
  (0.95, 0.95), no regrowth);
- **training**: the gradient masked every step, AdamW (lr 5e-6, weight decay 0.2, betas 0.9/0.999), weight decay kept
  off the masked entries (they stay bit-identical), CE on the task's fixed prototype cosine head at CLIP's logit
  scale 100 (the pre-trained port trains CLIP's contrastive loss at that scale). Weights are never zeroed (the
  pre-trained port's gradient masks).

The regrowth draws from the run's ``sparcl`` random stream (saved in checkpoints). Differences from both official
codes are in docs/deviations.md section 6.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from models.loop import FlatGradients
from models.sparse.optim import MaskedStep
from models.sparse.presets import register_preset, unread_by_preset
from models.sparse.scopes import is_embedding
from models.sparse.spu import CLIP_LOGIT_SCALE
from utils.config import ConfigKeys, config_keys, key
from utils.registry import LOSSES, OPTIMIZERS, PHASES
from utils.runtime import make_generator

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

logger = logging.getLogger(__name__)

UPDATE_EVERY = 5  # sp_mask_update_freq
GRAD_WEIGHT = 0.5  # --sp-lmd
#: (first epoch, prune-to sparsity p, grow-to sparsity q) of wx-zhang/spu trainer/sparsecl.py's effective schedule
SCHEDULE = ((0, 0.96, 0.95), (5, 0.95, 0.95))


@config_keys("SparCL preset (models/sparse/sparcl.py)", unused_because=unread_by_preset)
class SparclKeys(ConfigKeys):
    sparcl_lr: float = key(5e-6, "sparcl: AdamW learning rate (the pre-trained port's 5e-6; algorithms.md §19.4).",
                           gt=0)
    sparcl_weight_decay: float = key(0.2, "sparcl: AdamW weight decay on the entries the mask lets move.", ge=0)


def sparsity_at(epoch: int) -> tuple[float, float]:
    """(p, q) of the schedule at 0-based phase epoch ``epoch`` (:data:`SCHEDULE`)."""
    p, q = SCHEDULE[0][1:]
    for first, prune, grow in SCHEDULE:
        if epoch >= first:
            p, q = prune, grow
    return p, q


def prune_and_regrow(weight: torch.Tensor, grad: Optional[torch.Tensor], p: float, q: float,
                     generator: torch.Generator) -> torch.Tensor:
    """One tensor's mask (bool, ``weight``'s shape): the top ``int((1 - p) n)`` of |w| + 0.5 |g| (``torch.topk``;
    |w| alone without ``grad``), then ``int((1 - q) n)`` minus that many other entries drawn uniformly at random
    without replacement from ``generator`` (on the weight's device). Raises ValueError unless 0 <= q <= p <= 1."""
    if not 0.0 <= q <= p <= 1.0:
        raise ValueError(f"SparCL needs 0 <= q <= p <= 1, got p={p}, q={q}")
    n = weight.numel()
    importance = weight.detach().abs().reshape(-1).float()
    if grad is not None:
        importance = importance + GRAD_WEIGHT * grad.detach().abs().reshape(-1).float()
    keep = int((1.0 - p) * n)
    mask = torch.zeros(n, dtype=torch.bool, device=weight.device)
    if keep:
        mask[torch.topk(importance, keep).indices] = True
    grow = int((1.0 - q) * n) - keep
    if grow > 0:
        free = torch.nonzero(~mask).squeeze(1)
        order = torch.randperm(free.numel(), generator=generator, device=free.device)
        mask[free[order[:grow]]] = True
    return mask.view(weight.shape)


class DynamicMaskRule(MaskedStep):
    """The masked step with ``hard_freeze`` over the current flat mask (views of it, so a re-selection in place
    needs no new rule): masked entries stay bit-identical under AdamW's decoupled decay; the masked gradient of each
    step is kept for the next prune (``last``, flat)."""

    def __init__(self, params: dict[str, nn.Parameter], mask: torch.Tensor) -> None:
        views, offset = {}, 0
        for name, p in params.items():
            views[name] = mask[offset: offset + p.numel()].view_as(p)
            offset += p.numel()
        super().__init__(params, lambda: views, 0.0, sparse_weight_decay=False, hard_freeze=True, device=mask.device)
        self.mask = mask
        self.last: Optional[torch.Tensor] = None

    def before_step(self, grads: Sequence[FlatGradients]) -> torch.Tensor:
        nonzero = super().before_step(grads)
        self.last = grads[0].buffer[: self.mask.numel()].clone()
        return nonzero


def in_scope(name: str, param: torch.Tensor) -> bool:
    """SparCL's scope: a weight of 2 or more dimensions of the backbone outside the embeddings."""
    return name.startswith("convnet.") and name.endswith("weight") and param.ndim >= 2 and not is_embedding(name)


class DynamicSparsePhase:
    """One task of SparCL (see the module docstring)."""

    def __init__(self, tuner: SparseTuner) -> None:
        self.tuner = tuner

    def generator(self) -> torch.Generator:
        """The run's ``sparcl`` random stream on the tuner's device, at the state the last task left in
        ``phase_state`` (fresh on the first task)."""
        tuner = self.tuner
        gen = make_generator(tuner.seed, tuner.device, "sparcl")
        if "sparcl_generator" in tuner.phase_state:
            gen.set_state(tuner.phase_state["sparcl_generator"])
        return gen

    def run(self, loader: DataLoader, task: TaskView) -> dict[str, Any]:
        """Train ``task`` with the mask re-selected every 5 epochs (algorithms.md §19.4); returns its accounting for
        results.json and stores the random stream's state in ``phase_state``.

        Raises:
            NonFiniteError: a loss was NaN or infinite.
        """
        tuner, t = self.tuner, task.task_id
        epochs = tuner.recipe.epochs
        head = tuner.task_head(loader, task)
        head.requires_grad_(False)
        forward = LOSSES.get("ce")(tuner, head, task)
        backbone = {n: p for n, p in tuner.network.named_parameters() if n.startswith("convnet.")}
        optimizer, _ = tuner.make_optimizer()
        generator = self.generator()
        mask = torch.zeros(sum(p.numel() for p in backbone.values()), device=tuner.device)
        rule = DynamicMaskRule(backbone, mask)
        losses, steps, densities = [], 0, []
        for e in range(epochs):
            if e % UPDATE_EVERY == 0:
                self.reselect(backbone, rule, e, generator)
                densities.append(float(mask.sum()) / tuner.backbone_numel)
            part, n, _ = tuner.loop.run(loader, [e + 1], forward, optimizer, grads=[FlatGradients(backbone)],
                                        rule=rule, module=tuner.network, where=f"task {t}", of=epochs,
                                        label="SparCL")
            losses.extend(part)
            steps += n
            logger.info("Task %d, SparCL epoch %d/%d => Loss %.3f, density %.4f", t, e + 1, epochs, part[0],
                        densities[-1])
        tuner.phase_state["sparcl_generator"] = generator.get_state()
        tuner.network.eval()
        return {"method": tuner.policy, "steps": steps, "epoch_losses": losses,
                "backbone_entries": tuner.backbone_numel, "selected_fraction": densities[-1],
                "trainable_fraction_per_update": densities}

    def reselect(self, backbone: dict[str, nn.Parameter], rule: DynamicMaskRule, epoch: int,
                 generator: torch.Generator) -> None:
        """Rebuild ``rule.mask`` in place (:func:`prune_and_regrow` per tensor in scope, zero elsewhere)."""
        p, q = sparsity_at(epoch)
        offset = 0
        for name, param in backbone.items():
            part = rule.mask[offset: offset + param.numel()]
            if in_scope(name, param):
                grad = None if rule.last is None else rule.last[offset: offset + param.numel()].view_as(param)
                part.copy_(prune_and_regrow(param, grad, p, q, generator).reshape(-1).float())
            else:
                part.zero_()
            offset += param.numel()


@OPTIMIZERS.register("sparcl_adamw")
def sparcl_adamw(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, None]:
    """SparCL's pre-trained port: AdamW (betas 0.9/0.999, eps 1e-8) at ``sparcl_lr`` over the backbone, weight decay
    ``sparcl_weight_decay`` (the phase keeps it off the masked entries), constant learning rate (no scheduler).
    ``head`` is not trained."""
    cfg = tuner.cfg
    optimizer = torch.optim.AdamW(list(tuner.network.convnet.parameters()), lr=cfg.sparcl_lr, betas=(0.9, 0.999),
                                  eps=1e-8, weight_decay=cfg.sparcl_weight_decay)
    return optimizer, None


PHASES.register("sparcl", DynamicSparsePhase)
register_preset("sparcl", phase="sparcl", loss="ce", importance=None, scope=None, step_rule=None,
                optimizer="sparcl_adamw", drop=False, overlap=False, freeze=False, exclude_embeddings=True,
                strict_mask=True, gate=False, head="prototypes", head_scale=CLIP_LOGIT_SCALE, budget_key=None,
                epochs_key="mi_epochs",
                label="SparCL", order=97, keys=("sparcl_lr", "sparcl_weight_decay"), compare=True,
                source="SparCL (github neu-spiral/SparCL; port wx-zhang/spu trainer/sparsecl.py), algorithms.md §19.4",
                lr_key="sparcl_lr")
