"""utils.report on synthetic results.json files (hand-computed statistics) and on a real tiny run."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path
from typing import Any, Optional

import pytest
from PIL import Image

import trainer
from utils import report, report_tables, results_file
from utils import runs as run_groups


def write_run(root: Path, model_name: str, spr: str, dataset: str, seed: int, stamp: str = "20260101-120000", *,
              avg: float = 80.0, last: float = 70.0, forgetting: Optional[float] = 5.0, status: str = "complete",
              tuning: Optional[list[dict]] = None, seconds: tuple = (1.0, 2.0), curve: tuple = (90.0, 70.0),
              matrix: tuple = ((90.0,), (60.0, 80.0)), error: Optional[str] = None, tasks_done: Optional[int] = None,
              legacy: bool = False) -> Path:
    """Write a results.json in trainer.py's layout; ``tasks_done`` < 2 makes a partial (incomplete) run."""
    n = len(seconds) if tasks_done is None else tasks_done
    tasks = []
    for t in range(n):
        task: dict[str, Any] = {"task": t, "top1": curve[t], "seconds": seconds[t]}
        if tuning is not None:
            task["tuning"] = tuning[t]
        tasks.append(task)
    data: dict[str, Any] = {
        "config": {"model_name": model_name, "spr": spr, "dataset": dataset, "seed": seed, "init_cls": 2,
                   "device": "cpu"},
        "seed": seed, "status": status, "complete": status == "complete", "tasks": tasks,
        "top1_curve": list(curve[:n]), "accuracy_matrix": [list(r) for r in matrix[:n]], "task_sizes": [2, 2]}
    if status == "complete":
        data.update({"average_accuracy": avg, "last_accuracy": last, "forgetting": forgetting})
    if error:
        data["error"] = error
    if legacy:
        del data["status"]
    out = root / f"{model_name}_{spr}_{dataset}" / stamp / f"seed{seed}"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps(data))
    return out / "results.json"


def mist_tuning(updated: tuple, selected: Optional[tuple]) -> list[dict]:
    out = []
    for i, u in enumerate(updated):
        entry = {"method": "mist", "updated_fraction_per_step": u, "backbone_entries": 1000, "steps": 4}
        if selected is not None:
            entry["selected_fraction"] = selected[i]
        out.append(entry)
    return out


@pytest.fixture
def synthetic(tmp_path: Path) -> dict[str, Any]:
    """Two learners, three methods, two data sets, 1-3 seeds; one failed run, one duplicate set, one corrupt file."""
    root = tmp_path / "runs"
    paths: dict[str, Any] = {"root": root}
    # RanPAC / none / cifar224: 3 complete seeds
    for seed, avg, last, forg, secs in [(1, 80.0, 70.0, 5.0, (1.0, 2.0)), (2, 82.0, 71.0, 6.0, (2.0, 3.0)),
                                        (3, 84.0, 75.0, 7.0, (3.0, 4.0))]:
        write_run(root, "ranpac", "none", "cifar224", seed, avg=avg, last=last, forgetting=forg, seconds=secs,
                  curve=(avg + 10, last), matrix=((avg + 10,), (last - 10, last + 10)))
    # RanPAC (alias ranpac_mist) / mist / cifar224: 2 complete seeds with a tuning phase, seed 3 failed
    write_run(root, "ranpac_mist", "mist", "cifar224", 1, avg=85.0, last=80.0,
              tuning=mist_tuning((0.01, 0.03), (0.10, 0.10)))
    write_run(root, "ranpac_mist", "mist", "cifar224", 2, avg=87.0, last=82.0,
              tuning=mist_tuning((0.02, 0.04), (0.12, 0.12)))
    paths["failed"] = write_run(root, "ranpac_mist", "mist", "cifar224", 3, status="failed", tasks_done=1,
                                error="RuntimeError: boom | bad", tuning=mist_tuning((0.01,), (0.1,)))
    # RanPAC / rand / cifar224: one seed, tuning without a selection
    write_run(root, "ranpac", "rand", "cifar224", 1, avg=81.0, tuning=mist_tuning((0.05, 0.07), None))
    # SimpleCIL / none / cub, seed 1 three times: older complete, newer complete (used), newest interrupted
    paths["dup_old"] = write_run(root, "simplecil", "none", "cub", 1, "20260101-090000", avg=50.0)
    paths["dup_new"] = write_run(root, "simplecil", "none", "cub", 1, "20260102-090000", avg=60.0)
    paths["dup_interrupted"] = write_run(root, "simplecil", "none", "cub", 1, "20260103-090000",
                                         status="interrupted", tasks_done=1, error="KeyboardInterrupt")
    # SimpleCIL / mist / cub: only an interrupted seed
    paths["only_incomplete"] = write_run(root, "simplecil_mist", "mist", "cub", 1, status="interrupted",
                                         tasks_done=1)
    # SimpleCIL / none / cifar224: 2 seeds, one written in the older format (no 'status')
    write_run(root, "simplecil", "none", "cifar224", 1, avg=70.0, last=60.0, forgetting=None)
    write_run(root, "simplecil", "none", "cifar224", 2, avg=73.0, last=62.0, forgetting=4.0, legacy=True)
    # a corrupt file
    corrupt = root / "simplecil_rand_cub" / "20260101-120000" / "seed1" / "results.json"
    corrupt.parent.mkdir(parents=True)
    corrupt.write_text('{"config": {"model_name": "simp')
    paths["corrupt"] = corrupt
    return paths


