"""RanPAC ridge head: fast search + solve (``ridge_solver: "fast"``) against the official 17 + 1 dense solves.

For each projected width M, on realistic RanPAC inputs (H = ReLU(F W_rand), W_rand ~ N(0, 1)^(768 x M),
F = 100 class means + Gaussian noise + a shared offset, 5,000 shuffled rows, Y one-hot over 100 classes),
times, interleaved in the same run (fast, official, fast, official, ..., fast):

- official: ``select_ridge(H, Y, solver="official")`` + ``RidgeAccumulator.solve(lambda, solver="official")``;
- fast:     ``select_ridge(H, Y, solver="fast")``     + ``RidgeAccumulator.solve(lambda, solver="fast")``;

and prints the medians (wall clock, and CPU time of the process, which a busy shared machine disturbs
less), their ratios, whether both chose the same lambda, the relative Frobenius difference
of W_o, how far each W_o is from a float64 Cholesky solve of the same float32 G (the rounding error of the
official float32 solve itself), the same three figures for the logits on 1,000 fresh rows, and the share
of those rows whose top-1 class is the same with both W_o.
The accumulation G += H^T H, Q += H^T Y is the same for both and is not timed.

Output: a header line (``# ridge: ...``), then one figure per line, ``ridge.M<M>.<figure>: <value>``.

Usage::

    .venv/bin/python bench/ridge.py --quick                # CPU, M = 2000, 5000, 10000; ~3 minutes on 2 cores
    .venv/bin/python bench/ridge.py --full                 # more repeats
    .venv/bin/python bench/ridge.py --full --device cuda   # on the GPU (ridge_device: "device")
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ridge import RidgeAccumulator
from models.ridge_search import select_ridge  # noqa: E402

D = 768  # ViT-B/16 feature width


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(M: int, rows: int, classes: int, device: torch.device, seed: int = 0):
    """H (rows, M), Y (rows, classes) one-hot, and fresh test projections H_test (1000, M); float32.

    F = offset + mu_class + noise with offset ~ N(0, 0.25 I), mu ~ N(0, I), noise ~ N(0, I) (768-dim); rows
    cycle through the classes and are shuffled, as the official "CPs" loader.
    """
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(classes, D, generator=g)
    offset = 0.5 * torch.randn(D, generator=g)
    labels = (torch.arange(rows) % classes)[torch.randperm(rows, generator=g)]
    F = offset + mu[labels] + torch.randn(rows, D, generator=g)
    test_labels = torch.randint(0, classes, (1000,), generator=g)
    F_test = offset + mu[test_labels] + torch.randn(1000, D, generator=g)
    W_rand = torch.randn(D, M, generator=g)
    F, F_test, W_rand = F.to(device), F_test.to(device), W_rand.to(device)
    H = torch.relu(F @ W_rand)
    H_test = torch.relu(F_test @ W_rand)
    Y = torch.nn.functional.one_hot(labels, classes).float().to(device)
    return H, Y, H_test


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_once(H, Y, acc: RidgeAccumulator, solver: str, device: torch.device):
    """One search + solve: (wall seconds, CPU seconds of this process, chosen ridge, W_o)."""
    _sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    ridge = select_ridge(H, Y, solver=solver)
    W_o = acc.solve(ridge, solver=solver)
    _sync(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, ridge, W_o


def warm_up(device: torch.device) -> None:
    """Both paths once on a small problem, so that library start-up costs are not timed."""
    H, Y, _ = make_inputs(200, 100, 10, device)
    acc = RidgeAccumulator(200, 10, device)
    acc.update(H, Y)
    for solver in ("official", "fast"):
        run_once(H, Y, acc, solver, device)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_F / ||b||_F in float64."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def bench_size(M: int, rows: int, classes: int, repeats: int, device: torch.device) -> None:
    H, Y, H_test = make_inputs(M, rows, classes, device)
    acc = RidgeAccumulator(M, classes, device)
    acc.update(H, Y)
    times = {"official": [], "fast": []}
    cpu_times = {"official": [], "fast": []}
    results = {}
    # interleaved, starting and ending with the (short) fast run, so that every official run is bracketed
    for solver in ["fast"] + ["official", "fast"] * repeats:
        seconds, cpu_seconds, ridge, W_o = run_once(H, Y, acc, solver, device)
        times[solver].append(seconds)
        cpu_times[solver].append(cpu_seconds)
        results[solver] = (ridge, W_o)
    (ridge_o, W_off), (ridge_f, W_fast) = results["official"], results["fast"]
    # float64 Cholesky of the same float32 G + lambda I: the answer both float32 solves approximate
    G64 = acc.G.double()
    G64.diagonal().add_(ridge_o)
    W_64 = torch.cholesky_solve(acc.Q.double(), torch.linalg.cholesky(G64)).T
    del G64
    official_s, fast_s = statistics.median(times["official"]), statistics.median(times["fast"])
    k = int(0.8 * rows)
    p = f"ridge.M{M}"
    print(f"{p}.form: {'kernel (k x k)' if k < M else 'primal (M x M)'}")
    print(f"{p}.official_s: {official_s:.3f}")
    print(f"{p}.fast_s: {fast_s:.3f}")
    print(f"{p}.ratio: {official_s / fast_s:.1f}")
    print(f"{p}.repeats: {repeats} official, {repeats + 1} fast")
    official_cpu, fast_cpu = statistics.median(cpu_times["official"]), statistics.median(cpu_times["fast"])
    print(f"{p}.official_cpu_s: {official_cpu:.3f}")
    print(f"{p}.fast_cpu_s: {fast_cpu:.3f}")
    print(f"{p}.cpu_ratio: {official_cpu / fast_cpu:.1f}")
    print(f"{p}.lambda_official: {ridge_o!r}")
    print(f"{p}.lambda_fast: {ridge_f!r}")
    print(f"{p}.same_lambda: {ridge_o == ridge_f}")
    print(f"{p}.W_o_rel_diff: {rel(W_fast, W_off):.2e}")
    print(f"{p}.W_o_official_vs_f64: {rel(W_off, W_64):.2e}")
    print(f"{p}.W_o_fast_vs_f64: {rel(W_fast, W_64):.2e}")
    logits_off, logits_fast, logits_64 = H_test @ W_off.T, H_test @ W_fast.T, H_test.double() @ W_64.T
    print(f"{p}.logits_rel_diff: {rel(logits_fast, logits_off):.2e}")
    print(f"{p}.logits_official_vs_f64: {rel(logits_off, logits_64):.2e}")
    print(f"{p}.logits_fast_vs_f64: {rel(logits_fast, logits_64):.2e}")
    same_top1 = (logits_fast.argmax(1) == logits_off.argmax(1)).double().mean().item()
    print(f"{p}.same_top1: {same_top1:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="M = 2000, 5000, 10000 with 3, 1, 1 official repeats (default)")
    mode.add_argument("--full", action="store_true", help="M = 2000, 5000, 10000 with 7, 5, 3 official repeats")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=None, help="override the widths M")
    parser.add_argument("--repeats", type=int, default=None,
                        help="override the official repeats (every size; one more fast run)")
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=100)
    args = parser.parse_args()

    device = torch.device(args.device)
    sizes = args.sizes or [2000, 5000, 10000]
    default_repeats = {2000: 7, 5000: 5, 10000: 3} if args.full else {2000: 3, 5000: 1, 10000: 1}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{cpu_name()}, {torch.get_num_threads()} torch threads"
    print(f"# ridge: device={device} ({name}), dtype=float32, M={sizes}, rows={args.rows} "
          f"(fit k={int(0.8 * args.rows)}), classes={args.classes}, D={D}, torch {torch.__version__}, "
          f"numpy {np.__version__}", flush=True)
    warm_up(device)
    for M in sizes:
        bench_size(M, args.rows, args.classes, args.repeats or default_repeats.get(M, 1), device)


if __name__ == "__main__":
    main()
