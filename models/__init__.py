"""The learners, and the one function that builds the learner a config names.

Learners register in ``utils.registry.LEARNERS`` (``@LEARNERS.register(name, aliases=...)``); importing this
package imports every module in ``models/`` and ``models/sparse/`` (``utils.registry.import_submodules``), so a new
learner or tuning-phase part is one new file.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from utils.registry import LEARNERS, import_submodules

if TYPE_CHECKING:  # models.base imports this package's modules
    from models.base import Learner
    from utils.config import ExperimentConfig


def build_learner(cfg: ExperimentConfig, device: torch.device, seed: int,
                  backbone: Optional[nn.Module] = None) -> Learner:
    """The learner named by ``cfg.model_name``: its backbone (:meth:`Learner.build_backbone`), then the learner.

    Args:
        backbone: a ready backbone instead of the learner's own (tests).

    Raises:
        ConfigError: unknown ``model_name`` (with the registered names); WeightsError etc. from the backbone.
    """
    cls = LEARNERS.get(cfg.model_name)
    return cls(cfg, cls.build_backbone(cfg) if backbone is None else backbone, device, seed)


import_submodules(sys.modules[__name__])
