"""The comparison protocol's statistics and plan (issue 15): paired contrasts, Holm's adjustment, the smallest
detectable effect, equal epochs, learning-rate grids, the fixed ridge lambda per seed, and the PIECE port's keys.

The statistics are checked against values worked out by hand or with independent scipy calls (a one-sample t test,
a Monte-Carlo power estimate), not against the module's own expressions.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy import stats

from utils.contrasts import detectable_effect, holm, paired

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "exps" / "importance"))
import protocol  # noqa: E402
import protocol_tables  # noqa: E402


def test_paired_contrast_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 3.4641, df 2
    c = paired("a - b", [11.0, 12.0, 13.0], [10.0, 10.0, 10.0])
    assert (c.n, c.mean, c.sd, c.positive) == (3, 2.0, 1.0, 3)
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2}
    assert (c.low, c.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert c.p == pytest.approx(stats.ttest_1samp([1.0, 2.0, 3.0], 0.0).pvalue)
    assert c.p == pytest.approx(0.0741799, rel=1e-5)


def test_paired_contrast_edge_cases():
    assert paired("x", [1.0, 2.0], [1.0, 2.0]).p is None  # every difference 0: no test
    same = paired("x", [3.0, 4.0, 5.0], [2.0, 3.0, 4.0])  # every difference 1: no test either (not p = 0)
    assert same.p is None and same.mean == 1.0 and (same.low, same.high) == (1.0, 1.0)
    assert holm([same])[0].holm is None
    one = paired("x", [3.0], [1.0])
    assert one.p is None and one.low is None and one.mean == 2.0
    with pytest.raises(ValueError, match="equal"):
        paired("x", [1.0], [1.0, 2.0])


def test_holm_by_hand():
    # p = 0.01, 0.04, 0.03, 0.2 (m = 4): sorted 0.01, 0.03, 0.04, 0.2 -> 0.04, 0.09, max(0.09, 0.08) = 0.09, 0.2
    cs = [paired(f"c{i}", [0.0, 0.0], [0.0, 0.0]) for i in range(4)]
    cs = [c.__class__(**{**c.__dict__, "p": p}) for c, p in zip(cs, (0.01, 0.04, 0.03, 0.2))]
    got = [c.holm for c in holm(cs)]
    assert got == pytest.approx([0.04, 0.09, 0.09, 0.2])
    none = cs[0].__class__(**{**cs[0].__dict__, "p": None})
    assert holm([none, cs[0]])[0].holm is None and holm([none, cs[0]])[1].holm == pytest.approx(0.01)


def test_detectable_effect_has_the_stated_power():
    """At the returned effect, a simulated paired t test rejects in about 80% of 20,000 draws."""
    sd, n = 1.5, 10
    delta = detectable_effect(sd, n)
    rng = np.random.default_rng(0)
    d = rng.normal(delta, sd, size=(20000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    power = float((np.abs(t) > stats.t.ppf(0.975, n - 1)).mean())
    assert power == pytest.approx(0.8, abs=0.015)
    assert detectable_effect(sd, n, alpha=0.05 / 12) > delta  # a stricter level needs a larger effect
    assert detectable_effect(0.0, n) == 0.0 and math.isinf(detectable_effect(sd, 1))


def test_every_method_gets_the_same_training_epochs():
    """mi_epochs counts the scoring pass of a task-level preset; the phases and per-step presets train every epoch."""
    assert protocol.epoch_keys("mist", 2) == {"mi_epochs": 3}
    assert protocol.epoch_keys("piece_s", 2) == {"mi_epochs": 3}
    assert protocol.epoch_keys("gps", 2) == {"mi_epochs": 3}
    assert protocol.epoch_keys("spg", 2) == {"mi_epochs": 2}
    assert protocol.epoch_keys("sparcl", 2) == {"mi_epochs": 2}
    assert protocol.epoch_keys("acl", 2) == {"warm_epochs": 2}
    assert protocol.epoch_keys("ce_finetune", 2) == {"ablation_epochs": 2}


def test_every_compared_method_has_a_learning_rate_key_and_a_grid():
    from utils.config import load_config

    cfg = load_config(None, [])
    for m in protocol.DEFAULT_METHODS:
        key = protocol.PRESETS.get(m).lr_key
        assert key is not None and hasattr(cfg, key), m
        g = protocol.grid(m, protocol.GRID_SGD, protocol.GRID_ADAM)
        assert g == (protocol.GRID_SGD if m in ("mist", "mist_random", "ce_finetune", "acl", "spg")
                     else protocol.GRID_ADAM), m


def test_plan_config_fixes_lambda_epochs_and_rate():
    base = json.loads((ROOT / "exps/importance/fmnist_ranpac_none.json").read_text())
    cfg = protocol.plan_config(base, protocol.SIZES["demo"], "piece_f", [2001, 2002], 2, 1e-4, {},
                               {"2001": [1e5] * 5, "2002": [1e4] * 5})
    assert cfg["spr"] == "piece_f" and cfg["adam_lr"] == 1e-4 and cfg["mi_epochs"] == 3
    assert cfg["seed"] == [2001, 2002] and cfg["input_size"] == 32 and cfg["ridge_lambdas_by_seed"]["2002"][0] == 1e4
    assert protocol.untuned_lambdas({7: {"tasks": [{"head": {"ridge_lambda": 1e6}}, {"head": {"ridge_lambda": 10.0}}]}}
                                    ) == {"7": [1e6, 10.0]}


def fake_run(a_bar=80.0, a_last=70.0, old=60.0, drift=0.0, change=0.0, a_tt=90.0, forgetting=5.0):
    """What utils.results_file.load_run gives the protocol, for a constructed table."""
    return SimpleNamespace(values={"average_accuracy": a_bar, "last_accuracy": a_last, "old_class_accuracy": old,
                                   "feature_drift": drift, "a_tt": a_tt, "forgetting": forgetting,
                                   "embedding_share": 0.5, "moved_fraction": 0.5, "relative_change": change,
                                   "wall_seconds": 1.0})


def test_informative_only_when_dense_tuning_changes_what_the_host_sees():
    """Issue 25: not the weight change but dense CE's paired change of the old-class accuracy (a 95% interval off 0
    and at least 1 point) or its old-class feature drift (at least 1e-3) decides."""
    seeds = [1, 2, 3]
    rows = {"none": {s: fake_run(old=60 + s) for s in seeds},
            "ce_finetune": {s: fake_run(old=60 + s + 0.1 * (s - 2), drift=2e-4, change=0.5) for s in seeds}}
    lines, summary = protocol.table(rows, ["ce_finetune"], seeds, {"ce_finetune": 1e-3}, {}, "t")
    assert summary["informative"] is False and "NOT informative" in "\n".join(lines)  # a large weight change alone
    rows["ce_finetune"] = {s: fake_run(old=55 + s + 0.1 * s, drift=2e-4) for s in seeds}  # -5 points, tight
    assert protocol.table(rows, ["ce_finetune"], seeds, {}, {}, "t")[1]["informative"] is True
    rows["ce_finetune"] = {s: fake_run(old=60 + s + 3 * (-1) ** s, drift=2e-4) for s in seeds}  # interval spans 0
    assert protocol.table(rows, ["ce_finetune"], seeds, {}, {}, "t")[1]["informative"] is False
    rows["ce_finetune"] = {s: fake_run(old=60 + s, drift=5e-3) for s in seeds}  # the features moved
    lines, summary = protocol.table(rows, ["ce_finetune"], seeds, {}, {}, "t")
    assert summary["informative"] is True and "5.00e-03" in "\n".join(lines)
    assert protocol.table({"none": rows["none"]}, [], seeds, {}, {}, "t")[1]["informative"] is None


def test_table_contrasts_cover_the_verdicts():
    seeds = [1, 2, 3, 4]
    rows = {a: {s: fake_run(a_last=70 + s + bump, old=60 + s + bump) for s in seeds}
            for a, bump in (("none", 0), ("ce_finetune", -2), ("mist", 1), ("mist_random", 0.5),
                            ("mist_noembed", 2))}
    rows["mist"] = {s: fake_run(a_last=71 + s + 0.1 * s, old=61 + s) for s in seeds}
    _, summary = protocol.table(rows, ["ce_finetune", "mist_random", "mist_noembed", "mist"], seeds, {}, {}, "t")
    names = {c["name"] for c in summary["contrasts"]["a_last"]}
    assert names == {"ce_finetune - none", "mist_random - none", "mist_noembed - none", "mist - none",
                     "mist - mist_random", "mist_noembed - mist", "mist - ce_finetune"}
    old = {c["name"]: c for c in summary["contrasts"]["old"]}
    assert old["mist - ce_finetune"]["mean"] == pytest.approx(3.0)
    assert old["mist - none"]["p"] is None  # every difference is 1: no test, not p = 0
    assert summary["detectable_a_last"]["family_size"] == sum(c["p"] is not None
                                                              for c in summary["contrasts"]["a_last"])
    # per contrast: the power calculation on that contrast's own paired sd and n, at Holm's first step
    m = summary["detectable_a_last"]["family_size"]
    each = summary["detectable_a_last"]["per_contrast"]
    tested = {c["name"]: c for c in summary["contrasts"]["a_last"] if c["p"] is not None}
    assert set(each) == set(tested) and "mist - none" in each
    for name, c in tested.items():
        assert each[name] == pytest.approx(detectable_effect(c["sd"], c["n"], alpha=0.05 / m))


def test_spread_by_the_last_tasks_fixed_lambda():
    """RanPAC tables group every arm's |Δ A_B| against none by the seed's last-task ridge lambda (the head is
    rounding-sensitive at a small lambda); tables without fixed lambdas get no such line."""
    seeds = [1, 2, 3]
    lambdas = {"1": [1e5, 10.0], "2": [10.0, 1e5], "3": [1e3, 1e5]}

    def run(a_last):
        r = fake_run(a_last=a_last)
        r.config = {"ridge_lambdas_by_seed": lambdas}
        return r

    rows = {"none": {1: run(70.0), 2: run(71.0), 3: run(72.0)},
            "mist": {1: run(60.0), 2: run(71.5), 3: run(72.0)},
            "ce_finetune": {1: run(75.0), 2: run(70.0)}}
    assert protocol_tables.by_last_lambda(rows, ["mist", "ce_finetune"], seeds) == {10.0: [10.0, 5.0],
                                                                                   1e5: [0.5, 0.0, 1.0]}
    lines, summary = protocol.table(rows, ["mist", "ce_finetune"], seeds, {}, {}, "t")
    assert "lambda 10: median 7.50, max 10.00 (2 arm-seed pairs)" in "\n".join(lines)
    assert summary["abs_delta_a_last_by_last_lambda"] == {"10.0": [10.0, 5.0], "100000.0": [0.5, 0.0, 1.0]}
    plain = {k: {s: fake_run(a_last=r.values["last_accuracy"]) for s, r in v.items()} for k, v in rows.items()}
    assert "abs_delta_a_last_by_last_lambda" not in protocol.table(plain, ["mist"], seeds, {}, {}, "t")[1]


def test_calibration_grows_the_grid_until_the_best_rate_is_interior(monkeypatch, tmp_path):
    """Stage 2 on fake runs whose A-bar peaks at 1e-6: the Adam grid 1e-5..1e-3 grows downwards to 1e-6 and 1e-7 and
    stops there (1e-6 interior); the SGD grid peaking inside stays as it is; an arm at MIST's rate is not run."""
    import jobs

    ran = []
    peak = {"piece_f": 1e-6, "mist": 1e-3}

    def results(job):
        arm = job.cfg["spr"]
        lr = job.cfg[protocol.PRESETS.get(arm).lr_key]
        score = 90 - abs(math.log10(lr) - math.log10(peak[arm]))
        return {s: fake_run(a_bar=score) for s in job.cfg["seed"]}

    monkeypatch.setattr(jobs.Job, "results", results)
    monkeypatch.setattr(protocol, "run_all", lambda js, *a, **k: ran.extend(j.name for j in js) or [])
    args = protocol.parse_args(["--methods", "piece_f", "mist", "mist_random", "--out", str(tmp_path)])
    arms = [protocol.arm_of(m) for m in args.methods]
    base = json.loads((ROOT / "exps/importance/fmnist_ranpac_none.json").read_text())
    cal, failed = protocol.calibrate(tmp_path, {"ranpac": base}, arms, args, {}, {}, {"ranpac": None}, 1, print)
    assert failed == [] and not any("mist_random" in name for name in ran)
    assert sorted(cal.scores[("ranpac", "piece_f")]) == [1e-7, 1e-6, 1e-5, 1e-4, 1e-3]
    assert cal.chosen(("ranpac", "piece_f")) == 1e-6 and cal.interior(("ranpac", "piece_f"))
    assert sorted(cal.scores[("ranpac", "mist")]) == [1e-4, 1e-3, 1e-2] and cal.interior(("ranpac", "mist"))
    peak["piece_f"] = 1e-12  # beyond max_extend (3 per side): reported as not bracketed
    cal, _ = protocol.calibrate(tmp_path, {"ranpac": base}, arms, args, {}, {}, {"ranpac": None}, 1, print)
    assert min(cal.scores[("ranpac", "piece_f")]) == pytest.approx(1e-8) and not cal.interior(("ranpac", "piece_f"))


