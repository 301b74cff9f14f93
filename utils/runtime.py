"""Device resolution, seeding, seeded DataLoaders and log handlers: the one place for run-time plumbing."""

from __future__ import annotations

import logging
import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import numpy as np
import torch

from utils.errors import ConfigError

if TYPE_CHECKING:  # annotations only: this module imports nothing of ours but the errors
    from utils.config import ExperimentConfig

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s [%(filename)s] => %(message)s"  # official format (algorithms.md §8.4)
OFFICIAL_TORCH_SEED = 1  # trainer._set_random seeds torch with 1 whatever the JSON seed (algorithms.md §1.1 step 4)


def resolve_device(entries: Sequence[str], local_rank: Optional[int] = None) -> torch.device:
    """Map the official ``device`` key to one torch device.

    Args:
        entries: the config's ``device`` list, e.g. ``["0"]`` (cuda:0), ``["cpu"]``, ``["-1"]`` (cpu),
            ``["cuda:1"]`` or ``["mps"]``. Only the first entry is used; multi-GPU runs go through
            torchrun (see README).

        local_rank: under torchrun, this process's local rank: a CUDA request then means GPU ``local_rank``
            (one process per GPU; torchrun's ``--nproc_per_node`` picks how many), the CPU stays the CPU.

    Returns:
        The device to run on.

    Raises:
        ConfigError: the entry is not understood, or CUDA/MPS is requested but not available.
    """
    first = str(entries[0]).strip().lower()
    if local_rank is not None:
        if first in ("cpu", "-1"):
            return torch.device("cpu")
        entries, first = [str(local_rank)], str(local_rank)
    if len(entries) > 1:
        logger.warning("device lists %s; this process uses only %s. For several GPUs start one process per GPU with "
                       "torchrun (torchrun --nproc_per_node=%d main.py --config ...); the original's DataParallel "
                       "broke the masks.", list(entries), entries[0], len(entries))
    if first in ("cpu", "-1"):
        return torch.device("cpu")
    if first.isdigit():
        first = f"cuda:{first}"
    if first == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ConfigError('key \'device\' asks for "mps" but MPS is not available; set "device": "cpu".')
        return torch.device("mps")
    if first == "cuda" or first.startswith("cuda:"):
        index_text = first.split(":", 1)[1] if ":" in first else "0"
        if not index_text.isdigit():
            raise ConfigError(f"key 'device' has value {entries[0]!r}; expected \"cuda:N\" with a GPU number N.")
        if not torch.cuda.is_available():
            raise ConfigError(
                f"key 'device' asks for {entries[0]!r} (CUDA) but no CUDA GPU is available here; "
                'set "device": "cpu" (or --set device=cpu) to run on the CPU.'
            )
        index = int(index_text)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"key 'device' asks for cuda:{index} but only {torch.cuda.device_count()} GPU(s) are "
                              "visible.")
        torch.cuda.set_device(index)  # contexts, cuBLAS handles and bare .cuda() calls land on this GPU, not GPU 0
        return torch.device("cuda", index)
    raise ConfigError(f"key 'device' has value {entries[0]!r}; expected \"0\", \"cpu\", -1, \"cuda:N\" or \"mps\".")


