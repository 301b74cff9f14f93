"""Sparsity accounting of MIST on the full ViT-B/16 parameter set (forward-free).

Builds the official network (randomly initialised ViT-B/16 + the 768->128 projection head), scores
every entry with random positive numbers (selection depends only on per-tensor ranks), and reports:
- the fraction of backbone entries selected per task (maskable tensors at ``select_rate``, exempt
  tensors in full), against the paper's "< 5%";
- the mean fraction of backbone gradient entries that are non-zero per step after the random drop
  (measured on dense all-ones gradients over several steps), against the paper's "< 0.5%";
- the entries frozen per task for the RanPAC (quantile 0.9995) and SimpleCIL (1.0) rules.

Usage: ``.venv/bin/python bench/sparsity_vitb16.py [--steps 5] [--select-rate 0.1 --drop-rate 0.9]``
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
from models.sparse.strategies import TunedNetwork  # noqa: E402


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
    mult = state.multipliers(selected)
    n_selected = sum(int(selected[n].sum()) for n in conv)
    maskable = [n for n in conv if not state.exempt[n]]
    gen = torch.Generator().manual_seed(seed)
    nonzero = 0
    for _ in range(steps):
        for n in conv:
            keep = torch.rand(conv[n].shape, generator=gen) < (1 - drop_rate)
            nonzero += int(torch.count_nonzero(mult[n] * keep))
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
    args = parser.parse_args()
    print("ViT-B/16 (random init), official exemption rule; paper claims: < 5% selected, < 0.5% updated per step")
    print(f"{'select_rate':>11} {'drop_rate':>9} {'selected %':>10} {'updated/step %':>14} "
          f"{'frozen/task RanPAC':>18} {'frozen/task SimpleCIL':>21} {'seconds':>7}")
    for sr in args.select_rate:
        for dr in args.drop_rate:
            start = time.perf_counter()
            r = measure(sr, dr, args.steps)
            print(f"{sr:>11} {dr:>9} {100 * r['selected_fraction']:>10.3f} {100 * r['updated_fraction_per_step']:>14.3f} "
                  f"{r['frozen_per_task']['ranpac']:>18,} {r['frozen_per_task']['simplecil']:>21,} "
                  f"{time.perf_counter() - start:>7.1f}")
    print(f"backbone entries {r['backbone_entries']:,}; maskable tensors {r['maskable_tensors']} "
          f"({r['maskable_entries']:,} entries); exempt entries {r['exempt_entries']:,}")


if __name__ == "__main__":
    main()
