"""Google's ViT ``.npz`` checkpoints loaded through timm's own npz reader, with every array's use checked (issue 8):
an array of the file that no model tensor read, or a model tensor no array filled, is an error naming them."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
from torch import nn

from backbones.weights import NPZ_HEAD_PREFIXES, WeightsFileError, _head_prefixes, _is_head, _mismatch_error

logger = logging.getLogger(__name__)


class _ReadTracker:
    """An ``np.load`` archive that records the keys read from it."""

    def __init__(self, archive: Any) -> None:
        self._archive, self.read, self.last = archive, set(), None

    def __getitem__(self, key: str):
        self.read.add(key)
        self.last = key
        return self._archive[key]

    def __contains__(self, key: object) -> bool:
        return key in self._archive

    def __iter__(self):
        return iter(self._archive)

    def __getattr__(self, attr: str):
        return getattr(self._archive, attr)


_TRACK_LOCK = threading.Lock()


@contextlib.contextmanager
def _track_npz_reads(model: nn.Module) -> Iterator[Optional[list[_ReadTracker]]]:
    """While active, ``.npz`` archives opened by the model's timm loader record the keys read.

    Yields None when the architecture module has no ``_load_npz_checkpoint`` (timm < 1.0.2x): no tracking.
    """
    module = sys.modules.get(type(model).__module__)
    opener = getattr(module, "_load_npz_checkpoint", None)
    if opener is None:
        yield None
        return
    trackers: list[_ReadTracker] = []

    def tracking_opener(*args: Any, **kwargs: Any) -> _ReadTracker:
        trackers.append(_ReadTracker(opener(*args, **kwargs)))
        return trackers[-1]

    with _TRACK_LOCK:
        module._load_npz_checkpoint = tracking_opener
        try:
            yield trackers
        finally:
            module._load_npz_checkpoint = opener


def _npz_prefix(files: Sequence[str]) -> str:
    """The parameter prefix timm's ViT npz loader picks (AugReg: none; big_vision: params/ or params/img/)."""
    for prefix in ("opt/target/", "params/", "params/img/"):
        if prefix + "embedding/kernel" in files:
            return prefix
    return ""


def load_npz_file(model: nn.Module, path: Path, name: str) -> None:
    """Load a Google ``.npz`` checkpoint through timm's loader (``model.load_pretrained``) and check it.

    timm's loader reads the arrays it needs by name and copies them into the model: it ignores arrays it
    does not ask for (e.g. blocks beyond the model's depth) and leaves model tensors it has no rule for at
    their random init. After loading, every model tensor must have been written (its in-place version
    counter moved) and every array under the checkpoint's prefix must have been read (classifier
    ``head/``, ``pre_logits/`` excepted).

    Raises:
        WeightsFileError: the architecture has no npz loader; an array is missing, has the wrong shape, or
            is left unread; a model tensor was not written.
    """
    if not hasattr(model, "load_pretrained"):
        raise WeightsFileError(f"key 'weights_path': {path} is a Google .npz checkpoint, but timm {name} has no "
                               "loader for that format; save the weights as .safetensors or .pth.")
    try:
        with np.load(path, allow_pickle=False) as archive:
            files = list(archive.files)
    except Exception as exc:  # noqa: BLE001 - truncated or not a zip
        raise WeightsFileError(f"key 'weights_path': cannot read {path} as an .npz archive "
                               f"({type(exc).__name__}: {exc}).") from None
    tensors = model.state_dict(keep_vars=True)
    heads = _head_prefixes(model)
    before = {k: t._version for k, t in tensors.items()}
    with _track_npz_reads(model) as trackers:
        try:
            model.load_pretrained(str(path))
        except KeyError as exc:
            key = trackers[-1].last if trackers and trackers[-1].last else (exc.args[0] if exc.args else "?")
            raise WeightsFileError(f"key 'weights_path': {path} does not fit timm {name}: the array {key!r} that "
                                   "timm's npz loader needs for this architecture is missing from the file (the "
                                   "loader stops at the first missing array; more may be missing). Point weights_path "
                                   "at weights of this architecture (same convnet_type and backbone_kwargs).") from None
        except (RuntimeError, ValueError) as exc:
            last = trackers[-1].last if trackers else None
            where = f" while copying the array {last!r}" if last else ""
            raise WeightsFileError(f"key 'weights_path': {path} does not fit timm {name}: shape mismatch{where} "
                                   f"({type(exc).__name__}: {exc}). Point weights_path at weights of this "
                                   "architecture (same convnet_type and backbone_kwargs).") from None
    missing = [k for k, t in tensors.items() if t._version == before[k] and not _is_head(k, heads)
               and not k.endswith("num_batches_tracked")]
    prefix = _npz_prefix(files)
    if trackers:
        read = set().union(*(t.read for t in trackers))
        unexpected = [k for k in files if k.startswith(prefix) and k not in read
                      and not k[len(prefix):].startswith(NPZ_HEAD_PREFIXES)]
    else:  # no tracking in this timm version: at least blocks beyond the model's depth
        depth = len(getattr(model, "blocks", ()))
        unexpected = [k for k in files if (m := re.search(r"encoderblock_(\d+)/", k)) and int(m.group(1)) >= depth]
    if missing or unexpected:
        raise _mismatch_error(path, name, len(tensors), len(files), missing, unexpected, [], [])
