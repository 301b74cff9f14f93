"""backbones: a weights file that does not fit the model stops the run; wrapper prefixes are removed (issue 8).

Every case writes a real weights file (.safetensors, .pth, Google .npz) of a tiny timm ViT (or of another
architecture) into tmp_path and loads it through ``build_backbone(..., weights_path=...)``, the path a
config's ``weights_path`` takes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import backbones
from backbones import WeightsFileError, build_backbone, create_pretrained_checked
from utils.errors import ConfigError, UserError

from conftest import TINY_VIT_KWARGS, TINY_VIT_NAME, tiny_run_dict
from test_backbones_npz import _to_google_npz

REPO = Path(__file__).resolve().parents[1]


def _tiny_state(seed: int = 123, **overrides) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = timm.create_model(TINY_VIT_NAME, pretrained=False, num_classes=0, **{**TINY_VIT_KWARGS, **overrides})
    return model.eval(), {k: v.contiguous().clone() for k, v in model.state_dict().items()}


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def _load(path: Path, **overrides) -> torch.nn.Module:
    torch.manual_seed(999)  # a different random init underneath: loading must overwrite all of it
    return build_backbone(TINY_VIT_NAME, pretrained=True, weights_path=str(path), **{**TINY_VIT_KWARGS, **overrides})


def _assert_same(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


# ---------------------------------------------------------------------------------------------
# files that fit, with and without wrappers
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_plain_state_dict_loads(tmp_path, suffix):
    _, state = _tiny_state()
    _assert_same(_load(_save(state, tmp_path / f"w{suffix}")), state)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
@pytest.mark.parametrize("prefix", ["convnet.", "module.", "backbone.", "_orig_mod.", "model.", "module.convnet."])
def test_wrapper_prefix_is_removed_and_logged(tmp_path, caplog, suffix, prefix):
    _, state = _tiny_state()
    wrapped = {prefix + k: v for k, v in state.items()}
    # the MIST/RanPAC network wrapper saves its classifier next to the backbone: fc.weight, fc.sigma
    wrapped["fc.weight"] = torch.randn(10, 32)
    wrapped["fc.sigma"] = torch.ones(1)
    caplog.set_level(logging.INFO, logger="backbones")
    _assert_same(_load(_save(wrapped, tmp_path / f"w{suffix}")), state)
    assert any("removed the key prefix" in r.getMessage() and prefix in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "model_state_dict"])
def test_checkpoint_wrapper_key(tmp_path, wrapper):
    _, state = _tiny_state()
    checkpoint = {wrapper: {"convnet." + k: v for k, v in state.items()}, "epoch": 3, "tasks": 2}
    _assert_same(_load(_save(checkpoint, tmp_path / "ckpt.pth")), state)


def test_21k_head_in_file_is_ignored(tmp_path):
    _, state = _tiny_state()
    with_head = {**state, "head.weight": torch.randn(21843, 32), "head.bias": torch.zeros(21843)}
    _assert_same(_load(_save(with_head, tmp_path / "w.safetensors")), state)


# ---------------------------------------------------------------------------------------------
# files that do not fit: one error with the file, counts and examples
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_other_architecture_is_rejected(tmp_path, suffix):
    other = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0)
    path = _save({k: v.contiguous() for k, v in other.state_dict().items()}, tmp_path / f"mobilenet{suffix}")
    with pytest.raises(WeightsFileError) as info:
        _load(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "30 of the model's 30 tensors missing" in msg and "'cls_token'" in msg
    assert f"{len(other.state_dict())} of the file's {len(other.state_dict())} tensors unexpected" in msg
    assert any(repr(k) in msg for k in other.state_dict())  # an example of the file's keys
    assert isinstance(info.value, UserError) and "\n" not in msg


def test_partial_file_is_rejected(tmp_path):
    _, state = _tiny_state()
    keys = list(state)
    half = {k: state[k] for k in keys[: len(keys) // 2]}
    path = _save(half, tmp_path / "half.safetensors")
    with pytest.raises(WeightsFileError) as info:
        _load(path)
    msg = str(info.value)
    assert f"{len(keys) - len(half)} of the model's {len(keys)} tensors missing" in msg
    assert repr(keys[len(keys) // 2]) in msg  # the first missing key as the example
    assert f"0 of the file's {len(half)} tensors unexpected" in msg


def test_partial_file_with_prefix_reports_after_stripping(tmp_path):
    _, state = _tiny_state()
    keys = list(state)
    path = _save({"convnet." + k: state[k] for k in keys[:-1]}, tmp_path / "partial.pth")
    with pytest.raises(WeightsFileError, match=r"after removing the key prefix 'convnet\.'.*1 of the model's"):
        _load(path)


def test_wrong_shape_is_rejected(tmp_path):
    _, state = _tiny_state()
    state["blocks.1.attn.proj.weight"] = torch.randn(32, 16)
    path = _save(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsFileError) as info:
        _load(path)
    msg = str(info.value)
    assert "1 with a different shape" in msg
    assert "'blocks.1.attn.proj.weight': file (32, 16) vs model (32, 32)" in msg


def test_wider_vit_is_rejected_with_shapes(tmp_path):
    _, state = _tiny_state(embed_dim=48, num_heads=2)
    with pytest.raises(WeightsFileError, match=r"30 with a different shape \(e\.g\. 'cls_token': file \(1, 1, 48\)"):
        _load(_save(state, tmp_path / "wide.safetensors"))


def test_deeper_vit_is_rejected(tmp_path):
    """A 3-block file into a 2-block model: the third block would be dropped silently by strict=False."""
    _, state = _tiny_state(depth=3)
    with pytest.raises(WeightsFileError, match=r"12 of the file's 42 tensors unexpected \(e\.g\. 'blocks\.2\."):
        _load(_save(state, tmp_path / "deep.safetensors"))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_is_reported(tmp_path, suffix):
    _, state = _tiny_state()
    path = _save(state, tmp_path / f"w{suffix}")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match="cannot read .*w" + suffix.replace(".", r"\.") + ".*truncated"):
        _load(path)


def test_checkpoint_with_pickled_objects_is_reported(tmp_path):
    import argparse

    _, state = _tiny_state()
    path = tmp_path / "train_ckpt.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(WeightsFileError, match=r"train_ckpt\.pth .*refuses the pickled Python object "
                                               r"argparse\.Namespace.*torch\.save\(model\.state_dict\(\), path\)"):
        _load(path)


def test_non_tensor_checkpoint_is_reported(tmp_path):
    path = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(WeightsFileError, match="holds no tensors"):
        _load(path)


# ---------------------------------------------------------------------------------------------
# Google .npz through timm's npz loader
# ---------------------------------------------------------------------------------------------
def test_npz_deeper_file_is_rejected(tmp_path):
    source, _ = _tiny_state(depth=3)
    path = tmp_path / "deep.npz"
    _to_google_npz(source, path)
    with pytest.raises(WeightsFileError) as info:
        _load(path)
    msg = str(info.value)
    assert str(path) in msg and "0 of the model's 30 tensors missing" in msg
    assert "16 of the file's" in msg and "Transformer/encoderblock_2/" in msg


def test_npz_missing_array_is_rejected(tmp_path):
    source, _ = _tiny_state(depth=1)
    path = tmp_path / "shallow.npz"
    _to_google_npz(source, path)
    expected = r"shallow\.npz .*the array 'Transformer/encoderblock_1/LayerNorm_0/scale' that timm's npz loader needs"
    with pytest.raises(WeightsFileError, match=expected + " .* is missing"):
        _load(path)


def test_npz_wrong_shape_is_rejected(tmp_path):
    source, _ = _tiny_state(embed_dim=48, num_heads=2)
    path = tmp_path / "wide.npz"
    _to_google_npz(source, path)
    with pytest.raises(WeightsFileError, match=r"wide\.npz does not fit .*shape mismatch while copying the array"):
        _load(path)


def test_npz_tensor_the_loader_never_writes_is_missing(tmp_path):
    """global_pool='avg' moves the final norm to fc_norm, which timm's npz loader does not fill."""
    source, _ = _tiny_state()
    path = tmp_path / "cls.npz"
    _to_google_npz(source, path)
    with pytest.raises(WeightsFileError) as info:
        _load(path, global_pool="avg")
    msg = str(info.value)
    assert "2 of the model's 30 tensors missing" in msg and "'fc_norm.weight'" in msg
    assert "'Transformer/encoder_norm/scale'" in msg


