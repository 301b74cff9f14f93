"""MIST's per-step gradient masking and its tuning state, fast path against the plain reference, on ViT-B/16.

Figures (one per line, ``mist_step.<figure>: <value>`` and ``mist_state.<figure>: <value>``):
- ``mask.reference_ms``: the official per-tensor sequence of algorithms.md §4.6 (models/sparse/reference.py: zero
  frozen, Bernoulli draws on the selected entries through boolean indexing, mask x draw, 0.9 ** count, zero frozen);
- ``mask.previous_ms``: the implementation before issue 7 (a uniform draw for every entry of every tensor,
  times dense per-task multipliers, ``grad.mul_``);
- ``mask.fast_ms``: :class:`models.sparse.masks.GradientPlan` (geometric-gap draws for the eligible entries
  only, one gather / fill / scatter on the flat gradient buffer, and the clear after the optimizer step);
- ``mask.ratio`` = reference / fast, ``mask.ratio_previous`` = previous / fast (interleaved repeats, medians);
- ``fwd_bwd_ms`` and ``mask_share``: forward + backward of 2B images through the backbone, and the fast
  masking's share of a whole step (fwd+bwd + masking + SGD step);
- ``mist_state.*``: bytes of every piece of tuning state, and their ratio to the parameter bytes.

All on random gradients and scores with a task-3 state (counts 0..2, 0.1% frozen); weights do not change
the cost. Usage::

    .venv/bin/python bench/mist_step.py --quick            # CPU: masking on ViT-B/16's 86 M entries, B=2 forward
    .venv/bin/python bench/mist_step.py --full --device cuda  # GPU: B=56 (112 images per forward)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from models.loop import FlatGradients  # noqa: E402
from models.sparse.reference import ReferenceState, reference_draw, reference_masked_grads_  # noqa: E402
from models.sparse.tuner import SparseTuner  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.runtime import seed_torch  # noqa: E402

VIT_B16 = "vit_base_patch16_224.augreg_in21k"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="3 interleaved repeats, B=2 forward (CPU default)")
    parser.add_argument("--full", action="store_true", help="10 repeats, B=56 forward (the official RanPAC batch)")
    parser.add_argument("--batch", type=int, default=None, help="B originals per step (2B images per forward)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    repeats = args.repeats or (10 if args.full else 3)
    batch = args.batch or (56 if args.full else 2)
    device = torch.device(args.device)
    cfg = load_config(None, [f"device={args.device}", f"precision={args.precision}", "progress=false"])
    seed_torch(0, cfg.allow_tf32)  # the TF32 setting of real runs
    backbone = build_backbone(VIT_B16, pretrained=False).to(device)
    tuner = SparseTuner(cfg, backbone, device, 0, {"freeze_quantile": 1 - 0.0005})
    params = tuner.named_trainables()
    plist = list(params.items())
    n_params = sum(p.numel() for p in params.values())
    print(f"# mist_step: device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}),"
          f" {args.precision}, tf32 {cfg.allow_tf32}, ViT-B/16 + projection head: {len(plist)} tensors, "
          f"{n_params:,} entries; select_rate {cfg.select_rate}, keep_prob {cfg.keep_prob:.2f}, B={batch}, "
          f"{repeats} interleaved repeats; torch {torch.__version__}, threads {torch.get_num_threads()}")

    # a task-3 state: counts 0..2 and 0.1% frozen, the same in the compact and the reference state
    gen = torch.Generator(device=device).manual_seed(0)
    reference = ReferenceState(plist)
    for name, p in plist:
        if tuner.state.exempt[name]:
            continue
        frozen = torch.rand(p.shape, generator=gen, device=device) < 0.001
        counts = torch.randint(0, 3, p.shape, generator=gen, device=device)
        tuner.state.set_frozen(name, frozen)
        tuner.state.set_update_count(name, counts)
        reference.frozen[name], reference.overlap[name] = frozen, counts.to(torch.int32)
    scores = {n: torch.rand(p.shape, generator=gen, device=device) for n, p in plist}
    for name in scores:
        if name in reference.frozen:
            scores[name][reference.frozen[name]] = 0.0
    selected = tuner.state.select(scores, cfg.select_rate)
    multipliers = tuner.state.multipliers(selected)  # the previous implementation's dense per-task constants
    plan = tuner.state.plan(selected, device)
    param_bytes = 4 * n_params
    state_bytes = tuner.state.nbytes()
    previous_bytes = sum(t.numel() * t.element_size() for d in (reference.frozen, reference.overlap, scores,
                                                                selected, multipliers) for t in d.values())
    del scores

    flat = FlatGradients(params)
    flat.attach()
    raw = torch.randn(flat.numel, generator=gen, device=device)
    grads = {n: p.grad for n, p in plist}
    keep_prob, drop_gen = cfg.keep_prob, tuner.drop_generator

    def reference_step():
        keep = {n: reference_draw(selected[n], keep_prob, drop_gen) for n in grads}
        reference_masked_grads_(grads, selected, reference, keep)

    def previous_step():
        for n, g in grads.items():
            m = multipliers[n]
            g.mul_(m * (torch.rand(m.shape, generator=drop_gen, device=device) < keep_prob).float())
        torch.stack([torch.count_nonzero(grads[n]) for n in tuner.backbone_names]).sum()

    def fast_step():
        positions, _ = plan.sample(keep_prob, drop_gen)
        idx, _ = plan.apply_(flat.buffer, positions, tuner.backbone_numel)
        plan.clear_(flat.buffer, idx)

    times = {"reference": [], "previous": [], "fast": []}
    for i in range(repeats + 1):  # the first round warms up
        for key, fn in (("reference", reference_step), ("previous", previous_step), ("fast", fast_step)):
            flat.buffer[:-1].copy_(raw)
            t = _timed(fn, device)
            if i:
                times[key].append(t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"mist_step.mask.reference_ms: {ms['reference']:.2f}")
    print(f"mist_step.mask.previous_ms: {ms['previous']:.2f}")
    print(f"mist_step.mask.fast_ms: {ms['fast']:.2f}")
    print(f"mist_step.mask.ratio: {ms['reference'] / ms['fast']:.1f}")
    print(f"mist_step.mask.ratio_previous: {ms['previous'] / ms['fast']:.1f}")
    print(f"mist_step.mask.eligible_entries: {plan.eligible}")
    print(f"mist_step.mask.draws_per_step: {plan.draws(keep_prob)}")

    # a whole step: fwd+bwd of 2B images, the fast masking, SGD
    optimizer, _ = tuner.make_optimizer()
    size = 224
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    tuner.network.train()
    fwd, full = [], []
    for i in range(2 if device.type == "cpu" and not args.full else repeats + 1):
        flat.buffer.zero_()

        def forward_backward():
            tuner.loss(x, y).backward()

        t_fb = _timed(forward_backward, device)

        def rest():
            positions, _ = plan.sample(keep_prob, drop_gen)
            idx, _ = plan.apply_(flat.buffer, positions, tuner.backbone_numel)
            optimizer.step()
            plan.clear_(flat.buffer, idx)

        t_rest = _timed(rest, device)
        if i:
            fwd.append(t_fb)
            full.append(t_fb + t_rest)
    fb_ms, step_ms = 1000 * statistics.median(fwd), 1000 * statistics.median(full)
    print(f"mist_step.fwd_bwd_ms: {fb_ms:.1f}  (B={batch}, {2 * batch} images of {size}px)")
    print(f"mist_step.step_ms: {step_ms:.1f}")
    print(f"mist_step.mask_share: {ms['fast'] / step_ms:.4f}")

    print(f"mist_state.param_bytes: {param_bytes}")
    print(f"mist_state.frozen_bits_bytes: {state_bytes['frozen_bits']}")
    print(f"mist_state.update_counts_bytes: {state_bytes['update_counts']}")
    print(f"mist_state.plan_bytes: {plan.nbytes()}")
    between = sum(state_bytes.values())
    print(f"mist_state.ratio_between_tasks: {between / param_bytes:.3f}")
    print(f"mist_state.ratio_sparse_epochs: {(between + plan.nbytes()) / param_bytes:.3f}")
    print(f"mist_state.previous_ratio_sparse_epochs: {previous_bytes / param_bytes:.3f}  "
          "(bool frozen, int32 counts, float32 scores, bool selection, float32 multipliers)")


if __name__ == "__main__":
    main()
