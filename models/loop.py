"""The one training loop of the project: epochs of steps over a loader, for every phase and learner.

A phase (MIST's scoring pass and sparse epochs, the CE ablations, PIECE, a learner's own training such as
SLCA's) says what one step computes (``forward``: a :class:`~utils.runtime.Batch` -> scalar loss) and what
happens to the gradients between the backward pass and the optimizer step (a :class:`StepRule`). The loop
owns everything else:

- epochs and tqdm progress;
- the on-device loss monitor and the NaN guard (:class:`LossMonitor`, read once per epoch);
- gradient synchronisation: the gradients live in flat buffers (:class:`FlatGradients`), and under
  torchrun each buffer is summed over the processes once per step, when the batch carries rows (the
  losses make each process's gradient its part of the global batch's, so the sum is the one-process one);
- the optimizer step and the scheduler step (once per epoch).

The gradient buffers are zero at the start of every step: a rule's ``after_step`` must leave them so.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from utils import distributed
from utils.errors import NonFiniteError
from utils.loaders import Batch, batches

logger = logging.getLogger(__name__)

Forward = Callable[[Batch], torch.Tensor]


class FlatGradients:
    """Gradients of a list of parameters as views into one flat float32 buffer (plus a dummy zero slot).

    Autograd accumulates into an existing ``.grad`` in place, so after :meth:`attach` a backward pass
    fills the buffer directly (as the official ``zero_grad()`` that keeps zero tensors); a step's masking
    is then a few operations on the buffer instead of a loop over every tensor.

    Args:
        params: name -> parameter, in flat-layout order (float32, one device).

    Raises:
        ValueError: parameters of another dtype or on several devices.
    """

    def __init__(self, params: Mapping[str, nn.Parameter]) -> None:
        self.params = dict(params)
        devices = {p.device for p in self.params.values()}
        if len(devices) > 1 or any(p.dtype != torch.float32 for p in self.params.values()):
            raise ValueError("flat gradients need float32 parameters on one device")
        device = devices.pop() if devices else torch.device("cpu")
        self.numel = sum(p.numel() for p in self.params.values())
        self.buffer = torch.zeros(self.numel + 1, dtype=torch.float32, device=device)

    def attach(self) -> None:
        """Zero the buffer and point every parameter's ``.grad`` at its slice."""
        self.buffer.zero_()
        offset = 0
        for p in self.params.values():
            p.grad = self.buffer[offset: offset + p.numel()].view_as(p)
            offset += p.numel()

    def detach(self) -> None:
        """Set every ``.grad`` back to None (the buffer is kept for the next :meth:`attach`)."""
        for p in self.params.values():
            p.grad = None

    def attached(self) -> bool:
        """True if every parameter's ``.grad`` still views the buffer (e.g. no ``zero_grad(set_to_none=True)``)."""
        offset = 0
        for p in self.params.values():
            g = p.grad
            if g is None or g.data_ptr() != self.buffer[offset:].data_ptr():
                return False
            offset += p.numel()
        return True


class LossMonitor:
    """An epoch's losses summed on the device, with the first non-finite one remembered; read once per epoch.

    ``add`` never waits on the host (no ``.item()`` per step); ``mean`` synchronises once and raises if any
    loss of the epoch was NaN or infinite, naming the step.

    Args:
        device: where the losses live.
        where: what the epoch is, for the error message (e.g. "task 3, epoch 5/20").
    """

    def __init__(self, device: torch.device, where: str) -> None:
        self.where = where
        self.total = torch.zeros((), dtype=torch.float64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor) -> None:
        """Add one step's scalar loss (float tensor on the device)."""
        loss = loss.detach()
        self.total += loss.double()
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(loss), self.steps, self.first_bad)
        self.steps += 1

    def mean(self, n_steps: int) -> float:
        """The mean loss over ``n_steps`` (a Python float, the sum in float64 divided by max(n_steps, 1)).

        Raises:
            NonFiniteError: a loss of the epoch was NaN or infinite (the message names the step, 0-based).
        """
        total, bad = torch.stack([self.total, self.first_bad.double()]).tolist()
        if bad >= 0:
            raise NonFiniteError(f"{self.where}, step {int(bad)}: the loss is "
                                 f"{total if total != total else 'not finite'}"
                                 " (NaN or infinite); stopping. Lower the learning rates, use precision fp32, or "
                                 "check the inputs and weights.")
        return total / max(n_steps, 1)


