"""A run folder whose files always agree with each other (issue 16): stale temporary files, partial results moved
aside, a fingerprint of what a checkpoint was trained with, and a lock against two processes resuming one folder (an
operating-system lock, ``fcntl.flock``, on ``RUN/.lock``; issue 26).

Layout (``trainer.py``): ``RUN/seed<s>/{config.json, results.json, checkpoint.pt, <name>_seed<s>.log}`` and, while a
process works on the folder, ``RUN/.lock`` (locked by that process; its pid written in it).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from utils.errors import CheckpointError, ConfigError, UserError

logger = logging.getLogger(__name__)

LOCK_NAME = ".lock"
LOCK_ATTEMPTS = 100  # a lock file deleted under us by its releasing holder is retried at most this often
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
            raise CheckpointError(f"checkpoint {path} was written with another config than "
                                  f"{path.parent / 'config.json'}"
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
    """``RUN/.lock``: an exclusive ``fcntl.flock`` on that file while one process writes the folder. Use as a context
    manager; only the process that writes the folder takes it.

    The operating system releases the lock when its process ends, however it ends, so a lock file left by a killed
    process (or by the pid-file lock of earlier versions) never blocks. The holder's pid is written into the file for
    people to read; the lock does not depend on it. On release the holder deletes the file before unlocking it, and a
    process that locked a file no longer at ``RUN/.lock`` lets it go and tries again, so two processes never both hold
    the folder.

    Raises:
        OutputError: another process holds the folder (its pid named when the file says), or ``RUN/.lock`` cannot be
            used (a directory or another non-file in the way, a read-only folder).
    """

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = enabled
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock now."""
        return self._fd is not None

    def __enter__(self) -> "RunLock":
        if self.enabled:
            self._fd = _take_lock(self.path)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still locked: see _take_lock
        except OSError:  # a lock file left behind blocks nobody
            pass
        os.close(self._fd)
        self._fd = None


def _take_lock(path: Path) -> int:
    """Lock ``path`` without waiting and write this process's pid into it; returns the locked descriptor.

    A file locked after its holder deleted it (the holder released it between our open and our lock) is let go and
    the new file at ``path`` tried instead.

    Raises:
        OutputError: another process holds the lock, or the file cannot be used.
    """
    for _ in range(LOCK_ATTEMPTS):
        fd = _open_lock_file(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise OutputError(f"{path.parent} is in use by {_holder(path)} (lock {path}); wait for it to end. "
                                  "The lock goes away with its process.") from None
            raise OutputError(f"cannot lock {path} ({exc.strerror or exc}); the file system may not support "
                              "file locks.") from None
        if _names(path, fd):
            _write_pid(fd)
            return fd
        os.close(fd)
    raise OutputError(f"cannot take the lock {path}: other processes keep taking and releasing it.")


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file without truncating it (its holder's pid stays readable).

    Raises:
        OutputError: ``path`` is a directory or another non-file, or cannot be opened or created.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except IsADirectoryError:
        raise OutputError(f"the lock {path} is a directory; no mist-cl run makes one. Remove it (rmdir {path}) and "
                          "run again.") from None
    except OSError as exc:
        raise OutputError(f"cannot open or create the lock {path} ({exc.strerror or exc}); the folder "
                          f"{path.parent} must be writable.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OutputError(f"the lock {path} is not a regular file; remove it and run again.")
    return fd


def _names(path: Path, fd: int) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (a released lock file is deleted by its holder)."""
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (now.st_dev, now.st_ino) == (opened.st_dev, opened.st_ino)


def _write_pid(fd: int) -> None:
    """Replace the lock file's text with this process's pid (for people; a write error does not matter)."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
    except OSError:
        pass


def _holder(path: Path) -> str:
    """'process <pid>' as the lock file says, or 'another process' while the holder has not written it yet."""
    try:
        return f"process {int(path.read_text().strip())}"
    except (OSError, ValueError):
        return "another process"


def check_seed_folders(run_dir: Path, seed_dirs: list[Path], saved: dict, seeds: Sequence[int], expected: str) -> None:
    """Refuse a run folder whose seed folders disagree: another config or seed list in one of them, a seed folder
    that the seed list ``seeds`` does not hold, or a config edited after the run started (its fingerprint is not
    ``expected``, the one the first results.json recorded).

    Raises:
        ConfigError: naming the files that differ.
    """
    first = seed_dirs[0] / "config.json"
    for seed_dir in seed_dirs[1:]:
        try:
            other = json.loads((seed_dir / "config.json").read_text())
            same = ({k: v for k, v in other["config"].items() if k != "seed"} ==
                    {k: v for k, v in saved["config"].items() if k != "seed"} and other["seeds"] == saved["seeds"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            same = False
        if not same:
            raise ConfigError(f"--resume {run_dir}: {seed_dir / 'config.json'} and {first} hold different configs or "
                              "seed lists; one of them was edited. Restore it or start a new run.")
    listed = {f"seed{s}" for s in seeds}
    stray = [d.name for d in seed_dirs if d.name not in listed]
    if stray:
        raise ConfigError(f"--resume {run_dir}: the folder(s) {', '.join(stray)} are not in the seed list "
                          f"{list(seeds)} of {first}; it was edited. Restore it or start a new run.")
    try:  # the first results.json written records the fingerprint of the config the run started with
        started = json.loads((seed_dirs[0] / "results.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        started = None
    if started is not None and started != expected:
        raise ConfigError(f"--resume {run_dir}: {first} no longer holds the config the run started with (a key that "
                          "affects the results, or the seed list, was edited); restore it or start a new run.")


def seed_complete(results_path: Path, expected: str) -> bool:
    """True when results.json says complete, holds every task of its task sizes, and (when it has one) carries the
    run's fingerprint; a hand-set status on a partial file is not complete."""
    try:
        data = json.loads(results_path.read_text())
        done = data.get("status") == "complete" and len(data["tasks"]) == len(data["task_sizes"])
        return bool(done) and data.get("fingerprint", expected) == expected
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
