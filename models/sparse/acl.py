"""ACL, Adapt before Continual Learning (Lu et al., AAAI 2026), as a preset of the tuning phase (algorithms.md §19.1).

Official code: github byyx666/ACL_code (``models/simplecil.py``, ``models/ranpac.py``, ``exps/*_inr.json``). At the
start of every task, before the host's own fitting:

1. **prototypes**: with the network in eval mode and no gradients, one pass over the task's training loader (its
   augmented views, as the official code) gives p_c, the mean raw backbone feature of each current class; they are
   fixed for the phase;
2. **adapt**: ``warm_epochs`` epochs (1) of SGD (momentum 0.9; learning rate and weight decay the host's in ACL's
   configs: SimpleCIL 1e-4 / 5e-4, RanPAC 1e-4 / 5e-3, L2P and DualPrompt 1e-6 / 0) over **every** backbone
   parameter, on

       L = CE(l, y - known),  l_c = <normalise(f(x)), normalise(p_c)> / tau,  tau = ``warm_temp`` 0.1

   over the current task's classes only. No scheduler, no clipping, no mask: ACL is the dense baseline of the slot.

Then the host runs (prototypes / ridge). What differs from the official code is in docs/deviations.md section 6.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader

from models.loop import FlatGradients
from models.sparse.presets import register_preset, unread_by_preset
from utils.config import ConfigKeys, ExperimentConfig, config_keys, key
from utils.registry import LEARNERS, LOSSES, OPTIMIZERS, PHASES

if TYPE_CHECKING:  # the tuner imports this package's modules
    from models.sparse.tuner import SparseTuner, TaskView

logger = logging.getLogger(__name__)

MOMENTUM = 0.9  # models/simplecil.py, models/ranpac.py: optim.SGD(momentum=0.9), algorithms.md §19.1

#: registered learner -> (``warm_lr``, the host's ``weight_decay``) in ACL's configs (github byyx666/ACL_code
#: exps/simplecil_inr.json, ranpac_inr.json, l2p_inr.json, dualprompt_inr.json; algorithms.md §19.1)
HOST_VALUES = {"simplecil": (1e-4, 5e-4), "ranpac": (1e-4, 5e-3), "l2p": (1e-6, 0.0), "dualprompt": (1e-6, 0.0)}
#: (``warm_lr``, weight decay) for a learner ACL has no config for: SimpleCIL's
OTHER_HOST = HOST_VALUES["simplecil"]


@config_keys("ACL preset (models/sparse/acl.py)", unused_because=unread_by_preset)
class AclKeys(ConfigKeys):
    warm_epochs: int = key(1, "acl: adaptation epochs per task (official 1, algorithms.md §19.1).", min=1)
    warm_lr: Optional[float] = key(None, "acl: SGD learning rate of the backbone; null: the host's value in ACL's "
                                         "configs (SimpleCIL and RanPAC 1e-4, L2P and DualPrompt 1e-6; 1e-4 for other "
                                         "learners).", gt=0)
    warm_temp: float = key(0.1, "acl: temperature tau of the prototype-cosine logits (official 0.1).", gt=0)
    warm_weight_decay: Optional[float] = key(
        None, "acl: SGD weight decay; null: the host's value in ACL's configs (SimpleCIL 5e-4, RanPAC 5e-3, L2P and "
              "DualPrompt 0; 5e-4 for other learners).", ge=0)


def host_values(cfg: ExperimentConfig) -> tuple[float, float]:
    """(learning rate, weight decay) of ACL's SGD: ``warm_lr`` and ``warm_weight_decay``, each null replaced by the
    host's value in ACL's configs (:data:`HOST_VALUES`; :data:`OTHER_HOST` for a learner without one). The host is the
    registered learner of ``model_name`` (aliases resolved: ``ranpac_mist`` is RanPAC)."""
    lr, decay = HOST_VALUES.get(LEARNERS.resolve(cfg.model_name), OTHER_HOST)
    return (lr if cfg.warm_lr is None else float(cfg.warm_lr),
            decay if cfg.warm_weight_decay is None else float(cfg.warm_weight_decay))



@OPTIMIZERS.register("acl_sgd")
def acl_sgd(tuner: SparseTuner, head: Optional[nn.Module] = None) -> tuple[torch.optim.Optimizer, LRScheduler]:
    """ACL: SGD (momentum 0.9, learning rate and weight decay :func:`host_values`) over every backbone parameter,
    constant learning rate (a MultiStepLR without milestones). ``head`` is not trained (ACL's head is fixed)."""
    lr, decay = host_values(tuner.cfg)
    params = [p for p in tuner.network.convnet.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=decay)
    return optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [], gamma=1.0)


class AdaptPhase:
    """One task of ACL: fixed class prototypes, then dense SGD on the prototype-cosine cross-entropy."""

    def __init__(self, tuner: SparseTuner) -> None:
        self.tuner = tuner

    def run(self, loader: DataLoader, task: TaskView) -> dict[str, Any]:
        """Adapt the backbone to ``task`` (algorithms.md §19.1); returns its accounting for results.json.

        Raises:
            NonFiniteError: a loss was NaN or infinite.
        """
        tuner, cfg, t = self.tuner, self.tuner.cfg, task.task_id
        epochs = tuner.recipe.epochs
        head = tuner.prototype_head(loader, task)  # eval mode, no gradients: the class means of this loader
        with torch.no_grad():
            head.sigma.fill_(1.0 / cfg.warm_temp)
        head.requires_grad_(False)
        forward = LOSSES.get("ce")(tuner, head, task)
        params = {n: p for n, p in tuner.network.named_parameters() if n.startswith("convnet.") and p.requires_grad}
        optimizer, _ = tuner.make_optimizer()

        def log(epoch: int, loss: float) -> None:
            logger.info("Task %d, ACL epoch %d/%d => Loss %.3f", t, epoch, epochs, loss)

        losses, steps, _ = tuner.loop.run(loader, range(1, epochs + 1), forward, optimizer,
                                          grads=[FlatGradients(params)], module=tuner.network, where=f"task {t}",
                                          label="ACL", on_epoch=log)
        tuner.network.eval()
        return {"method": tuner.policy, "selected_fraction": 1.0, "trainable_fraction": 1.0,
                "backbone_entries": tuner.backbone_numel, "steps": steps, "epoch_losses": losses}


PHASES.register("acl", AdaptPhase)
register_preset("acl", phase="acl", loss="ce", importance=None, scope=None, step_rule=None, optimizer="acl_sgd",
                drop=False, overlap=False, freeze=False, exclude_embeddings=False, strict_mask=False, gate=False,
                head="prototypes", budget_key=None, epochs_key="warm_epochs", label="ACL", order=65,
                keys=("warm_epochs", "warm_lr", "warm_temp", "warm_weight_decay"), compare=True,
                source="ACL (github byyx666/ACL_code: models/simplecil.py, models/ranpac.py), algorithms.md §19.1",
                lr_key="warm_lr")
