"""Run the importance-method comparison and write its report (issue 6, item 6).

Default: every ``exps/importance/*.json`` (Fashion-MNIST + EfficientNet-Lite0, both learners; no tuning,
MIST, PIECE-F, PIECE-S, update-magnitude control, MIST with random scores, dense CE fine-tuning; 3 seeds
each), one ``main.py`` process per config, one after another, then ``python -m utils.report`` on the
output folder. About 35 minutes on 2 CPU cores (docs/comparison.md).

``*_magnitude_gate_tau0.032.json``: the gate with ``gate_threshold`` 0.032, the median of the cosine
similarities of tasks 1-4 in a calibration run on seed 7 (not one of the reported seeds):
``python main.py --config exps/importance/fmnist_ranpac_magnitude_gate.json --set 'seed=[7]'`` gave
0.0891, -0.0242, 0.3117, -0.1660 (every task "initialized" at the default 0.5).

    python exps/importance/run.py [--out runs/importance] [--set KEY=VALUE ...]

The same comparison on a paper data set (GPU): give base configs and the methods; each method runs as
``--set spr=<method>`` on every base config (dense CE fine-tuning also gets ``ablation_epochs`` =
``mi_epochs - 1``, the training epochs of the tuned methods):

    python exps/importance/run.py --base exps/ranpac/cub.json exps/simplecil/cub.json \\
        --set 'seed=[1993,1994,1995]' --out runs/importance_cub

Exit status: 0 when every run and the report succeeded, 1 when a run failed (the others still run and
the report covers what finished; a failed run is listed as incomplete), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from models.sparse.presets import compared_methods  # noqa: E402  (the presets marked compare=True, and MIST)

METHODS = tuple(compared_methods())


def jobs(configs: list[Path], base: list[Path], methods: list[str]) -> list[tuple[str, Path, list[str]]]:
    """(label, config file, extra --set items) for every run: the configs as they are, and each base config
    once per method."""
    out = [(path.stem, path, []) for path in configs]
    for path in base:
        raw = json.loads(path.read_text())
        for method in methods:
            extra = [f"spr={method}"]
            if method == "ce_finetune":
                extra.append(f"ablation_epochs={max(1, int(raw.get('mi_epochs', 20)) - 1)}")
            out.append((f"{path.parent.name}/{path.stem} {method}", path, extra))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "importance", help="output folder of the runs")
    parser.add_argument("--configs", type=Path, nargs="*", default=None,
                        help="config files to run as they are (default: exps/importance/*.json unless --base)")
    parser.add_argument("--base", type=Path, nargs="*", default=[], help="base configs to run once per method")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), help="spr presets for --base")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every main.py run (repeatable)")
    args = parser.parse_args(argv)
    configs = args.configs if args.configs is not None else ([] if args.base else sorted(HERE.glob("*.json")))
    missing = [str(p) for p in [*configs, *args.base] if not p.is_file()]
    if missing:
        print(f"error: config file(s) not found: {', '.join(missing)}", file=sys.stderr)
        return 2
    todo = jobs(configs, args.base, args.methods)
    if not todo:
        print("error: nothing to run (no config files)", file=sys.stderr)
        return 2
    failed = []
    start = time.perf_counter()
    for i, (label, path, extra) in enumerate(todo, 1):
        cmd = [sys.executable, str(REPO / "main.py"), "--config", str(path), "--output-dir", str(args.out)]
        for item in [*extra, *args.overrides]:
            cmd += ["--set", item]
        t0 = time.perf_counter()
        print(f"[{i}/{len(todo)}] {label}: {shlex.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        print(f"[{i}/{len(todo)}] {label}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            failed.append(label)
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "(no message)", file=sys.stderr)
    report = [sys.executable, "-m", "utils.report", str(args.out), "--out", str(args.out / "report")]
    print(f"report: {shlex.join(report)}", flush=True)
    rc = subprocess.run(report, cwd=REPO).returncode
    print(f"{len(todo)} runs in {time.perf_counter() - start:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed or rc else 0


if __name__ == "__main__":
    sys.exit(main())
