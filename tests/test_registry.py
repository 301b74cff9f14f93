"""Registries, component config keys, README's generated tables, named random streams and the one training loop
(issue 12)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from models.loop import DenseStep, FlatGradients, TuningLoop, cross_entropy
from utils.config import (CORE_FIELDS, FIELDS, README_END, README_START, config_keys, key, load_config,
                          markdown_tables)
from utils.errors import ConfigError, NonFiniteError
from utils.registry import ALL, LEARNERS, PRESETS, Registry
from utils.runtime import make_generator, stream_seed
from utils.loaders import Batch

REPO = Path(__file__).resolve().parents[1]

#: registry -> (config key that names an entry, a valid name)
LOOKUPS = {"learner": ("model_name", "ranpac"), "preset": ("spr", "mist"), "estimator": ("importance", "fisher"),
           "scope": ("selection_scope", "global"), "loss": ("scoring_loss", "ce"),
           "optimizer": ("tuning_optimizer", "adam"), "dataset": ("dataset", "fmnist")}


@pytest.mark.parametrize("registry", sorted(ALL))
def test_an_unknown_name_in_any_registry_is_one_clear_config_error(registry):
    reg = ALL[registry]
    good = reg.names()[0]
    typo = good[:-1] + ("x" if good[-1] != "x" else "y")
    with pytest.raises(ConfigError) as err:
        reg.get(typo, "cfg.json")
    message = str(err.value)
    assert message.startswith(f"cfg.json: key '{reg.key}' has value {typo!r}; expected a registered")
    assert all(name in message for name in reg.names()) and f"did you mean '{good}'" in message
    assert reg.get(good) is not None


@pytest.mark.parametrize("registry", sorted(LOOKUPS))
def test_the_config_validates_every_registered_name_where_it_is_looked_up(registry):
    config_key, good = LOOKUPS[registry]
    extra = ["spr=mist"] if config_key in ("importance", "selection_scope", "scoring_loss", "tuning_optimizer") else []
    assert getattr(load_config(None, [*extra, f"{config_key}={good}"]), config_key) == good
    with pytest.raises(ConfigError, match=rf"--set {config_key}=nope: key '{config_key}' has value 'nope'; "
                                          r"expected a registered"):
        load_config(None, [*extra, f"{config_key}=nope"])


def test_aliases_and_extras():
    assert LEARNERS.get("ranpac_mist") is LEARNERS.get("ranpac") and LEARNERS.canonical("simplecil_mist") == "simplecil"
    assert "none" in PRESETS.accepted() and "none" not in PRESETS.names()
    reg = Registry("thing", "thing_key")
    reg.register("a", 1, aliases=("b",))
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("b", 2)


def test_a_component_declares_its_own_keys():
    @config_keys("Test component")
    class Keys:
        zz_test_rate: float = key(0.25, "A test rate.", gt=0, le=1)

    try:
        cfg = load_config(None, ["zz_test_rate=0.5"])
        assert cfg.zz_test_rate == 0.5 and cfg.to_dict()["zz_test_rate"] == 0.5
        assert load_config(None).zz_test_rate == 0.25 and "zz_test_rate" in FIELDS
        assert cfg.replace(zz_test_rate=0.75).zz_test_rate == 0.75 and cfg.zz_test_rate == 0.5
        with pytest.raises(ConfigError, match="key 'zz_test_rate' has value 2.0; expected a value <= 1"):
            load_config(None, ["zz_test_rate=2.0"])
        with pytest.raises(ValueError, match="declared twice"):
            config_keys("again")(type("Again", (), {"__annotations__": {"zz_test_rate": "float"},
                                                     "zz_test_rate": key(0.1, "x")}))
        assert "`zz_test_rate` | `0.25` | A test rate. |" in markdown_tables()
    finally:
        from utils import config

        config.EXTENSION_FIELDS.pop("zz_test_rate")
        config.KEY_GROUPS[:] = [g for g in config.KEY_GROUPS if g.title != "Test component"]


def test_component_keys_live_with_their_component():
    from utils import config

    owners = {g.title.split(" (")[0]: g.names for g in config.KEY_GROUPS}
    assert "use_RP" in owners["RanPAC"] and "gate_threshold" in owners["Update-magnitude control, spr magnitude_gate"]
    assert "top_ratio" in owners["PIECE"] and not {"use_RP", "M", "top_ratio"} & set(CORE_FIELDS)


def test_readme_key_tables_are_the_generated_ones():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    region = text.split(README_START, 1)[1].split(README_END, 1)[0]
    assert region.strip() == markdown_tables().strip(), "run: python -m utils.config --write-readme"
    for name in FIELDS:  # every key, 'precision' included, has a row
        assert f"| `{name}` |" in region, name


def test_preset_metadata_feeds_the_report_and_the_runner():
    from exps.importance.run import METHODS
    from utils.results_file import preset_keys
    from utils.runs import method_order

    assert method_order()[0] == "none" and method_order()[-1] == "mist"
    assert set(method_order()) == {"none", *PRESETS.names()}
    assert METHODS == ("none", "ce_finetune", "acl", "mist_random", "piece_f", "piece_s", "spu", "gps", "spg", "sparcl",
                       "magnitude_gate", "mist")
    assert preset_keys()["top_ratio"] == ["piece_f", "piece_s"] and "magnitude_gate" in preset_keys()["adam_lr"]


# ---------------------------------------------------------------------------------------------
# random streams by name
# ---------------------------------------------------------------------------------------------
def test_streams_are_keyed_by_name_and_the_old_ones_keep_their_seeds():
    # the seeds every pinned result was computed with (position in the old list, and the later-stream offset)
    for position, name in enumerate(("loader", "drop", "augment", "ablation_mask", "projection")):
        assert stream_seed(1993, name) == 1993 * 5 + position
    assert stream_seed(1993, "importance") == 2**40 + 1993
    new = {stream_seed(1993, n) for n in ("slca_alignment", "a", "b")} | {stream_seed(1994, "a")}
    assert len(new) == 4 and all(0 <= s < 2**63 for s in new)
    assert stream_seed(7, "x") == stream_seed(7, "x")
    a = torch.rand(3, generator=make_generator(1, stream="x"))
    assert torch.equal(a, torch.rand(3, generator=make_generator(1, stream="x")))


# ---------------------------------------------------------------------------------------------
# the training loop
# ---------------------------------------------------------------------------------------------
def _batches(n: int = 3, seed: int = 0) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    return [Batch(torch.arange(4), torch.randn(4, 3, generator=gen), torch.randint(0, 2, (4,), generator=gen))
            for _ in range(n)]


def test_loop_steps_like_a_plain_sgd_loop_and_leaves_gradients_detached():
    torch.manual_seed(0)
    net, ref = nn.Linear(3, 2), nn.Linear(3, 2)
    ref.load_state_dict(net.state_dict())
    data = _batches()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    flat = FlatGradients(dict(net.named_parameters()))
    losses, steps, _ = TuningLoop(torch.device("cpu")).run(
        data, range(1, 3), lambda b: cross_entropy(net(b.x), b.y, b), opt, grads=[flat], module=net)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    ref_losses = []
    for _ in range(2):
        total = 0.0
        for b in data:
            ref_opt.zero_grad()
            loss = nn.functional.cross_entropy(ref(b.x), b.y)
            loss.backward()
            ref_opt.step()
            total += float(loss.detach())
        ref_losses.append(total / len(data))
    assert steps == 6 and losses == pytest.approx(ref_losses, rel=1e-6)
    for p, q in zip(net.parameters(), ref.parameters()):
        assert torch.equal(p, q) and p.grad is None


def test_loop_stops_on_a_nan_loss_naming_task_epoch_and_step():
    net = nn.Linear(3, 2)
    calls = {"n": 0}

    def forward(b):
        calls["n"] += 1
        loss = cross_entropy(net(b.x), b.y, b)
        return loss * float("nan") if calls["n"] == 5 else loss

    with pytest.raises(NonFiniteError, match="task 4, epoch 2/2, step 1"):
        TuningLoop(torch.device("cpu")).run(_batches(), range(1, 3), forward, None,
                                            grads=[FlatGradients(dict(net.named_parameters()))], where="task 4")


def test_a_rule_must_leave_the_buffers_zero():
    net = nn.Linear(3, 2)
    flat = FlatGradients(dict(net.named_parameters()))
    seen = []

    class Spy(DenseStep):
        def before_step(self, grads):
            seen.append(grads[0].buffer.clone())

    TuningLoop(torch.device("cpu")).run(_batches(2), [1], lambda b: cross_entropy(net(b.x), b.y, b), None,
                                        grads=[flat], rule=Spy())
    # each step's gradient is that batch's alone (the buffer was zero before its backward)
    for buffer, batch in zip(seen, _batches(2)):
        net.zero_grad()
        cross_entropy(net(batch.x), batch.y, batch).backward()
        torch.testing.assert_close(buffer[:-1], torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
