"""Data sets and their transforms (algorithms.md §2.1, §16): where the files live, how they load,
what to do when missing.

Each loader returns a :class:`DataSource`: the train and test :class:`Split` (images or file paths
plus integer labels 0..C-1) and the torchvision transforms of the official code. Loading goes
through torchvision (CIFAR100, ImageFolder) and a small IDX reader (Fashion-MNIST, plain or .gz); a
missing data set raises :class:`DataNotFoundError` naming the data set, the path searched, the expected
layout and the source. Data that is present but damaged or inconsistent (unreadable image, truncated
IDX file, train/test class folders that differ) raises :class:`DataIntegrityError` naming the files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from torchvision import transforms as T

from utils.data_files import DataIntegrityError, DataSource, ImageReadError, Split, open_image  # noqa: F401 (API)
from utils.data_files import verify_images as _verify_images
from utils.data_readers import (  # noqa: F401
    DEBIAN_FMNIST,
    IMAGE_FOLDERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    load_cifar224,
    load_fmnist,
    load_image_folder,
    read_idx,
)
from utils.registry import DATASETS

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# transforms (algorithms.md §2.1)
# ---------------------------------------------------------------------------------------------
def build_transforms(dataset: str, size: int,
                     norm: Optional[tuple[Sequence[float], Sequence[float]]]) -> tuple[T.Compose, T.Compose]:
    """Train and test transforms of the official code, generalised to ``size`` (official 224).

    Args:
        dataset: data set id.
        size: output side in pixels.
        norm: (mean, std) to append as Normalize, or None for no normalisation.

    Returns:
        (train_transform, test_transform): PIL image -> float32 tensor (3, size, size).

    Raises:
        ConfigError: ``dataset`` is not a registered data set.
    """
    resize_test = int(256 / 224 * size)
    recipe = DATASETS.get(dataset).transforms
    if recipe == "resize_crop":  # SLCA recipe (cars)
        side = int(300 / 224 * size)
        train = [T.Resize((side, side), interpolation=T.InterpolationMode.BICUBIC), T.RandomCrop(size),
                 T.RandomHorizontalFlip(0.5)]
        test = [T.Resize(resize_test, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    elif recipe == "resize":  # small grayscale images: resize only, no crop (our choice for fmnist, algorithms.md §16)
        train = [T.Resize((size, size)), T.RandomHorizontalFlip(0.5)]
        test = [T.Resize((size, size))]
    else:  # "random_resized_crop": the official recipe of the other data sets
        train = [T.RandomResizedCrop(size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
                 T.RandomHorizontalFlip(0.5)]
        test = [T.Resize(resize_test, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    tail: list = [T.ToTensor()]
    if norm is not None:
        tail.append(T.Normalize(mean=norm[0], std=norm[1]))
    return T.Compose(train + tail), T.Compose(test + tail)


def default_norm(dataset: str) -> Optional[tuple[Sequence[float], Sequence[float]]]:
    """The official normalisation of a data set: ImageNet mean/std for cars, none otherwise
    (algorithms.md §2.1, §9.18)."""
    return DATASETS.get(dataset).norm


def load_source(dataset: str, data_root: Union[str, Path], size: int,
                norm: Optional[tuple[Sequence[float], Sequence[float]]], download: bool = True,
                train_per_class: Optional[int] = None, test_per_class: Optional[int] = None,
                verify_images: bool = False) -> DataSource:
    """Load a data set and its transforms.

    Args:
        dataset: a registered data set (``cifar224``, ``cub``, ``imagenetr``, ``imageneta``, ``cars``, ``fmnist``).
        data_root: folder holding the data sets.
        size: image side fed to the backbone.
        norm: (mean, std) for Normalize, or None.
        download: allow torchvision downloads (cifar224, fmnist) when the internet is reachable.
        train_per_class, test_per_class: keep the first N images of each class (None: all).
        verify_images: decode every image file that will be used (after subsampling) once, up front, and
            report all unreadable ones in one error (config key ``verify_images``; nothing to do for
            array-backed data sets).

    Raises:
        ConfigError: not a registered data set.
        DataNotFoundError: see the per-data-set loaders.
        DataIntegrityError: damaged files or inconsistent splits (ImageReadError with ``verify_images``).
    """
    root = Path(data_root).expanduser().resolve()
    train, test = DATASETS.get(dataset).load(root, download)
    train, test = train.subsample(train_per_class), test.subsample(test_per_class)
    if verify_images:
        _verify_images(train, test)
    train_t, test_t = build_transforms(dataset, size, norm)
    return DataSource(dataset, train, test, train_t, test_t)


# ---------------------------------------------------------------------------------------------
# the registered data sets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set (``utils.registry.DATASETS``).

    Attributes:
        name: the ``dataset`` value.
        n_classes: classes of the whole data set.
        load: (data root, download allowed) -> (train split, test split).
        transforms: the recipe of :func:`build_transforms`: ``random_resized_crop``, ``resize_crop`` or ``resize``.
        norm: the official normalisation (mean, std), or None.
        order: its column in the report (the paper's table order).
    """

    name: str
    n_classes: int
    load: Callable[[Path, bool], tuple[Split, Split]]
    transforms: str = "random_resized_crop"
    norm: Optional[tuple[Sequence[float], Sequence[float]]] = None
    order: int = 100


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Register a data set under ``spec.name``."""
    return DATASETS.register(spec.name, spec)


def _folder(dataset: str) -> Callable[[Path, bool], tuple[Split, Split]]:
    return lambda root, download: load_image_folder(dataset, root)


register_dataset(DatasetSpec("cifar224", 100, load_cifar224, order=10))
register_dataset(DatasetSpec("imagenetr", 200, _folder("imagenetr"), order=20))
register_dataset(DatasetSpec("imageneta", 200, _folder("imageneta"), order=30))
register_dataset(DatasetSpec("cub", 200, _folder("cub"), order=40))
register_dataset(DatasetSpec("cars", 196, _folder("cars"), transforms="resize_crop", norm=(IMAGENET_MEAN, IMAGENET_STD),
                             order=50))
register_dataset(DatasetSpec("fmnist", 10, load_fmnist, transforms="resize", order=60))
