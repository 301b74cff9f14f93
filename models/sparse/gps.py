"""GPS, Gradient-based Parameter Selection (Zhang et al., CVPR 2024), as a preset of the tuning phase
(algorithms.md §19.5).

Official code: github FightingFighting/GPS (``train_gps.py``, ``utils/pruning.py``, ``utils/loss_utils.py``). Before
each task (the official code selects once, before fine-tuning; in front of a class-incremental host it is re-run
per task, algorithms.md §19.5 "Port"):

1. **score**: one pass over the task's data, gradients of a supervised contrastive loss (Khosla et al. 2020; tau
   0.07, contrast mode "all", two views, L2-normalised backbone features) summed over the batches with their sign,
   s = |sum_b g_b| (:data:`signed_sum`, shared with SPU);
2. **select** (:func:`per_row`): norms, position embedding and class token never train; every bias, layer-scale
   ``gamma`` and head trains fully; every other weight keeps, in each output row, the K entries of largest s
   (``gps_k``; a conv weight is reshaped to (out_channels, -1));
3. **train** the remaining epochs with the gradient masked every step, Adam without weight decay (masked entries
   stay exactly fixed), cosine learning rate, cross-entropy on a new linear head over the task's classes (timm's ViT
   head init, as the official ``vit_base_patch16_224_in21k`` gets a fresh head), trained with the same Adam.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from models.sparse.estimators import Estimator, PassSums
from models.sparse.losses import two_view_embeddings
from models.sparse.presets import register_preset, unread_by_preset
from utils.config import ConfigKeys, config_keys, key
from utils.loaders import Batch
from utils.registry import ESTIMATORS, LOSSES, OPTIMIZERS, SCOPES

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

SUPCON_TEMPERATURE = 0.07  # GPS utils/loss_utils.py: temperature = base_temperature = 0.07
COSINE_MIN_LR = 1e-8  # GPS: cosine schedule's floor


@config_keys("GPS preset (models/sparse/gps.py)", unused_because=unread_by_preset)
class GpsKeys(ConfigKeys):
    gps_k: int = key(1, "gps: input connections kept per output row of every weight matrix (official K: 1 on most "
                        "VTAB tasks, 2 on CUB, 15 on Cars; algorithms.md §19.5).", min=1)
    gps_lr: float = key(0.01, "gps: Adam learning rate of the selected entries and the CE head (official scripts "
                              "train_scripts/vit/**/train_gps.sh: CIFAR-100 0.01, CUB 0.003, Stanford Cars 5e-4; "
                              "algorithms.md §19.5).", gt=0)


def supervised_contrastive(features: torch.Tensor, labels: torch.Tensor, temperature: float = SUPCON_TEMPERATURE
                           ) -> torch.Tensor:
    """SupCon loss (Khosla et al. 2020, eq. 2, "L_out"), contrast mode "all", as GPS's ``SupConLoss``.

    With z the L2-normalised rows, for every anchor a of the 2B rows, P(a) = the other rows of a's label and
    A(a) = every row but a:

        L = -(1 / 2B) sum_a 1/|P(a)| sum_{p in P(a)} log( exp(z_a.z_p / tau) / sum_{b in A(a)} exp(z_a.z_b / tau) )

    (times tau / base_tau = 1). The row maximum is subtracted first (detached), which leaves L unchanged.

    Args:
        features: (2B, D) float: rows 0..B-1 the first views, B..2B-1 the second views in the same order.
        labels: (B,) int64.
        temperature: tau.

    Raises:
        ValueError: not 2B rows for B labels.
    """
    n = features.shape[0]
    if n % 2 or labels.shape[0] * 2 != n:
        raise ValueError(f"expected 2B features and B labels, got {n} and {labels.shape[0]}")
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    others = ~torch.eye(n, dtype=torch.bool, device=z.device)
    y = labels.repeat(2)
    positives = (y[:, None] == y[None, :]) & others
    log_prob = logits - torch.log((torch.exp(logits) * others).sum(dim=1, keepdim=True))
    mean_positive = (log_prob * positives).sum(dim=1) / positives.sum(dim=1)
    return -mean_positive.mean()


@LOSSES.register("supcon")
def supcon(tuner: SparseTuner, head: Optional[nn.Module], task: TaskView) -> Callable[[Batch], torch.Tensor]:
    """GPS's scoring loss: :func:`supervised_contrastive` of the backbone features of (x, aug(x)) (the project's
    batched second view; gathered over torchrun processes as MIST's loss: ``losses.two_view_embeddings``)."""
    return lambda batch: supervised_contrastive(*two_view_embeddings(tuner, batch, tuner.network.convnet))


