"""The sparse-tuning phase (SPEC 4-5), used by any learner through ``cfg.spr``.

- ``masks.py``: exemption predicate, per-tensor selection, frozen masks and update counts;
- ``importance.py``: the scoring pass and the importance estimators (MIST's "MI-Fisher", PIECE's Fisher and
  second-order scores, |theta|, random);
- ``losses.py``: supervised NT-Xent and the batched second-view augmentation;
- ``recipes.py``: the parts of a tuning phase and the ``spr`` presets composed from them;
- ``gate.py``: update-magnitude control's cosine gate (SPEC 14.3);
- ``strategies.py``: :class:`SparseTuner`, which runs a recipe.

Which ``spr`` values build a tuner for which learner is decided here, in :func:`tuner_for` (SPEC 5).
"""

from __future__ import annotations

import logging
from typing import Optional

from models.sparse.strategies import SparseTuner
from utils.names import OFFICIAL_PRESETS, OUR_PRESETS

logger = logging.getLogger(__name__)

#: the ``spr`` values each official learner file dispatches to a tuning phase (SPEC 5); any other official
#: value runs the learner with no tuning phase (SimpleCIL ``cerun``, RanPAC ``run``). RanPAC's ``rand``,
#: ``l2``, ``grad`` and ``cerun`` crash in the official code; they run here on SimpleCIL's pattern.
OFFICIAL_DISPATCH: dict[str, frozenset[str]] = {
    "simplecil": frozenset({"mist", "run", "rand", "l2", "grad"}),
    "ranpac": frozenset({"mist", "rand", "l2", "grad", "cerun"}),
}
#: the official file each learner reproduces, as named in the warning
OFFICIAL_FILE = {"simplecil": "SimpleCIL-MIST", "ranpac": "RanPAC-MIST"}
#: ``spr`` values of ours, dispatched by every learner
OURS = frozenset(OUR_PRESETS)


def official_learner(model_name: Optional[str]) -> Optional[str]:
    """``ranpac``/``ranpac_mist`` -> ``ranpac``, ``simplecil``/``simplecil_mist`` -> ``simplecil``, else None."""
    if model_name is None:
        return None
    name = model_name.removesuffix("_mist")
    return name if name in OFFICIAL_DISPATCH else None


def tuner_for(spr: Optional[str], learner: Optional[str]) -> Optional[type[SparseTuner]]:
    """The tuner class (:class:`SparseTuner`) that ``spr`` runs for ``learner`` (a ``model_name``), or None.

    ``spr`` "none"/None gives None. An official value that the learner's official file does not dispatch
    (SimpleCIL ``cerun``, RanPAC ``run``) gives None with a WARNING, as the official code runs the plain
    learner then. ``learner`` None (or a learner without an official file) dispatches every value.

    Raises:
        KeyError: unknown ``spr`` (the config validation reports it earlier with the valid names).
    """
    if spr is None or spr == "none":
        return None
    if spr not in OFFICIAL_PRESETS and spr not in OURS:
        raise KeyError(spr)
    official = official_learner(learner)
    if official is not None and spr not in OURS and spr not in OFFICIAL_DISPATCH[official]:
        logger.warning("spr %r is not dispatched by the official %s code, so no tuning phase runs; "
                       "use spr 'ce_finetune' for dense cross-entropy fine-tuning", spr, OFFICIAL_FILE[official])
        return None
    return SparseTuner


def build_tuner(cfg, backbone, device, seed: int, learner_defaults: dict,
                learner: Optional[str] = None) -> Optional[SparseTuner]:
    """The tuner for ``cfg.spr``, wrapping ``backbone`` with the persistent projection head, or None.

    None when ``cfg.spr`` is "none", or when ``learner`` (the ``model_name`` whose official dispatch applies;
    the learners pass ``cfg.model_name``) does not dispatch ``cfg.spr`` (see :func:`tuner_for`, which logs
    a warning then). ``learner`` None builds the tuner for any ``spr`` (direct use, tests).

    Raises:
        KeyError: unknown ``spr`` (the config validation reports it earlier with the valid names).
    """
    cls = tuner_for(cfg.spr, learner)
    return None if cls is None else cls(cfg, backbone, device, seed, learner_defaults)
