"""What a task did to the backbone and to the classes learned before it (issue 25): where the weight change landed,
and how far old classes' features moved.

Both are measured on the module the tuning phase tunes (``Learner.tuned_module``: the backbone; for EASE, L2P and
DualPrompt the plain ViT without its adapters or prompts), once per task, after the task's learning:

- **parameter groups** (:func:`group_changes`): the module's parameters at the task's start against its parameters
  after the task, per group (:func:`parameter_groups`: the embeddings (patch and position embedding, class and
  register tokens, a CNN's stem), each block's attention and MLP, the normalisation layers, the rest by top-level
  name), as the relative change ||dtheta_g|| / ||theta_g|| and the group's share ||dtheta_g||^2 / ||dtheta||^2 of the
  squared change;
- **old-class feature drift** (:class:`FeatureDrift`): for every class of an earlier task, the cosine distance
  1 - cos(mu_c(now), mu_c(then)) between the mean feature of its **test** images under the current module and under
  the module after the task that introduced it; averaged per earlier task and over all old classes. It reads
  evaluation data only (the test split the run evaluates on), never training data, and changes nothing: the
  extraction draws from a loader stream of its own, so the run's results are those of a run without it.

``measure_drift: false`` switches both off. Under torchrun every process computes the same values.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from models.sparse.gps import norm_parameters
from models.sparse.scopes import is_embedding

if TYPE_CHECKING:  # it imports this module
    from models.base import Learner, TaskData

EMBEDDINGS, NORMS = "embeddings", "norms"
_BLOCK_PART = re.compile(r"(?:^|\.)blocks\.(\d+)\.(attn|mlp|ls1|ls2)?")
_BRANCH = {"ls1": "attn", "ls2": "mlp"}  # DINOv2's layer scales belong to their branch


def parameter_groups(module: nn.Module) -> dict[str, str]:
    """Parameter name (``module.named_parameters()``) -> group: ``"norms"`` (parameters of normalisation layers),
    ``"embeddings"`` (``models.sparse.scopes.is_embedding``), ``"blocks.<i>.attn"`` / ``"blocks.<i>.mlp"`` (a ViT
    block's attention and MLP branches, layer scales included), ``"blocks.<i>"`` (any other parameter of a block, e.g.
    an EfficientNet stage), else the name's first component (``"head"``, ``"conv_head"``)."""
    norms = norm_parameters(module)
    groups = {}
    for name, _ in module.named_parameters():
        if name in norms:
            groups[name] = NORMS
        elif is_embedding(name):
            groups[name] = EMBEDDINGS
        elif (match := _BLOCK_PART.search(name)) is not None:
            part = _BRANCH.get(match.group(2), match.group(2))
            groups[name] = f"blocks.{match.group(1)}" + (f".{part}" if part else "")
        else:
            groups[name] = name.split(".")[0]
    return groups


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every parameter of ``module`` (name -> detached clone, on its device)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


@torch.no_grad()
def group_changes(before: dict[str, torch.Tensor], module: nn.Module) -> dict[str, Any]:
    """How far ``module`` moved from ``before`` (:func:`snapshot` at the task's start), per :func:`parameter_groups`.

    Returns:
        ``{"relative_change": ||dtheta|| / ||theta_0||, "groups": {group: {"relative_change": ||dtheta_g|| /
        ||theta_g,0||, "share": ||dtheta_g||^2 / ||dtheta||^2}}}`` (float64 sums; a share is 0 when nothing moved,
        a relative change 0 for a group whose start is all zeros).
    """
    groups = parameter_groups(module)
    delta: dict[str, float] = {}
    start: dict[str, float] = {}
    for name, p in module.named_parameters():
        g = groups[name]
        delta[g] = delta.get(g, 0.0) + float((p.detach().double() - before[name].double()).pow(2).sum())
        start[g] = start.get(g, 0.0) + float(before[name].double().pow(2).sum())
    total_delta, total_start = sum(delta.values()), sum(start.values())
    return {"relative_change": (total_delta / total_start) ** 0.5 if total_start > 0 else 0.0,
            "groups": {g: {"relative_change": (delta[g] / start[g]) ** 0.5 if start[g] > 0 else 0.0,
                           "share": delta[g] / total_delta if total_delta > 0 else 0.0} for g in delta}}


