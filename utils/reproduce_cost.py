"""What a run costs, counted before it runs (``python -m utils.reproduce TABLE --plan``, issue 28).

Work: the images that go through the backbone forward and backward (the tuning phase's epochs, times two views for
MIST's contrastive loss; the host's own training) and forward only (head updates, evaluation, drift), task by task,
from the config's class split and the data set's size. FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode``
over the backbone's forward and backward on the ``meta`` device (no memory, no weights). Activation memory per image:
the bytes of every tensor autograd saves for the backward of one real forward (random weights, batch 1, on the CPU;
each storage counted once, parameters excluded). Peak memory at a batch: parameters + their gradients + the
optimizer's state + saved activations x images per step. What is left out: cuDNN/cuBLAS workspaces, the allocator's
fragmentation, transient buffers inside an op, the prompt hosts' longer token sequences and query model, SPG's extra
importance passes and SPU's early stop; the figures are lower bounds of the same order as the real ones.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

#: nominal (train, test) images of the paper's data sets, for plans made before the data is present: CIFAR-100
#: (torchvision's split), CUB-200-2011, ImageNet-R and ImageNet-A as split by the pre-trained-model CIL benchmarks
#: (80/20 of 11,788, 30,000 and 7,500 images), Stanford Cars (its official split)
NOMINAL_SIZES = {"cifar224": (50000, 10000), "cub": (9430, 2358), "imagenetr": (24000, 6000),
                 "imageneta": (5981, 1519), "cars": (8144, 8041), "fmnist": (60000, 10000)}
#: optimizer state per parameter entry, in parameter copies: SGD with momentum 1, Adam 2
OPTIMIZER_STATE = {"mist_sgd": 1, "adam": 2}


@dataclass(frozen=True)
class BackboneCost:
    """Counted cost of one image through a backbone at one input size.

    Attributes:
        forward_flops: FLOPs of one image's forward (multiply-adds count 2).
        backward_flops: FLOPs of its backward (input and weight gradients).
        activation_bytes: bytes autograd saves for the backward of one image (float32).
        parameters: parameter entries.
    """

    forward_flops: float
    backward_flops: float
    activation_bytes: float
    parameters: int


def _create(convnet_type: str, input_size: int, kwargs_json: str = "{}"):
    import json

    import timm

    from backbones.names import resolve_name

    arch = resolve_name(convnet_type).split(".")[0].removeprefix("hf-hub:")
    kwargs = {**({"img_size": input_size} if "vit" in arch else {}), **json.loads(kwargs_json)}
    return timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)


def count_cost(build: Callable[[], nn.Module], input_shape: Sequence[int]) -> BackboneCost:
    """Count :class:`BackboneCost` of the module ``build()`` returns, for one input of ``input_shape`` (no batch
    dimension): FLOPs with ``FlopCounterMode`` on the meta device, saved activations from one real forward on the CPU
    (random weights; storages counted once, parameters excluded). The input does not require gradients."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build()
    with FlopCounterMode(display=False) as counter:
        out = model(torch.zeros(1, *input_shape, device="meta"))
        forward = counter.get_total_flops()
        out.float().sum().backward()
        total = counter.get_total_flops()
    model = build()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.zeros(1, *input_shape)).sum().backward()
    return BackboneCost(float(forward), float(total - forward), float(sum(saved.values())),
                        sum(p.numel() for p in model.parameters()))


@functools.lru_cache(maxsize=None)
def backbone_cost(convnet_type: str, input_size: int, kwargs_json: str = "{}") -> BackboneCost:
    """:func:`count_cost` of a config's backbone (its timm architecture with ``backbone_kwargs``, random weights;
    nothing downloaded) at ``input_size`` px.

    Raises:
        ConfigError: an unknown ``convnet_type``.
    """
    return count_cost(lambda: _create(convnet_type, input_size, kwargs_json), (3, input_size, input_size))


