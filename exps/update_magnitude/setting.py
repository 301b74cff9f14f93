"""The update-magnitude experiment's setting (``exps/update_magnitude/run.py``): the regimes, the run settings, one
task's data and one run's results (shared by the runner and its report)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from models.sparse.gate import FROZEN, INITIALIZED

ADAPTIVE, REINITIALIZED = "adaptive", "reinitialized"
REGIMES = (INITIALIZED, FROZEN, REINITIALIZED, ADAPTIVE)
WIDTHS = (16, 32, 64, 128)  # timm ResNet stage channels (the stem stays at timm's fixed 64)
LAYERS = (2, 2, 2, 2)  # residual blocks per stage: 1 stem conv + 8 residual blocks = 9 conv blocks
LAST = "layer4.1"  # the last residual block: the task-specific part (frozen, reinitialized)
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530
# algorithms.md §14.4, Table I (Avg.Acc / Forgetting, %) and Table II (Task.Acc, %); Fashion-MNIST is not in the paper.
PAPER_TABLE_I = {
    INITIALIZED: {"cifar10": (75.74, 23.30), "pmnist": (75.97, 30.76), "cifar100_task_acc": 60.72},
    FROZEN: {"cifar10": (75.98, 21.10), "pmnist": (76.78, 29.21), "cifar100_task_acc": 57.37},
    ADAPTIVE: {"cifar10": (80.55, 19.51), "pmnist": (77.99, 28.05), "cifar100_task_acc": 67.30},
}


@dataclass
class Config:
    """Run settings (the CLI flags); see the module docstring for their meaning."""

    train_per_class: Optional[int] = 1000
    test_per_class: Optional[int] = None
    epochs: int = 3
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    n_tasks: int = 5
    classes_per_task: int = 2
    seeds: tuple[int, ...] = tuple(range(10))
    calibration_seed: int = 100
    budget_large: float = 1.0  # gate labels only: the regime decides what trains
    budget_small: float = 0.25
    data_root: str = "./data"


@dataclass
class TaskData:
    """One task: float32 images (N, 1, 28, 28), normalised, and int64 labels (N,) in {0, 1} (local to the task)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class RunResult:
    """One regime x seed.

    Attributes:
        acc_matrix: a[i][k] in % (k <= i), None above the diagonal.
        metrics: :func:`task_metrics` of ``acc_matrix``.
        regimes: the regime each task trained in.
        similarities: the gate's cosine per task (None for task 0, and for non-adaptive runs).
        update_norm: per task, L2 norm of the trunk's parameter change, {"lower": ..., "last_block": ...}.
    """

    regime: str
    seed: int
    acc_matrix: list[list[Optional[float]]]
    metrics: dict[str, float]
    regimes: list[str]
    similarities: list[Optional[float]] = field(default_factory=list)
    update_norm: list[dict[str, float]] = field(default_factory=list)
