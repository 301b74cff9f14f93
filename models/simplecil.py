"""SimpleCIL: class-mean prototypes with a cosine classifier (algorithms.md §7; Zhou et al., IJCV 2024).

Each new class c gets the mean of the raw (unnormalised) backbone features of its training images
under test transforms as its prototype; logits are sigma * cos(f, p_c) with sigma = 1. Old prototypes
are never recomputed, even though the tuning phase keeps changing the backbone (faithful, algorithms.md §9.20).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from models.base import Learner, TaskData
from models.heads import PROJECTION_DIM, cosine_logits, grow_prototypes
from utils.config import ExperimentConfig, warn_ignored
from utils.registry import LEARNERS

OFFICIAL_BATCH_SIZE = 32  # simplecil_mist.py module constant; the JSON batch_size is ignored (algorithms.md §9.2)


@LEARNERS.register("simplecil", aliases=("simplecil_mist",))
class SimpleCIL(Learner):
    """Prototype classifier with an optional tuning phase before each prototype extraction.

    ``DEFAULTS``: the official SimpleCIL-MIST frozen quantile 1.0 (only each tensor's maximum is
    frozen, algorithms.md §4.7) and the hard-coded loader batch of 32 (``use_config_batch_size`` uses the JSON).
    """

    TITLE, ORDER = "SimpleCIL", 20
    OFFICIAL_FILE = "SimpleCIL-MIST"
    OFFICIAL_DISPATCH = frozenset({"mist", "run", "rand", "l2", "grad"})
    DEFAULTS = {"freeze_quantile": 1.0, "batch_size": OFFICIAL_BATCH_SIZE}
    #: the official SimpleCIL-MIST ablations train on the learner's own fc (algorithms.md §5); ce_finetune
    #: (ours) does not
    OWN_HEAD_PRESETS = ("run", "rand", "l2", "grad")
    HEAD_STATE = ("prototypes",)

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int) -> None:
        super().__init__(cfg, backbone, device, seed)
        self.prototypes: Optional[torch.Tensor] = None  # (seen, D) float32 on device
        if not cfg.use_config_batch_size:
            warn_ignored("batch_size", cfg.batch_size, OFFICIAL_BATCH_SIZE, "Set use_config_batch_size to use it.")

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size if self.cfg.use_config_batch_size else OFFICIAL_BATCH_SIZE

    def tune(self, task: TaskData) -> dict[str, Any]:
        """The tuning phase; the official CE ablations train on the learner's own head (algorithms.md §5): its old rows
        are the old prototypes (official ``update_fc`` before ``_sparse_training``), and stay them after the phase
        (moved by weight decay and momentum)."""
        rows = self.tuning_head_rows(task)
        report = self.tuner.tune(self.tuning_loader(task), task, head_rows=rows)
        if rows is not None and self.tuner.trained_rows.shape[0]:
            self.prototypes = self.tuner.trained_rows
        return report

    def tuning_head_rows(self, task: TaskData) -> Optional[torch.Tensor]:
        """(known, D) old prototypes for the CE ablations that train on the learner's own head, else None."""
        if self.cfg.spr not in self.OWN_HEAD_PRESETS:
            return None
        if self.prototypes is None:
            return torch.zeros(0, self.feature_dim, device=self.device)
        return self.prototypes

    def update_head(self, task: TaskData) -> None:
        feats, labels = self.extract_features(task.train_eval, shuffle=True, desc="prototypes")
        self.prototypes = grow_prototypes(self.prototypes, feats, labels, task.seen)

    def extra_parameter_count(self) -> int:
        """The official network is always built with the projection head ``simclr`` = Linear(D, 128)
        (algorithms.md §3.2), counted whether or not a tuning phase runs."""
        return self.feature_dim * PROJECTION_DIM + PROJECTION_DIM

    def head_parameter_count(self) -> int:
        """Official ``fc`` = CosineLinear(D, seen): seen * D + 1 (sigma); None (0) before the first task."""
        return 0 if self.prototypes is None else self.prototypes.numel() + 1

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(features, self.prototypes)