def test_an_interrupted_job_runs_only_the_seeds_it_did_not_finish(monkeypatch, tmp_path):
    """A job cut after two of its four seeds reruns the other two only (the finished ones are kept), and a finished
    job runs nothing."""
    import jobs

    finished = {1: fake_run(a_bar=80.0), 3: fake_run(a_bar=81.0)}
    monkeypatch.setattr(jobs.Job, "results", lambda job: dict(finished))
    calls = []

    def fake_subprocess_run(cmd, **kwargs):
        calls.append(json.loads(Path(cmd[cmd.index("--config") + 1]).read_text())["seed"])
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(jobs.subprocess, "run", fake_subprocess_run)
    job = jobs.Job(tmp_path, "main", "ranpac_mist", {"spr": "mist", "seed": [1, 2, 3, 4]})
    lines = []
    assert job.run(lines.append, threads=1)
    assert calls == [[2, 4]] and "2 seed(s) done before; running [2, 4]" in lines[0]
    finished.update({2: fake_run(a_bar=79.0), 4: fake_run(a_bar=78.0)})
    assert job.run(lines.append, threads=1) and calls == [[2, 4]] and lines[-1].endswith("done before, skipped")


def test_variant_arms_take_mists_rate_and_their_overrides():
    base = json.loads((ROOT / "exps/importance/fmnist_ranpac_none.json").read_text())
    cfg = protocol.plan_config(base, {}, protocol.arm_of("mist_noembed"), [1], 2, 1e-3, {}, None)
    assert cfg["spr"] == "mist" and cfg["exclude_embeddings"] is True and cfg["mist_lr"] == 1e-3
    assert protocol.arm_of("mist_random").rate_of == protocol.arm_of("mist_noembed").rate_of == "mist"
    assert protocol.arm_of("spu").rate_of is None
    random_noembed = protocol.plan_config(base, {}, protocol.arm_of("mist_random_noembed"), [1], 2, 1e-5, {}, None)
    assert random_noembed["spr"] == "mist_random" and random_noembed["exclude_embeddings"] is True
    assert random_noembed["mist_lr"] == 1e-5 and protocol.arm_of("mist_random_noembed").rate_of == "mist"


