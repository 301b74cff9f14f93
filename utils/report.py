"""Collect the results.json files of many runs into a paper-style table (Markdown + CSV) and PNG plots.

Usage::

    python -m utils.report RUNS_DIR [RUNS_DIR ...] --out DIR

Every ``results.json`` under the given folders (searched recursively; the layout written by trainer.py is
``<output_dir>/<model_name>_<spr>_<dataset>/<timestamp>/seed<seed>/results.json``) is read. A run is
identified by (learner, method, dataset, seed): the learner is ``config.model_name`` without its ``_mist``
alias suffix (``ranpac``/``ranpac_mist`` -> RanPAC, ``simplecil``/``simplecil_mist`` -> SimpleCIL), the
method is ``config.spr`` (``none`` = no tuning phase), followed by the composition keys that replace a part
of the preset and the preset's own keys set to a non-default value, e.g. ``mist (importance="random")``,
``magnitude_gate (gate_threshold=0.05)``. Written into DIR:

- ``table.md``: one table per metric (rows grouped by learner, one column per data set), each cell
  ``mean ± sample std (n=seeds)``; the paired differences of each method from the same learner's ``none``
  runs (per seed, so the same class order: Ā, A_B, forgetting); then the incomplete runs, the duplicate runs that were ignored, the
  files that could not be read, the runs used, and the plots.
- ``table.csv``: long format, one row per (learner, method, dataset, metric) with mean, std, n, the seeds
  and their values, and the number of seeds that have only incomplete runs.
- ``curves_<dataset>.png``: top-1 accuracy after each task, one line per learner/method (mean over seeds,
  band = ± sample std).
- ``matrix_<learner>_<method>_<dataset>.png``: the accuracy matrix (mean over seeds), lower triangle, with
  the values written in the cells.

Rules: only runs whose status is ``complete`` are averaged; the others are listed as incomplete and counted
apart. When several results.json describe the same (learner, method, dataset, seed), the newest complete
one is used (newest = latest ``YYYYmmdd-HHMMSS[-n]`` run-folder stamp in its path, then latest file
modification time) and the others are listed as duplicates. A file that is not valid JSON or lacks the
keys a report needs is skipped with a warning (on stderr and in table.md).

Exit status: 0 written; 2 bad input (a folder that does not exist, no results.json found, no valid file).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from utils.config import COMPOSITION_KEYS, FIELDS
from utils.errors import UserError
from utils.registry import DATASETS, LEARNERS, PRESETS

RESULTS_NAME = "results.json"

# learner titles and order, method order and labels, data-set order and each preset's own keys come from the
# registries (utils/registry.py): a new learner, preset or data set appears here without an edit.
def _learner_order() -> list[str]:
    return [name for name, cls in sorted(LEARNERS.items(), key=lambda item: item[1].ORDER)]


def _method_order() -> list[str]:
    """Baseline first, ablations next, the proposed method last (as in the paper's tables)."""
    return ["none", *(name for name, p in sorted(PRESETS.items(), key=lambda item: item[1].order))]


def _preset_keys() -> dict[str, list[str]]:
    """Config key -> the presets whose own parameter it is: a run with a non-default value is another method."""
    out: dict[str, list[str]] = {}
    for name, p in PRESETS.items():
        for key in p.keys:
            out.setdefault(key, []).append(name)
    return out


def _dataset_order() -> list[str]:
    return [name for name, spec in sorted(DATASETS.items(), key=lambda item: item[1].order)]


# config keys that do not change the results: runs differing only in these are the "same" experiment
RUNTIME_KEYS = frozenset({"seed", "device", "num_workers", "progress", "eval_batch_size", "stop_after_task",
                          "verify_images", "data_root", "download", "config", "check_replicas", "prefix",
                          "model_name"})
STAMP = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


class ReportError(UserError):
    """Bad input for the report: the message names the folder or file and what to do (exit status 2)."""


class InvalidResults(ValueError):
    """A results.json cannot be used; the message says why (the caller adds the file name)."""


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
class RunRecord:
    """What the report needs from one results.json.

    ``values`` (complete runs only; None where not applicable) holds average_accuracy, last_accuracy,
    forgetting, a_tt (mean over tasks of the accuracy on the task just learned), updated_fraction_per_step,
    selected_fraction and moved_fraction (means over the tasks that ran a
    tuning phase, as fractions of the backbone), relative_change (mean ||theta - theta_0|| / ||theta_0|| per tuned
    task), old_class_accuracy (accuracy on the classes of the earlier tasks after the last task), feature_drift
    (the last task's mean old-class feature drift, ``tasks[-1].drift``), embedding_share (mean over the tasks that
    moved the backbone of the embeddings' share of the squared change) and wall_seconds (sum of the tasks'
    ``seconds``). ``groups`` holds each parameter group's share of the squared change, averaged over those tasks.
    """

    path: Path
    learner: str
    model_name: str
    method: str
    dataset: str
    seed: int
    status: str
    tasks_done: int
    tasks_total: Optional[int]
    error: Optional[str]
    config: dict
    values: dict[str, Optional[float]] = field(default_factory=dict)
    top1_curve: list[float] = field(default_factory=list)
    accuracy_matrix: list[list[Optional[float]]] = field(default_factory=list)
    groups: dict[str, float] = field(default_factory=dict)
    newest_key: tuple = ()

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def key(self) -> tuple[str, str, str, int]:
        return self.learner, self.method, self.dataset, self.seed


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
        return _ordered({k[0] for k in self.cells}, _learner_order())

    @property
    def datasets(self) -> list[str]:
        return _ordered({k[2] for k in self.cells}, _dataset_order())

    def methods(self, learner: str) -> list[str]:
        return _ordered({k[1] for k in self.cells if k[0] == learner}, _method_order())


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def _ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def learner_of(model_name: str) -> str:
    """``ranpac_mist`` -> ``ranpac``: the registered learner of a ``model_name`` (aliases resolved; an unknown name
    with its ``_mist`` suffix dropped)."""
    if model_name in LEARNERS:
        return LEARNERS.resolve(model_name)
    return model_name[: -len("_mist")] if model_name.endswith("_mist") else model_name


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


def _number(value: Any, what: str, allow_none: bool = False,
            bounds: Optional[tuple[float, float]] = None) -> Optional[float]:
    """``value`` as a finite float (within ``bounds`` when given, e.g. (0, 100) for an accuracy in %).

    Raises:
        InvalidResults: not a number, not finite, too large for a float (e.g. a 401-digit integer) or out of bounds.
    """
    if value is None and allow_none:
        return None
    try:
        number = None if isinstance(value, bool) or not isinstance(value, (int, float)) else float(value)
    except OverflowError:
        number = None
    if number is None or not math.isfinite(number):
        shown = repr(value) if len(repr(value)) <= 40 else f"{repr(value)[:20]}... ({len(repr(value))} characters)"
        raise InvalidResults(f"'{what}' is {shown}, expected a finite number")
    if bounds is not None and not bounds[0] <= number <= bounds[1]:
        raise InvalidResults(f"'{what}' is {number:g}, expected a value in [{bounds[0]:g}, {bounds[1]:g}]")
    return number


PERCENT = (0.0, 100.0)  # accuracies (%)
SIGNED_PERCENT = (-100.0, 100.0)  # forgetting (%): an old task's accuracy may also rise


def _newest_key(path: Path) -> tuple:
    """Sort key, larger = newer: the last ``YYYYmmdd-HHMMSS[-n]`` folder in the path, then the mtime."""
    stamp, n = "", 0
    for part in path.parts[:-1]:
        m = STAMP.match(part)
        if m:
            stamp, n = m.group(1), int(m.group(2) or 1)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return stamp, n, mtime


def _mean_over_tuned(tasks: list, key: str) -> Optional[float]:
    vals = [_number(t["tuning"][key], f"tasks[{i}].tuning.{key}") for i, t in enumerate(tasks)
            if isinstance(t.get("tuning"), dict) and t["tuning"].get(key) is not None]
    return float(np.mean(vals)) if vals else None


def _drift_values(tasks: list) -> tuple[dict[str, Optional[float]], dict[str, float]]:
    """(old_class_accuracy, feature_drift, embedding_share) and the mean share of each parameter group, from the
    tasks' ``old`` and ``drift`` entries (None / empty when the run measured no drift)."""
    last = tasks[-1] if tasks else {}
    old = _number(last.get("old"), f"tasks[{len(tasks) - 1}].old", allow_none=True, bounds=PERCENT) \
        if len(tasks) > 1 else None
    values: dict[str, Optional[float]] = {"old_class_accuracy": old, "feature_drift": None, "embedding_share": None}
    drifts = [(i, t["drift"]) for i, t in enumerate(tasks) if isinstance(t.get("drift"), dict)]
    if not drifts:
        return values, {}
    i, final = drifts[-1]
    if i == len(tasks) - 1:
        values["feature_drift"] = _number(final.get("old_class_feature_drift_mean"),
                                          f"tasks[{i}].drift.old_class_feature_drift_mean", allow_none=True)
    shares: dict[str, list[float]] = {}
    for i, d in drifts:
        groups = d.get("groups")
        if not isinstance(groups, dict) or not _number(d.get("relative_change"), f"tasks[{i}].drift.relative_change"):
            continue
        for name, g in groups.items():
            share = g.get("share") if isinstance(g, dict) else None
            shares.setdefault(str(name), []).append(_number(share, f"tasks[{i}].drift.groups.{name}.share"))
    means = {name: float(np.mean(v)) for name, v in shares.items()}
    if means:
        values["embedding_share"] = means.get("embeddings", 0.0)
    return values, means


def load_run(path: Path) -> RunRecord:
    """Read one results.json (format of trainer.run_seed) into a :class:`RunRecord`.

    Reads: ``config`` (model_name, dataset, spr, seed), ``seed``, ``status`` (older files: ``complete``),
    ``error``, ``tasks`` (``seconds``, ``tuning``), ``task_sizes``, and for complete runs ``top1_curve``,
    ``accuracy_matrix``, ``average_accuracy``, ``last_accuracy``, ``forgetting``.

    Raises:
        InvalidResults: unreadable file, invalid JSON (also: nested too deeply to parse), or a key the report needs
            is missing or malformed (accuracies must be finite and within [0, 100] %).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidResults(f"cannot be read ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:  # ValueError: also integers of more than 4300 digits
        raise InvalidResults(f"is not valid JSON ({str(exc)[:200]})") from None
    except RecursionError:
        raise InvalidResults("is nested too deeply to be a results.json written by main.py") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise InvalidResults("has no 'config' object; not a results.json written by main.py")
    cfg = data["config"]
    for key in ("model_name", "dataset"):
        if not isinstance(cfg.get(key), str) or not cfg[key]:
            raise InvalidResults(f"'config.{key}' is {cfg.get(key)!r}, expected a name")
    method = cfg.get("spr")
    method = "none" if method is None else method
    if not isinstance(method, str):
        raise InvalidResults(f"'config.spr' is {method!r}, expected a name")
    ran = {t["tuning"].get("method") for t in data.get("tasks", []) if isinstance(t, dict)
           and isinstance(t.get("tuning"), dict)} if isinstance(data.get("tasks"), list) else set()
    composed = any(cfg.get(key) is not None for key in COMPOSITION_KEYS)
    if composed and len(ran) == 1 and isinstance(only := ran.pop(), str) and only != method and PRESETS.peek(only):
        method = only  # the composition keys rebuilt another preset part for part: it is reported as that preset
    named = {**cfg, **{key: None for key in COMPOSITION_KEYS}} if method != cfg.get("spr", "none") else cfg
    overrides = [f"{key}={json.dumps(named[key])}" for key in COMPOSITION_KEYS if named.get(key) is not None]
    overrides += [f"{key}={json.dumps(named[key])}" for key, presets in _preset_keys().items()
                  if method in presets and key in named and named[key] != FIELDS[key].default]
    if overrides:  # a preset with parts replaced is another method
        method = f"{method} ({', '.join(overrides)})"
    seed = data.get("seed", cfg.get("seed"))
    if isinstance(seed, list) and len(seed) == 1:
        seed = seed[0]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidResults(f"'seed' is {seed!r}, expected an integer")
    status = data.get("status")
    if status is None:  # older files: only the boolean
        status = "complete" if data.get("complete") is True else "incomplete"
    if not isinstance(status, str):
        raise InvalidResults(f"'status' is {status!r}, expected a string")
    tasks = data.get("tasks", [])
    if not isinstance(tasks, list) or not all(isinstance(t, dict) for t in tasks):
        raise InvalidResults("'tasks' is not a list of objects")
    sizes = data.get("task_sizes")
    error = data.get("error")
    run = RunRecord(path=Path(path), learner=learner_of(cfg["model_name"]), model_name=cfg["model_name"],
                    method=method, dataset=cfg["dataset"], seed=seed, status=status, tasks_done=len(tasks),
                    tasks_total=len(sizes) if isinstance(sizes, list) else None,
                    error=None if error is None else str(error), config=cfg, newest_key=_newest_key(Path(path)))
    if not run.complete:
        return run
    curve = data.get("top1_curve")
    if not isinstance(curve, list) or not curve:
        raise InvalidResults("status is complete but 'top1_curve' is missing or empty")
    run.top1_curve = [_number(v, f"top1_curve[{i}]", bounds=PERCENT) for i, v in enumerate(curve)]
    matrix = data.get("accuracy_matrix")
    if not isinstance(matrix, list) or not all(isinstance(row, list) for row in matrix):
        raise InvalidResults("status is complete but 'accuracy_matrix' is missing or not a list of rows")
    run.accuracy_matrix = [[_number(v, f"accuracy_matrix[{i}][{j}]", allow_none=True, bounds=PERCENT)
                            for j, v in enumerate(row)]
                           for i, row in enumerate(matrix)]
    seconds = [_number(t.get("seconds"), f"tasks[{i}].seconds", allow_none=True) for i, t in enumerate(tasks)]
    run.values = {
        "average_accuracy": _number(data.get("average_accuracy"), "average_accuracy", bounds=PERCENT),
        "last_accuracy": _number(data.get("last_accuracy"), "last_accuracy", bounds=PERCENT),
        "forgetting": _number(data.get("forgetting"), "forgetting", allow_none=True, bounds=SIGNED_PERCENT),
        "a_tt": _number(data.get("a_tt"), "a_tt", allow_none=True, bounds=PERCENT),
        "updated_fraction_per_step": _mean_over_tuned(tasks, "updated_fraction_per_step"),
        "selected_fraction": _mean_over_tuned(tasks, "selected_fraction"),
        "moved_fraction": _mean_over_tuned(tasks, "moved_fraction"),
        "relative_change": _mean_over_tuned(tasks, "relative_change"),
        "wall_seconds": float(sum(s for s in seconds if s is not None)) if tasks and None not in seconds else None,
    }
    drift, run.groups = _drift_values(tasks)
    run.values.update(drift)
    return run


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


# ---------------------------------------------------------------------------------------------
# statistics and the CSV
# ---------------------------------------------------------------------------------------------
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


def _num(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.10g}"


CSV_FIELDS = ("learner", "method", "dataset", "metric", "unit", "mean", "std", "n", "seeds", "values", "status",
              "incomplete", "incomplete_seeds", "duplicates_ignored")


def csv_rows(col: Collection) -> list[dict[str, Any]]:
    """Long-format rows, one per (learner, method, dataset, metric).

    ``mean``/``std``/``n``/``seeds``/``values`` cover the complete runs only (std: ddof=1, blank for n < 2);
    ``incomplete``/``incomplete_seeds`` are the seeds without a complete run; ``status`` is complete, partial
    (some seeds incomplete) or incomplete (no complete seed); fractions are in [0, 1] as in results.json.
    """
    rows = []
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                if cell is None:
                    continue
                for metric in METRICS:
                    seeds, values = cell.values(metric.key)
                    mean, std, n = mean_std(values)
                    rows.append({"learner": learner, "method": method, "dataset": dataset, "metric": metric.key,
                                 "unit": metric.unit, "mean": _num(mean), "std": _num(std), "n": n,
                                 "seeds": ";".join(map(str, seeds)), "values": ";".join(map(_num, values)),
                                 "status": cell.status, "incomplete": len(cell.incomplete),
                                 "incomplete_seeds": ";".join(str(r.seed) for r in cell.incomplete),
                                 "duplicates_ignored": cell.duplicates_ignored})
    return rows


def write_csv(col: Collection, path: Path) -> None:
    """Write :func:`csv_rows` to ``path``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(col))


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _md(text: Any) -> str:
    """Escape a value for a Markdown table cell (pipes, newlines)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def format_cell(cell: Optional[Cell], metric: Metric) -> str:
    """``84.50 ± 0.70 (n=3)``; ``(n=1)`` has no ±; ``+k incomplete`` when seeds lack a complete run;
    ``-`` when no complete run has the metric (no tuning phase, single task); blank when never run."""
    if cell is None:
        return ""
    extra = f", +{len(cell.incomplete)} incomplete" if cell.incomplete else ""
    if not cell.runs:
        k = len(cell.incomplete)
        statuses = ", ".join(sorted({r.status for r in cell.incomplete}))
        return f"all incomplete ({k} seed{'s' if k != 1 else ''}: {statuses})"
    _, values = cell.values(metric.key)
    mean, std, n = mean_std(values)
    if mean is None:
        return f"-{' (' + extra[2:] + ')' if extra else ''}"
    text = f"{mean * metric.scale:.{metric.digits}f}"
    if std is not None:
        text += f" ± {std * metric.scale:.{metric.digits}f}"
    return f"{text} (n={n}{extra})"


def metric_table(col: Collection, metric: Metric) -> list[str]:
    """Markdown lines of one metric's table: a bold row per learner opening its group, one row per method."""
    datasets = col.datasets
    lines = ["| Learner / method | " + " | ".join(map(_md, datasets)) + " |",
             "|---" + "|---:" * len(datasets) + "|"]
    for learner in col.learners:
        lines.append(f"| **{_md(learner_title(learner))}** |" + " |" * len(datasets))
        for method in col.methods(learner):
            cells = [format_cell(col.cells.get((learner, method, d)), metric) for d in datasets]
            lines.append(f"| {_md(method)} | " + " | ".join(map(_md, cells)) + " |")
    return lines


