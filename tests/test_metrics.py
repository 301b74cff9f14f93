"""utils.metrics on small hand-computed examples (algorithms.md §8.1-8.2)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from utils.metrics import forgetting, grouped_accuracy, summarize, task_accuracies, topk_accuracy

#            correct:  1  1  0   1   0   1   0   1
Y_TRUE = np.array([0, 5, 9, 12, 15, 21, 24, 24])
Y_PRED = np.array([0, 5, 1, 12, 3, 21, 0, 24])


def test_grouped_accuracy_hand_example():
    out = grouped_accuracy(Y_PRED, Y_TRUE, nb_old=10)
    # buckets lo in range(0, max(y_true)=24, 10): 0, 10, 20
    assert list(out) == ["total", "00-09", "10-19", "20-29", "old", "new"]
    assert out["total"] == 62.5  # 5 / 8
    assert out["00-09"] == 66.67  # 2 / 3, rounded to 2 decimals
    assert out["10-19"] == 50.0  # 1 / 2
    assert out["20-29"] == 66.67  # 2 / 3
    assert out["old"] == 66.67  # labels < 10: 2 / 3
    assert out["new"] == 60.0  # labels >= 10: 3 / 5


def test_grouped_accuracy_without_old_classes():
    out = grouped_accuracy(Y_PRED, Y_TRUE, nb_old=0)
    assert out["old"] == 0 and isinstance(out["old"], int)
    assert out["new"] == out["total"] == 62.5


def test_grouped_accuracy_three_digit_bucket_key_and_official_last_class_quirk():
    out = grouped_accuracy(np.array([3, 105, 100]), np.array([3, 105, 101]), nb_old=100)
    assert "100-109" in out and out["100-109"] == 50.0
    assert out["old"] == 100.0 and out["new"] == 50.0
    # official quirk: max(y_true) = 10 is a multiple of 10, so class 10 gets no bucket
    quirk = grouped_accuracy(np.array([0, 10]), np.array([0, 10]), nb_old=0)
    assert [k for k in quirk if "-" in k] == ["00-09"]


def test_grouped_accuracy_wider_buckets():
    out = grouped_accuracy(Y_PRED, Y_TRUE, nb_old=20, increment=20)
    assert [k for k in out if "-" in k] == ["00-19", "20-39"]
    assert out["00-19"] == 60.0  # 3 / 5
    assert out["20-39"] == 66.67


def test_topk_accuracy():
    y_topk = np.array([[1, 2], [0, 3], [5, 4], [2, 2]])
    y_true = np.array([2, 1, 4, 0])
    assert topk_accuracy(y_topk, y_true) == 50.0  # rows 0 and 2 contain the label
    assert topk_accuracy(y_topk[:3], y_true[:3]) == 66.67
    assert topk_accuracy(y_topk[:, :1], y_true) == 0.0


def test_task_accuracies_is_one_matrix_row():
    row = task_accuracies(Y_PRED, Y_TRUE, [(0, 10), (10, 20), (20, 30)])
    assert row == [66.67, 50.0, 66.67]
    assert math.isnan(task_accuracies(Y_PRED, Y_TRUE, [(30, 40)])[0])  # no test images: nan, not a crash


# accuracy matrix R[i][j] = accuracy on task j's classes after task i
R = [[80.0],
     [85.0, 70.0],
     [60.0, 65.0, 50.0]]


def test_forgetting_hand_example():
    # task 0: best earlier 85 (after task 1), final 60 -> 25; task 1: best 70, final 65 -> 5
    assert forgetting(R) == pytest.approx((25.0 + 5.0) / 2)
    # after task 1: task 0 went from 80 to 85, i.e. negative forgetting (backward transfer) is kept
    assert forgetting(R[:2]) == pytest.approx(80.0 - 85.0)
    assert forgetting(R[:1]) is None


def test_summarize_hand_example():
    top1_curve = [80.0, 76.0, 58.0]  # a_t: accuracy on every class seen after task t
    att_curve = [80.0, 70.0, 50.0]  # A_tt terms: the diagonal R[t][t]
    out = summarize(top1_curve, att_curve, R)
    assert out["average_accuracy"] == pytest.approx((80.0 + 76.0 + 58.0) / 3)
    assert out["last_accuracy"] == 58.0
    assert out["a_tt"] == pytest.approx((80.0 + 70.0 + 50.0) / 3)
    assert out["forgetting"] == pytest.approx(15.0)
    assert set(out) == {"average_accuracy", "last_accuracy", "a_tt", "forgetting"}
