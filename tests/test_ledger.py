"""The results ledger (issue 15, item 4): every shipped config has an entry, docs/results.md is generated from it, the
official MIST logs' rows are there, and ``--against-ledger`` prints a run beside its reference per task."""

from __future__ import annotations

import json

import pytest

import trainer
from utils import ledger as L
from utils import report
from utils.config import load_config

from test_sparse_tuning import tiny_overrides, write_image_folder


def test_every_shipped_config_has_an_entry_and_the_ledger_is_valid():
    data = L.load()
    assert set(L.shipped_configs()) == set(data["configs"])
    with_ref = [c for c, e in data["configs"].items() if e.get("reference")]
    assert len(with_ref) >= 30


def test_docs_results_md_is_generated_from_the_ledger():
    assert L.DOCS.read_text() == L.markdown(L.load()), "run: python -m utils.ledger --write-docs"


def test_the_official_mist_imagenet_r_logs_and_simplecil_rows():
    configs = L.load()["configs"]
    ranpac = configs["exps/ranpac/imagenetr.json"]["reference"]
    assert ranpac["kind"] == "official_log" and ranpac["seeds"] == [1993]
    assert ranpac["curve"] == [92.89, 90.23, 87.49, 86.51, 83.89, 82.83, 82.65, 81.91, 81.65, 81.00]
    assert round(ranpac["a_bar"], 2) == 85.10 and ranpac["a_last"] == 81.00
    simple = configs["exps/simplecil/imagenetr.json"]["reference"]
    assert simple["curve"][-1] == 75.20 and round(simple["a_bar"], 2) == 80.95
    alone = {ds: configs[f"exps/simplecil_baseline/{ds}.json"]["reference"]["a_last"]
             for ds in ("cifar", "cub", "imagenetr", "imageneta")}
    assert alone == {"cifar": 81.26, "cub": 86.73, "imagenetr": 54.55, "imageneta": 48.91}


