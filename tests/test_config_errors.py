"""Bad config input (issue 8): every case is a one-line ConfigError naming its origin, key, value and what is
expected; none ends in a raw traceback. Origins: the file path, or ``--set KEY=VALUE`` for command-line values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import main as cli
from utils.config import FIELDS, ExperimentConfig, config_from_dict, load_config
from utils.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# every shipped config (exps/ledger.json is the results ledger, not a config)
EXP_FILES = sorted(p for p in (REPO / "exps").glob("**/*.json") if p.name != "ledger.json")
NONFINITE = "NaN, Infinity"

# (id, file content, fragments). "{path}" stands for the file's path.
FILE_CASES = [
    # 1. NaN / Infinity / overflow to Infinity, with the line
    ("nan", '{\n  "dataset": "cub",\n  "select_rate": NaN\n}',
     ["{path}", "'select_rate'", "value NaN", "line 3, column 18", "expected a number", NONFINITE]),
    ("nan-unbounded-float", '{"min_lr": NaN}', ["{path}", "'min_lr'", "value NaN", "line 1", NONFINITE]),
    ("inf-int", '{"M": Infinity}', ["{path}", "'M'", "value Infinity", "expected an integer", NONFINITE]),
    ("minus-inf", '{"weight_decay": -Infinity}', ["{path}", "'weight_decay'", "value -Infinity", NONFINITE]),
    ("nan-optional", '{"freeze_quantile": NaN}', ["{path}", "'freeze_quantile'", "NaN", "a number or null"]),
    ("nan-in-seed-list", '{"seed": [1, NaN]}', ["{path}", "'seed'", "NaN at seed[1]", "expected an integer"]),
    ("nan-in-backbone-kwargs", '{"backbone_kwargs": {"depth": 2,\n "drop_rate": NaN}}',
     ["{path}", "'backbone_kwargs'", 'NaN at backbone_kwargs["drop_rate"]', "line 2, column 15", "a finite number"]),
    ("nan-string-is-fine-but-later-nan-not", '{"prefix": "NaN 1e400", "M": -Infinity}',
     ["{path}", "'M'", "value -Infinity", "line 1, column 30"]),
    # 2. floats for integer keys
    ("float-in-int", '{"init_cls": 10.5}', ["{path}", "'init_cls'", "10.5", "expected an integer"]),
    ("overflow-in-int", '{"batch_size": 1e400}', ["{path}", "'batch_size'", "1e400", "expected an integer", NONFINITE]),
    ("overflow-in-float", '{"select_rate": -1E400}', ["{path}", "'select_rate'", "-1E400", NONFINITE]),
    ("huge-int-in-float", '{"select_rate": 1' + "0" * 400 + "}", ["{path}", "'select_rate'", "too large for a float"]),
    ("integral-float-in-int", '{"M": 2000.0}', ["{path}", "'M'", "2000.0", "expected an integer such as 2000"]),
    ("integral-float-optional-int", '{"train_per_class": 5.0}', ["{path}", "'train_per_class'", "such as 5"]),
    # 3. not UTF-8
    ("latin1", b'{"prefix": "caf\xe9"}', ["{path}", "not valid UTF-8", "0xe9", "byte offset 15", "line 1"]),
    ("latin1-line-3", b'{\n"dataset": "cub",\n"prefix": "\xff"}', ["{path}", "0xff", "byte offset 31", "line 3"]),
    # 4. seed range and type
    ("seed-negative", '{"seed": [-1]}', ["{path}", "'seed'", "value -1", "0 to 4294967295", "numpy"]),
    ("seed-2**32", '{"seed": 4294967296}', ["{path}", "'seed'", "4294967296", "0 to 4294967295"]),
    ("seed-float", '{"seed": 1993.0}', ["{path}", "'seed'", "1993.0", "expected an integer such as 1993"]),
    ("seed-float-in-list", '{"seed": [1, 2.5]}', ["{path}", "'seed'", "2.5", "expected an integer"]),
    ("seed-bool", '{"seed": [true]}', ["{path}", "'seed'", "True", "expected an integer"]),
    # 5. duplicate seeds
    ("seed-duplicates", '{"seed": [1993, 1993]}',
     ["{path}", "'seed'", "[1993, 1993]", "1993 more than once", "distinct"]),
    # 6. duplicate keys
    ("duplicate-key", '{"M": 1000, "M": 2000}', ["{path}", "'M'", "more than once", "1000 and 2000"]),
    ("duplicate-key-same-value", '{"dataset": "cub", "dataset": "cub"}', ["{path}", "'dataset'", "more than once"]),
    ("duplicate-nested-key", '{"backbone_kwargs": {"depth": 1, "depth": 2}}',
     ["{path}", "'backbone_kwargs'", "'depth'", "more than once", "1 and 2"]),
    # 8. backbone_kwargs must be an object
    ("backbone-kwargs-list", '{"backbone_kwargs": [1, 2]}', ["{path}", "'backbone_kwargs'", "[1, 2]", "an object"]),
    ("backbone-kwargs-string", '{"backbone_kwargs": "depth=2"}',
     ["{path}", "'backbone_kwargs'", "'depth=2'", "an object"]),
    ("backbone-kwargs-null", '{"backbone_kwargs": null}', ["{path}", "'backbone_kwargs'", "None", "an object"]),
    # 9. other odd input
    ("device-object", '{"device": {}}', ["{path}", "'device'", "{}", '"cpu"']),
    ("device-null", '{"device": null}', ["{path}", "'device'", "None", '"cpu"']),
    ("device-bool", '{"device": [true]}', ["{path}", "'device'", "[True]", '"cpu"']),
    ("device-nested-list", '{"device": [["0"]]}', ["{path}", "'device'", "[['0']]", '"cpu"']),
    ("device-float", '{"device": 0.5}', ["{path}", "'device'", "0.5", '"cpu"']),
    ("device-empty", '{"device": []}', ["{path}", "'device'", "empty list"]),
    ("seed-null", '{"seed": null}', ["{path}", "'seed'", "None", "an integer or a list of integers"]),
    ("seed-empty", '{"seed": []}', ["{path}", "'seed'", "empty list"]),
    ("seed-object", '{"seed": {"a": 1}}', ["{path}", "'seed'", "{'a': 1}", "expected an integer"]),
    ("spr-number", '{"spr": 5}', ["{path}", "'spr'", "value 5", "a string"]),
    ("spr-list", '{"spr": ["mist"]}', ["{path}", "'spr'", "['mist']", "a string"]),
    ("int-null", '{"init_cls": null}', ["{path}", "'init_cls'", "None", "an integer"]),
    ("bool-null", '{"shuffle": null}', ["{path}", "'shuffle'", "None", "true/false"]),
    ("str-null", '{"dataset": null}', ["{path}", "'dataset'", "None", "a string"]),
    ("literal-null", '{"precision": null}', ["{path}", "'precision'", "None", "'fp32'"]),
    ("literal-list", '{"mist_tasks": ["all"]}', ["{path}", "'mist_tasks'", "['all']", "'first'"]),
    ("float-string", '{"drop_rate": "0.5"}', ["{path}", "'drop_rate'", "'0.5'", "a number"]),
    ("nul-in-path", '{"data_root": "a\\u0000b"}', ["{path}", "'data_root'", "NUL"]),
    ("top-level-array", "[1, 2]", ["{path}", "JSON object", "top level"]),
    ("top-level-string", '"cub"', ["{path}", "JSON object", "top level"]),
    ("top-level-null", "null", ["{path}", "JSON object", "top level"]),
    ("empty-file", "", ["{path}", "empty", "JSON object"]),
    ("blank-file", " \n\t\n", ["{path}", "empty"]),
    ("invalid-json", '{"dataset": "cub",,}', ["{path}", "invalid JSON", "line 1, column 19"]),
    ("single-quotes", "{'dataset': 'cub'}", ["{path}", "invalid JSON"]),
    ("too-many-digits", '{"M": ' + "9" * 5000 + "}", ["{path}", "invalid JSON", "digits"]),
    ("nested-too-deeply", '{"backbone_kwargs": {"a": ' + "[" * 100_000 + "]" * 100_000 + "}}",
     ["{path}", "nested too deeply"]),
    ("unknown-key-before-nan", '{"selct_rate": NaN}', ["{path}", "unknown key 'selct_rate'", "'select_rate'"]),
]

# (id, file content or None, overrides, fragments). "{path}" must NOT appear when the value came from --set.
SET_CASES = [
    # 1.
    ("nan", None, ["select_rate=NaN"], ["--set select_rate=NaN", "'select_rate'", "value NaN", NONFINITE]),
    ("inf", None, ["M=Infinity"], ["--set M=Infinity", "'M'", "expected an integer", NONFINITE]),
    ("overflow", None, ["batch_size=1e400"], ["--set batch_size=1e400", "'batch_size'", "1e400", NONFINITE]),
    ("nan-in-list", None, ["seed=[1,NaN]"], ["--set seed=[1,NaN]", "'seed'", NONFINITE]),
    ("nan-in-kwargs", None, ['backbone_kwargs={"a": NaN}'], ["--set backbone_kwargs=", "'backbone_kwargs'", NONFINITE]),
    # 2.
    ("float-in-int", None, ["init_cls=10.5"], ["--set init_cls=10.5", "'init_cls'", "10.5", "expected an integer"]),
    ("integral-float", None, ["M=2000.0"], ["--set M=2000.0", "'M'", "2000.0", "expected an integer such as 2000"]),
    # 4. / 5.
    ("seed-negative", None, ["seed=-1"], ["--set seed=-1", "'seed'", "value -1", "0 to 4294967295"]),
    ("seed-2**32", None, ["seed=[4294967296]"], ["--set seed=[4294967296]", "'seed'", "4294967296"]),
    ("seed-float", None, ["seed=1.5"], ["--set seed=1.5", "'seed'", "1.5", "expected an integer"]),
    ("seed-duplicates", None, ["seed=[1993,1993]"], ["--set seed=[1993,1993]", "'seed'", "more than once"]),
    # 7. errors found by cross-key or whole-key checks still name --set, not the file
    ("spr", "{path}", ["spr=bogus"], ["--set spr=bogus", "'spr'", "'bogus'", "mist"]),
    ("dataset", "{path}", ["dataset=cifar"], ["--set dataset=cifar", "'dataset'", "'cifar'", "cifar224"]),
    ("model-name", "{path}", ["model_name=x"], ["--set model_name=x", "'model_name'", "'x'", "ranpac"]),
    ("weights-both-set", "{path}", ["weights_path=/x", "pretrained=false"],
     ["--set weights_path=/x and --set pretrained=false", "'weights_path'", "'pretrained'"]),
    ("seed-empty", "{path}", ["seed=[]"], ["--set seed=[]", "'seed'", "empty list"]),
    ("device-empty", "{path}", ["device=[]"], ["--set device=[]", "'device'", "empty list"]),
    ("unknown-key", "{path}", ["selct_rate=0.2"], ["--set selct_rate=0.2", "'select_rate'"]),
    ("wrong-type", "{path}", ["mi_epochs=two"], ["--set mi_epochs=two", "'mi_epochs'", "'two'", "an integer"]),
    ("out-of-range", "{path}", ["drop_rate=1"], ["--set drop_rate=1", "'drop_rate'", "< 1"]),
    # 8.
    ("kwargs-list", None, ["backbone_kwargs=[1]"], ["--set backbone_kwargs=[1]", "'backbone_kwargs'", "an object"]),
    ("kwargs-string", None, ["backbone_kwargs=depth"], ["--set backbone_kwargs=depth", "'depth'", "an object"]),
    # 9.
    ("device-null", None, ["device=null"], ["--set device=null", "'device'", "None", '"cpu"']),
    ("device-bool", None, ["device=true"], ["--set device=true", "'device'", "True"]),
    ("device-object", None, ["device={}"], ["--set device={}", "'device'", "{}"]),
    ("seed-null", None, ["seed=null"], ["--set seed=null", "'seed'", "None"]),
    ("seed-mixed", None, ['seed=[1,"a"]'], ['--set seed=[1,"a"]', "'seed'", "'a'", "an integer"]),
    ("int-null", None, ["mi_epochs=null"], ["--set mi_epochs=null", "'mi_epochs'", "None"]),
    ("bool-number", None, ["shuffle=1"], ["--set shuffle=1", "'shuffle'", "true/false"]),
    ("empty-key", None, ["=5"], ["--set '=5'", "key name"]),
    ("no-equals", None, ["x"], ["--set 'x'", "key=value"]),
    ("empty-value", None, ["mi_epochs="], ["--set mi_epochs=", "'mi_epochs'", "''"]),
    ("too-many-digits", None, ["M=" + "9" * 5000], ["--set M=999", "'M'", "an integer"]),
    ("nested-too-deeply", None, ["seed=" + "[" * 100_000], ["--set seed=[[[", "'seed'", "an integer"]),
]


def _write(tmp_path: Path, content) -> Path:
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _assert_one_line_with(msg: str, fragments, path) -> None:
    assert "\n" not in msg, msg
    for fragment in fragments:
        expected = fragment.replace("{path}", str(path))
        assert expected in msg, f"{expected!r} not in {msg!r}"


@pytest.mark.parametrize("content, fragments", [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])
def test_bad_file_is_a_config_error_naming_file_key_value(tmp_path, content, fragments):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    _assert_one_line_with(msg, fragments, path)
    assert "--set" not in msg


@pytest.mark.parametrize("content, overrides, fragments", [c[1:] for c in SET_CASES], ids=[c[0] for c in SET_CASES])
def test_bad_set_value_is_a_config_error_naming_the_set_item(tmp_path, content, overrides, fragments):
    path = _write(tmp_path, '{"dataset": "cub", "seed": [1], "M": 64}') if content else None
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    msg = str(info.value)
    _assert_one_line_with(msg, fragments, path)
    assert str(tmp_path) not in msg  # the file did not cause it
    assert "<defaults>" not in msg


@pytest.mark.parametrize(
    "content, overrides, fragments",
    [
        ('{"weights_path": "/w.pth"}', ["pretrained=false"],
         ["{path} and --set pretrained=false", "'weights_path'", "'pretrained'"]),
        ('{"pretrained": false}', ["weights_path=/w.pth"],
         ["--set weights_path=/w.pth and {path}", "'weights_path'", "'pretrained'"]),
        ('{"weights_path": "/w.pth", "pretrained": false}', ["mi_epochs=2"], ["{path}: key 'weights_path'"]),
    ],
    ids=["file-then-set", "set-then-file", "both-in-file"],
)
def test_cross_key_error_names_both_origins(tmp_path, content, overrides, fragments):
    path = _write(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    _assert_one_line_with(str(info.value), fragments, path)


def test_set_value_fixes_a_bad_file_value(tmp_path):
    """A --set value replaces the file's before validation, so a bad file value can be overridden."""
    path = _write(tmp_path, '{"spr": "bogus", "seed": [1, 1]}')
    cfg = load_config(path, ["spr=none", "seed=[1,2]"])
    assert cfg.spr == "none" and cfg.seed == [1, 2]


