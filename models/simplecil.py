"""SimpleCIL: class-mean prototypes with a cosine classifier (SPEC 7; Zhou et al., IJCV 2024).

Each new class c gets the mean of the raw (unnormalised) backbone features of its training images
under test transforms as its prototype; logits are sigma * cos(f, p_c) with sigma = 1. Old prototypes
are never recomputed, even though the tuning phase keeps changing the backbone (faithful, SPEC 9.20).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

from models import register_learner
from models.base import Learner, TaskData, warn_ignored

logger = logging.getLogger(__name__)

OFFICIAL_BATCH_SIZE = 32  # simplecil_mist.py module constant; the JSON batch_size is ignored (SPEC 9.2)


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean feature of each class. features (N, D) float32, labels (N,) int64, classes (K,) -> (K, D)."""
    return torch.stack([features[labels == c].mean(dim=0) for c in classes.tolist()])


@register_learner("simplecil", "simplecil_mist")
class SimpleCIL(Learner):
    """Prototype classifier with an optional tuning phase before each prototype extraction.

    ``DEFAULTS``: the official SimpleCIL-MIST frozen quantile 1.0 (only each tensor's maximum is
    frozen, SPEC 4.7) and the hard-coded loader batch of 32 (``use_config_batch_size`` uses the JSON).
    """

    DEFAULTS = {"freeze_quantile": 1.0, "batch_size": OFFICIAL_BATCH_SIZE}

    def __init__(self, cfg, backbone, device, seed) -> None:
        super().__init__(cfg, backbone, device, seed)
        self.prototypes: Optional[torch.Tensor] = None  # (seen, D) float32 on device
        if not cfg.use_config_batch_size:
            warn_ignored("batch_size", cfg.batch_size, OFFICIAL_BATCH_SIZE, "Set use_config_batch_size to use it.")

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size if self.cfg.use_config_batch_size else OFFICIAL_BATCH_SIZE

    def announce(self, task: TaskData) -> None:
        logger.info("Learning on %d-%d", task.known, task.seen)

    def update_head(self, task: TaskData) -> None:
        feats, labels = self.extract_features(task.train_eval, shuffle=True, desc="prototypes")
        grown = torch.zeros(task.seen, self.feature_dim, device=self.device)
        if self.prototypes is not None:
            grown[: self.prototypes.shape[0]] = self.prototypes
        classes = torch.unique(labels)
        grown[classes] = class_means(feats, labels, classes)
        self.prototypes = grown

    def head_state(self) -> dict:
        return {"prototypes": self.prototypes}

    def load_head_state(self, state: dict) -> None:
        protos = state["prototypes"]
        self.prototypes = None if protos is None else protos.to(self.device)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, p=2, dim=1), F.normalize(self.prototypes, p=2, dim=1))
