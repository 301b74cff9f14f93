"""What the prompt and adapter hosts add to a timm ``VisionTransformer`` (EASE, L2P, DualPrompt; algorithms.md §18).

Each part turns a module of a timm model into a subclass of its own timm class that computes exactly what timm
computes while nothing is attached (the parameter names, the state dict and the tuning phase's view of the backbone
stay those of the plain ViT), and adds the host's input while something is attached (:func:`attached`):

- :class:`AdapterBlock` (EASE, algorithms.md §18.1): a ``Block`` with a parallel adapter that reads the residual stream
  after attention, ``h + ls2(mlp(norm2(h))) + adapter(h)`` with ``h = x + ls1(attn(norm1(x)))``;
- :class:`PrefixAttention` (DualPrompt, algorithms.md §18.3):
  an ``Attention`` whose keys and values get per-head prefixes;
- :func:`forward_with_tokens` (L2P, algorithms.md §18.2): ``forward_features`` with prompt tokens after the [CLS] token.

Attached inputs live in the module's ``__dict__`` (not registered as submodules or buffers), only for the duration
of a ``with attached(...)`` block.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from utils.errors import ConfigError

ADAPTER_SLOT, PREFIX_SLOT, KEEP_SLOT = "_host_adapter", "_host_prefix", "_host_keep_mask"


class Adapter(nn.Module):
    """EASE's AdaptFormer bottleneck (algorithms.md §18.1; github sun-hailong/CVPR24-Ease ``backbone/vit_ease.py``
    Adapter with ``ffn_option="parallel"``, no LayerNorm, ``init_option="lora"``).

    ``x`` (B, N, D) float32 -> ``scale * up(dropout(relu(down(x))))`` (B, N, D). ``down.weight`` is
    kaiming-uniform (a = sqrt 5); ``down.bias``, ``up.weight`` and ``up.bias`` are zero, so a new adapter adds zero.

    Args:
        dim: token width D.
        bottleneck: hidden width (official ``ffn_num`` 64).
        scale: output scale (official 0.1).
        dropout: dropout on the hidden units in train mode (official 0.1); with a keep-mask source attached in
            ``KEEP_SLOT`` (a callable: hidden shape -> float mask of 0/1), the mask comes from it instead of torch's
            global generator.
    """

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1) -> None:
        super().__init__()
        self.down, self.up = nn.Linear(dim, bottleneck), nn.Linear(bottleneck, dim)
        self.scale, self.dropout = scale, dropout
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            for tensor in (self.down.bias, self.up.weight, self.up.bias):
                tensor.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, N, D) float32 -> the adapter's output (B, N, D), ``scale * up(dropout(relu(down(x))))``."""
        hidden = F.relu(self.down(x))
        keep = self.__dict__.get(KEEP_SLOT)  # shape -> keep mask, drawn by the host (same draws under torchrun)
        if self.training and self.dropout > 0 and keep is not None:
            hidden = hidden * keep(hidden.shape) / (1.0 - self.dropout)
        else:
            hidden = F.dropout(hidden, self.dropout, self.training)
        return self.scale * self.up(hidden)


class AdapterBlock(Block):
    """timm ``Block``; with an adapter attached, the block output gets ``adapter(h)`` added, ``h`` the residual stream
    after attention (before ``norm2``), as EASE's ``Block.forward`` (algorithms.md §18.1)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) float -> (B, N, D): timm's block, plus ``adapter(h)`` when an adapter is attached."""
        adapter = self.__dict__.get(ADAPTER_SLOT)
        if adapter is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        h = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal)))
        return h + self.drop_path2(self.ls2(self.mlp(self.norm2(h)))) + adapter(h)