# ---- the config path itself -------------------------------------------------------------------
def test_directory_path(tmp_path):
    with pytest.raises(ConfigError, match="is a directory") as info:
        load_config(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_missing_path_still_says_it_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.json")


def test_unreadable_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "{}")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "cannot be read" in msg and "Permission denied" in msg


def test_name_too_long(tmp_path):
    with pytest.raises(ConfigError, match="config file"):
        load_config(tmp_path / ("x" * 5000 + ".json"))


def test_not_a_regular_file():
    if not Path("/dev/null").exists():
        pytest.skip("no /dev/null")
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config("/dev/null")


# ---- config_from_dict (Python callers) ------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, fragments",
    [
        ({"select_rate": float("nan")}, ["'select_rate'", "nan", NONFINITE]),
        ({"min_lr": float("inf")}, ["'min_lr'", "inf", NONFINITE]),
        ({"M": float("inf")}, ["'M'", "expected an integer", NONFINITE]),
        ({"M": 2000.0}, ["'M'", "such as 2000"]),
        ({"backbone_kwargs": {1: 2}}, ["'backbone_kwargs'", "non-string key 1", "keys are strings"]),
        ({"backbone_kwargs": {"a": [float("nan")]}}, ["'backbone_kwargs'", 'backbone_kwargs["a"][0]', NONFINITE]),
        ({"seed": [5, 5]}, ["'seed'", "more than once"]),
        ({1: 2}, ["key 1 is not a string"]),
        ({"select_rate": 10**400}, ["'select_rate'", NONFINITE]),
    ],
    ids=["nan", "inf-float", "inf-int", "integral-float", "kwargs-int-key", "kwargs-nan", "seed-dup", "int-key",
         "huge-int-float"],
)
def test_config_from_dict_errors(raw, fragments):
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, where="<test>")
    msg = str(info.value)
    assert msg.startswith("<test>: ")
    _assert_one_line_with(msg, fragments, None)


