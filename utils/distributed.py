"""torchrun support: one process per device through ``torch.distributed`` (gloo on CPU, NCCL on GPUs).

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) every function here is a no-op for one process,
so single-process runs are unchanged. Under torchrun the run stays the same computation as one process:

- ``batch_size`` is the global batch; :func:`share` gives each rank a contiguous slice of every batch;
- the contrastive loss sees the whole batch (:func:`gather_rows`, differentiable), so every rank computes
  the same loss, and :func:`all_reduce_sum_` of the gradients gives the single-process gradient;
- extraction and evaluation split the (identically shuffled) order into the batches one process would use and
  give batch i to rank i mod W (:func:`owned_batches`), so every feature is bitwise the one-process feature;
  :func:`gather_batches` puts the rows back in that order, with exact counts (no sampler padding);
- random streams (drop, augmentation, loader order) are seeded identically on every rank, so replicas stay
  identical; :func:`check_replicas` compares a parameter checksum across ranks;
- only rank 0 writes logs, results and checkpoints.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when this process was started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    """True when a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Processes in the process group (1 without one, or with a single process)."""
    return dist.get_world_size() if active() else 1


def rank() -> int:
    """This process's rank in the process group (0 without one)."""
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0 (or the only process): the one that writes logs, results and checkpoints."""
    return rank() == 0


def launch_rank() -> int:
    """This process's global rank as torchrun set it (usable before the process group exists)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine as torchrun set it (``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(device_type: str) -> None:
    """Initialise the process group from torchrun's environment (no-op without torchrun or if done already).

    Args:
        device_type: ``"cuda"`` uses NCCL (one GPU per process, ``LOCAL_RANK``), anything else gloo.
    """
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)


def share(n: int, world: Optional[int] = None, which: Optional[int] = None) -> tuple[int, int]:
    """The contiguous slice [start, stop) of ``n`` rows that rank ``which`` takes (sizes differ by at most 1)."""
    world = world_size() if world is None else world
    which = rank() if which is None else which
    base, extra = divmod(n, world)
    start = which * base + min(which, extra)
    return start, start + base + (1 if which < extra else 0)


def _gather_padded(local: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    longest = max(counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:c] for p, c in zip(parts, counts)])


class _GatherRows(torch.autograd.Function):
    """All ranks' rows in rank order; the backward keeps this rank's rows of the incoming gradient.

    Every rank computes the same loss from the gathered rows, so the local gradient of its own rows is
    already exact; the gradients of the parameters are then summed across ranks (:func:`all_reduce_sum_`).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
        ctx.start = sum(counts[: rank()])
        ctx.rows = local.shape[0]
        return _gather_padded(local, counts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.start: ctx.start + ctx.rows], None


def gather_rows(local: torch.Tensor, counts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Concatenate every rank's rows (dim 0) in rank order; differentiable; identity for one process.

    Args:
        local: (n_r, ...) this rank's rows.
        counts: rows of every rank, when known (else exchanged first, one small collective).
    """
    if not active():
        return local
    if counts is None:
        sizes = torch.tensor([local.shape[0]], device=local.device)
        gathered = [torch.empty_like(sizes) for _ in range(world_size())]
        dist.all_gather(gathered, sizes)
        counts = [int(s) for s in gathered]
    if not (torch.is_grad_enabled() and local.requires_grad):
        return _gather_padded(local, [int(c) for c in counts])
    return _GatherRows.apply(local, tuple(int(c) for c in counts))


def owned_batches(n: int, batch_size: int, world: Optional[int] = None,
                  which: Optional[int] = None) -> list[tuple[int, int]]:
    """The ``[start, stop)`` ranges of the batches of an ``n``-item order (``batch_size`` each, the last the
    remainder) that rank ``which`` takes: batch i goes to rank i mod ``world``. One process takes them all."""
    world = world_size() if world is None else world
    which = rank() if which is None else which
    return [(start, min(start + batch_size, n)) for start in range(which * batch_size, n, world * batch_size)]


def batch_order(n: int, batch_size: int, world: int) -> torch.Tensor:
    """Where row j of an ``n``-item order sits in the concatenation, in rank order, of every rank's
    :func:`owned_batches` rows: an (n,) int64 index, so that ``concatenated[batch_order(...)]`` is the order."""
    owned = [owned_batches(n, batch_size, world, r) for r in range(world)]
    offsets = [0]
    for ranges in owned[:-1]:
        offsets.append(offsets[-1] + sum(stop - start for start, stop in ranges))
    index = torch.empty(n, dtype=torch.int64)
    for i, start in enumerate(range(0, n, batch_size)):
        owner, size = i % world, min(batch_size, n - start)
        index[start: start + size] = torch.arange(offsets[owner], offsets[owner] + size)
        offsets[owner] += size
    return index


def gather_batches(local: torch.Tensor, n: int, batch_size: int) -> torch.Tensor:
    """Every rank's rows of :func:`owned_batches` put back in the order's row order (identity for one process).

    Args:
        local: (n_r, ...) this rank's rows: its owned batches, concatenated in order.
        n: rows of the whole order; batch_size: rows per batch.

    Returns:
        (n, ...) the rows of batch 0, 1, 2, ... on every rank.
    """
    if not active():
        return local
    world = world_size()
    counts = [sum(stop - start for start, stop in owned_batches(n, batch_size, world, r)) for r in range(world)]
    return gather_rows(local, counts)[batch_order(n, batch_size, world).to(local.device)]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the run folder)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_replicas(parameters: Iterable[torch.Tensor], where: str) -> None:
    """Raise if the parameters differ across ranks (float64 sum and sum of squares compared exactly; a no-op in one
    process).

    Raises:
        RuntimeError: the replicas diverged, naming ``where``.
    """
    if not active():
        return
    params = list(parameters)
    stats = torch.stack([torch.stack([p.detach().double().sum(), p.detach().double().pow(2).sum()])
                         for p in params]).sum(0)
    gathered = [torch.empty_like(stats) for _ in range(world_size())]
    dist.all_gather(gathered, stats)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"replicas differ after {where}: parameter checksums {[g.tolist() for g in gathered]}")


def barrier() -> None:
    """Wait for every process (a no-op in one process)."""
    if active():
        dist.barrier()


def destroy() -> None:
    """Destroy the process group, if one is initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def step_rows(step: int, n_items: int, batch_size: int) -> Optional[tuple[int, int]]:
    """This rank's ``(offset, total)`` in global batch ``step`` of a loader over ``n_items`` (None for one process).

    The global batches are ``batch_size`` items, the last one the remainder (``drop_last`` false).
    """
    if not active():
        return None
    total = min(batch_size, n_items - step * batch_size)
    return share(total)[0], total


def shares(total: int) -> list[int]:
    """Rows of every rank in a batch of ``total``."""
    return [stop - start for start, stop in (share(total, world_size(), r) for r in range(world_size()))]
