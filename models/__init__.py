"""The learners, and the one function that builds the learner a config names.

Learners register in ``utils.registry.LEARNERS`` (``@LEARNERS.register(name, aliases=...)``); importing this
package imports every built-in learner module, and with them the tuning presets they can run.
"""

from __future__ import annotations

import torch

from utils.registry import LEARNERS


def build_learner(cfg, device: torch.device, seed: int, backbone=None):
    """The learner named by ``cfg.model_name``: its backbone (:meth:`Learner.build_backbone`), then the learner.

    Args:
        backbone: a ready backbone instead of the learner's own (tests).

    Raises:
        ConfigError: unknown ``model_name`` (with the registered names); WeightsError etc. from the backbone.
    """
    cls = LEARNERS.get(cfg.model_name)
    return cls(cfg, cls.build_backbone(cfg) if backbone is None else backbone, device, seed)


from models import ranpac, simplecil  # noqa: E402,F401  (explicit registration, no directory scan)
import importlib.util as _u  # TEMPORARY until models/slca.py lands
if _u.find_spec("models.slca") is not None:
    from models import slca  # noqa: F401
