"""Runs that stop, fail or resume (issue 8): status in results.json, checkpoints, --resume, the NaN guard.

Tiny random ViT on PNG classes in ImageFolder layout (tests/test_sparse_tuning.py helpers), CPU, 3 tasks.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

import main
import trainer
from tests.conftest import terminal_lines
from tests.test_sparse_tuning import tiny_overrides
from utils.config import load_config
from utils.errors import CheckpointError, NonFiniteError

VOLATILE = {"seconds"}  # wall time differs between runs


@pytest.fixture
def images(image_folder) -> Path:
    """Two colours for six classes plus strong noise: accuracies depend on every random stream."""
    return image_folder("cub", "test", n_classes=6, train_per_class=4, test_per_class=4, noise=40.0, n_colours=2)


def comparable(results: dict) -> dict:
    """results.json without wall times (and the status, compared separately)."""
    out = {k: v for k, v in results.items() if k not in ("status", "error", "config")}
    out["config"] = {k: v for k, v in results["config"].items() if k != "stop_after_task"}
    out["tasks"] = [{k: v for k, v in t.items() if k not in VOLATILE} for t in results["tasks"]]
    return out


def overrides(images: Path, model_name: str, *extra: str) -> list[str]:
    return tiny_overrides(images, model_name, init_cls=2, increment=2) + list(extra)


@pytest.mark.parametrize("model_name,spr", [("ranpac", "mist"), ("simplecil", "mist"), ("simplecil", "rand"),
                                            ("ranpac", "spg"), ("simplecil", "sparcl")])
def test_stopped_and_resumed_run_equals_the_uninterrupted_run(images, tmp_path, model_name, spr):
    full_cfg = load_config(None, overrides(images, model_name, f"spr={spr}"))
    (full_path,) = trainer.run(full_cfg, tmp_path / "full")
    full = json.loads(full_path.read_text())
    assert full["status"] == "complete" and len(full["tasks"]) == 3

    stop_cfg = load_config(None, overrides(images, model_name, f"spr={spr}", "stop_after_task=0"))
    with pytest.raises(trainer.RunStopped, match="stopped after task 0"):
        trainer.run(stop_cfg, tmp_path / "stopped")
    (seed_dir,) = (tmp_path / "stopped").glob("*/*/seed1993")
    partial = json.loads((seed_dir / "results.json").read_text())
    assert partial["status"] == "interrupted" and len(partial["tasks"]) == 1
    assert (seed_dir / "checkpoint.pt").is_file()

    (resumed_path,) = trainer.resume(seed_dir.parent)
    resumed = json.loads(resumed_path.read_text())
    assert resumed["status"] == "complete"
    assert any(0.0 < v < 100.0 for row in full["accuracy_matrix"] for v in row)  # not saturated
    assert comparable(resumed) == comparable(full)


def test_resume_refuses_changes_that_affect_results(images, tmp_path):
    cfg = load_config(None, overrides(images, "simplecil", "spr=none", "stop_after_task=0"))
    with pytest.raises(trainer.RunStopped):
        trainer.run(cfg, tmp_path / "runs")
    (run_dir,) = (tmp_path / "runs").glob("*/*")
    with pytest.raises(Exception, match="cannot change when resuming"):
        trainer.resume(run_dir, ["select_rate=0.2"])
    paths = trainer.resume(run_dir, ["num_workers=0"])  # allowed: does not change results
    assert json.loads(paths[0].read_text())["status"] == "complete"
    assert trainer.resume(run_dir) == paths  # a complete seed is kept as it is


def test_a_foreign_checkpoint_is_refused(images, tmp_path):
    """A truncated checkpoint restarts the seed (tests/test_run_folder.py); a readable file that is not a mist-cl
    checkpoint is refused, and the finished task stays recorded."""
    cfg = load_config(None, overrides(images, "ranpac", "spr=none", "stop_after_task=0"))
    with pytest.raises(trainer.RunStopped):
        trainer.run(cfg, tmp_path / "runs")
    (seed_dir,) = (tmp_path / "runs").glob("*/*/seed1993")
    ckpt = seed_dir / "checkpoint.pt"
    torch.save({"something": torch.zeros(2)}, ckpt)
    before = (seed_dir / "results.json").read_bytes()
    with pytest.raises(CheckpointError, match="not a mist-cl checkpoint"):
        trainer.resume(seed_dir.parent)
    # a refused resume leaves results.json as it was (issue 26): status "interrupted", the finished task kept
    assert (seed_dir / "results.json").read_bytes() == before
    assert json.loads(before)["status"] == "interrupted" and len(json.loads(before)["tasks"]) == 1
    # through the command line: one line, exit 2, the file named
    code = main.main(["--resume", str(seed_dir.parent)])
    assert code == 2


def test_nan_loss_stops_the_run_with_task_epoch_and_step(images, tmp_path, monkeypatch, capsys):
    from models.sparse import losses

    real = losses.contrastive_loss
    calls = {"n": 0}

    def poisoned(tuner, batch):
        calls["n"] += 1
        loss = real(tuner, batch)
        return loss * float("nan") if calls["n"] == 3 else loss  # 2 scoring steps, then epoch 2 step 0

    monkeypatch.setattr(losses, "contrastive_loss", poisoned)
    config = tmp_path / "c.json"
    config.write_text("{}")
    args = ["--config", str(config), "--output-dir", str(tmp_path / "runs")]
    for item in overrides(images, "ranpac", "mi_epochs=3"):
        args += ["--set", item]
    assert main.main(args) == 1
    err = terminal_lines(capsys.readouterr().err)
    assert len(err) == 1 and "NonFiniteError" in err[0] and "task 0, epoch 2/3, step 0" in err[0]
    (results_path,) = (tmp_path / "runs").glob("*/*/seed1993/results.json")
    results = json.loads(results_path.read_text())
    assert results["status"] == "failed" and "NaN or infinite" in results["error"] and results["complete"] is False
    log = next(results_path.parent.glob("*.log")).read_text()
    assert "Traceback" in log and "NonFiniteError" in log


def test_loss_monitor_names_the_first_bad_step():
    from models.loop import LossMonitor

    monitor = LossMonitor(torch.device("cpu"), "task 2, epoch 4/20")
    for value in (1.0, 2.0, float("inf"), float("nan")):
        monitor.add(torch.tensor(value))
    with pytest.raises(NonFiniteError, match="task 2, epoch 4/20, step 2"):
        monitor.mean(4)
    ok = LossMonitor(torch.device("cpu"), "x")
    for value in (1.0, 2.0):
        ok.add(torch.tensor(value, dtype=torch.float32))
    assert ok.mean(2) == 1.5


def test_missing_data_fails_cleanly_with_status(tmp_path, capsys):
    args = ["--output-dir", str(tmp_path / "runs")]
    for item in tiny_overrides(tmp_path / "nowhere", "simplecil", spr="none"):
        args += ["--set", item]
    assert main.main(args) == 2
    err = capsys.readouterr().err
    assert terminal_lines(err)[0].startswith("error: dataset 'cub'") and "Traceback" not in err
    (results_path,) = (tmp_path / "runs").glob("*/*/seed1993/results.json")
    results = json.loads(results_path.read_text())
    assert results["status"] == "failed" and "cub" in results["error"]


def test_sigterm_is_handled_like_ctrl_c():
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        main._sigterm_as_interrupt(signal.SIGTERM, None)


def test_sigterm_on_a_running_run_records_interrupted(images, tmp_path):
    """A real process: SIGTERM mid-run exits 130 with status "interrupted" and the finished tasks kept."""
    import subprocess
    import sys
    import time

    args = [sys.executable, "main.py", "--output-dir", str(tmp_path / "runs")]
    for item in overrides(images, "ranpac", "mi_epochs=40"):
        args += ["--set", item]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    results = None
    while time.time() < deadline:  # wait until the first task is done and written
        found = list((tmp_path / "runs").glob("*/*/seed1993/results.json"))
        if found:
            try:
                results = json.loads(found[0].read_text())
            except ValueError:
                results = None
            if results and results.get("tasks") and (found[0].parent / "checkpoint.pt").is_file():
                break  # the first task is recorded and checkpointed
        time.sleep(0.2)
    assert results and results["tasks"], "the run did not finish its first task in time"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    final = json.loads(found[0].read_text())
    assert final["status"] == "interrupted" and len(final["tasks"]) >= 1
    assert (found[0].parent / "checkpoint.pt").is_file()


def test_deterministic_key_and_runtime_record(images, tmp_path, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        cfg = load_config(None, overrides(images, "simplecil", "spr=none", "deterministic=true"))
        (path,) = trainer.run(cfg, tmp_path / "runs")
        assert torch.are_deterministic_algorithms_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(previous)
    runtime = json.loads(path.with_name("config.json").read_text())["runtime"]
    assert runtime == {**runtime, "device": "cpu", "gpu": None, "allow_tf32": True, "deterministic": True}
