"""The selective phase: score, select, then train through the task's mask (MIST, algorithms.md §4; PIECE,
algorithms.md §13; the gate, algorithms.md §14).

Epoch 1 is a scoring pass without updates (``estimators.py``); the recipe's estimator scores every entry, its scope
and budget (or the gate's) select a mask fixed for the task (``scopes.py``), the end-of-task bookkeeping of
algorithms.md §4.7 runs, and epochs 2..``epochs`` train through a :class:`~models.sparse.plan.GradientPlan` with MIST's
drop, overlap penalty and frozen sets where the recipe has them (:class:`PlanRule`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from models.loop import FlatGradients, Forward
from models.sparse.estimators import scoring_pass
from models.sparse.optim import MaskedStep, step_decay
from models.sparse.plan import GradientPlan
from utils.registry import ESTIMATORS, LOSSES, SCOPES

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

logger = logging.getLogger(__name__)


class PlanRule:
    """The step rule of the sparse epochs: each step draws its keep decisions for the eligible entries only (every
    eligible entry when the recipe has no drop) and masks the flat buffer in place
    (the fast path of algorithms.md §4.6).

    With ``masked`` (the algorithms.md §9.4 fixes, which act per tensor) the plan's per-tensor multipliers go through a
    :class:`~models.sparse.optim.MaskedStep` instead. ``shortfall`` counts the steps whose draws fell short (see
    :meth:`GradientPlan.sample`), on the device.
    """

    def __init__(self, plan: GradientPlan, keep_prob: float, generator: torch.Generator, backbone_numel: int,
                 masked: Optional[MaskedStep] = None) -> None:
        self.plan, self.keep_prob, self.generator, self.backbone_numel = plan, keep_prob, generator, backbone_numel
        self.masked = masked
        self.shortfall = torch.zeros((), dtype=torch.int64, device=plan.device)
        self._idx: Optional[torch.Tensor] = None

    def before_step(self, grads: Sequence[FlatGradients]) -> torch.Tensor:
        """Draw this step's keep decisions and mask the backbone's flat buffer ``grads[0]`` in place (or through
        ``masked``); returns the non-zero backbone gradient entries (0-dim int64 on the device)."""
        positions, short = self.plan.sample(self.keep_prob, self.generator)
        self.shortfall += short
        if self.masked is not None:
            self.masked.keep = lambda: self.plan.dense(positions)
            return self.masked.before_step(grads)
        self._idx, nonzero = self.plan.apply_(grads[0].buffer, positions, self.backbone_numel)
        return nonzero

    def after_step(self, grads: Sequence[FlatGradients]) -> None:
        """Zero the entries the step kept (or let ``masked`` restore and zero) and every other buffer."""
        if self.masked is not None:
            self.masked.after_step(grads)
            return
        self.plan.clear_(grads[0].buffer, self._idx)
        for flat in grads[1:]:  # a CE head's own dense gradients
            flat.buffer.zero_()


class SelectivePhase:
    """One task of a task-level preset, run by a :class:`~models.sparse.tuner.SparseTuner`."""

    def __init__(self, tuner: SparseTuner) -> None:
        self.tuner = tuner

    def run(self, loader: DataLoader, task: TaskView) -> dict[str, Any]:
        """Score, select and train ``task`` (algorithms.md §4, §13, §14); returns its accounting for results.json.

        Raises:
            NonFiniteError: a loss was NaN or infinite.
        """
        tuner, r, t = self.tuner, self.tuner.recipe, task.task_id
        epochs = r.epochs if tuner.cfg.tuning_steps is None else 2  # the scoring pass, then tuning_steps steps
        head = tuner.task_head(loader, task) if r.loss == "ce" else None
        forward = LOSSES.get(r.loss)(tuner, head, task)
        optimizer, scheduler = tuner.make_optimizer(head)
        # Recipe.importance is Optional (per-step recipes have none); this phase runs only when it is set
        estimator = ESTIMATORS.get(r.importance)  # type: ignore[arg-type]
        moments = r.gate or not estimator.mean_squares  # MIST's own pass (algorithms.md §4.4) otherwise, bit for bit
        score_forward = LOSSES.get(r.score_loss)(tuner, head, task) if r.score_loss else forward
        score_loader = tuner.scoring_loader(task) if r.piece_port and tuner.cfg.piece_scoring_batch_size else loader
        sums = scoring_pass(tuner.loop, tuner.network, score_loader, score_forward, tuner.state, moments,
                            where=f"task {t}", of=epochs, scheduler=scheduler, stop=estimator.stop)
        scores = estimator.score(sums, tuner.network, tuner.score_generator)
        mean_gradient = None
        if r.gate:
            mean_gradient = torch.cat([sums.firsts[n].reshape(-1) for n in tuner.candidates()]) / sums.n_batches
        loss = sums.loss
        del sums
        if head is not None:
            head.zero_grad(set_to_none=True)
        logger.info("Task %d, Epoch 1/%d => Loss %.3f", t, epochs, loss)
        # Optional by type, set by construction: with r.gate the tuner has a gate and mean_gradient was computed;
        # without it a selective recipe has a budget
        decision = tuner.gate.decide(mean_gradient) if r.gate else None  # type: ignore[union-attr, arg-type]
        budget = decision.budget if decision is not None else r.budget
        selected, fully_trainable = self.select(scores, budget)  # type: ignore[arg-type]
        plan = tuner.state.plan(selected, tuner.device)  # the task's constants, from the state at its start
        report: dict[str, Any]
        report = {"method": r.preset, "selected_fraction": tuner.backbone_fraction(selected),
                  "selected_fraction_maskable": tuner.backbone_fraction(selected, maskable_only=True),
                  "trainable_fraction": tuner.backbone_fraction(  # selected and not frozen at the task's start
                      {n: selected[n] & ~tuner.state.frozen_mask(n).to(selected[n].device)
                       for n in tuner.backbone_names})}
        if r.scope != "per_tensor":
            report["fully_trainable_tensors"] = fully_trainable
        if decision is not None:
            report["gate"] = decision.to_dict()
            logger.info("Task %d update-magnitude gate: similarity %s, regime %s, budget %g", t,
                        "none" if decision.similarity is None else f"{decision.similarity:.4f}", decision.regime,
                        decision.budget)
        # The end-of-task bookkeeping (algorithms.md §4.7) needs only the scores and the selection, and the plan already
        # holds the task-start state: apply it now so the float scores are released before the sparse epochs.
        if r.freeze or r.overlap:
            tuner.state.end_task(scores, selected, tuner.freeze_quantile, freeze=r.freeze, count=r.overlap)
        del scores, selected
        losses, steps, nonzero, shortfall = [loss], 0, None, None
        if epochs > 1:
            rest, steps, nonzero, shortfall = self.sparse_epochs(loader, plan, optimizer, scheduler, t, forward, head)
            losses.extend(rest)
        tuner.network.eval()
        report.update({
            "updated_fraction_per_step": nonzero / max(steps, 1) / tuner.backbone_numel if steps else 0.0,
            "frozen_entries": tuner.state.frozen_entries(tuner.backbone_names),
            "backbone_entries": tuner.backbone_numel,
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

    def select(self, scores: dict[str, torch.Tensor], budget: float) -> tuple[dict[str, torch.Tensor], int]:
        """The task's selection for every tensor of the sparsity state (the recipe's registered scope), with the
        embeddings the recipe excludes never selected (algorithms.md §13.7), and the number of tensors left fully
        trainable by PIECE's no-selection rule."""
        tuner = self.tuner
        # Recipe.scope is Optional (per-step recipes have none); a selective recipe always has one
        selected, fully_trainable = SCOPES.get(tuner.recipe.scope)(tuner, scores, budget)  # type: ignore[arg-type]
        for name in set(tuner.backbone_names) - set(tuner.candidates()):
            selected[name] = torch.zeros_like(selected[name])
        return selected, fully_trainable

    def sparse_epochs(self, loader: DataLoader, plan: GradientPlan, optimizer: torch.optim.Optimizer,
                      scheduler: Optional[LRScheduler], t: int, forward: Forward, head: Optional[nn.Module] = None
                      ) -> tuple[list[float], int, int, int]:
        """Epochs 2..``epochs`` (algorithms.md §4.6) through the task's plan (:class:`PlanRule`). Losses, non-zero
        counts and the draw check stay on the device and are read once per epoch. A CE ``head`` keeps its own dense
        gradients (a second flat buffer).

        Raises:
            NonFiniteError: a loss of an epoch was NaN or infinite (checked at the end of that epoch).

        Returns:
            (mean loss of each epoch, steps, non-zero backbone gradient entries summed over steps, steps whose draws
            fell short).
        """
        tuner, cfg, epochs = self.tuner, self.tuner.cfg, self.tuner.recipe.epochs
        if cfg.tuning_steps is not None:  # as many epochs as the steps need; the loop stops at the last step
            epochs = 1 + -(-cfg.tuning_steps // max(len(loader), 1))
        keep_prob = cfg.keep_prob if tuner.recipe.drop else 1.0
        params = tuner.named_trainables()
        masked = None
        # an optimizer whose decoupled weight decay must not move unselected entries (SPU's port,
        # algorithms.md §19.6 note 1)
        keep_fixed = getattr(optimizer, "decays_masked_entries", True) is False
        if cfg.sparse_weight_decay or cfg.hard_freeze or keep_fixed:  # the fixes act per tensor (algorithms.md §9.4)
            masked = MaskedStep(params, dict, step_decay(tuner), cfg.sparse_weight_decay, cfg.hard_freeze or keep_fixed,
                                tuner.device)
        rule = PlanRule(plan, keep_prob, tuner.drop_generator, tuner.backbone_numel, masked)
        grads = [FlatGradients(params)] + ([FlatGradients(dict(head.named_parameters()))] if head is not None else [])
        label = "MIST" if tuner.recipe.preset == "mist" else tuner.recipe.preset

        def log(epoch: int, loss: float) -> None:
            logger.info("Task %d, Epoch %d/%d => miLoss %.3f", t, epoch, epochs, loss)

        losses, steps, nonzero = tuner.loop.run(loader, range(2, epochs + 1), forward, optimizer, grads=grads,
                                                rule=rule, scheduler=scheduler, module=tuner.network,
                                                where=f"task {t}", label=label, on_epoch=log,
                                                max_steps=cfg.tuning_steps)
        return losses, steps, int(nonzero), int(rule.shortfall)
