"""The values a shipped config runs with, read from every shipped file through the project's own config loading, against
the official scripts they come from (issue 24).

A shipped config is what a GPU user runs for hours: its learning rates, weight decays, clipping and epochs must be the
official values of one named source, whatever the learner's name in the file (``ranpac_mist`` is RanPAC). Each table
below names the official file each value was read from; where no official value exists the assumption is named too
(docs/deviations.md sections 6 and 7).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from models.sparse.acl import host_values
from utils.config import load_config
from utils.ledger import shipped_configs
from utils.registry import LEARNERS

REPO = Path(__file__).resolve().parents[1]


def loaded(preset: str | None = None, learners: tuple[str, ...] = ()) -> list[tuple[str, object]]:
    """(path, loaded config) of every shipped config running ``preset`` (any when None) in front of one of ``learners``
    (any when empty), the learner resolved through the registry."""
    out = []
    for rel in shipped_configs():
        cfg = load_config(REPO / rel)
        if preset is not None and cfg.spr != preset:
            continue
        if learners and LEARNERS.resolve(cfg.model_name) not in learners:
            continue
        out.append((rel, cfg))
    return out


def test_every_learner_name_of_a_shipped_config_resolves_to_a_registered_learner():
    names = {LEARNERS.resolve(cfg.model_name) for _, cfg in loaded()}
    assert names <= set(LEARNERS.names()) and {"ranpac", "simplecil"} <= names


# ---- ACL: github byyx666/ACL_code exps/{simplecil,ranpac}_inr.json -----------------------------------------------
ACL_OFFICIAL = {"simplecil": (1e-4, 5e-4), "ranpac": (1e-4, 5e-3)}  # (warm_lr, weight_decay)


def test_acl_runs_with_the_hosts_learning_rate_and_weight_decay_from_every_shipped_config():
    configs = loaded("acl")
    assert len(configs) == 14  # {ranpac,simplecil}_acl x (five data sets, ACL's own ImageNet-R setting, the demo)
    for rel, cfg in configs:
        assert host_values(cfg) == ACL_OFFICIAL[LEARNERS.resolve(cfg.model_name)], rel


def test_acl_host_values_for_l2p_and_dualprompt_and_overrides():
    from models.sparse.acl import HOST_VALUES

    assert HOST_VALUES["l2p"] == HOST_VALUES["dualprompt"] == (1e-6, 0.0)  # ACL_code exps/{l2p,dualprompt}_inr.json
    cfg = load_config(REPO / "exps/ranpac_acl/cifar.json", ["warm_weight_decay=0.01", "warm_lr=0.002"])
    assert host_values(cfg) == (0.002, 0.01)


# ---- GPS: github FightingFighting/GPS train_scripts/vit/**/train_gps.sh ---------------------------------------------
GPS_OFFICIAL = {  # data set -> (times_para K, lr), batch 32, 100 epochs
    "cifar224": (1, 0.01),  # vtab/cifar_100
    "cub": (2, 0.003),  # fgvc/cub_2011
    "cars": (15, 0.0005),  # fgvc/stanford_cars
}
GPS_ASSUMED = {"imagenetr": (1, 0.01), "imageneta": (1, 0.01)}  # no official script: CIFAR-100's (deviations §6)


def test_gps_runs_at_the_official_k_and_learning_rate_of_each_data_set():
    configs = [(rel, cfg) for rel, cfg in loaded("gps") if cfg.dataset != "fmnist"]
    assert len(configs) == 10
    for rel, cfg in configs:
        k, lr = {**GPS_OFFICIAL, **GPS_ASSUMED}[cfg.dataset]
        assert cfg.gps_k == k, rel
        assert math.isclose(cfg.gps_lr, lr), rel


# ---- L2P and DualPrompt: one coherent source per config ----------------------------------------------------------
PROMPT_SOURCES = {
    # JH-LEE-KR/l2p-pytorch configs/cifar100_l2p.py: batch 16, 5 epochs, lr 0.03 x 16 / 256, clip 1.0
    "l2p-pytorch cifar100": dict(batch_size=16, prompt_epochs=5, prompt_lr=0.03 * 16 / 256, prompt_clip_norm=1.0),
    # sun-hailong/LAMDA-PILOT exps/l2p_inr.json: batch 32, 10 epochs, init_lr 0.001875, no clipping in models/l2p.py
    "PILOT l2p_inr": dict(batch_size=32, prompt_epochs=10, prompt_lr=0.001875, prompt_clip_norm=0.0),
    # JH-LEE-KR/dualprompt-pytorch configs/cifar100_dualprompt.py
    "dualprompt-pytorch cifar100": dict(batch_size=24, prompt_epochs=5, prompt_lr=0.03 * 24 / 256,
                                        prompt_clip_norm=1.0, prompt_length=5, batchwise_prompt=True),
    # JH-LEE-KR/dualprompt-pytorch configs/imr_dualprompt.py
    "dualprompt-pytorch imr": dict(batch_size=24, prompt_epochs=50, prompt_lr=0.005 * 24 / 256,
                                   prompt_clip_norm=1.0, prompt_length=20, batchwise_prompt=False),
}
#: (learner, data set) -> source; the data sets without an official config take the source named in deviations §7
PROMPT_CONFIG_SOURCE = {("l2p", "imagenetr"): "PILOT l2p_inr",
                        ("dualprompt", "cifar224"): "dualprompt-pytorch cifar100"}
PROMPT_DEFAULT_SOURCE = {"l2p": "l2p-pytorch cifar100", "dualprompt": "dualprompt-pytorch imr"}


@pytest.mark.parametrize("learner", ["l2p", "dualprompt"])
def test_prompt_host_configs_take_every_training_value_from_one_source(learner):
    configs = [(rel, cfg) for rel, cfg in loaded(learners=(learner,)) if cfg.dataset != "fmnist"]
    assert len(configs) == 10  # with and without MIST on five data sets
    for rel, cfg in configs:
        source = PROMPT_CONFIG_SOURCE.get((learner, cfg.dataset), PROMPT_DEFAULT_SOURCE[learner])
        for key, want in PROMPT_SOURCES[source].items():
            got = getattr(cfg, key)
            assert (math.isclose(got, want) if isinstance(want, float) else got == want), (rel, source, key, got)