def test_one_rate_stage_plans_its_arms_even_outside_methods(tmp_path):
    """--at-rate-methods may name arms the main stage does not run; each gets the one rate and its overrides, on the
    learners of --at-rate-on, in RanPAC's fixed-lambda mode where there are lambdas."""
    args = protocol.parse_args(["--methods", "mist", "--at-rate", "1e-5", "--at-rate-methods", "mist",
                                "mist_random_noembed", "--at-rate-on", "ranpac", "--out", str(tmp_path)])
    assert protocol.check_args(args) is None
    base = json.loads((ROOT / "exps/importance/fmnist_ranpac_none.json").read_text())
    lambdas = {"1": [10.0] * 5}
    jobs = protocol.at_rate_jobs(tmp_path, {"ranpac": base, "simplecil": base}, args, {}, {},
                                 {"ranpac": lambdas, "simplecil": None})
    assert sorted(jobs) == [("ranpac", "mist", "fixed"), ("ranpac", "mist_random_noembed", "fixed")]
    job = jobs[("ranpac", "mist_random_noembed", "fixed")]
    assert job.run_dir == tmp_path / "at_rate" / "ranpac_mist_random_noembed_lr1e-5"
    assert job.cfg["spr"] == "mist_random" and job.cfg["exclude_embeddings"] is True and job.cfg["mist_lr"] == 1e-5
    assert job.cfg["ridge_lambdas_by_seed"] == lambdas and job.cfg["seed"] == args.seeds
    assert protocol.at_rate_jobs(tmp_path, {"ranpac": base}, protocol.parse_args(["--out", str(tmp_path)]), {}, {},
                                 {"ranpac": None}) == {}


