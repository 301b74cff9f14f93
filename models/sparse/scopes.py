"""Selection scopes: where a task's budget is applied to the importance scores (``selection_scope``).

Each scope is a registered function ``scope(tuner, scores, budget) -> (selection, fully_trainable)``:
``selection`` maps every tensor of the tuner's sparsity state to a bool mask, ``fully_trainable`` counts the tensors
left fully trainable by PIECE's no-selection rule. Embeddings excluded by the recipe are zeroed afterwards by the
phase (``selective.py``), whatever the scope.

- ``per_tensor``: MIST's quantile rule per tensor (algorithms.md §4.5), exempt tensors full;
- ``global``: PIECE's top-k over every candidate entry of the backbone (algorithms.md §13.3);
- ``per_block``: the top fraction inside each ``blocks.<i>`` of the backbone (one more group outside the blocks).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Mapping

import torch

from utils.registry import SCOPES

if TYPE_CHECKING:  # it imports this module
    from models.sparse.tuner import SparseTuner

EMBEDDING_PARTS = ("patch_embed", "pos_embed", "cls_token", "reg_token", "conv_stem")
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def is_embedding(name: str) -> bool:
    """True for the input-embedding tensors of :data:`EMBEDDING_PARTS` (e.g. ``convnet.pos_embed``)."""
    return any(part in name for part in EMBEDDING_PARTS)


def block_of(name: str) -> str:
    """The group of a parameter for per-block selection: ``"blocks.<i>"`` (the first ``blocks.<i>.`` in the name:
    a ViT's transformer block, an EfficientNet's stage), else ``"outside"`` (embeddings, stem, final norm)."""
    match = _BLOCK.search(name)
    return f"blocks.{match.group(1)}" if match else "outside"


def select_global(scores: Mapping[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """PIECE's global selection (algorithms.md §13.3): exactly the ``k`` largest scores over all tensors of ``scores``.

    The scores are flattened and concatenated in the mapping's order and ``torch.topk`` picks k positions
    (ties broken by topk, so exactly k entries are selected); the official code stores per-tensor index
    lists from the same topk (github wanglingxiang0717/PIECE, training/PIECE/param_protection/
    extract_and_save_new.py, ``topk_threshold_indices`` and ``unravel_indices``).

    Args:
        scores: name -> float scores (any shapes, one device); the candidates only.
        k: entries to select, 0 <= k <= total.

    Returns:
        name -> bool mask of the tensor's shape.

    Raises:
        ValueError: k outside [0, total].
    """
    names = list(scores)
    sizes = [scores[n].numel() for n in names]
    total = sum(sizes)
    if not 0 <= k <= total:
        raise ValueError(f"global selection of k={k} entries out of {total}")
    flat = torch.cat([scores[n].reshape(-1).float() for n in names]) if names else torch.zeros(0)
    chosen = torch.zeros(total, dtype=torch.bool, device=flat.device)
    if k:
        chosen[torch.topk(flat, k, sorted=False).indices] = True
    return {n: part.view(scores[n].shape) for n, part in zip(names, torch.split(chosen, sizes))}


def select_per_block(scores: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """Per-block selection: within each group of :func:`block_of`, the floor(rate * n_group) largest scores
    (PIECE's per-layer variant ``generation_mask_file_layer`` in training/PIECE/param_protection/
    extract_and_save_new.py, not wired into its pipeline, algorithms.md §13.3; entries outside every block form one
    more group)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, s in scores.items():
        groups.setdefault(block_of(name), {})[name] = s
    out: dict[str, torch.Tensor] = {}
    for members in groups.values():
        n = sum(s.numel() for s in members.values())
        out.update(select_global(members, int(math.floor(rate * n))))
    return {name: out[name] for name in scores}



@SCOPES.register("per_tensor")
def per_tensor(tuner: SparseTuner, scores: Mapping[str, torch.Tensor],
               budget: float) -> tuple[dict[str, torch.Tensor], int]:
    """MIST (algorithms.md §4.5): in each non-exempt tensor, the scores >= the (1 - budget) quantile;
    exempt tensors full."""
    return tuner.state.select(scores, budget), 0


@SCOPES.register("global")
def global_top_k(tuner: SparseTuner, scores: Mapping[str, torch.Tensor],
                 budget: float) -> tuple[dict[str, torch.Tensor], int]:
    """PIECE (algorithms.md §13.3): the top k = max(1, floor(budget * N)) scores over the candidate tensors, N the
    backbone's entries (the official ``extract_and_save_new.py`` takes at least one entry; it counts every entry of the
    model in N and zeroes the embedding scores)."""
    pool = {n: scores[n] for n in tuner.candidates()}
    k = min(max(1, int(math.floor(budget * tuner.backbone_numel))), sum(v.numel() for v in pool.values()))
    return _complete(tuner, select_global(pool, k))


@SCOPES.register("per_block")
def per_block(tuner: SparseTuner, scores: Mapping[str, torch.Tensor],
              budget: float) -> tuple[dict[str, torch.Tensor], int]:
    """The top ``budget`` fraction inside each block of the backbone (:func:`select_per_block`)."""
    return _complete(tuner, select_per_block({n: scores[n] for n in tuner.candidates()}, budget))


def _complete(tuner, picked: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """Every tensor of the state: a candidate with no selected entry is fully trainable unless ``strict_mask``
    (PIECE's gradient hook uses ``torch.ones_like(grad)`` when a tensor has no index file: github
    wanglingxiang0717/PIECE, training/PIECE/training/train_base_model.py; algorithms.md §13.4); the projection head is
    always trainable."""
    selected, fully_trainable = {}, 0
    for name, shape in tuner.state.shapes.items():
        if name in picked:
            mask = picked[name]
            if not tuner.recipe.strict_mask and not bool(mask.any()):
                mask = torch.ones_like(mask)
                fully_trainable += 1
            selected[name] = mask
        else:  # the projection head (an excluded tensor is zeroed by the phase)
            selected[name] = torch.ones(shape, dtype=torch.bool, device=tuner.device)
    return selected, fully_trainable
