"""Data sets and their transforms (SPEC 2.1, 16): where the files live, how they load, what to do when missing.

Each loader returns a :class:`DataSource`: the train and test :class:`Split` (images or file paths
plus integer labels 0..C-1) and the torchvision transforms of the official code. Loading goes
through torchvision (CIFAR100, FashionMNIST, ImageFolder); a missing data set raises
:class:`DataNotFoundError` naming the data set, the path searched, the expected layout and the source.
"""

from __future__ import annotations

import gzip
import logging
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
from PIL import Image
from torchvision import datasets as tv_datasets
from torchvision import transforms as T

from utils.errors import DataNotFoundError

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Cars normalisation in the official code (SPEC 2.1)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist (SPEC 16)
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
APER_SOURCE = "the APER archives linked in the MIST README (github.com/zhoudw-zdw/RevisitingCIL)"

# ImageFolder data sets: folder under data_root, official test-folder name, where to get it.
IMAGE_FOLDERS = {
    "cub": ("cub", "test", "CUB-200-2011 (train/test split of " + APER_SOURCE + ")"),
    "imagenetr": ("imagenet-r", "val", "ImageNet-R (" + APER_SOURCE + "; the official path uses val/)"),
    "imageneta": ("imagenet-a", "test", "ImageNet-A (" + APER_SOURCE + ")"),
    "cars": ("cars196", "val", "Stanford Cars-196 (TFDS 'cars196' or the SLCA train/val split)"),
}
N_CLASSES = {"cifar224": 100, "cub": 200, "imagenetr": 200, "imageneta": 200, "cars": 196, "fmnist": 10}


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
        """Image ``i`` as an RGB PIL image (grayscale repeated to 3 channels)."""
        item = self.items[i]
        if isinstance(item, (str, Path)):
            with open(item, "rb") as fh:
                return Image.open(fh).convert("RGB")
        return Image.fromarray(np.asarray(item)).convert("RGB")

    def subsample(self, per_class: Optional[int]) -> "Split":
        """Keep the first ``per_class`` items of each class, in file order (None keeps everything)."""
        if per_class is None:
            return self
        keep = np.concatenate([np.flatnonzero(self.targets == c)[:per_class] for c in np.unique(self.targets)])
        keep.sort()
        items = self.items[keep] if isinstance(self.items, np.ndarray) else [self.items[i] for i in keep]
        return Split(items, self.targets[keep])


@dataclass
class DataSource:
    """A data set with its official transforms (train transforms for tuning, test for heads and evaluation)."""

    name: str
    train: Split
    test: Split
    train_transform: Callable[[Image.Image], object]
    test_transform: Callable[[Image.Image], object]


