"""Data that is present but wrong stops with a message naming the files (issue 8, "no silent wrong answers").

ImageFolder train/test class folders matched by name, unreadable images (in the main process and in
DataLoader workers), ``verify_images`` up front, and Fashion-MNIST IDX files read without writing
anything (plain or .gz, truncated copies detected). Every test writes its files in the real formats.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import utils.data_readers as data_readers
from utils.data_manager import DataManager
from utils.data_files import DataIntegrityError, ImageReadError, Split, verify_images
from utils.data_readers import read_idx
from utils.datasets import load_source
from utils.errors import DataNotFoundError, UserError

from conftest import tiny_run_dict

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ---------------------------------------------------------------------------------------------
# ImageFolder: train and test class folders matched by name
# ---------------------------------------------------------------------------------------------
def test_renamed_test_class_is_reported_by_name(image_folder):
    root = image_folder("cub", "test", n_classes=4, train_per_class=2, test_per_class=1)
    (root / "cub" / "test" / "class_02").rename(root / "cub" / "test" / "class_02_renamed")
    with pytest.raises(DataIntegrityError) as info:
        load_source("cub", root, SIZE, None)
    msg = str(info.value)
    assert "1 only in train ('class_02')" in msg
    assert "1 only in test ('class_02_renamed')" in msg
    assert str(root / "cub" / "test") in msg
    assert isinstance(info.value, UserError) and "\n" not in msg


def test_missing_and_extra_classes_are_counted(image_folder):
    root = image_folder("imagenet-r", "val", n_classes=9, train_per_class=1, test_per_class=1)
    test = root / "imagenet-r" / "val"
    for c in range(7):
        (test / f"class_{c:02d}").rename(test / f"other_{c:02d}")
    with pytest.raises(DataIntegrityError) as info:
        load_source("imagenetr", root, SIZE, None)
    msg = str(info.value)
    assert "7 only in train ('class_00', 'class_01', 'class_02', 'class_03', 'class_04', ...)" in msg
    assert "7 only in val ('other_00'" in msg


def test_test_labels_come_from_train_folder_names(image_folder):
    root = image_folder("cub", "test", n_classes=4, train_per_class=2, test_per_class=2)
    source = load_source("cub", root, SIZE, None)
    train_names = sorted({Path(p).parent.name for p in source.train.items})
    for path, label in zip(source.test.items, source.test.targets):
        assert train_names[label] == Path(path).parent.name


# ---------------------------------------------------------------------------------------------
# unreadable images
# ---------------------------------------------------------------------------------------------
def test_truncated_png_names_the_file(image_folder):
    root = image_folder("cub", "test", n_classes=2, train_per_class=2, test_per_class=1)
    bad = _truncate(root / "cub" / "train" / "class_01" / "00.png")
    source = load_source("cub", root, SIZE, None)
    index = [str(p) for p in source.train.items].index(str(bad))
    with pytest.raises(ImageReadError) as info:
        source.train.image(index)
    msg = str(info.value)
    assert str(bad) in msg and "cannot read image" in msg and "\n" not in msg
    assert isinstance(info.value, UserError)
    again = pickle.loads(pickle.dumps(info.value))  # the type survives a process boundary
    assert type(again) is ImageReadError and str(again) == msg


@pytest.mark.parametrize("num_workers", [0, 2])
def test_truncated_png_inside_data_loader(image_folder, num_workers):
    root = image_folder("cub", "test", n_classes=2, train_per_class=3, test_per_class=1)
    bad = _truncate(root / "cub" / "train" / "class_00" / "01.png")
    dm = DataManager(load_source("cub", root, SIZE, None), False, 1993, 2, 2)
    loader = torch.utils.data.DataLoader(dm.get_dataset(range(2), "train", "test"), batch_size=2,
                                         num_workers=num_workers)
    with pytest.raises(ImageReadError) as info:
        for _ in loader:
            pass
    msg = str(info.value)
    assert str(bad) in msg and "cannot read image" in msg
    assert "\n" not in msg and "Traceback" not in msg  # one line even after the worker re-raise
    if num_workers:
        assert "DataLoader worker process" in msg


def test_garbage_file_names_the_file(tmp_path):
    path = tmp_path / "not_an_image.jpg"
    path.write_text("hello")
    with pytest.raises(ImageReadError, match="not_an_image.jpg.*UnidentifiedImageError"):
        Split([str(path)], np.zeros(1, dtype=np.int64)).image(0)


def test_verify_images_reports_every_bad_file(image_folder):
    root = image_folder("cub", "test", n_classes=3, train_per_class=2, test_per_class=2)
    bad_train = _truncate(root / "cub" / "train" / "class_01" / "01.png")
    bad_test = root / "cub" / "test" / "class_02" / "00.png"
    bad_test.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    load_source("cub", root, SIZE, None)  # without verify_images the listing alone succeeds
    with pytest.raises(ImageReadError) as info:
        load_source("cub", root, SIZE, None, verify_images=True)
    msg = str(info.value)
    assert msg.startswith("2 of 12 image files cannot be read")
    assert str(bad_train) in msg and str(bad_test) in msg and "\n" not in msg


def test_verify_images_checks_only_the_kept_files(image_folder):
    root = image_folder("cub", "test", n_classes=2, train_per_class=3, test_per_class=2)
    _truncate(root / "cub" / "train" / "class_00" / "02.png")  # dropped by train_per_class=2
    source = load_source("cub", root, SIZE, None, train_per_class=2, verify_images=True)
    assert verify_images(source.train, source.test) == 8


def test_verify_images_on_arrays_is_a_no_op(fake_cifar100):
    source = load_source("cifar224", fake_cifar100, SIZE, None, download=False, verify_images=True)
    assert verify_images(source.train, source.test) == 0


def test_main_reports_bad_image_in_one_line(tmp_path, image_folder):
    root = image_folder("cub", "test", n_classes=6, train_per_class=2, test_per_class=1)
    bad = _truncate(root / "cub" / "test" / "class_04" / "00.png")
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run_dict(root, num_workers=2)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", "--config", str(config), "--output-dir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and str(bad) in error_lines[0], proc.stderr


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST IDX files
# ---------------------------------------------------------------------------------------------
def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _tiny_fmnist(folder: Path, gz: bool, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files with tiny content; image i is the constant i % 256, label i % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.repeat((np.arange(n) % 256).astype(np.uint8), 28 * 28)
        arrays[f"{prefix}-images-idx3-ubyte"] = images.reshape(n, 28, 28)
        arrays[f"{prefix}-labels-idx1-ubyte"] = (np.arange(n) % 10).astype(np.uint8)
    for name, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as fh:
                fh.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.fixture
def no_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(data_readers, "DEBIAN_FMNIST", tmp_path / "no-such-debian-folder")


def _check_fmnist(source, arrays) -> None:
    np.testing.assert_array_equal(source.train.items, arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(source.train.targets, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(source.test.items, arrays["t10k-images-idx3-ubyte"])
    assert source.train.items.dtype == np.uint8 and source.train.targets.dtype == np.int64
    image = source.test_transform(source.test.image(3))
    assert image.shape == (3, SIZE, SIZE)


@pytest.mark.parametrize("folder", ["fashion-mnist", "FashionMNIST/raw"])
def test_fmnist_from_gz_writes_nothing(tmp_path, no_debian, folder):
    root = tmp_path / "data"
    arrays = _tiny_fmnist(root / folder, gz=True)
    before = sorted(p for p in root.rglob("*"))
    _check_fmnist(load_source("fmnist", root, SIZE, None, download=False), arrays)
    assert sorted(p for p in root.rglob("*")) == before  # nothing decompressed to disk


def test_fmnist_from_plain_files(tmp_path, no_debian):
    root = tmp_path / "data"
    arrays = _tiny_fmnist(root / "FashionMNIST" / "raw", gz=False)
    _check_fmnist(load_source("fmnist", root, SIZE, None, download=False), arrays)


def test_truncated_raw_file_falls_back_to_gz(tmp_path, no_debian, caplog):
    root = tmp_path / "data"
    arrays = _tiny_fmnist(root / "fashion-mnist", gz=True)
    _tiny_fmnist(root / "FashionMNIST" / "raw", gz=False)
    bad = _truncate(root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte", 0.7)
    caplog.set_level(logging.WARNING, logger="utils.datasets")
    _check_fmnist(load_source("fmnist", root, SIZE, None, download=False), arrays)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert str(bad) in warning and "truncated" in warning and "train-images-idx3-ubyte.gz" in warning


def test_truncated_raw_file_without_gz_is_an_error(tmp_path, no_debian):
    root = tmp_path / "data"
    _tiny_fmnist(root / "FashionMNIST" / "raw", gz=False)
    bad = _truncate(root / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte", 0.9)
    with pytest.raises(DataIntegrityError) as info:
        load_source("fmnist", root, SIZE, None, download=False)
    msg = str(info.value)
    assert str(bad) in msg and "truncated" in msg and "(10,)" in msg
    assert isinstance(info.value, UserError)


def test_truncated_gz_is_an_error(tmp_path, no_debian):
    root = tmp_path / "data"
    _tiny_fmnist(root / "fashion-mnist", gz=True)
    bad = _truncate(root / "fashion-mnist" / "train-images-idx3-ubyte.gz", 0.5)
    with pytest.raises(DataIntegrityError, match=f"{bad}.*EOFError"):
        load_source("fmnist", root, SIZE, None, download=False)


def test_fmnist_missing_file_is_still_not_found(tmp_path, no_debian):
    root = tmp_path / "data"
    _tiny_fmnist(root / "fashion-mnist", gz=True)
    (root / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataNotFoundError, match="fmnist"):
        load_source("fmnist", root, SIZE, None, download=False)


def test_read_idx_header_checks(tmp_path):
    good = tmp_path / "a-idx1-ubyte"
    good.write_bytes(_idx_bytes(np.arange(5, dtype=np.uint8)))
    np.testing.assert_array_equal(read_idx(good), np.arange(5))
    assert read_idx(good).flags.writeable
    padded = tmp_path / "padded"
    padded.write_bytes(_idx_bytes(np.arange(5, dtype=np.uint8)) + b"\0")
    with pytest.raises(DataIntegrityError, match="too long"):
        read_idx(padded)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(DataIntegrityError, match="not an IDX file"):
        read_idx(wrong)
    big_endian = tmp_path / "int32"
    big_endian.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 2) + struct.pack(">2i", -1, 70000))
    np.testing.assert_array_equal(read_idx(big_endian), [-1, 70000])


def _linked_tree(image_folder, kind: str) -> tuple[Path, Path]:
    """A cub tree with one kind of link; returns (data root, the link)."""
    root = image_folder("cub", "test", n_classes=4, train_per_class=4, test_per_class=2)
    train = root / "cub" / "train"
    if kind == "loop":  # ln -s . class_00/loop
        link = train / "class_00" / "loop"
        link.symlink_to(".", target_is_directory=True)
    elif kind == "folder twice":  # class_01/other -> ../class_02
        link = train / "class_01" / "other"
        link.symlink_to(train / "class_02", target_is_directory=True)
    else:  # one image file under two classes
        link = train / "class_03" / "from_00.png"
        link.symlink_to(train / "class_00" / "00.png")
    return root, link


@pytest.mark.parametrize("kind,why", [("loop", "symbolic link loop"), ("folder twice", "two paths to one folder"),
                                      ("file twice", "reached by two paths")])
def test_links_that_reach_images_twice_are_refused_through_the_command_line(image_folder, tmp_path, kind, why):
    root, link = _linked_tree(image_folder, kind)
    config = tmp_path / "linked.json"
    config.write_text(json.dumps(tiny_run_dict(root)))
    proc = subprocess.run([sys.executable, "main.py", "--config", str(config), "--output-dir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and why in errors[0] and link.name in errors[0], proc.stderr
    results = next((tmp_path / "runs").rglob("results.json"))
    assert json.loads(results.read_text())["status"] == "failed"  # before any training, recorded


def test_a_linked_image_reached_once_and_a_linked_outside_folder_still_load(image_folder, tmp_path):
    root = image_folder("cub", "test", n_classes=3, train_per_class=3, test_per_class=2)
    train = root / "cub" / "train"
    outside = tmp_path / "elsewhere"
    (train / "class_02").rename(outside)
    (train / "class_02").symlink_to(outside, target_is_directory=True)  # a class folder kept on another disk
    moved = tmp_path / "one.png"
    (train / "class_00" / "00.png").rename(moved)
    (train / "class_00" / "00.png").symlink_to(moved)  # a file link that nothing else reaches
    train_split, _ = data_readers.load_image_folder("cub", root)
    assert len(train_split.items) == 9 and sorted(set(train_split.targets.tolist())) == [0, 1, 2]