def read_csv(path: Path) -> dict[tuple, dict[str, str]]:
    with open(path, newline="") as fh:
        return {(r["learner"], r["method"], r["dataset"], r["metric"]): r for r in csv.DictReader(fh)}


@pytest.fixture
def built(synthetic, tmp_path, capsys) -> dict[str, Any]:
    out = tmp_path / "report"
    assert report.main([str(synthetic["root"]), "--out", str(out)]) == 2  # the corrupt file: reported, exit 2
    captured = capsys.readouterr()
    return {**synthetic, "out": out, "stderr": captured.err, "stdout": captured.out,
            "rows": read_csv(out / "table.csv"), "md": (out / "table.md").read_text()}


def test_csv_means_and_sample_stds_match_hand_computation(built):
    rows = built["rows"]
    r = rows[("ranpac", "none", "cifar224", "average_accuracy")]
    assert float(r["mean"]) == pytest.approx(82.0) and float(r["std"]) == pytest.approx(2.0)  # ddof=1
    assert r["n"] == "3" and r["seeds"] == "1;2;3" and r["values"] == "80;82;84" and r["status"] == "complete"
    r = rows[("ranpac", "none", "cifar224", "last_accuracy")]
    assert float(r["mean"]) == pytest.approx(72.0)
    assert float(r["std"]) == pytest.approx(statistics.stdev([70.0, 71.0, 75.0]))  # sqrt(7)
    r = rows[("ranpac", "none", "cifar224", "forgetting")]
    assert float(r["mean"]) == pytest.approx(6.0) and float(r["std"]) == pytest.approx(1.0)
    r = rows[("ranpac", "none", "cifar224", "wall_seconds")]  # per-seed sums 3, 5, 7
    assert float(r["mean"]) == pytest.approx(5.0) and float(r["std"]) == pytest.approx(2.0) and r["unit"] == "s"
    r = rows[("ranpac", "none", "cifar224", "updated_fraction_per_step")]
    assert r["mean"] == "" and r["n"] == "0"  # no tuning phase
    # tuning fractions: per-seed mean over tasks (0.02, 0.03), then over seeds
    r = rows[("ranpac", "mist", "cifar224", "updated_fraction_per_step")]
    assert float(r["mean"]) == pytest.approx(0.025)
    assert float(r["std"]) == pytest.approx(statistics.stdev([0.02, 0.03]))
    r = rows[("ranpac", "mist", "cifar224", "selected_fraction")]
    assert float(r["mean"]) == pytest.approx(0.11) and r["unit"] == "fraction"
    assert rows[("ranpac", "rand", "cifar224", "selected_fraction")]["mean"] == ""
    r = rows[("ranpac", "rand", "cifar224", "updated_fraction_per_step")]
    assert float(r["mean"]) == pytest.approx(0.06) and r["std"] == "" and r["n"] == "1"
    # a single-task-like missing forgetting is left out of n; the legacy file (no status) counts as complete
    r = rows[("simplecil", "none", "cifar224", "forgetting")]
    assert r["n"] == "1" and float(r["mean"]) == pytest.approx(4.0)
    r = rows[("simplecil", "none", "cifar224", "average_accuracy")]
    assert r["n"] == "2" and float(r["mean"]) == pytest.approx(71.5)