PAIRED_METRICS = ("average_accuracy", "last_accuracy", "forgetting")
BASELINE = "none"


def paired_differences(col: Collection, learner: str, method: str, dataset: str, metric: str
                       ) -> tuple[list[int], list[float]]:
    """(seeds, method - baseline) over the seeds where both the method and the learner's ``none`` run completed.

    Runs of one seed share the class order, so the per-seed difference removes the spread that the class order
    alone causes (on small data it dominates the seed standard deviation)."""
    base = col.cells.get((learner, BASELINE, dataset))
    cell = col.cells.get((learner, method, dataset))
    if base is None or cell is None or method == BASELINE:
        return [], []
    b = dict(zip(*base.values(metric)))
    pairs = [(seed, v - b[seed]) for seed, v in zip(*cell.values(metric)) if seed in b]
    return [s for s, _ in pairs], [d for _, d in pairs]


def paired_table(col: Collection) -> list[str]:
    """Markdown lines: per learner, method and data set, the mean ± std over seeds of (method - none) for
    Ā, A_B and forgetting, with the number of paired seeds and how many differences are positive."""
    titles = {m.key: m.title.split(" (")[0] for m in METRICS}
    lines = ["| Learner / method | Dataset | " + " | ".join(f"Δ {titles[m]}" for m in PAIRED_METRICS) + " |",
             "|---|---|" + "---:|" * len(PAIRED_METRICS)]
    rows = 0
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cells = []
                for metric in PAIRED_METRICS:
                    _, diffs = paired_differences(col, learner, method, dataset, metric)
                    mean, std, n = mean_std(diffs)
                    if mean is None:
                        cells.append("-")
                        continue
                    text = f"{mean:+.2f}" + (f" ± {std:.2f}" if std is not None else "")
                    cells.append(f"{text} (n={n}, {sum(d > 0 for d in diffs)} > 0)")
                if any(c != "-" for c in cells):
                    rows += 1
                    lines.append(f"| {_md(learner_title(learner))} / {_md(method)} | {_md(dataset)} | "
                                 + " | ".join(cells) + " |")
    return lines if rows else []


