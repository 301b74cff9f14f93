"""Experiment configuration: one typed definition whose field names are the official JSON keys.

The official MIST code (SPEC 1) merges a JSON file into a plain ``dict``. Here the same keys are
fields of :class:`ExperimentConfig`; loading validates every key (unknown keys, types, ranges) in
one place and raises :class:`ConfigError` with the file, the key, the value and what is expected.

Keys that the official code accepts but never reads are kept as fields (marked "unused, as in the
original") so that the official JSON files load unchanged. Fixes for official quirks are extra
boolean or enum fields whose defaults reproduce the official behaviour (see docs/deviations.md).
"""

from __future__ import annotations

import codecs
import dataclasses
import difflib
import json
import logging
import math
import re
import sys
import types
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

from utils.errors import ConfigError
from utils.registry import ALL as REGISTRIES
from utils.registry import DATASETS, LEARNERS, PRESETS, load_components

SEED_MAX = 2**32 - 1  # numpy.random.seed accepts 0 .. 2**32 - 1
NONFINITE_NOTE = "NaN, Infinity and numbers too large for a float (such as 1e400) are not allowed"
DEVICE_FORMS = '["0"] (cuda:0), "cpu", -1 (cpu), "cuda:N" or "mps"'


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance).

    ``kw``: bounds ``min``/``ge``/``gt``/``le``/``lt``, ``choices`` (a tuple), or ``registry`` (a name of
    ``utils.registry.ALL``: the value must be registered there, or null).
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


key = _f  # the public name for components that declare their own keys (see config_keys)


UNUSED = "Accepted for compatibility; unused, as in the original."


