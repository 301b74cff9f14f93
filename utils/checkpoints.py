"""A run's checkpoint (issue 8): everything the rest of a seed needs after a task, written atomically, and read back
checked (``weights_only=True``, a mist-cl format tag, a task counter that fits its results)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

from utils.errors import CheckpointError
from utils.results_file import _finite, _json_default
from utils.run_folder import OutputError
from utils.runtime import rng_state, set_rng_state

if TYPE_CHECKING:  # the models import utils
    from models.base import Learner

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "mist-cl checkpoint v1"


class CheckpointUnreadable(CheckpointError):
    """The checkpoint file cannot be read at all (truncated, e.g. by a killed write): the seed restarts."""


def save_checkpoint(path: Path, learner: Learner, results: dict, next_task: int) -> None:
    """Write everything the rest of the run needs, atomically (temporary file, then rename).

    Holds the learner (backbone, heads, tuning state and its generators), the metrics so far (results.json
    as text), every global random state (torch CPU and CUDA, numpy, Python) and ``meta``: the run's fingerprint,
    seed and class order (checked on resume).

    Raises:
        OutputError: the file cannot be written (full disk, read-only folder); the message names it and the cause,
            and no partial temporary file is left.
    """
    meta = {"fingerprint": results.get("fingerprint"), "seed": results.get("seed"),
            "class_order": list(results.get("class_order", []))}
    state = {"format": CHECKPOINT_FORMAT, "next_task": next_task, "meta": meta,
             "results": json.dumps(_finite(results), default=_json_default),
             "learner": learner.state_dict(), "rng": rng_state()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as a RuntimeError of its zip writer
        tmp.unlink(missing_ok=True)
        cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0][:200]
        raise OutputError(f"cannot write the checkpoint {path} ({cause}); is the disk full? results.json holds every "
                          "task finished so far.") from None


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's contents (``weights_only=True``, on the CPU).

    Raises:
        CheckpointUnreadable: the file cannot be read (truncated, empty).
        CheckpointError: it is not a mist-cl checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle of foreign objects, ...
        raise CheckpointUnreadable(f"checkpoint {path} cannot be read ({type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a mist-cl checkpoint (format {CHECKPOINT_FORMAT!r} expected).")
    return state


def load_checkpoint(path: Path, learner: Learner, state: Optional[dict] = None) -> tuple[dict, int]:
    """Restore ``learner`` and the global random states from a checkpoint (read with :func:`read_checkpoint`
    unless ``state`` is given).

    Returns:
        (results so far, index of the next task).

    Raises:
        CheckpointError: the file is unreadable, not a mist-cl checkpoint, does not fit this run's learner, or holds
            malformed results.
    """
    state = read_checkpoint(path) if state is None else state
    try:
        learner.load_state_dict(state["learner"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this run's learner ({exc}).") from None
    try:
        results, next_task = json.loads(state["results"]), int(state["next_task"])
        set_rng_state(state["rng"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: malformed entry ({type(exc).__name__}: {str(exc)[:200]}).") \
            from None
    return results, next_task
