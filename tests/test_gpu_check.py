"""bench/gpu_check.py (issue 28) runs unchanged on the CPU in its shrunken form, so that the first GPU hour produces
numbers: every section prints its figures, none fails, the two deterministic runs agree, within a time bound.

The shrunken check (30 one-task runs of tiny ViTs, three of them processes of their own) took 33 s on the 2-core
development machine, and 76 s while another job loaded it; the test took 40 s.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SECTIONS = ("mask_share", "peak_memory", "images_per_s", "deterministic", "paper_task")
#: a ceiling about three times the measured wall time: a hang or a runaway size fails, a busy machine does not
CEILING_S = 240


def test_gpu_check_shrunken_on_cpu():
    from utils.registry import LEARNERS, PRESETS

    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--shrink", "--device", "cpu"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-4000:]
    assert "FAILED" not in out, out
    lines = out.splitlines()
    figures = dict(line[len("gpu_check."):].split(": ", 1) for line in lines if line.startswith("gpu_check."))
    for section in SECTIONS:
        assert any(re.fullmatch(rf"# {section}: \d+ s", line) for line in lines), f"no timing line of {section}"
    assert any(line.startswith("# budget (estimated") for line in lines)

    # a: the step and the mask's share of it
    for name in ("mask.fast_ms", "mask.fwd_bwd_ms", "mask.step_ms"):
        assert figures[name].endswith(" ms") and float(figures[name].split()[0]) > 0
    assert 0 < float(figures["mask_share"].split()[0]) < 1

    # b: every learner with spr none and mist, every other preset in front of RanPAC; no GPU memory on the CPU
    pairs = [(host, spr) for host in LEARNERS.names() for spr in ("none", "mist")]
    pairs += [("ranpac", spr) for spr in PRESETS.names() if spr != "mist"]
    for host, spr in pairs:
        assert figures[f"peak_mib.{host}.{spr}"].startswith("n/a (cpu) (exps/"), (host, spr)

    # c: every run was evaluated; every host's MIST phase drew training images; a preset the host's official code
    # does not run (RanPAC's "run") says so
    rate = re.compile(r"[\d.]+ images/s \([1-9]\d* images in ")
    for host, spr in pairs:
        evaluation = figures[f"images_per_s.{host}.{spr}.evaluation"]
        assert rate.match(evaluation), evaluation
        if spr != "none":
            tuning = figures[f"images_per_s.{host}.{spr}.tuning"]
            assert rate.match(tuning) or (spr != "mist" and tuning.startswith("n/a (no tuning phase")), tuning

    # d: the deterministic key's cost, and two deterministic runs agree bit for bit
    assert figures["deterministic.time_ratio"].split()[1] == "x"
    assert figures["deterministic_equal"].startswith("true "), figures["deterministic_equal"]

    # e: task 0 of the paper config as shipped (its epochs), on the shrunken backbone
    assert figures["paper_task.completed"].startswith("true "), figures["paper_task.completed"]
    assert "mi_epochs 20" in figures["paper_task.wall_s"]

    assert figures["total_s"].split()[1] == "s"
    assert elapsed < CEILING_S, f"the shrunken check took {elapsed:.0f} s (ceiling {CEILING_S} s)"


def test_run_all_shrink_needs_gpu_check():
    proc = subprocess.run([sys.executable, "bench/run_all.py", "--shrink"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "--shrink goes with --gpu-check" in proc.stderr
