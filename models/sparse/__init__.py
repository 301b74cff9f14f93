"""The tuning phase (``spr``; algorithms.md §4-5, §13, §14),
run by every learner before its own training and head update.

- ``presets.py``: :class:`Recipe` (the parts of a phase) and the registered ``spr`` presets;
- ``estimators.py``: the scoring pass and the registered importance estimators;
- ``scopes.py``: the registered selection scopes; ``masks.py``: the per-tensor rule and the across-task state;
- ``plan.py``: the fast masked step (flat gradients, :class:`GradientPlan`); ``reference.py``: its plain
  per-tensor equivalent of algorithms.md §4.6, tested equal;
- ``per_step.py``: the registered per-step mask rules and their phase; ``selective.py``: score, select, train;
- ``losses.py``: MIST's supervised NT-Xent, the second-view augmentation and the registered losses;
- ``optim.py``: the registered optimizers and the masked step with the algorithms.md §9.4 fixes;
- ``gate.py``: update-magnitude control's cosine gate (algorithms.md §14.3);
- ``network.py``: backbone + projection head, and the cosine CE heads;
- ``acl.py``, ``spu.py``, ``gps.py``, ``spg.py``, ``sparcl.py``: the rivals in MIST's slot (algorithms.md §19),
  one file each;
- ``tuner.py``: :class:`SparseTuner`, which owns the state across tasks and runs a phase per task.

Which ``spr`` values build a tuner for which learner is decided here, in :func:`tuner_for` (algorithms.md §5).
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

import torch
from torch import nn

from models.sparse.presets import Preset
from models.sparse.tuner import SparseTuner
from utils.config import ExperimentConfig
from utils.registry import PRESETS, import_submodules

logger = logging.getLogger(__name__)


def tuner_for(spr: Optional[str], learner: Optional[type] = None) -> Optional[type[SparseTuner]]:
    """The tuner class (:class:`SparseTuner`) that ``spr`` runs for ``learner`` (a learner class), or None.

    ``spr`` "none"/None gives None. An official preset that the learner's official file does not dispatch
    (``learner.OFFICIAL_DISPATCH``: SimpleCIL ``cerun``, RanPAC ``run``) gives None with a WARNING, as the official
    code runs the plain learner then. ``learner`` None, a learner with no official dispatch, or a preset of ours
    dispatches every value.

    Raises:
        ConfigError: ``spr`` is not a registered preset (the config validation reports it earlier).
    """
    if spr is None or spr == "none":
        return None
    preset: Preset = PRESETS.get(spr)
    dispatch = getattr(learner, "OFFICIAL_DISPATCH", None)
    if preset.official and dispatch is not None and spr not in dispatch:
        logger.warning("spr %r is not dispatched by the official %s code, so no tuning phase runs; "
                       "use spr 'ce_finetune' for dense cross-entropy fine-tuning", spr, learner.OFFICIAL_FILE)
        return None
    return SparseTuner


def build_tuner(cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int,
                learner_defaults: dict[str, Any], learner: Optional[type] = None) -> Optional[SparseTuner]:
    """The tuner for ``cfg.spr``, wrapping ``backbone`` with the persistent projection head, or None.

    None when ``cfg.spr`` is "none", or when ``learner`` (the learner class whose official dispatch applies) does
    not dispatch ``cfg.spr`` (see :func:`tuner_for`, which logs a warning then). ``learner`` None builds the tuner
    for any ``spr`` (direct use, tests).

    Raises:
        ConfigError: ``cfg.spr`` is not a registered preset.
    """
    cls = tuner_for(cfg.spr, learner)
    return None if cls is None else cls(cfg, backbone, device, seed, learner_defaults)


def _register_all() -> None:
    """Import every module of this package (each registers its parts): a new estimator or preset is one file."""
    import_submodules(sys.modules[__name__])


_register_all()