@dataclasses.dataclass
class ExperimentConfig:
    """Every key of an experiment JSON file (SPEC 1.2), plus the documented extras.

    Field names are exactly the official JSON keys. Defaults are the official values of the
    shipped configs where one exists. ``metadata["help"]`` documents each key; README.md lists them.
    """

    # ---- official keys: data and task split (SPEC 1.2, 2) ----
    dataset: str = _f("cifar224", "Data set, a registered name (utils/datasets.py).", registry="dataset")
    shuffle: bool = _f(True, "Permute the class order with numpy's legacy global seed (SPEC 2.2).")
    init_cls: int = _f(10, "Number of classes in the first task.", min=1)
    increment: int = _f(10, "Number of classes in each later task (the last task takes the remainder).", min=1)
    seed: list[int] = _f([1993], "Class-order seeds; one full run per seed, run one after another.")
    # ---- official keys: learner ----
    model_name: str = _f("ranpac", "Learner, a registered name (models/*.py).", registry="learner")
    convnet_type: str = _f(
        "pretrained_vit_b16_224_in21k",
        "Backbone: an official name (mapped to its exact timm name and tag), efficientnet_lite0, or any timm name.",
    )
    batch_size: int = _f(
        56, "Loader batch size. RanPAC uses it; SimpleCIL uses 32 unless use_config_batch_size (SPEC 9.2).", min=1
    )
    device: list[str] = _f(["0"], 'Device: ["0"] (cuda:0), "cpu", -1 (cpu), "cuda:N" or "mps". Only the first entry is used.')
    # ---- official keys: sparse tuning (SPEC 4, 5) ----
    spr: str = _f("mist", "Tuning phase before the learner's own training and head update, a registered preset "
                          "(models/sparse/presets.py) or 'none' (or null), which disables it. As in the official "
                          "code, SimpleCIL ignores 'cerun' and RanPAC ignores 'run' (no tuning phase, with a warning); "
                          "'ce_finetune' (dense CE fine-tuning), 'piece_f', 'piece_s', 'magnitude_gate' and "
                          "'mist_random' are ours, and 'acl', 'spu', 'gps', 'spg', 'sparcl' are ports of rival methods (README, "
                          "docs/deviations.md).", registry="preset")
    select_rate: float = _f(0.1, "Fraction of each maskable tensor selected by importance score (SPEC 4.5).", gt=0, le=1)
    drop_rate: float = _f(0.9, "Probability of DROPPING a selected gradient entry at each step; keep prob = 1 - drop_rate.", ge=0, lt=1)
    mi_epochs: int = _f(20, "MIST epochs per task, the scoring pass included (SPEC 4.4-4.6).", min=1)
    # ---- official keys that the official code reads but ignores, or never reads ----
    prefix: str = _f("exp", "Run label. " + UNUSED)
    weight_decay: float = _f(0.0005, "EASE's SGD weight decay; MIST's tuning phase and SLCA use their official "
                                     "constant 5e-4 instead.", ge=0)
    optimizer: str = _f("sgd", "SGD is hard-coded. " + UNUSED)
    memory_size: int = _f(2000, "Exemplar budget (no rehearsal). " + UNUSED)
    memory_per_class: int = _f(20, "Exemplar option. " + UNUSED)
    fixed_memory: bool = _f(False, "Exemplar option. " + UNUSED)
    prompt_token_num: int = _f(30, "VPT option. " + UNUSED)
    ffn_num: int = _f(64, "EASE: adapter bottleneck width (official 64); unused by the other learners.", min=1)
    min_lr: float = _f(0.0, "EASE: floor of its cosine learning-rate schedule (official 0); unused by the other "
                            "learners.", ge=0)
    tuned_epoch: int = _f(20, "PETL epochs of upstream RanPAC (dead code in MIST). " + UNUSED)
    vpt_type: str = _f("shallow", "VPT option. " + UNUSED)
    config: Optional[str] = _f(None, "Path of the config file; set by main.py and logged only.")
    # ---- extras: backbone ----
    backbone_type: Optional[str] = _f(None, "Alias of convnet_type (LAMDA-PILOT spelling); if set it wins.")
    pretrained: bool = _f(True, "Load pretrained weights; false gives a random init (tests, timing).")
    weights_path: Optional[str] = _f(None, "Local weights file (.npz, .safetensors, .pth, .bin) instead of the model hub.")
    backbone_kwargs: dict[str, Any] = _f({}, "Extra keyword arguments for timm.create_model (e.g. a tiny ViT for tests).")
    # ---- extras: data ----
    data_root: str = _f("./data", "Folder holding the data sets (layout in README.md).")
    download: bool = _f(True, "Let torchvision download cifar224/fmnist when missing and the internet is reachable.")
    input_size: int = _f(224, "Image side length fed to the backbone (official: 224).", min=8)
    train_per_class: Optional[int] = _f(None, "Keep only the first N training images of each class (quick runs).", min=1)
    test_per_class: Optional[int] = _f(None, "Keep only the first N test images of each class (quick runs).", min=1)
    use_input_norm: Optional[bool] = _f(
        None, "Normalise inputs with the backbone's mean/std; null = dataset default (only cars normalises, SPEC 2.1)."
    )
    num_workers: int = _f(8, "DataLoader worker processes (official: 8).", min=0)
    # ---- extras: sparse tuning options and fixes (SPEC 4, 9) ----
    mist_tasks: Literal["all", "first"] = _f("all", "Tasks that run the tuning phase: all (official) or first.")
    use_config_batch_size: bool = _f(
        False, "Use batch_size from the JSON where the official learner hard-codes one (SimpleCIL 32, SLCA 128)."
    )
    freeze_quantile: Optional[float] = _f(
        None, "Quantile of scores frozen at the end of a task; null = learner default (RanPAC 0.9995, SimpleCIL 1.0).",
        ge=0, le=1,
    )
    exclude_self_positive: bool = _f(False, "NT-Xent: drop the anchor itself from its positive set (SPEC 9.5 fix).")
    exempt_rule: Literal["name", "ndim"] = _f(
        "name", "Always-trainable tensors: official name substrings, or structural (ndim < 2) for CNN backbones."
    )
    sparse_weight_decay: bool = _f(False, "Apply weight decay only to entries the step may move (SPEC 9.4 fix).")
    hard_freeze: bool = _f(False, "Restore every entry with a zero gradient multiplier after each step (SPEC 9.4 fix).")
    freeze_bn_stats: bool = _f(False, "Keep BatchNorm running statistics fixed while tuning and in SLCA's slow learner (CNN backbones; ViTs have none).")
    ablation_epochs: int = _f(
        20, "Epochs of the CE tuning phases rand/l2/grad/run/cerun/ce_finetune (official module constant 20).", min=1
    )
    ablation_random_init_rows: bool = _f(False, "Ablations: random instead of zero new cosine rows (SPEC 9.24 fix).")
    tuning_batch_size: Optional[int] = _f(
        None, "Batch size of the tuning phase's loader, any preset (e.g. a rival's official batch: SPU 128, SPG 64, "
        "SparCL 32, GPS 32, ACL 128; docs/deviations.md section 6); null = the learner's batch size.", min=1
    )
    # ---- extras: the tuning phase as a composition (issue 6; models/sparse/presets.py) ----
    # null = the value of the spr preset; the keys apply to the presets with a scoring pass and a task mask
    importance: Optional[str] = _f(
        None, "Importance estimator, a registered name (models/sparse/estimators.py); null = the preset's.",
        registry="estimator",
    )
    scoring_loss: Optional[str] = _f(
        None, "Loss of the scoring pass and the training epochs, a registered name (models/sparse/losses.py); null = "
        "the preset's.", registry="loss",
    )
    selection_scope: Optional[str] = _f(
        None, "Where the budget is applied, a registered scope (models/sparse/scopes.py; per_block: the top fraction "
        "inside each blocks.<i>); null = the preset's.", registry="scope",
    )
    budget: Optional[float] = _f(
        None, "Selected fraction; null = the preset's key (select_rate for MIST, top_ratio for PIECE).", gt=0, le=1
    )
    tuning_optimizer: Optional[str] = _f(
        None, "Optimizer of the tuning phase, a registered name (models/sparse/optim.py); null = the preset's.",
        registry="optimizer",
    )
    gradient_drop: Optional[bool] = _f(None, "MIST's per-step random drop of selected gradients on/off; null = preset's.")
    overlap_penalty: Optional[bool] = _f(None, "MIST's 0.9**count overlap penalty on/off; null = the preset's.")
    freeze_rule: Optional[bool] = _f(None, "MIST's end-of-task frozen sets on/off; null = the preset's.")
    exclude_embeddings: Optional[bool] = _f(
        None, "Keep patch/position embeddings, class token and CNN stem out of selection and frozen; null = preset's."
    )
    strict_mask: Optional[bool] = _f(
        None, "A tensor with no selected entry stays frozen (true) or fully trainable (false: official PIECE, SPEC "
        "13.4); null = the preset's (piece_f/piece_s false, magnitude_gate true).",
    )
    # ---- extras: runtime ----
    seed_torch_with_seed: bool = _f(False, "Seed torch with the run seed instead of the official constant 1 (SPEC 9.22).")
    allow_tf32: bool = _f(True, "TF32 matmuls on Ampere+ GPUs (PyTorch 1.11, used by the original, had them on).")
    precision: Literal["fp32", "bf16"] = _f(
        "fp32", "Backbone forwards in fp32 (official, TF32 per allow_tf32) or bfloat16 autocast (faster, not faithful)."
    )
    eval_batch_size: Optional[int] = _f(
        None, "Batch size of feature extraction and evaluation (no gradients); null = the learner's batch size.", min=1
    )
    progress: bool = _f(True, "Show tqdm progress bars.")
    deterministic: bool = _f(
        False, "Deterministic algorithms (torch.use_deterministic_algorithms, cuBLAS workspace): GPU runs repeat "
        "bit for bit on the same GPU model and software, at a speed cost (see README).",
    )
    verify_images: bool = _f(False, "Open every image file once before training, naming any unreadable one.")
    measure_drift: bool = _f(
        True, "After every task, measure where the backbone's change landed (per parameter group) and how far the "
        "old classes' test-set mean features moved (results.json tasks[i].drift; models/drift.py): one extra pass "
        "over the seen classes' test images per task; false switches it off."
    )
    stop_after_task: Optional[int] = _f(
        None, "Stop after this task (0-based) as if interrupted, leaving a resumable run (testing resume).", min=0
    )
    check_replicas: bool = _f(False, "torchrun: compare a parameter checksum across ranks at the end of each task.")
    #: the values of the keys that components declare (``config_keys``), by key; read them as attributes
    extensions: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, metadata={"internal": True})

    def __getattr__(self, name: str) -> Any:
        """A component's key (declared with :func:`config_keys`) as an attribute, e.g. ``cfg.ca_epochs``."""
        if name.startswith("__") or name == "extensions":
            raise AttributeError(name)
        values = self.__dict__.get("extensions")
        if values is not None and name in values:
            return values[name]
        field = EXTENSION_FIELDS.get(name)
        if field is None:
            load_components()
            field = EXTENSION_FIELDS.get(name)
        if field is not None:
            return _default(field)
        raise AttributeError(f"'ExperimentConfig' has no key {name!r}")

    def replace(self, **changes: Any) -> "ExperimentConfig":
        """A copy with some keys changed (core or component keys; values are not validated here)."""
        core = {k: v for k, v in changes.items() if k in CORE_FIELDS}
        extra = {k: v for k, v in changes.items() if k not in CORE_FIELDS}
        for name in extra:
            if name not in FIELDS:
                raise TypeError(f"unknown config key {name!r}")
        return dataclasses.replace(self, **core, extensions={**self.extensions, **extra})

    # ------------------------------------------------------------------------------------------
    @property
    def keep_prob(self) -> float:
        """Per-step keep probability of a selected gradient entry, ``1 - drop_rate`` (SPEC 4.6)."""
        return 1.0 - self.drop_rate

    @property
    def tuning(self) -> Optional[str]:
        """The tuning-phase method, or None when ``spr`` is "none"."""
        return None if self.spr == "none" else self.spr

    def to_dict(self) -> dict[str, Any]:
        """Every key (core keys, then every registered component's keys) as a JSON-serialisable dict."""
        out = dataclasses.asdict(self)
        values = out.pop("extensions")
        load_components()
        out.update({name: values[name] if name in values else _default(f) for name, f in EXTENSION_FIELDS.items()})
        return out


