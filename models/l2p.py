"""L2P: Learning to Prompt (Wang et al., CVPR 2022; algorithms.md §18.2; github JH-LEE-KR/l2p-pytorch@f7bc994).

A pool of ``pool_size`` prompts of ``prompt_length`` tokens, each with a key; an image's query (the frozen pretrained
ViT's [CLS] feature) selects ``top_k`` prompts by cosine (the batch's most frequent with ``batchwise_prompt``); their
tokens enter the frozen ViT after the [CLS] token (prompt tuning at the input, each slot with the pretrained [CLS]
position embedding), and the head reads the mean of the prompt tokens' outputs (``head_type='prompt'``). Prompts, keys
and the head train with CE on the task's classes minus 0.1 times the key-matching term (models/prompt_hosts.py).

Differences from the official code: docs/deviations.md, section "L2P and DualPrompt".
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from backbones.vit_parts import forward_with_tokens
from models.prompt_hosts import PromptedViT, PromptHost, init_prompt
from utils.config import ExperimentConfig
from utils.registry import LEARNERS


class L2PNet(PromptedViT):
    """:class:`PromptedViT` with the L2P pool ``prompts`` (M, L_p, D) and ``prompt_pos`` (D,), the pretrained [CLS]
    position embedding every prompt slot gets (a frozen buffer: a tuned ``pos_embed`` does not move it)."""

    def __init__(self, vit: nn.Module, query_copy: bool, pool_size: int, length: int, init: str) -> None:
        super().__init__(vit, "L2P", query_copy, pool_size, init)
        self.prompts = init_prompt((pool_size, length, self.out_dim), init)
        pos = vit.pos_embed
        cls_pos = pos[0, 0] if pos is not None and not vit.no_embed_class else torch.zeros(self.out_dim)
        self.register_buffer("prompt_pos", cls_pos.detach().clone())

    def prompt_parameters(self) -> dict[str, nn.Parameter]:
        return {"prompts": self.prompts}

    def features(self, x: torch.Tensor, ids: torch.Tensor, rows: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """The mean of the selected prompts' output tokens (B, D) float32 for images x (B, 3, H, W); ``ids`` (B, k)
        int64 -> k * L_p prompt tokens. ``rows`` is unused (L2P's prompts do not depend on the batch split)."""
        tokens = self.prompts[ids].reshape(x.shape[0], -1, self.out_dim)
        out = forward_with_tokens(self.vit, x, tokens, self.prompt_pos)
        n = self.vit.num_prefix_tokens
        return out[:, n: n + tokens.shape[1]].mean(dim=1)


@LEARNERS.register("l2p", aliases=("l2p_mist",))
class L2P(PromptHost):
    """L2P with an optional tuning phase (``spr``) before each task; the query model stays the pretrained ViT unless
    ``query_model: tuned`` (algorithms.md §18.4)."""

    TITLE, ORDER = "L2P", 50
    PROMPT_DEFAULTS = {"prompt_epochs": 5, "prompt_lr": 0.03 * 16 / 256, "pull_constraint_coeff": 0.1, "top_k": 5}

    @classmethod
    def build_backbone(cls, cfg: ExperimentConfig) -> L2PNet:
        """The timm ViT with its weights, its query copy (before any tuning) and the prompt pool."""
        return L2PNet(super().build_backbone(cfg), cfg.query_model == "pretrained", cfg.pool_size,
                      cfg.prompt_length or 5, cfg.prompt_init)
