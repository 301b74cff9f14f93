"""TensorBoard event files of a run (the ``loggers`` key, issue 28): ``tensorboard --logdir RUN_DIR``.

One event file per seed, in ``<run folder>/seed<seed>/tensorboard/``, written by rank 0 only
(``torch.utils.tensorboard.SummaryWriter``). Tags:

- ``loss/<phase>/<part>``: the loss of every step of a phase (``tuning``: the tuning phase, ``train``: the learner's
  own training) and part (the loop's label: ``scoring`` for a scoring pass, the preset's name for the tuning phase's
  training epochs, e.g. ``MIST``, ``SPG``, ``ACL``; ``SLCA``, ``CA`` for SLCA's classifier alignment, ``EASE``,
  ``L2P``, ``DualPrompt``),
  x = the tag's step count over the whole run (continued after a resume);
- ``train_accuracy/<phase>/<part>``: the training accuracy of each epoch where the learner measures one, x = epochs;
- ``accuracy/top1_seen``, ``accuracy/a_bar``, ``accuracy/forgetting``, ``accuracy/old_classes``: after each task
  (x = task), the accuracy on the seen classes, A-bar so far (mean of the curve so far), forgetting so far and
  old-class accuracy, as results.json holds them;
- ``tuning/selected_fraction``, ``tuning/moved_fraction``, ``tuning/updated_fraction_per_step``: the task's tuning
  report, when a tuning phase ran;
- ``accuracy_matrix``: an image of the accuracy matrix after each task (row: after task t, column: task j).

The losses are kept on the device during an epoch and read once at its end (no extra host synchronisation per step).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

LOGGERS = ("tensorboard",)


class TensorBoardLog:
    """The event file of one seed's run.

    Args:
        folder: the seed's run folder (``.../seed<seed>``); events go to ``folder/tensorboard``.
        counters: :meth:`counters` of the run this one resumes (its step and epoch counts per tag), or None.

    Raises:
        ToolError: tensorboard is not installed (``pip install tensorboard``, in requirements.txt).
    """

    def __init__(self, folder: Path, counters: Optional[dict[str, dict[str, int]]] = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when the tensorboard package is missing
            from utils.cli import ToolError

            raise ToolError("loggers: 'tensorboard' needs the tensorboard package: pip install tensorboard "
                            "(it is in requirements.txt)") from None
        self.path = Path(folder) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.path))
        self.steps: dict[str, int] = dict((counters or {}).get("steps", {}))
        self.epochs: dict[str, int] = dict((counters or {}).get("epochs", {}))

    def counters(self) -> dict[str, dict[str, int]]:
        """Steps and epochs written so far per tag (saved in results.json so that a resumed run continues them)."""
        return {"steps": dict(self.steps), "epochs": dict(self.epochs)}

    def losses(self, phase: str, values: torch.Tensor) -> None:
        """One epoch's per-step losses of ``phase``: (steps,) float tensor, on any device (read here, once)."""
        for value in values.detach().float().cpu().tolist():
            step = self.steps.get(phase, 0)
            self.writer.add_scalar(f"loss/{phase}", value, step)
            self.steps[phase] = step + 1

    def train_accuracy(self, phase: str, accuracy: float) -> None:
        """One epoch's training accuracy of ``phase`` (%)."""
        epoch = self.epochs.get(phase, 0)
        self.writer.add_scalar(f"train_accuracy/{phase}", accuracy, epoch)
        self.epochs[phase] = epoch + 1

    def task(self, task_id: int, results: dict[str, Any]) -> None:
        """The task's accuracies and tuning report, from the results.json content after ``task_id``."""
        curve = results["top1_curve"]
        scalars = {"accuracy/top1_seen": curve[-1], "accuracy/a_bar": sum(curve) / len(curve),
                   "accuracy/forgetting": results.get("forgetting"),
                   "accuracy/old_classes": results["tasks"][-1].get("old")}
        tuning = results["tasks"][-1].get("tuning") or {}
        for key in ("selected_fraction", "moved_fraction", "updated_fraction_per_step"):
            scalars[f"tuning/{key}"] = tuning.get(key)
        for tag, value in scalars.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(tag, float(value), task_id)
        self.writer.add_image("accuracy_matrix", matrix_image(results["accuracy_matrix"]), task_id, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def matrix_image(matrix: Sequence[Sequence[Optional[float]]], cell: int = 24) -> np.ndarray:
    """The accuracy matrix as an RGB image (H, W, 3) uint8: row t (after task t), column j (task j), each cell
    ``cell`` px, dark for 0 % to bright for 100 % (viridis), grey where there is no value."""
    import matplotlib

    rows = len(matrix)
    cols = max((len(r) for r in matrix), default=0)
    colours = matplotlib.colormaps["viridis"]
    image = np.full((max(rows, 1) * cell, max(cols, 1) * cell, 3), 128, dtype=np.uint8)
    for t, row in enumerate(matrix):
        for j, value in enumerate(row):
            if value is not None:
                rgb = (np.array(colours(float(value) / 100.0)[:3]) * 255).astype(np.uint8)
                image[t * cell:(t + 1) * cell, j * cell:(j + 1) * cell] = rgb
    return image


def open_events(cfg: Any, learner: Any, out: Path, results: dict[str, Any]) -> Optional[TensorBoardLog]:
    """The run's event log when ``loggers`` names tensorboard (None otherwise), attached to the learner's and the
    tuning phase's loops; its counters continue those of a resumed run (results.json ``tensorboard_steps``).

    Raises:
        ToolError: tensorboard is not installed.
    """
    if "tensorboard" not in cfg.loggers:
        return None
    events = TensorBoardLog(out, results.get("tensorboard_steps"))
    for loop in (learner.loop, getattr(learner.tuner, "loop", None)):
        if loop is not None:
            loop.log = events
    return events
