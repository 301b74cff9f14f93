"""What data a run was trained and evaluated on (issue 26): per split the image count per class and a digest of the
file list (names and sizes) or of the pixel arrays, recorded in results.json when a seed starts and compared when it
resumes, so that images deleted, added or replaced between a stop and ``--resume`` are refused with the difference
instead of silently changing the results."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from utils.datasets import DataSource, Split


def split_identity(split: Split) -> dict[str, Any]:
    """``{"images": N, "per_class": [count of original label 0, 1, ...], "sha256": hex}`` of one split: the digest
    covers the labels and, for a file list, each file's class folder, name and size (a file rewritten with other
    bytes of the same size is not detected), for an array data set the pixels (CIFAR-100: about 0.3 s).

    Raises:
        OSError: a listed file cannot be stat'ed (deleted since it was listed).
    """
    digest = hashlib.sha256(np.asarray(split.targets, dtype=np.int64).tobytes())
    if isinstance(split.items, np.ndarray):
        digest.update(np.ascontiguousarray(split.items).tobytes())
    else:
        for item in split.items:
            path = Path(item)
            digest.update(f"{path.parent.name}/{path.name}\t{os.stat(path).st_size}\n".encode())
    counts = np.bincount(np.asarray(split.targets, dtype=np.int64), minlength=0)
    return {"images": int(len(split.targets)), "per_class": [int(c) for c in counts], "sha256": digest.hexdigest()}


def source_identity(source: DataSource) -> dict[str, Any]:
    """:func:`split_identity` of the train and the test split."""
    return {"train": split_identity(source.train), "test": split_identity(source.test)}


def differences(then: dict[str, Any], now: dict[str, Any], limit: int = 5) -> list[str]:
    """Human-readable differences between two :func:`source_identity` records (empty when they agree)."""
    out = []
    for split in ("train", "test"):
        a, b = then.get(split, {}), now.get(split, {})
        if a == b:
            continue
        ca, cb = a.get("per_class", []), b.get("per_class", [])
        changed = [f"class {c}: {ca[c] if c < len(ca) else 0} then, {cb[c] if c < len(cb) else 0} now"
                   for c in range(max(len(ca), len(cb)))
                   if (ca[c] if c < len(ca) else 0) != (cb[c] if c < len(cb) else 0)]
        if changed:
            more = f" and {len(changed) - limit} more" if len(changed) > limit else ""
            out.append(f"{split}: {a.get('images')} images then, {b.get('images')} now ({'; '.join(changed[:limit])}"
                       f"{more})")
        else:
            out.append(f"{split}: the same {a.get('images')} images per class, but other files or contents")
    return out
