"""Run every benchmark of bench/ and print their figures, one per line (``<bench>.<figure>: <value>``).

Each bench times the fast path and its plain reference in the same run, interleaved, and prints the
ratio; absolute times on a shared machine are noise, the ratios are the figures.

    .venv/bin/python bench/run_all.py --quick               # CPU, under 10 minutes on 2 cores
    .venv/bin/python bench/run_all.py --full --device cuda  # GPU, paper-scale sizes

Exit status 1 if a bench failed (its error is printed); the others still run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (script, takes --device): sparsity counts entries on the CPU
BENCHES = (("mist_step.py", True), ("ridge.py", True), ("extraction.py", True), ("sparsity_vitb16.py", False))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="small repeats, CPU sizes (default)")
    mode.add_argument("--full", action="store_true", help="paper-scale sizes and more repeats (GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="*", default=None, help="run only these scripts, e.g. ridge.py")
    args = parser.parse_args()
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
