"""The tuning phase as a composition of named parts, and the ``spr`` presets built from them (issue 6).

A :class:`Recipe` names every part of a tuning phase:

- **importance estimator** (task-level presets): ``mi_fisher`` (MIST, SPEC 4.4: sum_b g_b^2 / n_b^2),
  ``fisher`` (PIECE-F, SPEC 13.2: S2 = sum_b g_b^2), ``second_order`` (PIECE-S: |S1| / sqrt(S2 + 1) with
  S1 = sum_b g_b), ``magnitude`` (|theta| at the task's start), ``random`` (uniform scores);
- **loss** of the scoring pass and of the training epochs: MIST's supervised contrastive loss on the
  projection head (``contrastive``), or cross-entropy on a cosine head over the task's classes (``ce``);
- **selection scope**: ``per_tensor`` (MIST's quantile rule per tensor, exempt tensors full), ``global``
  (top-k over every candidate entry of the backbone, PIECE), ``per_block`` (top fraction inside each
  ``blocks.<i>`` of the backbone; the entries outside any block form one more group);
- **budget**: the selected fraction (``select_rate``, ``top_ratio``, or the gate's per-task choice);
- **optimizer**: MIST's SGD groups (SPEC 4.1) or PIECE's Adam (betas 0.9/0.95, weight decay 0);
- MIST's per-step **drop**, **overlap** penalty and **frozen** sets, each on or off;
- **exclude_embeddings** (PIECE's port, SPEC 13.7) and **strict_mask** (PIECE's fully-trainable-tensor quirk off);
- **gate**: update-magnitude control (SPEC 14.3) picks the budget per task.

The official CE ablations re-select their gradient entries at every step (SPEC 5): their recipes have no
importance estimator and a per-step ``step_rule`` (``rand``, ``l2``, ``grad``) or none (dense fine-tuning).

Config keys named in ``utils.config.COMPOSITION_KEYS`` override a part of a task-level preset; the
per-step presets take none (the config validation says so). Every official preset is pinned by
``tests/test_presets_unchanged.py`` to its behaviour before this composition existed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional



@dataclass(frozen=True)
class Recipe:
    """One tuning phase, part by part (see the module docstring for each part's values).

    Attributes:
        preset: the ``spr`` name it came from (the report's ``method``).
        loss: ``"contrastive"`` or ``"ce"``.
        importance: estimator name, or None for the per-step presets (no scoring pass).
        scope: ``"per_tensor"``, ``"global"`` or ``"per_block"`` (None with no estimator).
        budget: selected fraction in (0, 1] (None with no estimator, or when the gate picks it).
        step_rule: official per-step mask ``"rand"``, ``"l2"``, ``"grad"``, or None.
        optimizer: ``"mist_sgd"`` or ``"adam"``.
        drop, overlap, freeze: MIST's per-step drop, overlap penalty and frozen sets.
        exclude_embeddings: patch/position embeddings, class token (and a CNN's stem) are never selected
            and never move.
        strict_mask: False reproduces PIECE's "a tensor with no selected entry is fully trainable".
        gate: update-magnitude control picks the budget per task.
        head: the CE head's rows at the task's start: ``"official"`` (the ablations: random on task 0, zero
            later, SPEC 9.24) or ``"prototypes"`` (the task's class means; ours, for the ported methods).
        epochs: epochs of the phase, the scoring pass included for task-level presets.
    """

    preset: str
    loss: str
    importance: Optional[str]
    scope: Optional[str]
    budget: Optional[float]
    step_rule: Optional[str]
    optimizer: str
    drop: bool
    overlap: bool
    freeze: bool
    exclude_embeddings: bool
    strict_mask: bool
    gate: bool
    head: str
    epochs: int

    @property
    def selective(self) -> bool:
        """True for a scoring pass followed by a mask fixed for the task."""
        return self.importance is not None


def preset(cfg) -> Recipe:
    """The recipe that ``cfg.spr`` names, before the config's composition overrides.

    Raises:
        KeyError: ``cfg.spr`` is "none" or unknown (the config validation reports it earlier).
    """
    spr = cfg.spr
    ce_ablation = dict(loss="ce", importance=None, scope=None, budget=None, optimizer="mist_sgd", drop=False,
                       overlap=False, freeze=False, exclude_embeddings=False, strict_mask=False, gate=False,
                       head="official", epochs=cfg.ablation_epochs)
    mist = dict(loss="contrastive", importance="mi_fisher", scope="per_tensor", budget=cfg.select_rate,
                step_rule=None, optimizer="mist_sgd", drop=True, overlap=True, freeze=True, exclude_embeddings=False,
                strict_mask=False, gate=False, head="prototypes", epochs=cfg.mi_epochs)
    piece = dict(loss="ce", scope="global", budget=cfg.top_ratio, step_rule=None, optimizer="adam", drop=False,
                 overlap=False, freeze=False, exclude_embeddings=True, strict_mask=False, gate=False,
                 head="prototypes", epochs=cfg.mi_epochs)
    table = {
        "mist": mist,
        "mist_random": {**mist, "importance": "random"},
        "piece_f": {**piece, "importance": "fisher"},
        "piece_s": {**piece, "importance": "second_order"},
        # strict: with PIECE's rule a small budget leaves more tensors fully trainable than a large one, which
        # would invert the gate's "small update" regime (docs/deviations.md, section 4)
        "magnitude_gate": {**piece, "importance": "fisher", "budget": None, "gate": True, "strict_mask": True},
        "rand": {**ce_ablation, "step_rule": "rand"},
        "l2": {**ce_ablation, "step_rule": "l2"},
        "grad": {**ce_ablation, "step_rule": "grad"},
        "run": {**ce_ablation, "step_rule": None},
        "cerun": {**ce_ablation, "step_rule": None},
        "ce_finetune": {**ce_ablation, "step_rule": None},
    }
    return Recipe(preset=spr, **table[spr])


#: config key -> Recipe field it overrides (utils.config.COMPOSITION_KEYS)
OVERRIDES = {"importance": "importance", "scoring_loss": "loss", "selection_scope": "scope", "budget": "budget",
             "tuning_optimizer": "optimizer", "gradient_drop": "drop", "overlap_penalty": "overlap",
             "freeze_rule": "freeze", "exclude_embeddings": "exclude_embeddings", "strict_mask": "strict_mask"}


def resolve_recipe(cfg) -> Recipe:
    """The recipe of ``cfg.spr`` with every non-null composition key of ``cfg`` applied.

    Raises:
        KeyError: ``cfg.spr`` is "none" or unknown.
    """
    recipe = preset(cfg)
    changes = {field: getattr(cfg, key) for key, field in OVERRIDES.items() if getattr(cfg, key, None) is not None}
    return dataclasses.replace(recipe, **changes) if changes else recipe