class PrefixAttention(Attention):
    """timm ``Attention``; with a prefix attached, ``(p_K, p_V)`` of shape (2, B, L, H, d_head) are concatenated in
    front of every head's keys and values (raw per-head vectors, not projected); the queries, and so the output
    length, stay those of the real tokens (DualPrompt's prefix tuning, algorithms.md §18.3;
    ``attention.py`` PreT_Attention)."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        """Tokens (B, N, D) float -> (B, N, D): timm's attention; with a prefix attached, every head's keys and values
        get it in front.

        Raises:
            ValueError: a prefix is attached and ``attn_mask`` or ``is_causal`` is given.
        """
        prefix = self.__dict__.get(PREFIX_SLOT)
        if prefix is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("prefix attention takes no attention mask")
        batch, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(batch, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        k = torch.cat([prefix[0].transpose(1, 2), k], dim=2)  # (B, H, L + N, d)
        v = torch.cat([prefix[1].transpose(1, 2), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(out.transpose(1, 2).reshape(batch, n, self.attn_dim))))


def vit_of(model: nn.Module, host: str) -> VisionTransformer:
    """``model`` checked to be a timm VisionTransformer with a class token and plain ``Block``/``Attention`` modules.

    Raises:
        ConfigError: another architecture (the host needs a ViT; e.g. ``convnet_type`` efficientnet_lite0).
    """
    ok = (isinstance(model, VisionTransformer) and model.cls_token is not None
          and all(type(b) in (Block, AdapterBlock) and type(b.attn) in (Attention, PrefixAttention)
                  and b.attn.gate is None for b in model.blocks))
    if not ok:
        raise ConfigError(f"{host} needs a timm VisionTransformer with a class token and standard blocks "
                          f"(convnet_type e.g. vit_base_patch16_224_in21k or dinov2_vits14), "
                          f"got {type(model).__name__}")
    return model


def add_adapter_slots(vit: VisionTransformer) -> None:
    """Make every block of ``vit`` an :class:`AdapterBlock` (same parameters; plain output until one is attached)."""
    for block in vit.blocks:
        block.__class__ = AdapterBlock


def add_prefix_slots(vit: VisionTransformer, layers: Sequence[int]) -> None:
    """Make the attention of the blocks ``layers`` (0-based) a :class:`PrefixAttention`.

    Raises:
        ConfigError: a layer outside the ViT's depth.
    """
    for layer in layers:
        if not 0 <= layer < len(vit.blocks):
            raise ConfigError(f"prompt layer {layer} is outside the backbone's {len(vit.blocks)} blocks")
        vit.blocks[layer].attn.__class__ = PrefixAttention


@contextlib.contextmanager
def attached(slot: str, items: dict[nn.Module, object]) -> Iterator[None]:
    """Attach ``items`` (module -> adapter or prefix tensor) in ``slot`` for the ``with`` block, then detach them."""
    try:
        for module, value in items.items():
            module.__dict__[slot] = value
        yield
    finally:
        for module in items:
            module.__dict__.pop(slot, None)


def forward_with_tokens(vit: VisionTransformer, x: torch.Tensor, tokens: torch.Tensor,
                        token_pos: torch.Tensor) -> torch.Tensor:
    """timm ``forward_features`` with ``tokens`` inserted right after the prefix tokens ([CLS]).

    The l2p-pytorch order [CLS, prompts, patches]; every prompt token gets ``token_pos``, the pretrained [CLS] position
    embedding (its ``resize_pos_embed`` copies it into the prompt slots, algorithms.md §18.2).

    Args:
        x: images (B, 3, H, W) float32.
        tokens: prompt tokens (B, P, D).
        token_pos: (D,) position embedding of every prompt slot.

    Returns:
        (B, prefix + P + patches, D) tokens after the final norm.
    """
    h = vit._pos_embed(vit.patch_embed(x))
    n = vit.num_prefix_tokens
    h = torch.cat([h[:, :n], tokens + token_pos, h[:, n:]], dim=1)
    return vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(h))))


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """``module``'s parameters without gradients for the ``with`` block (a host trains its prompts or adapters on a
    frozen backbone, algorithms.md §18), then their ``requires_grad`` flags as they were
    (the tuning phase needs them)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        module.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
