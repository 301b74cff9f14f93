"""Tiny full runs through trainer.run and main.main: tiny random ViT, 6 PNG classes in 2 tasks, no tuning phase."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main
import trainer

from conftest import tiny_run_dict

LEARNERS = ["ranpac", "simplecil"]
TASK_KEYS = {"classes", "top1", "top5", "grouped", "old", "new", "seconds"}
TOP_KEYS = {"config", "seed", "class_order", "tasks", "top1_curve", "top5_curve", "accuracy_matrix",
            "average_accuracy", "last_accuracy", "forgetting", "a_tt"}


@pytest.fixture
def cub_root(image_folder) -> Path:
    return image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=2)


def run_once(make_config, root: Path, out: Path, model_name: str, **overrides) -> tuple[dict, Path]:
    cfg = make_config(root, model_name=model_name, **overrides)
    paths = trainer.run(cfg, out)
    assert len(paths) == 1 and paths[0].is_file()
    return json.loads(paths[0].read_text()), paths[0]


@pytest.mark.parametrize("model_name", LEARNERS)
def test_tiny_run_writes_results_and_log(make_config, cub_root, tmp_path, model_name):
    results, path = run_once(make_config, cub_root, tmp_path / "runs", model_name)

    assert TOP_KEYS <= set(results)
    assert results["seed"] == 1993
    assert results["config"]["model_name"] == model_name
    assert sorted(results["class_order"]) == list(range(6))
    assert results["complete"] is True

    tasks = results["tasks"]
    assert [t["classes"] for t in tasks] == [[0, 3], [3, 6]]
    for t in tasks:
        assert TASK_KEYS <= set(t)
        for key in ("top1", "top5", "new"):
            assert 0.0 <= t[key] <= 100.0
        assert t["top5"] >= t["top1"]
        assert t["grouped"]["total"] == t["top1"]
        assert t["seconds"] >= 0
    assert tasks[0]["old"] == 0  # no old classes in task 0
    assert 0.0 <= tasks[1]["old"] <= 100.0
    assert tasks[0]["top5"] == 100.0  # 3 classes seen: top-5 holds every label
    assert results["top1_curve"][-1] > 50.0  # one colour per class: far above chance (1/6)

    assert results["top1_curve"] == [t["top1"] for t in tasks]
    assert results["top5_curve"] == [t["top5"] for t in tasks]
    matrix = results["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2]
    assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
    # the summary numbers follow from the curves and the matrix (algorithms.md §8.2)
    assert results["average_accuracy"] == pytest.approx(sum(results["top1_curve"]) / 2)
    assert results["last_accuracy"] == results["top1_curve"][-1]
    assert results["a_tt"] == pytest.approx((tasks[0]["new"] + tasks[1]["new"]) / 2)
    assert results["forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0], abs=0.01)
    assert matrix[0][0] == tasks[0]["top1"]
    # 2 test images per class: the whole-test-set accuracy is the mean of the two task accuracies
    assert tasks[1]["top1"] == pytest.approx(sum(matrix[1]) / 2, abs=0.01)

    run_dir = path.parent
    assert run_dir.name == "seed1993"
    log = run_dir / f"{model_name}_none_cub_seed1993.log"
    assert log.is_file()
    text = log.read_text()
    assert "Average Accuracy (CNN)" in text
    assert "Last Average Accuracy" in text
    assert "A_tt" in text
    # the official task-opening lines, each naming the learner's own file as the official logs do
    opening = {"simplecil": ["[simplecil.py] => Learning on 0-3", "[simplecil.py] => Learning on 3-6"],
               "ranpac": ["[ranpac.py] => Starting CIL Task 1", "[ranpac.py] => Learning on classes 0-2",
                          "[ranpac.py] => Starting CIL Task 2", "[ranpac.py] => Learning on classes 3-5"]}
    for line in opening[model_name]:
        assert line in text
    config = json.loads((run_dir / "config.json").read_text())
    assert config["config"]["dataset"] == "cub"


@pytest.mark.parametrize("model_name", LEARNERS)
def test_same_seed_gives_identical_results(make_config, image_folder, tmp_path, model_name):
    # two colours for six classes plus strong noise: accuracies are not saturated, so they depend on
    # the random projection, the initialisation and the loader order
    root = image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=4, noise=40.0, n_colours=2)
    first, _ = run_once(make_config, root, tmp_path / "a", model_name)
    second, _ = run_once(make_config, root, tmp_path / "b", model_name)
    assert any(0.0 < v < 100.0 for row in first["accuracy_matrix"] for v in row)
    assert first["accuracy_matrix"] == second["accuracy_matrix"]
    assert first["top1_curve"] == second["top1_curve"]
    assert first["top5_curve"] == second["top5_curve"]
    assert [t["grouped"] for t in first["tasks"]] == [t["grouped"] for t in second["tasks"]]
    assert first["class_order"] == second["class_order"]
    other, _ = run_once(make_config, root, tmp_path / "c", model_name, seed=[1994])
    assert other["class_order"] != first["class_order"]  # the seed drives the class order


def test_main_prints_results_path_last(cub_root, tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(tiny_run_dict(cub_root, model_name="simplecil")))
    code = main.main(["--config", str(config), "--output-dir", str(tmp_path / "runs"), "--set", "seed=[7]"])
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("results: ")
    path = Path(lines[-1][len("results: "):])
    assert path.is_file()
    assert path.parent.name == "seed7"
    assert tmp_path / "runs" in path.parents
    assert json.loads(path.read_text())["seed"] == 7


def test_main_returns_2_on_config_error(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"dataset": "cub", "selct_rate": 0.2}))
    assert main.main(["--config", str(config), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "select_rate" in err
    assert not (tmp_path / "runs").exists()


def test_input_size_mismatch_with_vit_is_a_clear_error(cub_root, tmp_path, capsys):
    config = tmp_path / "mismatch.json"
    config.write_text(json.dumps(tiny_run_dict(cub_root, input_size=48)))  # tiny ViT has img_size=32
    code = main.main(["--config", str(config), "--output-dir", str(tmp_path / "runs")])
    assert code == 2
    err = capsys.readouterr().err
    assert "input_size" in err and "img_size" in err


def test_write_json_turns_nan_into_null(tmp_path):
    trainer.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("nan")]})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1.0, None]}
