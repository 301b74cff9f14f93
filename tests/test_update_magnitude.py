"""The update-magnitude experiment (exps/update_magnitude/run.py, algorithms.md §14) on tiny synthetic Fashion-MNIST.

- the metrics of algorithms.md §14.4 on a hand-written accuracy matrix;
- the network: 9 conv blocks (a single-conv stem, then 8 residual blocks), 128 features, 2-way heads;
- Frozen leaves the lower layers (weights and BatchNorm statistics) bit-identical, Initialized changes them;
- Reinitialized draws the last block afresh (timm's init) and then trains it as Frozen;
- the gradient probe updates nothing;
- Adaptive follows the gate: tau = 1.01 reproduces Initialized, tau = -1.01 reproduces Frozen, and a
  scripted gate sets each task's regime;
- ``--quick`` end to end writes results.json / results.md with the expected keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import exps.update_magnitude.report as um_report
import exps.update_magnitude.run as um
from models.sparse.gate import FROZEN, INITIALIZED, GateDecision
from utils.datasets import Split


def synthetic_fmnist(per_class: int, seed: int) -> Split:
    """10 classes of uint8 (28, 28) noise with a bright horizontal band at row 2 * class + 3."""
    rng = np.random.default_rng(seed)
    targets = np.repeat(np.arange(10), per_class)
    images = rng.integers(0, 60, size=(len(targets), 28, 28), dtype=np.uint8)
    for i, c in enumerate(targets):
        images[i, 2 * c + 3: 2 * c + 6] = 220
    order = rng.permutation(len(targets))
    return Split(images[order], targets[order].astype(np.int64))


@pytest.fixture(scope="module")
def tiny():
    cfg = um.Config(train_per_class=8, test_per_class=4, epochs=1, batch_size=8, seeds=(0,))
    return cfg, um.make_tasks(synthetic_fmnist(8, 0), synthetic_fmnist(4, 1), cfg)


def lower_state(net: um.MultiHeadNet) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.trunk.state_dict().items() if um.is_lower(k)}


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def test_task_metrics_closed_forms():
    acc = [[90.0, None, None],
           [80.0, 70.0, None],
           [60.0, 65.0, 100.0]]
    m = um.task_metrics(acc)
    assert m["avg_acc"] == pytest.approx((60 + 65 + 100) / 3)
    assert m["task_acc"] == pytest.approx((90 + 70 + 100) / 3)
    assert m["forgetting"] == pytest.approx(((90 - 60) + (70 - 65)) / 2)  # a_kk - a_Mk, not max-based


def test_task_metrics_negative_forgetting_and_one_task():
    assert um.task_metrics([[50.0, None], [70.0, 80.0]])["forgetting"] == pytest.approx(-20.0)
    assert um.task_metrics([[42.0]]) == {"avg_acc": 42.0, "task_acc": 42.0, "forgetting": 0.0}


# ---------------------------------------------------------------------------------------------
# data and network
# ---------------------------------------------------------------------------------------------
def test_tasks_are_consecutive_class_pairs_with_local_labels(tiny):
    cfg, tasks = tiny
    assert len(tasks) == 5
    for t, data in enumerate(tasks):
        assert data.x_train.shape == (16, 1, 28, 28) and data.x_test.shape == (8, 1, 28, 28)
        assert data.x_train.dtype == torch.float32
        assert sorted(data.y_train.unique().tolist()) == [0, 1]
        # the band of class 2t + y is at rows 2(2t + y) + 3 .. + 5
        for x, y in zip(data.x_test, data.y_test):
            assert x[0, 2 * (2 * t + int(y)) + 4].mean() > x[0].mean() + 1.0


def test_network_has_nine_conv_blocks_the_first_a_single_layer_and_two_way_heads():
    from timm.models.resnet import BasicBlock

    net = um.MultiHeadNet(5, 2)
    blocks = [m for m in net.trunk.modules() if isinstance(m, BasicBlock)]
    assert isinstance(net.trunk.conv1, torch.nn.Conv2d) and len(blocks) == 8  # 1 + 8 = 9 conv blocks
    convs = [m for m in net.trunk.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert len(convs) == 1 + 2 * 8
    assert um.last_block(net) is blocks[-1]
    assert net.trunk.num_features == 128 and len(net.heads) == 5
    assert net(torch.zeros(3, 1, 28, 28), 4).shape == (3, 2)


# ---------------------------------------------------------------------------------------------
# regimes
# ---------------------------------------------------------------------------------------------
def trained_on_task0(cfg, tasks) -> um.MultiHeadNet:
    torch.manual_seed(0)
    net = um.MultiHeadNet(5, 2)
    um.train_task(net, 0, tasks[0], INITIALIZED, cfg, torch.Generator().manual_seed(0))
    return net


def test_frozen_keeps_lower_layers_bit_identical(tiny):
    cfg, tasks = tiny
    net = trained_on_task0(cfg, tasks)
    lower, top = lower_state(net), {k: v.clone() for k, v in um.last_block(net).state_dict().items()}
    head0 = net.heads[0].weight.clone()
    um.train_task(net, 1, tasks[1], FROZEN, cfg, torch.Generator().manual_seed(1))
    after = lower_state(net)
    assert all(torch.equal(lower[k], after[k]) for k in lower)  # weights and BatchNorm buffers
    assert any(not torch.equal(top[k], v) for k, v in um.last_block(net).state_dict().items())
    assert torch.equal(net.heads[0].weight, head0)


def test_initialized_changes_lower_layers(tiny):
    cfg, tasks = tiny
    net = trained_on_task0(cfg, tasks)
    lower, head0 = lower_state(net), net.heads[0].weight.clone()
    um.train_task(net, 1, tasks[1], INITIALIZED, cfg, torch.Generator().manual_seed(1))
    after = lower_state(net)
    assert not torch.equal(lower["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(lower["layer1.0.bn1.running_mean"], after["layer1.0.bn1.running_mean"])
    assert torch.equal(net.heads[0].weight, head0)  # old heads never train


def test_reinitialized_draws_the_last_block_afresh_and_keeps_the_lower_layers(tiny):
    cfg, tasks = tiny
    net = trained_on_task0(cfg, tasks)
    lower = lower_state(net)
    um.reinitialize_last_block(net, torch.Generator().manual_seed(5))
    block = um.last_block(net)
    # the network's init, drawn independently: Kaiming normal (fan_out, relu) convs, BN scale 1, shift 0
    want = torch.empty_like(block.conv1.weight)
    torch.nn.init.kaiming_normal_(want, mode="fan_out", nonlinearity="relu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(block.conv1.weight, want)
    assert torch.equal(block.bn1.weight, torch.ones_like(block.bn1.weight))
    assert torch.equal(block.bn2.weight, torch.ones_like(block.bn2.weight)) and not block.bn2.bias.any()
    assert (not block.bn1.running_mean.any()
            and torch.equal(block.bn1.running_var, torch.ones_like(block.bn1.running_var)))
    assert all(torch.equal(lower[k], v) for k, v in lower_state(net).items())
    run = um.run_regime(um.REINITIALIZED, tasks, cfg, 0)
    frozen = um.run_regime(FROZEN, tasks, cfg, 0)
    assert run.regimes == [INITIALIZED] + [um.REINITIALIZED] * 4
    assert [n["lower"] for n in run.update_norm[1:]] == [0.0] * 4
    assert run.acc_matrix[0] == frozen.acc_matrix[0] and run.update_norm[0] == frozen.update_norm[0]  # same task 0
    for fresh, kept in zip(run.update_norm[1:], frozen.update_norm[1:]):  # a fresh block is a large update
        assert fresh["last_block"] > 100 * kept["last_block"] > 0


def test_gradient_probe_updates_nothing(tiny):
    cfg, tasks = tiny
    net = trained_on_task0(cfg, tasks)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    g = um.mean_trunk_gradient(net, 1, tasks[1], batch_size=5)
    assert g.shape == (sum(p.numel() for p in net.trunk.parameters()),) and g.abs().sum() > 0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())


def test_unknown_regime_raises(tiny):
    cfg, tasks = tiny
    with pytest.raises(ValueError, match="regime"):
        um.run_regime("dense", tasks, cfg, 0)
    with pytest.raises(ValueError, match="threshold"):
        um.run_regime(um.ADAPTIVE, tasks, cfg, 0)


@pytest.mark.parametrize("threshold, twin", [(1.01, INITIALIZED), (-1.01, FROZEN)])
def test_adaptive_with_an_extreme_threshold_equals_the_forced_regime(tiny, threshold, twin):
    cfg, tasks = tiny
    adaptive = um.run_regime(um.ADAPTIVE, tasks, cfg, 0, threshold=threshold)
    forced = um.run_regime(twin, tasks, cfg, 0)
    assert adaptive.regimes == forced.regimes == [INITIALIZED] + [twin] * 4
    assert adaptive.similarities[0] is None and all(-1 <= s <= 1 for s in adaptive.similarities[1:])
    assert forced.similarities == [None] * 5
    assert adaptive.acc_matrix == forced.acc_matrix  # the probe changes nothing, so the runs are the same
    assert adaptive.update_norm == forced.update_norm


def test_adaptive_follows_a_scripted_gate(tiny, monkeypatch):
    cfg, tasks = tiny
    script = iter([None, FROZEN, INITIALIZED, FROZEN, INITIALIZED])
    seen = []

    def decide(self, gradient):
        seen.append(gradient.numel())
        regime = next(script)
        return GateDecision(None if regime is None else 0.5, regime or INITIALIZED, 1.0)

    monkeypatch.setattr(um.MagnitudeGate, "decide", decide)
    result = um.run_regime(um.ADAPTIVE, tasks, cfg, 0, threshold=0.0)
    assert result.regimes == [INITIALIZED, FROZEN, INITIALIZED, FROZEN, INITIALIZED]
    assert result.similarities == [None, 0.5, 0.5, 0.5, 0.5]
    assert len(seen) == 5 and len(set(seen)) == 1  # one trunk gradient per task, task 0 included
    for regime, norm in zip(result.regimes, result.update_norm):
        assert (norm["lower"] == 0.0) == (regime == FROZEN) and norm["last_block"] > 0


# ---------------------------------------------------------------------------------------------
# end to end
# ---------------------------------------------------------------------------------------------
def test_quick_run_writes_json_and_markdown(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(um, "load_fmnist", lambda root, download: (synthetic_fmnist(6, 0), synthetic_fmnist(3, 1)))
    assert um.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "results.json").read_text())
    assert {"config", "calibration", "runs", "summary", "paper_table_i", "wall_time_s"} <= set(payload)
    cal = payload["calibration"]
    assert cal["seed"] == 100 and set(cal["similarities"]) == {INITIALIZED, FROZEN}
    pooled = cal["similarities"][INITIALIZED] + cal["similarities"][FROZEN][1:]
    assert len(pooled) == 7 and cal["tau"] == pytest.approx(float(np.median(pooled)))
    assert sorted((r["regime"], r["seed"]) for r in payload["runs"]) == sorted((g, 0) for g in um.REGIMES)
    for r in payload["runs"]:
        assert len(r["acc_matrix"]) == 5 and r["acc_matrix"][0][1] is None and len(r["regimes"]) == 5
        assert r["metrics"] == pytest.approx(um.task_metrics(r["acc_matrix"]))
    for regime in um.REGIMES:
        for key in ("avg_acc", "task_acc", "forgetting"):
            assert set(payload["summary"][regime][key]) == {"values", "mean", "std"}
    assert [c["name"] for c in payload["contrasts"]["avg_acc"]] == [f"{a} - {b}" for a, b in um_report.CONTRASTS]
    by = {r["regime"]: r["metrics"]["avg_acc"] for r in payload["runs"]}
    first = payload["contrasts"]["avg_acc"][0]  # one seed: the difference itself, no interval
    assert first["n"] == 1 and first["mean"] == pytest.approx(by["adaptive"] - by["initialized"])
    before = (tmp_path / "results.md").read_text()
    assert um.main(["--rewrite", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "results.md").read_text() == before
    md = (tmp_path / "results.md").read_text()
    for row in ("| Initialized |", "| Frozen |", "| Reinitialized |", "| Adaptive |", "Avg.Acc / Forgetting",
                "Task.Acc", "tau ="):
        assert row in md
