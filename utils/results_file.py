"""One results.json: how trainer.py writes it after each task (:func:`record_task`, :func:`write_json`: strict JSON,
atomic) and how the report tool and the comparison runners read it back (:func:`load_run`: every value they use
checked), with the learner of a ``model_name`` and the method a run's config names."""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from utils.config import COMPOSITION_KEYS, FIELDS
from utils.metrics import grouped_accuracy, summarize, task_accuracies, topk_accuracy
from utils.registry import LEARNERS, PRESETS

RESULTS_NAME = "results.json"
logger = logging.getLogger("trainer")  # the task lines are the trainer's (the official log's "[trainer.py]" prefix)
STAMP = re.compile(r"^(\d{8}-\d{6})(?:-(\d+))?$")


class InvalidResults(ValueError):
    """A results.json cannot be used; the message says why (the caller adds the file name)."""


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
        """True when the run finished every task (``status`` "complete")."""
        return self.status == "complete"

    @property
    def key(self) -> tuple[str, str, str, int]:
        """(learner, method, dataset, seed): the report cell and seed the run belongs to."""
        return self.learner, self.method, self.dataset, self.seed


def learner_of(model_name: str) -> str:
    """``ranpac_mist`` -> ``ranpac``: the registered learner of a ``model_name`` (aliases resolved; an unknown name
    with its ``_mist`` suffix dropped)."""
    if model_name in LEARNERS:
        return LEARNERS.resolve(model_name)
    return model_name[: -len("_mist")] if model_name.endswith("_mist") else model_name


def preset_keys() -> dict[str, list[str]]:
    """Config key -> the presets whose own parameter it is: a run with a non-default value is another method."""
    out: dict[str, list[str]] = {}
    for name, p in PRESETS.items():
        for key in p.keys:
            out.setdefault(key, []).append(name)
    return out


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
    overrides += [f"{key}={json.dumps(named[key])}" for key, presets in preset_keys().items()
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


# ---- writing: what trainer.py records after each task ----------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # NaN (e.g. accuracy over an empty class range) and infinities are not valid JSON
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically (NaN becomes null; a crash mid-write never leaves a truncated file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


def record_task(results: dict, t: int, classes: tuple[int, int], y_topk: np.ndarray, y_true: np.ndarray,
                 ranges: list, report: dict, seconds: float) -> None:
    """Compute one task's metrics, log the official lines (algorithms.md §8.2) and append them to ``results``."""
    known, seen = classes
    grouped = grouped_accuracy(y_topk[:, 0], y_true, nb_old=known, increment=10)
    top1, top5 = grouped["total"], topk_accuracy(y_topk, y_true)
    row = task_accuracies(y_topk[:, 0], y_true, ranges)
    results["top1_curve"].append(top1)
    results["top5_curve"].append(top5)
    results["att_curve"].append(grouped["new"])
    results["accuracy_matrix"].append(row)
    results["tasks"].append({"task": t, "classes": [known, seen], "top1": top1, "top5": top5, "grouped": grouped,
                             "old": grouped["old"], "new": grouped["new"], "task_accuracies": row,
                             "seconds": round(seconds, 3), **report})
    results.update(summarize(results["top1_curve"], results["att_curve"], results["accuracy_matrix"]))
    logger.info("No NME accuracy.")
    logger.info("CNN: %s", grouped)
    logger.info("Att_curve: %s", results["att_curve"])
    logger.info("CNN top1 curve: %s", results["top1_curve"])
    logger.info("CNN top5 curve: %s\n", results["top5_curve"])
    logger.info("Average Accuracy (CNN): %s", results["average_accuracy"])
    logger.info("Last Average Accuracy: %s", results["last_accuracy"])
    logger.info("A_tt: %s", results["a_tt"])
    logger.info("Accuracy matrix row (task %d): %s; forgetting: %s; task time %.1f s", t, row,
                results["forgetting"], seconds)
