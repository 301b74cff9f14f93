"""A run folder whose files always agree with each other (issue 16): stale temporary files, partial results moved
aside, a fingerprint of what a checkpoint was trained with, and a lock against two processes resuming one folder.

Layout (``trainer.py``): ``RUN/seed<s>/{config.json, results.json, checkpoint.pt, <name>_seed<s>.log}`` and, while a
process works on the folder, ``RUN/.lock`` holding its pid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from utils.errors import CheckpointError, UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
FINGERPRINT_VERSION = 1


class OutputError(UserError):
    """The output folder or one of its files cannot be written (read-only, a file in the way, full disk)."""


def config_fingerprint(config: dict[str, Any], seeds: Iterable[int], ignore: Iterable[str]) -> str:
    """SHA-256 (hex, 16 characters) of everything in a run's config that affects its results.

    Args:
        config: the resolved config (``ExperimentConfig.to_dict()`` or the ``config`` of config.json), any ``seed``.
        seeds: the run's seed list (a seed added by hand changes the fingerprint).
        ignore: keys that may change on resume (``trainer.RESUMABLE_KEYS``).
    """
    skip = set(ignore) | {"seed"}
    data = {"version": FINGERPRINT_VERSION, "seeds": list(seeds),
            "config": {k: v for k, v in sorted(config.items()) if k not in skip}}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete ``*.tmp`` files left in ``folder`` by a process killed while writing (atomic writes go through them).

    Returns:
        The files removed (logged).
    """
    removed = []
    for path in sorted(Path(folder).glob("*.tmp")):
        try:
            path.unlink()
            removed.append(path)
        except OSError:
            pass
    if removed:
        logger.warning("removed %d stale temporary file(s) of an interrupted write: %s", len(removed),
                       ", ".join(p.name for p in removed))
    return removed


def move_aside(path: Path, label: str) -> Optional[Path]:
    """Rename ``path`` (if it exists) to ``<stem>.<label>-<n><suffix>`` with the first free n; returns the new path."""
    path = Path(path)
    if not path.exists():
        return None
    n = 1
    while (target := path.with_name(f"{path.stem}.{label}-{n}{path.suffix}")).exists():
        n += 1
    path.replace(target)
    return target


def check_checkpoint_meta(path: Path, state: dict[str, Any], fingerprint: str, seed: int,
                          class_order: list[int], n_tasks: int) -> None:
    """Refuse a checkpoint that was not written by this run folder's config, seed and class order, or whose task
    counter does not match the results it holds.

    Checkpoints written before fingerprints existed (no ``fingerprint`` entry) are accepted with a warning.

    Raises:
        CheckpointError: one line naming ``path`` and what differs.
    """
    meta = state.get("meta")
    if meta is None:
        logger.warning("checkpoint %s has no fingerprint (written by an older version): its config cannot be checked",
                       path)
    else:
        if meta.get("seed") != seed:
            raise CheckpointError(f"checkpoint {path} was written for seed {meta.get('seed')}, this folder runs seed "
                                  f"{seed}; it does not belong here.")
        if meta.get("class_order") != list(class_order):
            raise CheckpointError(f"checkpoint {path} was written for another class order; it does not belong to "
                                  "this run.")
        if meta.get("fingerprint") != fingerprint:
            raise CheckpointError(f"checkpoint {path} was written with another config than {path.parent / 'config.json'}"
                                  " now holds (a key that affects the results was edited, or the checkpoint comes "
                                  "from another run); restore the config or start a new run.")
    next_task = state.get("next_task")
    if isinstance(next_task, bool) or not isinstance(next_task, int) or not 1 <= next_task <= n_tasks:
        raise CheckpointError(f"checkpoint {path}: next_task is {next_task!r}, expected 1 to {n_tasks} (this run has "
                              f"{n_tasks} tasks).")
    try:
        results = json.loads(state["results"])
        done = [t["task"] for t in results["tasks"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: its results cannot be read ({type(exc).__name__}: "
                              f"{str(exc)[:200]}).") from None
    if done != list(range(next_task)):
        raise CheckpointError(f"checkpoint {path}: next_task is {next_task} but its results hold tasks {done[:10]}; "
                              "the file was altered.")


class RunLock:
    """``RUN/.lock`` (the pid of the process working on the folder), taken atomically; a lock whose process no longer
    runs is stale and replaced. Use as a context manager; only the process that writes the folder takes it.

    Raises:
        OutputError: another live process holds the folder (its pid named), or the lock file cannot be written.
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = enabled
        self.held = False

    def __enter__(self) -> "RunLock":
        if not self.enabled:
            return self
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self._owner()
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise OutputError(f"{self.path.parent} is in use by process {pid} (lock {self.path}); wait for it "
                                      "to end, or delete the lock if that process is not a mist-cl run.") from None
                logger.warning("removing the stale lock %s (process %s no longer runs)", self.path, pid)
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise OutputError(f"cannot create the lock {self.path} ({exc.strerror or exc}).") from None
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            self.held = True
            return self
        raise OutputError(f"cannot take the lock {self.path}: another process keeps creating it.")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def _owner(self) -> Optional[int]:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
