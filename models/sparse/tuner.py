"""The tuning phase run before a learner's own training and head update, composed from a :class:`Recipe`.

One :class:`SparseTuner` owns what persists across tasks: the network being tuned (backbone ``convnet`` + the
768->128 projection head ``simclr``), the :class:`SparsityState`, the random streams, the CE head's sigma and the
gate's memory. Each task it runs one of two phases through the project's :class:`~models.loop.TuningLoop`:

- :class:`~models.sparse.selective.SelectivePhase` (task-level selection: MIST, PIECE-F/S, the gate, MIST with
  random scores);
- :class:`~models.sparse.per_step.PerStepPhase` (the official CE ablations and dense CE fine-tuning).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset

from models.heads import CosineLinear, timm_linear_head
from models.loop import TuningLoop, cross_entropy
from models.sparse.gate import MagnitudeGate
from models.sparse.losses import SecondViewAugment, contrastive_loss, head_logits
from models.sparse.masks import SparsityState
from models.sparse.network import TunedNetwork, official_head, prototype_head
from models.sparse.optim import SGDSettings
from models.sparse.per_step import PerStepPhase
from models.sparse.presets import Recipe, resolve_recipe
from models.sparse.sanity import canonical, check_tuning_config
from models.sparse.scopes import is_embedding
from models.sparse.selective import SelectivePhase
from utils.config import ExperimentConfig, warn_ignored
from utils.loaders import Batch, make_loader
from utils.registry import OPTIMIZERS, PHASES
from utils.runtime import make_generator

logger = logging.getLogger(__name__)

#: the tuner's random streams (``utils.runtime.make_generator`` names), saved in checkpoints
STREAMS = ("drop", "augment", "ablation_mask", "importance")

#: MIST's official optimizer settings, the default of :class:`SparseTuner`'s ``sgd`` (a frozen dataclass, shared)
OFFICIAL_SGD = SGDSettings()


class TaskView(Protocol):
    """What the tuning phase reads of a task (type only): :class:`models.base.TaskData` has it, a module this package
    may not import (the learners build the tuner).

    Attributes:
        task_id: 0-based task index.
        known, seen: the task's classes are ``[known, seen)``.
        train_eval: the task's training images with test transforms (PIECE's scoring data).
    """

    task_id: int
    known: int
    seen: int
    train_eval: Dataset


class SparseTuner:
    """The tuning phase, composed from a :class:`Recipe` (``cfg.spr``'s preset with the config's overrides).

    Args:
        cfg: experiment config (``spr`` and the composition keys, the presets' keys, fix keys, ``progress``).
        backbone: the learner's backbone, tuned in place.
        device: where the network lives.
        seed: run seed; the drop mask, the augmentation, the ablation masks and random scores draw from their own
            named generators seeded from it.
        learner_defaults: the learner's ``DEFAULTS`` (``freeze_quantile``).
        sgd: MIST's optimizer settings (official by default; tests use momentum/weight decay 0).
        recipe: the composition; None = :func:`resolve_recipe` of ``cfg``.

    Raises:
        ConfigError: ``cfg.spr`` names no registered preset ("none" builds no tuner: see ``models.sparse.build_tuner``).
    """

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int,
                 learner_defaults: dict[str, Any], sgd: SGDSettings = OFFICIAL_SGD,
                 recipe: Optional[Recipe] = None) -> None:
        self.cfg, self.device, self.sgd, self.seed = cfg, device, sgd, seed
        self.recipe = recipe or canonical(resolve_recipe(cfg), cfg)
        self.loop = TuningLoop(device, cfg.progress, phase="tuning")
        self.network = TunedNetwork(backbone, freeze_bn_stats=cfg.freeze_bn_stats).to(device)
        self.state = SparsityState(self.network.named_parameters(), cfg.exempt_rule)
        self.generators = {name: make_generator(seed, device, name) for name in STREAMS}
        self.drop_generator, self.mask_generator = self.generators["drop"], self.generators["ablation_mask"]
        self.score_generator = self.generators["importance"]
        self.augment = SecondViewAugment(self.generators["augment"])
        self.freeze_quantile = (cfg.freeze_quantile if cfg.freeze_quantile is not None
                                else learner_defaults.get("freeze_quantile", 1.0))
        if self.recipe.optimizer == "mist_sgd":
            warn_ignored("weight_decay", cfg.weight_decay, sgd.weight_decay,
                         "The tuning phase uses the module constant.")
        self.sigma = 1.0  # the CE ablations' cosine-head scale, carried across tasks
        self.trained_rows: Optional[torch.Tensor] = None
        #: what a registered phase keeps across tasks (SPG's soft mask, SparCL's stream): name -> tensor, saved
        #: in checkpoints
        self.phase_state: dict[str, torch.Tensor] = {}
        self.gate = (MagnitudeGate(cfg.gate_threshold, cfg.gate_budget_large, cfg.gate_budget_small, cfg.gate_memory,
                                   cfg.gate_ema) if self.recipe.gate else None)
        self.backbone_names = [n for n, _ in self.network.named_parameters() if n.startswith("convnet.")]
        self.backbone_numel = sum(p.numel() for n, p in self.network.named_parameters() if n.startswith("convnet."))
        # the flat gradient layout is the network's parameter order: backbone first, then the projection head
        if list(self.state.shapes)[: len(self.backbone_names)] != self.backbone_names:
            raise RuntimeError("the projection head's parameters must follow the backbone's in the network")
        candidate_numel = sum(self.state.shapes[n].numel() for n in self.candidates())
        check_tuning_config(cfg, self.recipe, self.backbone_numel, candidate_numel, self.freeze_quantile)

    @property
    def policy(self) -> str:
        """The ``spr`` preset this tuner runs (the report's ``method``)."""
        return self.recipe.preset

    def tune(self, loader: DataLoader, task: TaskView, head_rows: Optional[torch.Tensor] = None) -> dict[str, Any]:
        """Run the tuning phase of ``task`` on ``loader`` and return its accounting for results.json.

        ``head_rows``: the learner's classifier rows of the classes seen before the task, (known, D) float32, for a
        phase that trains on the learner's own head (SimpleCIL's CE ablations); None otherwise.
        """
        before = [p.detach().clone() for n, p in self.network.named_parameters() if n.startswith("convnet.")]
        if self.recipe.phase is not None:
            report = PHASES.get(self.recipe.phase)(self).run(loader, task)
        elif self.recipe.selective:
            report = SelectivePhase(self).run(loader, task)
        else:
            report = PerStepPhase(self).run(loader, task, head_rows)
        report.update(self.movement(before))
        return report

    @torch.no_grad()
    def movement(self, before: list[torch.Tensor]) -> dict[str, float]:
        """How far the phase moved the backbone from ``before`` (its tensors at the task's start, in parameter order):
        ``moved_fraction`` (share of entries whose value changed) and ``relative_change`` (||theta - theta_0|| /
        ||theta_0||, float64 sums)."""
        after = [p.detach() for n, p in self.network.named_parameters() if n.startswith("convnet.")]
        moved = sum(int((a != b).sum()) for a, b in zip(after, before))
        delta = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(after, before))
        norm = sum(float(b.double().pow(2).sum()) for b in before)
        return {"moved_fraction": moved / max(self.backbone_numel, 1),
                "relative_change": (delta / norm) ** 0.5 if norm > 0 else 0.0}

    # ---- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs besides the backbone: projection head, sparsity state, random streams, the CE
        head's sigma, the gate's reference gradient and a registered phase's ``phase_state``."""
        return {"simclr": self.network.simclr.state_dict(), "sparsity": self.state.state_dict(),
                "phase": {k: v.clone() for k, v in self.phase_state.items()},
                "generators": {name: gen.get_state() for name, gen in self.generators.items()},
                "sigma": torch.tensor(self.sigma),
                "gate": self.gate.state_dict() if self.gate is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises KeyError/ValueError/RuntimeError when it does not fit."""
        self.network.simclr.load_state_dict(state["simclr"])
        self.state.load_state_dict(state["sparsity"])
        self.phase_state = {k: v.clone() for k, v in state.get("phase", {}).items()}
        for name, gen in self.generators.items():
            gen.set_state(state["generators"][name])
        self.sigma = float(state["sigma"])
        if (state["gate"] is None) != (self.gate is None):
            raise ValueError("the checkpoint's update-magnitude gate does not match the config's spr")
        if self.gate is not None:
            self.gate.load_state_dict(state["gate"])

    def extra_modules(self) -> list[nn.Module]:
        """Modules besides the backbone whose parameters count in the logged network size."""
        return [self.network.simclr]

    # ---- parts the phases share ----------------------------------------------------------------
    def make_optimizer(self, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, Optional[LRScheduler]]:
        """The recipe's registered optimizer and scheduler (``optim.py``), over convnet, the CE head and simclr; the
        scheduler is None for an optimizer without one (SPG, SparCL)."""
        return OPTIMIZERS.get(self.recipe.optimizer)(self, head)

    def named_trainables(self, head: Optional[nn.Module] = None) -> dict[str, nn.Parameter]:
        """Official-style names -> parameters: ``convnet.*``, ``simclr.*`` and (ablations) ``fc.*``."""
        params = dict(self.network.named_parameters())
        if head is not None:
            params.update({f"fc.{n}": p for n, p in head.named_parameters()})
        return params

    def candidates(self) -> list[str]:
        """Backbone tensors that may be selected (all, or all but the embeddings when the recipe excludes them)."""
        return [n for n in self.backbone_names if not (self.recipe.exclude_embeddings and is_embedding(n))]

    def backbone_fraction(self, masks: dict[str, torch.Tensor], maskable_only: bool = False) -> float:
        """Share of backbone entries that are True in ``masks`` (optionally over non-exempt tensors only)."""
        names = [n for n in self.backbone_names if n in masks and not (maskable_only and self.state.exempt[n])]
        total = sum(masks[n].numel() for n in names)
        return float(sum(int(masks[n].sum()) for n in names) / max(total, 1))

    def loss(self, x: torch.Tensor, y: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """MIST's contrastive loss of a batch (``losses.contrastive_loss``); ``rows``: see ``utils.runtime.Batch``."""
        return contrastive_loss(self, Batch(torch.arange(len(y)), x, y, rows))

    def ce_loss(self, head: nn.Module, known: int, x: torch.Tensor, y: torch.Tensor,
                rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Cross-entropy of ``head`` on the backbone features of x, targets y - known
        (``models.loop.cross_entropy``)."""
        batch = Batch(torch.arange(len(y)), x, y, rows)
        return cross_entropy(head_logits(self, head, batch), y.to(self.device) - known, batch)

    def prototype_head(self, loader: DataLoader, task: TaskView) -> CosineLinear:
        """A cosine head over the task's classes whose rows are their class means (``network.prototype_head``)."""
        return prototype_head(self.network, loader, task, self.device, self.cfg.precision)

    def task_head(self, loader: DataLoader, task: TaskView) -> nn.Module:
        """The CE head a ported method trains on for ``task``, as the recipe's ``head`` says: ``"prototypes"``, the
        class means of ``loader`` (:meth:`prototype_head`) with sigma = ``head_scale`` (1 when None); ``"timm_linear"``
        (:func:`models.heads.timm_linear_head`) or ``"linear"`` (``nn.Linear``'s own init), a new linear classifier
        over the task's classes drawn from the global torch generator on the CPU, as the official heads are built.

        Returns:
            a module mapping features (B, D) float32 to logits (B, seen - known).
        """
        kind, n_new, dim = self.recipe.head, task.seen - task.known, int(self.network.convnet.out_dim)
        if kind == "timm_linear":
            return timm_linear_head(dim, n_new, self.device)
        if kind == "linear":
            return nn.Linear(dim, n_new).to(self.device)
        head = self.prototype_head(loader, task)
        if self.recipe.head_scale is not None:
            with torch.no_grad():
                head.sigma.fill_(self.recipe.head_scale)
        return head

    def scoring_loader(self, task: TaskView) -> DataLoader:
        """PIECE's scoring data (algorithms.md §13.5): the task's un-augmented training images (``task.train_eval``) in
        order, in batches of ``piece_scoring_batch_size`` (shared out per global batch under torchrun, as training
        batches). Its own generator (stream "scoring") draws the loader's per-epoch seed, so the run's other streams do
        not shift."""
        return make_loader(task.train_eval, self.cfg.piece_scoring_batch_size, False, self.cfg.num_workers,
                           make_generator(self.seed, "cpu", "scoring"), pin_memory=self.device.type == "cuda",
                           run_seed=self.seed, shard="batch")

    def make_head(self, task: TaskView, head_rows: Optional[torch.Tensor] = None) -> CosineLinear:
        """The CE ablations' head (``network.official_head``), with the sigma carried across tasks."""
        return official_head(int(self.network.convnet.out_dim), task, self.sigma, self.device,
                             self.cfg.ablation_random_init_rows, head_rows)
