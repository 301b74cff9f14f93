"""The on-disk formats of the data sets (algorithms.md §2.1, §16): CIFAR-100's pickles through torchvision,
Fashion-MNIST's IDX files (plain or .gz, the Debian package included), ImageFolder trees (CUB, ImageNet-R, ImageNet-A,
Cars) with their link and class-folder checks; a missing data set is a :class:`DataNotFoundError` naming the path, the
layout and the source, damaged data a :class:`DataIntegrityError` naming the files."""

from __future__ import annotations

import gzip
import logging
import os
import socket
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from torchvision import datasets as tv_datasets

from utils.data_files import DataIntegrityError, Split
from utils.errors import DataNotFoundError
from utils.registry import DATASETS

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # Cars normalisation in the official code (algorithms.md §2.1)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist (algorithms.md §16)
FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte")
APER_SOURCE = "the APER archives linked in the MIST README (github.com/zhoudw-zdw/RevisitingCIL)"

# ImageFolder data sets: folder under data_root, official test-folder name, where to get it.
IMAGE_FOLDERS = {
    "cub": ("cub", "test", "CUB-200-2011 (train/test split of " + APER_SOURCE + ")"),
    "imagenetr": ("imagenet-r", "val", "ImageNet-R (" + APER_SOURCE + "; the official path uses val/)"),
    "imageneta": ("imagenet-a", "test", "ImageNet-A (" + APER_SOURCE + ")"),
    "cars": ("cars196", "val", "Stanford Cars-196 (TFDS 'cars196' or the SLCA train/val split)"),
}
# IDX element types (type byte of the magic number) -> big-endian numpy dtype (algorithms.md §16)
IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


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
    """CIFAR-100 through torchvision (``<root>/cifar-100-python/{train,test,meta}``, algorithms.md §2.1 ``cifar224``).

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


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (big-endian header, then the data; algorithms.md §16), plain or gzip-compressed (``.gz``).

    Nothing is written: a ``.gz`` is decompressed in memory.

    Returns:
        The array with the header's shape, in native byte order (uint8 (N, 28, 28) images or (N,) labels for
        Fashion-MNIST); writable.

    Raises:
        DataIntegrityError: unreadable or truncated gzip stream, a header that is not IDX, or a data size
            that differs from what the header announces (truncated or padded file).
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                data = fh.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataIntegrityError(f"cannot read {path} ({type(exc).__name__}: {exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_DTYPES:
        raise DataIntegrityError(f"{path} is not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataIntegrityError(f"{path} is truncated: {len(data)} bytes, shorter than its {header}-byte header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataIntegrityError(f"{path} is {'truncated' if len(data) < expected else 'too long'}: its header "
                                 f"announces shape {dims} ({expected} bytes with the header), the file holds "
                                 f"{len(data)} bytes")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _fmnist_folders(root: Path) -> tuple[Path, ...]:
    return (root / "FashionMNIST" / "raw", root / "fashion-mnist", DEBIAN_FMNIST)


def _fmnist_candidates(root: Path, name: str) -> list[Path]:
    """Existing copies of one Fashion-MNIST file, in order of preference (plain before .gz, per folder)."""
    return [f / n for f in _fmnist_folders(root) for n in (name, name + ".gz") if (f / n).is_file()]


def _read_fmnist_file(root: Path, name: str) -> tuple[np.ndarray, Path]:
    """The first copy of ``name`` that reads whole, and its path; damaged copies are skipped with a warning.

    Raises:
        DataIntegrityError: every copy is damaged (each named with its problem).
    """
    problems = []
    for path in _fmnist_candidates(root, name):
        try:
            array = read_idx(path)
        except DataIntegrityError as exc:
            problems.append(str(exc))
            continue
        if problems:
            logger.warning("Fashion-MNIST: ignored %s; read %s instead", "; ".join(problems), path)
        return array, path
    raise DataIntegrityError(f"dataset 'fmnist': no readable copy of {name}: {'; '.join(problems)}. Delete the "
                             "damaged file(s) and run again (reinstall dataset-fashion-mnist or let torchvision "
                             "download them).")


def load_fmnist(root: Path, download: bool) -> tuple[Split, Split]:
    """Fashion-MNIST from its four IDX files, plain or ``.gz``, read without writing anything (algorithms.md §16).

    Looks in ``<root>/FashionMNIST/raw`` (torchvision's layout), ``<root>/fashion-mnist`` and the
    Debian package folder ``/usr/share/datasets/fashion-mnist``; each file is taken from the first copy
    that reads whole (a truncated plain file left by an interrupted decompression is skipped with a
    warning in favour of a ``.gz``). Only ``download`` writes, through torchvision.

    Returns:
        (train, test): uint8 images (N, 28, 28) with int64 labels (N,) in 0..9.

    Raises:
        DataNotFoundError: no copy found and none downloadable.
        DataIntegrityError: every copy of a file is damaged, or images and labels disagree.
    """
    raw = root / "FashionMNIST" / "raw"
    if not all(_fmnist_candidates(root, name) for name in FMNIST_FILES):
        if not (download and _reachable("ossci-datasets.s3.amazonaws.com")):
            raise DataNotFoundError(
                f"dataset 'fmnist' (Fashion-MNIST): not found in {raw}, {root / 'fashion-mnist'} or {DEBIAN_FMNIST}. "
                f"Expected the four IDX files {', '.join(FMNIST_FILES)} (optionally .gz). Install them with "
                "'apt-get install dataset-fashion-mnist' (Debian/Ubuntu), or let torchvision download them "
                "(download: true, with internet), or set data_root."
            )
        tv_datasets.FashionMNIST(str(root), train=True, download=True)
    read = {name: _read_fmnist_file(root, name) for name in FMNIST_FILES}
    arrays = {name: array for name, (array, _) in read.items()}
    logger.info("dataset 'fmnist' read from %s", ", ".join(sorted({str(path.parent) for _, path in read.values()})))
    splits = []
    for images_name, labels_name in (FMNIST_FILES[:2], FMNIST_FILES[2:]):
        images, labels = arrays[images_name], arrays[labels_name]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != np.uint8 \
                or (len(labels) and (labels.min() < 0 or labels.max() >= DATASETS.get("fmnist").n_classes)):
            raise DataIntegrityError(f"dataset 'fmnist': {images_name} {images.shape} {images.dtype} and {labels_name} "
                                     f"{labels.shape} do not form a Fashion-MNIST split (uint8 (N, 28, 28) images, "
                                     "N labels in 0..9).")
        splits.append(Split(images, labels.astype(np.int64)))
    return splits[0], splits[1]


def load_image_folder(dataset: str, root: Path) -> tuple[Split, Split]:
    """An ImageFolder data set: ``<root>/<folder>/train/<class>/*`` and ``<root>/<folder>/{test|val}/<class>/*``.

    Labels follow the sorted class-folder names of the train folder (torchvision ImageFolder), as in the
    original; test images are labelled by the name of their class folder.

    Raises:
        DataNotFoundError: a split folder is missing or holds no images.
        DataIntegrityError: the train and test class-folder names differ (names only in each, with counts).
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
    folders = []
    for split_dir in (base / "train", test_dir):
        check_folder_links(dataset, split_dir)
        try:
            folders.append(tv_datasets.ImageFolder(str(split_dir)))
        except (FileNotFoundError, RuntimeError) as exc:
            raise DataNotFoundError(f"dataset '{dataset}': {split_dir} is not a valid ImageFolder tree ({exc}). "
                                    f"Expected {layout}.") from None
        check_images_reached_once(dataset, split_dir, [p for p, _ in folders[-1].samples])
    train, test = folders
    only_train = sorted(set(train.classes) - set(test.classes))
    only_test = sorted(set(test.classes) - set(train.classes))
    if only_train or only_test:
        raise DataIntegrityError(
            f"dataset '{dataset}': the class folders of {base / 'train'} and {test_dir} differ: "
            f"{len(only_train)} only in train ({_few(only_train)}), {len(only_test)} only in {test_dir.name} "
            f"({_few(only_test)}). Labels come from the class-folder names, so both splits need the same folders; "
            "rename or restore the folders."
        )
    label = train.class_to_idx  # the train folder's sorted names label both splits
    test_labels = [label[test.classes[t]] for t in test.targets]
    return (Split([p for p, _ in train.samples], np.asarray(train.targets, dtype=np.int64)),
            Split([p for p, _ in test.samples], np.asarray(test_labels, dtype=np.int64)))


def check_folder_links(dataset: str, split_dir: Path) -> None:
    """Refuse a tree whose symbolic links reach one folder twice (torchvision's ImageFolder follows links).

    A link to an ancestor (``ln -s . class_00/loop``) would make the walk repeat the folder until the system's
    link limit (about 40 times); a link from one class folder to another would label the same images as both
    classes. Links to folders outside the tree that nothing else reaches are fine.

    Raises:
        DataIntegrityError: a folder is reached by two paths; both are named.
    """
    seen: dict[str, str] = {}
    for dirpath, _, _ in os.walk(split_dir, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            kind = ("a symbolic link loop" if Path(seen[real]) in Path(dirpath).parents
                    else "two paths to one folder (symbolic links)")
            raise DataIntegrityError(
                f"dataset '{dataset}': {dirpath} is {seen[real]} again ({kind}); every image would be read more than "
                "once, or under two class names. Remove the link.")
        seen[real] = dirpath


def check_images_reached_once(dataset: str, split_dir: Path, paths: Sequence[str]) -> None:
    """Refuse a split in which one image file is reached by two paths (file links), e.g. under two classes.

    Raises:
        DataIntegrityError: the first file reached twice, with both paths and the number of such files.
    """
    first: dict[str, str] = {}
    twice = []
    for path in paths:
        real = os.path.realpath(path)
        if real in first:
            twice.append((first[real], path))
        else:
            first[real] = path
    if twice:
        a, b = twice[0]
        raise DataIntegrityError(
            f"dataset '{dataset}': {len(twice)} image file(s) of {split_dir} are reached by two paths (symbolic "
            f"links), e.g. {a} and {b} are the same file {os.path.realpath(a)}; each image must appear once. "
            "Remove the links.")


def _few(names: Sequence[str], n: int = 5) -> str:
    return ", ".join(repr(x) for x in names[:n]) + (", ..." if len(names) > n else "") if names else "none"