# ---- the PIECE port's keys and the fixed lambda per seed ----------------------------------------------------
def test_clipped_adam_scales_the_global_gradient_norm_before_the_step():
    from models.sparse.optim import ClippedAdam

    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1))
    opt = ClippedAdam([{"params": [a]}, {"params": [b]}], 1.0, lr=0.1)
    a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])  # global norm 5
    opt.step()
    assert a.grad.tolist() == pytest.approx([0.6, 0.0]) and b.grad.tolist() == pytest.approx([0.8])


def test_piece_presets_clip_and_the_gate_does_not():
    from models.sparse import build_tuner
    from models.sparse.optim import ClippedAdam
    from test_sparse_tuning import CPU, RANPAC_DEFAULTS, make_cfg, tiny_backbone

    for spr, clipped in (("piece_f", True), ("piece_s", True), ("magnitude_gate", False)):
        tuner = build_tuner(make_cfg(f"spr={spr}"), tiny_backbone(), CPU, 3, RANPAC_DEFAULTS)
        assert isinstance(tuner.make_optimizer()[0], ClippedAdam) == clipped, spr
    tuner = build_tuner(make_cfg("spr=piece_f", "piece_clip_norm=0"), tiny_backbone(), CPU, 3, RANPAC_DEFAULTS)
    assert not isinstance(tuner.make_optimizer()[0], ClippedAdam)