def group_table(col: Collection, top: int = 4) -> list[str]:
    """Markdown lines: per learner, method and data set, the ``top`` parameter groups with the largest mean share of
    the squared backbone change (``tasks[i].drift.groups``, averaged over the tasks that moved the backbone, then
    over the seeds). Empty when no run measured drift."""
    lines = ["| Learner / method | Dataset | n | largest shares of the squared change (mean over tasks and seeds) |",
             "|---|---|---:|---|"]
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                runs = [r for r in (cell.runs if cell else []) if r.groups]
                if not runs:
                    continue
                names = sorted({g for r in runs for g in r.groups})
                mean = {g: float(np.mean([r.groups.get(g, 0.0) for r in runs])) for g in names}
                best = sorted(mean, key=lambda g: -mean[g])[:top]
                lines.append(f"| {_md(learner_title(learner))} / {_md(method)} | {_md(dataset)} | {len(runs)} | "
                             + ", ".join(f"{_md(g)} {100 * mean[g]:.1f}%" for g in best) + " |")
    return lines if len(lines) > 2 else []


def markdown(col: Collection, plots: Sequence[Path], command: str = "") -> str:
    """The whole table.md: metric tables with footnotes, then incomplete, duplicate, skipped and used runs, plots."""
    n_used = sum(len(c.runs) for c in col.cells.values())
    n_incomplete = sum(1 for r in col.runs if not r.complete)
    out = ["# Results", ""]
    if command:
        out += [f"Generated by `{command}` on {datetime.datetime.now():%Y-%m-%d %H:%M}.", ""]
    out += [f"Read {col.found} results.json file(s) under {', '.join(f'`{r}`' for r in col.roots)}: "
            f"{n_used} complete run(s) used, {n_incomplete} incomplete run(s) (not averaged), "
            f"{len(col.duplicates)} duplicate(s) ignored, {len(col.skipped)} file(s) skipped.", ""]
    if col.skipped:
        out += [f"**Warning:** {len(col.skipped)} results.json file(s) could not be used; see "
                "[Skipped files](#skipped-files).", ""]
    for metric in METRICS:
        out += [f"## {metric.title}", ""] + metric_table(col, metric) + [""]
    groups = group_table(col)
    if groups:
        out += ["## Where the backbone's change lands", ""] + groups + [""]
    paired = paired_table(col)
    if paired:
        out += ["## Paired differences from no tuning phase (same seed = same class order)", ""] + paired + [""]
    out += ["Notes:", "",
            "- Each cell: mean ± sample standard deviation (ddof=1) over seeds; n = number of seeds with a complete "
            "run; n=1 shows no ±. Only runs with status `complete` are averaged.",
            "- `+k incomplete`: k more seeds have only incomplete runs (see [Incomplete runs](#incomplete-runs)); "
            "`all incomplete`: no seed of that cell completed. A blank cell: never run.",
            "- Method = `spr` (`none`: no tuning phase). Learner = `model_name` without its `_mist` alias suffix.",
            "- Ā = mean over tasks of the top-1 accuracy on all classes seen so far; A_B = that accuracy after the "
            "last task; forgetting = mean drop from each earlier task's best accuracy to its final one "
            "(`-` for a single task).",
            "- Backbone updated per step / selected: mean over the tasks that ran a tuning phase of "
            "`updated_fraction_per_step` / `selected_fraction`, in % of the backbone's entries "
            "(`-`: no tuning phase, or the method reports no selection).",
            "- Backbone entries moved / relative weight change: mean over the tuned tasks of `moved_fraction` (share of "
            "entries whose value the tuning phase changed; weight decay moves unselected entries too) and of "
            "`relative_change` (||theta - theta_0|| / ||theta_0|| over the task's phase).",
            "- Old-class accuracy: top-1 accuracy on the test images of the classes of every task before the last, after "
            "the last task. Old-class feature drift: mean over those classes of 1 - cos between their test-set mean "
            "feature (the module the tuning phase tunes) after the last task and after the task that introduced them "
            "(`tasks[i].drift`, evaluation data only; `-`: not measured). Embeddings' share: mean over the tasks that "
            "moved the backbone of ||d theta_embeddings||^2 / ||d theta||^2 over the whole task (tuning phase and the "
            "learner's own training).",
            "- Wall time: sum over tasks of each task's `seconds` (learning and evaluation).",
            "- Paired differences: for each seed where both ran, the method's value minus the same learner's `none` "
            "run (same class order); mean ± sample std over those seeds, and how many differences are > 0. A "
            "difference whose ± spans 0 is inside the seed spread.",
            "- Several runs of the same learner, method, data set and seed: the newest complete one is used "
            "(see [Duplicate runs](#duplicate-runs)).", ""]
    mixed = [(k, config_differences(c.runs)) for k, c in col.cells.items()]
    mixed = [(k, d) for k, d in mixed if d]
    if mixed:
        out += ["**Warning:** these cells average seeds whose configs differ (beyond seed and runtime keys):", ""]
        out += [f"- {learner_title(k[0])} / {k[1]} / {k[2]}: {', '.join(d)}" for k, d in mixed] + [""]

    out += ["## Incomplete runs", ""]
    incomplete = sorted((r for r in col.runs if not r.complete), key=lambda r: (r.key, str(r.path)))
    if incomplete:
        kept = {id(r) for c in col.cells.values() for r in c.incomplete}
        out += ["| Learner | Method | Dataset | Seed | Status | Tasks done | Error | Note | Path |",
                "|---|---|---|---:|---|---|---|---|---|"]
        for r in incomplete:
            total = "?" if r.tasks_total is None else r.tasks_total
            note = "not averaged" if id(r) in kept else "superseded (see Duplicate runs)"
            out.append(f"| {_md(learner_title(r.learner))} | {_md(r.method)} | {_md(r.dataset)} | {r.seed} | "
                       f"{_md(r.status)} | {r.tasks_done} of {total} | {_md(r.error or '')} | {note} | "
                       f"`{_md(r.path)}` |")
    else:
        out.append("None.")
    out += ["", "## Duplicate runs", ""]
    if col.duplicates:
        out += ["| Learner | Method | Dataset | Seed | Ignored (status) | Used (status) | Config differs in |",
                "|---|---|---|---:|---|---|---|"]
        for ignored, kept_run in sorted(col.duplicates, key=lambda d: (d[0].key, str(d[0].path))):
            diff = ", ".join(config_differences([ignored, kept_run])) or "-"
            out.append(f"| {_md(learner_title(ignored.learner))} | {_md(ignored.method)} | {_md(ignored.dataset)} | "
                       f"{ignored.seed} | `{_md(ignored.path)}` ({_md(ignored.status)}) | `{_md(kept_run.path)}` "
                       f"({_md(kept_run.status)}) | {_md(diff)} |")
    else:
        out.append("None.")
    out += ["", "## Skipped files", ""]
    if col.skipped:
        out += ["| File | Reason |", "|---|---|"]
        out += [f"| `{_md(p)}` | {_md(why)} |" for p, why in col.skipped]
    else:
        out.append("None.")
    out += ["", "## Runs used", "", "| Learner | Method | Dataset | Seed | Model name | Ā (%) | A_B (%) | Path |",
            "|---|---|---|---:|---|---:|---:|---|"]
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                for r in sorted(cell.runs, key=lambda r: r.seed) if cell else []:
                    out.append(f"| {_md(learner_title(learner))} | {_md(method)} | {_md(dataset)} | {r.seed} | "
                               f"{_md(r.model_name)} | {r.values['average_accuracy']:.2f} | "
                               f"{r.values['last_accuracy']:.2f} | `{_md(r.path)}` |")
    out += ["", "## Plots", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots] or ["None (no complete run)."]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def safe_name(text: str) -> str:
    """A file-name-safe version of a learner, method or data set name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def _padded(rows: Sequence[Sequence[Optional[float]]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        vals = [np.nan if v is None else v for v in row[:width]]
        out[i, : len(vals)] = vals
    return out


def _nan_mean_std(arr: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) over ``axis`` ignoring NaN; std is NaN where fewer than 2 values."""
    count = np.sum(~np.isnan(arr), axis=axis)
    total = np.nansum(arr, axis=axis)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    dev = np.where(np.isnan(arr), 0.0, arr - np.expand_dims(mean, axis)) ** 2
    var = np.where(count > 1, dev.sum(axis=axis) / np.maximum(count - 1, 1), np.nan)
    return mean, np.sqrt(var)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def _save(fig, path: Path) -> None:
    """``fig.savefig(path)``; an OSError (read-only folder, full disk) carries ``path`` as its file name."""
    try:
        fig.savefig(path)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def plot_curves(col: Collection, out_dir: Path) -> list[Path]:
    """Write ``curves_<dataset>.png`` per data set: one panel per learner (shared y axis), the mean top-1 curve
    over seeds per method (one colour per method in every panel), a light ± std band, the legend under each
    panel.

    Reads the complete runs' ``top1_curve``; returns the files written.
    """
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    all_methods = _ordered({k[1] for k in col.cells}, _method_order())
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    written = []
    for dataset in col.datasets:
        learners = [l for l in col.learners if any(col.cells.get((l, m, dataset)) and col.cells[(l, m, dataset)].runs
                                                   for m in col.methods(l))]
        if not learners:
            continue
        n_lines = max(len(col.methods(l)) for l in learners)
        fig = _figure(5.2 * len(learners), 4.2 + 0.22 * ((n_lines + 1) // 2))
        axes = fig.subplots(1, len(learners), sharey=True, squeeze=False)[0]
        for ax, learner in zip(axes, learners):
            for method in col.methods(learner):
                cell = col.cells.get((learner, method, dataset))
                if cell is None or not cell.runs:
                    continue
                width = max(len(r.top1_curve) for r in cell.runs)
                mean, std = _nan_mean_std(_padded([r.top1_curve for r in cell.runs], width))
                x = np.arange(1, width + 1)
                k = all_methods.index(method)
                colour = colours(k % 10)
                ax.plot(x, mean, color=colour, marker=markers[k % len(markers)], markersize=3.5,
                        linestyle="-" if k < 10 else "--", label=f"{method} (n={len(cell.runs)})")
                if len(cell.runs) > 1:
                    band = np.nan_to_num(std)
                    ax.fill_between(x, np.clip(mean - band, 0, 100), np.clip(mean + band, 0, 100), color=colour,
                                    alpha=0.07, linewidth=0)
            ax.set_title(f"{learner_title(learner)}", fontsize=10)
            ax.set_xlabel("task")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        axes[0].set_ylabel("top-1 accuracy on all seen classes (%)")
        fig.suptitle(f"{dataset}: top-1 accuracy after each task (mean, band ± std over seeds)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"curves_{safe_name(dataset)}.png"
        _save(fig, path)
        written.append(path)
    return written


def plot_matrices(col: Collection, out_dir: Path) -> list[Path]:
    """Write ``matrix_<learner>_<method>_<dataset>.png`` per cell with complete runs: the mean accuracy matrix
    (row i = after task i, column j = task j's classes), lower triangle, values in the cells.

    Reads the complete runs' ``accuracy_matrix``; returns the files written.
    """
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    written = []
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                if cell is None or not cell.runs:
                    continue
                size = max(len(r.accuracy_matrix) for r in cell.runs)
                if size == 0:
                    continue
                stack = np.full((len(cell.runs), size, size), np.nan)  # NaN pads matrices of other lengths
                for k, r in enumerate(cell.runs):
                    stack[k, : len(r.accuracy_matrix)] = _padded(r.accuracy_matrix, size)
                mean, _ = _nan_mean_std(stack)
                mean[np.triu_indices(size, k=1)] = np.nan
                side = min(max(4.5, 0.55 * size + 2.5), 18.0)
                fig = _figure(side + 0.8, side)
                ax = fig.add_subplot()
                image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0, vmax=100)
                fontsize = max(5.0, min(10.0, 130.0 / size))
                for i in range(size):
                    for j in range(i + 1):
                        v = mean[i, j]
                        ax.text(j, i, "–" if np.isnan(v) else f"{v:.1f}", ha="center", va="center",
                                fontsize=fontsize, color="white" if np.isnan(v) or v < 60 else "black")
                ticks = np.arange(size)
                step = max(1, size // 20)
                ax.set_xticks(ticks[::step], [str(t + 1) for t in ticks[::step]])
                ax.set_yticks(ticks[::step], [str(t + 1) for t in ticks[::step]])
                ax.set_xlabel("accuracy on task j's classes")
                ax.set_ylabel("after learning task i")
                n = len(cell.runs)
                ax.set_title(f"{learner_title(learner)} / {method} on {dataset}\naccuracy matrix (%), mean of "
                             f"{n} seed{'s' if n != 1 else ''}", fontsize=10)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="%")
                fig.tight_layout()
                path = out_dir / f"matrix_{safe_name(learner)}_{safe_name(method)}_{safe_name(dataset)}.png"
                _save(fig, path)
                written.append(path)
    return written


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def build_report(dirs: Sequence[Path], out_dir: Path, command: str = "") -> tuple[Collection, list[Path]]:
    """Read the runs under ``dirs`` and write table.md, table.csv and the PNGs into ``out_dir`` (created).

    Returns:
        (what was read, the files written).

    Raises:
        ReportError: see :func:`collect`; or ``out_dir`` cannot be created, or a file in it cannot be written
            (read-only folder, full disk: the message names the file and the cause).
    """
    col = collect(dirs)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out_dir}: cannot create the folder ({exc.strerror or exc}).") from None
    try:
        plots = plot_curves(col, out_dir) + plot_matrices(col, out_dir)
        (out_dir / "table.md").write_text(markdown(col, plots, command), encoding="utf-8")
        write_csv(col, out_dir / "table.csv")
    except OSError as exc:
        target = exc.filename or out_dir
        raise ReportError(f"--out {out_dir}: cannot write {target} ({exc.strerror or exc}); is the folder writable "
                          "and the disk not full?") from None
    return col, [out_dir / "table.md", out_dir / "table.csv", *plots]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m utils.report",
        description="Summarise the results.json files under RUNS_DIR(s): table.md, table.csv and PNG plots.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUNS_DIR",
                        help="folder(s) searched recursively for results.json (e.g. runs)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder the report is written to (required unless --against-ledger)")
    parser.add_argument("--against-ledger", action="store_true",
                        help="print each run's per-task curve beside the reference of the shipped config it ran "
                             "(exps/ledger.json, docs/results.md) instead of writing a report")
    args = parser.parse_args(argv)
    if args.out is None and not args.against_ledger:
        parser.error("--out DIR is required (or give --against-ledger)")
    return args


