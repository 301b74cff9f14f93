"""What L2P and DualPrompt share (algorithms.md §18.2-18.4): a frozen query model, a pool of keys, prompt selection by
cosine, the training of prompts, keys and a linear head on a frozen ViT, and their config keys.

- The **query** of an image is the [CLS] feature of a frozen copy of the pretrained ViT (``original_model`` of the
  ports), taken before any tuning phase; ``query_model: tuned`` reads the tuned backbone instead (algorithms.md §18.4).
- **Selection**: cos(q, k_m) for every key, the ``top_k`` largest per image; with ``batchwise_prompt`` every image
  gets the batch's ``top_k`` most frequent ids (ties broken as the ports' ``torch.topk`` over the ``torch.unique``
  counts breaks them, ``prompt_vote_ties``; under torchrun the counts cover the whole global batch).
- **Training** (:meth:`PromptHost.train_task`, l2p-pytorch/dualprompt-pytorch ``engine.py``): logits outside the task's
  classes are -inf, loss = CE - lambda S with S = (1/B) sum_b sum_{m selected for b} cos(q_b, k_m); Adam (0.9, 0.999,
  eps 1e-8, no weight decay), constant learning rate, the global gradient norm clipped at ``prompt_clip_norm``, a new
  optimizer every task; the ViT (and the query model) never train here.
- **Inference**: the same selection, the head over the classes seen so far (PILOT's slicing; algorithms.md §18.2).

A host subclasses :class:`PromptedViT` (its prompt parameters and ``features(x, ids)``) and :class:`PromptHost`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from backbones.vit_parts import frozen, vit_of
from models.base import Learner, TaskData
from models.heads import linear_from, timm_linear_head
from models.loop import FlatGradients, TrainAccuracy, TuningLoop, cross_entropy, global_mean
from models.sparse.optim import ClippedAdam
from utils import distributed
from utils.config import ConfigKeys, ExperimentConfig, config_keys, for_learners, key
from utils.errors import ConfigError
from utils.loaders import Batch
from utils.registry import LEARNERS
from utils.runtime import autocast

logger = logging.getLogger(__name__)

ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # timm create_optimizer defaults of the ports (algorithms.md §18.2)


def check_prompt_pool(cfg: ExperimentConfig, origin: Callable[[str], str]) -> None:
    """Refuse an L2P config whose pool is smaller than the prompts each image selects (``top_k``, null = the
    learner's default 5), which could only fail at the first selection.

    Raises:
        ConfigError: naming ``top_k`` and ``pool_size``.
    """
    if LEARNERS.resolve(cfg.model_name) != "l2p":
        return
    top_k = cfg.top_k if cfg.top_k is not None else LEARNERS.get(cfg.model_name).PROMPT_DEFAULTS["top_k"]
    if top_k > cfg.pool_size:
        raise ConfigError(f"{origin('pool_size')}: key 'top_k' ({top_k}) is larger than key 'pool_size' "
                          f"({cfg.pool_size}): each image selects top_k distinct prompts of the pool; use top_k <= "
                          "pool_size (official 5 of 10).")


@config_keys("L2P and DualPrompt (models/prompt_hosts.py)", validate=check_prompt_pool,
             applies=for_learners("l2p", "dualprompt"))
class PromptKeys(ConfigKeys):
    prompt_epochs: Optional[int] = key(None, "L2P/DualPrompt: epochs per task; null = the learner's default (L2P 5, "
                                             "DualPrompt 5).", min=1)
    prompt_lr: Optional[float] = key(None, "L2P/DualPrompt: Adam learning rate as used (the ports scale a base rate "
                                           "by batch / 256: L2P 0.03 * 16 / 256 = 1.875e-3, DualPrompt 0.03 * 24 / 256 "
                                           "= 2.8125e-3); null = that default.", gt=0)
    prompt_clip_norm: float = key(1.0, "L2P/DualPrompt: global gradient-norm clip (authors' ports 1.0; PILOT 0 = "
                                       "none).", ge=0)
    pull_constraint_coeff: Optional[float] = key(None, "L2P/DualPrompt: weight of the surrogate key-matching term; "
                                                       "null = L2P 0.1, DualPrompt 1.0 (official key).", ge=0)
    pool_size: int = key(10, "L2P: prompt pool size; DualPrompt: E-prompt pool size (official key).", min=1)
    top_k: Optional[int] = key(None, "L2P/DualPrompt: prompts selected per image; null = L2P 5, DualPrompt 1 "
                                     "(official key).", min=1)
    prompt_length: Optional[int] = key(None, "L2P: length of a pool prompt (5); DualPrompt: E-prompt length (cifar 5, "
                                             "imagenetr 20); null = 5 (official key 'length').", min=1)
    batchwise_prompt: bool = key(True, "L2P/DualPrompt: every image of a batch takes the batch's most frequent ids "
                                       "(official key; DualPrompt imagenetr false).")
    batchwise_prompt_eval: Optional[bool] = key(None, "L2P/DualPrompt: the batch vote at test time; null = "
                                                      "batchwise_prompt; false: each test image selects alone.")
    query_model: Literal["pretrained", "tuned"] = key(
        "pretrained", "L2P/DualPrompt: the query is the [CLS] feature of "
                      "a frozen copy of the pretrained ViT (official), or "
                      "of the tuned backbone (algorithms.md §18.4).")
    prompt_vote_ties: Literal["official", "smaller_id"] = key(
        "official", "L2P/DualPrompt: how the batch vote breaks a tie between ids of equal count: as the ports' "
                    "prompt.py (torch.topk over the torch.unique counts on the run's device: on the CPU the larger id "
                    "wins), or the smaller id first.")
    prompt_init: Literal["uniform", "jax"] = key("uniform", "L2P/DualPrompt: prompts, keys and prefixes drawn from "
                                                            "U(-1, 1) (PyTorch ports) or U[0, 0.01) (JAX official).")


def init_prompt(shape: tuple[int, ...], how: str) -> nn.Parameter:
    """A prompt, key or prefix tensor: U(-1, 1) (``uniform``, the ports) or U[0, 0.01) (``jax``, flax ``uniform()``)."""
    low, high = (-1.0, 1.0) if how == "uniform" else (0.0, 0.01)
    return nn.Parameter(torch.empty(shape).uniform_(low, high))


def batch_vote(counts: torch.Tensor, top_k: int, ties: str = "official") -> torch.Tensor:
    """The batch's ``top_k`` most frequent pool ids, most frequent first, from ``counts`` (M,) int64 (how many images
    selected each id).

    ``ties="official"``: the ports' ``prompt.py`` (l2p-pytorch, dualprompt-pytorch): the ids present in the batch in
    ascending order (``torch.unique(sorted=True)``) and their counts, padded to M entries with (smallest id, count 0),
    then ``torch.topk(counts, top_k)``; a tie between counts goes the way ``torch.topk`` breaks it on this device (on
    the CPU: the larger id). ``"smaller_id"``: a stable descending sort, the smaller id first.

    Returns:
        (top_k,) int64 ids on ``counts``' device.
    """
    if ties == "smaller_id":
        return torch.argsort(counts, descending=True, stable=True)[:top_k]
    present = torch.nonzero(counts).squeeze(1)
    ids, votes = present, counts[present]
    if present.numel() < counts.numel():
        pad = counts.numel() - present.numel()
        ids = torch.cat([ids, present[:1].expand(pad) if present.numel() else torch.zeros(pad, dtype=ids.dtype,
                                                                                             device=ids.device)])
        votes = torch.cat([votes, torch.zeros(pad, dtype=votes.dtype, device=votes.device)])
    return ids[torch.topk(votes, top_k).indices]


class PromptedViT(nn.Module):
    """A timm ViT, a frozen query model and a key pool; a host adds its prompts and :meth:`features`.

    Args:
        vit: the timm ViT with pretrained weights (the backbone the tuning phase tunes).
        host: the host's name (errors).
        query_copy: keep a frozen copy of ``vit`` as the query model (``query_model: pretrained``).
        pool_size: number of keys M.
        init: ``prompt_init``.

    ``forward(x)`` (B, 3, H, W) -> features (B, D) with the test-time selection (``eval_batchwise``); ``out_dim`` = D.

    Raises:
        ConfigError: ``vit`` is not a timm VisionTransformer with standard blocks.
    """

    def __init__(self, vit: nn.Module, host: str, query_copy: bool, pool_size: int, init: str) -> None:
        super().__init__()
        self.vit = vit_of(vit, host)
        self.query = copy.deepcopy(vit).requires_grad_(False).eval() if query_copy else None
        self.out_dim, self.init = int(vit.out_dim), init
        self.keys = init_prompt((pool_size, self.out_dim), init)
        self.top_k, self.eval_batchwise, self.vote_ties = 1, True, "official"

    def train(self, mode: bool = True) -> "PromptedViT":
        """Train mode for the prompts and the ViT; the query model stays in eval mode (frozen, as the ports)."""
        super().train(mode)
        if self.query is not None:
            self.query.eval()  # the ports' original_model stays in eval mode
        return self

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        """The host's trainable tensors besides the keys, by name."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, ids: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Images (B, 3, H, W) and selected pool ids (B, k) int64 -> the head's input (B, D); ``rows``: a training
        batch's (first row, global size) under torchrun (``Batch.rows``), None otherwise."""
        raise NotImplementedError

    @torch.no_grad()
    def query_features(self, x: torch.Tensor) -> torch.Tensor:
        """The query q (B, D): [CLS] after the final norm of the query model (the ViT itself with ``tuned``)."""
        return (self.query if self.query is not None else self.vit)(x)

    def similarity(self, q: torch.Tensor) -> torch.Tensor:
        """cos(q_b, k_m): (B, D) -> (B, M), differentiable in the keys (``prompt.py`` l2_normalize, eps 1e-12)."""
        return F.normalize(q, dim=1) @ F.normalize(self.keys, dim=1).T

    def select(self, sim: torch.Tensor, batchwise: bool, whole_batch: bool = False) -> torch.Tensor:
        """The ``top_k`` ids per image (B, k) int64 from ``sim`` (B, M); with ``batchwise`` the batch's ``top_k`` most
        frequent ids, given to every image (:func:`batch_vote`); ``whole_batch``: the counts are summed over the
        torchrun processes (a training batch split over them)."""
        ids = torch.topk(sim.detach(), self.top_k, dim=1).indices
        if not batchwise:
            return ids
        counts = torch.bincount(ids.reshape(-1), minlength=sim.shape[1])
        if whole_batch and distributed.active():
            counts = distributed.all_reduce_sum_(counts)
        return batch_vote(counts, self.top_k, self.vote_ties).expand(sim.shape[0], -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: images (B, 3, H, W) -> prompted features (B, D), the prompts chosen by the query model."""
        return self.features(x, self.select(self.similarity(self.query_features(x)), self.eval_batchwise))


class PromptHost(Learner):
    """The learner of a prompt host: the head, the per-task training of prompts, keys and head, and the state.

    State: the backbone (:class:`PromptedViT`: ViT, query model, keys, prompts) and ``head``, ``nn.Linear(D, C)`` over
    every class of the data set (created at the first task; trunc-normal std 0.02, zero bias, as timm's head of the
    ports), of which :meth:`logits` returns the seen classes.
    """

    #: the learner's defaults of the keys left null: prompt_epochs, prompt_lr, pull_constraint_coeff, top_k
    PROMPT_DEFAULTS: dict[str, Any] = {}

    def __init__(self, cfg: ExperimentConfig, backbone: nn.Module, device: torch.device, seed: int) -> None:
        super().__init__(cfg, backbone, device, seed)
        self.head: Optional[nn.Linear] = None
        self.seen = 0
        backbone.top_k = self.setting("top_k")
        backbone.eval_batchwise = (cfg.batchwise_prompt if cfg.batchwise_prompt_eval is None
                                   else cfg.batchwise_prompt_eval)
        backbone.vote_ties = cfg.prompt_vote_ties

    @classmethod
    def host_passes(cls, cfg: ExperimentConfig, task_id: int) -> tuple[float, float]:
        """``prompt_epochs`` passes with a backward (the prompted ViT) and as many forwards of the query model."""
        epochs = cfg.prompt_epochs if cfg.prompt_epochs is not None else cls.PROMPT_DEFAULTS["prompt_epochs"]
        return float(epochs), float(epochs)

    def setting(self, name: str) -> Any:
        """Config key ``name``, or the learner's default when it is null."""
        value = getattr(self.cfg, name)
        return self.PROMPT_DEFAULTS[name] if value is None else value

    def tuned_module(self) -> nn.Module:
        return self.backbone.vit

    def train_ids(self, sim: torch.Tensor, task: TaskData) -> torch.Tensor:
        """The pool ids (B, k) used for a training batch (L2P: the selection; DualPrompt: the task's slot)."""
        return self.backbone.select(sim, self.cfg.batchwise_prompt, whole_batch=True)

    def before_training(self, task: TaskData) -> None:
        """Called before a task's optimizer is built (DualPrompt's shared pool copies a slot here)."""

    def train_task(self, task: TaskData, loop: TuningLoop) -> dict[str, Any]:
        """Prompts, keys and head on the task (module docstring); the ViT frozen."""
        cfg, t, net = self.cfg, task.task_id, self.backbone
        if self.head is None:
            self.head = timm_linear_head(net.out_dim, task.n_classes, self.device)  # the ports' timm head init
        self.before_training(task)
        params = {**net.prompt_parameters(), "keys": net.keys}
        params.update({f"head.{n}": p for n, p in self.head.named_parameters()})
        kw = dict(lr=self.setting("prompt_lr"), betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0)
        groups = [{"params": list(params.values())}]
        optimizer = (ClippedAdam(groups, cfg.prompt_clip_norm, **kw) if cfg.prompt_clip_norm > 0
                     else torch.optim.Adam(groups, **kw))
        outside = torch.ones(task.n_classes, dtype=torch.bool, device=self.device)
        outside[task.known: task.seen] = False
        lam, epochs = self.setting("pull_constraint_coeff"), self.setting("prompt_epochs")
        accuracy = TrainAccuracy(self.device)

        def forward(batch: Batch) -> torch.Tensor:
            x = batch.x.to(self.device, non_blocking=True)
            with autocast(self.device, cfg.precision):
                q = net.query_features(x).float()
                sim = net.similarity(q)
                ids = self.train_ids(sim, task)
                logits = self.head(net.features(x, ids, batch.rows).float()).masked_fill(outside, float("-inf"))
            targets = batch.y.to(self.device, non_blocking=True)
            accuracy.add(logits, targets)
            pulled = sim.gather(1, ids).sum()  # S times B
            surrogate = pulled / targets.shape[0] if batch.rows is None else global_mean(pulled, batch)
            return cross_entropy(logits, targets, batch) - lam * surrogate

        def log(epoch: int, loss: float) -> None:
            train_accuracy = accuracy.take()
            logger.info("Task %d, Epoch %d/%d => Loss %.3f, Train_accy %.2f", t, epoch, epochs, loss, train_accuracy)
            loop.train_accuracy(type(self).__name__, train_accuracy)

        loader = self.loader(task.train, shuffle=True, train=True)
        with frozen(net.vit):
            losses, steps, _ = loop.run(loader, range(1, epochs + 1), forward, optimizer,
                                        grads=[FlatGradients(params)], module=net, where=f"task {t}",
                                        label=self.TITLE, on_epoch=log)
        return {"method": self.TITLE.lower(), "steps": steps, "epoch_losses": losses}

    def update_head(self, task: TaskData) -> None:
        self.seen = task.seen

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, seen): the head's logits of the classes seen so far."""
        return self.head(features)[:, : self.seen]

    def count_parameters(self) -> tuple[int, int]:
        """(all, trainable): the ViT, the query model, keys, prompts and head; trainable: keys, prompts and head."""
        backbone = sum(p.numel() for p in self.backbone.parameters())
        trained = self.backbone.keys.numel() + sum(p.numel() for p in self.backbone.prompt_parameters().values())
        return backbone + self.head_parameter_count(), trained + self.head_parameter_count()

    def head_parameter_count(self) -> int:
        return 0 if self.head is None else sum(p.numel() for p in self.head.parameters())

    def modules(self) -> list[nn.Module]:
        return [*super().modules(), *([self.head] if self.head is not None else [])]

    def head_state(self) -> dict:
        return {"weight": None if self.head is None else self.head.weight.detach(),
                "bias": None if self.head is None else self.head.bias.detach(), "seen": torch.tensor(self.seen)}

    def load_head_state(self, state: dict) -> None:
        self.seen = int(state["seen"])
        if state["weight"] is None:
            self.head = None
            return
        self.head = linear_from(state["weight"], state["bias"], self.device)