# ---------------------------------------------------------------------------------------------
# timm's own pretrained loader (hub or cache) and EfficientNet-Lite0
# ---------------------------------------------------------------------------------------------
def test_timm_pretrained_loader_report_is_checked(tmp_path):
    """create_pretrained_checked reads timm's missing/unexpected-key report (strict=False when the head is dropped)."""
    name = TINY_VIT_NAME
    _, state = _tiny_state(depth=3)
    state = {**state, "head.weight": torch.randn(21843, 32), "head.bias": torch.zeros(21843)}
    path = _save(state, tmp_path / "deep.safetensors")
    kwargs = {"num_classes": 0, **TINY_VIT_KWARGS}
    overlay = {"pretrained_cfg_overlay": {"file": str(path), "custom_load": False}}
    with pytest.raises(WeightsFileError, match=r"do not fit .* 12 weights unexpected \(e\.g\. 'blocks\.2\."):
        create_pretrained_checked(name, kwargs, TINY_VIT_KWARGS, "test", **overlay)
    model = create_pretrained_checked(name, {**kwargs, "depth": 3}, {**TINY_VIT_KWARGS, "depth": 3}, "test", **overlay)
    torch.testing.assert_close(model.state_dict()["blocks.2.norm1.weight"], state["blocks.2.norm1.weight"])