def test_incomplete_runs_are_excluded_and_listed(built):
    rows, md = built["rows"], built["md"]
    r = rows[("ranpac", "mist", "cifar224", "average_accuracy")]
    assert r["n"] == "2" and r["seeds"] == "1;2" and float(r["mean"]) == pytest.approx(86.0)
    assert r["incomplete"] == "1" and r["incomplete_seeds"] == "3" and r["status"] == "partial"
    r = rows[("simplecil", "mist", "cub", "average_accuracy")]
    assert r["n"] == "0" and r["mean"] == "" and r["incomplete"] == "1" and r["status"] == "incomplete"
    assert "86.00 ± 1.41 (n=2, +1 incomplete)" in md
    assert "all incomplete (1 seed: interrupted)" in md
    section = md.split("## Incomplete runs")[1].split("## Duplicate runs")[0]
    assert str(built["failed"]) in section and "failed" in section and "1 of 2" in section
    assert "RuntimeError: boom \\| bad" in section  # the pipe is escaped for the table
    assert str(built["only_incomplete"]) in section
    assert str(built["dup_interrupted"]) in section and "superseded" in section


def test_duplicates_are_not_double_counted(built):
    r = built["rows"][("simplecil", "none", "cub", "average_accuracy")]
    assert r["n"] == "1" and float(r["mean"]) == pytest.approx(60.0) and r["std"] == ""
    assert r["duplicates_ignored"] == "2" and r["incomplete"] == "0" and r["status"] == "complete"
    section = built["md"].split("## Duplicate runs")[1].split("## Skipped files")[0]
    assert str(built["dup_old"]) in section and str(built["dup_interrupted"]) in section
    assert str(built["dup_new"]) in section  # named as the one used
    assert "60.00 (n=1)" in built["md"]  # n=1: no ±


def test_overlapping_folders_count_each_file_once(synthetic, tmp_path):
    root = synthetic["root"]
    out = tmp_path / "overlap"
    assert report.main([str(root), str(root / "ranpac_none_cifar224"), "--out", str(out)]) == 2  # the corrupt file
    assert read_csv(out / "table.csv")[("ranpac", "none", "cifar224", "average_accuracy")]["n"] == "3"


def test_corrupt_file_is_skipped_with_a_warning(built):
    assert f"warning: skipped {built['corrupt']}" in built["stderr"] and "not valid JSON" in built["stderr"]
    section = built["md"].split("## Skipped files")[1].split("## Runs used")[0]
    assert str(built["corrupt"]) in section
    assert "1 file(s) skipped" in built["md"]


def test_markdown_has_row_groups_n_counts_and_footnote(built):
    md = built["md"]
    for title in ("Average accuracy", "Last accuracy A_B", "Forgetting", "Backbone updated per step",
                  "Backbone selected", "Wall time"):
        assert f"## {title}" in md
    table = md.split("## Average accuracy")[1].split("##")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert lines[0] == "| Learner / method | cifar224 | cub |"
    ranpac, simplecil = lines.index("| **RanPAC** | | |"), lines.index("| **SimpleCIL** | | |")
    assert ranpac < simplecil
    assert [ln.split("|")[1].strip() for ln in lines[ranpac + 1:simplecil]] == ["none", "rand", "mist"]
    assert [ln.split("|")[1].strip() for ln in lines[simplecil + 1:]] == ["none", "mist"]
    assert "| none | 82.00 ± 2.00 (n=3) |  |" in lines
    assert "(n=3)" in md and "(n=2" in md and "(n=1)" in md
    assert "ddof=1" in md
    updated = md.split("## Backbone updated per step")[1].split("##")[0]
    assert "| mist | 2.500 ± 0.707 (n=2, +1 incomplete) |  |" in updated
    assert "| none | - |  |" in updated


