"""Device resolution, seeding, seeded DataLoaders and log handlers: the one place for run-time plumbing."""

from __future__ import annotations

import logging
import os
import random
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler,
                              get_worker_info)
from torch.utils.data._utils.collate import default_collate

from utils import distributed
from utils.errors import ConfigError

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


def autocast(device: torch.device, precision: str):
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
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def _worker_init(worker_id: int) -> None:
    """Seed numpy and ``random`` in a loader worker from its torch seed.

    torch seeds worker ``w`` with ``base_seed + w``, ``base_seed`` drawn from the loader's generator when the
    iterator is created; numpy and ``random`` get that seed modulo 2**32.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def _reseed_worker(base_seed: int) -> None:
    """Seed the current worker exactly as torch seeds a fresh worker of an iterator with ``base_seed``.

    torch's worker loop runs ``random.seed(s)``, ``torch.manual_seed(s)`` with ``s = base_seed + worker id``
    (and seeds numpy), then ``worker_init_fn``; ``_worker_init`` then re-seeds numpy and ``random``.
    """
    info = get_worker_info()
    seed = base_seed + info.id
    random.seed(seed)
    torch.manual_seed(seed)
    _worker_init(info.id)


TRANSFORM_STREAM = 0x7472616E  # the per-sample transform seeds' own stream tag (never a make_generator seed)


def sample_seed(run_seed: int, epoch: int, sample: int) -> int:
    """The seed of one sample's random train transforms in one epoch: a hash of (run seed, epoch, sample id).

    Used so that a sample's crop and flip do not depend on which process or worker loads it.
    """
    return int(np.random.SeedSequence([run_seed, TRANSFORM_STREAM, epoch, sample]).generate_state(1, np.uint64)[0])


class _EpochTaggedSampler(Sampler):
    """The wrapped sampler's indices as ``(index, (epoch, base_seed))``.

    ``epoch`` counts this sampler's passes (0, 1, ...); ``base_seed`` is the epoch's worker seed that
    ``SeededLoader.__iter__`` sets just before a persistent loader's later epochs, else None.
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.tag: Optional[int] = None
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        tag, epoch = (self.epoch, self.tag), self.epoch
        self.epoch, self.tag = epoch + 1, None
        for index in self.sampler:
            yield index, tag


class _ShardedOrder(Sampler):
    """This rank's whole batches of every pass of ``sampler``: batch i of ``batch_size`` goes to rank i mod W
    (torchrun extraction and evaluation). Each batch is the one a single process would form, so the backbone sees
    the same batch shapes and contents and its outputs are bitwise those of one process; the rows come back in
    order through :func:`utils.distributed.gather_batches`."""

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        self.sampler = sampler
        self.batch_size = batch_size

    def __len__(self) -> int:
        return sum(stop - start for start, stop in distributed.owned_batches(len(self.sampler), self.batch_size))

    def __iter__(self):
        order = list(self.sampler)
        return iter([i for start, stop in distributed.owned_batches(len(order), self.batch_size)
                     for i in order[start:stop]])


class _ShardedBatches(Sampler):
    """This rank's contiguous share of every global batch of ``batch_size`` (torchrun training).

    A share can be empty (a last batch smaller than the number of ranks): it is yielded as an empty list,
    which :func:`collate_or_none` turns into None.
    """

    def __init__(self, sampler: Sampler, batch_size: int) -> None:
        self.batches = BatchSampler(sampler, batch_size, drop_last=False)
        self.global_batch_size = batch_size

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            start, stop = distributed.share(len(batch))
            yield batch[start:stop]


def collate_or_none(batch: list):
    """``default_collate``, or None for an empty batch (a rank's empty share of a global batch)."""
    return default_collate(batch) if batch else None


