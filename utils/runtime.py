"""Device resolution, seeding, seeded DataLoaders and log handlers: the one place for run-time plumbing."""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from utils.errors import ConfigError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s [%(filename)s] => %(message)s"  # official format (SPEC 8.4)
OFFICIAL_TORCH_SEED = 1  # trainer._set_random seeds torch with 1 whatever the JSON seed (SPEC 1.1 step 4)


def resolve_device(entries: Sequence[str]) -> torch.device:
    """Map the official ``device`` key to one torch device.

    Args:
        entries: the config's ``device`` list, e.g. ``["0"]`` (cuda:0), ``["cpu"]``, ``["-1"]`` (cpu),
            ``["cuda:1"]`` or ``["mps"]``. Only the first entry is used; multi-GPU runs go through
            torchrun (see README).

    Returns:
        The device to run on.

    Raises:
        ConfigError: the entry is not understood, or CUDA/MPS is requested but not available.
    """
    first = str(entries[0]).strip().lower()
    if len(entries) > 1:
        logger.warning("device lists %s; only %s is used (the original wrapped DataParallel, which breaks the "
                       "masks; use torchrun for several GPUs).", list(entries), entries[0])
    if first in ("cpu", "-1"):
        return torch.device("cpu")
    if first.isdigit():
        first = f"cuda:{first}"
    if first == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError('key \'device\' asks for "mps" but MPS is not available; set "device": "cpu".')
        return torch.device("mps")
    if first == "cuda" or first.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"key 'device' asks for {entries[0]!r} (CUDA) but no CUDA GPU is available here; "
                'set "device": "cpu" (or --set device=cpu) to run on the CPU.'
            )
        index = int(first.split(":")[1]) if ":" in first else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"key 'device' asks for {first} but only {torch.cuda.device_count()} GPU(s) are visible.")
        return torch.device(first)
    raise ConfigError(f"key 'device' has value {entries[0]!r}; expected \"0\", \"cpu\", -1, \"cuda:N\" or \"mps\".")


def seed_torch(seed: int, allow_tf32: bool = True) -> None:
    """Seed torch (CPU and CUDA) and set cuDNN to deterministic, as the official ``_set_random``.

    numpy's global RNG is seeded separately by the DataManager with the run seed (class order), and
    Python's ``random`` is seeded here too (the original left it unseeded; nothing here draws from it).
    """
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def autocast(device: torch.device, precision: str):
    """Autocast context for backbone forwards: ``"bf16"`` runs them in bfloat16, ``"fp32"`` (official) is a no-op.

    Losses, scores, ridge statistics and prototypes stay float32 (callers cast the outputs).
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# Independent random streams of a run, each from its own generator seeded with (seed, stream).
STREAMS = ("loader", "drop", "augment", "ablation_mask", "projection")


def make_generator(seed: int, device: torch.device | str = "cpu", stream: str = "loader") -> torch.Generator:
    """A torch generator on ``device`` for one named random stream of the run seeded with ``seed``.

    Streams (``STREAMS``) never share a sequence, and none touches the global RNG, so e.g. RanPAC's
    W_rand is the same whether or not a tuning phase ran before it.

    Raises:
        ValueError: unknown stream name.
    """
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; expected one of {STREAMS}")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * len(STREAMS) + STREAMS.index(stream))
    return gen


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; derive numpy/random from it too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                generator: Optional[torch.Generator] = None, pin_memory: bool = False) -> DataLoader:
    """A DataLoader whose shuffling and worker seeds come from ``generator`` (reproducible runs).

    Args:
        dataset: items ``(index, image (3,H,W) float32, label int64)``.
        batch_size: images per batch.
        shuffle: reshuffle every epoch, drawing from ``generator``.
        num_workers: worker processes (0 loads in the main process).
        generator: CPU generator; required when ``shuffle`` is true.
        pin_memory: pin host memory (useful when the model is on CUDA).
    """
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, generator=generator,
        worker_init_fn=_worker_init if num_workers > 0 else None, pin_memory=pin_memory,
        persistent_workers=False,
    )


def setup_logging(log_file: Optional[Path]) -> None:
    """Send INFO records to stdout and (if given) to ``log_file``, in the official format.

    Replaces the handlers installed by an earlier call, so each seed gets its own file (the
    original's ``basicConfig`` inside the seed loop wrote every seed into the first file, SPEC 9.21).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mist_cl", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._mist_cl = True  # type: ignore[attr-defined]
        root.addHandler(handler)