def signed_sum(sums: PassSums, network: nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """s = |sum_b g_b|: the absolute value of the signed gradient sum over the pass's batches (GPS
    ``train_gps.py`` one epoch with ``zero_grad`` only before the loop; SPU ``trainer/spu.py`` with the port's
    per-batch sum, algorithms.md §19.2, §19.5). Not a sum of |g_b| (algorithms.md §19.6 note 2)."""
    return {name: v.abs() for name, v in sums.firsts.items()}


ESTIMATORS.register("signed_sum", Estimator("signed_sum", signed_sum,
                                            source="GPS / SPU: |sum of gradients|, algorithms.md §19.5"))


def norm_parameters(module: nn.Module) -> set[str]:
    """Names (in ``module.named_parameters()``) of the parameters of normalisation layers (LayerNorm, BatchNorm,
    GroupNorm and any module whose class name contains "Norm")."""
    out = set()
    for prefix, sub in module.named_modules():
        if (isinstance(sub, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase))
                or "Norm" in type(sub).__name__):
            out.update(f"{prefix}.{n}" if prefix else n for n, _ in sub.named_parameters(recurse=False))
    return out


def row_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Per output row (dim 0; other dims flattened), a bool mask of the k largest scores (all when a row is shorter).

    ``torch.topk`` per row; ties broken by topk (the official numpy ``argsort`` breaks them otherwise). Returns a
    mask of ``scores``' shape.
    """
    rows = scores.reshape(scores.shape[0], -1) if scores.ndim > 1 else scores.reshape(1, -1)
    k = min(k, rows.shape[1])
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask.scatter_(1, torch.topk(rows.float(), k, dim=1).indices, True)
    return mask.view(scores.shape)


@SCOPES.register("per_row")
def per_row(tuner: SparseTuner, scores: Mapping[str, torch.Tensor],
            budget: float) -> tuple[dict[str, torch.Tensor], int]:
    """GPS's selection (``utils/pruning.py``, algorithms.md §19.5), rules in order: norm layers, ``pos_embed``,
    ``cls_token`` (``reg_token``) -> frozen; names with ``head``, ``bias`` or ``gamma`` -> fully trainable; every other
    tensor -> the ``int(budget)`` largest scores of each output row. The projection head (``simclr``, not part of GPS)
    is frozen."""
    k = int(budget)
    norms = norm_parameters(tuner.network)
    selected = {}
    for name, shape in tuner.state.shapes.items():
        if name in norms or name.startswith("simclr.") or any(part in name for part in
                                                                ("pos_embed", "cls_token", "reg_token")):
            selected[name] = torch.zeros(shape, dtype=torch.bool, device=tuner.device)
        elif any(part in name for part in ("head", "bias", "gamma")):
            selected[name] = torch.ones(shape, dtype=torch.bool, device=tuner.device)
        else:
            selected[name] = row_top_k(scores[name], k).to(tuner.device)
    return selected, 0


@OPTIMIZERS.register("gps_adam")
def gps_adam(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """GPS: Adam (betas 0.9/0.999, weight decay 0) at ``gps_lr`` over the backbone and the CE head, cosine learning
    rate over the phase's training epochs down to 1e-8 (the official 10 warm-up epochs of 100 are left out: the
    phase trains a few epochs; docs/deviations.md section 6)."""
    lr = tuner.cfg.gps_lr
    groups = [{"params": list(tuner.network.convnet.parameters())}]
    if head is not None:
        groups.append({"params": list(head.parameters())})
    optimizer = torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    train_epochs = max(tuner.recipe.epochs - 1, 1)

    def factor(step: int) -> float:  # stepped once after the scoring pass, then after every training epoch
        e = max(step - 1, 0)
        return (COSINE_MIN_LR + (lr - COSINE_MIN_LR) * 0.5 * (1 + math.cos(math.pi * e / train_epochs))) / lr

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


register_preset("gps", loss="ce", score_loss="supcon", importance="signed_sum", scope="per_row", step_rule=None,
                optimizer="gps_adam", drop=False, overlap=False, freeze=False, exclude_embeddings=False,
                strict_mask=True, gate=False, head="timm_linear", budget_key="gps_k", epochs_key="mi_epochs",
                label="GPS", order=95, keys=("gps_k", "gps_lr"), compare=True,
                source="GPS (github FightingFighting/GPS: train_gps.py, utils/pruning.py), algorithms.md §19.5",
                lr_key="gps_lr")
