"""Shared fixtures: a tiny ViT, fake CIFAR-100 files, an ImageFolder tree of PNGs, and tiny CPU configs.

Everything here runs offline on the CPU. The fixtures write the real on-disk formats (torchvision's
CIFAR-100 pickles, ImageFolder PNGs) so the real loaders run unchanged.
"""

from __future__ import annotations

import logging
import pickle
import re
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `pytest tests` without `python -m` does not put the repo on sys.path
    sys.path.insert(0, str(REPO))

#: a logged record on stderr (``utils.runtime.LOG_FORMAT``): warnings reach stderr as well as the log (issue 26)
LOGGED = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ \[")


def terminal_lines(err: str) -> list[str]:
    """The non-empty lines of a command's stderr that are not logged records: the error or status lines it prints
    itself (warnings logged before them reach stderr too, in the log format)."""
    return [line for line in err.splitlines() if line.strip() and not LOGGED.match(line)]


TINY_VIT_NAME = "vit_base_patch16_224.augreg_in21k"
TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)

# fake CIFAR-100: every image's channel 0 is the constant original class id, channel 1 the constant
# index of the image within its class (0, 1, 2, ...), channel 2 random noise. Tests read both back.
CIFAR_TRAIN_PER_CLASS = 3
CIFAR_TEST_PER_CLASS = 2


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped when none is available)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU available")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: tiny ops are much faster without thread hand-offs on a shared 2-core box."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _deterministic():
    """Fixed seeds and deterministic kernels for every test."""
    torch.manual_seed(0)
    np.random.seed(0)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def _drop_run_log_handlers():
    """Remove the root-logger handlers that ``utils.runtime.setup_logging`` installs during a test.

    They hold the test's captured stdout and its tmp log file; left in place they would write into
    closed streams of later tests.
    """
    yield
    if logging.root.manager.disable != logging.NOTSET:  # a tool run in-process must give logging back
        leaked = logging.root.manager.disable
        logging.disable(logging.NOTSET)
        pytest.fail(f"the test left logging.disable({leaked}) behind; later tests' run logs would be empty")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mist_cl", False):
            root.removeHandler(handler)
            handler.close()


@pytest.fixture
def tiny_vit_kwargs() -> dict[str, int]:
    """timm kwargs of a tiny ViT (32x32 input, 16 patches, width 32, 2 blocks) for ``backbone_kwargs``."""
    return dict(TINY_VIT_KWARGS)


@pytest.fixture
def tiny_vit(tiny_vit_kwargs):
    """A randomly initialised tiny timm ViT with ``num_classes=0`` (features (B, 32))."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(TINY_VIT_NAME, pretrained=False, num_classes=0, **tiny_vit_kwargs).eval()


def _cifar_split(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    labels = rng.permutation(np.repeat(np.arange(100), n_per_class))  # interleaved, as in the real files
    occurrence = np.empty_like(labels)  # index of each image within its class, in file order
    for c in range(100):
        occurrence[labels == c] = np.arange(n_per_class)
    images = np.empty((len(labels), 3, 32, 32), dtype=np.uint8)  # CHW, as the pickles store them
    images[:, 0] = labels[:, None, None]
    images[:, 1] = occurrence[:, None, None]
    images[:, 2] = rng.integers(0, 256, size=(len(labels), 32, 32), dtype=np.uint8)
    return images.reshape(len(labels), 3072), labels.tolist()


@pytest.fixture
def fake_cifar100(tmp_path: Path) -> Path:
    """torchvision's CIFAR-100 layout ``<root>/cifar-100-python/{train,test,meta}`` with tiny content.

    100 classes, 3 train and 2 test images per class (32x32). Channel 0 of an image is its class id,
    channel 1 its index within the class (file order), channel 2 noise.

    Returns:
        The data root (pass it as ``data_root``).
    """
    root = tmp_path / "cifar_root"
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", CIFAR_TRAIN_PER_CLASS), ("test", CIFAR_TEST_PER_CLASS)):
        data, labels = _cifar_split(per_class, rng)
        entry = {"data": data, "fine_labels": labels, "coarse_labels": [y // 5 for y in labels],
                 "filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": name}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    meta = {"fine_label_names": [f"class_{c:03d}" for c in range(100)],
            "coarse_label_names": [f"super_{c:02d}" for c in range(20)]}
    with open(folder / "meta", "wb") as fh:
        pickle.dump(meta, fh)
    return root


def class_colour(c: int, n_classes: int) -> np.ndarray:
    """A distinct RGB colour per class (evenly spaced hues, full saturation)."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(c / n_classes, 1.0, 0.9)
    return np.array([r, g, b]) * 255


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing real PNGs in ImageFolder layout; returns the data root.

    ``image_folder(folder="cub", test_folder="test", n_classes=6, train_per_class=4, test_per_class=2,
    size=16, noise=8.0, n_colours=None)`` writes ``<root>/<folder>/train/class_XX/NN.png`` and
    ``<root>/<folder>/<test_folder>/...``. Class c has colour number ``c % n_colours`` (default: one colour
    per class) plus Gaussian pixel noise of std ``noise``. With the defaults a prototype classifier
    separates the classes; with fewer colours than classes, classes sharing a colour get confused.
    Repeated calls with other folder names share one root.
    """
    from PIL import Image

    root = tmp_path / "images"

    def make(folder: str = "cub", test_folder: str = "test", n_classes: int = 6, train_per_class: int = 4,
             test_per_class: int = 2, size: int = 16, noise: float = 8.0, n_colours: int | None = None) -> Path:
        n_colours = n_colours or n_classes
        rng = np.random.default_rng(1)
        for split, per_class in (("train", train_per_class), (test_folder, test_per_class)):
            for c in range(n_classes):
                class_dir = root / folder / split / f"class_{c:02d}"
                class_dir.mkdir(parents=True, exist_ok=True)
                for i in range(per_class):
                    jitter = rng.normal(0.0, noise, size=(size, size, 3))
                    pixels = np.clip(class_colour(c % n_colours, n_colours) + jitter, 0, 255).astype(np.uint8)
                    Image.fromarray(pixels, mode="RGB").save(class_dir / f"{i:02d}.png")
        return root

    return make


def tiny_run_dict(data_root: Path, **overrides: Any) -> dict[str, Any]:
    """Raw config keys of a tiny CPU run: tiny random ViT, 32x32 inputs, no tuning phase, M = 64."""
    raw: dict[str, Any] = {
        "dataset": "cub",
        "init_cls": 3,
        "increment": 3,
        "model_name": "ranpac",
        "convnet_type": TINY_VIT_NAME,
        "pretrained": False,
        "backbone_kwargs": dict(TINY_VIT_KWARGS),
        "input_size": 32,
        "spr": "none",
        "M": 64,
        "device": "cpu",
        "seed": [1993],
        "batch_size": 8,
        "num_workers": 0,
        "progress": False,
        "download": False,
        "data_root": str(data_root),
    }
    raw.update(overrides)
    return raw


@pytest.fixture
def make_config():
    """Factory: ``make_config(data_root, **overrides)`` -> a validated tiny-run ExperimentConfig."""
    from utils.config import config_from_dict

    def make(data_root: Path, **overrides: Any):
        return config_from_dict(tiny_run_dict(data_root, **overrides), where="<test>")

    return make