class _ReseedingDataset(Dataset):
    """A map-style dataset read with ``(index, (epoch, base_seed))`` keys.

    - When ``base_seed`` changes, the first item a persistent worker loads re-seeds its torch, numpy and
      ``random`` generators as a fresh worker of that epoch's iterator would be seeded (``_reseed_worker``).
    - With ``run_seed`` set, each item's transforms draw from torch's generator seeded with
      :func:`sample_seed` (run seed, epoch, the dataset's ``sample_id(index)`` or the index), restored
      afterwards: the images do not depend on the number of workers or processes.
    """

    def __init__(self, dataset: Dataset, run_seed: Optional[int] = None) -> None:
        self.dataset = dataset
        self.run_seed = run_seed
        self._tag: Optional[int] = None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key):
        index, (epoch, base_seed) = key
        if base_seed is not None and base_seed != self._tag:
            _reseed_worker(base_seed)
            self._tag = base_seed
        if self.run_seed is None:
            return self.dataset[index]
        sample = self.dataset.sample_id(index) if hasattr(self.dataset, "sample_id") else index
        gen = torch.default_generator  # torchvision's random transforms draw from it
        state = gen.get_state()
        gen.manual_seed(sample_seed(self.run_seed, epoch, int(sample)))  # CPU only: cheaper than torch.manual_seed
        try:
            return self.dataset[index]
        finally:
            gen.set_state(state)


