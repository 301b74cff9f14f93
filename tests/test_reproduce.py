"""``python -m utils.reproduce`` (issue 28): tables derived from the shipped configs, the counted cost of a run, the
plan, and a tiny demo table run end to end, interrupted and resumed to the same table."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from torch import nn

from utils import reproduce
from utils.config import config_from_dict
from utils.reproduce_cost import count_cost, peak_bytes, run_work, task_classes

REPO = Path(__file__).resolve().parents[1]


def test_the_tables_are_the_configs_that_compute_them():
    main = reproduce.select_jobs("main")
    assert len(main) == 60  # six hosts, without and with MIST, five data sets, one seed each
    assert {(j.learner, j.cfg.spr) for j in main} == {(h, s) for h in ("ranpac", "simplecil", "slca", "ease", "l2p",
                                                                        "dualprompt") for s in ("none", "mist")}
    assert {j.cfg.dataset for j in main} == set(reproduce.PAPER_DATASETS)
    rivals = reproduce.select_jobs("rivals", datasets=["cub"])
    assert {j.cfg.spr for j in rivals} == {"none", "mist", "acl", "gps", "spu", "spg", "sparcl"}
    assert all(j.cfg.convnet_type == reproduce.PAPER_BACKBONE for j in rivals)  # not the IN-1k ACL configs
    assert [j.seed for j in reproduce.select_jobs("demo", hosts=["ranpac"], seeds=[1, 2])] == [1, 2]


@pytest.mark.parametrize("argv, message", [
    (["nope", "--out", "x"], "unknown table 'nope'"),
    (["main", "--out", "x", "--datasets", "cifar"], "--datasets: unknown name(s) cifar"),
    (["main", "--out", "x", "--hosts", "ranpak"], "--hosts: unknown name(s) ranpak"),
    (["main", "--out", "x", "--nproc", "0"], "--nproc is 0"),
    (["demo", "--out", "x", "--datasets", "cub"], "has no config left"),
])
def test_bad_arguments_exit_2_with_one_line(argv, message, capsys):
    assert reproduce.run_tool(reproduce.main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err


def test_count_cost_of_a_two_layer_mlp_by_hand():
    """Linear(a, b) -> ReLU -> Linear(b, c), input without gradient: forward 2ab + 2bc FLOPs; backward 2ab (the first
    weight's gradient only) + 4bc (the second's weight and input gradients); saved for backward: the input (a floats)
    and the ReLU's output (b floats, saved by ReLU and by the second Linear: one storage)."""
    a, b, c = 6, 5, 3
    cost = count_cost(lambda: nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Linear(b, c)), (a,))
    assert cost.forward_flops == 2 * a * b + 2 * b * c
    assert cost.backward_flops == 2 * a * b + 4 * b * c
    assert cost.activation_bytes == 4 * (a + b)
    assert cost.parameters == a * b + b + b * c + c


def test_a_vit_forward_is_counted_as_the_matmul_formula():
    """timm ViT, N tokens of width D, L blocks: patch embedding 2 P (3 p^2) D, per block 24 N D^2 (qkv, projection,
    4x MLP) + 4 N^2 D (scores and weighted values). Backward: twice the forward (input and weight gradients), but
    the patch embedding's input needs no gradient, so that layer counts once."""
    from utils.reproduce_cost import backbone_cost

    side, patch, dim, depth = 32, 16, 32, 2
    kwargs = {"patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": 2}
    cost = backbone_cost("vit_base_patch16_224", side, json.dumps(kwargs))
    patches = (side // patch) ** 2
    n = patches + 1
    embed = 2 * patches * 3 * patch**2 * dim
    assert cost.forward_flops == embed + depth * (24 * n * dim**2 + 4 * n * n * dim)
    assert cost.backward_flops == 2 * cost.forward_flops - embed


def test_run_work_counts_each_phase_by_hand():
    """fmnist (10 classes) in 5 tasks of 2, MIST with 3 epochs and two views on every task: 1000 train images go
    3 x 2 times through forward and backward; forward only: 1000 for the head updates and, per task, the seen
    classes' test images twice (evaluation and drift): 2 x 100 x (2 + 4 + 6 + 8 + 10) / 10."""
    cfg = config_from_dict({"dataset": "fmnist", "init_cls": 2, "increment": 2, "model_name": "simplecil",
                            "spr": "mist", "mi_epochs": 3})
    assert task_classes(2, 2, 10) == [2, 2, 2, 2, 2] and task_classes(3, 4, 10) == [3, 4, 3]
    work = run_work(cfg, 1000, 100)
    assert work.trained == pytest.approx(6000) and work.forward_only == pytest.approx(1000 + 600)
    assert work.step_images == 64  # SimpleCIL's official batch 32, two views
    none = run_work(cfg.replace(spr="none", measure_drift=False), 1000, 100)
    assert none.trained == 0 and none.forward_only == pytest.approx(1000 + 300) and none.step_images == 0
    slca = run_work(config_from_dict({"dataset": "fmnist", "init_cls": 2, "increment": 2, "model_name": "slca",
                                      "spr": "none", "epochs": 4}), 1000, 100)
    assert slca.trained == pytest.approx(4000)  # the slow learner's 4 epochs on every task


def test_peak_memory_is_parameters_gradients_state_and_saved_activations():
    from utils.reproduce_cost import BackboneCost, Work

    cost = BackboneCost(1.0, 2.0, activation_bytes=1000.0, parameters=10)
    assert peak_bytes(cost, Work(1, 1, 8, "mist_sgd")) == 4 * 10 * 3 + 1000 * 8  # weights, grads, momentum
    assert peak_bytes(cost, Work(1, 1, 8, "adam")) == 4 * 10 * 4 + 1000 * 8
    assert peak_bytes(cost, Work(0, 1, 0, None)) == 4 * 10


@pytest.fixture(scope="module")
def tiny_tree(tmp_path_factory) -> Path:
    """A tree whose only configs are the shipped RanPAC ViT demos (run small by ``--standin``)."""
    root = tmp_path_factory.mktemp("tree")
    for name in ("fmnist_ranpac.json", "fmnist_ranpac_mist.json"):
        (root / "exps/demo_vit").mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "exps/demo_vit" / name, root / "exps/demo_vit" / name)
    return root


