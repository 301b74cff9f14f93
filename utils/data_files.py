"""The files and arrays of a data set (``utils/datasets.py``): a :class:`Split` (images or file paths and their labels),
reading an image file with a clear error, checking every image file once up front (``verify_images``)."""

from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image

from utils.errors import UserError

logger = logging.getLogger(__name__)


class DataIntegrityError(UserError, ValueError):
    """Data that is present but damaged or inconsistent: the message names the files and what is wrong."""


class ImageReadError(DataIntegrityError):
    """An image file cannot be decoded; the message names the file and PIL's error.

    Takes one string, so a DataLoader worker can re-raise it in the main process (``ExceptionWrapper``
    rebuilds it from "Caught ImageReadError in DataLoader worker process N. Original Traceback ...");
    that text is cut back to the original one-line message plus the worker.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_from_worker_traceback(str(message)))


def _from_worker_traceback(message: str) -> str:
    """The original message inside a DataLoader worker's re-raise text, else ``message`` unchanged."""
    head = re.match(r"Caught (\w+) (in DataLoader worker process \d+|in [^.\n]*)\.\nOriginal Traceback", message)
    if head is None:
        return message
    for line in reversed(message.strip().splitlines()):
        match = re.match(rf"(?:[\w.]+\.)?{head.group(1)}: (.*)", line)
        if match:
            return f"{match.group(1)} ({head.group(2)})"
    return message


@dataclass
class Split:
    """One split of a data set.

    Attributes:
        items: a uint8 array (N, H, W) or (N, H, W, 3) of images, or a list of N image file paths.
        targets: int64 array (N,) of original labels in 0..C-1.
    """

    items: Union[np.ndarray, Sequence[str]]
    targets: np.ndarray

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image (grayscale repeated to 3 channels).

        Raises:
            ImageReadError: the file cannot be opened or decoded (names the file and PIL's message).
        """
        item = self.items[i]
        if isinstance(item, (str, Path)):
            return open_image(item)
        return Image.fromarray(np.asarray(item)).convert("RGB")

    def subsample(self, per_class: Optional[int]) -> "Split":
        """Keep the first ``per_class`` items of each class, in file order (None keeps everything)."""
        if per_class is None:
            return self
        keep = np.concatenate([np.flatnonzero(self.targets == c)[:per_class] for c in np.unique(self.targets)])
        keep.sort()
        items = self.items[keep] if isinstance(self.items, np.ndarray) else [self.items[i] for i in keep]
        return Split(items, self.targets[keep])


def open_image(path: Union[str, Path]) -> Image.Image:
    """Open and fully decode an image file as RGB (grayscale repeated to 3 channels).

    Raises:
        ImageReadError: missing, truncated or corrupt file ("cannot read image <path> (<PIL error>)").
    """
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, EOFError, struct.error...
        raise ImageReadError(f"cannot read image {path} ({type(exc).__name__}: {exc}); replace or delete the file, "
                             "or set verify_images: true to list every unreadable file before training") from exc


def verify_images(*splits: Split, workers: Optional[int] = None) -> int:
    """Open and decode every image file of the splits once, and report all unreadable files in one error.

    Array-backed splits (CIFAR, Fashion-MNIST) have nothing to verify. Files are decoded in a thread pool
    (PIL releases the GIL while decoding).

    Args:
        splits: the splits to check (e.g. ``source.train, source.test``).
        workers: threads (default: min(8, CPU count)).

    Returns:
        The number of distinct image files checked (0 for arrays).

    Raises:
        ImageReadError: one or more files cannot be read; the message gives the count and the first few
            files with PIL's error.
    """
    paths = list(dict.fromkeys(str(p) for s in splits if not isinstance(s.items, np.ndarray) for p in s.items))
    if not paths:
        return 0

    def problem(path: str) -> Optional[str]:
        try:
            open_image(path)
        except ImageReadError as exc:
            cause = exc.__cause__
            return f"{path} ({type(cause).__name__}: {cause})" if cause is not None else str(exc)
        return None

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        bad = [p for p in pool.map(problem, paths) if p is not None]
    if bad:
        shown = "; ".join(bad[:5]) + ("; ..." if len(bad) > 5 else "")
        raise ImageReadError(f"{len(bad)} of {len(paths)} image files cannot be read: {shown}. Replace or delete them.")
    logger.info("verify_images: all %d image files decode", len(paths))
    return len(paths)




@dataclass
class DataSource:
    """A data set with its official transforms (train transforms for tuning, test for heads and evaluation)."""

    name: str
    train: Split
    test: Split
    train_transform: Callable[[Image.Image], object]
    test_transform: Callable[[Image.Image], object]
