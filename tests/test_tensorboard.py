"""The ``loggers`` key (issue 28): a tiny SLCA + MIST run writes a TensorBoard event file whose values, read back with
tensorboard's own reader, equal results.json; a resumed run continues the step counters; a bad logger name is an
error before the run; no event file without the key."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import trainer
from utils.config import load_config
from utils.errors import ConfigError

from test_sparse_tuning import tiny_overrides, write_image_folder

SLCA = dict(epochs=2, milestones=[1], ca_epochs=2, use_config_batch_size=True)


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("tb_images"))


def run(images: Path, out: Path, **extra) -> Path:
    cfg = load_config(None, tiny_overrides(images, "slca", loggers=["tensorboard"], **SLCA, **extra))
    (path,) = trainer.run(cfg, out)
    return path


def test_the_event_file_holds_what_results_json_holds(images, tmp_path):
    path = run(images, tmp_path)
    results = json.loads(path.read_text())
    events = read_events(path.parent / "tensorboard")
    tasks = results["tasks"]
    curve = results["top1_curve"]
    assert [v for _, v in scalars(events, "accuracy/top1_seen")] == pytest.approx(curve)
    assert [s for s, _ in scalars(events, "accuracy/top1_seen")] == list(range(len(tasks)))
    assert [v for _, v in scalars(events, "accuracy/a_bar")] == pytest.approx(
        [np.mean(curve[: t + 1]) for t in range(len(curve))])
    assert scalars(events, "accuracy/a_bar")[-1][1] == pytest.approx(results["average_accuracy"])
    assert scalars(events, "accuracy/forgetting")[-1][1] == pytest.approx(results["forgetting"])
    assert [v for _, v in scalars(events, "accuracy/old_classes")] == pytest.approx([t["old"] for t in tasks])
    for key in ("selected_fraction", "moved_fraction", "updated_fraction_per_step"):
        assert [v for _, v in scalars(events, f"tuning/{key}")] == pytest.approx([t["tuning"][key] for t in tasks])
    # per-step losses: as many as the steps each phase took, and their per-epoch means are the logged epoch losses
    slow = [v for _, v in scalars(events, "loss/train/SLCA")]
    assert len(slow) == sum(t["training"]["steps"] for t in tasks)
    per_epoch = [loss for t in tasks for loss in t["training"]["epoch_losses"]]
    chunks = np.array_split(np.array(slow), len(per_epoch))  # equal batches per epoch
    assert [c.mean() for c in chunks] == pytest.approx(per_epoch, rel=1e-5)
    tuned = [v for _, v in scalars(events, "loss/tuning/MIST")]  # the training epochs, labelled by the preset
    assert len(tuned) == sum(t["tuning"]["steps"] for t in tasks)
    assert len(scalars(events, "loss/tuning/scoring")) > 0 and len(scalars(events, "loss/train/CA")) > 0
    assert len(scalars(events, "train_accuracy/train/SLCA")) == len(tasks) * SLCA["epochs"]
    images_logged = events.Images("accuracy_matrix")
    assert [e.step for e in images_logged] == list(range(len(tasks)))
    assert (images_logged[-1].height, images_logged[-1].width) == (24 * len(tasks), 24 * len(tasks))


def test_a_resumed_run_continues_the_counters(images, tmp_path):
    from utils.errors import RunStopped

    with pytest.raises(RunStopped):
        run(images, tmp_path, stop_after_task=0)
    (run_dir,) = tmp_path.glob("*/*")
    (path,) = trainer.resume(run_dir)
    results = json.loads(path.read_text())
    events = read_events(path.parent / "tensorboard")
    steps = [s for s, _ in scalars(events, "loss/train/SLCA")]
    assert steps == list(range(sum(t["training"]["steps"] for t in results["tasks"])))  # no step written twice
    assert [s for s, _ in scalars(events, "accuracy/top1_seen")] == [0, 1]


def test_no_event_file_without_the_key_and_a_bad_name_is_an_error(images, tmp_path):
    cfg = load_config(None, tiny_overrides(images, "simplecil", spr="none"))
    (path,) = trainer.run(cfg, tmp_path)
    assert not (path.parent / "tensorboard").exists() and "tensorboard_steps" not in json.loads(path.read_text())
    with pytest.raises(ConfigError, match="key 'loggers' has 'wandb'"):
        load_config(None, tiny_overrides(images, "simplecil", loggers=["wandb"]))