def class_means(features: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean feature of each class 0..n_classes-1: features (N, D) float, labels (N,) int64 -> (n_classes, D) float64
    (a class without images gets zeros)."""
    sums = torch.zeros(n_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=n_classes).to(sums)
    return sums / counts.clamp(min=1)[:, None]


class FeatureDrift:
    """Old-class feature drift across tasks (module docstring). State: each seen class's test-set mean feature after
    the task that introduced it, ``means`` (seen, D) float64 on the CPU, and the task ``bounds`` (the first class of
    every task, then the number seen)."""

    def __init__(self) -> None:
        self.means = torch.zeros(0, 0, dtype=torch.float64)
        self.bounds: list[int] = [0]

    def update(self, features: torch.Tensor, labels: torch.Tensor, known: int, seen: int) -> dict[str, Any]:
        """Measure the drift of classes [0, known) from the test features of every seen class under the current
        module, then store the new classes' means [known, seen).

        Args:
            features: (N, D) float test features of the classes seen so far; labels: (N,) int64 in [0, seen).
            known, seen: the task's class range.

        Returns:
            ``{"old_class_feature_drift": [mean 1 - cos over the classes of earlier task s, for each s],
            "old_class_feature_drift_mean": mean over every old class}``; empty lists / None on the first task.

        Raises:
            ValueError: the stored means do not cover exactly the ``known`` old classes.
        """
        if self.means.shape[0] != known:
            raise ValueError(f"feature drift holds {self.means.shape[0]} class means, the task expects {known}")
        now = class_means(features, labels, seen).cpu()
        per_class = 1.0 - torch.nn.functional.cosine_similarity(now[:known], self.means, dim=1) if known else None
        out: dict[str, Any] = {"old_class_feature_drift": [], "old_class_feature_drift_mean": None}
        if per_class is not None:
            out["old_class_feature_drift"] = [float(per_class[a:b].mean())
                                              for a, b in zip(self.bounds, self.bounds[1:])]
            out["old_class_feature_drift_mean"] = float(per_class.mean())
        self.means = torch.cat([self.means.reshape(known, now.shape[1]), now[known:seen]])
        self.bounds.append(seen)
        return out

    def state_dict(self) -> dict[str, Any]:
        """``means`` (seen, D) float64 and ``bounds`` (tasks + 1,) int64, for the checkpoint."""
        return {"means": self.means.clone(), "bounds": torch.tensor(self.bounds, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises KeyError when an entry is missing."""
        self.means = state["means"].to(torch.float64).cpu()
        self.bounds = [int(b) for b in state["bounds"]]


class DriftMeter:
    """Both measurements for one learner: :meth:`start` before a task's learning, :meth:`finish` after it.

    Args:
        learner: a :class:`models.base.Learner` (its ``tuned_module``, ``extract_features`` and seed).
    """

    def __init__(self, learner: Learner) -> None:
        self.learner = learner
        self.features = FeatureDrift()
        self._before: Optional[dict[str, torch.Tensor]] = None

    def start(self) -> None:
        """Copy the tuned module's parameters (the task's start)."""
        self._before = snapshot(self.learner.tuned_module())

    def finish(self, task: TaskData) -> dict[str, Any]:
        """The task's ``drift`` entry of results.json: :func:`group_changes` since :meth:`start` and
        :meth:`FeatureDrift.update` on ``task.test`` (every seen class's test images).

        Raises:
            RuntimeError: :meth:`start` was not called for this task.
        """
        if self._before is None:
            raise RuntimeError("DriftMeter.finish without start")
        module = self.learner.tuned_module()
        changes = group_changes(self._before, module)
        self._before = None
        features, labels = self.learner.extract_features(task.test, desc="drift", module=module, stream="drift")
        return {**changes, **self.features.update(features, labels, task.known, task.seen)}

    def state_dict(self) -> dict[str, Any]:
        """The feature drift's state (:meth:`FeatureDrift.state_dict`); the parameter snapshot lives within a task
        only and is not saved."""
        return self.features.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. Raises KeyError when an entry is missing."""
        self.features.load_state_dict(state)
