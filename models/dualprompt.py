"""DualPrompt (Wang et al., ECCV 2022; algorithms.md §18.3; github JH-LEE-KR/dualprompt-pytorch@7eb457d).

Prefix tuning on a frozen ViT: a G-prompt shared by all tasks in layers ``g_prompt_layers`` (0, 1), and one E-prompt
per task in layers ``e_prompt_layers`` (2, 3, 4), each a pair of per-head key and value prefixes. In training task t
uses E-prompt t (``use_prompt_mask``), which starts as a copy of E-prompt t - 1 (``shared_prompt_pool``); at test
the query (frozen pretrained ViT's [CLS]) picks the E-prompt whose key is nearest. The head reads the [CLS] token.
Prompts, keys and the head train with CE on the task's classes minus 1.0 times cos(q, k_t) (models/prompt_hosts.py).

The port's E-prefix reshape (algorithms.md §18.3 bug: the first half of a batch gets K = V = the K prefix, the second
half the V prefix) is reproduced; ``dualprompt_prefix_fix`` gives every image its own K and V prefix.
Differences from the official code: docs/deviations.md, section "L2P and DualPrompt".
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from backbones.vit_parts import PREFIX_SLOT, add_prefix_slots, attached
from models.base import TaskData
from models.prompt_hosts import PromptedViT, PromptHost, init_prompt
from utils import distributed
from utils.config import ConfigKeys, ExperimentConfig, config_keys, for_learners, key
from utils.errors import ConfigError
from utils.registry import LEARNERS


def check_dualprompt(cfg: ExperimentConfig, origin: Callable[[str], str]) -> None:
    """Refuse a DualPrompt config that could only fail mid-run: ``top_k`` other than 1 (one E-prompt per image, as
    every official config), or no E-prompt layer left once the G-prompt layers are taken out (the port's if/elif).

    ``origin(key)`` names where a key's value came from, for the message.

    Raises:
        ConfigError: naming the keys.
    """
    if LEARNERS.resolve(cfg.model_name) != "dualprompt":
        return
    if (cfg.top_k or 1) != 1:
        raise ConfigError(f"{origin('top_k')}: key 'top_k' is {cfg.top_k}; DualPrompt selects one E-prompt per image "
                          "(official top_k 1).")
    if not [layer for layer in cfg.e_prompt_layers if layer not in cfg.g_prompt_layers]:
        raise ConfigError(f"{origin('e_prompt_layers')}: keys 'e_prompt_layers' {cfg.e_prompt_layers} and "
                          f"'g_prompt_layers' {cfg.g_prompt_layers} leave no E-prompt layer (a layer in both takes the "
                          "G-prompt only); DualPrompt needs at least one (official [2, 3, 4]).")


@config_keys("DualPrompt (models/dualprompt.py)", validate=check_dualprompt, applies=for_learners("dualprompt"))
class DualPromptKeys(ConfigKeys):
    g_prompt_layers: list[int] = key([0, 1], "DualPrompt: 0-based layers of the G-prompt prefix (official "
                                             "g_prompt_layer_idx).", min=0)
    g_prompt_length: int = key(5, "DualPrompt: G-prompt length (official key).", min=1)
    e_prompt_layers: list[int] = key([2, 3, 4], "DualPrompt: 0-based layers of the E-prompt prefixes (official "
                                                "e_prompt_layer_idx); a layer also in g_prompt_layers takes only "
                                                "the G-prompt, as the port.", min=0)
    dualprompt_prefix_fix: bool = key(False, "DualPrompt fix: permute instead of reshape the selected E-prefixes, so "
                                             "every image gets its own K and V prefix (algorithms.md §18.3).")


class DualPromptNet(PromptedViT):
    """:class:`PromptedViT` with ``g_prompt`` (n_g, 2, L_g, H, d_head) and ``e_prompt`` (n_e, 2, M, L_e, H, d_head);
    index 1 of the second axis is K (0) or V (1).

    Raises:
        ConfigError: ``vit`` is not a timm ViT, or a prompt layer is not one of its blocks.
    """

    def __init__(self, vit: nn.Module, cfg: ExperimentConfig, length: int) -> None:
        super().__init__(vit, "DualPrompt", cfg.query_model == "pretrained", cfg.pool_size, cfg.prompt_init)
        depth = len(self.vit.blocks)
        beyond = sorted({layer for layer in [*cfg.g_prompt_layers, *cfg.e_prompt_layers] if layer >= depth})
        if beyond:
            raise ConfigError(f"keys 'g_prompt_layers' {cfg.g_prompt_layers} / 'e_prompt_layers' "
                              f"{cfg.e_prompt_layers}: layer(s) {beyond} do not exist; {cfg.convnet_type} has {depth} "
                              f"blocks (0-{depth - 1}).")
        self.g_layers = list(cfg.g_prompt_layers)
        self.e_layers = [layer for layer in cfg.e_prompt_layers if layer not in self.g_layers]  # port: if/elif
        add_prefix_slots(self.vit, self.g_layers + self.e_layers)
        heads = self.vit.blocks[0].attn.num_heads
        shape = (heads, self.out_dim // heads)
        self.g_prompt = init_prompt((len(self.g_layers), 2, cfg.g_prompt_length, *shape), cfg.prompt_init)
        self.e_prompt = init_prompt((len(self.e_layers), 2, cfg.pool_size, length, *shape), cfg.prompt_init)
        self.fix = cfg.dualprompt_prefix_fix

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        return {"g_prompt": self.g_prompt, "e_prompt": self.e_prompt}

    def e_prefixes(self, ids: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The selected E-prefixes (n_e, 2, B, L_e, H, d) for ``ids`` (B, 1).

        The port gathers (n_e, 2, B, 1, L_e, H, d) and *reshapes* it to (n_e, B, 2, L_e, H, d) (``prompt.py``
        117-122): image b takes its K prefix from half (2b) // B of image (2b) mod B's prompt, and its V prefix from
        half (2b + 1) // B of image (2b + 1) mod B's. The default reproduces that, over the whole global batch when
        ``rows`` = (this process's first row, global batch size) is given (training under torchrun, where every image
        of the batch has the same id); ``dualprompt_prefix_fix`` gives every image its own K and V prefix."""
        slot = ids[:, 0]
        if self.fix:
            return self.e_prompt[:, :, slot]
        offset, total = rows if rows is not None else (0, slot.shape[0])
        flat_k = 2 * torch.arange(offset, offset + slot.shape[0], device=slot.device)
        parts = []
        for flat in (flat_k, flat_k + 1):
            source = flat % total
            source_slot = slot[source] if rows is None else slot[0].expand_as(source)  # uniform under torchrun
            parts.append(self.e_prompt[:, flat // total, source_slot])  # (n_e, B, L, H, d)
        return torch.stack(parts, dim=1)

    def features(self, x: torch.Tensor, ids: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """[CLS] after the final norm (B, D), G-prefixes at ``g_layers`` and the selected E-prefixes at ``e_layers``
        (``rows``: see :meth:`e_prefixes`)."""
        batch = x.shape[0]
        prefixes = {self.vit.blocks[layer].attn: self.g_prompt[i][:, None].expand(-1, batch, -1, -1, -1)
                    for i, layer in enumerate(self.g_layers)}
        e = self.e_prefixes(ids, rows)
        prefixes.update({self.vit.blocks[layer].attn: e[i] for i, layer in enumerate(self.e_layers)})
        with attached(PREFIX_SLOT, prefixes):
            return self.vit(x)


@LEARNERS.register("dualprompt", aliases=("dualprompt_mist",))
class DualPrompt(PromptHost):
    """DualPrompt with an optional tuning phase (``spr``) before each task; the query model stays the pretrained ViT
    unless ``query_model: tuned`` (algorithms.md §18.4). Training never reads the query to choose a prompt (task t uses
    slot t while t < ``pool_size``); only the key-matching term and test-time selection do."""

    TITLE, ORDER = "DualPrompt", 60
    PROMPT_DEFAULTS = {"prompt_epochs": 5, "prompt_lr": 0.03 * 24 / 256, "pull_constraint_coeff": 1.0, "top_k": 1}

    @classmethod
    def build_backbone(cls, cfg: ExperimentConfig) -> DualPromptNet:
        """The timm ViT with its weights, its query copy (before any tuning), prefix slots and the prompts.

        Raises:
            ConfigError: a prompt layer the ViT does not have (the other key checks: :func:`check_dualprompt`).
        """
        return DualPromptNet(super().build_backbone(cfg), cfg, cfg.prompt_length or 5)

    def before_training(self, task: TaskData) -> None:
        """``shared_prompt_pool``: E-prompt slot t starts as a copy of slot t - 1 (every layer, K and V;
        not the key)."""
        t, pool = task.task_id, self.backbone.e_prompt
        if 0 < t < pool.shape[2]:
            with torch.no_grad():
                pool[:, :, t] = pool[:, :, t - 1]

    def train_ids(self, sim: torch.Tensor, task: TaskData) -> torch.Tensor:
        """``use_prompt_mask``: slot t for every image while t < ``pool_size``, else the selection."""
        if task.task_id < sim.shape[1]:
            return torch.full((sim.shape[0], 1), task.task_id, dtype=torch.int64, device=sim.device)
        if distributed.active() and not self.cfg.batchwise_prompt and not self.cfg.dualprompt_prefix_fix:
            raise ConfigError("DualPrompt: more tasks than pool_size, per-image selection and the port's prefix "
                              "reshape mix the prefixes of images on other processes; set batchwise_prompt, "
                              "dualprompt_prefix_fix or a larger pool_size to run under torchrun")
        return super().train_ids(sim, task)
