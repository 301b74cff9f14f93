"""Feature-extraction throughput: ``Learner.extract_features`` against a bare timm forward loop.

Times, interleaved in one process (ours, bare, bare, ours, ours, bare, ...: the order alternates each round;
medians over the repeats):
- ``ours``: a real learner's ``extract_features(dataset, shuffle=True)`` (the head-update path: the seeded
  loader with ``eval_batch_size``, pinned memory and non-blocking copies on CUDA, autocast per ``precision``,
  inference mode), built from ``load_config(None, [...])`` with ``spr=none``, over an in-memory dataset
  of items ``(index, image (3,H,W) float32, label)``;
- ``bare``: ``with torch.inference_mode(): model(x)`` over the same images, pre-batched at the same batch
  size and already on the device (no loader, no host-to-device copy), same precision.

Both use the TF32 setting of real runs (``seed_torch(..., allow_tf32=cfg.allow_tf32)``). Prints a header
line, then one ``extraction.<figure>: <value>`` per line: throughputs in images/s and ``ratio`` = ours/bare
(target >= 0.90). Two diagnostic loops run interleaved too: ``loader`` (our loader and host-to-device copies
without the forward: the input pipeline's own ceiling) and, on CUDA, ``bare_copy`` (the bare loop fed from
pinned host batches with non-blocking copies: what the copy itself costs). Weights are random
(``pretrained=false``): they do not change the cost. On the CPU without workers, ``ratio_cpu_time`` compares
the process CPU times too (bare/ours), which other processes on a shared machine disturb much less than
wall-clock times.

Usage examples::

    .venv/bin/python bench/extraction.py --quick                          # CPU, ViT-Ti/16 at 96 px, 1 thread
    .venv/bin/python bench/extraction.py --full --device cuda             # ViT-B/16 at 224 px
    .venv/bin/python bench/extraction.py --full --device cuda --precision bf16 --batch 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones import build_backbone  # noqa: E402
from models import build_learner  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.runtime import OFFICIAL_TORCH_SEED, autocast, resolve_device, seed_torch  # noqa: E402

# threads: 1 in the quick preset on the CPU (on a shared 2-core machine two spinning OpenMP threads run several
# times slower than one and the medians become noise); None keeps torch's default.
QUICK = dict(model="vit_tiny_patch16_224.augreg_in21k", input_size=96, batch=32, images=256, repeats=7, threads=1)
# full: one CIFAR-100 task's training images (10 classes x 500), so a loader's fixed start-up (worker processes,
# first batches) weighs what it weighs in a real head update.
FULL = dict(model="vit_base_patch16_224.augreg_in21k", input_size=224, batch=128, images=5000, repeats=5,
            threads=None)


class InMemoryImages(Dataset):
    """Items ``(index, image (3,H,W) float32, label int64)`` from one preallocated tensor."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return i, self.images[i], self.labels[i]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of ``fn()``, the device synchronised on both ends."""
    _sync(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    _sync(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="ViT-Ti/16 at 96 px, 256 images, B=32 (default)")
    mode.add_argument("--full", action="store_true", help="ViT-B/16 at 224 px, 5000 images, B=128")
    parser.add_argument("--device", default="cpu", help='"cpu", "cuda", "cuda:N" (the config key\'s values)')
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--model", default=None, help="timm name (default: per --quick/--full)")
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="eval_batch_size, also the bare loop's batch")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None,
                        help="loader workers (default: 0 on the CPU, the config default on CUDA)")
    parser.add_argument("--learner", default="ranpac", choices=["ranpac", "simplecil"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 for --quick on the CPU, else torch's)")
    args = parser.parse_args()
    preset = FULL if args.full else QUICK
    model_name = args.model or preset["model"]
    size = args.input_size or preset["input_size"]
    batch = args.batch or preset["batch"]
    n_images = args.images or preset["images"]
    repeats = args.repeats or preset["repeats"]
    threads = args.threads or (preset["threads"] if not args.device.startswith("cuda") else None)
    if threads:
        torch.set_num_threads(threads)

    overrides = [f"device={args.device}", f"precision={args.precision}", "progress=false", "spr=none",
                 f"model_name={args.learner}", f"convnet_type={model_name}", "pretrained=false",
                 f"input_size={size}", f"eval_batch_size={batch}"]
    if args.num_workers is not None or not args.device.startswith("cuda"):
        overrides.append(f"num_workers={args.num_workers or 0}")
    cfg = load_config(None, overrides)
    device = resolve_device(cfg.device)
    seed_torch(OFFICIAL_TORCH_SEED, cfg.allow_tf32)  # what real runs call: TF32 per the config
    backbone = build_backbone(cfg.convnet_type, cfg.pretrained, None, cfg.input_size, **cfg.backbone_kwargs)
    learner = build_learner(cfg, device, cfg.seed[0], backbone)
    model = learner.backbone  # the same module (and device) for both loops

    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n_images, 3, size, size, generator=gen)
    dataset = InMemoryImages(images, np.arange(n_images, dtype=np.int64) % 10)
    bare_batches = [chunk.to(device) for chunk in images.split(batch)]
    host_batches = [chunk.pin_memory() for chunk in images.split(batch)] if device.type == "cuda" else []

    def ours() -> None:
        learner.extract_features(dataset, shuffle=True)

    def bare() -> None:
        with torch.inference_mode(), autocast(device, cfg.precision):
            for x in bare_batches:
                model(x)

    def bare_copy() -> None:  # CUDA only: bare + the non-blocking copy from pinned host batches
        with torch.inference_mode(), autocast(device, cfg.precision):
            for x in host_batches:
                model(x.to(device, non_blocking=True))

    def loader() -> None:  # our loader and copies without the forward: the input pipeline alone
        for _, x, _ in learner.loader(dataset, True, learner.eval_batch_size):
            x.to(device, non_blocking=True)

    loops = {"ours": ours, "bare": bare, "loader": loader}
    if host_batches:
        loops["bare_copy"] = bare_copy

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tf32 = torch.backends.cuda.matmul.allow_tf32
    print(f"# extraction: device {device} ({where}), input float32, precision {cfg.precision}"
          f"{' (bf16 autocast)' if cfg.precision == 'bf16' else ''}, tf32 {tf32}, input {size}x{size}, "
          f"batch {batch} (eval_batch_size), {n_images} images, {repeats} interleaved repeats, "
          f"model {model_name} (pretrained=false, {learner.feature_dim}-d), learner {cfg.model_name}, "
          f"num_workers {cfg.num_workers}, pin_memory {device.type == 'cuda'}; torch {torch.__version__}, "
          f"timm {timm.__version__}, threads {torch.get_num_threads()}", flush=True)

    times: dict[str, list[float]] = {key: [] for key in loops}
    cpu_times: dict[str, list[float]] = {key: [] for key in loops}
    for i in range(repeats + 1):  # the first round warms up; ours and bare alternate which goes first
        order = ["ours", "bare"] if i % 2 == 0 else ["bare", "ours"]
        for key in order + [k for k in loops if k not in order]:
            fn = loops[key]
            wall, cpu = _timed(fn, device)
            if i:
                times[key].append(wall)
                cpu_times[key].append(cpu)
    median = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: n_images / s for k, s in median.items()}
    print(f"extraction.ours_images_per_s: {rate['ours']:.1f}")
    print(f"extraction.bare_images_per_s: {rate['bare']:.1f}")
    print(f"extraction.ratio: {rate['ours'] / rate['bare']:.3f}")
    if "bare_copy" in rate:
        print(f"extraction.bare_copy_images_per_s: {rate['bare_copy']:.1f}")
    if device.type == "cpu" and cfg.num_workers == 0:  # all work in this process: CPU time ignores other load
        cpu_median = {k: statistics.median(v) for k, v in cpu_times.items()}
        print(f"extraction.ratio_cpu_time: {cpu_median['bare'] / cpu_median['ours']:.3f}")
    print(f"extraction.loader_images_per_s: {rate['loader']:.1f}")
    for key in loops:
        print(f"extraction.{key}_median_s: {median[key]:.3f} (spread {min(times[key]):.3f}..{max(times[key]):.3f})")
    if device.type == "cuda":
        print(f"extraction.peak_memory_gib: {torch.cuda.max_memory_allocated(device) / 2**30:.2f}")


if __name__ == "__main__":
    main()
