"""EASE: Expandable Subspace Ensemble (Zhou et al., CVPR 2024; algorithms.md §18.1; github
sun-hailong/CVPR24-Ease@6d67508).

Per task T (after the tuning phase ``spr``, if any, which tunes the plain ViT, adapters detached):

1. **a new subspace** (:meth:`EASE.train_task`): a fresh set of adapters, one per block (:class:`Adapter`, parallel
   to the MLP, zero output at start), and a new cosine head over the task's classes (``proxy_fc``, sigma learnable)
   train on the frozen ViT (adapter dropout 0.1, its masks drawn for the whole batch from the run's ``ease_dropout``
   stream, so that torchrun gives the one-process result): CE(head(f_T(x)), y - known), SGD (momentum 0.9,
   ``weight_decay``), CosineAnnealingLR to ``min_lr`` over the task's epochs (``init_epochs``/``init_lr`` on task 0 and
   on every task when init_cls == increment, ``later_*`` otherwise: :func:`task_schedule`);
   the adapters are then frozen for good;
2. **prototypes** (:meth:`EASE.update_head`): the mean unnormalised [CLS] feature of each new class in every subspace
   i = 0..T (its training images under test transforms, backbone with adapter set i);
3. **semantic-guided completion**: an old class o of task t gets in each later subspace s the prototype
   sum_n softmax_n(cos(P_{o,t}, P_{n,t})) P_{n,s}, over the classes n of tasks s..T (``recalc_sim``, official
   ``solve_sim_reset``; false: only s = T from the current classes, ``solve_similarity``);
4. **inference**: the features of all subspaces, and the logit of a class c of task i is
   cos(f_i, P_{c,i}) + alpha / T * sum_{j != i} cos(f_j, P_{c,j}) (``use_reweight``, official ``forward_reweight``).

Differences from the official code: docs/deviations.md, section "EASE".
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from backbones.vit_parts import ADAPTER_SLOT, KEEP_SLOT, Adapter, add_adapter_slots, attached, frozen, vit_of
from models.base import Learner, TaskData
from models.heads import CosineLinear
from models.loop import FlatGradients, TrainAccuracy, TuningLoop, cross_entropy
from utils.config import ConfigKeys, ExperimentConfig, config_keys, for_learners, key
from utils.loaders import Batch
from utils.registry import LEARNERS
from utils.runtime import GeneratorState, autocast, make_generator

logger = logging.getLogger(__name__)

MOMENTUM = 0.9  # ease.py SGD (algorithms.md §18.1)
ADAPTER_SCALE, ADAPTER_DROPOUT = 0.1, 0.1  # inc_net.py ffn_adapter_scalar, vit_ease.py dropout (algorithms.md §18.1)


@config_keys("EASE (models/ease.py)", applies=for_learners("ease"))
class EASEKeys(ConfigKeys):
    init_epochs: int = key(20, "EASE: adapter epochs of the first task, and of every task when init_cls == increment "
                               "(official key and rule).", min=1)
    later_epochs: Optional[int] = key(None, "EASE: adapter epochs of the tasks after the first when init_cls != "
                                            "increment (official key; ignored, with a warning, when they are equal, as "
                                            "the official code ignores it); null: init_epochs.", min=1)
    init_lr: float = key(0.025, "EASE: SGD learning rate of the first task, and of every task when init_cls == "
                                "increment (official key; cifar 0.025, imagenetr/a 0.05, cub 0.008).", gt=0)
    later_lr: Optional[float] = key(None, "EASE: SGD learning rate of the tasks after the first when init_cls != "
                                          "increment (official key; ignored as later_epochs); null: init_lr.", gt=0)
    alpha: float = key(0.1, "EASE: weight of the other subspaces' cosines in a logit, alpha / T each (official key; "
                            "cub 0.05).", ge=0)
    recalc_sim: bool = key(True, "EASE: complete old prototypes in every later subspace from all newer classes "
                                 "(solve_sim_reset); false: only in the newest, from its classes (official key).")
    use_reweight: bool = key(True, "EASE: per-subspace cosines reweighted by alpha; false: one cosine over the "
                                   "concatenated features (official key).")


class EASENet(nn.Module):
    """A timm ViT and one adapter set per learned task (the EASE backbone, ``vit_ease.py``).

    ``forward(x)`` (B, 3, H, W) -> the [CLS] features of every subspace, concatenated: (B, S * D) float32 with S the
    number of adapter sets. ``out_dim`` = D (one subspace). ``vit`` is the plain timm model the tuning phase tunes.

    Raises:
        ConfigError: ``vit`` is not a timm VisionTransformer with standard blocks.
    """

    def __init__(self, vit: nn.Module, bottleneck: int) -> None:
        super().__init__()
        self.vit = vit_of(vit, "EASE")
        add_adapter_slots(self.vit)
        self.bottleneck, self.out_dim = bottleneck, int(vit.out_dim)
        self.adapters = nn.ModuleList()

    def add_adapters(self) -> nn.ModuleList:
        """Append a new adapter set (one :class:`Adapter` per block, on the ViT's device) and return it."""
        device = self.vit.cls_token.device
        new = nn.ModuleList(Adapter(self.out_dim, self.bottleneck, ADAPTER_SCALE, ADAPTER_DROPOUT)
                            for _ in self.vit.blocks).to(device)
        self.adapters.append(new)
        return new

    def subspace(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """The [CLS] feature (B, D) of the ViT with adapter set ``i`` (official ``forward_proto``)."""
        with attached(ADAPTER_SLOT, dict(zip(self.vit.blocks, self.adapters[i]))):
            return self.vit(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> the features of every adapter subspace side by side, (B, D x adapter sets)."""
        return torch.cat([self.subspace(x, i) for i in range(len(self.adapters))], dim=1)

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Grow the adapter sets to the state's count, then load it (a checkpoint of a later task)."""
        sets = {int(m.group(1)) for k in state if (m := re.match(r"adapters\.(\d+)\.", k))}
        while len(self.adapters) < len(sets):
            self.add_adapters()
        return super().load_state_dict(state, strict=strict, assign=assign)


def task_schedule(cfg: ExperimentConfig, task_id: int) -> tuple[int, float]:
    """(epochs, learning rate) of the adapters of task ``task_id`` (official ``ease.py`` ``_train``): ``init_epochs``
    and ``init_lr`` on the first task and on every task when ``init_cls == increment``; otherwise ``later_epochs`` and
    ``later_lr``, null standing for the init value (the official code's missing or 0)."""
    if task_id == 0 or cfg.init_cls == cfg.increment:
        return cfg.init_epochs, cfg.init_lr
    return (cfg.later_epochs if cfg.later_epochs is not None else cfg.init_epochs,
            cfg.later_lr if cfg.later_lr is not None else cfg.init_lr)


@LEARNERS.register("ease", aliases=("ease_mist",))
class EASE(Learner):
    """EASE with an optional tuning phase (``spr``) before each task.

    State: the backbone :class:`EASENet` (the ViT and every adapter set), ``prototypes`` (seen, S * D) float32 (the
    official ``fc``: real prototypes and completed ones) and ``bounds`` (the first class of every task, then seen).
    """

    TITLE, ORDER = "EASE", 40

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int) -> None:
        super().__init__(cfg, backbone, device, seed)
        ignored = [f"{k} = {getattr(cfg, k)}" for k, first in (("later_epochs", cfg.init_epochs),
                                                                  ("later_lr", cfg.init_lr))
                   if getattr(cfg, k) is not None and getattr(cfg, k) != first]
        if ignored and cfg.init_cls == cfg.increment:
            logger.warning("EASE: %s ignored: with init_cls == increment (%d) every task trains with init_epochs = %d "
                           "and init_lr = %g, as the official ease.py does.", " and ".join(ignored), cfg.increment,
                           cfg.init_epochs, cfg.init_lr)
        self.prototypes = torch.zeros(0, 0, device=device)
        self.bounds: list[int] = [0]
        self.dropout_generator = make_generator(seed, device, "ease_dropout")

    @classmethod
    def build_backbone(cls, cfg: ExperimentConfig) -> EASENet:
        """The timm ViT of ``convnet_type`` with its weights, its blocks ready for adapters of width ``ffn_num``."""
        return EASENet(super().build_backbone(cfg), cfg.ffn_num)

    def tuned_module(self) -> nn.Module:
        return self.backbone.vit

    @classmethod
    def host_passes(cls, cfg: ExperimentConfig, task_id: int) -> tuple[float, float]:
        """The adapters' epochs of the task (:func:`task_schedule`), each a pass with a backward through the ViT."""
        return float(task_schedule(cfg, task_id)[0]), 0.0

    def train_task(self, task: TaskData, loop: TuningLoop) -> dict[str, Any]:
        """Train a new adapter set and ``proxy_fc`` on the task (algorithms.md §18.1), the ViT frozen;
        then freeze the set."""
        cfg, t, net = self.cfg, task.task_id, self.backbone
        adapters = net.add_adapters()
        self.feature_dim = net.out_dim * len(net.adapters)
        proxy = CosineLinear(net.out_dim, task.seen - task.known).to(self.device)
        epochs, lr = task_schedule(cfg, t)
        params = {f"adapters.{n}": p for n, p in adapters.named_parameters()}
        params.update({f"proxy_fc.{n}": p for n, p in proxy.named_parameters()})
        optimizer = torch.optim.SGD(list(params.values()), lr=lr, momentum=MOMENTUM, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=cfg.min_lr)
        accuracy = TrainAccuracy(self.device)
        rows = [(0, 0)]  # this process's (offset, global batch size), for the adapters' dropout masks

        def keep(shape: torch.Size) -> torch.Tensor:  # the global batch's mask from the run's stream, this share
            offset, total = rows[0]
            drawn = torch.rand((total, *shape[1:]), generator=self.dropout_generator, device=self.device)
            return (drawn >= ADAPTER_DROPOUT)[offset: offset + shape[0]].float()

        def forward(batch: Batch) -> torch.Tensor:
            rows[0] = batch.rows or (0, batch.x.shape[0])
            with autocast(self.device, cfg.precision):
                features = net.subspace(batch.x.to(self.device, non_blocking=True), t).float()
            logits = proxy(features)
            targets = batch.y.to(self.device, non_blocking=True) - task.known  # official: y - known classes
            accuracy.add(logits, targets)
            return cross_entropy(logits, targets, batch)

        def log(epoch: int, loss: float) -> None:
            train_accuracy = accuracy.take()
            logger.info("Task %d, Epoch %d/%d => Loss %.3f, Train_accy %.2f", t, epoch, epochs, loss, train_accuracy)
            loop.train_accuracy("EASE", train_accuracy)

        loader = self.loader(task.train, shuffle=True, train=True)
        with frozen(net.vit), attached(KEEP_SLOT, {adapter: keep for adapter in adapters}):
            losses, steps, _ = loop.run(loader, range(1, epochs + 1), forward, optimizer,
                                        grads=[FlatGradients(params)], scheduler=scheduler, module=net,
                                        where=f"task {t}", label="EASE", on_epoch=log)
        adapters.requires_grad_(False)
        return {"method": "ease", "steps": steps, "epoch_losses": losses}

    def update_head(self, task: TaskData) -> None:
        """Prototypes of the new classes in every subspace, then the completion of the old ones
        (algorithms.md §18.1)."""
        dim = self.backbone.out_dim
        n_sub = len(self.backbone.adapters)
        feats, labels = self.extract_features(task.train_eval, shuffle=False, desc="prototypes")
        grown = torch.zeros(task.seen, n_sub * dim, device=self.device)
        grown[: task.known, : self.prototypes.shape[1]] = self.prototypes
        for c in range(task.known, task.seen):  # every subspace's block in one pass (one forward per subspace)
            grown[c] = feats[labels == c].mean(dim=0)
        self.prototypes, self.bounds = grown, [*self.bounds, task.seen]
        self.complete_prototypes()

    def complete_prototypes(self) -> None:
        """Fill the old classes' prototypes in the later subspaces (official ``solve_sim_reset`` or, with
        ``recalc_sim`` false, ``solve_similarity``): for an old task t and subspace s > t,
        P[C_t, s] = softmax(cos(P[C_t, t], P[N, t]), over N) @ P[N, s], N = the classes of tasks s..T (recalc) or
        of task T; cosines per pair (``torch.cosine_similarity``, eps 1e-8), softmax at temperature 1."""
        P, b, dim = self.prototypes, self.bounds, self.backbone.out_dim
        last = len(b) - 2  # T
        for t in range(last):
            old = slice(b[t], b[t + 1])
            for s in (range(t + 1, last + 1) if self.cfg.recalc_sim else [last]):
                newer = slice(b[s] if self.cfg.recalc_sim else b[last], b[-1])
                block_t, block_s = slice(t * dim, (t + 1) * dim), slice(s * dim, (s + 1) * dim)
                sim = F.cosine_similarity(P[old, block_t][:, None], P[newer, block_t][None], dim=2)
                P[old, block_s] = torch.softmax(sim, dim=1) @ P[newer, block_s]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, S * D) -> (B, seen): with ``use_reweight``, sum over subspaces j of w_{c,j} cos(f_j, P_{c,j}), w = 1
        for the class's own task's subspace and alpha / T for the others (T + 1 = S); else cos(f, P_c) over the
        concatenation; sigma = 1."""
        if not self.cfg.use_reweight:
            return F.linear(F.normalize(features, dim=1), F.normalize(self.prototypes, dim=1))
        n_sub, dim = len(self.bounds) - 1, self.backbone.out_dim
        f = F.normalize(features.view(features.shape[0], n_sub, dim), dim=2)
        p = F.normalize(self.prototypes.view(-1, n_sub, dim), dim=2)
        cos = torch.einsum("bjd,cjd->bcj", f, p)  # (B, seen, S)
        own = torch.repeat_interleave(torch.arange(n_sub, device=features.device),
                                      torch.tensor(self.bounds, device=features.device).diff())
        weights = torch.full((p.shape[0], n_sub), self.cfg.alpha / max(n_sub - 1, 1), device=features.device)
        weights[torch.arange(p.shape[0], device=features.device), own] = 1.0
        return (cos * weights).sum(dim=2)

    def count_parameters(self) -> tuple[int, int]:
        """(all, trainable) as the official log: the ViT, every adapter and the prototype matrix; trainable: the
        adapters (the current set trains, the stored ones are counted as in the official ``adapter_list``)."""
        total = sum(p.numel() for p in self.backbone.parameters()) + self.head_parameter_count()
        return total, sum(p.numel() for p in self.backbone.adapters.parameters())

    def head_parameter_count(self) -> int:
        return self.prototypes.numel()

    def stateful(self) -> dict[str, Any]:
        return {**super().stateful(), "ease_dropout": GeneratorState(self.dropout_generator)}

    def head_state(self) -> dict:
        return {"prototypes": self.prototypes, "bounds": torch.tensor(self.bounds)}

    def load_head_state(self, state: dict) -> None:
        self.prototypes = state["prototypes"].to(self.device)
        self.bounds = [int(b) for b in state["bounds"]]
        self.feature_dim = self.backbone.out_dim * max(len(self.bounds) - 1, 1)
