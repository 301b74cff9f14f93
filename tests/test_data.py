"""Data: class order, task split, the real loaders on fake files, and the missing-data errors (algorithms.md §2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import utils.data_readers as data_readers
import utils.datasets as datasets
from utils.data_manager import DataManager, class_order, task_sizes
from utils.datasets import load_source
from utils.errors import ConfigError, DataNotFoundError

from conftest import CIFAR_TEST_PER_CLASS, CIFAR_TRAIN_PER_CLASS

REPO = Path(__file__).resolve().parents[1]
SIZE = 32


# ---------------------------------------------------------------------------------------------
# class order and task split
# ---------------------------------------------------------------------------------------------
def test_class_order_seed_1993_100_classes():
    order = class_order(100, shuffle=True, seed=1993)
    assert order[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]
    assert sorted(order) == list(range(100))
    assert order == np.random.RandomState(1993).permutation(100).tolist()  # numpy's legacy stream


def test_class_order_seed_1993_200_classes():
    order = class_order(200, shuffle=True, seed=1993)
    assert order[:10] == [168, 136, 51, 9, 183, 101, 171, 99, 42, 159]
    assert sorted(order) == list(range(200))


def test_class_order_without_shuffle_is_identity():
    assert class_order(7, shuffle=False, seed=1993) == list(range(7))


def test_task_sizes_even_split():
    assert task_sizes(100, 10, 10) == [10] * 10


def test_task_sizes_cars_remainder():
    assert task_sizes(196, 20, 20) == [20] * 9 + [16]


def test_task_sizes_uneven_first_task():
    sizes = task_sizes(100, 50, 10)
    assert sizes == [50] + [10] * 5
    assert task_sizes(10, 10, 5) == [10]


def test_task_sizes_init_cls_too_large():
    with pytest.raises(ConfigError, match="init_cls"):
        task_sizes(10, 11, 1)


# ---------------------------------------------------------------------------------------------
# fake CIFAR-100 through the real loader and the DataManager
# ---------------------------------------------------------------------------------------------
def test_fake_cifar100_loads(fake_cifar100):
    source = load_source("cifar224", fake_cifar100, SIZE, None, download=False)
    assert source.train.items.shape == (100 * CIFAR_TRAIN_PER_CLASS, 32, 32, 3)  # HWC uint8
    assert source.test.items.shape == (100 * CIFAR_TEST_PER_CLASS, 32, 32, 3)
    assert source.train.targets.dtype == np.int64
    # channel 0 holds the class id written by the fixture: labels and pixels stayed together
    np.testing.assert_array_equal(source.train.items[:, 0, 0, 0], source.train.targets)
    np.testing.assert_array_equal(np.bincount(source.test.targets), [CIFAR_TEST_PER_CLASS] * 100)


def test_data_manager_items_remapped_and_class_sorted(fake_cifar100):
    source = load_source("cifar224", fake_cifar100, SIZE, None, download=False)
    dm = DataManager(source, shuffle=True, seed=1993, init_cls=10, increment=10)
    assert dm.n_classes == 100 and dm.nb_tasks == 10
    assert dm.class_order[:3] == [68, 56, 78]

    ds = dm.get_dataset(range(0, 10), "train", "test")
    assert len(ds) == 10 * CIFAR_TRAIN_PER_CLASS
    labels = []
    for i in range(len(ds)):
        index, image, label = ds[i]
        assert index == i
        assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
        assert image.shape == (3, SIZE, SIZE)
        assert isinstance(label, np.int64)
        # channel 0 is the constant original class id / 255 (constant images survive resize and crop)
        original = round(image[0].mean().item() * 255)
        assert image[0].min() == image[0].max()
        assert dm.class_order[int(label)] == original
        labels.append(int(label))
    assert labels == sorted(labels)  # class-sorted
    assert labels == np.repeat(np.arange(10), CIFAR_TRAIN_PER_CLASS).tolist()


def test_data_manager_batches_collate_to_int64(fake_cifar100):
    source = load_source("cifar224", fake_cifar100, SIZE, None, download=False)
    dm = DataManager(source, True, 1993, 10, 10)
    loader = torch.utils.data.DataLoader(dm.get_dataset(range(10, 20), "train", "train"), batch_size=4)
    index, images, labels = next(iter(loader))
    assert images.shape == (4, 3, SIZE, SIZE) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    assert index.tolist() == [0, 1, 2, 3]
    assert set(labels.tolist()) <= set(range(10, 20))


def test_test_set_of_each_task_holds_every_seen_label(fake_cifar100):
    source = load_source("cifar224", fake_cifar100, SIZE, None, download=False)
    dm = DataManager(source, True, 1993, 10, 10)
    for t in (0, 4, 9):
        known, seen = dm.task_classes(t)
        assert (known, seen) == (10 * t, 10 * t + 10)
        train = dm.get_dataset(range(known, seen), "train", "train")
        test = dm.get_dataset(range(0, seen), "test", "test")
        assert set(train.labels.tolist()) == set(range(known, seen))
        assert set(test.labels.tolist()) == set(range(seen))
        assert len(test) == seen * CIFAR_TEST_PER_CLASS


def test_get_dataset_rejects_bad_source_or_mode(fake_cifar100):
    dm = DataManager(load_source("cifar224", fake_cifar100, SIZE, None, download=False), True, 1993, 10, 10)
    with pytest.raises(ValueError):
        dm.get_dataset(range(3), "val", "test")
    with pytest.raises(ValueError):
        dm.get_dataset(range(3), "train", "eval")


def test_per_class_subsampling_keeps_first_images(fake_cifar100):
    source = load_source("cifar224", fake_cifar100, SIZE, None, download=False, train_per_class=2, test_per_class=1)
    np.testing.assert_array_equal(np.bincount(source.train.targets), [2] * 100)
    np.testing.assert_array_equal(np.bincount(source.test.targets), [1] * 100)
    # channel 1 holds the image's index within its class in file order: only 0 and 1 (resp. 0) remain
    assert set(source.train.items[:, 0, 0, 1].tolist()) == {0, 1}
    assert set(source.test.items[:, 0, 0, 1].tolist()) == {0}
    # the kept items stay in file order (not regrouped by class)
    full = load_source("cifar224", fake_cifar100, SIZE, None, download=False)
    keep = full.train.items[:, 0, 0, 1] < 2
    np.testing.assert_array_equal(source.train.targets, full.train.targets[keep])


# ---------------------------------------------------------------------------------------------
# ImageFolder data sets
# ---------------------------------------------------------------------------------------------
def test_cub_image_folder_loads(image_folder):
    root = image_folder("cub", "test", n_classes=5, train_per_class=3, test_per_class=2)
    source = load_source("cub", root, SIZE, None)
    np.testing.assert_array_equal(np.bincount(source.train.targets), [3] * 5)
    np.testing.assert_array_equal(np.bincount(source.test.targets), [2] * 5)
    assert all(Path(p).parent.parent.name == "test" for p in source.test.items)
    # labels follow the sorted class-folder names
    assert all(Path(p).parent.name == f"class_{y:02d}" for p, y in zip(source.train.items, source.train.targets))
    image = source.test_transform(source.test.image(0))
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert 0.0 <= image.min() and image.max() <= 1.0  # no Normalize for cub (algorithms.md §2.1)


def test_imagenetr_accepts_test_folder_instead_of_val(image_folder):
    root = image_folder("imagenet-r", "test", n_classes=4, train_per_class=2, test_per_class=2)
    assert not (root / "imagenet-r" / "val").exists()
    source = load_source("imagenetr", root, SIZE, None)
    assert len(source.train.targets) == 8 and len(source.test.targets) == 8
    assert all(Path(p).parent.parent.name == "test" for p in source.test.items)


def test_imagenetr_official_val_folder(image_folder):
    root = image_folder("imagenet-r", "val", n_classes=3, train_per_class=2, test_per_class=1)
    source = load_source("imagenetr", root, SIZE, None)
    assert all(Path(p).parent.parent.name == "val" for p in source.test.items)


def test_image_folder_subsampling_keeps_first_files(image_folder):
    root = image_folder("cub", "test", n_classes=3, train_per_class=4, test_per_class=3)
    source = load_source("cub", root, SIZE, None, train_per_class=2, test_per_class=1)
    assert sorted(Path(p).name for p in source.train.items) == ["00.png", "00.png", "00.png",
                                                                "01.png", "01.png", "01.png"]
    assert [Path(p).name for p in source.test.items] == ["00.png"] * 3


def test_image_folder_data_manager_on_cub(image_folder):
    root = image_folder("cub", "test", n_classes=6, train_per_class=2, test_per_class=2)
    dm = DataManager(load_source("cub", root, SIZE, None), True, 1993, 3, 3)
    assert dm.increments == [3, 3]
    assert sorted(dm.class_order) == list(range(6))
    ds = dm.get_dataset(range(3, 6), "train", "train")
    for i in range(len(ds)):
        path = Path(ds.split.items[int(ds.indices[i])])
        assert int(path.parent.name.split("_")[1]) == dm.class_order[int(ds.labels[i])]


def test_only_cars_is_normalised_by_default(image_folder):
    """Official transforms: no Normalize except for cars, which gets ImageNet mean/std (algorithms.md §2.1)."""
    root = image_folder("cars196", "val", n_classes=2, train_per_class=1, test_per_class=1)
    image_folder("cub", "test", n_classes=2, train_per_class=1, test_per_class=1)
    assert datasets.default_norm("cub") is None
    cars = load_source("cars", root, SIZE, datasets.default_norm("cars"))
    cub = load_source("cub", root, SIZE, datasets.default_norm("cub"))
    black = Image.new("RGB", (20, 20))
    for transform in (cars.train_transform, cars.test_transform):
        x = transform(black)
        assert x.shape == (3, SIZE, SIZE)
        expected = torch.tensor([-m / s for m, s in zip(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])
        torch.testing.assert_close(x.mean(dim=(1, 2)), expected)
    for transform in (cub.train_transform, cub.test_transform):
        assert transform(black).abs().max() == 0


# ---------------------------------------------------------------------------------------------
# missing data: one clear error naming the data set and the path
# ---------------------------------------------------------------------------------------------
def test_missing_cifar_names_dataset_and_path(tmp_path):
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_source("cifar224", empty, SIZE, None, download=False)
    msg = str(info.value)
    assert "cifar224" in msg
    assert str(empty / "cifar-100-python") in msg


@pytest.mark.parametrize("dataset, folder", [("cub", "cub"), ("imagenetr", "imagenet-r"), ("imageneta", "imagenet-a"),
                                             ("cars", "cars196")])
def test_missing_image_folder_names_dataset_and_path(tmp_path, dataset, folder):
    with pytest.raises(DataNotFoundError) as info:
        load_source(dataset, tmp_path, SIZE, None)
    msg = str(info.value)
    assert f"'{dataset}'" in msg
    assert str(tmp_path / folder) in msg


def test_missing_test_split_is_reported(image_folder):
    root = image_folder("cub", "test", n_classes=2, train_per_class=1, test_per_class=1)
    for p in sorted((root / "cub" / "test").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (root / "cub" / "test").rmdir()
    with pytest.raises(DataNotFoundError, match="cub"):
        load_source("cub", root, SIZE, None)


def test_missing_fmnist_names_dataset_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(data_readers, "DEBIAN_FMNIST", tmp_path / "no-such-debian-folder")
    empty = tmp_path / "nothing"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as info:
        load_source("fmnist", empty, SIZE, None, download=False)
    msg = str(info.value)
    assert "fmnist" in msg
    assert str(empty) in msg


def test_main_reports_missing_data_without_traceback(tmp_path):
    empty = tmp_path / "empty_data"
    empty.mkdir()
    config = tmp_path / "cub.json"
    config.write_text(json.dumps({"dataset": "cub", "init_cls": 20, "increment": 20, "model_name": "ranpac",
                                  "spr": "none", "device": "cpu", "data_root": str(empty)}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "main.py", "--config", str(config), "--output-dir", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output
    assert "cub" in proc.stderr
    assert str(empty) in proc.stderr


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST from the Debian package (when installed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not datasets.DEBIAN_FMNIST.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fmnist_from_debian_package(tmp_path, caplog):
    with caplog.at_level("INFO"):
        source = load_source("fmnist", tmp_path, 32, None, download=False, train_per_class=5, test_per_class=5)
    assert f"dataset 'fmnist' read from {datasets.DEBIAN_FMNIST}" in caplog.text  # the copy read is named
    np.testing.assert_array_equal(np.bincount(source.train.targets), [5] * 10)
    np.testing.assert_array_equal(np.bincount(source.test.targets), [5] * 10)
    assert source.train.items.shape == (50, 28, 28)
    for transform, split in ((source.train_transform, source.train), (source.test_transform, source.test)):
        image = transform(split.image(0))
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        torch.testing.assert_close(image[0], image[1])  # grayscale repeated to 3 channels
        torch.testing.assert_close(image[0], image[2])
    assert not (tmp_path / "FashionMNIST").exists()  # the .gz files are read in memory: nothing written (issue 8)
    full = load_source("fmnist", tmp_path, 32, None, download=False)
    assert full.train.items.shape == (60000, 28, 28) and full.test.items.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(full.test.targets), [1000] * 10)