@dataclass(frozen=True)
class Work:
    """Images through the backbone over a whole run (one seed).

    Attributes:
        trained: image passes with a backward (forward + backward).
        forward_only: image passes without one.
        step_images: images per optimizer step of the heaviest phase that trains (batch x views; 0: nothing trains).
        optimizer: the tuning phase's optimizer name (its state's size), or None.
    """

    trained: float
    forward_only: float
    step_images: int
    optimizer: Optional[str]

    def flops(self, cost: BackboneCost) -> float:
        """FLOPs of the run: trained images x (forward + backward) + forward-only images x forward."""
        return self.trained * (cost.forward_flops + cost.backward_flops) + self.forward_only * cost.forward_flops


def task_classes(init_cls: int, increment: int, n_classes: int) -> list[int]:
    """Classes per task: ``init_cls``, then ``increment`` until the data set's classes are used (the last task takes
    the remainder), as ``utils.data_manager.DataManager`` splits them."""
    sizes = [min(init_cls, n_classes)]
    while sum(sizes) < n_classes:
        sizes.append(min(increment, n_classes - sum(sizes)))
    return sizes


def learner_batch(learner_cls: type, cfg: Any, name: str = "batch_size") -> int:
    """A batch the learner uses, read from its property ``name`` (``batch_size``: its loader, e.g. SimpleCIL's
    official 32; ``train_batch_size``: SLCA's slow learner, 128); the config's ``batch_size`` without one."""
    prop = getattr(learner_cls, name, None)
    if not isinstance(prop, property):
        return int(cfg.batch_size)
    return int(prop.fget(SimpleNamespace(cfg=cfg)))


def run_work(cfg: Any, n_train: int, n_test: int) -> Work:
    """Count a run's :class:`Work` from its config and its data set's (train, test) image counts (all classes).

    Per task (classes split by :func:`task_classes`, images spread evenly over classes): the tuning phase's epochs
    (its preset's epochs key; two views for a contrastive loss) when the learner runs it, the learner's own epochs
    (``Learner.host_passes``), one forward per training image for the head update, one per test image of the seen
    classes for evaluation and one more with ``measure_drift``.
    """
    from models.sparse import tuner_for
    from utils.registry import DATASETS, LEARNERS, PRESETS

    learner_cls = LEARNERS.get(cfg.model_name)
    n_classes = DATASETS.get(cfg.dataset).n_classes
    if cfg.train_per_class:
        n_train = min(n_train, cfg.train_per_class * n_classes)
    if cfg.test_per_class:
        n_test = min(n_test, cfg.test_per_class * n_classes)
    preset = PRESETS.get(cfg.spr) if cfg.tuning is not None else None
    tuned = preset is not None and tuner_for(cfg.spr, learner_cls) is not None
    views = 2 if tuned and "contrastive" in (preset.parts["loss"], preset.parts.get("score_loss")) else 1
    batch = learner_batch(learner_cls, cfg)
    tuning_batch = cfg.tuning_batch_size or batch
    trained = forward = 0.0
    seen = 0
    for t, classes in enumerate(task_classes(cfg.init_cls, cfg.increment, n_classes)):
        seen += classes
        train = n_train * classes / n_classes
        if tuned and (cfg.mist_tasks == "all" or t == 0):
            trained += train * getattr(cfg, preset.epochs_key) * views
        host_trained, host_forward = learner_cls.host_passes(cfg, t)
        trained += train * host_trained
        forward += train * (1 + host_forward) + n_test * seen / n_classes * (2 if cfg.measure_drift else 1)
    host_trains = any(learner_cls.host_passes(cfg, t)[0] for t in range(len(task_classes(cfg.init_cls, cfg.increment,
                                                                                           n_classes))))
    host_batch = learner_batch(learner_cls, cfg, "train_batch_size") if hasattr(learner_cls, "train_batch_size") \
        else batch
    step = max(tuning_batch * views if tuned else 0, host_batch if host_trains else 0)
    return Work(trained, forward, step, preset.parts["optimizer"] if tuned else None)


def peak_bytes(cost: BackboneCost, work: Work) -> float:
    """Parameters + gradients + optimizer state (float32) + saved activations of one step's images; the parameters
    alone when nothing trains (inference saves no activations)."""
    if work.step_images == 0:
        return 4.0 * cost.parameters
    copies = 2 + OPTIMIZER_STATE.get(work.optimizer or "", 1)
    return 4.0 * cost.parameters * copies + cost.activation_bytes * work.step_images
