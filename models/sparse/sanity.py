"""Configurations of the tuning phase that would do nothing, or something else than they say (issue 16, item 4).

:func:`check_tuning_config` runs when a :class:`~models.sparse.tuner.SparseTuner` is built, before any training:
it refuses a configuration under which nothing can train, and warns (one log line naming the key, its value and
the consequence) when a key is ignored by the chosen preset or makes the phase a silent no-op. :func:`canonical`
names a preset that the composition keys rebuilt from another one (``mist_random`` + ``importance=mi_fisher`` is
MIST), so that results.json and the report say what ran.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import TYPE_CHECKING, Iterable

from utils.config import FIELDS, ExperimentConfig
from utils.errors import ConfigError
from utils.registry import PRESETS

if TYPE_CHECKING:
    from models.sparse.presets import Recipe

logger = logging.getLogger(__name__)

ADAM_KEYS = ("adam_lr", "adam_head_lr")
GATE_KEYS = ("gate_threshold", "gate_budget_large", "gate_budget_small", "gate_memory", "gate_ema")


def canonical(recipe: Recipe, cfg: ExperimentConfig) -> Recipe:
    """``recipe`` renamed after the registered preset whose every part, budget and epochs it equals (its own name
    first), with a warning when that is another preset than ``cfg.spr``; otherwise ``recipe`` unchanged.

    Raises:
        ConfigError: ``recipe.preset`` is not a registered preset.
    """
    for name, other in [(recipe.preset, PRESETS.get(recipe.preset)),
                        *((n, p) for n, p in PRESETS.items() if n != recipe.preset)]:
        try:
            built = other.recipe(cfg)
        except (AttributeError, ConfigError):  # its keys are not part of this config
            continue
        if dataclasses.replace(recipe, preset=name) == built:
            if name != recipe.preset:
                logger.warning("spr '%s' with the composition keys %s is the preset '%s' part for part; it runs and is "
                               "reported as '%s'.", recipe.preset, _set_composition(cfg), name, name)
                return built
            return recipe
    return recipe


def _set_composition(cfg) -> str:
    from utils.config import COMPOSITION_KEYS

    return ", ".join(f"{k}={getattr(cfg, k)!r}" for k in COMPOSITION_KEYS if getattr(cfg, k, None) is not None)


def _changed(cfg, key: str) -> bool:
    return key in FIELDS and getattr(cfg, key, FIELDS[key].default) != FIELDS[key].default


def used_keys(recipe: Recipe) -> set[str]:
    """The preset-owned keys that ``recipe`` reads: its preset's own keys, Adam's with the Adam optimizer, the
    gate's with the gate, ``top_ratio`` when it is the budget.

    Raises:
        ConfigError: ``recipe.preset`` is not a registered preset.
    """
    preset = PRESETS.get(recipe.preset)
    used = set(preset.keys) | ({preset.budget_key} if preset.budget_key else set())
    if recipe.optimizer == "adam":
        used |= set(ADAM_KEYS)
    if recipe.gate:
        used |= set(GATE_KEYS)
    return used


def owned_keys() -> set[str]:
    """Every key that belongs to some preset (its own keys), the Adam and gate keys included."""
    owned = set(ADAM_KEYS) | set(GATE_KEYS)
    for _, preset in PRESETS.items():
        owned |= set(preset.keys)
    return owned


def check_tuning_config(cfg: ExperimentConfig, recipe: Recipe, backbone_numel: int, candidate_numel: int,
                        freeze_quantile: float) -> None:
    """Refuse or warn about a tuning phase that would silently do nothing or ignore a key (see the module docstring).

    Args:
        cfg: the experiment config; recipe: the resolved :class:`~models.sparse.presets.Recipe`.
        backbone_numel: backbone entries (PIECE's N); candidate_numel: entries of the tensors that may be selected.
        freeze_quantile: the freeze quantile in use (config or learner default).

    A global top-k budget that rounds to no entry is warned about (PIECE then takes one entry), not refused.

    Raises:
        ConfigError: ``recipe.preset`` is not a registered preset.
    """
    for key in sorted(owned_keys() - used_keys(recipe)):
        if _changed(cfg, key):
            logger.warning("Config key '%s' = %r is ignored: spr '%s' does not use it (it belongs to %s).", key,
                           getattr(cfg, key), recipe.preset, _users(key))
    if recipe.gate and cfg.gate_memory == "previous" and _changed(cfg, "gate_ema"):
        logger.warning("Config key 'gate_ema' = %r is ignored: gate_memory is 'previous' (only 'ema' uses it).",
                       cfg.gate_ema)
    if recipe.gate and cfg.gate_budget_small > cfg.gate_budget_large:
        logger.warning("gate_budget_small = %g is larger than gate_budget_large = %g: the gate's 'small update' regime "
                       "would update more than its 'large update' one, the reverse of update-magnitude control.",
                       cfg.gate_budget_small, cfg.gate_budget_large)
    if recipe.selective and recipe.epochs <= 1:
        logger.warning("%s = %d with spr '%s': its first epoch is the scoring pass, so the tuning phase makes no "
                       "update (the backbone is not tuned); use 2 or more.", PRESETS.get(recipe.preset).epochs_key,
                       recipe.epochs, recipe.preset)
    if recipe.selective and recipe.freeze and freeze_quantile <= 0:
        logger.warning("freeze_quantile = %g freezes every scored entry at the end of each task: from the second task "
                       "on nothing the selection picks can train (see 'trainable_fraction' in results.json).",
                       freeze_quantile)
    if recipe.selective and recipe.scope == "global" and recipe.budget is not None and not recipe.gate:
        if int(math.floor(recipe.budget * backbone_numel)) == 0:  # PIECE then takes one entry (max(1, k))
            key = "budget" if getattr(cfg, "budget", None) is not None else PRESETS.get(recipe.preset).budget_key
            trains = "only that entry trains" if recipe.strict_mask else (
                f"with PIECE's rule every other tensor is fully trainable, so "
                f"{100.0 * candidate_numel / max(backbone_numel, 1):.1f}% "
                "of the backbone trains")
            logger.warning("Config key '%s' = %g selects one entry (max(1, floor(%g x %d)) = 1, as PIECE): %s; use "
                           "at least %.3g for more.", key, recipe.budget, recipe.budget, backbone_numel, trains,
                           2 / backbone_numel)


def _users(key: str) -> str:
    users: Iterable[str] = [n for n, p in PRESETS.items() if key in p.keys]
    return ", ".join(users) or "another preset"