def test_plots_are_valid_pngs(built):
    out = built["out"]
    expected = ["curves_cifar224.png", "curves_cub.png", "matrix_ranpac_none_cifar224.png",
                "matrix_ranpac_mist_cifar224.png", "matrix_ranpac_rand_cifar224.png",
                "matrix_simplecil_none_cub.png", "matrix_simplecil_none_cifar224.png"]
    for name in expected:
        path = out / name
        assert path.stat().st_size > 5000, name
        with Image.open(path) as img:
            assert img.format == "PNG"
            assert img.width >= 300 and img.height >= 300
            img.verify()
        assert f"]({name})" in built["md"]
    assert not (out / "matrix_simplecil_mist_cub.png").exists()  # all incomplete: nothing to draw
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)


def test_missing_folder_exits_2_with_a_clear_message(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert report.main([str(missing), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(missing) in err and "does not exist" in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_no_results_and_only_invalid_files_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main([str(empty), "--out", str(tmp_path / "r")]) == 2
    assert "no results.json found" in capsys.readouterr().err
    bad = tmp_path / "bad" / "x" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(json.dumps({"config": {"model_name": "ranpac"}}))  # no dataset
    assert report.main([str(tmp_path / "bad"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "config.dataset" in err and len(err.strip().splitlines()) == 1


def test_report_on_real_tiny_runs(make_config, image_folder, tmp_path):
    root = image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=2)
    runs = tmp_path / "runs"
    paths = trainer.run(make_config(root, model_name="simplecil", seed=[1993, 7]), runs)
    results = [json.loads(p.read_text()) for p in paths]
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out)]) == 0
    rows = read_csv(out / "table.csv")
    r = rows[("simplecil", "none", "cub", "average_accuracy")]
    assert r["n"] == "2" and r["seeds"] == "7;1993" and r["status"] == "complete"
    values = [res["average_accuracy"] for res in results]
    assert float(r["mean"]) == pytest.approx(statistics.mean(values))
    assert float(r["std"]) == pytest.approx(statistics.stdev(values), abs=1e-8)
    r = rows[("simplecil", "none", "cub", "wall_seconds")]
    assert float(r["mean"]) == pytest.approx(statistics.mean(sum(t["seconds"] for t in res["tasks"])
                                                             for res in results))
    md = (out / "table.md").read_text()
    assert "**SimpleCIL**" in md and "(n=2)" in md and "## Incomplete runs\n\nNone." in md
    for name in ("curves_cub.png", "matrix_simplecil_none_cub.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG"


def test_composed_and_reparametrised_presets_are_separate_methods(tmp_path):
    """A preset with a replaced part, or with one of its own keys off its default, is another row, never a
    duplicate of the preset's runs."""
    runs = tmp_path / "runs"
    write_run(runs, "ranpac", "magnitude_gate", "fmnist", 1, avg=70.0)
    for path, extra in ((write_run(runs, "ranpac", "magnitude_gate", "fmnist", 1, "20260101-130000", avg=60.0),
                         {"gate_threshold": 0.05, "gate_budget_small": 0.001}),
                        (write_run(runs, "ranpac", "mist", "fmnist", 1, avg=50.0), {"importance": "random"}),
                        (write_run(runs, "ranpac", "mist", "fmnist", 1, "20260101-130000", avg=40.0),
                         {"importance": None, "top_ratio": 0.5})):
        data = json.loads(path.read_text())
        data["config"].update(extra)
        path.write_text(json.dumps(data))
    col = run_groups.collect([runs])
    cells = {(learner, m): c for (learner, m, d), c in col.cells.items()}
    assert set(m for _, m in cells) == {"magnitude_gate", "magnitude_gate (gate_threshold=0.05)",
                                        'mist (importance="random")', "mist"}
    assert cells[("ranpac", "magnitude_gate")].values("average_accuracy")[1] == [70.0]
    assert cells[("ranpac", "magnitude_gate (gate_threshold=0.05)")].values("average_accuracy")[1] == [60.0]
    assert cells[("ranpac", "mist")].values("average_accuracy")[1] == [40.0]  # top_ratio is not MIST's key


def test_paired_differences_from_no_tuning_use_the_common_seeds(tmp_path):
    runs = tmp_path / "runs"
    for seed, base, mist in ((1, 80.0, 82.0), (2, 70.0, 69.0), (3, 75.0, None)):
        write_run(runs, "ranpac", "none", "fmnist", seed, avg=base)
        if mist is not None:
            write_run(runs, "ranpac", "mist", "fmnist", seed, avg=mist)
    write_run(runs, "ranpac", "mist", "fmnist", 4, avg=90.0)  # no baseline for seed 4: not paired
    col = run_groups.collect([runs])
    seeds, diffs = report_tables.paired_differences(col, "ranpac", "mist", "fmnist", "average_accuracy")
    assert seeds == [1, 2] and diffs == [2.0, -1.0]
    lines = report_tables.paired_table(col)
    (row,) = [ln for ln in lines if ln.startswith("| RanPAC / mist")]
    assert f"+0.50 ± {statistics.stdev([2.0, -1.0]):.2f} (n=2, 1 > 0)" in row
    assert report_tables.paired_differences(col, "ranpac", "none", "fmnist", "average_accuracy") == ([], [])
    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out)]) == 0
    assert "## Paired differences from no tuning phase" in (out / "table.md").read_text()