def test_config_from_dict_rejects_a_non_mapping():
    with pytest.raises(ConfigError, match="JSON object"):
        config_from_dict([("M", 1)], where="<test>")  # type: ignore[arg-type]


# ---- no odd value of any key escapes as another exception -------------------------------------
ODD_VALUES = [None, True, False, 0, -1, 1.5, 2.0, "", "x", "True", [], [None], [1, 1], {}, {"a": 1}, [[]], 10**30,
              -(10**30), 2**32, 1e308, ["0"], [-1], [1.0], {"a": [1, {"b": None}]}]


@pytest.mark.parametrize("key", sorted(FIELDS))
def test_no_odd_value_escapes_as_another_exception(tmp_path, key):
    path = tmp_path / "odd.json"
    for value in ODD_VALUES:
        text = json.dumps(value)
        path.write_text(json.dumps({key: value}))
        for call in (lambda value=value: config_from_dict({key: value}), lambda: load_config(path),
                     lambda text=text: load_config(None, [f"{key}={text}"])):
            try:
                call()
            except ConfigError:
                pass
    for text in ("NaN", "-Infinity", "1e400", "[1,NaN]", '{"a":NaN}', "[[", "", "=", "'x'"):
        try:
            load_config(None, [f"{key}={text}"])
        except ConfigError:
            pass
        path.write_text('{"%s": %s}' % (key, text or "null"))
        try:
            load_config(path)
        except ConfigError:
            pass