class StepRule(Protocol):
    """What a phase does to the gradients of one step (see :class:`DenseStep` for the plain rule)."""

    def before_step(self, grads: Sequence[FlatGradients]) -> Optional[torch.Tensor]:
        """Mask or record the summed gradients in place; return the step's non-zero backbone gradient entries
        (a 0-dim int64 tensor on the device) or None when the rule does not count them."""

    def after_step(self, grads: Sequence[FlatGradients]) -> None:
        """Undo what must not persist (e.g. restore frozen entries) and leave every buffer zero."""


class DenseStep:
    """Plain training: the gradients step as they are; the buffers are zeroed after the step."""

    def before_step(self, grads: Sequence[FlatGradients]) -> Optional[torch.Tensor]:
        """Nothing to mask; no non-zero count."""
        return None

    def after_step(self, grads: Sequence[FlatGradients]) -> None:
        """Zero every gradient buffer for the next step."""
        for flat in grads:
            flat.buffer.zero_()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` (B, C) float32 with ``targets`` (B,) int64 over the whole batch.

    One process: ``F.cross_entropy`` (the mean over B). Under torchrun (``batch.rows`` set): the gradient is this
    process's part of the global batch's mean (sum / global batch size), so the gradients summed over the
    processes are the one-process ones, and the value is the whole batch's mean (summed over processes).
    """
    if batch.rows is None:
        return F.cross_entropy(logits, targets)
    return global_mean(F.cross_entropy(logits, targets, reduction="sum"), batch)


def global_mean(total: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Under torchrun, the mean over the global batch from this process's ``total`` (a scalar sum over its rows):
    the gradient is this process's part (total / global batch size), so the gradients summed over the processes are
    the one-process ones, and the value is the whole batch's mean (summed over the processes)."""
    part = total / batch.rows[1]
    whole = distributed.all_reduce_sum_(part.detach().clone())
    return part + (whole - part.detach())


class TrainAccuracy:
    """Top-1 training accuracy over an epoch, for the per-epoch log line (``Train_accy``, as the official learners).

    ``add(logits, targets)`` counts a batch (logits (B, C), targets (B,) int64; counted on ``device`` without a
    host sync); ``take()`` returns the epoch's accuracy in percent (0 when nothing was counted), summed over the
    processes under torchrun, and starts the next epoch's count.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # correct, seen

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count a batch: logits (B, C), targets (B,) int64, on the device."""
        self.counts[0] += (logits.detach().argmax(1) == targets).sum()
        self.counts[1] += targets.shape[0]

    def take(self) -> float:
        """The epoch's accuracy (%), summed over the processes; resets the count."""
        done = distributed.all_reduce_sum_(self.counts.clone()) if distributed.active() else self.counts
        correct, seen = (int(v) for v in done.tolist())
        self.counts.zero_()
        return 100.0 * correct / max(seen, 1)


def keep_batchnorm_in_eval(module: nn.Module) -> None:
    """Put every BatchNorm layer of ``module`` in eval mode, so that training does not move its running statistics
    (config ``freeze_bn_stats``; the official code trains them; ViTs have none)."""
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.eval()


class TuningLoop:
    """Runs epochs of optimizer steps (or of gradient-only steps: a scoring pass) over a loader.

    Args:
        device: where the losses live (images are moved by ``forward``).
        progress: show tqdm bars.
    """

    def __init__(self, device: torch.device, progress: bool = False, phase: str = "train") -> None:
        self.device = device
        self.progress = progress
        #: the phase's name in the event files (``tuning`` for the tuning phase, ``train`` for the learner's own)
        self.phase = phase
        #: where per-step losses and training accuracies go (``utils.tensorboard_log.TensorBoardLog``), or None
        self.log: Optional[Any] = None

    def train_accuracy(self, label: str, accuracy: float) -> None:
        """Record one epoch's training accuracy (%) of the phase part ``label`` with :attr:`log`, if any."""
        if self.log is not None:
            self.log.train_accuracy(f"{self.phase}/{label}", accuracy)

    def run(self, loader: Iterable, epochs: Sequence[int], forward: Forward,
            optimizer: Optional[torch.optim.Optimizer], grads: Sequence[FlatGradients] = (),
            rule: Optional[StepRule] = None, scheduler: Optional[Any] = None, module: Optional[nn.Module] = None,
            freeze_bn_stats: bool = False, where: str = "", of: Optional[int] = None, label: str = "train",
            on_epoch: Optional[Callable[[int, float], None]] = None, n_batches: Optional[int] = None,
            max_steps: Optional[int] = None) -> tuple[list[float], int, torch.Tensor]:
        """Train ``len(epochs)`` epochs.

        Args:
            loader: a seeded loader (its items become :class:`Batch` with rows), or any iterable of Batch items or
                ``(index, x, y)`` tuples (one process).
            epochs: the epoch numbers to run (e.g. ``range(2, 21)`` after a scoring pass), for the messages.
            forward: one step's loss from a batch; it runs the network in train mode.
            optimizer: stepped after the rule's ``before_step``; None: no step (a scoring pass).
            grads: the flat gradient buffers of every trained parameter, attached for the whole run
                (detached at the end); under torchrun each is summed over the processes after the backward.
            rule: the gradient rule (default :class:`DenseStep`).
            scheduler: stepped once at the end of every epoch (its warning about a scheduler stepped without an
                optimizer step, in a scoring pass, is silenced).
            module: put in train mode at the start of every epoch.
            freeze_bn_stats: keep ``module``'s BatchNorm layers in eval mode (their running statistics fixed).
            where: the task, for the NaN message (e.g. "task 3" gives "task 3, epoch 2/20, step 5").
            of: the phase's epoch count in the messages (default: the last of ``epochs``).
            label: the progress bar's label.
            on_epoch: called with (epoch, mean loss) after every epoch (logging).
            n_batches: the number of batches per epoch when ``loader`` has no ``len``.
            max_steps: stop after this many steps (within an epoch: its mean loss is over the steps it took).

        Returns:
            (mean loss of every epoch, steps taken, the rule's non-zero counts summed over the steps: a 0-dim
            int64 tensor on the device).

        Raises:
            NonFiniteError: a loss was NaN or infinite (checked at the end of its epoch).
            RuntimeError: a forward pass replaced a parameter's gradient buffer (e.g. ``zero_grad(set_to_none=True)``).
        """
        rule = rule or DenseStep()
        total = n_batches if n_batches is not None else len(loader)  # type: ignore[arg-type]
        nonzero = torch.zeros((), dtype=torch.int64, device=self.device)
        losses, steps = [], 0
        for flat in grads:
            flat.attach()
        last = of if of is not None else (epochs[-1] if len(epochs) else 0)
        for epoch in epochs:
            if max_steps is not None and steps >= max_steps:
                break
            if module is not None:
                module.train()
                if freeze_bn_stats:
                    keep_batchnorm_in_eval(module)
            monitor = LossMonitor(self.device, f"{where}, epoch {epoch}/{last}" if where else f"epoch {epoch}")
            history: Optional[list[torch.Tensor]] = [] if self.log is not None else None
            taken = steps
            for batch in tqdm(batches(loader), total=total, desc=f"{label} epoch {epoch}/{last}", leave=False,
                              disable=not self.progress):
                loss = forward(batch)
                loss.backward()
                if batch.rows is not None:
                    for flat in grads:
                        distributed.all_reduce_sum_(flat.buffer)
                count = rule.before_step(grads)
                if optimizer is not None:
                    optimizer.step()
                rule.after_step(grads)
                if count is not None:
                    nonzero += count
                monitor.add(loss)
                if history is not None:
                    history.append(loss.detach())
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            if scheduler is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
            losses.append(monitor.mean(total if max_steps is None else steps - taken))
            if history:  # read once per epoch, after the NaN check
                self.log.losses(f"{self.phase}/{label}", torch.stack(history))
            if on_epoch is not None:
                on_epoch(epoch, losses[-1])
        for flat in grads:
            if not flat.attached():
                raise RuntimeError("a gradient buffer was replaced during training (zero_grad(set_to_none=True)?)")
            flat.detach()
        return losses, steps, nonzero
