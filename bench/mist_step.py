"""Time of one MIST training step, split into forward+backward and the masking overhead; peak memory.

Measures, on random images and a randomly initialised backbone (weights do not change the cost):
- ``fwd+bwd``: second-view augmentation, forward of 2B images, NT-Xent loss, backward;
- ``mask``: the per-step random drop x (selection * 0.9**count * not-frozen) multipliers, the non-zero count;
- ``step``: SGD with momentum and weight decay;
and prints images/s and, on CUDA, the peak memory. Compare ``--precision fp32`` (official) with ``bf16``.

Usage examples::

    .venv/bin/python bench/mist_step.py                                   # CPU, tiny ViT
    .venv/bin/python bench/mist_step.py --device cuda --backbone pretrained_vit_b16_224_in21k --batch 56
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from models.sparse.strategies import MistTuner  # noqa: E402
from utils.config import load_config  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backbone", default="vit_base_patch16_224.augreg_in21k")
    parser.add_argument("--backbone-kwargs", default='{"img_size": 32, "patch_size": 8, "embed_dim": 64, '
                                                      '"depth": 4, "num_heads": 4}',
                        help="JSON kwargs for timm ('{}' for the full model)")
    parser.add_argument("--input-size", type=int, default=None, help="default: 32 with the tiny kwargs, else 224")
    parser.add_argument("--batch", type=int, default=56, help="B originals (2B images per forward)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()

    kwargs = json.loads(args.backbone_kwargs)
    size = args.input_size or kwargs.get("img_size", 224)
    device = torch.device(args.device)
    cfg = load_config(None, [f"device={args.device}", f"precision={args.precision}", "progress=false"])
    torch.manual_seed(0)
    backbone = build_backbone(args.backbone, pretrained=False, **kwargs).to(device)
    tuner = MistTuner(cfg, backbone, device, 0, {"freeze_quantile": 0.9995})
    optimizer, _ = tuner.make_optimizer()
    params = tuner.named_trainables()
    scores = {n: torch.rand_like(p) for n, p in params.items()}
    multipliers = tuner.state.multipliers(tuner.state.select(scores, cfg.select_rate))
    x = torch.rand(args.batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    times = {"fwd+bwd": 0.0, "mask": 0.0, "step": 0.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tuner.network.train()
    for i in range(args.steps + 2):  # two warm-up steps
        _sync(device)
        t0 = time.perf_counter()
        loss = tuner.loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        keep = {n: m * tuner.random_keep(m) for n, m in multipliers.items()}
        for name, p in params.items():
            if p.grad is not None and name in keep:
                p.grad.mul_(keep[name])
        _sync(device)
        t2 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t3 = time.perf_counter()
        if i >= 2:
            times["fwd+bwd"] += t1 - t0
            times["mask"] += t2 - t1
            times["step"] += t3 - t2
    n_params = sum(p.numel() for p in params.values())
    total = sum(times.values()) / args.steps
    print(f"backbone {args.backbone} {kwargs or ''} input {size}px, {n_params:,} parameters, device {device}, "
          f"{args.precision}, B={args.batch} ({2 * args.batch} images per forward)")
    for key, value in times.items():
        print(f"  {key:8s} {1000 * value / args.steps:9.2f} ms/step ({100 * value / args.steps / total:5.1f}%)")
    print(f"  total    {1000 * total:9.2f} ms/step = {2 * args.batch / total:.1f} images/s")
    if device.type == "cuda":
        print(f"  peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
