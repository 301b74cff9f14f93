"""The tuning phase as a composition of named parts, and the ``spr`` presets built from them (issue 6, issue 12).

A :class:`Recipe` names every part of one tuning phase:

- **importance estimator** (``estimators.py``; task-level presets only): ``mi_fisher`` (MIST), ``fisher`` (PIECE-F),
  ``second_order`` (PIECE-S), ``magnitude``, ``random``;
- **loss** (``losses.py``): MIST's supervised contrastive loss on the projection head (``contrastive``), or
  cross-entropy on a cosine head over the task's classes (``ce``);
- **selection scope** (``scopes.py``): ``per_tensor``, ``global``, ``per_block``;
- **budget**: the selected fraction (a config key of the preset, or the gate's per-task choice);
- **optimizer** (``optim.py``): MIST's SGD groups (``mist_sgd``) or PIECE's Adam (``adam``);
- MIST's per-step **drop**, **overlap** penalty and **frozen** sets, each on or off;
- **exclude_embeddings** and **strict_mask** (PIECE's fully-trainable-tensor quirk off);
- **gate**: update-magnitude control (``gate.py``) picks the budget per task;
- **step_rule** (``per_step.py``): the official CE ablations re-select their gradient entries every step.

A preset is a registered :class:`Preset` (``utils.registry.PRESETS``): the parts, which config keys give its budget
and epochs, the keys of its own parameters, its report label and order, and its source. Adding one is one call to
:func:`register_preset` (``docs/extending.md``). Config keys named in ``COMPOSITION_KEYS`` override a part of a
task-level preset. Every built-in preset is pinned by ``tests/test_presets_unchanged.py``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from utils.config import COMPOSITION_KEYS, ConfigKeys, ExperimentConfig, config_keys, key
from utils.registry import PRESETS

#: keys a preset reads because one of its parts has this value (besides its own ``keys``, budget, epochs and
#: learning-rate keys)
PART_KEYS: dict[tuple[str, Any], tuple[str, ...]] = {
    ("drop", True): ("drop_rate",), ("freeze", True): ("freeze_quantile",),
    ("loss", "contrastive"): ("exclude_self_positive",), ("score_loss", "contrastive"): ("exclude_self_positive",),
    ("optimizer", "mist_sgd"): ("mist_lr",), ("optimizer", "adam"): ("adam_lr", "adam_head_lr")}
#: keys of the masked step that any tuning phase may read (never reported as unread while a phase runs)
PHASE_KEYS = ("hard_freeze", "sparse_weight_decay")


def read_keys(preset: "Preset") -> set[str]:
    """The tuning-phase keys a preset reads: its own ``keys``, its budget, epochs and learning-rate keys, the keys of
    its parts (:data:`PART_KEYS`) and :data:`PHASE_KEYS`."""
    out = {*preset.keys, *PHASE_KEYS} | {k for k in (preset.budget_key, preset.epochs_key, preset.lr_key) if k}
    for (part, value), keys in PART_KEYS.items():
        if preset.parts.get(part) == value:
            out.update(keys)
    return out


def unread_by_preset(cfg: ExperimentConfig, name: str) -> Optional[str]:
    """``unused_because`` of the tuning presets' key groups (``utils.config.KeyGroup``): why the run does not read
    tuning-phase key ``name`` (``spr`` none, or a preset that does not read it), or None. With a composition key set
    (``importance``, ``tuning_optimizer``, ...) the parts differ from the preset's, so only ``spr`` none counts."""
    if cfg.tuning is None:
        return "spr is 'none' (no tuning phase)"
    if any(getattr(cfg, k) is not None for k in COMPOSITION_KEYS) or cfg.spr not in PRESETS:
        return None
    preset = PRESETS.get(cfg.spr)
    if name in read_keys(preset):
        return None
    readers = [n for n, p in PRESETS.items() if name in read_keys(p)]
    return f"spr {cfg.spr!r} does not read it (read by {', '.join(readers)})"


@config_keys("MIST (models/sparse/presets.py; select_rate, drop_rate and mi_epochs are official JSON keys)",
             unused_because=unread_by_preset)
