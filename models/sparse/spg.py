"""SPG, Soft-masking of Parameter-level Gradient flow (Konishi et al., ICML 2023), as a preset (algorithms.md §19.3).

Authors' code: github UIC-Liu-Lab/spg (``approaches/spg/spg.py``, ``appr_spg.py``, ``other_tasks_loss.py``); a port
for pre-trained models in github wx-zhang/spu (``trainer/spg.py``). algorithms.md §19.3's recommended port to our hosts:

1. **train** the task: ``mi_epochs`` epochs of cross-entropy on a new linear head over the task's classes (the
   authors' per-task ``nn.Linear`` heads, torch's default init), plain SGD (``spg_lr``; no momentum or weight decay,
   as the original) over the backbone and that head, every backbone gradient multiplied by (1 - a), the soft mask of
   the earlier tasks (none at task 0), and the head's gradient by the scalar 1 - mean(a);
2. **importance**, after the task on its training data (the original timing): for the "recent" term the CE of this
   task's head, for each earlier task t an "other" term, the sum of the logits of t's stored head (labels unused);
   each term's gradients summed over every batch (signed), h; per tensor s = |tanh((h - mean h) / std h)| (unbiased
   std; an all-zero tensor gives 0); gamma = max over the terms;
3. a <- max(a, gamma), kept across tasks (in [0, 1), never binarised).

Our choices are listed in docs/deviations.md section 6 (hosts' heads, optimizer, scope of every backbone tensor).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from models.loop import FlatGradients
from models.sparse.estimators import scoring_pass
from models.sparse.losses import head_logits
from models.sparse.presets import register_preset, unread_by_preset
from utils.config import ConfigKeys, config_keys, key
from utils.loaders import Batch
from utils.registry import LOSSES, OPTIMIZERS, PHASES

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

logger = logging.getLogger(__name__)


@config_keys("SPG preset (models/sparse/spg.py)", unused_because=unread_by_preset)
class SpgKeys(ConfigKeys):
    spg_lr: float = key(1e-3, "spg: plain SGD learning rate of the backbone and the task's head (ours: the original "
                              "0.25 trains an AlexNet from scratch; algorithms.md §19.3).", gt=0)


def standardised_importance(h: torch.Tensor) -> torch.Tensor:
    """SPG's per-tensor normalisation (``spg.py``): |tanh((h - mean(h)) / std(h))| with the unbiased std over the
    tensor's entries; 0 for an all-zero tensor (or a single entry). Float32, ``h``'s shape, values in [0, 1)."""
    h = h.float()
    if h.numel() < 2 or not bool(h.any()):
        return torch.zeros_like(h)
    std = h.std(unbiased=True)
    if float(std) == 0.0:
        return torch.zeros_like(h)
    return torch.tanh((h - h.mean()) / std).abs()


def logit_sum(tuner: SparseTuner, weight: torch.Tensor, bias: torch.Tensor) -> Callable[[Batch], torch.Tensor]:
    """The "other tasks" loss of SPG (``other_tasks_loss.py``): the sum over the batch and the classes of an earlier
    task's linear head's logits, f W^T + b, with W (C, D) and b (C,) float32 fixed; labels unused. Under torchrun each
    process sums its rows (the summed gradients are the whole batch's)."""
    return lambda batch: head_logits(tuner, lambda f: F.linear(f, weight, bias), batch).sum()


class SoftMaskRule:
    """Per step: the backbone's flat gradient times (1 - a), the head's times 1 - mean(a); buffers zeroed after."""

    def __init__(self, keep: Optional[torch.Tensor], head_scale: float) -> None:
        self.keep, self.head_scale = keep, head_scale

    def before_step(self, grads: Sequence[FlatGradients]) -> None:
        """Scale the backbone's flat gradient ``grads[0]`` by ``keep`` = 1 - a (if any) and every other buffer (the
        head's) by ``head_scale``, in place; counts nothing."""
        if self.keep is not None:
            grads[0].buffer[: self.keep.numel()].mul_(self.keep)
        for flat in grads[1:]:
            flat.buffer.mul_(self.head_scale)
        return None

    def after_step(self, grads: Sequence[FlatGradients]) -> None:
        """Zero the gradient buffers."""
        for flat in grads:
            flat.buffer.zero_()


class SoftMaskPhase:
    """One task of SPG (see the module docstring). ``tuner.phase_state``: ``spg_a`` (flat float32 soft mask over the
    backbone, parameter order), ``spg_heads`` (every earlier task's head weights, (C_total, D) float32),
    ``spg_bias`` (their biases, (C_total,)) and ``spg_sizes`` (classes per earlier task, int64)."""

    def __init__(self, tuner: SparseTuner) -> None:
        self.tuner = tuner

    def run(self, loader: DataLoader, task: TaskView) -> dict[str, Any]:
        """Train ``task`` through the soft mask of the earlier tasks, then add its importance to the mask and store its
        head (algorithms.md §19.3); returns its accounting for results.json.

        Raises:
            NonFiniteError: a loss was NaN or infinite.
        """
        tuner, t = self.tuner, task.task_id
        epochs = tuner.recipe.epochs
        state = tuner.phase_state
        a = state.get("spg_a")
        head = tuner.task_head(loader, task)
        forward = LOSSES.get("ce")(tuner, head, task)
        backbone = {n: p for n, p in tuner.network.named_parameters() if n.startswith("convnet.")}
        optimizer, _ = tuner.make_optimizer(head)
        rule = SoftMaskRule(None if a is None else (1.0 - a).to(tuner.device),
                            1.0 if a is None else 1.0 - float(a.double().mean()))

        def log(epoch: int, loss: float) -> None:
            logger.info("Task %d, SPG epoch %d/%d => Loss %.3f", t, epoch, epochs, loss)

        losses, steps, _ = tuner.loop.run(
            loader, range(1, epochs + 1), forward, optimizer,
            grads=[FlatGradients(backbone), FlatGradients(dict(head.named_parameters()))], rule=rule,
            module=tuner.network, where=f"task {t}", label="SPG", on_epoch=log)
        head.requires_grad_(False)
        gamma = self.importance(loader, task, head)
        state["spg_a"] = gamma if a is None else torch.maximum(a.to(gamma.device), gamma)
        # task_head returns an nn.Module; SPG's recipe head is "linear", an nn.Linear with a weight and a bias
        new = {"spg_heads": head.weight.detach().clone(), "spg_bias": head.bias.detach().clone(),  # type: ignore[operator]
               "spg_sizes": torch.tensor([head.weight.shape[0]], dtype=torch.int64)}  # type: ignore[index]
        for name, value in new.items():
            state[name] = value if name not in state else torch.cat([state[name], value.to(state[name].device)])
        tuner.network.eval()
        soft = state["spg_a"]
        return {"method": tuner.policy, "steps": steps, "epoch_losses": losses,
                "backbone_entries": tuner.backbone_numel,
                "soft_mask_mean": float(soft.double().mean()),
                "soft_mask_above_half": float((soft > 0.5).double().mean())}

    def importance(self, loader: DataLoader, task: TaskView, head: nn.Module) -> torch.Tensor:
        """gamma: max over the recent term and one term per earlier task of :func:`standardised_importance` of each
        backbone tensor's signed gradient sum over ``loader`` (no update). Flat float32 (backbone entries,)."""
        tuner = self.tuner
        terms = [LOSSES.get("ce")(tuner, head, task)]
        state = tuner.phase_state
        if "spg_heads" in state:
            sizes = state["spg_sizes"].tolist()
            for weight, bias in zip(torch.split(state["spg_heads"].to(tuner.device), sizes),
                                    torch.split(state["spg_bias"].to(tuner.device), sizes)):
                terms.append(logit_sum(tuner, weight, bias))
        gamma = None
        for i, forward in enumerate(terms):
            sums = scoring_pass(tuner.loop, tuner.network, loader, forward, tuner.state, moments=True,
                                where=f"task {task.task_id} importance term {i}")
            flat = torch.cat([standardised_importance(sums.firsts[n]).reshape(-1) for n in tuner.backbone_names])
            gamma = flat if gamma is None else torch.maximum(gamma, flat)
        return gamma


@OPTIMIZERS.register("spg_sgd")
def spg_sgd(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, None]:
    """SPG: plain SGD (no momentum, no weight decay) at ``spg_lr`` over the backbone and the task's head."""
    params = list(tuner.network.convnet.parameters()) + (list(head.parameters()) if head is not None else [])
    optimizer = torch.optim.SGD(params, lr=tuner.cfg.spg_lr, momentum=0.0, weight_decay=0.0)
    return optimizer, None


PHASES.register("spg", SoftMaskPhase)
register_preset("spg", phase="spg", loss="ce", importance=None, scope=None, step_rule=None, optimizer="spg_sgd",
                drop=False, overlap=False, freeze=False, exclude_embeddings=False, strict_mask=False, gate=False,
                head="linear", budget_key=None, epochs_key="mi_epochs", label="SPG", order=96,
                keys=("spg_lr",), compare=True,
                source="SPG (github UIC-Liu-Lab/spg approaches/spg; port wx-zhang/spu trainer/spg.py), "
                       "algorithms.md §19.3",
                lr_key="spg_lr")