def test_efficientnet_lite0_file_with_timm_names_and_prefix(tmp_path):
    torch.manual_seed(5)
    source = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    path = _save({"convnet." + k: v for k, v in state.items()}, tmp_path / "lite0.pth")
    model = build_backbone("efficientnet_lite0", pretrained=True, weights_path=str(path))
    _assert_same(model, state)


def test_efficientnet_lite0_rejects_a_vit_file(tmp_path):
    _, state = _tiny_state()
    path = _save(state, tmp_path / "vit.pth")
    with pytest.raises(WeightsFileError, match=r"vit\.pth holds 30 tensors .* tf_efficientnet_lite0 has 294"):
        build_backbone("efficientnet_lite0", pretrained=True, weights_path=str(path))


# ---------------------------------------------------------------------------------------------
# backbone_kwargs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, fragment", [({"depht": 2}, "unexpected keyword argument 'depht'"),
                                           ({"img_size": "x"}, "TypeError"),
                                           ({"embed_dim": 33}, "AssertionError")])
def test_bad_backbone_kwargs_raise_config_error(bad, fragment):
    with pytest.raises(ConfigError) as info:
        build_backbone(TINY_VIT_NAME, pretrained=False, **{**TINY_VIT_KWARGS, **bad})
    msg = str(info.value)
    assert "backbone_kwargs" in msg and TINY_VIT_NAME in msg and fragment in msg


def test_bad_backbone_kwargs_with_weights_path_raise_config_error(tmp_path):
    _, state = _tiny_state()
    path = _save(state, tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="depht"):
        build_backbone(TINY_VIT_NAME, pretrained=True, weights_path=str(path), depht=2, **TINY_VIT_KWARGS)


def test_bad_backbone_kwargs_on_hub_path_is_a_config_error(monkeypatch):
    monkeypatch.setattr(backbones, "_hub_available", lambda cfg: True)
    with pytest.raises(ConfigError, match="depht"):
        build_backbone(TINY_VIT_NAME, pretrained=True, depht=2, **TINY_VIT_KWARGS)


# ---------------------------------------------------------------------------------------------
# main.py: one line, exit status 2
# ---------------------------------------------------------------------------------------------
def test_main_reports_mismatched_weights_in_one_line(tmp_path, image_folder):
    root = image_folder("cub", "test", n_classes=6, train_per_class=1, test_per_class=1)
    _, state = _tiny_state(depth=3)
    path = _save(state, tmp_path / "deep.safetensors")
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run_dict(root, pretrained=True, weights_path=str(path))))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", "--config", str(config), "--output-dir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(path) in error_lines[0] and "unexpected" in error_lines[0]