class MistKeys(ConfigKeys):
    select_rate: float = key(0.1, "Fraction of each maskable tensor selected by importance score (algorithms.md §4.5).",
                             gt=0, le=1)
    drop_rate: float = key(0.9, "Probability of DROPPING a selected gradient entry at each step; keep prob = "
                                "1 - drop_rate.", ge=0, lt=1)
    mi_epochs: int = key(20, "MIST epochs per task, the scoring pass included (algorithms.md §4.4-4.6); also the "
                             "epochs of PIECE, SPU, SPG and GPS.", min=1)
    freeze_quantile: Optional[float] = key(
        None, "Quantile of scores frozen at the end of a task; null = learner default (RanPAC 0.9995, SimpleCIL 1.0).",
        ge=0, le=1)
    exclude_self_positive: bool = key(False, "NT-Xent: drop the anchor itself from its positive set (algorithms.md "
                                             "§9.5 fix).")
    sparse_weight_decay: bool = key(False, "Apply weight decay only to entries the step may move (algorithms.md §9.4 "
                                           "fix).")
    hard_freeze: bool = key(False, "Restore every entry with a zero gradient multiplier after each step (algorithms.md "
                                   "§9.4 fix).")


@config_keys("PIECE (models/sparse/presets.py)", unused_because=unread_by_preset)
class PieceKeys(ConfigKeys):
    top_ratio: float = key(0.001, "PIECE: global fraction of backbone entries selected per task (algorithms.md §13.3).",
                           gt=0, le=1)
    piece_scoring_batch_size: Optional[int] = key(
        4, "PIECE: batch size of the scoring pass, over the task's un-augmented images in order (official 4, "
        "algorithms.md §13.5); null: the training loader (augmented, shuffled, batch_size), as before issue 15.", ge=1)
    piece_clip_norm: float = key(
        1.0, "PIECE: clip the global gradient norm at this value before each step (DeepSpeed gradient_clipping 1.0 "
        "of the official run); 0: no clipping.", ge=0)
    tuning_steps: Optional[int] = key(
        None, "Optimizer steps of a task-level preset's training after the scoring pass, whatever the epochs key "
        "says (PIECE's official run: 5 epochs of 1,000 examples at batch 64, about 78 steps); null: the epochs.", ge=1)


@dataclass(frozen=True)
class Recipe:
    """One tuning phase, part by part, with the config's values (see the module docstring for each part).

    Attributes:
        preset: the ``spr`` name it came from (the report's ``method``).
        loss: a registered loss (``"contrastive"``, ``"ce"``).
        importance: estimator name, or None for the per-step presets (no scoring pass).
        scope: a registered selection scope (None with no estimator).
        budget: selected fraction in (0, 1] (None with no estimator, or when the gate picks it).
        step_rule: a registered per-step mask rule, or None (dense, or a task-level preset).
        optimizer: a registered tuning optimizer.
        drop, overlap, freeze: MIST's per-step drop, overlap penalty and frozen sets.
        exclude_embeddings: patch/position embeddings, class token (and a CNN's stem) are never selected.
        strict_mask: False reproduces PIECE's "a tensor with no selected entry is fully trainable".
        gate: update-magnitude control picks the budget per task.
        head: the CE head at the task's start (:meth:`~models.sparse.tuner.SparseTuner.task_head`): ``"official"``
            (the CE ablations' cosine head, random on task 0, zero later, algorithms.md §9.24), ``"prototypes"`` (a
            cosine head whose rows are the task's class means, scale ``head_scale``), ``"timm_linear"`` (a new linear
            classifier as timm's ViT head: trunc-normal 0.02, zero bias) or ``"linear"`` (a new ``nn.Linear`` with
            torch's default init).
        epochs: epochs of the phase, the scoring pass included for task-level presets.
        score_loss: the loss of the scoring pass when it is not ``loss`` (GPS scores with a contrastive loss and
            trains with CE); None: ``loss``.
        phase: a registered phase (``utils.registry.PHASES``) that runs the task instead of the selective or
            per-step phase (ACL's dense adaptation); None: by ``importance``.
        piece_port: PIECE's official scoring data (``piece_scoring_batch_size``, the task's un-augmented images in
            order) and gradient clipping (``piece_clip_norm``); False: score on the training loader, no clipping.
        head_scale: the ``"prototypes"`` head's logit scale sigma at the task's start (None: 1, plain cosine
            logits); e.g. 100, CLIP's logit scale, for SPU and SparCL.
    """

    preset: str
    loss: str
    importance: Optional[str]
    scope: Optional[str]
    budget: Optional[float]
    step_rule: Optional[str]
    optimizer: str
    drop: bool
    overlap: bool
    freeze: bool
    exclude_embeddings: bool
    strict_mask: bool
    gate: bool
    head: str
    epochs: int
    score_loss: Optional[str] = None
    phase: Optional[str] = None
    piece_port: bool = False
    head_scale: Optional[float] = None

    @property
    def selective(self) -> bool:
        """True for a scoring pass followed by a mask fixed for the task."""
        return self.importance is not None


