"""The sparse-tuning phase (SPEC 4-5), used by any learner through ``cfg.spr``.

- ``masks.py``: exemption predicate, per-tensor selection, frozen masks and update counts;
- ``importance.py``: the scoring pass (MIST's mini-batch squared-gradient "MI-Fisher");
- ``losses.py``: supervised NT-Xent and the batched second-view augmentation;
- ``strategies.py``: the tuners (``mist``; the CE ablations ``rand``, ``l2``, ``grad``, ``run``, ``cerun``).
"""

from __future__ import annotations

from models.sparse.strategies import TUNERS, SparseTuner


def build_tuner(cfg, backbone, device, seed: int, learner_defaults: dict) -> SparseTuner:
    """The tuner for ``cfg.spr`` (not "none"), wrapping ``backbone`` with the persistent projection head.

    Raises:
        KeyError: unknown ``spr`` (the config validation reports it earlier with the valid names).
    """
    return TUNERS[cfg.spr](cfg, backbone, device, seed, learner_defaults)