def test_tuning_steps_takes_exactly_that_many_steps():
    from models.sparse import build_tuner
    from test_sparse_tuning import CPU, RANPAC_DEFAULTS, make_cfg, make_loader, make_task, tiny_backbone

    tuner = build_tuner(make_cfg("spr=piece_f", "tuning_steps=5"), tiny_backbone(), CPU, 3, RANPAC_DEFAULTS)
    loader = make_loader(n=16, batch=8)  # 2 batches per epoch: 5 steps = 2 + 2 + 1
    report = tuner.tune(loader, make_task(0, loader))
    assert report["steps"] == 5 and len(report["epoch_losses"]) == 1 + 3


def test_ridge_lambdas_by_seed(tmp_path):
    from utils.config import load_config
    from utils.errors import ConfigError
    from test_sparse_tuning import tiny_overrides, write_image_folder
    import trainer

    root = write_image_folder(tmp_path / "images")
    n_tasks = 2
    cfg = load_config(None, tiny_overrides(root, "ranpac", spr="none",
                                           ridge_lambdas_by_seed={"1993": [10.0] * n_tasks}))
    (path,) = trainer.run(cfg, tmp_path / "out")
    tasks = json.loads(path.read_text())["tasks"]
    assert [(t["head"]["ridge_lambda"], t["head"]["ridge_fixed"]) for t in tasks] == [(10.0, True)] * n_tasks
    bad = load_config(None, tiny_overrides(root, "ranpac", spr="none", ridge_lambdas_by_seed={"7": [10.0] * n_tasks}))
    with pytest.raises(ConfigError, match="no entry for seed 1993"):
        trainer.run(bad, tmp_path / "out2")