@dataclass(frozen=True)
class Preset:
    """A registered ``spr`` value: the parts of its :class:`Recipe` and what the report and docs need.

    Attributes:
        name: the ``spr`` value.
        parts: every :class:`Recipe` field but ``preset``, ``budget`` and ``epochs``.
        budget_key: the config key of its budget (None: the gate picks it, or no selection).
        epochs_key: the config key of its epochs.
        label: the report's name for it.
        order: its row in the report (baseline first, the proposed method last, as the paper's tables).
        source: paper / official file / algorithms.md section.
        keys: the config keys of its own parameters: a run that sets one to a non-default value is another
            method in the report, named with it.
        official: an ``spr`` value of the official code, subject to a learner's ``OFFICIAL_DISPATCH``.
        compare: one of the methods of the comparison runner (``exps/importance/run.py``).
        lr_key: the config key of its backbone learning rate (the comparison protocol calibrates it).
    """

    name: str
    parts: dict[str, Any]
    budget_key: Optional[str]
    epochs_key: str
    label: str
    order: int
    source: str
    keys: tuple[str, ...] = ()
    official: bool = False
    compare: bool = False
    lr_key: Optional[str] = None

    @property
    def selective(self) -> bool:
        """True for a task-level preset (an importance estimator: a scoring pass, then a mask fixed for the task)."""
        return self.parts["importance"] is not None

    @property
    def gate(self) -> bool:
        """True when update-magnitude control picks the budget per task."""
        return bool(self.parts["gate"])

    def recipe(self, cfg: ExperimentConfig) -> Recipe:
        """The recipe with ``cfg``'s budget and epochs (no composition overrides: see :func:`resolve_recipe`).

        Raises:
            AttributeError: ``cfg`` has no budget or epochs key of this preset.
        """
        budget = getattr(cfg, self.budget_key) if self.budget_key else None
        return Recipe(preset=self.name, budget=budget, epochs=getattr(cfg, self.epochs_key), **self.parts)


def register_preset(name: str, *, like: Optional[str] = None, **fields: Any) -> Preset:
    """Register a preset: ``fields`` are :class:`Preset` attributes and :class:`Recipe` parts; with ``like``, the
    parts and keys of that registered preset are the starting point.

    Raises:
        ValueError: the name is taken, or a part is missing.
    """
    base = PRESETS.peek(like) if like else None
    if like and base is None:
        raise ValueError(f"preset {like!r} is not registered yet")
    names = {f.name for f in dataclasses.fields(Preset)}
    parts = {**(base.parts if base else {}), **{k: v for k, v in fields.items() if k not in names}}
    required = {f.name for f in dataclasses.fields(Recipe) if f.default is dataclasses.MISSING}
    missing = required - {"preset", "budget", "epochs"} - set(parts)
    if missing:
        raise ValueError(f"preset {name!r} lacks the parts {sorted(missing)}")
    own = {k: v for k, v in fields.items() if k in names}
    if base is not None:
        inherited = {k: getattr(base, k) for k in ("budget_key", "epochs_key", "keys", "source", "official", "compare",
                                                   "lr_key")}
        own = {**inherited, **own}
    return PRESETS.register(name, Preset(name=name, parts=parts, **own))


# ---- the built-in presets ------------------------------------------------------------------------
_MIST_SOURCE = "MIST (official RanPAC-MIST / SimpleCIL-MIST files), algorithms.md §4"
register_preset("mist", loss="contrastive", importance="mi_fisher", scope="per_tensor", step_rule=None,
                optimizer="mist_sgd", drop=True, overlap=True, freeze=True, exclude_embeddings=False,
                strict_mask=False, gate=False, head="prototypes", budget_key="select_rate", epochs_key="mi_epochs",
                label="MIST", order=110, source=_MIST_SOURCE, official=True, lr_key="mist_lr")
