"""Run every benchmark of bench/ and print their figures, one per line (``<bench>.<figure>: <value>``).

Each bench times the fast path and its plain reference in the same run, interleaved, and prints the
ratio; absolute times on a shared machine are noise, the ratios are the figures.

    .venv/bin/python bench/run_all.py --quick               # CPU, under 10 minutes on 2 cores
    .venv/bin/python bench/run_all.py --full --device cuda  # GPU, paper-scale sizes
    .venv/bin/python bench/run_all.py --gpu-check           # bench/gpu_check.py: the figures a GPU must measure
    .venv/bin/python bench/run_all.py --gpu-check --shrink --device cpu  # its CPU form (tests/test_gpu_check.py)

Exit status 1 if a bench failed (its error is printed); the others still run. With ``--gpu-check`` the exit status is
gpu_check.py's (1 if one of its sections failed).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
# (script, takes --device): sparsity counts entries on the CPU
BENCHES = (("mist_step.py", True), ("ridge.py", True), ("extraction.py", True), ("sparsity_vitb16.py", False))


def gpu_check(device: Optional[str], shrink: bool) -> int:
    """Run ``bench/gpu_check.py`` (its output streams through); returns its exit status."""
    cmd = [sys.executable, str(HERE / "gpu_check.py")] + (["--device", device] if device else []) \
        + (["--shrink"] if shrink else [])
    print(f"# {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd).returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small repeats, CPU sizes (default)")
    mode.add_argument("--full", action="store_true", help="paper-scale sizes and more repeats (GPU)")
    mode.add_argument("--gpu-check", action="store_true",
                      help="run bench/gpu_check.py instead of the benches (one GPU, under 8 minutes)")
    parser.add_argument("--device", default=None, help="default: cpu; with --gpu-check, cuda when available")
    parser.add_argument("--shrink", action="store_true", help="with --gpu-check: its CPU-sized form")
    parser.add_argument("--only", nargs="*", default=None, help="run only these scripts, e.g. ridge.py")
    args = parser.parse_args()
    if args.shrink and not args.gpu_check:
        parser.error("--shrink goes with --gpu-check")
    if args.gpu_check:
        return gpu_check(args.device, args.shrink)
    args.device = args.device or "cpu"
    flag = "--full" if args.full else "--quick"
    failed = []
    start = time.perf_counter()
    for script, has_device in BENCHES:
        if args.only and script not in args.only:
            continue
        cmd = [sys.executable, str(HERE / script), flag] + (["--device", args.device] if has_device else [])
        t0 = time.perf_counter()
        print(f"# {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for line in proc.stdout.splitlines():
            if ":" in line or line.startswith("#"):
                print(line, flush=True)
        if proc.returncode != 0:
            failed.append(script)
            print(f"# {script} FAILED (exit {proc.returncode}):\n{proc.stderr[-2000:]}", flush=True)
        print(f"# {script}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"# all benches: {time.perf_counter() - start:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