def test_protocol_end_to_end_on_a_tiny_vit(tmp_path):
    """The whole protocol on tiny configs: untuned runs, calibration on one learner, fixed- and free-lambda RanPAC
    tables and SimpleCIL's, one main.py process per job; protocol.md and protocol.json hold what the runs say."""
    from test_sparse_tuning import tiny_overrides, write_image_folder

    images = write_image_folder(tmp_path / "images")
    bases = []
    for learner in ("ranpac", "simplecil"):
        cfg = {}
        for item in tiny_overrides(images, learner, use_RP=True):
            k, _, v = item.partition("=")
            try:
                cfg[k] = json.loads(v)
            except json.JSONDecodeError:
                cfg[k] = v
        path = tmp_path / f"{learner}.json"
        path.write_text(json.dumps(cfg))
        bases.append(path)
    out = tmp_path / "out"
    rc = protocol.main(["--out", str(out), "--base", *map(str, bases), "--methods", "piece_s", "ce_finetune",
                        "--seeds", "11", "12", "--calibration-seeds", "10", "--grid-sgd", "1e-4", "1e-3",
                        "--grid-adam", "1e-5", "--epochs", "1", "--size", "none", "--workers", "1",
                        "--calibrate-on", "ranpac", "--max-extend", "0", "--at-rate", "1e-4", "--at-rate-on",
                        "simplecil", "--at-rate-methods", "ce_finetune"])
    assert rc == 0
    report = json.loads((out / "protocol.json").read_text())
    assert set(report["chosen_lr"]["simplecil"]) == {"piece_s", "ce_finetune"}
    assert report["chosen_lr"]["simplecil"] == report["chosen_lr"]["ranpac"]
    assert report["chosen_lr"]["ranpac"]["piece_s"] == 1e-5
    scores = report["calibration"]["ranpac/ce_finetune"]["scores"]
    best = max(scores, key=lambda lr: (scores[lr], -float(lr)))
    assert report["chosen_lr"]["ranpac"]["ce_finetune"] == float(best)
    assert report["calibration"]["ranpac/ce_finetune"]["grid"] == [1e-4, 1e-3]
    assert set(report["tables"]) == {"ranpac/fixed", "ranpac/free", "simplecil/free", "simplecil/free/at_rate"}
    # the one-rate stage: its arm at 1e-4 on the reported seeds, against the main stage's untuned runs
    at_rate = report["tables"]["simplecil/free/at_rate"]
    assert at_rate["seeds"] == [11, 12] and at_rate["arms"]["ce_finetune"]["lr"] == 1e-4
    assert at_rate["arms"]["none"] == report["tables"]["simplecil/free"]["arms"]["none"]
    for path in (out / "at_rate" / "simplecil_ce_finetune_lr1e-4").glob("**/results.json"):
        assert json.loads(path.read_text())["config"]["mist_lr"] == 1e-4
    assert len(list((out / "at_rate").glob("*/**/results.json"))) == 2
    fixed = report["tables"]["ranpac/fixed"]
    assert fixed["seeds"] == [11, 12] and {c["name"] for c in fixed["contrasts"]["a_last"]} == {
        "piece_s - none", "ce_finetune - none"}
    lambdas = report["ridge_lambdas_by_seed"]
    assert set(lambdas) == {"10", "11", "12"}
    # the fixed-lambda runs used each seed's untuned choice
    for path in (out / "main" / "ranpac_piece_s_fixed").glob("**/results.json"):
        data = json.loads(path.read_text())
        assert [t["head"]["ridge_lambda"] for t in data["tasks"]] == lambdas[str(data["seed"])]
        assert all(t["head"]["ridge_fixed"] for t in data["tasks"])
    md = (out / "protocol.md").read_text()
    assert "Holm" in md and "Smallest detectable effect" in md
    # a second call runs nothing again
    runs_before = (out / "protocol.log").read_text().count(": exit ")
    assert protocol.main(["--out", str(out), "--base", *map(str, bases), "--methods", "piece_s", "ce_finetune",
                          "--seeds", "11", "12", "--calibration-seeds", "10", "--grid-sgd", "1e-4", "1e-3",
                          "--grid-adam", "1e-5", "--epochs", "1", "--size", "none", "--workers", "1",
                          "--calibrate-on", "ranpac", "--max-extend", "0"]) == 0
    assert (out / "protocol.log").read_text().count(": exit ") == runs_before