# ---- valid input keeps working ------------------------------------------------------------------
@pytest.mark.parametrize("path", EXP_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_still_loads_unchanged(path):
    raw = json.loads(path.read_text())
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig) and cfg.config == str(path)
    from utils.config import key_type

    for key, value in raw.items():
        got = getattr(cfg, key)
        if key == "use_RP" and isinstance(value, str):
            assert got is (value in ("True", "true"))
        elif key in ("seed", "device"):
            items = value if isinstance(value, list) else [value]
            assert got == ([str(v) for v in items] if key == "device" else items)
        elif key_type(key) is float:
            assert got == float(value) and isinstance(got, float)
        else:
            assert got == value and type(got) is type(value), key


def test_shipped_configs_exist():
    assert len(EXP_FILES) >= 20


@pytest.mark.parametrize(
    "content, overrides, check",
    [
        ('{"seed": [0, 4294967295]}', [], lambda c: c.seed == [0, 4294967295]),
        ('{"seed": 7}', [], lambda c: c.seed == [7]),
        ('{"device": -1}', [], lambda c: c.device == ["-1"]),
        ('{"device": ["0", "1"]}', [], lambda c: c.device == ["0", "1"]),
        ('{"min_lr": 0, "select_rate": 1}', [], lambda c: c.min_lr == 0.0 and c.select_rate == 1.0),
        ('{"select_rate": 1e-1, "freeze_quantile": 1E0}', [],
         lambda c: (c.select_rate, c.freeze_quantile) == (0.1, 1.0)),
        ('{"M": -1, "increment": 100000000000000000000}', [], lambda c: c.M == -1 and c.increment == 10**20),
        ('{"prefix": "NaN Infinity 1e400"}', [], lambda c: c.prefix == "NaN Infinity 1e400"),
        ('{"backbone_kwargs": {"depth": 2, "nested": {"a": [1, "x", null]}}}', [],
         lambda c: c.backbone_kwargs == {"depth": 2, "nested": {"a": [1, "x", None]}}),
        ('\ufeff{"M": 5}', [], lambda c: c.M == 5),  # a UTF-8 byte-order mark (Windows editors) is accepted
        ('{"prefix": "caf\u00e9"}', [], lambda c: c.prefix == "caf\u00e9"),
        ("{}", ["prefix=2024", "data_root=123", "weights_path=null"],
         lambda c: c.prefix == "2024" and c.data_root == "123" and c.weights_path is None),
        ("{}", ["prefix=NaN"], lambda c: c.prefix == "NaN"),
        ("{}", ["seed=4294967295", "device=0", "spr=null", "freeze_quantile=null"],
         lambda c: c.seed == [4294967295] and c.device == ["0"] and c.spr == "none" and c.freeze_quantile is None),
    ],
    ids=["seed-range-ends", "seed-scalar", "device-int", "device-list", "int-in-float", "exponent-floats",
         "huge-int", "constants-in-strings", "nested-kwargs", "bom", "utf8", "set-str-numbers", "set-str-nan",
         "set-misc"],
)
def test_valid_input_still_loads(tmp_path, content, overrides, check):
    path = tmp_path / "ok.json"
    path.write_text(content, encoding="utf-8")
    assert check(load_config(path, overrides))