# ---------------------------------------------------------------------------------------------
# transforms (SPEC 2.1)
# ---------------------------------------------------------------------------------------------
def build_transforms(dataset: str, size: int, norm: Optional[tuple[Sequence[float], Sequence[float]]]):
    """Train and test transforms of the official code, generalised to ``size`` (official 224).

    Args:
        dataset: data set id.
        size: output side in pixels.
        norm: (mean, std) to append as Normalize, or None for no normalisation.

    Returns:
        (train_transform, test_transform): PIL image -> float32 tensor (3, size, size).
    """
    resize_test = int(256 / 224 * size)
    if dataset == "cars":  # SLCA recipe
        side = int(300 / 224 * size)
        train = [T.Resize((side, side), interpolation=T.InterpolationMode.BICUBIC), T.RandomCrop(size),
                 T.RandomHorizontalFlip(0.5)]
        test = [T.Resize(resize_test, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    elif dataset == "fmnist":  # 28x28 grayscale: resize only, no crop (our choice, SPEC 16)
        train = [T.Resize((size, size)), T.RandomHorizontalFlip(0.5)]
        test = [T.Resize((size, size))]
    else:
        train = [T.RandomResizedCrop(size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)), T.RandomHorizontalFlip(0.5)]
        test = [T.Resize(resize_test, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
    tail: list = [T.ToTensor()]
    if norm is not None:
        tail.append(T.Normalize(mean=norm[0], std=norm[1]))
    return T.Compose(train + tail), T.Compose(test + tail)


def default_norm(dataset: str) -> Optional[tuple[Sequence[float], Sequence[float]]]:
    """The official normalisation: ImageNet mean/std for cars, none otherwise (SPEC 2.1, 9.18)."""
    return (IMAGENET_MEAN, IMAGENET_STD) if dataset == "cars" else None


# ---------------------------------------------------------------------------------------------
# loaders
# ---------------------------------------------------------------------------------------------
def _reachable(host: str, port: int = 443, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class _CIFAR100Files(tv_datasets.CIFAR100):
    """torchvision's CIFAR100 reading files that are present, without the md5 check.

    The checksum check would reject a re-packed or test copy; a truncated file still fails at
    unpickling, which ``load_cifar224`` turns into a clear error.
    """

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {"filename": "meta", "key": "fine_label_names", "md5": None}


def load_cifar224(root: Path, download: bool) -> tuple[Split, Split]:
    """CIFAR-100 through torchvision (``<root>/cifar-100-python/{train,test,meta}``, SPEC 2.1 ``cifar224``).

    Raises:
        DataNotFoundError: files missing and not downloadable, or unreadable.
    """
    folder = root / "cifar-100-python"
    missing = [n for n in ("train", "test", "meta") if not (folder / n).is_file()]
    if missing and download and _reachable("www.cs.toronto.edu"):
        logger.info("Downloading CIFAR-100 into %s", root)
        tv_datasets.CIFAR100(str(root), train=True, download=True)
        missing = [n for n in ("train", "test", "meta") if not (folder / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"dataset 'cifar224' (CIFAR-100): missing {', '.join(missing)} in {folder}. Expected torchvision's layout "
            f"{folder}/{{train,test,meta}}. Get it on a machine with internet with "
            f"python -c \"import torchvision; torchvision.datasets.CIFAR100('{root}', download=True)\" "
            "(or extract https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz there), or set data_root."
        )
    try:
        train = _CIFAR100Files(str(root), train=True)
        test = _CIFAR100Files(str(root), train=False)
    except Exception as exc:  # unpickling errors of a truncated file
        raise DataNotFoundError(f"dataset 'cifar224': cannot read {folder} ({exc}); re-download CIFAR-100.") from None
    return (Split(train.data, np.asarray(train.targets, dtype=np.int64)),
            Split(test.data, np.asarray(test.targets, dtype=np.int64)))


def _find_fmnist(root: Path) -> Optional[Path]:
    raw = root / "FashionMNIST" / "raw"
    if all((raw / f).is_file() for f in FMNIST_FILES):
        return raw
    for folder in (raw, root / "fashion-mnist", DEBIAN_FMNIST):
        if all((folder / (f + ".gz")).is_file() for f in FMNIST_FILES):
            return folder
    return None


def load_fmnist(root: Path, download: bool) -> tuple[Split, Split]:
    """Fashion-MNIST through torchvision's FashionMNIST reader (SPEC 16).

    Looks in ``<root>/FashionMNIST/raw`` (torchvision's layout), ``<root>/fashion-mnist`` and the
    Debian package folder ``/usr/share/datasets/fashion-mnist``; gzip files found there are
    decompressed once into ``<root>/FashionMNIST/raw``.

    Raises:
        DataNotFoundError: no copy found and none downloadable.
    """
    raw = root / "FashionMNIST" / "raw"
    found = _find_fmnist(root)
    if found is None:
        if not (download and _reachable("ossci-datasets.s3.amazonaws.com")):
            raise DataNotFoundError(
                f"dataset 'fmnist' (Fashion-MNIST): not found in {raw}, {root / 'fashion-mnist'} or {DEBIAN_FMNIST}. "
                f"Expected the four IDX files {', '.join(FMNIST_FILES)} (optionally .gz). Install them with "
                "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or let torchvision download them "
                "(download: true, with internet), or set data_root."
            )
        tv_datasets.FashionMNIST(str(root), train=True, download=True)
    elif not all((raw / name).is_file() for name in FMNIST_FILES):
        raw.mkdir(parents=True, exist_ok=True)
        for name in FMNIST_FILES:
            with gzip.open(found / (name + ".gz"), "rb") as src, open(raw / name, "wb") as dst:
                shutil.copyfileobj(src, dst)
        logger.info("Fashion-MNIST: decompressed %s into %s", found, raw)
    train = tv_datasets.FashionMNIST(str(root), train=True)
    test = tv_datasets.FashionMNIST(str(root), train=False)
    return (Split(train.data.numpy(), train.targets.numpy().astype(np.int64)),
            Split(test.data.numpy(), test.targets.numpy().astype(np.int64)))


def load_image_folder(dataset: str, root: Path) -> tuple[Split, Split]:
    """An ImageFolder data set: ``<root>/<folder>/train/<class>/*`` and ``<root>/<folder>/{test|val}/<class>/*``.

    Labels follow the sorted class-folder names (torchvision ImageFolder), as in the original.

    Raises:
        DataNotFoundError: a split folder is missing or holds no images.
    """
    folder, official_test, source = IMAGE_FOLDERS[dataset]
    base = root / folder
    test_names = [official_test] + [n for n in ("test", "val") if n != official_test]
    test_dir = next((base / n for n in test_names if (base / n).is_dir()), None)
    layout = f"{base}/train/<class>/<image> and {base}/{official_test}/<class>/<image> ('test' or 'val' accepted)"
    if not (base / "train").is_dir() or test_dir is None:
        raise DataNotFoundError(
            f"dataset '{dataset}': not found under {base}. Expected the ImageFolder layout {layout}. "
            f"Get {source} and unpack it there, or set data_root."
        )
    splits = []
    for split_dir in (base / "train", test_dir):
        try:
            ds = tv_datasets.ImageFolder(str(split_dir))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataNotFoundError(f"dataset '{dataset}': {split_dir} is not a valid ImageFolder tree ({exc}). "
                                    f"Expected {layout}.") from None
        splits.append(Split([p for p, _ in ds.samples], np.asarray(ds.targets, dtype=np.int64)))
    if splits[0].targets.max() != splits[1].targets.max():
        raise DataNotFoundError(f"dataset '{dataset}': train and {test_dir.name} folders hold different class counts "
                                f"under {base}.")
    return splits[0], splits[1]


def load_source(dataset: str, data_root: Union[str, Path], size: int,
                norm: Optional[tuple[Sequence[float], Sequence[float]]], download: bool = True,
                train_per_class: Optional[int] = None, test_per_class: Optional[int] = None) -> DataSource:
    """Load a data set and its transforms.

    Args:
        dataset: id (``cifar224``, ``cub``, ``imagenetr``, ``imageneta``, ``cars``, ``fmnist``).
        data_root: folder holding the data sets.
        size: image side fed to the backbone.
        norm: (mean, std) for Normalize, or None.
        download: allow torchvision downloads (cifar224, fmnist) when the internet is reachable.
        train_per_class, test_per_class: keep the first N images of each class (None: all).

    Raises:
        DataNotFoundError: see the per-data-set loaders.
    """
    root = Path(data_root).expanduser().resolve()
    if dataset == "cifar224":
        train, test = load_cifar224(root, download)
    elif dataset == "fmnist":
        train, test = load_fmnist(root, download)
    else:
        train, test = load_image_folder(dataset, root)
    train_t, test_t = build_transforms(dataset, size, norm)
    return DataSource(dataset, train.subsample(train_per_class), test.subsample(test_per_class), train_t, test_t)
