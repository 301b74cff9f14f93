"""Configurations of the tuning phase that would do nothing, or something else than they say, are refused or warned
about before any training (issue 16, item 4; ``models/sparse/sanity.py``), and results.json says what could train."""

from __future__ import annotations

import logging

import pytest
import torch

from models.sparse.tuner import SparseTuner
from test_sparse_tuning import CPU, RANPAC_DEFAULTS, TINY_ENTRIES, make_cfg, make_loader, make_task, tiny_backbone

SANITY = "models.sparse.sanity"


def build(*overrides: str, defaults=None) -> SparseTuner:
    return SparseTuner(make_cfg(*overrides), tiny_backbone(), CPU, 7, defaults or RANPAC_DEFAULTS)


def warnings_of(caplog, *overrides: str, defaults=None) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=SANITY):
        build(*overrides, defaults=defaults)
    return [r.getMessage() for r in caplog.records if r.name == SANITY]


@pytest.mark.parametrize("overrides", [("spr=mist",), ("spr=piece_f", "mi_epochs=2"), ("spr=magnitude_gate",),
                                       ("spr=mist_random",), ("spr=piece_f", "top_ratio=0.01")])
def test_valid_configs_give_no_warning(caplog, overrides):
    assert warnings_of(caplog, *overrides) == []


def test_a_top_ratio_below_one_entry_selects_one_as_piece_and_says_so(caplog):
    """PIECE takes k = max(1, floor(N x top_ratio)) (official extract_and_save_new.py): a ratio below 1 / N selects
    one entry, with a warning that says what then trains."""
    ratio = 0.5 / TINY_ENTRIES  # floor(0.5) = 0 entries -> 1
    (msg,) = warnings_of(caplog, "spr=piece_f", f"top_ratio={ratio}")
    assert "'top_ratio'" in msg and "selects one entry" in msg and "fully trainable" in msg
    candidates = TINY_ENTRIES - (32 + 17 * 32 + 32 * 3 * 8 * 8 + 32)  # PIECE excludes cls, pos and patch embedding
    assert f"{100 * candidates / TINY_ENTRIES:.1f}% of the backbone trains" in msg
    (msg,) = warnings_of(caplog, "spr=piece_f", f"top_ratio={ratio}", "strict_mask=true")
    assert "only that entry trains" in msg


def test_gate_budgets_in_the_wrong_order_are_named(caplog):
    (msg,) = warnings_of(caplog, "spr=magnitude_gate", "gate_budget_small=0.05", "gate_budget_large=0.01")
    assert "gate_budget_small = 0.05" in msg and "gate_budget_large = 0.01" in msg


def test_one_epoch_of_a_scoring_preset_is_named_as_no_update(caplog):
    for spr in ("mist", "piece_f"):
        (msg,) = warnings_of(caplog, f"spr={spr}", "mi_epochs=1")
        assert "mi_epochs = 1" in msg and "no update" in msg
    assert warnings_of(caplog, "spr=rand", "ablation_epochs=1") == []  # a per-step preset trains in its one epoch


@pytest.mark.parametrize("overrides,key", [(("spr=mist", "top_ratio=0.01"), "top_ratio"),
                                           (("spr=piece_f", "gate_threshold=0.2"), "gate_threshold"),
                                           (("spr=mist", "adam_lr=0.001"), "adam_lr")])
def test_keys_the_preset_ignores_are_named(caplog, overrides, key):
    (msg,) = warnings_of(caplog, *overrides)
    assert f"'{key}'" in msg and "is ignored" in msg and overrides[0].split("=")[1] in msg


def test_gate_ema_is_named_when_the_memory_is_the_previous_task(caplog):
    (msg,) = warnings_of(caplog, "spr=magnitude_gate", "gate_memory=previous", "gate_ema=0.9")
    assert "'gate_ema'" in msg and "previous" in msg
    assert warnings_of(caplog, "spr=magnitude_gate", "gate_memory=ema", "gate_ema=0.9") == []


def test_a_preset_rebuilt_by_composition_keys_runs_and_is_reported_under_its_name(caplog):
    tuner = build("spr=mist_random", "importance=mi_fisher")
    assert tuner.recipe == build("spr=mist").recipe and tuner.policy == "mist"
    loader = make_loader()
    assert tuner.tune(loader, make_task(0, loader))["method"] == "mist"
    assert build("spr=mist_random", "importance=fisher").policy == "mist_random"  # a real composition keeps its name


def test_freeze_quantile_zero_is_named_and_results_report_what_could_train(caplog):
    (msg,) = warnings_of(caplog, "spr=mist", "freeze_quantile=0", "mi_epochs=2")
    assert "freeze_quantile = 0" in msg
    torch.manual_seed(0)
    tuner = build("spr=mist", "freeze_quantile=0", "mi_epochs=2")
    loader = make_loader()
    first = tuner.tune(loader, make_task(0, loader))
    second = tuner.tune(loader, make_task(1, loader))
    assert first["trainable_fraction"] == first["selected_fraction"] > 0  # nothing frozen yet
    exempt = sum(tuner.state.shapes[n].numel() for n in tuner.backbone_names if tuner.state.exempt[n])
    assert second["selected_fraction"] > 0.1
    assert second["trainable_fraction"] == pytest.approx(exempt / TINY_ENTRIES)  # only the never-frozen exempt ones
