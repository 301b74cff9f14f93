"""The runs under some folders, grouped for a report (``utils/report.py``): every results.json found, read
(``utils.results_file.load_run``), one cell per (learner, method, data set) with the newest complete run of each seed;
the metrics a report shows, and the order of learners, methods and data sets (from the registries: a new learner,
preset or data set appears without an edit)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from utils.errors import UserError
from utils.registry import DATASETS, LEARNERS, PRESETS
from utils.results_file import RESULTS_NAME, InvalidResults, RunRecord, load_run


def learner_order() -> list[str]:
    """The registered learners in report order (their class's ``ORDER``)."""
    return [name for name, cls in sorted(LEARNERS.items(), key=lambda item: item[1].ORDER)]


def method_order() -> list[str]:
    """Baseline first, ablations next, the proposed method last (as in the paper's tables)."""
    return ["none", *(name for name, p in sorted(PRESETS.items(), key=lambda item: item[1].order))]


def dataset_order() -> list[str]:
    """The registered data sets in report order (their ``order``)."""
    return [name for name, spec in sorted(DATASETS.items(), key=lambda item: item[1].order)]


# config keys that do not change the results: runs differing only in these are the "same" experiment
RUNTIME_KEYS = frozenset({"seed", "device", "num_workers", "progress", "eval_batch_size", "stop_after_task",
                          "verify_images", "data_root", "download", "config", "check_replicas", "prefix",
                          "model_name"})


class ReportError(UserError):
    """Bad input for the report: the message names the folder or file and what to do (exit status 2)."""


@dataclass(frozen=True)
class Metric:
    """One reported quantity: ``key`` in :attr:`RunRecord.values`, its Markdown title, CSV unit, display scale."""

    key: str
    title: str
    unit: str
    scale: float
    digits: int


METRICS = (
    Metric("average_accuracy", "Average accuracy Ā (%)", "%", 1.0, 2),
    Metric("last_accuracy", "Last accuracy A_B (%)", "%", 1.0, 2),
    Metric("forgetting", "Forgetting (accuracy points)", "points", 1.0, 2),
    Metric("updated_fraction_per_step", "Backbone updated per step (%)", "fraction", 100.0, 3),
    Metric("selected_fraction", "Backbone selected (%)", "fraction", 100.0, 3),
    Metric("moved_fraction", "Backbone entries moved per task (%)", "fraction", 100.0, 3),
    Metric("relative_change", "Relative weight change per task (x 1e-6)", "ratio", 1e6, 2),
    Metric("old_class_accuracy", "Old-class accuracy after the last task (%)", "%", 1.0, 2),
    Metric("feature_drift", "Old-class feature drift after the last task (cosine distance x 1e-3)", "ratio", 1e3, 3),
    Metric("embedding_share", "Embeddings' share of the squared backbone change (%)", "fraction", 100.0, 1),
    Metric("wall_seconds", "Wall time (s)", "s", 1.0, 1),
)


@dataclass
class Cell:
    """One (learner, method, dataset): the complete runs used (one per seed, by seed) and the seeds that have
    only incomplete runs (their newest incomplete run)."""

    runs: list[RunRecord] = field(default_factory=list)
    incomplete: list[RunRecord] = field(default_factory=list)
    duplicates_ignored: int = 0

    def values(self, metric: str) -> tuple[list[int], list[float]]:
        """(seeds, values) of the complete runs that have a value for ``metric``."""
        pairs = [(r.seed, r.values.get(metric)) for r in self.runs]
        pairs = [(s, v) for s, v in pairs if v is not None]
        return [s for s, _ in pairs], [v for _, v in pairs]

    @property
    def status(self) -> str:
        """``"complete"`` (complete runs only), ``"partial"`` (complete runs and seeds with only incomplete ones) or
        ``"incomplete"`` (no complete run)."""
        if not self.runs:
            return "incomplete"
        return "partial" if self.incomplete else "complete"


@dataclass
class Collection:
    """Everything read from the runs folders (see :func:`collect`)."""

    roots: list[Path]
    found: int
    runs: list[RunRecord]  # every valid file
    skipped: list[tuple[Path, str]]  # (file, reason)
    cells: dict[tuple[str, str, str], Cell]
    duplicates: list[tuple[RunRecord, RunRecord]]  # (ignored, kept)

    @property
    def learners(self) -> list[str]:
        """The learners of the cells, in report order."""
        return ordered({k[0] for k in self.cells}, learner_order())

    @property
    def datasets(self) -> list[str]:
        """The data sets of the cells, in report order."""
        return ordered({k[2] for k in self.cells}, dataset_order())

    def methods(self, learner: str) -> list[str]:
        """The methods run with ``learner``, in report order."""
        return ordered({k[1] for k in self.cells if k[0] == learner}, method_order())


def ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """The distinct ``names``: those in ``preferred`` in its order, then the others sorted."""
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def learner_title(learner: str) -> str:
    """The learner's report title (its class's ``TITLE``), or the name itself when it is not registered."""
    return LEARNERS.get(learner).TITLE or learner if learner in LEARNERS else learner


def find_results(dirs: Sequence[Path]) -> list[Path]:
    """Every results.json under ``dirs`` (recursively), each file once even if the folders overlap.

    Raises:
        ReportError: a folder does not exist or is a file, or no results.json is found at all.
    """
    found: dict[Path, Path] = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            raise ReportError(f"runs folder {d} does not exist; pass folders written by main.py --output-dir "
                              "(e.g. runs).")
        if not d.is_dir():
            raise ReportError(f"{d} is a file, not a folder; pass the runs folder that holds the results.json files.")
        for path in sorted(d.rglob(RESULTS_NAME)):
            if path.is_file():
                found.setdefault(path.resolve(), path)
    if not found:
        raise ReportError(f"no {RESULTS_NAME} found under {', '.join(str(d) for d in dirs)}; expected "
                          f"<runs>/<model_name>_<spr>_<dataset>/<timestamp>/seed<seed>/{RESULTS_NAME}.")
    return sorted(found.values(), key=str)


def collect(dirs: Sequence[Path]) -> Collection:
    """Find and read every results.json under ``dirs``; pick one run per (learner, method, dataset, seed).

    Invalid files are skipped (``Collection.skipped``). Per seed: the newest complete run is used and the
    other files are duplicates; a seed with no complete run is counted (its newest run) as incomplete.

    Raises:
        ReportError: a folder is missing, nothing is found, or no file is valid.
    """
    paths = find_results(dirs)
    runs, skipped = [], []
    for path in paths:
        try:
            runs.append(load_run(path))
        except InvalidResults as exc:
            skipped.append((path, str(exc)))
    if not runs:
        listed = "; ".join(f"{p}: {why}" for p, why in skipped[:5]) + ("; ..." if len(skipped) > 5 else "")
        raise ReportError(f"no valid {RESULTS_NAME} under {', '.join(str(d) for d in dirs)}: all {len(skipped)} "
                          f"found were skipped ({listed}).")
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(run.key, []).append(run)
    cells: dict[tuple[str, str, str], Cell] = {}
    duplicates = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3])):
        group = groups[key]
        complete = [r for r in group if r.complete]
        kept = max(complete or group, key=lambda r: r.newest_key)
        cell = cells.setdefault(key[:3], Cell())
        (cell.runs if kept.complete else cell.incomplete).append(kept)
        for other in group:
            if other is not kept:
                duplicates.append((other, kept))
                cell.duplicates_ignored += 1
    return Collection(roots=[Path(d) for d in dirs], found=len(paths), runs=runs, skipped=skipped, cells=cells,
                      duplicates=duplicates)


def mean_std(values: Sequence[float]) -> tuple[Optional[float], Optional[float], int]:
    """(mean, sample std with ddof=1, n); std is None for n < 2, mean is None for n = 0."""
    n = len(values)
    if n == 0:
        return None, None, 0
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if n > 1 else None), n


def config_differences(runs: Sequence[RunRecord]) -> list[str]:
    """Config keys (other than seed and runtime-only keys) whose values differ among ``runs``."""
    keys = set().union(*(r.config for r in runs)) - RUNTIME_KEYS if runs else set()
    return sorted(k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True) for r in runs}) > 1)