def test_load_refuses_an_inconsistent_curve(tmp_path):
    bad = {"metrics": {}, "configs": {"exps/a/b.json": {"reference": {
        "kind": "paper", "source": "x", "a_bar": 50.0, "a_last": 40.0, "curve": [60.0, 41.0]}}}}
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(L.LedgerError, match="curve ends at 41.0"):
        L.load(path)
    bad["configs"]["exps/a/b.json"] = {"reference": None}
    path.write_text(json.dumps(bad))
    with pytest.raises(L.LedgerError, match="why_none"):
        L.load(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny RanPAC run and a repository root whose only shipped config is that run's config (without its seed)."""
    tmp = tmp_path_factory.mktemp("ledger")
    images = write_image_folder(tmp / "images")
    overrides = tiny_overrides(images, "ranpac", spr="none")
    cfg = load_config(None, overrides)
    (path,) = trainer.run(cfg, tmp / "runs")
    shipped = {k: v for k, v in json.loads(path.read_text())["config"].items() if k not in L.IGNORED_KEYS}
    root = tmp / "repo"
    (root / "exps" / "tiny").mkdir(parents=True)
    (root / "exps" / "tiny" / "ranpac.json").write_text(json.dumps(shipped))
    return root, path


def test_against_prints_each_task_beside_the_reference(tiny_run):
    root, path = tiny_run
    data = json.loads(path.read_text())
    curve = data["top1_curve"]
    ref = [round(v - 1.0, 2) for v in curve]
    ledger = {"metrics": {}, "configs": {"exps/tiny/ranpac.json": {"reference": {
        "kind": "our_run", "source": "a test", "seeds": [1993], "backbone": "tiny", "timm": "-",
        "a_bar": sum(ref) / len(ref), "a_last": ref[-1], "curve": ref}}}}
    lines, missing, skipped = L.against([path], ledger, root)
    assert missing == 0 and skipped == [] and "run of exps/tiny/ranpac.json" in lines[0]
    rows = [line for line in lines if line.startswith("  | ") and line[4].isdigit()]
    assert len(rows) == len(curve)
    assert all(row.rstrip(" |").endswith("+1.00") for row in rows)  # this run minus the reference, per task


def test_against_reports_a_run_without_reference(tiny_run):
    root, path = tiny_run
    ledger = {"metrics": {}, "configs": {"exps/tiny/ranpac.json": {"reference": None, "why_none": "not measured"}}}
    lines, missing, _ = L.against([path], ledger, root)
    assert missing == 1 and "no reference: not measured" in lines[0]
    other = json.loads((root / "exps/tiny/ranpac.json").read_text())
    (root / "exps/tiny/ranpac.json").write_text(json.dumps({**other, "M": 7}))
    try:
        lines, missing, _ = L.against([path], ledger, root)
        assert missing == 1 and "matches no shipped config" in lines[0]
    finally:
        (root / "exps/tiny/ranpac.json").write_text(json.dumps(other))


def test_report_cli_against_ledger_exit_status(tiny_run, capsys):
    _, path = tiny_run
    # the tiny run matches no shipped config of the real repository: exit 2, and it says so
    assert report.main([str(path.parent), "--against-ledger"]) == 2
    assert "matches no shipped config" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([str(path.parent)])  # neither --out nor --against-ledger


@pytest.mark.parametrize("damage", ["truncated", "wrong types", "not an object"])
def test_against_ledger_skips_a_damaged_results_json_with_one_warning_and_compares_the_rest(tiny_run, tmp_path,
                                                                                           capsys, damage):
    """Issue 26: a truncated results.json or valid JSON of the wrong types is one ``warning: skipped FILE: why`` line
    on stderr, never a traceback; the other runs are still compared; exit 2."""
    _, path = tiny_run
    good = tmp_path / "good" / "results.json"
    good.parent.mkdir()
    good.write_text(path.read_text())
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    text = path.read_text()
    data = json.loads(text)
    bad.write_text({"truncated": text[: len(text) // 2],
                    "wrong types": json.dumps({**data, "top1_curve": "high", "seed": [1, 2]}),
                    "not an object": "[1, 2, 3]"}[damage])
    assert report.main([str(tmp_path), "--against-ledger"]) == 2
    out, err = capsys.readouterr()
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "Traceback" not in err
    assert str(good) in out  # the good run is still compared


def test_a_run_that_overrides_a_key_the_shipped_file_leaves_at_its_default_is_not_that_configs_run(tiny_run, tmp_path):
    """Matching compares resolved configs: the shipped file does not name ``hard_freeze``, so a run with
    ``hard_freeze: true`` (or any other non-default value) is not its run."""
    full_root, path = tiny_run
    shipped = json.loads((full_root / "exps/tiny/ranpac.json").read_text())
    assert shipped.pop("hard_freeze") is False  # the default: a shipped file would not name it
    root = tmp_path / "repo"
    (root / "exps/tiny").mkdir(parents=True)
    (root / "exps/tiny/ranpac.json").write_text(json.dumps(shipped))
    ledger = {"metrics": {}, "configs": {"exps/tiny/ranpac.json": {"reference": None, "why_none": "x"}}}
    run_config = json.loads(path.read_text())["config"]
    assert L.match(run_config, ledger, root) == "exps/tiny/ranpac.json"
    assert L.match({**run_config, "hard_freeze": not run_config["hard_freeze"]}, ledger, root) is None
    assert L.match({**run_config, "seed": 7, "device": "cuda"}, ledger, root) == "exps/tiny/ranpac.json"


@pytest.fixture
def ledger_copy(tmp_path, monkeypatch):
    """The real ledger, docs and two shipped configs under tmp_path, with utils.ledger pointed at them."""
    root = tmp_path / "repo"
    for rel in ("exps/ranpac/cifar.json", "exps/simplecil/cifar.json"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text((L.REPO / rel).read_text())
    data = L.load()
    data["configs"] = {k: v for k, v in data["configs"].items() if k == "exps/simplecil/cifar.json"}
    (root / "exps/ledger.json").write_text(json.dumps(data))
    (root / "docs").mkdir()
    monkeypatch.setattr(L, "REPO", root)
    monkeypatch.setattr(L, "LEDGER", root / "exps/ledger.json")
    monkeypatch.setattr(L, "DOCS", root / "docs/results.md")
    monkeypatch.chdir(root)
    return root


def test_ledger_add_writes_an_entry_and_regenerates_the_docs(ledger_copy, capsys):
    root = ledger_copy
    assert L.main(["--add", "exps/ranpac/cifar.json", "--kind", "our_run", "--source", "a test run",
                   "--a-bar", "90.5", "--a-last", "88.0", "--curve", "93", "88", "--seeds", "1993"]) == 0
    entry = L.load(root / "exps/ledger.json")["configs"]["exps/ranpac/cifar.json"]["reference"]
    assert (entry["kind"], entry["a_bar"], entry["a_last"], entry["curve"], entry["seeds"]) == (
        "our_run", 90.5, 88.0, [93.0, 88.0], [1993])
    docs = (root / "docs/results.md").read_text()
    assert "| `exps/ranpac/cifar.json` | 90.50 | 88.00 | our_run | 1993 |" in docs


@pytest.mark.parametrize("argv, message", [
    (["--add", "exps/simplecil/cifar.json", "--why-none", "x"], "has an entry already"),
    (["--add", "exps/ranpac/nope.json", "--why-none", "x"], "not a shipped config"),
    (["--add", "exps/ranpac/cifar.json"], "give either --why-none or a reference"),
    (["--add", "exps/ranpac/cifar.json", "--why-none", "x", "--kind", "paper", "--source", "s", "--a-bar", "1"],
     "give either --why-none or a reference"),
    (["--add", "exps/ranpac/cifar.json", "--kind", "paper", "--source", "s"], "needs a_bar or a_last"),
    (["--add", "exps/ranpac/cifar.json", "--kind", "paper", "--source", "s", "--a-bar", "50", "--curve", "40", "41"],
     "the curve's mean is not a_bar"),
])
def test_ledger_add_refuses_bad_entries_with_exit_2_and_writes_nothing(ledger_copy, capsys, argv, message):
    before = (ledger_copy / "exps/ledger.json").read_text()
    assert L.main(argv) == 2
    assert message in capsys.readouterr().err
    assert (ledger_copy / "exps/ledger.json").read_text() == before
    assert not (ledger_copy / "docs/results.md").exists()


def test_ledger_add_refuses_a_config_that_does_not_load(ledger_copy, capsys):
    (ledger_copy / "exps/ranpac/broken.json").write_text(json.dumps({"learner": "ranpac", "no_such_key": 1}))
    assert L.main(["--add", "exps/ranpac/broken.json", "--why-none", "x"]) == 2
    assert "does not load" in capsys.readouterr().err
