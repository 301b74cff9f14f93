"""The runs of the GPU check (``bench/gpu_check.py``): the shipped paper configs it runs, their stand-in data and
shrunken sizes, a phase clock around the learner's methods, and one-task runs in this process or in a process of
their own (with a checksum of the checkpoint's learner state)."""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: the data set of the paper configs the check runs
DATASET = "cifar224"
#: the learner and preset of sections d and e (the paper's main configuration)
MAIN_HOST, MAIN_SPR = "ranpac", "mist"
#: the learner methods the phase clock times, and the phase each is
PHASES = {"tune": "tuning", "train_task": "training", "update_head": "head", "predict": "evaluation"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# configs and stand-in data
# ---------------------------------------------------------------------------------------------
@dataclass
class PaperConfig:
    """A shipped config to run, with the keys it is run with.

    Attributes:
        host: the learner's registered name; spr: the tuning preset (``"none"``: no tuning phase).
        path: the shipped file; raw: its keys (with ``spr`` replaced when the preset has no shipped config).
        label: the file, and the replacement if any, for the output.
    """

    host: str
    spr: str
    path: Path
    raw: dict[str, Any]
    label: str


def shipped_index(dataset: str = DATASET) -> dict[tuple[str, str], Path]:
    """The shipped configs of ``dataset`` (``utils.ledger.shipped_configs``), by (learner, ``spr``) of their resolved
    keys; the first file in sorted order wins where two match."""
    from utils.config import load_config
    from utils.errors import ConfigError
    from utils.ledger import shipped_configs
    from utils.registry import LEARNERS

    index: dict[tuple[str, str], Path] = {}
    for rel in shipped_configs():
        path = REPO / rel
        if json.loads(path.read_text()).get("dataset") != dataset:  # cheap: only this data set's files are loaded
            continue
        try:
            cfg = load_config(path)
        except ConfigError:
            continue
        index.setdefault((LEARNERS.resolve(cfg.model_name), cfg.spr), path)
    return index


def paper_configs(index: dict[tuple[str, str], Path]) -> list[PaperConfig]:
    """Every (learner, preset) pair the memory section runs, from the registries: each learner of ``LEARNERS`` with
    ``spr`` none and mist, then each other preset of ``PRESETS`` in front of RanPAC. A preset without a shipped
    config of the data set runs in the host's MIST config with ``spr`` replaced (same batch and backbone).

    Raises:
        LookupError: neither the pair's config nor the host's MIST config is shipped.
    """
    from utils.registry import LEARNERS, PRESETS

    pairs = [(host, spr) for host in LEARNERS.names() for spr in ("none", MAIN_SPR)]
    pairs += [(MAIN_HOST, spr) for spr in PRESETS.names() if spr != MAIN_SPR]
    out = []
    for host, spr in pairs:
        path = index.get((host, spr))
        raw_override: dict[str, Any] = {}
        if path is None:
            path = index.get((host, MAIN_SPR))
            if path is None:
                raise LookupError(f"no shipped {DATASET} config of learner {host!r} with spr {spr!r} or {MAIN_SPR!r}")
            raw_override = {"spr": spr}
        rel = str(path.relative_to(REPO))
        out.append(PaperConfig(host, spr, path, {**json.loads(path.read_text()), **raw_override},
                               rel + (f" with spr={spr} (none shipped)" if raw_override else "")))
    return out


def stand_in(dataset: str, n_classes: int, per_class: int, root: Path) -> Path:
    """Stand-in data (``utils.smoke.write_stand_in``) of ``n_classes`` classes with ``per_class`` training images
    each (smoke's two test images), written once under ``root``; returns the ``data_root``."""
    from utils import smoke

    folder = root / f"{dataset}_{n_classes}x{per_class}"
    if not folder.exists():
        with mock.patch.object(smoke, "TRAIN_PER_CLASS", per_class):
            smoke.write_stand_in(dataset, n_classes, folder)
    return folder


def images_per_class(raw: dict[str, Any], shrink: bool) -> int:
    """Training images per class: smoke's three shrunken; at full size enough for one full batch of task 0
    (``ceil(batch_size / init_cls)``, at least three)."""
    from utils import smoke
    from utils.config import load_config

    if shrink:
        return smoke.TRAIN_PER_CLASS
    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in raw.items() if k != "config"])
    batch = max(cfg.batch_size, cfg.tuning_batch_size or 0)
    return max(smoke.TRAIN_PER_CLASS, math.ceil(batch / cfg.init_cls))


def data_for(raw: dict[str, Any], shrink: bool, root: Path) -> Path:
    """The stand-in data of config ``raw``: ``init_cls + increment`` classes (two tasks; the runs stop after one)."""
    n_classes = raw.get("init_cls", 10) + raw.get("increment", 10)
    return stand_in(raw.get("dataset", DATASET), n_classes, images_per_class(raw, shrink), root)


def run_overrides(raw: dict[str, Any], data: Path, device: str, shrink: bool, epochs_as_shipped: bool = False
                  ) -> dict[str, Any]:
    """The keys a check run changes in config ``raw``: ``utils.smoke.size_overrides`` (one epoch per phase, the
    first seed, no download, random weights, and shrunken: smoke's tiny backbone, 32 px, ``M`` 64, in-process
    loading), ``device``, ``stop_after_task`` 0. At full size the backbone, input size, ``M`` and loader workers
    stay the config's; ``epochs_as_shipped`` keeps its epochs too (section e)."""
    from utils import smoke

    out = smoke.size_overrides(raw, data)
    out.update(device=device, stop_after_task=0)
    if not shrink:
        for k in ("backbone_kwargs", "input_size", "M", "num_workers"):
            out.pop(k, None)
    if epochs_as_shipped:
        for k in ("mi_epochs", "ablation_epochs", "warm_epochs", "epochs", "ca_epochs", "prompt_epochs",
                  "init_epochs", "later_epochs", "tuning_steps"):
            out.pop(k, None)
    return out


