"""Learner registry: ``model_name`` -> learner class. Official names are registered aliases."""

from __future__ import annotations

from typing import Callable, TypeVar

LEARNERS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_learner(name: str, *aliases: str) -> Callable[[T], T]:
    """Class decorator: register a learner under ``name`` and its aliases (e.g. ``ranpac_mist``)."""

    def wrap(cls: T) -> T:
        for key in (name, *aliases):
            LEARNERS[key] = cls
        return cls

    return wrap


def build_learner(cfg, backbone, device, seed: int):
    """Instantiate the learner named by ``cfg.model_name``.

    Raises:
        KeyError: unknown name (config validation reports it earlier with the valid names).
    """
    return LEARNERS[cfg.model_name](cfg, backbone, device, seed)


from models import ranpac, simplecil  # noqa: E402,F401  (explicit registration, no directory scan)

from utils.names import LEARNER_NAMES  # noqa: E402

if set(LEARNERS) != set(LEARNER_NAMES):  # the config validates model_name against utils/names.py
    raise ImportError(f"registered learners {sorted(LEARNERS)} differ from utils.names.LEARNER_NAMES")