def seed_torch(seed: int, allow_tf32: bool = True, deterministic: bool = False) -> None:
    """Seed torch (CPU and CUDA) and set cuDNN to deterministic, as the official ``_set_random``.

    numpy's global RNG is seeded separately by the DataManager with the run seed (class order), and
    Python's ``random`` is seeded here too (the original left it unseeded; nothing here draws from it).

    Args:
        seed: the torch seed.
        allow_tf32: TF32 matmuls and convolutions on Ampere+ GPUs.
        deterministic: also ask for deterministic algorithms everywhere (``torch.use_deterministic_algorithms``;
            an operation without a deterministic implementation then raises) and set the cuBLAS workspace
            (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, which must be set before the first cuBLAS call). GPU runs
            then repeat bit for bit on the same GPU model and software; CPU runs are deterministic anyway.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """Autocast context for backbone forwards: ``"bf16"`` runs them in bfloat16, ``"fp32"`` (official) is a no-op.

    Losses, scores, ridge statistics and prototypes stay float32 (callers cast the outputs).
    """
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


# Independent random streams of a run, each from its own generator seeded from (run seed, stream name).
# The streams that existed before streams were keyed by name keep their seeds (seed * 5 + position, and
# 2**40 + seed for "importance") so that every pinned result stays bit-identical; any other name is seeded
# from a hash of (run seed, name), so a learner or method that adds a stream never shifts another one.
LEGACY_STREAMS = {"loader": (5, 0), "drop": (5, 1), "augment": (5, 2), "ablation_mask": (5, 3),
                  "projection": (5, 4), "importance": (1, 2**40)}
_STREAM_TAG = 0x73747265616D  # "stream": keeps the hashed seeds apart from the per-sample transform seeds


def stream_seed(seed: int, stream: str) -> int:
    """The generator seed of random stream ``stream`` of a run seeded with ``seed`` (a non-negative int).

    Raises:
        ValueError: an empty stream name.
    """
    if not stream:
        raise ValueError("a random stream needs a name")
    if stream in LEGACY_STREAMS:
        mult, offset = LEGACY_STREAMS[stream]
        return offset + seed * mult
    words = [seed, _STREAM_TAG, *stream.encode()]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> np.uint64(1))


def make_generator(seed: int, device: torch.device | str = "cpu", stream: str = "loader") -> torch.Generator:
    """A torch generator on ``device`` for the random stream named ``stream`` of the run seeded with ``seed``.

    Streams never share a sequence (see :func:`stream_seed`), and none touches the global RNG, so e.g. RanPAC's
    W_rand is the same whether or not a tuning phase ran before it.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(seed, stream))
    return gen


class Stateful:
    """An object with ``state_dict``/``load_state_dict`` made of two functions (for :meth:`Learner.stateful`)."""

    def __init__(self, get: Any, put: Any) -> None:
        self.state_dict, self.load_state_dict = get, put


class GeneratorState:
    """A ``torch.Generator`` as a checkpoint entry (its state is a uint8 tensor)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        """The generator's state (a uint8 tensor)."""
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        """Restore :meth:`state_dict`. Raises RuntimeError for a state of another kind of generator."""
        self.generator.set_state(state)


@contextmanager
def logging_quieted(level: int = logging.WARNING) -> Iterator[None]:
    """Drop log records at ``level`` and below (``logging.disable``) inside the block, then restore the level that was
    in force: a tool run in-process (smoke runner, GPU check) must not leave later code's logs empty."""
    previous = logging.root.manager.disable
    logging.disable(level)
    try:
        yield
    finally:
        logging.disable(previous)


def setup_logging(log_file: Optional[Path], level: int = logging.INFO) -> None:
    """Send INFO records to stdout, WARNING and above to stderr (so a script that reads stderr sees every warning),
    and everything to ``log_file`` if given, in the official format.

    Replaces the handlers installed by an earlier call, so each seed gets its own file (the
    original's ``basicConfig`` inside the seed loop wrote every seed into the first file, algorithms.md §9.21).
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_mist_cl", False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    fmt = logging.Formatter(LOG_FORMAT)
    out, err = logging.StreamHandler(sys.stdout), logging.StreamHandler(sys.stderr)
    out.addFilter(lambda record: record.levelno < logging.WARNING)
    err.setLevel(logging.WARNING)
    handlers: list[logging.Handler] = [out, err]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, mode="a", encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._mist_cl = True  # type: ignore[attr-defined]
        root.addHandler(handler)


# ---------------------------------------------------------------------------------------------
# run resilience: environment record, failure logging, random states for checkpoints
# ---------------------------------------------------------------------------------------------
def runtime_info(device: torch.device, cfg: ExperimentConfig) -> dict:
    """What decides bit-reproducibility on this machine, for config.json: GPU name, TF32 and determinism."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": str(device), "gpu": gpu, "allow_tf32": cfg.allow_tf32, "deterministic": cfg.deterministic,
            "precision": cfg.precision, "torch_threads": torch.get_num_threads()}


def log_traceback(exc: BaseException) -> None:
    """Write ``exc``'s traceback to the run's log file only (the terminal gets one line from main.py)."""
    record = logging.LogRecord("trainer", logging.ERROR, __file__, 0, "The run failed:", None,
                               (type(exc), exc, exc.__traceback__))
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_mist_cl", False) and isinstance(handler, logging.FileHandler):
            handler.handle(record)


def rng_state() -> dict:
    """Every global random state (torch CPU and CUDA, numpy, Python) as tensors and lists (weights_only-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "python": {"version": py_version, "internal": list(py_internal), "gauss": py_gauss}}


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (the CUDA states only where the same number of GPUs is visible)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
