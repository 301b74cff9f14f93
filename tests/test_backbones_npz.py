"""backbones: a local Google big_vision/AugReg ``.npz`` checkpoint through ``build_backbone`` (algorithms.md §15.3).

No real AugReg checkpoint is available offline, so the test writes one: a tiny random timm ViT is
converted to Google's checkpoint format (the exact key names and array layouts that timm's
``timm.models.vision_transformer._load_weights`` reads; ``_to_google_npz`` is its inverse) and loaded
back through ``build_backbone(..., weights_path=<file>.npz)``. The missing-file error is already
covered by ``tests/test_backbones.py::test_missing_weights_path_raises``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

from backbones import build_backbone

from conftest import TINY_VIT_KWARGS, TINY_VIT_NAME

IN21K_CLASSES = 21843  # the real augreg_in21k checkpoint carries a 21843-way head


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def _to_google_npz(model: nn.Module, path: Path, head_classes: int = IN21K_CLASSES) -> None:
    """Write ``model`` (a plain timm ViT, class token, pre-norm) as an AugReg ``.npz`` checkpoint.

    Layouts (Flax): conv kernels HWIO, dense kernels (in, out), attention q/k/v kernels
    (D, heads, head_dim), attention out kernel (heads, head_dim, D), q/k/v biases (heads, head_dim).
    Block sub-module numbering of the AugReg (non big_vision) layout: LayerNorm_0 = norm1,
    MultiHeadDotProductAttention_1, LayerNorm_2 = norm2, MlpBlock_3.
    """
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    head_dim = dim // heads
    w: dict[str, np.ndarray] = {
        "embedding/kernel": _np(model.patch_embed.proj.weight).transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": _np(model.patch_embed.proj.bias),
        "cls": _np(model.cls_token),  # (1, 1, D)
        "Transformer/posembed_input/pos_embedding": _np(model.pos_embed),  # (1, 1 + N, D)
        "Transformer/encoder_norm/scale": _np(model.norm.weight),
        "Transformer/encoder_norm/bias": _np(model.norm.bias),
    }
    for i, block in enumerate(model.blocks):
        bp = f"Transformer/encoderblock_{i}/"
        mha = bp + "MultiHeadDotProductAttention_1/"
        w[bp + "LayerNorm_0/scale"] = _np(block.norm1.weight)
        w[bp + "LayerNorm_0/bias"] = _np(block.norm1.bias)
        qkv_w = _np(block.attn.qkv.weight)  # (3D, D), rows: q, k, v
        qkv_b = _np(block.attn.qkv.bias)
        for j, name in enumerate(("query", "key", "value")):
            w[mha + f"{name}/kernel"] = qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, heads, head_dim)
            w[mha + f"{name}/bias"] = qkv_b[j * dim:(j + 1) * dim].reshape(heads, head_dim)
        # proj.weight (D_out, D_in = heads * head_dim) -> (heads, head_dim, D_out)
        w[mha + "out/kernel"] = _np(block.attn.proj.weight).reshape(dim, heads, head_dim).transpose(1, 2, 0)
        w[mha + "out/bias"] = _np(block.attn.proj.bias)
        w[bp + "LayerNorm_2/scale"] = _np(block.norm2.weight)
        w[bp + "LayerNorm_2/bias"] = _np(block.norm2.bias)
        for r, fc in enumerate((block.mlp.fc1, block.mlp.fc2)):
            w[bp + f"MlpBlock_3/Dense_{r}/kernel"] = _np(fc.weight).T  # (in, out)
            w[bp + f"MlpBlock_3/Dense_{r}/bias"] = _np(fc.bias)
    rng = np.random.default_rng(0)
    w["head/kernel"] = rng.standard_normal((dim, head_classes), dtype=np.float32) * 0.01  # dropped: num_classes=0
    w["head/bias"] = np.zeros(head_classes, dtype=np.float32)
    np.savez(path, **w)


@pytest.fixture
def npz_checkpoint(tmp_path: Path) -> tuple[nn.Module, Path]:
    """A tiny random ViT and its weights written as an AugReg ``.npz`` file."""
    torch.manual_seed(123)
    source = timm.create_model(TINY_VIT_NAME, pretrained=False, num_classes=0, **TINY_VIT_KWARGS).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine params and biases (timm initialises them to 1 / 0)
        for name, param in source.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    path = tmp_path / "tiny_augreg_in21k.npz"
    _to_google_npz(source, path)
    return source, path


def test_npz_writer_round_trips_through_timm_loader(npz_checkpoint):
    """Guards the test's own writer: timm's ``_load_weights`` called directly restores every tensor."""
    source, path = npz_checkpoint
    torch.manual_seed(999)
    target = timm.create_model(TINY_VIT_NAME, pretrained=False, num_classes=0, **TINY_VIT_KWARGS).eval()
    target.load_pretrained(str(path))
    src_state, tgt_state = source.state_dict(), target.state_dict()
    assert set(tgt_state) == set(src_state)
    for key, value in src_state.items():
        torch.testing.assert_close(tgt_state[key], value, rtol=0, atol=0, msg=key)


def test_weights_path_loads_google_npz(npz_checkpoint):
    source, path = npz_checkpoint
    torch.manual_seed(999)  # a different random init underneath: loading must overwrite all of it
    loaded = build_backbone(TINY_VIT_NAME, pretrained=True, weights_path=str(path), **TINY_VIT_KWARGS)
    assert loaded.out_dim == 32 and not loaded.training
    src_state, loaded_state = source.state_dict(), loaded.state_dict()
    assert set(loaded_state) == set(src_state)
    for key, value in src_state.items():
        torch.testing.assert_close(loaded_state[key], value, rtol=0, atol=0, msg=key)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=1e-6, atol=1e-6)
