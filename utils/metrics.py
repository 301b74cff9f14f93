"""Accuracy metrics: the official grouped accuracy and curves
(algorithms.md §8) plus the accuracy matrix and forgetting.

Definitions, with T tasks and a_t the top-1 accuracy on all classes seen after task t:
- average accuracy (A-bar) = (1/T) sum_t a_t  (official "Average Accuracy (CNN)");
- last accuracy (A_B) = a_T                   (official "Last Average Accuracy");
- A_tt = (1/T) sum_t acc(task t's classes right after task t)  (official "A_tt");
- accuracy matrix R[i][j] = accuracy on task j's classes after task i (j <= i);
- forgetting = mean over j < T-1 of max_{j <= l < T-1} R[l][j] - R[T-1][j]  (Chaudhry et al. 2018).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def _pct(correct: np.ndarray) -> float:
    # official rounding: np.around(sum * 100 / n, 2)
    if len(correct) == 0:
        return float("nan")
    return float(np.around(correct.sum() * 100 / len(correct), decimals=2))


def grouped_accuracy(y_pred: np.ndarray, y_true: np.ndarray, nb_old: int, increment: int = 10) -> dict:
    """The official ``toolkit.accuracy`` dict (algorithms.md §8.1).

    Args:
        y_pred: int array (N,), top-1 predicted labels.
        y_true: int array (N,), true labels.
        nb_old: number of classes known before the current task.
        increment: bucket width; the official code always passes 10.

    Returns:
        ``{"total", "<lo>-<hi>" buckets for lo in range(0, max(y_true), increment), "old", "new"}``,
        percentages rounded to 2 decimals; ``old`` is the integer 0 when there are no old classes.
    """
    out: dict = {"total": _pct(y_pred == y_true)}
    for lo in range(0, int(np.max(y_true)), increment):
        idx = np.flatnonzero((y_true >= lo) & (y_true < lo + increment))
        out[f"{lo:02d}-{lo + increment - 1:02d}"] = _pct(y_pred[idx] == y_true[idx])
    old = np.flatnonzero(y_true < nb_old)
    out["old"] = 0 if len(old) == 0 else _pct(y_pred[old] == y_true[old])
    new = np.flatnonzero(y_true >= nb_old)
    out["new"] = _pct(y_pred[new] == y_true[new])
    return out


def topk_accuracy(y_topk: np.ndarray, y_true: np.ndarray) -> float:
    """Percentage of rows whose true label is among the k predictions. y_topk: (N, k) int."""
    return _pct((y_topk == y_true[:, None]).any(axis=1))


def task_accuracies(y_pred: np.ndarray, y_true: np.ndarray, task_ranges: Sequence[tuple[int, int]]) -> list[float]:
    """Top-1 accuracy (%) on each task's classes ``[lo, hi)``: one row of the accuracy matrix."""
    row = []
    for lo, hi in task_ranges:
        idx = np.flatnonzero((y_true >= lo) & (y_true < hi))
        row.append(_pct(y_pred[idx] == y_true[idx]))
    return row


def forgetting(acc_matrix: Sequence[Sequence[Optional[float]]]) -> Optional[float]:
    """Average forgetting of the final model (definition in the module docstring); None for a single task."""
    T = len(acc_matrix)
    if T < 2:
        return None
    drops = [max(acc_matrix[i][j] for i in range(j, T - 1)) - acc_matrix[T - 1][j] for j in range(T - 1)]
    return float(np.around(np.mean(drops), decimals=2))


def summarize(top1_curve: Sequence[float], att_curve: Sequence[float],
              acc_matrix: Sequence[Sequence[Optional[float]]]) -> dict:
    """A-bar, A_B (last), A_tt and forgetting from the curves and the accuracy matrix."""
    return {
        "average_accuracy": float(np.mean(top1_curve)),
        "last_accuracy": float(top1_curve[-1]),
        "a_tt": float(np.mean(att_curve)),
        "forgetting": forgetting(acc_matrix),
    }
