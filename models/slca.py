"""SLCA: Slow Learner with Classifier Alignment (Zhang et al., ICCV 2023; algorithms.md §17;
github GengDavid/SLCA@169d4e6).

Per task (algorithms.md §17.1): the tuning phase (``spr``, e.g. MIST) if any, then

1. **slow learner** (:meth:`SLCA.train_task`, algorithms.md §17.4): the whole backbone and a new linear head over the
   task's classes train with SGD (momentum 0.9, weight decay 5e-4 on every parameter), the backbone at
   ``slca_lr * bcb_lrscale`` = 1e-4 and the head at ``slca_lr`` = 1e-2, MultiStepLR(gamma 0.1) at ``milestones``,
   ``epochs`` epochs, batch 128 (official module constant), loss CE(new head's logits, y - known);
2. **class statistics** (:meth:`SLCA.update_head`, algorithms.md §17.5): per new class, the mean and the unbiased
   covariance (+ 1e-4 I) of the features of its training images under test transforms;
3. **classifier alignment** (algorithms.md §17.6, tasks t >= 1, ``ca_epochs`` > 0): a copy of every head is trained on
   features sampled from the stored Gaussians (256 per class per epoch, means of older tasks shrunk by
   0.9 + 0.1 (t_c + 1) / (t + 1)), loss CE(z / (mean_k ||z_k|| * tau), y) with z_k the logits of task k, SGD
   lr 0.01, CosineAnnealingLR over ``ca_epochs``;
4. evaluation with the aligned heads; the raw (pre-alignment) heads stay the learner's state, so each alignment
   starts from them (official ``backup``/``recall``, algorithms.md §17.8).

The ViT's pretrained final LayerNorm is replaced by a fresh one (eps 1e-5), trained with the backbone (official
quirk, algorithms.md §17.2; ``slca_keep_pretrained_norm`` keeps the pretrained one). Differences from the official code:
docs/deviations.md, section "SLCA".
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional

import torch
from torch import nn

from models.base import Learner, TaskData
from models.heads import linear_from, timm_linear_head
from models.loop import FlatGradients, TrainAccuracy, TuningLoop, cross_entropy
from utils.config import ConfigKeys, ExperimentConfig, config_keys, for_learners, key
from utils.loaders import Batch
from utils.registry import LEARNERS
from utils.runtime import GeneratorState, autocast, make_generator

logger = logging.getLogger(__name__)

# slca.py module constant (algorithms.md §17.4); use_config_batch_size uses the JSON batch_size
OFFICIAL_BATCH_SIZE = 128
MOMENTUM, WEIGHT_DECAY, GAMMA = 0.9, 5e-4, 0.1  # slca.py (algorithms.md §17.4, §17.6)
COV_RIDGE = 1e-4  # added to every class covariance (base.py, algorithms.md §17.5)
SAMPLES_PER_CLASS = 256  # pseudo-features per class per alignment epoch (algorithms.md §17.6)
NORM_EPS = 1e-7  # logit-norm epsilon (algorithms.md §17.6)


@config_keys("SLCA (models/slca.py)", applies=for_learners("slca"))
class SLCAKeys(ConfigKeys):
    epochs: int = key(20, "SLCA: slow-learner epochs per task (official key; cifar 20, others 50).", min=1)
    milestones: list[int] = key([18], "SLCA: epochs after which the slow learner's learning rates are multiplied by "
                                      "0.1 (MultiStepLR; official key).", min=1)
    ca_epochs: int = key(5, "SLCA: classifier-alignment epochs from task 1 on; 0 = no alignment (official key).", min=0)
    ca_with_logit_norm: float = key(0.1, "SLCA: temperature of the alignment's logit normalisation (cars 0.05); <= 0 "
                                         "= plain CE (official key).")
    slca_lr: float = key(0.01, "SLCA: base learning rate: the slow learner's head and the alignment (official 0.01).",
                         gt=0)
    bcb_lrscale: float = key(0.01, "SLCA: backbone learning rate = slca_lr * bcb_lrscale (official 1/100); 0 freezes "
                                   "the backbone.", ge=0)
    slca_keep_pretrained_norm: bool = key(False, "SLCA: keep the ViT's pretrained final norm instead of the official "
                                                 "fresh LayerNorm (algorithms.md §17.2).")
    slca_ca_task_boundaries: bool = key(False, "SLCA fix: the alignment's task of class c from the real task "
                                               "boundaries, not c // current task size (algorithms.md §17.11.1).")


@LEARNERS.register("slca", aliases=("slca_mist",))
class SLCA(Learner):
    """SLCA with an optional tuning phase (``spr``) before the slow learner of each task.

    State: ``heads`` (one ``nn.Linear(D, n_t)`` per task, the raw stage-1 heads), ``aligned`` (their aligned copy
    after the current task's alignment, used by :meth:`logits`; None when no alignment ran), ``means`` (C, D)
    float64 and ``covs`` (C, D, D) float32 on ``device``, and the alignment's random stream.
    """

    TITLE, ORDER = "SLCA", 30

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int) -> None:
        super().__init__(cfg, backbone, device, seed)
        late = [m for m in cfg.milestones if m >= cfg.epochs]
        if late:
            logger.warning("SLCA: milestone(s) %s are not before the last of the %d epochs: the learning rate never "
                           "decays there (official cifar 18 of 20, 40 of 50).", late, cfg.epochs)
        self.heads = nn.ModuleList().to(device)
        self.aligned: Optional[nn.ModuleList] = None
        self.means = torch.zeros(0, self.feature_dim, dtype=torch.float64, device=device)
        self.covs = torch.zeros(0, self.feature_dim, self.feature_dim, device=device)
        self.alignment_generator = make_generator(seed, device, "slca_alignment")

    @classmethod
    def build_backbone(cls, cfg: ExperimentConfig) -> nn.Module:
        """The timm model, its final LayerNorm (a ViT's ``norm``) replaced by a fresh ``LayerNorm(D)`` (eps 1e-5,
        weight 1, bias 0; official ``vits.py``) unless ``slca_keep_pretrained_norm``."""
        model = super().build_backbone(cfg)
        norm = getattr(model, "norm", None)
        if isinstance(norm, nn.LayerNorm) and not cfg.slca_keep_pretrained_norm:
            model.norm = nn.LayerNorm(norm.normalized_shape, eps=1e-5)
        return model

    @property
    def train_batch_size(self) -> int:
        """The slow learner's batch: 128 (official constant), or ``batch_size`` with ``use_config_batch_size``."""
        return self.cfg.batch_size if self.cfg.use_config_batch_size else OFFICIAL_BATCH_SIZE

    @classmethod
    def host_passes(cls, cfg: ExperimentConfig, task_id: int) -> tuple[float, float]:
        """The slow learner's ``epochs`` passes with a backward (classifier alignment runs on sampled features)."""
        return float(cfg.epochs), 0.0

    # ---- stage 1: slow learner -----------------------------------------------------------------------
    def train_task(self, task: TaskData, loop: TuningLoop) -> dict[str, Any]:
        """A new head for the task's classes, then ``epochs`` epochs of the slow learner (algorithms.md §17.4)."""
        cfg, t = self.cfg, task.task_id
        self.heads.requires_grad_(False)  # old heads are frozen (official update)
        head = timm_linear_head(self.feature_dim, task.seen - task.known, self.device)  # global RNG, as the official
        self.heads.append(head)
        self.aligned = None
        slow = cfg.bcb_lrscale > 0
        backbone = [p for p in self.backbone.parameters() if p.requires_grad] if slow else []
        groups = ([{"params": backbone, "lr": cfg.slca_lr * cfg.bcb_lrscale}] if slow else [])
        groups.append({"params": list(head.parameters()), "lr": cfg.slca_lr})
        optimizer = torch.optim.SGD(groups, lr=cfg.slca_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.milestones), gamma=GAMMA)
        accuracy = TrainAccuracy(self.device)

        def forward(batch: Batch) -> torch.Tensor:
            with torch.set_grad_enabled(slow), autocast(self.device, cfg.precision):
                features = self.backbone(batch.x.to(self.device, non_blocking=True)).float()
            logits = head(features)  # the new head's logits = all logits[:, known:] (algorithms.md §17.4)
            targets = batch.y.to(self.device, non_blocking=True) - task.known
            accuracy.add(logits, targets)
            return cross_entropy(logits, targets, batch)

        def log(epoch: int, loss: float) -> None:
            train_accuracy = accuracy.take()
            logger.info("Task %d, Epoch %d/%d => Loss %.3f, Train_accy %.2f", t, epoch, cfg.epochs, loss,
                        train_accuracy)
            loop.train_accuracy("SLCA", train_accuracy)

        params = {f"backbone.{i}": p for i, p in enumerate(backbone)}
        params.update({f"head.{n}": p for n, p in head.named_parameters()})
        loader = self.loader(task.train, shuffle=True, batch_size=self.train_batch_size, train=True)
        losses, steps, _ = loop.run(loader, range(1, cfg.epochs + 1), forward, optimizer,
                                    grads=[FlatGradients(params)], scheduler=scheduler,
                                    module=self.backbone if slow else None,
                                    freeze_bn_stats=cfg.freeze_bn_stats, where=f"task {t}", label="SLCA",
                                    on_epoch=log)
        return {"method": "slca", "steps": steps, "epoch_losses": losses}

    # ---- class statistics and classifier alignment ------------------------------------------------------
    def update_head(self, task: TaskData) -> None:
        """Gaussian statistics of the new classes (algorithms.md §17.5), then classifier alignment from task 1 on
        (17.6)."""
        self.add_class_statistics(task)
        if task.task_id > 0 and self.cfg.ca_epochs > 0:
            self.aligned = self.align(task)

    def add_class_statistics(self, task: TaskData) -> None:
        """Per new class c: mu_c = mean of its features (float64), Sigma_c = torch.cov (unbiased, float64) + 1e-4 I,
        stored float32; features of its training images under test transforms, backbone in eval mode.

        Raises:
            ValueError: a class with fewer than 2 training images (no covariance).
        """
        feats, labels = self.extract_features(task.train_eval, shuffle=False, desc="class statistics")
        means, covs = [], []
        eye = torch.eye(self.feature_dim, dtype=torch.float64, device=self.device)
        for c in range(task.known, task.seen):
            rows = feats[labels == c].double()
            if rows.shape[0] < 2:
                raise ValueError(f"SLCA: class {c} has {rows.shape[0]} training image(s); its covariance needs 2 or "
                                 "more (train_per_class too small?)")
            means.append(rows.mean(dim=0))
            covs.append((torch.cov(rows.T) + COV_RIDGE * eye).float())
        self.means = torch.cat([self.means, torch.stack(means)])
        self.covs = torch.cat([self.covs, torch.stack(covs)])

    def sample_features(self, task: TaskData, factors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One alignment epoch's pseudo-features: for c = 0..C-1 in order, 256 draws of N(s_c mu_c, Sigma_c) (float32,
        ``factors[c]`` the Cholesky factor of Sigma_c), s_c = 0.9 + 0.1 (t_c + 1) / (t + 1).

        Returns:
            (features (256 C, D) float32, labels (256 C,) int64), in class order (shuffled by the caller).
        """
        t, size = task.task_id, task.seen - task.known
        bounds = torch.tensor(self.task_bounds()[1:])
        xs, ys = [], []
        for c in range(task.seen):
            t_c = int((bounds <= c).sum()) if self.cfg.slca_ca_task_boundaries else c // size  # algorithms.md §17.11.1
            mean = self.means[c].float() * (0.9 + 0.1 * (t_c + 1) / (t + 1))
            noise = torch.randn(SAMPLES_PER_CLASS, self.feature_dim, generator=self.alignment_generator,
                                device=self.device)
            xs.append(mean + noise @ factors[c].T)
            ys.append(torch.full((SAMPLES_PER_CLASS,), c, dtype=torch.int64, device=self.device))
        return torch.cat(xs), torch.cat(ys)

    def task_bounds(self) -> list[int]:
        """[0, n_0, n_0 + n_1, ...]: the first class of every task so far, and the number of classes seen."""
        bounds = [0]
        for head in self.heads:
            bounds.append(bounds[-1] + head.out_features)
        return bounds

    def alignment_loss(self, logits: torch.Tensor, targets: torch.Tensor, batch: Batch) -> torch.Tensor:
        """CE(z / (n_bar tau), y), n_bar = mean over tasks k of ||z[:, task k]|| + 1e-7 per sample (gradient through
        n_bar); plain CE when tau = ``ca_with_logit_norm`` <= 0 (algorithms.md §17.6). ``logits`` (B, C) float32."""
        tau = self.cfg.ca_with_logit_norm
        if tau > 0:
            bounds = self.task_bounds()
            norms = torch.stack([logits[:, a:b].norm(dim=1) + NORM_EPS for a, b in zip(bounds, bounds[1:])], dim=1)
            logits = logits / (norms.mean(dim=1, keepdim=True) * tau)
        return cross_entropy(logits, targets, batch)

    def align(self, task: TaskData) -> nn.ModuleList:
        """A copy of every head trained on sampled features for ``ca_epochs`` epochs (algorithms.md §17.6); the raw
        heads and the backbone do not change."""
        cfg, t = self.cfg, task.task_id
        aligned = copy.deepcopy(self.heads).requires_grad_(True)
        optimizer = torch.optim.SGD(aligned.parameters(), lr=cfg.slca_lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.ca_epochs, eta_min=0.0)
        factors = [torch.linalg.cholesky(cov) for cov in self.covs]
        learner = self

        class Epochs:  # fresh samples every epoch, shuffled, C batches of 256
            def __len__(self) -> int:
                return task.seen

            def __iter__(self):
                x, y = learner.sample_features(task, factors)
                order = torch.randperm(x.shape[0], generator=learner.alignment_generator, device=learner.device)
                for part in order.split(SAMPLES_PER_CLASS):
                    yield Batch(part, x[part], y[part], None)

        def forward(batch: Batch) -> torch.Tensor:
            return self.alignment_loss(torch.cat([h(batch.x) for h in aligned], dim=1), batch.y, batch)

        def log(epoch: int, loss: float) -> None:
            logger.info("Task %d, CA Epoch %d/%d => Loss %.3f", t, epoch, cfg.ca_epochs, loss)

        self.loop.run(Epochs(), range(1, cfg.ca_epochs + 1), forward, optimizer,
                      grads=[FlatGradients(dict(aligned.named_parameters()))], scheduler=scheduler,
                      where=f"task {t} alignment", label="CA", on_epoch=log)
        return aligned.requires_grad_(False)

    # ---- prediction, state, counts -----------------------------------------------------------------------
    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, seen): the concatenated logits of every head (the aligned copy after an alignment)."""
        heads = self.aligned if self.aligned is not None else self.heads
        return torch.cat([h(features) for h in heads], dim=1)

    def head_parameter_count(self) -> int:
        """The heads as the official network holds them: sum over tasks of D * n_t + n_t."""
        return sum(p.numel() for p in self.heads.parameters())

    def modules(self) -> list[nn.Module]:
        return [*super().modules(), self.heads, *([self.aligned] if self.aligned is not None else [])]

    def stateful(self) -> dict[str, Any]:
        return {**super().stateful(), "slca_alignment": GeneratorState(self.alignment_generator)}

    def head_state(self) -> dict:
        def pack(heads):
            return None if heads is None else [(h.weight.detach(), h.bias.detach()) for h in heads]

        return {"heads": pack(self.heads), "aligned": pack(self.aligned), "means": self.means, "covs": self.covs}

    def load_head_state(self, state: dict) -> None:
        def unpack(pairs):
            if pairs is None:
                return None
            return nn.ModuleList(linear_from(w, b, self.device) for w, b in pairs).requires_grad_(False)

        self.heads, self.aligned = unpack(state["heads"]), unpack(state["aligned"])
        self.means, self.covs = state["means"].to(self.device), state["covs"].to(self.device)
