"""The per-learner ``spr`` dispatch of the official code (algorithms.md §5; models/sparse/__init__.py ``tuner_for``).

SimpleCIL-MIST does not dispatch ``cerun`` and RanPAC-MIST does not dispatch ``run``: both run the plain
learner with no tuning phase (a warning says so). ``ce_finetune`` (ours) is dense CE fine-tuning for both,
exactly what SimpleCIL's ``run`` does. CPU, tiny random ViT (tests/test_sparse_tuning.py helpers).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import trainer
from models import build_learner
from models.sparse import build_tuner, tuner_for
from models.sparse.tuner import SparseTuner
from utils.config import load_config
from utils.registry import LEARNERS, PRESETS

from test_sparse_tuning import CPU, make_cfg, make_loader, make_task, tiny_backbone, tiny_overrides, write_image_folder

NOT_DISPATCHED = [("simplecil", "cerun"), ("simplecil_mist", "cerun"), ("ranpac", "run"), ("ranpac_mist", "run")]
CE_TUNED = [("simplecil", "run"), ("ranpac", "cerun"), ("simplecil", "ce_finetune"), ("ranpac", "ce_finetune"),
            ("simplecil_mist", "ce_finetune"), ("ranpac_mist", "cerun")]
WARNING = "is not dispatched by the official {} code, so no tuning phase runs; use spr 'ce_finetune'"


@pytest.fixture(scope="module")
def cub_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("dispatch_images"))


def tiny_cfg(root: Path, model_name: str, spr: str):
    return load_config(None, tiny_overrides(root, model_name, spr=spr, ablation_epochs=1))


def run_results(cfg, out: Path) -> tuple[dict, Path]:
    (path,) = trainer.run(cfg, out)
    return json.loads(path.read_text()), path


def test_ce_finetune_is_a_config_choice():
    assert "ce_finetune" in PRESETS
    assert make_cfg("spr=ce_finetune").tuning == "ce_finetune"


@pytest.mark.parametrize("learner,spr", NOT_DISPATCHED)
def test_undispatched_spr_builds_no_tuner_and_warns(caplog, learner, spr):
    official = "SimpleCIL-MIST" if learner.startswith("simplecil") else "RanPAC-MIST"
    with caplog.at_level(logging.WARNING, logger="models.sparse"):
        assert tuner_for(spr, LEARNERS.get(learner)) is None
        assert build_tuner(make_cfg(f"spr={spr}", f"model_name={learner}"), tiny_backbone(), CPU, 0, {},
                           learner=LEARNERS.get(learner)) is None
    warnings = [r for r in caplog.records if r.name == "models.sparse" and r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert f"spr '{spr}' " + WARNING.format(official) in warnings[0].getMessage()
    # the learner builds no tuner either
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="models.sparse"):
        model = build_learner(make_cfg(f"spr={spr}", f"model_name={learner}"), CPU, 0, tiny_backbone())
    assert model.tuner is None
    assert any(WARNING.format(official) in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("learner,spr", CE_TUNED)
def test_dispatched_ce_spr_builds_the_ce_tuner_and_trains(caplog, learner, spr):
    cfg = make_cfg(f"spr={spr}", f"model_name={learner}", "ablation_epochs=1")
    with caplog.at_level(logging.WARNING, logger="models.sparse"):
        model = build_learner(cfg, CPU, 0, tiny_backbone())
    assert not [r for r in caplog.records if r.name == "models.sparse"]
    tuner = model.tuner
    assert isinstance(tuner, SparseTuner) and tuner.policy == spr and not tuner.recipe.selective
    before = {n: p.detach().clone() for n, p in tuner.network.convnet.named_parameters()}
    loader = make_loader(n=16, batch=8)
    report = tuner.tune(loader, make_task(0, loader))
    assert report["method"] == spr and report["updated_fraction_per_step"] > 0.99  # dense
    assert any(not torch.equal(p.detach(), before[n]) for n, p in tuner.network.convnet.named_parameters())


@pytest.mark.parametrize("learner", ["simplecil", "ranpac_mist"])
@pytest.mark.parametrize("spr", ["mist", "rand", "l2", "grad"])
def test_other_official_values_dispatched_by_both(learner, spr):
    assert tuner_for(spr, LEARNERS.get(learner)) is SparseTuner


def test_no_learner_dispatches_every_name():
    for spr in ("rand", "l2", "grad", "run", "cerun", "ce_finetune"):
        assert tuner_for(spr, None) is SparseTuner
    assert tuner_for("none", LEARNERS.get("ranpac")) is None and tuner_for(None, LEARNERS.get("simplecil")) is None


@pytest.mark.parametrize("learner,spr", [("simplecil_mist", "cerun"), ("ranpac_mist", "run")])
def test_undispatched_run_equals_plain_learner(cub_root, tmp_path, learner, spr):
    plain, _ = run_results(tiny_cfg(cub_root, learner, "none"), tmp_path / "plain")
    res, path = run_results(tiny_cfg(cub_root, learner, spr), tmp_path / "undispatched")
    assert res["complete"] is True and len(res["tasks"]) == 2
    assert all("tuning" not in task for task in res["tasks"])
    assert res["accuracy_matrix"] == plain["accuracy_matrix"]
    assert res["config"]["spr"] == spr
    stem = f"{learner}_{spr}_cub"
    assert stem in path.parts  # runs/<model_name>_<spr>_<dataset>/<time>/seed<seed>/results.json
    (log,) = path.parent.glob(f"{stem}_seed1993.log")
    official = "SimpleCIL-MIST" if learner.startswith("simplecil") else "RanPAC-MIST"
    assert f"spr '{spr}' " + WARNING.format(official) in log.read_text()


def test_ce_finetune_equals_simplecil_run(cub_root, tmp_path):
    old, _ = run_results(tiny_cfg(cub_root, "simplecil_mist", "run"), tmp_path / "run")
    new, _ = run_results(tiny_cfg(cub_root, "simplecil_mist", "ce_finetune"), tmp_path / "ce_finetune")
    assert new["accuracy_matrix"] == old["accuracy_matrix"]
    for a, b in zip(old["tasks"], new["tasks"]):
        assert a["tuning"]["method"] == "run" and b["tuning"]["method"] == "ce_finetune"
        assert a["tuning"]["epoch_losses"] == b["tuning"]["epoch_losses"]
        assert a["tuning"]["updated_fraction_per_step"] == b["tuning"]["updated_fraction_per_step"]
        assert a["top1"] == b["top1"]


def test_ranpac_ce_finetune_and_cerun_tune(cub_root, tmp_path):
    cerun, _ = run_results(tiny_cfg(cub_root, "ranpac_mist", "cerun"), tmp_path / "cerun")
    fine, _ = run_results(tiny_cfg(cub_root, "ranpac_mist", "ce_finetune"), tmp_path / "ce_finetune")
    for res, spr in ((cerun, "cerun"), (fine, "ce_finetune")):
        assert [t["tuning"]["method"] for t in res["tasks"]] == [spr, spr]
    assert fine["accuracy_matrix"] == cerun["accuracy_matrix"]


# ---------------------------------------------------------------------------------------------
# SimpleCIL's ablations train on the learner's full cosine head (issue 6 item 0, algorithms.md §5)
# ---------------------------------------------------------------------------------------------
def test_simplecil_l2_from_task_1_gives_the_official_dead_loss(tmp_path):
    """Old rows hold the prototypes, new rows are zero: the |theta| threshold over the whole fc tensor never
    selects the zero rows, so the new-class logits stay 0, the loss stays ln(new classes) and the backbone
    gets no CE gradient (without weight decay and momentum its weights do not move)."""
    import math

    from models.simplecil import SimpleCIL
    from models.sparse.optim import SGDSettings
    from models.sparse.tuner import SparseTuner
    from tests.test_sparse_tuning import make_cfg, make_loader, make_task, tiny_backbone

    cfg = make_cfg("spr=l2", "model_name=simplecil", "ablation_epochs=2", "num_workers=0")
    learner = SimpleCIL(cfg, tiny_backbone(), torch.device("cpu"), seed=3)
    learner.tuner = SparseTuner(cfg, learner.backbone, torch.device("cpu"), 3, learner.DEFAULTS,
                                    sgd=SGDSettings(momentum=0.0, weight_decay=0.0))
    task0 = make_task(0, make_loader())
    learner.learn_task(task0)
    assert learner.prototypes.shape == (4, learner.feature_dim)
    rows0 = learner.prototypes.clone()
    before = {n: p.detach().clone() for n, p in learner.backbone.named_parameters()}
    loader1 = make_loader(seed=1, first=4)
    task1 = make_task(1, loader1)
    report = learner.learn_task(task1)
    assert report["tuning"]["epoch_losses"] == pytest.approx([math.log(4)] * 2, rel=1e-6)
    for n, p in learner.backbone.named_parameters():
        assert torch.equal(p.detach(), before[n]), n
    torch.testing.assert_close(learner.prototypes[:4], rows0)  # no decay: the old rows come back unchanged


def test_simplecil_ablation_head_spans_every_seen_class(tmp_path):
    from models.simplecil import SimpleCIL
    from tests.test_sparse_tuning import make_cfg, make_loader, make_task, tiny_backbone

    cfg = make_cfg("spr=rand", "model_name=simplecil", "ablation_epochs=1")
    learner = SimpleCIL(cfg, tiny_backbone(), torch.device("cpu"), seed=3)
    shapes = []
    real = learner.tuner.make_head

    def spy(task, head_rows=None):
        head = real(task, head_rows)
        shapes.append(tuple(head.weight.shape))
        return head

    learner.tuner.make_head = spy
    for t in range(2):
        learner.learn_task(make_task(t, make_loader(seed=t, first=4 * t)))
    assert shapes == [(4, learner.feature_dim), (8, learner.feature_dim)]
    assert learner.tuning_head_rows(make_task(2, make_loader())).shape == (8, learner.feature_dim)
    cfg_ours = make_cfg("spr=ce_finetune", "model_name=simplecil")
    assert SimpleCIL(cfg_ours, tiny_backbone(), torch.device("cpu"), seed=3).tuning_head_rows(
        make_task(0, make_loader())) is None  # ce_finetune keeps the new-class head
