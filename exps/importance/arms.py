"""What the comparison protocol compares and how each of its runs is configured (``exps/importance/protocol.py``):
arms (a preset with config overrides, its own calibrated rate or another arm's), equal training epochs, the
learning-rate grid of an optimizer family, the keys the protocol owns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from utils.registry import PRESETS


@dataclass(frozen=True)
class Arm:
    """One compared method: a preset with config overrides; ``rate_of``: take that arm's calibrated rate."""

    name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    rate_of: Optional[str] = None


#: arms that are not a preset as it is; their rates follow MIST's (issue 25: same-rate contrasts)
VARIANTS = {"mist_noembed": Arm("mist_noembed", "mist", {"exclude_embeddings": True},
                                "MIST, embeddings excluded (deviation)", rate_of="mist"),
            "mist_random": Arm("mist_random", "mist_random", {}, "MIST, random scores (MIST's rate)", rate_of="mist"),
            "mist_random_noembed": Arm("mist_random_noembed", "mist_random", {"exclude_embeddings": True},
                                       "MIST, random scores, embeddings excluded (deviation)", rate_of="mist")}


def arm_of(name: str) -> Arm:
    """The arm ``name``: a variant of :data:`VARIANTS`, or a registered preset with its own rate.

    Raises:
        ConfigError: neither.
    """
    return VARIANTS.get(name) or Arm(name, name, {}, PRESETS.get(name, "--methods").label)


def epoch_keys(method: str, epochs: int) -> dict[str, int]:
    """The config keys that give preset ``method`` ``epochs`` training epochs per task: a task-level preset's epochs
    key counts its scoring pass too (``mi_epochs`` = epochs + 1); phases (ACL, SPG, SparCL) and the per-step presets
    train every epoch of theirs."""
    p = PRESETS.get(method)
    scoring = p.parts["importance"] is not None and p.parts.get("phase") is None
    return {p.epochs_key: epochs + (1 if scoring else 0)}


def grid(method: str, sgd: tuple[float, ...], adam: tuple[float, ...]) -> tuple[float, ...]:
    """The learning-rate grid of preset ``method``: ``sgd`` when its optimizer is an SGD, ``adam`` otherwise."""
    return sgd if "sgd" in PRESETS.get(method).parts["optimizer"] else adam


def plan_config(base: dict, size: dict, method: "str | Arm", seeds, epochs: int, lr: Optional[float],
                overrides: dict, lambdas: Optional[dict]) -> dict:
    """The config of one job: ``base`` with ``size``, the arm's preset and overrides, its epochs and rate, the seeds,
    the command line's overrides and RanPAC's fixed lambdas."""
    arm = method if isinstance(method, Arm) else arm_of(method) if method != "none" else None
    cfg = {**base, **size, "spr": arm.preset if arm else "none", "seed": list(seeds), "progress": False, **overrides}
    cfg["prefix"] = "protocol"
    if arm is not None:
        cfg.update(arm.overrides)
        cfg.update(epoch_keys(arm.preset, epochs))
        if lr is not None:
            cfg[PRESETS.get(arm.preset).lr_key] = lr
    if lambdas is not None:
        cfg["ridge_lambdas_by_seed"] = lambdas
    return cfg


def owned_keys(arms: list[Arm]) -> set[str]:
    """The config keys the protocol sets itself (seeds, the arms' presets, rates, epochs and overrides, RanPAC's fixed
    lambdas): ``--set`` may not change them."""
    keys = {"seed", "spr", "prefix", "progress", "ridge_lambdas", "ridge_lambdas_by_seed"}
    for a in arms:
        p = PRESETS.get(a.preset)
        keys |= {p.epochs_key, *([p.lr_key] if p.lr_key else []), *a.overrides}
    return keys
