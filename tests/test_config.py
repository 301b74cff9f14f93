"""utils.config: every shipped JSON loads, and bad keys/values fail with a message that says what to fix."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from utils.config import ExperimentConfig, config_from_dict, load_config
from utils.errors import ConfigError
from utils.registry import LEARNERS

REPO = Path(__file__).resolve().parents[1]
# every shipped config (exps/ledger.json is the results ledger, not a config)
EXP_FILES = sorted(p for p in (REPO / "exps").glob("**/*.json") if p.name != "ledger.json")


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("path", EXP_FILES or [None], ids=lambda p: str(p.relative_to(REPO)) if p else "none")
def test_every_shipped_config_loads(path):
    if path is None:
        pytest.skip("no JSON files under exps/")
    raw = json.loads(path.read_text())
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.config == str(path)
    for key in ("dataset", "init_cls", "increment", "model_name"):
        if key in raw:
            assert getattr(cfg, key) == raw[key]


def test_unknown_key_names_file_key_and_closest_valid_key(tmp_path):
    path = write_json(tmp_path / "typo.json", {"dataset": "cub", "selct_rate": 0.2})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "'selct_rate'" in msg
    assert "'select_rate'" in msg


def test_unknown_override_key_names_closest_valid_key():
    with pytest.raises(ConfigError, match="mi_epoch.*mi_epochs"):
        load_config(None, ["mi_epoch=2"])


@pytest.mark.parametrize(
    "key, value",
    [("init_cls", "ten"), ("mi_epochs", 2.5), ("select_rate", "high"), ("shuffle", 1), ("seed", ["a"]),
     ("backbone_kwargs", [1, 2])],
)
def test_wrong_type_names_key_and_value(tmp_path, key, value):
    path = write_json(tmp_path / "bad.json", {key: value})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"'{key}'" in msg
    shown = value[0] if key == "seed" else value
    assert repr(shown) in msg
    assert str(path) in msg


@pytest.mark.parametrize("key, value", [("select_rate", 0), ("drop_rate", 1), ("init_cls", 0), ("increment", 0),
                                        ("select_rate", 1.5), ("drop_rate", -0.1)])
def test_out_of_range_values_fail(key, value):
    with pytest.raises(ConfigError, match=f"'{key}' has value {value!r}"):
        config_from_dict({key: value})


def test_range_boundaries_that_are_allowed():
    cfg = config_from_dict({"select_rate": 1, "drop_rate": 0, "init_cls": 1})
    assert (cfg.select_rate, cfg.drop_rate, cfg.init_cls) == (1.0, 0.0, 1)
    assert cfg.keep_prob == 1.0


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("True", True), ("true", True)])
def test_use_rp_accepts_bools_and_true_strings_silently(value, expected):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = config_from_dict({"use_RP": value})
    assert cfg.use_RP is expected


def test_use_rp_false_string_parses_false_and_warns():
    with pytest.warns(UserWarning, match="use_RP"):
        cfg = config_from_dict({"use_RP": "False"})
    assert cfg.use_RP is False


def test_use_rp_rejects_other_strings():
    with pytest.raises(ConfigError, match="use_RP"):
        config_from_dict({"use_RP": "yes"})


def test_set_overrides_parse_against_field_types():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a command-line False is a plain bool: no warning about the JSON quirk
        cfg = load_config(None, ["seed=[1,2]", "device=cpu", "use_RP=False", "mi_epochs=2", "spr=none",
                                 "select_rate=0.5", "backbone_kwargs={\"depth\": 2}"])
    assert cfg.seed == [1, 2]
    assert cfg.device == ["cpu"]
    assert cfg.use_RP is False
    assert cfg.mi_epochs == 2 and isinstance(cfg.mi_epochs, int)
    assert cfg.spr == "none" and cfg.tuning is None
    assert cfg.select_rate == 0.5
    assert cfg.backbone_kwargs == {"depth": 2}


def test_weights_path_with_pretrained_false_is_an_error():
    with pytest.raises(ConfigError, match="weights_path.*pretrained"):
        config_from_dict({"weights_path": "/tmp/w.pth", "pretrained": False})


def test_set_overrides_win_over_the_file(tmp_path):
    path = write_json(tmp_path / "c.json", {"dataset": "cub", "mi_epochs": 20, "device": ["0"]})
    cfg = load_config(path, ["mi_epochs=3", "device=-1", "spr=null"])
    assert cfg.mi_epochs == 3
    assert cfg.device == ["-1"]
    assert cfg.spr == "none"
    assert cfg.dataset == "cub"


def test_set_override_wrong_type_and_missing_equals_fail():
    with pytest.raises(ConfigError, match="mi_epochs"):
        load_config(None, ["mi_epochs=two"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["mi_epochs"])


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model_name": "ranpak"})
    msg = str(info.value)
    assert "'ranpak'" in msg
    for name in LEARNERS.accepted():
        assert name in msg


def test_official_model_names_are_aliases():
    assert config_from_dict({"model_name": "ranpac_mist"}).model_name == "ranpac_mist"
    assert config_from_dict({"model_name": "simplecil_mist"}).model_name == "simplecil_mist"


def test_unknown_dataset_and_spr_fail():
    with pytest.raises(ConfigError, match="dataset"):
        config_from_dict({"dataset": "cifar100"})
    with pytest.raises(ConfigError, match="spr"):
        config_from_dict({"spr": "magic"})


def test_backbone_type_alias_wins_over_convnet_type():
    cfg = config_from_dict({"convnet_type": "pretrained_vit_b16_224_in21k", "backbone_type": "efficientnet_lite0"})
    assert cfg.convnet_type == "efficientnet_lite0"
    assert config_from_dict({"convnet_type": "efficientnet_lite0"}).convnet_type == "efficientnet_lite0"


def test_missing_and_invalid_files_raise_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.json")
    bad = tmp_path / "broken.json"
    bad.write_text('{"dataset": "cub",,}')
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(bad)


def test_official_ranpac_json_keys_load(tmp_path):
    """The keys of the official RanPAC-MIST CIFAR config (algorithms.md §1.2), string "True" included."""
    official = {"prefix": "exp", "dataset": "cifar224", "memory_size": 2000, "memory_per_class": 20,
                "fixed_memory": False, "shuffle": True, "init_cls": 10, "increment": 10,
                "model_name": "ranpac_mist", "convnet_type": "pretrained_vit_b16_224_in21k", "device": ["0"],
                "seed": [1993], "batch_size": 56, "weight_decay": 0.0005, "min_lr": 0, "optimizer": "sgd",
                "use_RP": "True", "M": 10000, "spr": "mist", "select_rate": 0.1, "drop_rate": 0.9,
                "mi_epochs": 20, "prompt_token_num": 30, "ffn_num": 64}
    cfg = load_config(write_json(tmp_path / "official.json", official))
    assert cfg.use_RP is True
    assert cfg.seed == [1993] and cfg.device == ["0"]
    assert cfg.keep_prob == pytest.approx(0.1)
    assert cfg.min_lr == 0.0


def test_the_lower_floor_does_not_import_the_upper_one():
    """utils/ never imports models/ (checked by importing it alone), and models/sparse/ never imports the
    learner modules that build it (checked in the source) (issue 6, tidy house)."""
    import ast
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; import utils.config, utils.report, utils.registry, utils.metrics; "
            "bad = [m for m in sys.modules if m == 'models' or m.startswith('models.')]; assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in sorted((repo / "models" / "sparse").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module not in ("models", "models.base", "models.ranpac", "models.simplecil",
                                           "models.slca"), path.name


def test_mist_keys_live_in_mists_group_with_their_official_names():
    """Issue 27: select_rate, drop_rate, mi_epochs (official JSON keys), freeze_quantile and MIST's fixes are MIST's
    component keys, not core fields; the official names still load and read as before."""
    from models.sparse.presets import MistKeys
    from utils.config import CORE_FIELDS, KEY_GROUPS

    mist = {"select_rate", "drop_rate", "mi_epochs", "freeze_quantile", "exclude_self_positive", "sparse_weight_decay",
            "hard_freeze"}
    assert not mist & set(CORE_FIELDS)
    (group,) = [g for g in KEY_GROUPS if g.title.startswith("MIST")]
    assert set(group.names) == mist
    cfg = config_from_dict({"select_rate": 0.2, "drop_rate": 0.5, "mi_epochs": 3})
    assert (cfg.select_rate, cfg.drop_rate, cfg.mi_epochs, cfg.keep_prob) == (0.2, 0.5, 3, 0.5)
    keys = MistKeys.of(cfg)
    assert isinstance(keys, MistKeys) and (keys.select_rate, keys.mi_epochs, keys.hard_freeze) == (0.2, 3, False)
    with pytest.raises(ConfigError, match="select_rate"):
        config_from_dict({"select_rate": 0})


@pytest.mark.parametrize("raw, unread", [
    ({"spr": "mist", "top_ratio": 0.01}, {"top_ratio"}),  # PIECE's budget with MIST
    ({"spr": "piece_f", "select_rate": 0.2, "top_ratio": 0.01}, {"select_rate"}),  # MIST's budget with PIECE
    ({"spr": "none", "select_rate": 0.2, "gps_k": 3}, {"select_rate", "gps_k"}),  # no tuning phase reads anything
    ({"spr": "gps", "gps_k": 3, "drop_rate": 0.5}, {"drop_rate"}),  # GPS has no random drop
    ({"spr": "mist", "drop_rate": 0.5, "freeze_quantile": 0.9, "mist_lr": 1e-3}, set()),  # all MIST's
    ({"spr": "ce_finetune", "mist_lr": 1e-3, "hard_freeze": True}, set()),  # its SGD's rate and the step's fix
    ({"spr": "mist", "importance": "fisher", "top_ratio": 0.01}, set()),  # a composition key: parts unknown, no claim
    ({"model_name": "ranpac", "ca_epochs": 3}, {"ca_epochs"}),  # SLCA's key with RanPAC
])
def test_keys_the_run_does_not_read_are_named(raw, unread):
    from utils.config import inactive_keys

    got = inactive_keys(config_from_dict(raw))
    assert {k.key for k in got} == unread
    for k in got:
        assert k.owner and k.why


def test_strict_keys_turns_an_unread_key_into_an_error_naming_key_owner_and_spr():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"spr": "mist", "top_ratio": 0.01, "strict_keys": True}, "x.json")
    msg = str(info.value)
    assert "x.json: key 'top_ratio' = 0.01 has no effect" in msg and "PIECE" in msg and "spr 'mist'" in msg
    assert config_from_dict({"spr": "piece_f", "top_ratio": 0.01, "strict_keys": True}).top_ratio == 0.01
