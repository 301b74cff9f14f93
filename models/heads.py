"""Classifier heads shared by the learners and the CE ablations."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

PROJECTION_DIM = 128  # MIST's projection head ``simclr``: Linear(D, 128) with bias (algorithms.md §3.2)
LINEAR_HEAD_STD = 0.02  # timm's ViT head init (init_weights_vit_timm): trunc_normal std 0.02, bias 0


class CosineLinear(nn.Module):
    """Cosine classifier ``logits = sigma * normalize(x) @ normalize(W)^T`` (official ``CosineLinear``,
    algorithms.md §3.2).

    Args:
        in_features: feature width D.
        out_features: number of classes C.

    Attributes:
        weight: (C, D) float32, initialised U(-1/sqrt(D), 1/sqrt(D)).
        sigma: scalar scale, initialised to 1.

    ``F.normalize`` uses eps 1e-12, so an all-zero row has zero logits and a gradient scaled by 1e12
    (the official quirk of zero-initialised new rows, algorithms.md §9.24).
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


def timm_linear_head(in_features: int, out_features: int, device: torch.device | str = "cpu") -> nn.Linear:
    """A new linear classifier as timm's ViT builds its head (``init_weights_vit_timm``): weight drawn by timm's
    ``trunc_normal_`` (std 0.02, cut at +-2, the erfinv sampler of the official code; torch's
    ``nn.init.trunc_normal_`` draws other values), bias zero. Drawn on the CPU from the global torch generator, as
    the official heads are built, then moved to ``device`` (the same weights on every device).

    Used by SLCA (``linears.py``), the L2P/DualPrompt ports' head and GPS's training head.

    Returns:
        ``nn.Linear(in_features, out_features)`` float32 on ``device``.
    """
    head = nn.Linear(in_features, out_features)
    with torch.no_grad():
        trunc_normal_(head.weight, std=LINEAR_HEAD_STD)
        head.bias.zero_()
    return head.to(device)


def linear_from(weight: torch.Tensor, bias: torch.Tensor, device: torch.device | str = "cpu") -> nn.Linear:
    """An ``nn.Linear`` holding saved tensors (a checkpoint's head): weight (out, in) and bias (out,) float32, copied
    onto ``device``. Built on the CPU and moved, as the learners did before (its throw-away initialisation draws from
    the CPU's global random stream, which a resumed run's later draws follow)."""
    head = nn.Linear(weight.shape[1], weight.shape[0]).to(device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Mean feature of each class. features (N, D) float32, labels (N,) int64, classes (K,) -> (K, D)."""
    return torch.stack([features[labels == c].mean(dim=0) for c in classes.tolist()])


def grow_prototypes(prototypes: "torch.Tensor | None", features: torch.Tensor, labels: torch.Tensor,
                    seen: int) -> torch.Tensor:
    """The official ``update_fc`` + ``replace_fc`` of a cosine prototype head (algorithms.md §6, §7).

    Rows of earlier classes are kept; new rows start at zero and the classes present in ``labels`` get the
    mean of their raw (unnormalised) features.

    Args:
        prototypes: (known, D) float32, or None before the first task.
        features: (N, D) float32 features of the current task's images; labels: (N,) int64.
        seen: classes after this task.

    Returns:
        (seen, D) float32 on ``features``' device.
    """
    grown = torch.zeros(seen, features.shape[1], device=features.device)
    if prototypes is not None:
        grown[: prototypes.shape[0]] = prototypes
    classes = torch.unique(labels)
    grown[classes] = class_means(features, labels, classes)
    return grown


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """sigma * cos(f, p_c) with sigma = 1 (official CosineLinear without RP). (B, D), (C, D) -> (B, C)."""
    return F.linear(F.normalize(features, p=2, dim=1), F.normalize(prototypes, p=2, dim=1))
