"""The tuning phase run before each head update, composed from the parts of a :class:`Recipe` (issue 6).

One :class:`SparseTuner` owns the network being tuned (backbone ``convnet`` + the 768->128 projection
head ``simclr``, which persists across tasks), the across-task :class:`SparsityState`, the optimizer and
the random streams, and runs one of two shapes of phase:

- **task-level selection** (MIST, SPEC 4; PIECE-F/S, SPEC 13; update-magnitude control, SPEC 14; MIST with
  random scores): epoch 1 is a scoring pass without updates, the recipe's estimator scores every entry,
  the recipe's scope and budget select a mask fixed for the task, and epochs 2..``mi_epochs`` train through
  a :class:`GradientPlan` (with MIST's drop, overlap penalty and frozen sets where the recipe has them);
- **per-step masks** (the official CE ablations ``rand``, ``l2``, ``grad``, and dense CE fine-tuning
  ``run``/``cerun``/``ce_finetune``, SPEC 5): ``ablation_epochs`` epochs of CE with each step's mask.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.heads import CosineLinear
from models.sparse import importance
from models.sparse.gate import MagnitudeGate
from models.sparse.losses import LossMonitor, SecondViewAugment, supervised_nt_xent, two_views
from models.sparse.masks import (FlatGradients, GradientPlan, SparsityState, is_embedding, select_global,
                                 select_per_block)
from models.sparse.recipes import Recipe, resolve_recipe
from utils import distributed
from utils.config import warn_ignored
from utils.runtime import autocast, make_generator

logger = logging.getLogger(__name__)

PROJECTION_DIM = 128  # simclr head: Linear(D, 128) with bias (SPEC 3.2)


@dataclass(frozen=True)
class SGDSettings:
    """The optimizer of SPEC 4.1, rebuilt every task: SGD with three parameter groups and MultiStepLR.

    The milestones are never reached in 20 epochs, so the learning rates are constant.
    """

    backbone_lr: float = 1e-4
    head_lr: float = 1e-2  # fc and simclr groups
    momentum: float = 0.9
    weight_decay: float = 5e-4  # module constant; the JSON weight_decay is not read (SPEC 1.2)
    milestones: tuple[int, ...] = (60, 100, 140)
    gamma: float = 0.1


@dataclass(frozen=True)
class AdamSettings:
    """PIECE's optimizer (SPEC 13.4-13.5): Adam, betas (0.9, 0.95), weight decay 0, constant learning rate
    (github wanglingxiang0717/PIECE, training/PIECE/training/main.py and the scripts' ``--weight_decay 0.0``).

    With weight decay 0, an entry whose gradient is always zero keeps zero moments and never moves.
    """

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0


class TunedNetwork(nn.Module):
    """``convnet`` (the backbone) + ``simclr`` projection head; parameter names match the official network.

    Args:
        backbone: feature extractor with ``out_dim``.
        proj_dim: projection width (official 128).
        freeze_bn_stats: keep BatchNorm layers in eval mode when the network trains, so their running
            statistics do not move (the official ``network.train()`` updates them; ViTs have none).
    """

    def __init__(self, backbone: nn.Module, proj_dim: int = PROJECTION_DIM, freeze_bn_stats: bool = False) -> None:
        super().__init__()
        self.convnet = backbone
        self.simclr = nn.Linear(int(backbone.out_dim), proj_dim)
        self.freeze_bn_stats = freeze_bn_stats

    def train(self, mode: bool = True) -> "TunedNetwork":
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N,3,H,W) -> projections (N, proj_dim)."""
        return self.simclr(self.convnet(x))


class SparseTuner:
    """The tuning phase, composed from a :class:`Recipe` (``cfg.spr``'s preset with the config's overrides).

    Args:
        cfg: experiment config (``spr`` and the composition keys, ``select_rate``, ``drop_rate``, ``mi_epochs``,
            ``ablation_epochs``, PIECE and gate keys, fix keys).
        backbone: the learner's backbone, tuned in place.
        device: where the network lives.
        seed: run seed; the drop mask, the augmentation, the ablation masks and random scores draw from their own
            generators seeded from it.
        learner_defaults: the learner's ``DEFAULTS`` (``freeze_quantile``).
        sgd: MIST's optimizer settings (official by default; tests use momentum/weight decay 0).
        recipe: the composition; None = :func:`resolve_recipe` of ``cfg``.

    Raises:
        KeyError: ``cfg.spr`` names no preset ("none" builds no tuner: see ``models.sparse.build_tuner``).
    """

    def __init__(self, cfg, backbone: nn.Module, device: torch.device, seed: int,
                 learner_defaults: dict[str, Any], sgd: SGDSettings = SGDSettings(),
                 recipe: Optional[Recipe] = None) -> None:
        self.cfg, self.device, self.sgd, self.seed = cfg, device, sgd, seed
        self.recipe = recipe or resolve_recipe(cfg)
        self._n_items, self._batch_size = 0, 1  # the current task's loader (set by tune)
        self.network = TunedNetwork(backbone, freeze_bn_stats=cfg.freeze_bn_stats).to(device)
        self.state = SparsityState(self.network.named_parameters(), cfg.exempt_rule)
        self.drop_generator = make_generator(seed, device, "drop")
        self.augment = SecondViewAugment(make_generator(seed, device, "augment"))
        self.mask_generator = make_generator(seed, device, "ablation_mask")
        self.score_generator = make_generator(seed, device, "importance")
        self.freeze_quantile = (cfg.freeze_quantile if cfg.freeze_quantile is not None
                                else learner_defaults.get("freeze_quantile", 1.0))
        if self.recipe.optimizer == "mist_sgd":
            warn_ignored("weight_decay", cfg.weight_decay, sgd.weight_decay, "The tuning phase uses the module constant.")
        self.sigma = 1.0  # the CE ablations' cosine-head scale, carried across tasks
        self.trained_rows: Optional[torch.Tensor] = None
        self.gate = (MagnitudeGate(cfg.gate_threshold, cfg.gate_budget_large, cfg.gate_budget_small, cfg.gate_memory,
                                   cfg.gate_ema) if self.recipe.gate else None)
        self.backbone_names = [n for n, _ in self.network.named_parameters() if n.startswith("convnet.")]
        self.backbone_numel = sum(p.numel() for n, p in self.network.named_parameters() if n.startswith("convnet."))
        # the flat gradient layout is the network's parameter order: backbone first, then the projection head
        if list(self.state.shapes)[: len(self.backbone_names)] != self.backbone_names:
            raise RuntimeError("the projection head's parameters must follow the backbone's in the network")

    @property
    def policy(self) -> str:
        """The ``spr`` preset this tuner runs (the report's ``method``)."""
        return self.recipe.preset

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the backbone: projection head, sparsity state, random streams, the CE
        head's sigma and the gate's reference gradient."""
        return {"simclr": self.network.simclr.state_dict(), "sparsity": self.state.state_dict(),
                "generators": {"drop": self.drop_generator.get_state(), "augment": self.augment.generator.get_state(),
                               "ablation_mask": self.mask_generator.get_state(),
                               "importance": self.score_generator.get_state()},
                "sigma": torch.tensor(self.sigma),
                "gate": self.gate.state_dict() if self.gate is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises KeyError/ValueError/RuntimeError when it does not fit."""
        self.network.simclr.load_state_dict(state["simclr"])
        self.state.load_state_dict(state["sparsity"])
        generators = state["generators"]
        self.drop_generator.set_state(generators["drop"])
        self.augment.generator.set_state(generators["augment"])
        self.mask_generator.set_state(generators["ablation_mask"])
        self.score_generator.set_state(generators["importance"])
        self.sigma = float(state["sigma"])
        if (state["gate"] is None) != (self.gate is None):
            raise ValueError("the checkpoint's update-magnitude gate does not match the config's spr")
        if self.gate is not None:
            self.gate.load_state_dict(state["gate"])

    def extra_modules(self) -> list[nn.Module]:
        """Modules besides the backbone whose parameters count in the logged network size."""
        return [self.network.simclr]

    # ---- optimisation ------------------------------------------------------------------------
    def make_optimizer(self, head: Optional[nn.Module] = None):
        """The recipe's optimizer and scheduler.

        ``mist_sgd`` (SPEC 4.1): SGD with groups convnet (lr 1e-4), fc (the CE head, lr 1e-2), simclr (lr 1e-2),
        momentum 0.9, weight decay 5e-4, and MultiStepLR. ``adam`` (SPEC 13.4): Adam with betas (0.9, 0.95),
        weight decay 0, groups convnet (``adam_lr``), fc and simclr (``adam_head_lr``), constant learning rate.
        """
        if self.recipe.optimizer == "adam":
            adam = AdamSettings()
            groups = [{"params": list(self.network.convnet.parameters()), "lr": self.cfg.adam_lr}]
            if head is not None:
                groups.append({"params": list(head.parameters()), "lr": self.cfg.adam_head_lr})
            groups.append({"params": list(self.network.simclr.parameters()), "lr": self.cfg.adam_head_lr})
            optimizer = torch.optim.Adam(groups, lr=self.cfg.adam_lr, betas=adam.betas, eps=adam.eps,
                                         weight_decay=adam.weight_decay)
            return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [], gamma=1.0)
        wd = 0.0 if self.cfg.sparse_weight_decay else self.sgd.weight_decay
        groups = [{"params": list(self.network.convnet.parameters()), "lr": self.sgd.backbone_lr, "weight_decay": wd}]
        if head is not None:
            groups.append({"params": list(head.parameters()), "lr": self.sgd.head_lr, "weight_decay": wd})
        groups.append({"params": list(self.network.simclr.parameters()), "lr": self.sgd.head_lr, "weight_decay": wd})
        optimizer = torch.optim.SGD(groups, lr=0.01, momentum=self.sgd.momentum)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(self.sgd.milestones), gamma=self.sgd.gamma)
        return optimizer, scheduler

    def named_trainables(self, head: Optional[nn.Module] = None) -> dict[str, nn.Parameter]:
        """Official-style names -> parameters: ``convnet.*``, ``simclr.*`` and (ablations) ``fc.*``."""
        params = dict(self.network.named_parameters())
        if head is not None:
            params.update({f"fc.{n}": p for n, p in head.named_parameters()})
        return params

    def step(self, optimizer: torch.optim.Optimizer, params: dict[str, nn.Parameter],
             keep: dict[str, torch.Tensor]) -> torch.Tensor:
        """Apply the per-entry gradient multipliers ``keep`` and take one optimizer step.

        Args:
            optimizer: the task's optimizer.
            params: name -> parameter.
            keep: name -> float multiplier of the gradient's shape (0 drops an entry); names absent keep
                their full gradient.

        Returns:
            0-dim int64 tensor on ``device``: backbone gradient entries that are non-zero after masking
            (summed on the device; callers synchronise once per epoch, not per step).

        With ``sparse_weight_decay`` the decay term is added only where the multiplier is non-zero; with
        ``hard_freeze`` every entry whose multiplier is zero is restored after the step, so momentum and
        weight decay cannot move it (fixes for SPEC 9.4; Adam has weight decay 0, so only ``hard_freeze`` acts).
        """
        decay = self.sgd.weight_decay if self.recipe.optimizer == "mist_sgd" else 0.0
        nonzero = torch.zeros((), dtype=torch.int64, device=self.device)
        saved = {}
        for name, p in params.items():
            g = p.grad
            if g is None:
                continue
            if name in keep:
                g.mul_(keep[name])
                if self.cfg.sparse_weight_decay:
                    g.add_(p.detach() * (keep[name] != 0), alpha=decay)
                if self.cfg.hard_freeze:
                    saved[name] = (p.detach().clone(), keep[name] == 0)
            elif self.cfg.sparse_weight_decay:
                g.add_(p.detach(), alpha=decay)
            if name.startswith("convnet."):
                nonzero += torch.count_nonzero(g)
        optimizer.step()
        with torch.no_grad():
            for name, (old, frozen) in saved.items():
                params[name].copy_(torch.where(frozen, old, params[name]))
        return nonzero

    def _remember_loader(self, loader, task) -> None:
        """The task's item count and global batch size (a torchrun loader yields this rank's share of a batch)."""
        self._n_items = len(task.train)
        self._batch_size = getattr(loader.batch_sampler, "global_batch_size", None) or loader.batch_size

    def _scheduler_step(self, scheduler) -> None:
        with warnings.catch_warnings():  # the scoring pass steps the scheduler without an optimizer step (SPEC 9.7)
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()

    def backbone_fraction(self, masks: dict[str, torch.Tensor], maskable_only: bool = False) -> float:
        """Share of backbone entries that are True in ``masks`` (optionally over non-exempt tensors only)."""
        names = [n for n in self.backbone_names if n in masks and not (maskable_only and self.state.exempt[n])]
        total = sum(masks[n].numel() for n in names)
        return float(sum(int(masks[n].sum()) for n in names) / max(total, 1))

    # ---- losses ------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, step: Optional[int] = None) -> torch.Tensor:
        """MIST's loss: supervised NT-Xent of the projections of (x, aug(x)) (SPEC 4.2-4.3).

        Under torchrun, x and y are this rank's share of global batch ``step`` of the task's loader: the views
        are drawn for the whole batch and the projections of every rank are gathered (differentiably), so each
        rank computes the single-process loss.
        """
        rows = None if step is None else distributed.step_rows(step, self._n_items, self._batch_size)
        views = two_views(x, self.augment, rows)
        with autocast(self.device, self.cfg.precision):
            proj = self.network(views).float()
        if rows is not None:
            counts, n = distributed.shares(rows[1]), x.shape[0]
            proj = torch.cat([distributed.gather_rows(proj[:n], counts), distributed.gather_rows(proj[n:], counts)])
            y = distributed.gather_rows(y, counts)
        return supervised_nt_xent(proj, y, exclude_self_positive=self.cfg.exclude_self_positive)

    def ce_loss(self, head: nn.Module, known: int, x: torch.Tensor, y: torch.Tensor,
                step: Optional[int] = None) -> torch.Tensor:
        """Cross-entropy of ``head`` (a cosine head over the task's classes) on the backbone features; targets
        y - known. Under torchrun the gradient is this rank's part of the global batch's mean (the gradients are
        summed over the ranks, so they are the single-process ones) and the value is the whole batch's mean."""
        _, part, sharded = self._ce(head, x, y - known, step)
        if not sharded:
            return part
        whole = distributed.all_reduce_sum_(part.detach().clone())
        return part + (whole - part.detach())

    def _ce(self, head: nn.Module, x: torch.Tensor, targets: torch.Tensor, step: Optional[int],
            columns: slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Logits ``head(backbone(x))[:, columns]`` (B, C) and their cross-entropy with ``targets`` (B,) int64: the
        batch mean, or under torchrun (``step`` given) this rank's part of the global batch's mean (sum / global
        batch size). Returns (logits, loss, True if the loss is a rank's part)."""
        with autocast(self.device, self.cfg.precision):
            features = self.network.convnet(x).float()
        logits = head(features)[:, columns]
        rows = None if step is None else distributed.step_rows(step, self._n_items, self._batch_size)
        if rows is None:
            return logits, F.cross_entropy(logits, targets), False
        return logits, F.cross_entropy(logits, targets, reduction="sum") / rows[1], True

    # ---- the phase ---------------------------------------------------------------------------
    def tune(self, loader, task, head_rows: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Run the tuning phase of ``task`` on ``loader`` and return its accounting for results.json.

        ``head_rows``: the learner's classifier rows of the classes seen before the task, (known, D) float32, for
        a phase that trains on the learner's own head (SimpleCIL's CE ablations); None otherwise.
        """
        self._remember_loader(loader, task)
        if self.recipe.selective:
            return self._selective_tune(loader, task)
        return self._ce_tune(loader, task, head_rows)

    def _selective_tune(self, loader, task) -> dict[str, Any]:
        """Scoring pass (epoch 1, no update), selection, then epochs 2..``epochs`` through a plan (SPEC 4, 13, 14)."""
        cfg, r, t = self.cfg, self.recipe, task.task_id
        epochs = r.epochs
        head = self._prototype_head(loader, task) if r.loss == "ce" else None
        loss_fn = self.loss if head is None else functools.partial(self.ce_loss, head, task.known)
        optimizer, scheduler = self.make_optimizer(head)
        where = f"task {t}, epoch 1/{epochs}"
        mean_gradient = None
        if r.importance == "mi_fisher" and not r.gate:  # MIST's own pass (SPEC 4.4), bit for bit
            scores, loss = importance.mi_fisher(self.network, loader, len(loader), loss_fn, self.state, self.device,
                                                cfg.progress, where=where)
        else:
            s1, s2, loss = importance.gradient_moments(self.network, loader, len(loader), loss_fn, self.state,
                                                       self.device, cfg.progress, where=where)
            scores = self._scores(s1, s2, len(loader))
            if r.gate:
                names = self._candidates()
                mean_gradient = torch.cat([s1[n].reshape(-1) for n in names]) / len(loader)
            del s1, s2
        if head is not None:
            head.zero_grad(set_to_none=True)
        self._scheduler_step(scheduler)
        logger.info("Task %d, Epoch 1/%d => Loss %.3f", t, epochs, loss)
        decision = self.gate.decide(mean_gradient) if r.gate else None
        budget = decision.budget if decision is not None else r.budget
        selected, fully_trainable = self._select(scores, budget)
        plan = self.state.plan(selected, self.device)  # the task's constants, from the state at its start
        report = {"method": r.preset, "selected_fraction": self.backbone_fraction(selected),
                  "selected_fraction_maskable": self.backbone_fraction(selected, maskable_only=True)}
        if r.scope != "per_tensor":
            report["fully_trainable_tensors"] = fully_trainable
        if decision is not None:
            report["gate"] = decision.to_dict()
            logger.info("Task %d update-magnitude gate: similarity %s, regime %s, budget %g", t,
                        "none" if decision.similarity is None else f"{decision.similarity:.4f}", decision.regime,
                        decision.budget)
        # The end-of-task bookkeeping (SPEC 4.7) needs only the scores and the selection, and the plan already
        # holds the task-start state: apply it now so the float scores are released before the sparse epochs.
        if r.freeze or r.overlap:
            self.state.end_task(scores, selected, self.freeze_quantile, freeze=r.freeze, count=r.overlap)
        del scores, selected
        losses, steps, nonzero, shortfall = [loss], 0, None, None
        if epochs > 1:
            losses_rest, steps, nonzero, shortfall = self._sparse_epochs(loader, plan, optimizer, scheduler, t,
                                                                         loss_fn, head)
            losses.extend(losses_rest)
        self.network.eval()
        report.update({
            "updated_fraction_per_step": nonzero / max(steps, 1) / self.backbone_numel if steps else 0.0,
            "frozen_entries": self.state.frozen_entries(self.backbone_names),
            "backbone_entries": self.backbone_numel,
            "steps": steps,
            "epoch_losses": losses,
        })
        if shortfall:
            logger.warning("Task %d: %d of %d steps drew too few keep decisions; entries after the last draw were "
                           "dropped in those steps.", t, shortfall, steps)
        logger.info("Task %d sparsity: %.4f%% of backbone selected, %.4f%% updated per step, %d frozen entries",
                    t, 100 * report["selected_fraction"], 100 * report["updated_fraction_per_step"],
                    report["frozen_entries"])
        return report

    def _candidates(self) -> list[str]:
        """Backbone tensors that may be selected (all, or all but the embeddings when the recipe excludes them)."""
        return [n for n in self.backbone_names if not (self.recipe.exclude_embeddings and is_embedding(n))]

    def _scores(self, s1: dict[str, torch.Tensor], s2: dict[str, torch.Tensor], n_batches: int
                ) -> dict[str, torch.Tensor]:
        """The recipe's estimator from the pass's gradient sums (``importance.py``), name -> float32 scores."""
        kind = self.recipe.importance
        if kind == "mi_fisher":
            return {n: v / n_batches / n_batches for n, v in s2.items()}
        if kind == "fisher":
            return importance.fisher(s2)
        if kind == "second_order":
            return importance.second_order(s1, s2)
        if kind == "magnitude":
            return importance.magnitude(self.network)
        if kind == "random":
            return importance.random_scores(self.network, self.score_generator)
        raise ValueError(f"unknown importance estimator {kind!r}")

    def _select(self, scores: dict[str, torch.Tensor], budget: float) -> tuple[dict[str, torch.Tensor], int]:
        """The task's selection for every tensor of the state, and the number of tensors left fully trainable by
        PIECE's no-selection rule.

        ``per_tensor``: MIST's quantile rule (SPEC 4.5; exempt tensors full). ``global``: the top
        floor(budget * backbone entries) scores over the candidate tensors (PIECE counts every entry of the
        model in N and zeroes the embedding scores, SPEC 13.3). ``per_block``: see ``select_per_block``.
        For ``global``/``per_block``, a candidate tensor with no selected entry is fully trainable unless
        ``strict_mask`` (PIECE's gradient hook uses ``torch.ones_like(grad)`` when the tensor has no index file:
        github wanglingxiang0717/PIECE, training/PIECE/training/train_base_model.py; SPEC 13.4); the projection
        head is always trainable. Excluded embeddings are never selected (SPEC 13.7).
        """
        r = self.recipe
        candidates = self._candidates()
        excluded = set(self.backbone_names) - set(candidates)
        fully_trainable = 0
        if r.scope == "per_tensor":
            selected = self.state.select(scores, budget)
        else:
            pool = {n: scores[n] for n in candidates}
            if r.scope == "global":
                k = min(int(math.floor(budget * self.backbone_numel)), sum(v.numel() for v in pool.values()))
                picked = select_global(pool, k)
            else:
                picked = select_per_block(pool, budget)
            selected = {}
            for name in self.state.shapes:
                if name in picked:
                    mask = picked[name]
                    if not r.strict_mask and not bool(mask.any()):
                        mask = torch.ones_like(mask)
                        fully_trainable += 1
                    selected[name] = mask
                else:  # the projection head (an excluded tensor is overwritten below)
                    selected[name] = torch.ones(self.state.shapes[name], dtype=torch.bool, device=self.device)
        for name in excluded:
            selected[name] = torch.zeros_like(selected[name])
        return selected, fully_trainable

    @torch.no_grad()
    def _prototype_head(self, loader, task) -> CosineLinear:
        """A cosine head over the task's classes whose rows are their mean features (one pass over ``loader`` in
        eval mode, no gradients): the CE of the ported methods starts from the classifier SimpleCIL would build,
        so its gradients are those of a working head (our choice, docs/deviations.md)."""
        dim, n_new = int(self.network.convnet.out_dim), task.seen - task.known
        sums = torch.zeros(n_new, dim, device=self.device)
        counts = torch.zeros(n_new, device=self.device)
        self.network.eval()
        for _, x, y in distributed.fill_empty(loader):
            with autocast(self.device, self.cfg.precision):
                features = self.network.convnet(x.to(self.device, non_blocking=True)).float()
            rows = y.to(self.device, non_blocking=True) - task.known
            sums.index_add_(0, rows, features)
            counts.index_add_(0, rows, torch.ones_like(rows, dtype=torch.float32))
        if distributed.active():
            distributed.all_reduce_sum_(sums)
            distributed.all_reduce_sum_(counts)
        head = CosineLinear(dim, n_new).to(self.device)
        head.weight.copy_(sums / counts.clamp(min=1.0)[:, None])
        head.sigma.fill_(1.0)
        return head

    def _sparse_epochs(self, loader, plan: GradientPlan, optimizer, scheduler, t: int, loss_fn=None,
                       head: Optional[nn.Module] = None) -> tuple[list[float], int, int, int]:
        """Epochs 2..``epochs`` (SPEC 4.6) with the task's :class:`GradientPlan`.

        Gradients land in one flat buffer; each step draws its keep decisions for the eligible entries only
        (every eligible entry when the recipe has no drop), masks the buffer in place and steps the optimizer.
        Losses, non-zero counts and the draw check stay on the device and are read once per epoch (no host
        synchronisation inside a step). A CE ``head`` keeps its own dense gradients.

        Raises:
            NonFiniteError: a loss of an epoch was NaN or infinite (checked at the end of that epoch).

        Returns:
            (mean loss of each epoch, steps, non-zero backbone gradient entries summed over steps,
            steps whose draws fell short, see :meth:`GradientPlan.sample`).
        """
        cfg, epochs, dev = self.cfg, self.recipe.epochs, self.device
        loss_fn = loss_fn or self.loss
        keep_prob = cfg.keep_prob if self.recipe.drop else 1.0
        params = self.named_trainables()
        flat = FlatGradients(params)
        dense = cfg.sparse_weight_decay or cfg.hard_freeze  # the fixes act per tensor (SPEC 9.4)
        counters = torch.zeros(2, dtype=torch.int64, device=dev)  # non-zero entries, short draws
        losses, steps = [], 0
        label = "MIST" if self.recipe.preset == "mist" else self.recipe.preset
        flat.attach()
        for epoch in range(2, epochs + 1):
            self.network.train()
            monitor = LossMonitor(dev, f"task {t}, epoch {epoch}/{epochs}")
            for step, (_, x, y) in enumerate(tqdm(distributed.fill_empty(loader), desc=f"{label} epoch {epoch}/{epochs}",
                                                  total=len(loader), leave=False, disable=not cfg.progress)):
                loss = loss_fn(x.to(dev, non_blocking=True), y.to(dev, non_blocking=True), step)
                loss.backward()
                distributed.all_reduce_sum_(flat.buffer)  # torchrun: the single-process gradient on every rank
                if head is not None and distributed.active():
                    for p in head.parameters():
                        distributed.all_reduce_sum_(p.grad)
                positions, short = plan.sample(keep_prob, self.drop_generator)
                if dense:
                    counters[0] += self.step(optimizer, params, plan.dense(positions))
                    flat.buffer.zero_()
                else:
                    idx, nonzero = plan.apply_(flat.buffer, positions, self.backbone_numel)
                    optimizer.step()
                    plan.clear_(flat.buffer, idx)
                    counters[0] += nonzero
                if head is not None:
                    head.zero_grad(set_to_none=True)
                counters[1] += short
                monitor.add(loss)
                steps += 1
            self._scheduler_step(scheduler)
            losses.append(monitor.mean(len(loader)))
            logger.info("Task %d, Epoch %d/%d => miLoss %.3f", t, epoch, epochs, losses[-1])
        if not flat.attached():
            raise RuntimeError("the flat gradient buffer was detached during the sparse epochs")
        flat.detach()
        nonzero, short = (int(v) for v in counters.tolist())
        return losses, steps, nonzero, short

    # ---- the official CE ablations (per-step masks, SPEC 5) -----------------------------------
    #: per-step keep ratios of simplecil_mist.py
    KEEP_RATIO = {"rand": 0.05, "l2": 0.005, "grad": 0.005}

    def make_head(self, task, head_rows: Optional[torch.Tensor] = None) -> CosineLinear:
        """The cosine head the CE ablations are computed on (official ``update_fc``, SPEC 3.2, 5).

        Without ``head_rows``: a head over the task's new classes. With them (SimpleCIL): the learner's full
        head over every seen class, rows [0, known) holding ``head_rows`` (the class prototypes) and the new
        rows zero from task 1 on (random on task 0), as the official ``fc``; the CE then uses the new-class
        logits only, and every mask budget counts the whole tensor.
        """
        dim = int(self.network.convnet.out_dim)
        full = head_rows is not None
        head = CosineLinear(dim, task.seen if full else task.seen - task.known).to(self.device)
        with torch.no_grad():
            if task.task_id > 0 and not self.cfg.ablation_random_init_rows:
                head.weight.zero_()  # official update_fc: new rows are zeros (SPEC 9.24)
            if full:
                head.weight[: task.known] = head_rows.to(self.device)
            head.sigma.fill_(self.sigma)
        return head

    def masks(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """This step's 0/1 gradient multipliers for the recipe's ``step_rule`` (empty dict for dense fine-tuning).

        - ``rand``: per tensor, a fresh uniformly random max(1, int(0.05 n)) entries;
        - ``l2``: per tensor, the int(0.005 n) entries of largest |theta| (none if that is 0);
        - ``grad``: globally, the int(0.005 N) entries of largest |g| (none if that is 0).
        """
        rule = self.recipe.step_rule
        with_grad = {n: p for n, p in params.items() if p.grad is not None}
        if rule == "rand":
            out = {}
            for n, p in with_grad.items():
                k = max(1, int(self.KEEP_RATIO["rand"] * p.numel()))
                idx = torch.randperm(p.numel(), generator=self.mask_generator, device=self.device)[:k]
                out[n] = torch.zeros(p.numel(), device=self.device).index_fill_(0, idx, 1.0).view_as(p)
            return out
        if rule == "l2":
            out = {}
            for n, p in with_grad.items():
                k = int(self.KEEP_RATIO["l2"] * p.numel())
                if k == 0:
                    out[n] = torch.zeros_like(p)
                else:
                    thr = torch.topk(p.detach().abs().flatten(), k).values[-1]
                    out[n] = (p.detach().abs() >= thr).float()
            return out
        if rule == "grad":
            flat = torch.cat([p.grad.abs().flatten() for p in with_grad.values()])
            k = int(self.KEEP_RATIO["grad"] * flat.numel())
            if k == 0:
                return {n: torch.zeros_like(p) for n, p in with_grad.items()}
            thr = torch.topk(flat, k).values[-1]
            return {n: (p.grad.abs() >= thr).float() for n, p in with_grad.items()}
        return {}

    def _ce_tune(self, loader, task, head_rows: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """The CE presets (SPEC 5, 9.16, 9.24): ``epochs`` epochs of cross-entropy on a cosine head over the task's
        new classes (targets y - known; the head's rows start at zero from task 1 on, random on task 0; its sigma
        persists), each step masked by :meth:`masks`. ``run``/``cerun``/``ce_finetune`` are dense fine-tuning
        (SimpleCIL dispatches only ``run``, RanPAC only ``cerun``: see ``models.sparse.tuner_for``)."""
        cfg, t, epochs = self.cfg, task.task_id, self.recipe.epochs
        head = self.make_head(task, head_rows)
        new = slice(task.known, task.seen) if head_rows is not None else slice(None)  # CE on the new classes
        optimizer, scheduler = self.make_optimizer(head)
        params = self.named_trainables(head)
        losses, nonzero, steps = [], 0, 0
        for epoch in range(1, epochs + 1):
            self.network.train()
            monitor = LossMonitor(self.device, f"task {t}, epoch {epoch}/{epochs}")
            correct = torch.zeros((), dtype=torch.int64, device=self.device)
            seen = 0
            for step, (_, x, y) in enumerate(tqdm(distributed.fill_empty(loader), total=len(loader),
                                                  desc=f"{self.policy} epoch {epoch}/{epochs}", leave=False,
                                                  disable=not cfg.progress)):
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True) - task.known
                # torchrun: this rank's part of the global batch's mean; gradients summed over ranks below
                logits, loss, sharded = self._ce(head, x, y, step, new)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sharded:
                    for p in params.values():
                        if p.grad is not None:
                            distributed.all_reduce_sum_(p.grad)
                    loss = distributed.all_reduce_sum_(loss.detach().clone())
                nonzero = nonzero + self.step(optimizer, params, self.masks(params))
                monitor.add(loss)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                steps += 1
            self._scheduler_step(scheduler)
            losses.append(monitor.mean(len(loader)))
            if distributed.active():
                counts = distributed.all_reduce_sum_(torch.stack([correct, torch.tensor(seen, device=self.device)]))
                correct, seen = counts[0], int(counts[1])
            logger.info("Task %d, Epoch %d/%d => Loss %.3f, Train_accy %.2f", t, epoch, epochs, losses[-1],
                        100.0 * int(correct) / max(seen, 1))
        self.sigma = float(head.sigma.detach())
        # the learner's old rows after the phase (weight decay and momentum moved them, as in the official fc)
        self.trained_rows = head.weight.detach()[: task.known].clone() if head_rows is not None else None
        self.network.eval()
        return {"method": self.policy,
                "updated_fraction_per_step": float(nonzero) / max(steps, 1) / self.backbone_numel if steps else 0.0,
                "backbone_entries": self.backbone_numel, "steps": steps, "epoch_losses": losses}