# ---- main.py: one line on stderr, exit code 2, no traceback ----------------------------------------
@pytest.mark.parametrize(
    "content, overrides, fragment",
    [
        ('{"select_rate": NaN}', [], "'select_rate'"),
        (b'{"prefix": "caf\xe9"}', [], "not valid UTF-8"),
        ('{"M": 1000, "M": 2000}', [], "'M' appears more than once"),
        ('{"batch_size": 1e400}', [], "'batch_size'"),
        ('{"seed": [1993, 1993]}', [], "'seed'"),
        ("[]", [], "top level"),
        ("{}", ["seed=[]"], "--set seed=[]"),
        ("{}", ["device=null"], "--set device=null"),
        ("{}", ["M=Infinity"], "--set M=Infinity"),
        ("{}", ["=5"], "key name"),
    ],
    ids=["nan", "latin1", "duplicate", "overflow", "seed-dup", "array", "set-seed", "set-device", "set-inf",
         "set-empty-key"],
)
def test_main_prints_one_error_line_and_returns_2(tmp_path, capsys, content, overrides, fragment):
    path = _write(tmp_path, content)
    argv = ["--config", str(path), "--output-dir", str(tmp_path / "runs")]
    for item in overrides:
        argv += ["--set", item]
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists()


def test_main_with_a_directory_as_config(tmp_path, capsys):
    assert cli.main(["--config", str(tmp_path), "--output-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is a directory" in err and "Traceback" not in err
