"""Sparsity accounting of MIST on the full ViT-B/16 parameter set (forward-free).

Builds the official network (randomly initialised ViT-B/16 + the 768->128 projection head), scores
every entry with random positive numbers (selection depends only on per-tensor ranks), and reports:
- the fraction of backbone entries selected per task (maskable tensors at ``select_rate``, exempt
  tensors in full), against the paper's "< 5%";
- the mean fraction of backbone gradient entries that are non-zero per step after the random drop
  (measured on dense all-ones gradients over several steps), against the paper's "< 0.5%";
- the entries frozen per task for the RanPAC (quantile 0.9995) and SimpleCIL (1.0) rules.

Usage: ``.venv/bin/python bench/sparsity_vitb16.py [--quick] [--steps 5] [--select-rate 0.1 --drop-rate 0.9]``

This bench counts entries; it times nothing (the step's speed is bench/mist_step.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from models.sparse.masks import SparsityState  # noqa: E402
from models.sparse.network import TunedNetwork  # noqa: E402


def measure(select_rate: float, drop_rate: float, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    backbone = build_backbone("pretrained_vit_b16_224_in21k", pretrained=False)
    network = TunedNetwork(backbone)
    named = dict(network.named_parameters())
    conv = {n: p for n, p in named.items() if n.startswith("convnet.")}
    numel = sum(p.numel() for p in conv.values())
    state = SparsityState(named.items(), "name")
    scores = {n: torch.rand_like(p) for n, p in named.items()}
    selected = state.select(scores, select_rate)
    plan = state.plan(selected)  # the step logic of real runs: draws on the eligible entries only
    n_selected = sum(int(selected[n].sum()) for n in conv)
    maskable = [n for n in conv if not state.exempt[n]]
    gen = torch.Generator().manual_seed(seed)
    nonzero = 0
    for _ in range(steps):
        positions, _ = plan.sample(1 - drop_rate, gen)
        in_backbone = plan.index[positions].long() < numel  # the projection head follows the backbone
        nonzero += int((in_backbone & (plan.scale[positions] != 0)).sum())
    frozen = {}
    for learner, q in (("ranpac", 1 - 0.0005), ("simplecil", 1.0)):
        st = SparsityState(named.items(), "name")
        st.end_task(scores, selected, q)
        frozen[learner] = sum(int(st.frozen[n].sum()) for n in conv)
    return {
        "backbone_entries": numel,
        "maskable_tensors": len(maskable),
        "maskable_entries": sum(conv[n].numel() for n in maskable),
        "exempt_entries": sum(p.numel() for n, p in conv.items() if state.exempt[n]),
        "selected_fraction": n_selected / numel,
        "updated_fraction_per_step": nonzero / steps / numel,
        "frozen_per_task": frozen,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--select-rate", type=float, nargs="*", default=[0.1, 0.05])
    parser.add_argument("--drop-rate", type=float, nargs="*", default=[0.9, 0.95])
    parser.add_argument("--quick", action="store_true", help="only the official 0.1 / 0.9")
    parser.add_argument("--full", action="store_true", help="the default grid (0.1, 0.05) x (0.9, 0.95)")
    args = parser.parse_args()
    pairs = [(0.1, 0.9)] if args.quick else [(sr, dr) for sr in args.select_rate for dr in args.drop_rate]
    print(f"# sparsity: ViT-B/16 (random init) + projection head, official exemption rule, {args.steps} steps, "
          f"cpu, torch {torch.__version__}; paper claims: < 5% selected, < 0.5% updated per step")
    for sr, dr in pairs:
        start = time.perf_counter()
        r = measure(sr, dr, args.steps)
        tag = f"sparsity.s{sr:g}_d{dr:g}"
        print(f"{tag}.selected_percent: {100 * r['selected_fraction']:.3f}")
        print(f"{tag}.updated_per_step_percent: {100 * r['updated_fraction_per_step']:.3f}")
        print(f"{tag}.frozen_per_task_ranpac: {r['frozen_per_task']['ranpac']}")
        print(f"{tag}.frozen_per_task_simplecil: {r['frozen_per_task']['simplecil']}")
        print(f"{tag}.seconds: {time.perf_counter() - start:.1f}")
    print(f"sparsity.backbone_entries: {r['backbone_entries']}")
    print(f"sparsity.maskable_tensors: {r['maskable_tensors']}")
    print(f"sparsity.maskable_entries: {r['maskable_entries']}")
    print(f"sparsity.exempt_entries: {r['exempt_entries']}")


if __name__ == "__main__":
    main()
