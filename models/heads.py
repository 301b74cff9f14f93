"""Classifier heads shared by the learners and the CE ablations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """Cosine classifier ``logits = sigma * normalize(x) @ normalize(W)^T`` (official ``CosineLinear``, SPEC 3.2).

    Args:
        in_features: feature width D.
        out_features: number of classes C.

    Attributes:
        weight: (C, D) float32, initialised U(-1/sqrt(D), 1/sqrt(D)).
        sigma: scalar scale, initialised to 1.

    ``F.normalize`` uses eps 1e-12, so an all-zero row has zero logits and a gradient scaled by 1e12
    (the official quirk of zero-initialised new rows, SPEC 9.24).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sigma = nn.Parameter(torch.ones(1))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, D) float -> logits (B, C)."""
        return self.sigma * F.linear(F.normalize(x, p=2, dim=1), F.normalize(self.weight, p=2, dim=1))