CORE_FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig) if not f.metadata.get("internal")}
_CORE_HINTS = typing.get_type_hints(ExperimentConfig)

#: keys declared by components (learners, presets) with :func:`config_keys`: name -> field, name -> type
EXTENSION_FIELDS: dict[str, dataclasses.Field] = {}
_EXTENSION_HINTS: dict[str, Any] = {}


@dataclasses.dataclass(frozen=True)
class KeyGroup:
    """The keys one component declares: README's table title, the key names, an optional whole-config check
    ``validate(cfg, origin)`` (``origin(key)`` names where a key's value came from; raises ConfigError) and an
    optional ``applies(cfg)``: False when the run does not use the component (its keys then have no effect:
    :func:`inactive_keys`)."""

    title: str
    names: tuple[str, ...]
    validate: Optional[Callable[[Any, Callable[[str], str]], None]] = None
    applies: Optional[Callable[[Any], bool]] = None


KEY_GROUPS: list[KeyGroup] = []


def config_keys(title: str, validate: Optional[Callable[[Any, Callable[[str], str]], None]] = None,
                applies: Optional[Callable[[Any], bool]] = None):
    """Class decorator: the annotated fields of the class (``name: type = key(default, help, **bounds)``) become
    config keys, validated and documented like the core ones and read as ``cfg.<name>``.

    A learner or tuning preset declares its keys in its own file this way, so adding one touches no list
    elsewhere. ``title`` heads the keys' table in README.md (``python -m utils.config --markdown``); ``validate`` and
    ``applies``: see :class:`KeyGroup` (e.g. ``applies=for_learners("slca")``).

    Raises:
        ValueError: a key name is taken.
    """
    def wrap(cls):
        dc = dataclasses.dataclass(cls)
        hints = typing.get_type_hints(dc)
        names = []
        for f in dataclasses.fields(dc):
            if f.name in CORE_FIELDS or f.name in EXTENSION_FIELDS:
                raise ValueError(f"config key {f.name!r} ({title}) is declared twice")
            EXTENSION_FIELDS[f.name] = f
            _EXTENSION_HINTS[f.name] = hints[f.name]
            names.append(f.name)
        KEY_GROUPS.append(KeyGroup(title, tuple(names), validate, applies))
        return dc

    return wrap


