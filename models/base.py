"""Learner base: the per-task protocol (tune, then update the head), feature extraction and prediction."""

from __future__ import annotations

import abc
import logging
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.drift import DriftMeter
from models.loop import TuningLoop
from models.sparse import build_tuner
from utils import distributed
from utils.config import ExperimentConfig
from utils.loaders import make_loader
from utils.runtime import GeneratorState, Stateful, autocast, make_generator

logger = logging.getLogger(__name__)


@dataclass
class TaskData:
    """What a learner sees of one task.

    Attributes:
        task_id: 0-based task index.
        known: classes learned before this task (remapped labels ``[0, known)``).
        seen: classes learned after this task; the task's classes are ``[known, seen)``.
        n_classes: classes in the whole data set.
        train: the task's training images with train transforms.
        train_eval: the same images with test transforms (prototypes, ridge features).
        test: test images of every class ``< seen``, test transforms.
    """

    task_id: int
    known: int
    seen: int
    n_classes: int
    train: Dataset
    train_eval: Dataset
    test: Dataset


class Learner(abc.ABC):
    """A class-incremental learner: a backbone, a classifier rule, and the hooks a task goes through.

    Per task (:meth:`learn_task`): the tuning phase named by ``spr`` (algorithms.md §4-5; MIST is "applied before" its
    host learner), then :meth:`train_task` (the learner's own training: a slow-learning backbone, prompts,
    adapters; nothing for SimpleCIL and RanPAC), then :meth:`update_head` (features of the trained backbone ->
    classifier). A learner is one file: register it with ``@LEARNERS.register(name)`` (utils/registry.py) and
    give it the class attributes below; ``docs/extending.md`` walks through SLCA.

    Args:
        cfg: the experiment config.
        backbone: what :meth:`build_backbone` returned: ``backbone(x)`` -> (B, D), with ``out_dim`` = D.
        device: where the backbone and heads live.
        seed: the run seed (loader shuffling, the tuner's and the learner's random streams).
    """

    #: learner-specific constants of the official code (overridable by config keys where noted)
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    #: the report's name and position of the learner
    TITLE: ClassVar[str] = ""
    ORDER: ClassVar[int] = 100
    #: the official file the learner reproduces (named in warnings), and the ``spr`` presets it dispatches to a
    #: tuning phase (algorithms.md §5); None: every preset runs. Presets marked ``official=False`` always run.
    OFFICIAL_FILE: ClassVar[Optional[str]] = None
    OFFICIAL_DISPATCH: ClassVar[Optional[frozenset[str]]] = None
    #: the classifier's state: names of attributes holding a tensor or None, saved in checkpoints by the default
    #: :meth:`head_state` and counted by the default :meth:`head_parameter_count`
    HEAD_STATE: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int) -> None:
        self.cfg = cfg
        self.device = device
        self.backbone = backbone.to(device).eval()
        self.feature_dim = int(backbone.out_dim)
        self.loader_generator = make_generator(seed, stream="loader")
        self.seed = seed
        self.loop = TuningLoop(device, cfg.progress)
        self.tuner = None
        if cfg.tuning is not None:
            # None when the learner's official code does not dispatch cfg.spr (algorithms.md §5; warned there)
            self.tuner = build_tuner(cfg, self.tuned_module(), device, seed, self.DEFAULTS, learner=type(self))
        #: per-task drift measurements (``models/drift.py``; None with ``measure_drift: false``)
        self.drift = DriftMeter(self) if cfg.measure_drift else None

    @classmethod
    def build_backbone(cls, cfg: ExperimentConfig) -> nn.Module:
        """The feature extractor of this learner, built before the learner (``models.build_learner``).

        Default: the timm model of ``cfg.convnet_type`` with its pretrained weights (``backbones.build_backbone``).
        A learner that adds prompts or adapters to the timm model does it here.

        Raises:
            WeightsError, ConfigError: see ``backbones.build_backbone``.
        """
        from backbones import build_backbone

        return build_backbone(cfg.convnet_type, cfg.pretrained, cfg.weights_path, cfg.input_size,
                              **cfg.backbone_kwargs)

    @classmethod
    def host_passes(cls, cfg: ExperimentConfig, task_id: int) -> tuple[float, float]:
        """The learner's own training on task ``task_id``, in passes over the task's training images: (passes with a
        backward, extra forward-only passes), for the cost estimate of ``python -m utils.reproduce --plan``
        (``utils/reproduce_cost.py``). Default (0, 0): no training of its own (SimpleCIL, RanPAC)."""
        return 0.0, 0.0

    def tuned_module(self) -> nn.Module:
        """What the tuning phase tunes (``x`` -> (B, D), with ``out_dim``): the backbone; a host whose backbone also
        holds prompts, adapters or a query model returns its plain ViT (models/ease.py, models/prompt_hosts.py)."""
        return self.backbone

    # ---- configuration -----------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Loader batch size: the JSON value, unless the learner's official code hard-codes one."""
        return self.cfg.batch_size

    @property
    def eval_batch_size(self) -> int:
        """Batch size of feature extraction and evaluation: ``eval_batch_size``, null = ``batch_size``.

        Only the batching changes: a shuffled extraction visits the images in the same order whatever
        its batch size (the sampler's permutation depends on the loader generator alone).
        """
        return self.cfg.eval_batch_size or self.batch_size

    def loader(self, dataset: Dataset, shuffle: bool, batch_size: Optional[int] = None, train: bool = False,
               generator: Optional[torch.Generator] = None) -> DataLoader:
        """A seeded DataLoader over ``dataset``; ``batch_size`` defaults to the learner's (training) batch size.

        Every loader draws from the run's one ``loader_generator`` (see ``make_loader`` for what each epoch
        draws), so the shuffles of a run depend on how many epochs all loaders ran before, not on batch sizes;
        ``generator`` replaces it for a pass that must leave the run's streams alone (a measurement).
        ``train``: a tuning loader, whose random transforms are seeded per sample (run seed, epoch, image) and
        which gives each torchrun rank its share of every global batch; other loaders give rank r the batches i
        with i mod W = r (gathered back in order by :meth:`extract_features` and :meth:`predict`).
        """
        return make_loader(dataset, batch_size or self.batch_size, shuffle, self.cfg.num_workers,
                           generator or self.loader_generator, pin_memory=self.device.type == "cuda",
                           run_seed=self.seed if train else None, shard="batch" if train else "order")

    # ---- protocol ----------------------------------------------------------------------------
    def learn_task(self, task: TaskData) -> dict[str, Any]:
        """Learn one task: the tuning phase (if any, on the configured tasks), :meth:`train_task`, then
        :meth:`update_head`.

        Returns:
            A report for results.json: ``tuning`` (the tuning phase's accounting, if it ran), whatever
            :meth:`train_task` returns (under ``training``) and :meth:`update_head` returns (under ``head``).
        """
        report: dict[str, Any] = {}
        self.announce(task)
        if self.tuner is not None and (self.cfg.mist_tasks == "all" or task.task_id == 0):
            report["tuning"] = self.tune(task)
        trained = self.train_task(task, self.loop)
        if trained:
            report["training"] = trained
        self.backbone.eval()
        if head := self.update_head(task):
            report["head"] = head
        return report

    def tune(self, task: TaskData) -> dict[str, Any]:
        """Run the tuning phase on ``task``'s training images (:meth:`tuning_loader`)."""
        return self.tuner.tune(self.tuning_loader(task), task)

    def tuning_loader(self, task: TaskData) -> DataLoader:
        """The tuning phase's loader: ``task``'s training images, seeded, augmented, per process, in batches of
        ``tuning_batch_size`` (null: the learner's batch size)."""
        return self.loader(task.train, shuffle=True, batch_size=self.cfg.tuning_batch_size, train=True)

    def train_task(self, task: TaskData, loop: TuningLoop) -> Optional[dict[str, Any]]:
        """The learner's own training on ``task`` (after the tuning phase, before the head update), through ``loop``
        (epochs, NaN guard, gradient sync, progress); returns its accounting for results.json, or None. Nothing by
        default (SimpleCIL and RanPAC keep their backbone as the tuning phase leaves it)."""
        return None

    def announce(self, task: TaskData) -> None:
        """Log the official lines that open a task. Default: PILOT's ``Learning on {known}-{seen}``."""
        self.log_info("Learning on %d-%d", task.known, task.seen)

    def log_info(self, msg: str, *args: Any) -> None:
        """An INFO line that names the learner's own file (``[simplecil.py] => ...``), as the official logs do
        whichever class holds the code that writes it."""
        module = type(self).__module__
        log = logging.getLogger(module)
        if log.isEnabledFor(logging.INFO):
            path = getattr(sys.modules.get(module), "__file__", None) or module
            log.handle(log.makeRecord(log.name, logging.INFO, path, 0, msg, args, None))

    @abc.abstractmethod
    def update_head(self, task: TaskData) -> Optional[dict[str, Any]]:
        """Update the classifier for ``task``'s classes; may return what results.json records as its ``head``."""

    @abc.abstractmethod
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, D) float32 on ``device`` -> logits (B, seen) over every class seen so far."""

    # ---- shared helpers ----------------------------------------------------------------------
    @torch.inference_mode()
    def extract_features(self, dataset: Dataset, shuffle: bool = False, desc: str = "features",
                         module: Optional[nn.Module] = None,
                         stream: Optional[str] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of a dataset, in loader order, batches of ``eval_batch_size``.

        Runs under ``torch.inference_mode``: the outputs are inference tensors (no autograd history;
        reading them anywhere is fine, updating them in place outside inference mode raises, so
        ``clone()`` them first). Inputs go to the device with ``non_blocking`` (pinned memory on CUDA);
        labels are gathered on the host and moved once, so the loop never waits for the device.

        Args:
            dataset: items ``(index, image (3,H,W) float32, label int64)``.
            shuffle: shuffled loader order (draws from ``loader_generator``), as the official head updates.
            desc: progress-bar label.
            module: the network to run (default: the backbone); ``module(x)`` -> (B, D') with ``out_dim`` D'.
            stream: draw the loader's seeds from this named stream of the run seed instead of ``loader_generator``
                (a measurement that must not shift the run's shuffles).

        Returns:
            (features (N, D) float32 on ``device``, labels (N,) int64 on ``device``).
        """
        module = self.backbone if module is None else module
        module.eval()
        feats, labels = [], []
        generator = make_generator(self.seed, stream=stream) if stream is not None else None
        loader = self.loader(dataset, shuffle, self.eval_batch_size, generator=generator)
        for _, x, y in tqdm(loader, desc=desc, leave=False, disable=not self.cfg.progress):
            with autocast(self.device, self.cfg.precision):
                feats.append(module(x.to(self.device, non_blocking=True)).float())
            labels.append(y)
        width = int(getattr(module, "out_dim", self.feature_dim))
        features = torch.cat(feats) if feats else torch.zeros(0, width, device=self.device)
        label_rows = (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)).long().to(self.device)
        n, size = len(dataset), self.eval_batch_size  # torchrun: every rank extracted batches i = rank mod W
        return distributed.gather_batches(features, n, size), distributed.gather_batches(label_rows, n, size)

    @torch.inference_mode()
    def predict(self, dataset: Dataset, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-k predictions on ``dataset`` (official ``_eval_cnn``: torch.topk, sorted).

        Batches of ``eval_batch_size``, under ``torch.inference_mode``. The top-k indices stay on the
        device and come to the host once at the end; labels never leave the host.

        Returns:
            (y_topk (N, min(k, seen)) int64, y_true (N,) int64), numpy arrays, in dataset order.
        """
        self.backbone.eval()
        preds, labels = [], []
        loader = self.loader(dataset, False, self.eval_batch_size)
        for _, x, y in tqdm(loader, desc="evaluate", leave=False, disable=not self.cfg.progress):
            with autocast(self.device, self.cfg.precision):
                features = self.backbone(x.to(self.device, non_blocking=True)).float()
            out = self.logits(features)
            preds.append(torch.topk(out, k=min(k, out.shape[1]), dim=1, largest=True, sorted=True)[1])
            labels.append(y)
        if distributed.active():  # every rank predicted whole batches of the test set (batch i on rank i mod W)
            width = min(k, int(self.logits(torch.zeros(1, self.feature_dim, device=self.device)).shape[1]))
            top = torch.cat(preds) if preds else torch.zeros(0, width, dtype=torch.int64, device=self.device)
            y_all = (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64)).long().to(self.device)
            return tuple(distributed.gather_batches(t, len(dataset), self.eval_batch_size).cpu().numpy()
                         for t in (top, y_all))
        return torch.cat(preds).cpu().numpy(), torch.cat(labels).long().numpy()

    # ---- checkpoints -------------------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        """Everything later tasks need, by checkpoint key: objects with ``state_dict``/``load_state_dict``.

        Base: the backbone, the loader's random stream, the tuning phase (None without one) and the classifier
        (:meth:`head_state`). A learner with more state (modules it trains, an optimizer kept across tasks, a
        random stream) adds entries.
        """
        return {"backbone": self.backbone, "loader_generator": GeneratorState(self.loader_generator),
                "tuner": self.tuner, "head": Stateful(self.head_state, self.load_head_state), "drift": self.drift}

    def state_dict(self) -> dict[str, Any]:
        """:meth:`stateful`'s states by key (tensors, lists and numbers only; None for an absent part)."""
        return {key: None if obj is None else obj.state_dict() for key, obj in self.stateful().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            KeyError, ValueError, RuntimeError: the state does not fit this learner (other backbone or method).
        """
        for key, obj in self.stateful().items():
            if key not in state:
                raise KeyError(f"the checkpoint has no {key!r} state")
            if (state[key] is None) != (obj is None):
                what = ("tuning phase does not match the config's spr" if key == "tuner"
                        else f"{key!r} state does not fit")
                raise ValueError(f"the checkpoint's {what}")
            if obj is not None:
                obj.load_state_dict(state[key])

    def head_state(self) -> dict[str, Any]:
        """The classifier's state for a checkpoint (tensors or None). Default: the ``HEAD_STATE`` attributes."""
        return {name: getattr(self, name) for name in self.HEAD_STATE}

    def load_head_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`head_state`, moving tensors to ``device``.

        Raises:
            KeyError: the state lacks one of ``HEAD_STATE``.
        """
        for name in self.HEAD_STATE:
            value = state[name]
            setattr(self, name, None if value is None else value.to(self.device))

    def modules(self) -> list[nn.Module]:
        """Every module of ours holding parameters: what torchrun replicas compare (not what the logs count)."""
        return [self.backbone, *(self.tuner.extra_modules() if self.tuner is not None else [])]

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of :meth:`modules`, each once (shared ones are not repeated)."""
        return list({id(p): p for m in self.modules() for p in m.parameters()}.values())

    def count_parameters(self) -> tuple[int, int]:
        """(all, trainable) parameter counts of the learner's network, as its official log lines report them.

        The backbone's parameters (its ``requires_grad`` flags decide its trainable share)
        + :meth:`extra_parameter_count` + :meth:`head_parameter_count`, both counted as trainable.
        """
        backbone = list({id(p): p for p in self.backbone.parameters()}.values())
        extra = self.extra_parameter_count() + self.head_parameter_count()
        return (sum(p.numel() for p in backbone) + extra,
                sum(p.numel() for p in backbone if p.requires_grad) + extra)

    def extra_parameter_count(self) -> int:
        """Parameters counted besides backbone and heads: the tuning phase's extra modules (MIST's projection)."""
        return 0 if self.tuner is None else sum(p.numel() for m in self.tuner.extra_modules() for p in m.parameters())

    def head_parameter_count(self) -> int:
        """Parameters of the classifier heads in the learner's current state (called at the start of a task, with
        the previous task's heads, and after a head update). Default: the entries of the ``HEAD_STATE`` tensors."""
        return sum(0 if getattr(self, name) is None else getattr(self, name).numel() for name in self.HEAD_STATE)