@pytest.mark.parametrize("extra,message", [
    (["--epochs", "0"], "--epochs is 0"), (["--epochs", "-2"], "--epochs is -2"),
    (["--workers", "0"], "--workers is 0"), (["--grid-sgd", "-1"], "--grid-sgd is [-1.0]"),
    (["--grid-adam", "1e-4", "1e-4"], "distinct"), (["--min-drift", "nan"], "--min-drift is nan"),
    (["--min-old-accuracy", "-1"], "--min-old-accuracy"), (["--seeds", "1", "1"], "--seeds is [1, 1]"),
    (["--seeds", "1990"], "both calibration and reported"), (["--grid-step", "1"], "--grid-step"),
    (["--set", "selct_rate=0.2"], "selct_rate"), (["--set", "seed=[1]"], "--set seed"),
    (["--set", "mist_lr=0.1"], "--set mist_lr"), (["--set", "select_rate=2"], "select_rate"),
    (["--methods", "mist", "nonsense"], "unknown arm"), (["--calibrate-on", "slca"], "--calibrate-on slca"),
    (["--at-rate", "0"], "--at-rate is 0.0"), (["--at-rate", "inf"], "--at-rate is inf"),
    (["--at-rate", "1e-5", "--at-rate-methods", "spu", "nonsense"], "--at-rate-methods: unknown arm(s) ['nonsense']"),
    (["--at-rate", "1e-5", "--at-rate-on", "l2p"], "--at-rate-on: no base config of learner(s) ['l2p']"),
])
def test_bad_protocol_arguments_are_refused_before_any_run(tmp_path, capsys, extra, message):
    """Issue 26: every argument is checked up front (exit 2, one line naming it); nothing runs."""
    out = tmp_path / "out"
    assert protocol.main(["--out", str(out), "--methods", "mist", "ce_finetune", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_rates_from_reuses_an_earlier_calibration_without_running_it(monkeypatch, tmp_path, capsys):
    """``--rates-from``: no calibration job runs; every learner takes the rates of the file's calibrated learner
    (``--calibrate-on``), MIST with random scores takes MIST's, and the report carries the earlier curves and
    verdicts. A file without the needed learner, or no protocol.json at all, is refused up front (exit 2)."""
    earlier = {"calibration": {
        "ranpac/mist": {"grid": [1e-7, 1e-6, 1e-5], "scores": {"1e-07": 80.0, "1e-06": 81.5, "1e-05": 79.0}},
        "ranpac/ce_finetune": {"grid": [1e-4, 1e-3], "scores": {"0.0001": 70.0, "0.001": 75.0}},
        "ranpac/spu": {"grid": [1e-5, 1e-4], "scores": {"1e-05": 70.0, "0.0001": 60.0}}}}  # an arm not run here
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    planned = []
    monkeypatch.setattr(protocol, "run_all", lambda js, *a, **k: planned.extend(js) or [])
    out = tmp_path / "out"
    assert protocol.main(["--out", str(out), "--methods", "mist", "mist_random", "ce_finetune", "--calibrate-on",
                          "ranpac", "--rates-from", str(path), "--no-free-lambda"]) == 0
    assert {j.stage for j in planned} == {"untuned", "main"}
    rate, lr_key = {}, {name: protocol.PRESETS.get(name).lr_key for name in ("mist", "mist_random", "ce_finetune")}
    for j in planned:
        if j.stage == "main" and j.cfg["spr"] != "none":
            rate[(j.cfg["model_name"], j.cfg["spr"])] = j.cfg[lr_key[j.cfg["spr"]]]
    assert rate == {(ln, arm): lr for ln in ("ranpac", "simplecil")
                    for arm, lr in (("mist", 1e-6), ("mist_random", 1e-6), ("ce_finetune", 1e-3))}
    report = json.loads((out / "protocol.json").read_text())
    assert report["calibration"]["ranpac/mist"] == {"grid": [1e-7, 1e-6, 1e-5], "chosen": 1e-6, "interior": True,
                                                    "scores": {"1e-07": 80.0, "1e-06": 81.5, "1e-05": 79.0}}
    assert report["calibration"]["ranpac/ce_finetune"]["interior"] is False
    assert "- ranpac, SPU: **1e-05: 70.00**, 0.0001: 60.00 (**not bracketed**" in (out / "protocol.md").read_text()
    for extra, message in ((["--rates-from", str(tmp_path / "none.json")], "not a readable protocol.json"),
                           (["--rates-from", str(path)], "no calibration for learner(s) ['simplecil']")):
        assert protocol.main(["--out", str(tmp_path / "bad"), "--methods", "mist", *extra]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "bad").exists()
