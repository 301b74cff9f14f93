"""SPU, Selective Parameter Update (Zhang, Janson, Aljundi, Elhoseiny, CVPR 2024), as a preset (algorithms.md §19.2).

Official code: github wx-zhang/spu (``trainer/spu.py``, ``trainer/finetune.py``, ``config/baseline/spu.yaml``), on
CLIP. Per task:

1. **score** (label-free): on the task's training batches, gradients of L_b = mean_i ||z_i||^2 with z_i the logits
   of image i (:func:`logit_norm`; ours: 100 x the cosines against the task's class prototypes, CLIP's logit scale
   times cosines against class text embeddings there, the host having no text tower), summed with their sign,
   s = |sum_b g_b|. The pass ends after 0-based batch k as soon as k > 0.25 N (``score_batch_percentage``) and no
   scored entry has |sum| < 1e-12 (:func:`spu_stop`);
2. **select** (:func:`first_mlp`): only each block's first MLP layer trains: per weight tensor the top
   ``int(spu_rate * numel)`` scores (``torch.topk``), its bias fully; everything else is frozen;
3. **train** the remaining epochs, the gradient masked every step, AdamW (lr 7.5e-6, weight decay 0.2, betas
   0.9/0.999), on cross-entropy over the same head (fixed, scale 100 as CLIP's contrastive logits).

Port choices (algorithms.md §19.2 marks them F; each in docs/deviations.md section 6): gradients summed per batch (the
shipped code never zeroes them, weighting early batches); weight decay only where the mask may move (the shipped AdamW
also shrinks unselected ``fc1`` entries: ``spu_decay_masked_entries`` reproduces it); a constant learning rate (the
shipped schedule runs epoch 0 at lr 0 and is flat within 0.3% afterwards).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from models.loop import global_mean
from models.sparse.estimators import Estimator, ScoringRule
from models.sparse.gps import signed_sum
from models.sparse.losses import head_logits
from models.sparse.presets import register_preset, unread_by_preset
from utils.config import ConfigKeys, config_keys, key
from utils.loaders import Batch
from utils.registry import ESTIMATORS, LOSSES, OPTIMIZERS, SCOPES

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

SCORE_BATCH_PERCENTAGE = 0.25  # config/baseline/spu.yaml
#: the scale of SPU's logits: OpenAI CLIP ViT-B/16's learned logit scale, exp(4.6052) = 100 (CLIP caps it there), which
#: multiplies the image-text cosines SPU scores and trains on (clip/model.py ``logit_scale.exp()``); the prototype
#: cosine head here gets it as sigma, fixed (SPU's scope never trains ``logit_scale``)
CLIP_LOGIT_SCALE = 100.0
ZERO_SCORE = 1e-12  # trainer/spu.py: the pass continues while an entry's |sum| is below this


@config_keys("SPU preset (models/sparse/spu.py)", unused_because=unread_by_preset)
class SpuKeys(ConfigKeys):
    spu_rate: float = key(0.1, "spu: fraction of each first-MLP weight tensor selected per task (selection_rate, "
                               "algorithms.md §19.2).", gt=0, le=1)
    spu_lr: float = key(7.5e-6, "spu: AdamW learning rate (the official CLIP value; algorithms.md §19.2).", gt=0)
    spu_weight_decay: float = key(0.2, "spu: AdamW weight decay (official 0.2).", ge=0)
    spu_decay_masked_entries: bool = key(False, "spu: let AdamW's decoupled weight decay shrink the unselected "
                                                "first-MLP entries too, as the shipped code does "
                                                "(algorithms.md §19.2).")


def is_first_mlp(name: str, names: set[str]) -> bool:
    """True for a block's first MLP layer: a ViT's ``mlp.fc1`` (SPU's ``c_fc``), or an inverted-residual block's
    expansion ``conv_pw`` (a timm EfficientNet block that also has ``conv_pwl``; a depthwise-separable block's
    ``conv_pw`` is its projection and does not count)."""
    if ".mlp.fc1." in name:
        return True
    if ".conv_pw." in name:
        return name.replace(".conv_pw.", ".conv_pwl.").rsplit(".", 1)[0] + ".weight" in names
    return False


def logit_norm(tuner: SparseTuner, head: nn.Module, task: TaskView) -> Callable[[Batch], torch.Tensor]:
    """SPU's label-free score loss, ``logits.pow(2).sum(1).mean()`` of the batch (``trainer/spu.py``), on the task's
    prototype cosine head; under torchrun the whole batch's mean (``models.loop.global_mean``)."""
    def forward(batch: Batch) -> torch.Tensor:
        squares = head_logits(tuner, head, batch).pow(2).sum(dim=1)
        return squares.mean() if batch.rows is None else global_mean(squares.sum(), batch)

    return forward


LOSSES.register("logit_norm", logit_norm)


def spu_stop(k: int, n: int, rule: ScoringRule) -> bool:
    """End the pass after 0-based batch ``k`` of ``n`` when k > 0.25 n and no trainable entry (a first-MLP weight or
    bias: SPU's scope here) has |sum| < 1e-12 (``trainer/spu.py``: the check runs over every trainable parameter; at
    least floor(0.25 n) + 2 batches, possibly all)."""
    if not k > SCORE_BATCH_PERCENTAGE * n:
        return False
    names = set(rule.firsts)
    return all(bool((s.abs() >= ZERO_SCORE).all()) for name, s in rule.firsts.items() if is_first_mlp(name, names))


ESTIMATORS.register("spu", Estimator("spu", signed_sum, stop=spu_stop,
                                     source="SPU (github wx-zhang/spu trainer/spu.py), algorithms.md §19.2"))


@SCOPES.register("first_mlp")
def first_mlp(tuner: SparseTuner, scores: Mapping[str, torch.Tensor],
              budget: float) -> tuple[dict[str, torch.Tensor], int]:
    """SPU's scope (``trainer/spu.py``): each first-MLP weight keeps its top ``int(budget * numel)`` scores
    (``torch.topk`` over the flattened tensor), its bias trains fully, every other tensor is frozen."""
    names = set(tuner.state.shapes)
    selected = {}
    for name, shape in tuner.state.shapes.items():
        mask = torch.zeros(shape, dtype=torch.bool, device=tuner.device)
        if is_first_mlp(name, names):
            if name.endswith(".weight"):
                k = int(budget * mask.numel())
                if k:
                    mask.view(-1)[torch.topk(scores[name].reshape(-1).float(), k).indices.to(tuner.device)] = True
            else:
                mask.fill_(True)
        selected[name] = mask
    return selected, 0


@OPTIMIZERS.register("spu_adamw")
def spu_adamw(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """SPU: AdamW (betas 0.9/0.999, eps 1e-8) at ``spu_lr`` over the first-MLP tensors, weight decay
    ``spu_weight_decay``, constant learning rate. The prototype head is not trained. Unless
    ``spu_decay_masked_entries``, the phase keeps every unselected entry fixed (decoupled weight decay would shrink
    it; algorithms.md §19.6 note 1)."""
    cfg = tuner.cfg
    names = set(tuner.state.shapes)
    params = [p for n, p in tuner.network.named_parameters() if is_first_mlp(n, names)]
    optimizer = torch.optim.AdamW(params, lr=cfg.spu_lr, betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=cfg.spu_weight_decay)
    optimizer.decays_masked_entries = cfg.spu_decay_masked_entries
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [], gamma=1.0)


register_preset("spu", loss="ce", score_loss="logit_norm", importance="spu", scope="first_mlp", step_rule=None,
                optimizer="spu_adamw", drop=False, overlap=False, freeze=False, exclude_embeddings=False,
                strict_mask=True, gate=False, head="prototypes", head_scale=CLIP_LOGIT_SCALE, budget_key="spu_rate",
                epochs_key="mi_epochs",
                label="SPU", order=93, keys=("spu_rate", "spu_lr", "spu_weight_decay", "spu_decay_masked_entries"),
                compare=True,
                source="SPU (github wx-zhang/spu: trainer/spu.py, trainer/finetune.py), algorithms.md §19.2",
                lr_key="spu_lr")