def for_learners(*names: str) -> Callable[[Any], bool]:
    """An ``applies`` rule for :func:`config_keys`: the run's ``model_name`` is one of the registered learners
    ``names`` (aliases resolved)."""
    return lambda cfg: LEARNERS.resolve(cfg.model_name) in names


def inactive_keys(cfg: "ExperimentConfig") -> list[tuple[str, str]]:
    """(key, its component's title) for every component key set to a non-default value whose component the run does
    not use (:class:`KeyGroup` ``applies``): the key has no effect (warned at the run's start)."""
    load_components()
    return [(name, group.title) for group in KEY_GROUPS if group.applies is not None and not group.applies(cfg)
            for name in group.names if getattr(cfg, name) != _default(EXTENSION_FIELDS[name])]


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return field.default_factory()  # type: ignore[misc]
    return field.default


class _Fields(typing.Mapping):
    """Every config key -> its dataclass field: the core keys, then the components' (loaded on first need)."""

    def __getitem__(self, name: str) -> dataclasses.Field:
        if name in CORE_FIELDS:
            return CORE_FIELDS[name]
        load_components()
        return EXTENSION_FIELDS[name]

    def __contains__(self, name: object) -> bool:
        if name in CORE_FIELDS:
            return True
        load_components()
        return name in EXTENSION_FIELDS

    def __iter__(self):
        load_components()
        return iter([*CORE_FIELDS, *EXTENSION_FIELDS])

    def __len__(self) -> int:
        load_components()
        return len(CORE_FIELDS) + len(EXTENSION_FIELDS)


FIELDS = _Fields()


def key_type(name: str) -> Any:
    """The declared type of config key ``name`` (core or component key). Raises KeyError for an unknown key."""
    if name not in CORE_FIELDS and name not in EXTENSION_FIELDS:
        load_components()
    return _CORE_HINTS[name] if name in CORE_FIELDS else _EXTENSION_HINTS[name]