def _means(path: Path) -> dict:
    with path.open() as f:
        return {(r["row"], r["metric"]): (r["mean"], r["n"]) for r in csv.DictReader(f)}


def test_a_tiny_demo_table_end_to_end_then_interrupted_and_resumed_to_the_same_table(tiny_tree, tmp_path, capsys):
    args = ["demo_vit", "--root", str(tiny_tree), "--standin", "--set", "progress=false"]
    plain = tmp_path / "plain"
    assert reproduce.main([*args, "--out", str(plain)]) == 0
    table = (plain / "demo_vit.md").read_text()
    assert "| RanPAC |" in table and "| RanPAC + MIST |" in table and "Stand-in runs" in table
    assert "/ ref " in table and "## Sources of the references" in table  # the ledger's entries of these configs
    means = _means(plain / "demo_vit.csv")
    assert all(n == "1" and mean for mean, n in means.values())

    cut = tmp_path / "cut"
    assert reproduce.main([*args, "--out", str(cut), "--set", "stop_after_task=0"]) == 0
    capsys.readouterr()
    assert reproduce.main(["demo_vit", "--root", str(tiny_tree), "--out", str(cut), "--plan"]) == 0
    assert capsys.readouterr().out.count("partial (1/2)") == 2
    assert "no run (seed 1993: partial)" in (cut / "demo_vit.md").read_text()
    assert reproduce.main([*args, "--out", str(cut)]) == 0  # resumes both
    assert _means(cut / "demo_vit.csv") == means
    assert len(list(cut.glob("runs/*/*/seed1993/*/*"))) == 2  # one run folder each: resumed, not restarted
    capsys.readouterr()
    assert reproduce.main([*args, "--out", str(cut)]) == 0
    assert capsys.readouterr().out.count(": done") == 2  # nothing left to run


def test_the_plan_names_missing_data_and_counts_the_cost(tmp_path, capsys):
    """The main table's RanPAC runs on CUB, data absent: both rows say so (nominal size), the loader's message with
    what to download is printed once, and the cost follows the counted work: MIST's row trains 20 epochs x 2 views
    of the 9,430 training images."""
    assert reproduce.main(["main", "--out", str(tmp_path), "--plan", "--hosts", "ranpac", "--datasets", "cub",
                           "--set", f"data_root={tmp_path / 'nowhere'}"]) == 0
    out = capsys.readouterr().out
    assert out.count("| missing | MISSING (nominal size) |") == 2
    assert out.count("data set cub is missing:") == 1 and "CUB-200-2011" in out and "How the cost is counted" in out
    assert "GPU-hours in all at 40% of 156 TFLOP/s" in out
    mist = next(line for line in out.splitlines() if "exps/ranpac/cub.json" in line)
    assert "| 377,200 / " in mist  # 9,430 x 20 x 2
    none = next(line for line in out.splitlines() if "exps/ranpac_baseline/cub.json" in line)
    assert "| 0 / " in none