def _good_and(tmp_path: Path, text: str) -> tuple[Path, Path]:
    """A run folder with one good results.json and one bad one holding ``text``."""
    root = tmp_path / "runs"
    write_run(root, "ranpac", "none", "cifar224", 1)
    bad = root / "ranpac_none_cifar224" / "20260101-130000" / "seed2" / "results.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(text)
    return root, bad


def _valid_results_text(**values: Any) -> str:
    data = {"config": {"model_name": "ranpac", "spr": "none", "dataset": "cifar224", "seed": 2}, "seed": 2,
            "status": "complete", "tasks": [{"task": 0, "seconds": 1.0}], "top1_curve": [90.0],
            "accuracy_matrix": [[90.0]], "task_sizes": [2], "average_accuracy": 90.0, "last_accuracy": 90.0,
            "forgetting": None}
    return json.dumps({**data, **values})


@pytest.mark.parametrize("case,text,why", [
    ("401 digits", _valid_results_text(last_accuracy=0).replace('"last_accuracy": 0', '"last_accuracy": ' + "9" * 401),
     "'last_accuracy' is 99999"),
    ("deep nesting", "[" * 200_000 + "]" * 200_000, "nested too deeply"),
    ("1e308 %", _valid_results_text(average_accuracy=1e308, top1_curve=[1e308]), "expected a value in [0, 100]"),
    ("negative", _valid_results_text(accuracy_matrix=[[-5.0]]), "'accuracy_matrix[0][0]' is -5"),
    ("5000 digits", '{"config": ' + "1" * 5000 + "}", "not valid JSON"),
])
def test_a_hostile_results_file_is_one_warning_line_and_the_others_are_reported(tmp_path, capsys, case, text, why):
    root, bad = _good_and(tmp_path, text)
    out = tmp_path / "report"
    assert report.main([str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: skipped {bad}: ") and why in err[0], err
    assert len(err[0]) < 400 and "Traceback" not in err[0]
    row = read_csv(out / "table.csv")[("ranpac", "none", "cifar224", "average_accuracy")]
    assert row["n"] == "1" and float(row["mean"]) == 80.0  # the good run, alone
    assert "inf" not in (out / "table.md").read_text()


def test_a_read_only_out_folder_is_one_error_line_naming_the_file(tmp_path, capsys, monkeypatch):
    root, _ = _good_and(tmp_path, _valid_results_text())
    out = tmp_path / "report"
    out.mkdir()
    out.chmod(0o500)
    if os.access(out, os.W_OK):  # root ignores the mode: refuse the write as the kernel would for a user

        def refuse(self, path, *args, **kwargs):
            raise PermissionError(13, "Permission denied", str(path))
        monkeypatch.setattr("matplotlib.figure.Figure.savefig", refuse)
    try:
        assert report.main([str(root), "--out", str(out)]) == 2
    finally:
        out.chmod(0o700)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --out {out}: cannot write {out}/curves_cifar224.png")
    assert "Permission denied" in err[0]


def test_a_full_disk_is_one_error_line_naming_the_file(tmp_path, capsys, monkeypatch):
    root, _ = _good_and(tmp_path, _valid_results_text())
    out = tmp_path / "report"

    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")  # PIL's error carries no file name
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full)
    assert report.main([str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot write {out}/curves_cifar224.png (No space left on device)" in err[0]


def test_a_preset_rebuilt_by_composition_keys_is_reported_under_the_preset_it_ran(tmp_path):
    root = tmp_path / "runs"
    rebuilt = write_run(root, "ranpac", "mist_random", "cifar224", 1, tuning=mist_tuning((0.01, 0.02), (0.1, 0.1)))
    data = json.loads(rebuilt.read_text())
    data["config"]["importance"] = "mi_fisher"  # mist_random + MIST's estimator = MIST, and the tuner said so
    rebuilt.write_text(json.dumps(data))
    composed = write_run(root, "ranpac", "mist_random", "cifar224", 2, tuning=[{**t, "method": "mist_random"}
                                                                           for t in mist_tuning((0.01, 0.02), None)])
    data = json.loads(composed.read_text())
    data["config"]["importance"] = "fisher"
    composed.write_text(json.dumps(data))
    assert results_file.load_run(rebuilt).method == "mist"
    assert results_file.load_run(composed).method == 'mist_random (importance="fisher")'


def test_moved_fraction_and_relative_change_are_averaged_over_tuned_tasks(tmp_path):
    """Issue 14: the share of backbone entries a phase changed and its relative weight change, per tuned task."""
    root = tmp_path / "runs"
    for seed, moved, change in [(1, (0.5, 0.7), (1e-6, 3e-6)), (2, (0.2, 0.4), (2e-6, 2e-6))]:
        tuning = [{"method": "spu", "moved_fraction": m, "relative_change": c} for m, c in zip(moved, change)]
        write_run(root, "ranpac", "spu", "cifar224", seed, avg=80.0, last=70.0, forgetting=1.0, seconds=(1.0, 1.0),
                  curve=(90.0, 70.0), matrix=((90.0,), (60.0, 80.0)), tuning=tuning)
    col, _ = report.build_report([root], tmp_path / "out")
    rows = {(r["learner"], r["method"], r["dataset"], r["metric"]): r for r in report_tables.csv_rows(col)}
    r = rows[("ranpac", "spu", "cifar224", "moved_fraction")]
    assert float(r["mean"]) == pytest.approx(0.45) and float(r["std"]) == pytest.approx(statistics.stdev([0.6, 0.3]))
    r = rows[("ranpac", "spu", "cifar224", "relative_change")]
    assert float(r["mean"]) == pytest.approx(2e-6)
    table = (tmp_path / "out" / "table.md").read_text()
    assert "## Backbone entries moved per task (%)" in table and "45.000 ± 21.213 (n=2)" in table
    assert "2.00 ± 0.00 (n=2)" in table.split("## Relative weight change per task (x 1e-6)")[1].split("##")[0]