# ---------------------------------------------------------------------------------------------
# one instrumented run
# ---------------------------------------------------------------------------------------------
class PhaseClock:
    """Wall time and images of each phase of a learner's task (:data:`PHASES`), taken around the learner's methods.

    A phase called inside another (e.g. a head update inside the tuning phase) counts in the outer one.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.phase: Optional[str] = None
        self.seconds: dict[str, float] = defaultdict(float)
        self.images: dict[str, int] = defaultdict(int)

    def instrument(self, learner: Any) -> Any:
        """Wrap ``learner``'s phase methods (instance attributes; the class is untouched); returns ``learner``."""
        for method, phase in PHASES.items():
            setattr(learner, method, self._timed(getattr(learner, method), phase))
        learner.extract_features = self._extracting(learner.extract_features)
        return learner

    def _timed(self, fn: Callable, phase: str) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.phase is not None:
                return fn(*args, **kwargs)
            if phase == "evaluation" and args:
                self.images[phase] += len(args[0])
            self.phase = phase
            _sync(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(self.device)
                self.seconds[phase] += time.perf_counter() - start
                self.phase = None

        return wrapper

    def _extracting(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(dataset: Any, *args: Any, **kwargs: Any) -> Any:
            if self.phase == "head":
                self.images["head"] += len(dataset)
            return fn(dataset, *args, **kwargs)

        return wrapper

    def counting(self, batches: Callable[[Iterable], Iterator]) -> Callable[[Iterable], Iterator]:
        """``models.loop.batches`` counting the rows of the training steps of the tuning and training phases."""
        def counted(loader: Iterable) -> Iterator:
            for batch in batches(loader):
                if self.phase in ("tuning", "training"):
                    self.images[self.phase] += int(batch.y.shape[0])
                yield batch

        return counted


@dataclass
class RunRecord:
    """What one run left: wall seconds of ``trainer.run``, peak GPU memory (MiB; None on the CPU) and what was
    allocated when its count was reset (MiB, left by earlier work), the per-phase seconds and images, the task's
    record and the results.json path."""

    wall_s: float
    peak_mib: Optional[float]
    base_mib: Optional[float] = None
    batch_size: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    images: dict[str, int] = field(default_factory=dict)
    task: dict[str, Any] = field(default_factory=dict)
    results: Optional[Path] = None


def run_task0(path: Path, overrides: dict[str, Any], out: Path, device: torch.device) -> RunRecord:
    """Run config ``path`` with ``overrides`` in this process (``trainer.run``) until task 0 is done, phases timed.

    Raises:
        RuntimeError: the run ended without a recorded task 0; any failure of the run.
    """
    import models.loop
    import trainer
    from utils.config import load_config
    from utils.errors import RunStopped

    cfg = load_config(path, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    clock = PhaseClock(device)
    build = trainer.build_learner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
    start = time.perf_counter()
    with mock.patch.object(trainer, "build_learner", lambda *a, **k: clock.instrument(build(*a, **k))), \
            mock.patch.object(models.loop, "batches", clock.counting(models.loop.batches)):
        try:
            trainer.run(cfg, out)
        except RunStopped:
            pass
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    found = sorted(out.glob("*/*/seed*/results.json"))
    results = json.loads(found[-1].read_text()) if found else {}
    if not results.get("tasks"):
        raise RuntimeError(f"no task recorded (status {results.get('status')}, error {results.get('error')})")
    return RunRecord(wall, peak, base, cfg.batch_size, dict(clock.seconds), dict(clock.images), results["tasks"][0],
                     found[-1])


def weights_checksum(checkpoint: Path) -> str:
    """SHA-256 (first 16 hex digits) of every tensor of the checkpoint's learner state, in key order, with its key."""
    from utils.checkpoints import read_checkpoint

    digest = hashlib.sha256()

    def walk(obj: Any, key: str) -> None:
        if isinstance(obj, torch.Tensor):
            digest.update(key.encode())
            digest.update(obj.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(obj[k], f"{key}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                walk(item, f"{key}/{i}")

    walk(read_checkpoint(checkpoint)["learner"], "")
    return digest.hexdigest()[:16]


def run_in_process_of_its_own(path: Path, overrides: dict[str, Any], out: Path) -> tuple[dict[str, Any], str]:
    """``main.py --config path --set k=v ...`` in a new process; (results.json, weights checksum of its checkpoint).

    Raises:
        RuntimeError: the command failed or left no task.
    """
    cmd = [sys.executable, str(REPO / "main.py"), "--config", str(path), "--output-dir", str(out)]
    for k, v in overrides.items():
        cmd += ["--set", f"{k}={json.dumps(v)}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # the parent's threads (shrink: one)
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    found = sorted(out.glob("*/*/seed*/results.json"))
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"main.py exit {proc.returncode}: {proc.stderr.strip()[-1500:]}")
    results = json.loads(found[-1].read_text())
    if not results.get("tasks"):
        raise RuntimeError(f"no task recorded (status {results.get('status')}, error {results.get('error')})")
    return results, weights_checksum(found[-1].parent / "checkpoint.pt")
