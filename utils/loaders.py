"""Seeded, reproducible data loading (issue 8): shuffles that depend only on the run's loader stream, per-sample
transform seeds (run seed, epoch, image) so that images do not depend on the number of workers or torchrun processes,
each process's share of a global batch, and the :class:`Batch` the training loops consume."""

from __future__ import annotations

import logging
import random
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import numpy as np
import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)
from torch.utils.data._utils.collate import default_collate

from utils import distributed

logger = logging.getLogger(__name__)
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


def collate_or_none(batch: list) -> Any:
    """``default_collate`` of the items (``(index, image, label)`` -> a list of stacked tensors), or None for an empty
    batch (a rank's empty share of a global batch)."""
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
                  worker_init_fn=_worker_init if workers else None,
                  prefetch_factor=prefetch_factor if workers else None,
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