# ---------------------------------------------------------------------------------------------
# value coercion
# ---------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        plural = {int: "integers", str: "strings"}.get(item_tp, "such values")
        return f"{_type_name(item_tp)} or a list of {plural}"
    if origin is dict:
        return "an object"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    def bad(extra: str = "") -> ConfigError:
        return ConfigError(f"{where}: key '{key}' has value {value!r}; expected {_type_name(tp)}{extra}.")

    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(key, value, inner[0], where)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        if key == "device":  # official forms: ["0"], ["0","1"], "cpu", -1
            for v in items:
                if isinstance(v, bool) or not isinstance(v, (str, int)):
                    raise ConfigError(f"{where}: key 'device' has value {value!r}; expected {DEVICE_FORMS}.")
            return [str(v) for v in items]
        if value is None:
            raise bad()
        return [_coerce(key, v, item_tp, where) for v in items]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        for name in value:
            if not isinstance(name, str):
                raise ConfigError(f"{where}: key '{key}' has value {value!r} with the non-string key {name!r}; "
                                  "expected an object whose keys are strings.")
        inner = _first_nonfinite(value)
        if inner is not None:
            raise ConfigError(f"{where}: key '{key}' has a non-finite number at {key}{inner}; "
                              f"expected finite numbers; {NONFINITE_NOTE}.")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if value in ("True", "False", "true", "false"):
            parsed = value in ("True", "true")
            if key == "use_RP" and not parsed:
                warnings.warn(
                    f"{where}: use_RP is the string {value!r}. It is parsed as false here, but the official code "
                    "tests only truthiness, so there any non-empty string, \"False\" included, enables RP.",
                    stacklevel=2,
                )
            return parsed
        raise bad()
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and math.isfinite(value) and value.is_integer():
                raise bad(f" such as {int(value)}")  # 2000.0: JSON floats are not taken for integer keys
            if isinstance(value, float) and not math.isfinite(value):
                raise bad(f"; {NONFINITE_NOTE}")
            raise bad()
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise bad(f"; {NONFINITE_NOTE}") from None
        if not math.isfinite(number):
            raise bad(f"; {NONFINITE_NOTE}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        if "\x00" in value:  # a NUL character fails every later use as a path or file name
            raise bad(" without NUL characters")
        return value
    raise TypeError(f"unsupported field type {tp!r} for {key}")


def _check_range(key: str, value: Any, where: str) -> None:
    """Check the metadata choices and bounds (min/ge/gt/le/lt) of a field on a value or on each item of a list."""
    if isinstance(value, list):
        for item in value:
            _check_range(key, item, where)
        return
    meta = FIELDS[key].metadata
    if "registry" in meta and value is not None and value not in REGISTRIES[meta["registry"]].extras:
        REGISTRIES[meta["registry"]].get(value, where)
    if "choices" in meta and value is not None and value not in meta["choices"]:
        close = difflib.get_close_matches(str(value), meta["choices"], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{where}: key '{key}' has value {value!r}; expected one of {', '.join(meta['choices'])}{hint}.")
    if value is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    checks = [("min", lambda v, b: v >= b, ">="), ("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for name, ok, sym in checks:
        if name in meta and not ok(value, meta[name]):
            raise ConfigError(f"{where}: key '{key}' has value {value!r}; expected a value {sym} {meta[name]}.")


def _check_value(key: str, value: Any, where: str) -> None:
    """Check one coerced value on its own: metadata bounds, then the list keys' own rules."""
    _check_range(key, value, where)
    if key == "seed":
        if not value:
            raise ConfigError(f"{where}: key 'seed' is an empty list; expected at least one integer seed.")
        seen: set[int] = set()
        for seed in value:
            if not 0 <= seed <= SEED_MAX:
                raise ConfigError(f"{where}: key 'seed' has value {seed!r}; expected an integer seed from 0 to "
                                  f"{SEED_MAX} (numpy's seed range).")
            if seed in seen:
                raise ConfigError(f"{where}: key 'seed' has value {value!r}, which lists seed {seed} more than once; "
                                  "expected distinct seeds (each seed runs once and writes its own seed folder).")
            seen.add(seed)
    if key == "device" and not value:
        raise ConfigError(f"{where}: key 'device' is an empty list; expected e.g. [\"0\"] or \"cpu\".")


def _first_nonfinite(value: Any, path: str = "") -> Optional[str]:
    """Where the first NaN/Infinity float sits in a JSON value: "" for the value itself, e.g. '["x"]' or
    '[1]' inside it, or None when every number is finite. Dicts and lists are walked in document order."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    if isinstance(value, dict):
        items = ((f"[{json.dumps(k) if isinstance(k, str) else repr(k)}]", v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for step, item in items:
        found = _first_nonfinite(item, path + step)
        if found is not None:
            return found
    return None


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|-?Infinity|NaN|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?')


def _locate_nonfinite(text: str) -> Optional[tuple[str, int, int]]:
    """The first NaN, Infinity, -Infinity or overflowing number (1e400) outside strings in JSON text
    that parsed: (token, line, column), or None."""
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token.startswith('"'):
            continue
        if token in ("NaN", "Infinity", "-Infinity") or (
            any(c in token for c in ".eE") and not math.isfinite(float(token))
        ):
            pos = match.start()
            return token, text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)
    return None


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(FIELDS), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see README.md for the list of keys."
    return ConfigError(f"{where}: unknown key '{key}'{hint}")


def config_from_dict(
    raw: Mapping[str, Any], where: str = "<config>", origins: Optional[Mapping[str, str]] = None
) -> ExperimentConfig:
    """Validate a raw key/value mapping and build the config.

    Args:
        raw: keys and JSON values, e.g. a loaded experiment file.
        where: the file name (or other origin) quoted in error messages.
        origins: per-key origins that replace ``where`` in messages about those keys, e.g.
            ``{"spr": "--set spr=bogus"}`` for values given on the command line.

    Raises:
        ConfigError: an unknown key (with the closest valid key), a value of the wrong type, a value
            out of range, or an inconsistent combination.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a JSON object of key/value pairs at the top level, not {raw!r}.")
    known = dict(origins or {})

    def origin(key: str) -> str:
        return known.get(key, where)

    values: dict[str, Any] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: key {key!r} is not a string; see README.md for the list of keys.")
        if key not in FIELDS:
            raise _unknown_key(key, origin(key))
        coerced = "none" if key == "spr" and value is None else _coerce(key, value, key_type(key), origin(key))
        _check_value(key, coerced, origin(key))
        values[key] = coerced
    core = {k: v for k, v in values.items() if k in CORE_FIELDS}
    cfg = ExperimentConfig(**core, extensions={k: v for k, v in values.items() if k not in CORE_FIELDS})
    if cfg.backbone_type:
        cfg.convnet_type = cfg.backbone_type
    _validate(cfg, origin)
    return cfg


def _validate(cfg: ExperimentConfig, origin: Callable[[str], str]) -> None:
    """Checks on whole keys and across keys; ``origin(key)`` names where a key's value came from."""
    recipe = None if cfg.spr == "none" else PRESETS.get(cfg.spr, origin("spr"))
    DATASETS.get(cfg.dataset, origin("dataset"))
    if cfg.weights_path is not None and not cfg.pretrained:
        where_w, where_p = origin("weights_path"), origin("pretrained")
        where = where_w if where_w == where_p else f"{where_w} and {where_p}"
        raise ConfigError(f"{where}: key 'weights_path' is set but key 'pretrained' is false; remove one of them.")
    LEARNERS.get(cfg.model_name, origin("model_name"))
    if Path(cfg.data_root).expanduser().is_file():
        raise ConfigError(f"{origin('data_root')}: key 'data_root' is {cfg.data_root}, a file; expected the folder that "
                          "holds the data sets (README, Data sets).")
    for key in COMPOSITION_KEYS:
        if getattr(cfg, key) is not None and (recipe is None or not recipe.selective):
            selective = [name for name, r in PRESETS.items() if r.selective]
            raise ConfigError(
                f"{origin(key)}: key '{key}' is set but spr {cfg.spr!r} has no scoring pass and task mask; "
                f"it applies to the presets {', '.join(selective)} (null leaves the preset's value)."
            )
    if cfg.budget is not None and recipe is not None and recipe.gate:
        raise ConfigError(f"{origin('budget')}: key 'budget' is set but spr {cfg.spr!r} takes its budget from "
                          "the gate; set gate_budget_large and gate_budget_small instead.")
    for group in KEY_GROUPS:
        if group.validate is not None:
            group.validate(cfg, origin)


#: keys that override a part of the spr preset (null = the preset's value)
COMPOSITION_KEYS = ("importance", "scoring_loss", "selection_scope", "budget", "tuning_optimizer", "gradient_drop",
                    "overlap_penalty", "freeze_rule", "exclude_embeddings", "strict_mask")


def parse_override(item: str) -> tuple[str, Any]:
    """Split one ``--set key=value`` item; the value is JSON if it parses, else a plain string.

    Raises:
        ConfigError: the item has no '=' or no key before it.
    """
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set mi_epochs=2")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: expected key=value with a key name before '=', e.g. --set mi_epochs=2")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON (JSONDecodeError), an over-long integer, deep nesting
        value = text
    return key, value


def _read_json_file(path: Union[str, Path]) -> dict[str, Any]:
    """Read and parse one config file: a JSON object in UTF-8, no duplicate keys, finite numbers only.

    Raises:
        ConfigError: the path is missing, a directory or unreadable; the bytes are not UTF-8; the text
            is not JSON or not an object; a key repeats; a number is NaN, Infinity or overflows.
    """
    where = str(path)
    p = Path(path)
    example = "expected a JSON file such as exps/ranpac/cifar.json"
    try:
        if p.is_dir():
            raise ConfigError(f"config file {where} is a directory ({example}).")
        if not p.is_file():
            if p.exists():
                raise ConfigError(f"config file {where} is not a regular file ({example}).")
            raise ConfigError(f"config file {where!s} does not exist ({example}).")
        data = p.read_bytes()
    except OSError as exc:  # permission denied, name too long, I/O error
        raise ConfigError(f"config file {where} cannot be read: {exc.strerror or exc} ({example}).") from None
    start = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as exc:
        offset = start + exc.start
        line = data.count(b"\n", 0, offset) + 1
        raise ConfigError(
            f"{where}: not valid UTF-8: byte 0x{data[offset]:02x} at byte offset {offset} (line {line}) cannot be "
            "decoded; save the file as UTF-8."
        ) from None
    if not text.strip():
        raise ConfigError(f"{where}: the file is empty; expected a JSON object of key/value pairs.")

    duplicates: list[tuple[dict, str, Any, Any]] = []

    def pairs_hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                duplicates.append((obj, key, obj[key], value))
            obj[key] = value
        return obj

    try:
        raw = json.loads(text, object_pairs_hook=pairs_hook)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
    except RecursionError:
        raise ConfigError(f"{where}: invalid JSON: arrays or objects are nested too deeply to read.") from None
    except ValueError:  # an integer literal with more digits than Python converts
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise ConfigError(f"{where}: invalid JSON: a number has more than {limit} digits.") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a JSON object of key/value pairs at the top level.")
    if duplicates:
        obj, key, first, second = duplicates[0]
        if obj is raw:
            raise ConfigError(f"{where}: key '{key}' appears more than once (values {first!r} and {second!r}); "
                              "expected each key once.")
        top = next((k for k, v in raw.items() if _holds(v, obj)), "?")
        raise ConfigError(f"{where}: key '{top}' holds an object in which key '{key}' appears more than once "
                          f"(values {first!r} and {second!r}); expected each key once.")
    for key, value in raw.items():
        inner = _first_nonfinite(value)
        if inner is None:
            continue
        if key not in FIELDS:
            break  # config_from_dict names the unknown key first
        tp = key_type(key)
        if not inner:
            expected = _type_name(tp)
        elif typing.get_origin(tp) is list:
            expected = _type_name(typing.get_args(tp)[0])
        else:
            expected = "a finite number"
        found = _locate_nonfinite(text)  # the same number: both walk the document in order
        token, at = (found[0], f" (line {found[1]}, column {found[2]})") if found else (repr(value), "")
        nested = f" at {key}{inner}" if inner else ""
        raise ConfigError(f"{where}: key '{key}' has value {token}{nested}{at}; expected {expected}; {NONFINITE_NOTE}.")
    return raw


def _holds(value: Any, target: Any) -> bool:
    """Whether ``target`` is ``value`` or nested inside it (by identity)."""
    if value is target:
        return True
    if isinstance(value, dict):
        return any(_holds(v, target) for v in value.values())
    if isinstance(value, list):
        return any(_holds(v, target) for v in value)
    return False


def load_config(path: Optional[Union[str, Path]], overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment JSON file, apply ``--set`` overrides and validate.

    Args:
        path: JSON file with official keys, or None for all defaults.
        overrides: ``key=value`` strings, applied in order after the file; values are parsed against
            the key's type (``--set use_RP=False``, ``--set seed=[1,2]``, ``--set device=cpu``; a number
            or true/false given for a string key, e.g. ``--set prefix=2024``, is kept as the text).

    Raises:
        ConfigError: unreadable file, invalid JSON, or any validation error (see config_from_dict).
            Errors about a value given with ``--set`` name that ``--set KEY=VALUE``, not the file.
    """
    raw: dict[str, Any] = {}
    where = "<defaults>"
    if path is not None:
        where = str(path)
        raw = _read_json_file(path)
        raw["config"] = where
    origins: dict[str, str] = {}
    for item in overrides:
        key, value = parse_override(item)
        origin = f"--set {item}"
        if key not in FIELDS:
            raise _unknown_key(key, origin)
        tp = key_type(key)
        text = item.split("=", 1)[1].strip()
        if tp in (str, Optional[str]) and isinstance(value, (bool, int, float)):
            value = text  # a name that reads as a number or boolean, e.g. prefix=2024 or prefix=NaN
        if _first_nonfinite(value) is not None:
            raise ConfigError(f"{origin}: key '{key}' has value {text}; expected {_type_name(tp)}; {NONFINITE_NOTE}.")
        if tp in (bool, Optional[bool]) and value in ("True", "False"):
            value = value == "True"  # a command-line word, not the official JSON string quirk
        if not (key == "spr" and value is None):
            value = _coerce(key, value, tp, origin)
            _check_value(key, value, origin)
        raw[key] = value
        origins[key] = origin
    return config_from_dict(raw, where, origins)


def warn_ignored(key: str, value: Any, used: Any, reason: str = "") -> None:
    """Log that a JSON key is ignored in favour of the official constant, when the two differ (STYLE 3.2)."""
    if value != used:
        logging.getLogger(__name__).warning("Config key '%s' = %r is ignored: %r is used, as the official code does. %s",
                                           key, value, used, reason)


# ---------------------------------------------------------------------------------------------
# README's key tables, generated from the fields' help texts
# ---------------------------------------------------------------------------------------------
#: the core keys' tables: (title, first key of the section), in field order
CORE_SECTIONS = (
    ("Official keys", "dataset"),
    ("Official keys the original ignores (accepted, unused)", "prefix"),
    ("Backbone", "backbone_type"),
    ("Data", "data_root"),
    ("Tuning-phase options and fixes of official quirks", "mist_tasks"),
    ("Composition of the tuning phase (null = the preset's part; task-level presets only)", "importance"),
    ("Runtime", "seed_torch_with_seed"),
)
README_START, README_END = "<!-- config-keys:start -->", "<!-- config-keys:end -->"


def markdown_tables() -> str:
    """Every config key as README's markdown tables: the core sections, then each component's keys (titled by the
    component, in title order), each row ``| `key` | `default` | help |``. README.md holds this text between ``README_START`` and
    ``README_END`` (``python -m utils.config --write-readme``; a test checks they agree)."""
    load_components()
    starts = {first: title for title, first in CORE_SECTIONS}
    groups: list[tuple[str, list[str]]] = []
    for name in CORE_FIELDS:
        if name in starts or not groups:
            groups.append((starts.get(name, "Keys"), []))
        groups[-1][1].append(name)
    groups += [(g.title, list(g.names)) for g in sorted(KEY_GROUPS, key=lambda g: g.title.lower())]
    out = []
    for title, names in groups:
        out += [f"**{title}**", "", "| key | default | meaning |", "|---|---|---|"]
        for name in names:
            help_text = describe(name).replace("|", "\\|")
            default = json.dumps(_default(FIELDS[name]))
            out.append(f"| `{name}` | `{default}` | {help_text} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def describe(name: str) -> str:
    """The help text of config key ``name``; for a key whose values are registered names, followed by the names
    registered now (aliases in brackets), so the help never lists a name that is not there."""
    meta = FIELDS[name].metadata
    if "registry" not in meta:
        return meta["help"]
    registry = REGISTRIES[meta["registry"]]
    names = [n + (f" ({', '.join(registry.aliases(n))})" if registry.aliases(n) else "") for n in registry.names()]
    return f"{meta['help']} Registered: {', '.join([*names, *registry.extras])}."


def _write_readme(path: Path) -> bool:
    """Replace README's generated region with :func:`markdown_tables`; True if the file changed.

    Raises:
        ValueError: the file lacks the start or end marker.
    """
    text = path.read_text(encoding="utf-8")
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} region")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    new = f"{head}{README_START}\n{markdown_tables()}{README_END}{tail}"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m utils.config``: print the key tables, or ``--write-readme`` to update README.md's region."""
    import argparse

    parser = argparse.ArgumentParser(description="Print the config keys as markdown, or update README.md's tables.")
    parser.add_argument("--write-readme", type=Path, nargs="?", const=Path(__file__).resolve().parents[1] / "README.md",
                        help="rewrite the generated region of README.md (default path: the repository's)")
    args = parser.parse_args(argv)
    if args.write_readme is not None:
        try:
            changed = _write_readme(args.write_readme)
        except (OSError, ValueError) as exc:
            print(f"error: --write-readme {args.write_readme}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return 2
        print("updated" if changed else "unchanged", args.write_readme)
    else:
        sys.stdout.write(markdown_tables())
    return 0


if __name__ == "__main__":  # run as utils.config, the module the components register their keys in
    from utils import config as _registered

    sys.exit(_registered.main())
