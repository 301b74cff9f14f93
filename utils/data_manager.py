"""Class order, label remapping and the task split of the official DataManager (algorithms.md §2.2)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from utils.datasets import DataSource, Split
from utils.errors import ConfigError

logger = logging.getLogger(__name__)


def class_order(n_classes: int, shuffle: bool, seed: int) -> list[int]:
    """The official class order: ``np.random.seed(seed)`` then ``np.random.permutation(n)`` (algorithms.md §2.2).

    Uses (and leaves advanced) numpy's legacy *global* RNG, as the original does; with seed 1993 and
    100 classes it starts [68, 56, 78, 8, 23, 84, 90, 65, 74, 76].
    """
    if not shuffle:
        return list(range(n_classes))
    np.random.seed(seed)
    return np.random.permutation(n_classes).tolist()


def task_sizes(n_classes: int, init_cls: int, increment: int) -> list[int]:
    """Classes per task: ``init_cls``, then ``increment`` while it fits, then the remainder (algorithms.md §2.2).

    Example: (196, 20, 20) gives nine tasks of 20 and one of 16.

    Raises:
        ConfigError: ``init_cls`` exceeds the number of classes.
    """
    if init_cls > n_classes:
        raise ConfigError(f"key 'init_cls' is {init_cls} but the data set has only {n_classes} classes.")
    sizes = [init_cls]
    while sum(sizes) + increment < n_classes:
        sizes.append(increment)
    if n_classes - sum(sizes) > 0:
        sizes.append(n_classes - sum(sizes))
    return sizes


class TaskDataset(Dataset):
    """Images of a set of (remapped) classes; item i is ``(i, image, label)`` (algorithms.md §2.2).

    ``image`` is the transformed float32 tensor (3, H, W); ``label`` a numpy int64 (collates to torch.int64).
    Items are class-sorted in the order of the requested labels, each class in file order.
    """

    def __init__(self, split: Split, indices: np.ndarray, labels: np.ndarray,
                 transform: Callable[[Image.Image], object]) -> None:
        self.split, self.indices, self.labels, self.transform = split, indices, labels, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return i, self.transform(self.split.image(int(self.indices[i]))), self.labels[i]

    def sample_id(self, i: int) -> int:
        """The image's index in its split: the same image has the same id in every task's data set."""
        return int(self.indices[i])


class DataManager:
    """Class-incremental view of a data set: class order, remapped labels and per-task subsets.

    Args:
        source: the loaded data set and transforms.
        shuffle: permute the classes with ``seed`` (official: true).
        seed: the run seed (numpy legacy global RNG).
        init_cls: classes in task 0.
        increment: classes in each later task.

    Attributes:
        class_order: original class id of remapped label k is ``class_order[k]``.
        n_classes: number of unique training labels.
    """

    def __init__(self, source: DataSource, shuffle: bool, seed: int, init_cls: int, increment: int) -> None:
        self.source = source
        self.n_classes = int(len(np.unique(source.train.targets)))
        self.class_order = class_order(self.n_classes, shuffle, seed)
        logger.info(self.class_order)
        remap = np.empty(self.n_classes, dtype=np.int64)
        remap[np.asarray(self.class_order)] = np.arange(self.n_classes)
        self._labels = {"train": remap[source.train.targets], "test": remap[source.test.targets]}
        self.increments = task_sizes(self.n_classes, init_cls, increment)

    @property
    def nb_tasks(self) -> int:
        """Number of tasks."""
        return len(self.increments)

    def get_task_size(self, task: int) -> int:
        """Number of new classes of ``task``."""
        return self.increments[task]

    def task_classes(self, task: int) -> tuple[int, int]:
        """Remapped label range ``[known, seen)`` of ``task``."""
        known = sum(self.increments[:task])
        return known, known + self.increments[task]

    def get_dataset(self, labels: Sequence[int], source: str, mode: str) -> TaskDataset:
        """The items of the given remapped labels.

        Args:
            labels: remapped labels, e.g. ``range(known, seen)``.
            source: ``"train"`` or ``"test"`` split.
            mode: ``"train"`` (train transforms) or ``"test"`` (test transforms).

        Raises:
            ValueError: unknown source or mode.
        """
        if source not in ("train", "test") or mode not in ("train", "test"):
            raise ValueError(f"source/mode must be 'train' or 'test', got {source!r}/{mode!r}")
        split = getattr(self.source, source)
        all_labels = self._labels[source]
        idx = (np.concatenate([np.flatnonzero(all_labels == c) for c in labels]) if len(labels)
               else np.zeros(0, np.int64))
        transform = self.source.train_transform if mode == "train" else self.source.test_transform
        return TaskDataset(split, idx, all_labels[idx], transform)