register_preset("mist_random", like="mist", importance="random", label="MIST, random scores", order=70,
                source="ours: random selection at MIST's budget", official=False, compare=True)
register_preset("piece_f", loss="ce", importance="fisher", scope="global", step_rule=None, optimizer="adam",
                drop=False, overlap=False, freeze=False, exclude_embeddings=True, strict_mask=False, gate=False,
                head="prototypes", budget_key="top_ratio", epochs_key="mi_epochs", label="PIECE-F", order=80,
                source="PIECE-F (github wanglingxiang0717/PIECE), algorithms.md §13",
                keys=("top_ratio", "adam_lr", "adam_head_lr", "piece_scoring_batch_size", "piece_clip_norm",
                      "tuning_steps"),
                compare=True, lr_key="adam_lr", piece_port=True)
register_preset("piece_s", like="piece_f", importance="second_order", label="PIECE-S", order=90,
                source="PIECE-S (github wanglingxiang0717/PIECE), algorithms.md §13")
# strict: with PIECE's rule a small budget leaves more tensors fully trainable than a large one, which would invert
# the gate's "small update" regime (docs/deviations.md, section 4)
# the gate keeps the scoring data and unclipped steps it was calibrated with (piece_port False)
register_preset("magnitude_gate", like="piece_f", gate=True, strict_mask=True, budget_key=None, compare=True,
                piece_port=False,
                label="update-magnitude gate", order=100,
                source="update-magnitude control (reconstructed), algorithms.md §14.3",
                keys=("adam_lr", "adam_head_lr", "gate_threshold", "gate_budget_large", "gate_budget_small",
                      "gate_memory", "gate_ema", "tuning_steps"))
_ABLATION = dict(loss="ce", importance=None, scope=None, optimizer="mist_sgd", drop=False, overlap=False,
                 freeze=False, exclude_embeddings=False, strict_mask=False, gate=False, head="official",
                 budget_key=None, epochs_key="ablation_epochs", source="official CE ablations, algorithms.md §5",
                 official=True, lr_key="mist_lr")
register_preset("rand", step_rule="rand", label="rand", order=10, **_ABLATION)
register_preset("l2", step_rule="l2", label="l2", order=20, **_ABLATION)
register_preset("grad", step_rule="grad", label="grad", order=30, **_ABLATION)
register_preset("run", step_rule=None, label="run", order=40, **_ABLATION)
register_preset("cerun", step_rule=None, label="cerun", order=50, **_ABLATION)
register_preset("ce_finetune", step_rule=None, label="CE fine-tuning", order=60,
                **{**_ABLATION, "official": False, "source": "ours: dense CE fine-tuning (what run/cerun do)"},
                compare=True)

#: config key -> Recipe field it overrides (``utils.config.COMPOSITION_KEYS``)
OVERRIDES = {"importance": "importance", "scoring_loss": "loss", "selection_scope": "scope", "budget": "budget",
             "tuning_optimizer": "optimizer", "gradient_drop": "drop", "overlap_penalty": "overlap",
             "freeze_rule": "freeze", "exclude_embeddings": "exclude_embeddings", "strict_mask": "strict_mask"}
assert set(OVERRIDES) == set(COMPOSITION_KEYS)


def preset(cfg: ExperimentConfig) -> Recipe:
    """The recipe that ``cfg.spr`` names, before the config's composition overrides.

    Raises:
        ConfigError: ``cfg.spr`` is "none" or not a registered preset.
    """
    return PRESETS.get(cfg.spr).recipe(cfg)


def resolve_recipe(cfg: ExperimentConfig) -> Recipe:
    """The recipe of ``cfg.spr`` with every non-null composition key of ``cfg`` applied.

    Raises:
        ConfigError: ``cfg.spr`` is "none" or not a registered preset.
    """
    recipe = preset(cfg)
    changes = {part: getattr(cfg, k) for k, part in OVERRIDES.items() if getattr(cfg, k, None) is not None}
    return dataclasses.replace(recipe, **changes) if changes else recipe


def compared_methods() -> list[str]:
    """The comparison runner's methods: no tuning, then every preset marked ``compare`` and MIST, in report order."""
    chosen = [p for _, p in PRESETS.items() if p.compare or p.name == "mist"]
    return ["none", *(p.name for p in sorted(chosen, key=lambda p: p.order))]
