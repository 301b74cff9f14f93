"""The sparse-tuning phase (SPEC 4-5): built by ``build_tuner`` from ``cfg.spr``."""

from __future__ import annotations


def build_tuner(cfg, backbone, device, seed, learner_defaults):
    """The tuning phase for ``cfg.spr``; filled in by the MIST issue."""
    raise NotImplementedError(f"spr={cfg.spr!r} is not implemented yet; use spr 'none'")