def against_ledger(dirs: Sequence[Path]) -> int:
    """``--against-ledger``: 0 when every complete run has a reference; 2 when one has none, a results.json cannot be
    used (one ``warning: skipped FILE: why`` line each on stderr; the other runs are still compared) or nothing was
    found."""
    from utils.ledger import LedgerError, against

    found = find_results(dirs)
    if not found:
        print(f"error: no results.json under {', '.join(map(str, dirs))}", file=sys.stderr)
        return 2
    try:
        lines, missing, skipped = against(found)
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, why in skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    print("\n".join(lines))
    return 2 if missing or skipped else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; returns 0 when the report is written from every results.json found, 2 on bad input (one
    ``error:`` line on stderr) or when some files were skipped.

    A skipped file gets one ``warning: skipped FILE: why`` line on stderr (and is listed in table.md); the report of
    the other runs is still written, and the exit status is 2 so that a script notices.
    """
    args = parse_args(argv)
    if args.against_ledger:
        try:
            return against_ledger(args.runs)
        except ReportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    command = "python -m utils.report " + " ".join([*map(str, args.runs), "--out", str(args.out)])
    try:
        col, written = build_report(args.runs, args.out, command)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, why in col.skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    incomplete = sum(1 for r in col.runs if not r.complete)
    print(f"report: {sum(len(c.runs) for c in col.cells.values())} complete "
          f"run(s) used, {incomplete} incomplete, {len(col.duplicates)} duplicate(s), {len(col.skipped)} skipped; "
          f"wrote {len(written)} files to {args.out}")
    for path in written:
        print(f"  {path}")
    return 2 if col.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
