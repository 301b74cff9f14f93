"""Drift measurements (models/drift.py, issue 25) on constructed cases: a backbone changed in one known tensor gives
the expected group shares and relative changes, rotated class means give the expected cosine distances, a run
measures them per task without changing anything else, and the report reads them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import trainer
from models import build_learner
from models.base import TaskData
from models.drift import EMBEDDINGS, NORMS, FeatureDrift, group_changes, parameter_groups, snapshot
from utils.config import load_config

from test_sparse_tuning import tiny_backbone, tiny_overrides, write_image_folder

CPU = torch.device("cpu")


def test_parameter_groups_of_a_vit():
    groups = parameter_groups(tiny_backbone())
    assert groups["cls_token"] == groups["pos_embed"] == groups["patch_embed.proj.weight"] == EMBEDDINGS
    assert groups["blocks.0.attn.qkv.weight"] == groups["blocks.0.attn.proj.bias"] == "blocks.0.attn"
    assert groups["blocks.1.mlp.fc1.weight"] == groups["blocks.1.mlp.fc2.bias"] == "blocks.1.mlp"
    assert groups["blocks.0.norm1.weight"] == groups["norm.bias"] == NORMS
    assert set(groups.values()) == {EMBEDDINGS, NORMS, "blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"}


def test_one_changed_tensor_carries_the_whole_share_and_its_groups_relative_change():
    model = tiny_backbone()
    before = snapshot(model)
    with torch.no_grad():
        w = model.get_parameter("blocks.1.mlp.fc1.weight")
        w[3, 5] += 0.5
        w[0, 0] -= 1.0  # ||dtheta|| = sqrt(1.25)
    out = group_changes(before, model)
    group = [n for n, g in parameter_groups(model).items() if g == "blocks.1.mlp"]
    start = math.sqrt(sum(float(before[n].double().pow(2).sum()) for n in group))
    total = math.sqrt(sum(float(t.double().pow(2).sum()) for t in before.values()))
    assert out["groups"]["blocks.1.mlp"]["share"] == pytest.approx(1.0)
    assert out["groups"]["blocks.1.mlp"]["relative_change"] == pytest.approx(math.sqrt(1.25) / start, rel=1e-6)
    assert out["relative_change"] == pytest.approx(math.sqrt(1.25) / total, rel=1e-6)
    assert all(g["share"] == 0 and g["relative_change"] == 0 for name, g in out["groups"].items()
               if name != "blocks.1.mlp")
    # two groups: the shares split the squared change
    before = snapshot(model)
    with torch.no_grad():
        model.pos_embed[0, 0, 0] += 3.0
        model.get_parameter("blocks.0.attn.qkv.bias")[7] += 4.0
    out = group_changes(before, model)
    assert out["groups"][EMBEDDINGS]["share"] == pytest.approx(9 / 25)
    assert out["groups"]["blocks.0.attn"]["share"] == pytest.approx(16 / 25)


def test_feature_drift_is_the_cosine_distance_of_the_class_means_per_earlier_task():
    drift = FeatureDrift()
    e = torch.eye(3, dtype=torch.float32)
    # task 0: classes 0, 1 (two test images each); task 1: class 2
    x0 = torch.stack([e[0], e[0], e[1], 2 * e[1]])
    out = drift.update(x0, torch.tensor([0, 0, 1, 1]), known=0, seen=2)
    assert out == {"old_class_feature_drift": [], "old_class_feature_drift_mean": None}
    angle = 0.3  # class 0's mean turns by 0.3 rad in the (e0, e2) plane; class 1's only grows (no drift)
    turned = math.cos(angle) * e[0] + math.sin(angle) * e[2]
    x1 = torch.stack([turned, turned, 5 * e[1], e[1], e[2]])
    out = drift.update(x1, torch.tensor([0, 0, 1, 1, 2]), known=2, seen=3)
    assert out["old_class_feature_drift"] == [pytest.approx((1 - math.cos(angle)) / 2, rel=1e-6)]
    assert out["old_class_feature_drift_mean"] == pytest.approx((1 - math.cos(angle)) / 2, rel=1e-6)
    # task 2: nothing moves; the reference of class 0 is still the mean after task 0, class 2's after task 1
    out = drift.update(torch.cat([x1, e[2:3]]), torch.tensor([0, 0, 1, 1, 2, 2]), known=3, seen=3)
    assert out["old_class_feature_drift"] == [pytest.approx((1 - math.cos(angle)) / 2, rel=1e-6), pytest.approx(0)]
    restored = FeatureDrift()
    restored.load_state_dict(drift.state_dict())
    assert torch.equal(restored.means, drift.means) and restored.bounds == [0, 2, 3, 3]
    with pytest.raises(ValueError, match="3 class means"):
        drift.update(x1, torch.tensor([0, 0, 1, 1, 2]), known=2, seen=3)


def test_a_learners_meter_on_a_backbone_changed_in_one_tensor(tmp_path):
    """SimpleCIL without a tuning phase: after the first task the patch embedding's bias is shifted by hand; the
    meter reports the embeddings' whole share and, for the old classes, the cosine distance of their test means
    computed here by direct forwards (a shift of one output channel of the patch projection; a shift of every channel
    by one constant would vanish in the first LayerNorm)."""
    root = write_image_folder(tmp_path / "images")
    cfg = load_config(None, tiny_overrides(root, "simplecil", spr="none"))
    learner = build_learner(cfg, CPU, 1993)
    data = trainer._data_manager(cfg, 1993)
    tasks = [TaskData(t, *data.task_classes(t), data.n_classes, data.get_dataset(range(*data.task_classes(t)),
                                                                                   "train", "train"),
                      data.get_dataset(range(*data.task_classes(t)), "train", "test"),
                      data.get_dataset(range(0, data.task_classes(t)[1]), "test", "test")) for t in range(2)]

    def means(task) -> torch.Tensor:
        with torch.no_grad():
            xs, ys = zip(*[(x, y) for _, x, y in (task.test[i] for i in range(len(task.test)))])
            f, y = learner.backbone.eval()(torch.stack(xs)).double(), torch.tensor(ys)
        return torch.stack([f[y == c].mean(0) for c in range(task.seen)])

    learner.drift.start()
    learner.learn_task(tasks[0])
    first = learner.drift.finish(tasks[0])
    assert first["relative_change"] == 0 and first["old_class_feature_drift"] == []
    then = means(tasks[0])
    learner.drift.start()
    with torch.no_grad():
        learner.backbone.patch_embed.proj.bias[4] += 0.3
    second = learner.drift.finish(tasks[1])
    assert second["groups"][EMBEDDINGS]["share"] == pytest.approx(1.0)
    now = means(tasks[1])
    want = 1 - torch.nn.functional.cosine_similarity(now[:3], then[:3], dim=1)
    assert second["old_class_feature_drift"] == [pytest.approx(float(want.mean()), rel=1e-4)]
    assert float(want.mean()) > 1e-4


def test_a_run_records_drift_per_task_and_measuring_it_changes_nothing_else(tmp_path):
    root = write_image_folder(tmp_path / "images")
    results = {}
    for measure in (True, False):
        cfg = load_config(None, tiny_overrides(root, "ranpac", spr="mist", mi_epochs=2, measure_drift=measure))
        (path,) = trainer.run(cfg, tmp_path / str(measure))
        results[measure] = json.loads(path.read_text())
    with_drift, without = results[True], results[False]
    assert with_drift["top1_curve"] == without["top1_curve"]
    assert [t["tuning"]["epoch_losses"] for t in with_drift["tasks"]] == \
        [t["tuning"]["epoch_losses"] for t in without["tasks"]]
    assert all("drift" not in t for t in without["tasks"])
    first, second = (t["drift"] for t in with_drift["tasks"])
    assert first["old_class_feature_drift_mean"] is None and second["old_class_feature_drift_mean"] > 0
    for d, t in zip((first, second), with_drift["tasks"]):
        # the whole task's change equals the tuning phase's (RanPAC does not train the backbone)
        assert d["relative_change"] == pytest.approx(t["tuning"]["relative_change"], rel=1e-6)
        assert sum(g["share"] for g in d["groups"].values()) == pytest.approx(1.0)
    from utils.results_file import load_run

    run = load_run(Path(tmp_path / "True").glob("*/*/seed1993/results.json").__next__())
    assert run.values["feature_drift"] == pytest.approx(second["old_class_feature_drift_mean"])
    assert run.values["old_class_accuracy"] == with_drift["tasks"][-1]["old"]
    assert run.values["embedding_share"] == pytest.approx(
        (first["groups"][EMBEDDINGS]["share"] + second["groups"][EMBEDDINGS]["share"]) / 2)