class SeededLoader(DataLoader):
    """A DataLoader whose random streams do not depend on persistent workers.

    A non-persistent DataLoader creates a new iterator every epoch: it draws a ``base_seed`` from the
    loader's generator (one int64, before the sampler's shuffle draws; also without workers) and starts
    workers seeded with ``base_seed + worker id``. A persistent one keeps its first iterator, so from the
    second epoch on it would draw nothing (every later shuffle of the run would change) and the workers
    would carry their random state over. Here each later epoch draws the same ``base_seed`` at the same
    point of the generator's stream and hands it to the workers with the indices, so shuffles, worker
    seeds and the generator's state are bit-identical to a non-persistent loader's; only the worker
    start-up per epoch is saved. Build it with ``make_loader``.
    """

    def __init__(self, *args, tagged: _EpochTaggedSampler, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tagged = tagged
        self.epochs_started = 0

    def __iter__(self):
        # a persistent iterator is reset from the second epoch on, not re-created (no base_seed draw)
        if self.persistent_workers and self.num_workers > 0 and self.epochs_started > 0:
            base_seed = int(torch.empty((), dtype=torch.int64).random_(generator=self.generator).item())
            self.tagged.tag = base_seed
        self.epochs_started += 1
        return super().__iter__()

    @property
    def global_batch_size(self) -> int:
        """Images per batch over every torchrun process (this process's loader yields its share of it)."""
        return getattr(self.batch_sampler, "global_batch_size", None) or self.batch_size


def default_prefetch_factor(num_workers: int) -> Optional[int]:
    """Batches each worker loads ahead: at least 2 (torch's default) and 4 in flight in all; None without workers."""
    if num_workers <= 0:
        return None
    return max(2, -(-4 // num_workers))


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int,
                generator: Optional[torch.Generator] = None, pin_memory: bool = False,
                persistent_workers: bool = True, prefetch_factor: Optional[int] = None,
                run_seed: Optional[int] = None, shard: str = "none") -> DataLoader:
    """A DataLoader whose shuffling, worker seeds and (optionally) per-sample transforms are reproducible.

    - The shuffle order depends on ``generator`` only, not on ``batch_size``, ``num_workers`` or the number
      of processes. Each epoch draws one int64 from ``generator`` (the workers' base seed, drawn even
      without workers), then, when shuffling, one ``randperm(len(dataset))``.
    - With ``num_workers > 0`` and ``persistent_workers`` the workers live as long as the loader (a tuning
      phase iterates one loader for many epochs), with the same draws as a non-persistent loader
      (``SeededLoader``).
    - With ``run_seed``, every sample's random transforms are seeded from (run seed, epoch, sample id), so
      the images are the same with 0, 2 or 8 workers and with 1 or N processes.
    - Under torchrun, ``shard="batch"`` gives this rank its share of every global batch of ``batch_size``
      (training; empty shares come as None), ``shard="order"`` the whole batches i of the epoch's order with
      i mod W = rank (extraction and evaluation, gathered back in order with ``utils.distributed.gather_batches``).

    Args:
        dataset: map-style, items ``(index, image (3,H,W) float32, label int64)``.
        batch_size: images per batch (the global batch with ``shard="batch"``).
        shuffle: reshuffle every epoch, drawing from ``generator``.
        num_workers: worker processes (0 loads in the main process).
        generator: CPU generator; required when ``shuffle`` is true (None: torch's global generator).
        pin_memory: pin host memory (useful when the model is on CUDA).
        persistent_workers: keep the workers between epochs (only with ``num_workers > 0``).
        prefetch_factor: batches loaded ahead per worker; None = ``default_prefetch_factor(num_workers)``.
        run_seed: seed the random transforms per sample (None: they draw from the process's generator).
        shard: ``"none"``, ``"batch"`` or ``"order"`` (only matters under torchrun).

    Raises:
        ValueError: an unknown ``shard``.
    """
    if shard not in ("none", "batch", "order"):
        raise ValueError(f"shard must be 'none', 'batch' or 'order', not {shard!r}")
    workers = num_workers > 0
    if workers and prefetch_factor is None:
        prefetch_factor = default_prefetch_factor(num_workers)
    base = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
    tagged = _EpochTaggedSampler(base)
    sampled: Sampler = tagged
    if distributed.active() and shard == "order":
        sampled = _ShardedOrder(tagged, batch_size)
    kwargs = dict(num_workers=num_workers, generator=generator, pin_memory=pin_memory,
                  worker_init_fn=_worker_init if workers else None, prefetch_factor=prefetch_factor if workers else None,
                  persistent_workers=workers and persistent_workers)
    if distributed.active() and shard == "batch":
        kwargs.update(batch_sampler=_ShardedBatches(sampled, batch_size), collate_fn=collate_or_none)
    else:
        kwargs.update(batch_size=batch_size, sampler=sampled)
    return SeededLoader(_ReseedingDataset(dataset, run_seed), tagged=tagged, **kwargs)


class Batch(NamedTuple):
    """One training batch as the tuning loop and the losses see it.

    Attributes:
        index: (B,) int64 dataset indices.
        x: (B, 3, H, W) float32 images (on the host; the loss moves them).
        y: (B,) int64 labels.
        rows: under torchrun, ``(offset, total)``: this process's first row and the number of rows in the
            whole (global) batch, for the gathers of a loss that needs the whole batch; None in one process.
            A process's share may be empty (zero rows, same trailing shape) on a last batch smaller than the
            number of processes; it still takes part in the step's collectives.
    """

    index: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor
    rows: Optional[tuple[int, int]] = None


def batches(loader: Iterable) -> Iterator[Batch]:
    """The loader's ``(index, x, y)`` batches as :class:`Batch` items carrying their rows (one pass).

    ``loader``: a loader of :func:`make_loader`, or any iterable of ``(index, x, y)`` tuples or :class:`Batch` items
    (taken as one process's whole batches).

    The only place that knows how a torchrun training loader splits a global batch: the losses read
    ``batch.rows`` instead of computing offsets.

    Raises:
        RuntimeError: under torchrun, this process got no rows of the first batch (the global batch is smaller
            than the number of processes).
    """
    if not isinstance(loader, DataLoader):  # any iterable of (index, x, y) or Batch items, one process
        for item in loader:
            yield item if isinstance(item, Batch) else Batch(item[0], item[1], item[2], None)
        return
    sharded = distributed.active() and isinstance(loader.batch_sampler, _ShardedBatches)
    n_items, size = len(loader.dataset), getattr(loader, "global_batch_size", None) or loader.batch_size
    last = None
    for step, item in enumerate(loader):
        if item is None:
            if last is None:
                raise RuntimeError("a process got no rows of the first batch: batch_size must be at least the number "
                                   "of torchrun processes")
            item = tuple(t[:0] for t in last)
        last = item
        rows = distributed.step_rows(step, n_items, size) if sharded else None
        yield Batch(item[0], item[1], item[2], rows)


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
def runtime_info(device: torch.device, cfg) -> dict:
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
