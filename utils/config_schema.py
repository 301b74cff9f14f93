"""The config's schema (``utils/config.py``): the core keys of :class:`ExperimentConfig` (official JSON names), the keys
components declare in their own files (:func:`config_keys`), and :data:`FIELDS`, every key by name."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, Literal, Optional

from utils.registry import LEARNERS, load_components

SEED_MAX = 2**32 - 1  # numpy.random.seed accepts 0 .. 2**32 - 1
NONFINITE_NOTE = "NaN, Infinity and numbers too large for a float (such as 1e400) are not allowed"
DEVICE_FORMS = '["0"] (cuda:0), "cpu", -1 (cpu), "cuda:N" or "mps"'


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (mutable defaults are copied per instance).

    ``kw``: bounds ``min``/``ge``/``gt``/``le``/``lt``, ``choices`` (a tuple), or ``registry`` (a name of
    ``utils.registry.ALL``: the value must be registered there, or null).
    """
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                                 metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


key = _f  # the public name for components that declare their own keys (see config_keys)


UNUSED = "Accepted for compatibility; unused, as in the original."


@dataclasses.dataclass
class ExperimentConfig:
    """Every key of an experiment JSON file (algorithms.md §1.2), plus the documented extras.

    Field names are exactly the official JSON keys. Defaults are the official values of the
    shipped configs where one exists. ``metadata["help"]`` documents each key; README.md lists them.
    """

    # ---- official keys: data and task split (algorithms.md §1.2, §2) ----
    dataset: str = _f("cifar224", "Data set, a registered name (utils/datasets.py).", registry="dataset")
    shuffle: bool = _f(True, "Permute the class order with numpy's legacy global seed (algorithms.md §2.2).")
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
        56, "Loader batch size. RanPAC uses it; SimpleCIL uses 32 unless use_config_batch_size (algorithms.md §9.2).",
        min=1
    )
    device: list[str] = _f(["0"], 'Device: ["0"] (cuda:0), "cpu", -1 (cpu), "cuda:N" or "mps". '
                                  "Only the first entry is used.")
    # ---- official keys: sparse tuning (algorithms.md §4, §5) ----
    spr: str = _f("mist", "Tuning phase before the learner's own training and head update, a registered preset "
                          "(models/sparse/presets.py) or 'none' (or null), which disables it. As in the official "
                          "code, SimpleCIL ignores 'cerun' and RanPAC ignores 'run' (no tuning phase, with a warning). "
                          "The registered presets (README, docs/deviations.md):", registry="preset")
    # select_rate, drop_rate, mi_epochs (official keys too) are MIST's: models/sparse/presets.py, MistKeys
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
    weights_path: Optional[str] = _f(None, "Local weights file (.npz, .safetensors, .pth, .bin) "
                                           "instead of the model hub.")
    backbone_kwargs: dict[str, Any] = _f({}, "Extra keyword arguments for timm.create_model "
                                             "(e.g. a tiny ViT for tests).")
    # ---- extras: data ----
    data_root: str = _f("./data", "Folder holding the data sets (layout in README.md).")
    download: bool = _f(True, "Let torchvision download cifar224/fmnist when missing and the internet is reachable.")
    input_size: int = _f(224, "Image side length fed to the backbone (official: 224).", min=8)
    train_per_class: Optional[int] = _f(None, "Keep only the first N training images of each class (quick runs).",
                                        min=1)
    test_per_class: Optional[int] = _f(None, "Keep only the first N test images of each class (quick runs).", min=1)
    use_input_norm: Optional[bool] = _f(
        None, "Normalise inputs with the backbone's mean/std; null = dataset default (only cars normalises, "
        "algorithms.md §2.1)."
    )
    num_workers: int = _f(8, "DataLoader worker processes (official: 8).", min=0)
    # ---- extras: sparse tuning options and fixes (algorithms.md §4, §9) ----
    mist_tasks: Literal["all", "first"] = _f("all", "Tasks that run the tuning phase: all (official) or first.")
    use_config_batch_size: bool = _f(
        False, "Use batch_size from the JSON where the official learner hard-codes one (SimpleCIL 32, SLCA 128)."
    )
    exempt_rule: Literal["name", "ndim"] = _f(
        "name", "Always-trainable tensors: official name substrings, or structural (ndim < 2) for CNN backbones."
    )
    freeze_bn_stats: bool = _f(False, "Keep BatchNorm running statistics fixed while tuning and in SLCA's slow learner "
                                      "(CNN backbones; ViTs have none).")
    ablation_epochs: int = _f(
        20, "Epochs of the CE tuning phases rand/l2/grad/run/cerun/ce_finetune (official module constant 20).", min=1
    )
    ablation_random_init_rows: bool = _f(False, "Ablations: random instead of zero new cosine rows "
                                                "(algorithms.md §9.24 fix).")
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
    gradient_drop: Optional[bool] = _f(None, "MIST's per-step random drop of selected gradients on/off; "
                                             "null = preset's.")
    overlap_penalty: Optional[bool] = _f(None, "MIST's 0.9**count overlap penalty on/off; null = the preset's.")
    freeze_rule: Optional[bool] = _f(None, "MIST's end-of-task frozen sets on/off; null = the preset's.")
    exclude_embeddings: Optional[bool] = _f(
        None, "Keep patch/position embeddings, class token and CNN stem out of selection, their gradients masked (the "
        "default weight decay still shrinks them, deviation 4: sparse_weight_decay or hard_freeze stops that); "
        "null = preset's."
    )
    strict_mask: Optional[bool] = _f(
        None, "A tensor with no selected entry stays frozen (true) or fully trainable (false: official PIECE, "
        "algorithms.md §13.4); null = the preset's (piece_f/piece_s false, magnitude_gate true).",
    )
    # ---- extras: runtime ----
    seed_torch_with_seed: bool = _f(False, "Seed torch with the run seed instead of the official constant 1 "
                                           "(algorithms.md §9.22).")
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
    loggers: list[str] = _f(
        [], "Event loggers of a run: [] (none) or [\"tensorboard\"]: per-step losses, per-epoch training accuracy, "
        "per-task accuracy, A-bar, forgetting, tuning fractions and the accuracy matrix under "
        "<run>/seed<seed>/tensorboard (rank 0; utils/tensorboard_log.py; open with tensorboard --logdir RUN)."
    )
    strict_keys: bool = _f(
        False, "A key of a component the run does not use (another learner's key, a key the spr preset does not read) "
        "is an error instead of a warning."
    )
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
        """Per-step keep probability of a selected gradient entry, ``1 - drop_rate`` (algorithms.md §4.6)."""
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
    ``validate(cfg, origin)`` (``origin(key)`` names where a key's value came from; raises ConfigError), an
    optional ``applies(cfg)``: False when the run does not use the component (its keys then have no effect:
    :func:`inactive_keys`), and an optional ``uses(cfg, key)``: the same per key, with the reason when the key is
    not read (``None``: it is read), e.g. a tuning preset's key when ``spr`` names another preset."""

    title: str
    names: tuple[str, ...]
    validate: Optional[Callable[[Any, Callable[[str], str]], None]] = None
    applies: Optional[Callable[[Any], bool]] = None
    unused_because: Optional[Callable[[Any, str], Optional[str]]] = None


T = typing.TypeVar("T", bound="ConfigKeys")


class ConfigKeys:
    """Base of a component's key class (:func:`config_keys`): ``MyKeys.of(cfg)`` is the component's keys with the
    run's values, typed, e.g. ``SlcaKeys.of(cfg).ca_epochs`` (an ``int`` to a type checker; ``cfg.ca_epochs`` is
    ``Any``)."""

    @classmethod
    def of(cls: type[T], cfg: "ExperimentConfig") -> T:
        """The keys of this class with ``cfg``'s values (defaults where the config does not set them)."""
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


KEY_GROUPS: list[KeyGroup] = []


def config_keys(title: str, validate: Optional[Callable[[Any, Callable[[str], str]], None]] = None,
                applies: Optional[Callable[[Any], bool]] = None,
                unused_because: Optional[Callable[[Any, str], Optional[str]]] = None) -> Callable[[type], type]:
    """Class decorator: the annotated fields of the class (``name: type = key(default, help, **bounds)``) become
    config keys, validated and documented like the core ones and read as ``cfg.<name>``.

    A learner or tuning preset declares its keys in its own file this way, so adding one touches no list
    elsewhere. Subclass :class:`ConfigKeys` for the typed accessor ``MyKeys.of(cfg)``. ``title`` heads the keys'
    table in README.md (``python -m utils.config --markdown``); ``validate``, ``applies`` and ``unused_because``: see
    :class:`KeyGroup` (e.g. ``applies=for_learners("slca")``; a tuning preset's keys:
    ``unused_because=models.sparse.presets.unread_by_preset``).

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
        KEY_GROUPS.append(KeyGroup(title, tuple(names), validate, applies, unused_because))
        return dc

    return wrap


def for_learners(*names: str) -> Callable[[Any], bool]:
    """An ``applies`` rule for :func:`config_keys`: the run's ``model_name`` is one of the registered learners
    ``names`` (aliases resolved)."""
    return lambda cfg: LEARNERS.resolve(cfg.model_name) in names


class InactiveKey(typing.NamedTuple):
    """A key set to a non-default value that the run does not read: the key, its component's title, and why."""

    key: str
    owner: str
    why: str


def inactive_keys(cfg: "ExperimentConfig") -> list[InactiveKey]:
    """Every component key set to a non-default value that the run does not read (:class:`KeyGroup` ``applies`` and
    ``unused_because``): the key has no effect (warned at the run's start; an error with ``strict_keys``)."""
    load_components()
    out = []
    for group in KEY_GROUPS:
        for name in group.names:
            if getattr(cfg, name) == _default(EXTENSION_FIELDS[name]):
                continue
            if group.applies is not None and not group.applies(cfg):
                out.append(InactiveKey(name, group.title, f"this run's learner is {cfg.model_name}"))
            elif group.unused_because is not None:
                why = group.unused_because(cfg, name)
                if why is not None:
                    out.append(InactiveKey(name, group.title, why))
    return out


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


#: keys that override a part of the spr preset (null = the preset's value)
COMPOSITION_KEYS = ("importance", "scoring_loss", "selection_scope", "budget", "tuning_optimizer", "gradient_drop",
                    "overlap_penalty", "freeze_rule", "exclude_embeddings", "strict_mask")
