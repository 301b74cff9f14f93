"""The comparison protocol (issue 15): calibrated learning rates, equal training, fixed ridge lambda, 10 paired seeds,
planned contrasts with Holm-corrected p-values.

Stages (each run is one ``main.py`` process over a config written to ``OUT/configs``; finished runs are skipped, so
an interrupted protocol resumes by running the same command again):

1. **untuned**: every learner with ``spr`` none on the calibration and reported seeds (RanPAC's ridge lambda is
   the official free search; each seed's per-task choice is read from results.json);
2. **calibration**: every method at every learning rate of its grid (``--grid-sgd`` for an SGD optimizer,
   ``--grid-adam`` otherwise; the preset's ``lr_key``) on the calibration seeds only, which are never reported;
   the rate with the highest mean A-bar is kept (ties: the smaller rate), per learner;
3. **main**: every method at its calibrated rate on the reported seeds; RanPAC with each seed's lambdas fixed to
   its untuned run's choice (``ridge_lambdas_by_seed``) and, beside it, with the official free choice.

Every method trains ``--epochs`` epochs per task (a scoring pass comes on top for the task-level presets). The
report (``OUT/protocol.md``, ``OUT/protocol.json``) has, per table: A-bar and A_B (mean ± sample std), the share of
backbone entries moved and the relative weight change per task, wall time per run, the planned contrasts (each
method vs none, MIST vs MIST with random scores, PIECE-F vs PIECE-S) as paired differences with 95% t intervals and
Holm-corrected p-values, and the smallest detectable effect. A table is marked **not informative** when dense CE
fine-tuning moved the backbone by less than a relative ``--min-change`` (1e-3) per task.

    python exps/importance/protocol.py --out runs/protocol          # the demo protocol, about 2 hours on 2 cores
    python exps/importance/protocol.py --out runs/protocol_quick --quick   # a few minutes, CI-sized

On a paper data set (GPU): ``--base exps/ranpac/cub.json exps/simplecil/cub.json --size none``.
Exit status: 0 done, 1 a run failed (the report covers what finished), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
from utils.contrasts import Contrast, detectable_effect, holm, paired  # noqa: E402
from utils.report import RESULTS_NAME, InvalidResults, RunRecord, load_run  # noqa: E402
from utils.registry import LEARNERS, PRESETS  # noqa: E402
import models  # noqa: E402,F401  (registers the learners and presets)

#: the demo's size: Fashion-MNIST at 32 px, 60 training and 50 test images per class, batch 32
SIZES = {
    "demo": dict(input_size=32, train_per_class=60, test_per_class=50, batch_size=32),
    "quick": dict(input_size=32, train_per_class=12, test_per_class=10, batch_size=8),
    "none": {},
}
DEFAULT_BASE = [HERE / "fmnist_ranpac_none.json", HERE / "fmnist_simplecil_none.json"]
DEFAULT_METHODS = ("ce_finetune", "mist_random", "piece_f", "piece_s", "magnitude_gate", "acl", "spu", "gps", "spg",
                   "sparcl", "mist")
GRID_SGD, GRID_ADAM = (1e-4, 1e-3, 1e-2), (1e-5, 1e-4, 1e-3)
REPORTED_SEEDS = tuple(range(2001, 2011))
CALIBRATION_SEEDS = (1990, 1991)
CONTRASTS_EXTRA = (("mist", "mist_random"), ("piece_f", "piece_s"))


def epoch_keys(method: str, epochs: int) -> dict[str, int]:
    """The config keys that give ``method`` ``epochs`` training epochs per task: a task-level preset's epochs key
    counts its scoring pass too (``mi_epochs`` = epochs + 1); phases (ACL, SPG, SparCL) and the per-step presets
    train every epoch of theirs."""
    p = PRESETS.get(method)
    scoring = p.parts["importance"] is not None and p.parts.get("phase") is None
    return {p.epochs_key: epochs + (1 if scoring else 0)}


def grid(method: str, sgd: tuple[float, ...], adam: tuple[float, ...]) -> tuple[float, ...]:
    """The learning-rate grid of ``method``: ``sgd`` when its optimizer is an SGD, ``adam`` otherwise."""
    return sgd if "sgd" in PRESETS.get(method).parts["optimizer"] else adam


class Job:
    """One ``main.py`` run: a config written to ``configs/<name>.json``, output in ``<stage>/<name>``."""

    def __init__(self, out: Path, stage: str, name: str, cfg: dict[str, Any]) -> None:
        self.stage, self.name, self.cfg = stage, name, cfg
        self.config_path = out / "configs" / f"{name}.json"
        self.run_dir = out / stage / name

    def results(self) -> dict[int, RunRecord]:
        """seed -> the newest complete run of this job's folder (read by the report tool, ``utils.report``)."""
        found: dict[int, RunRecord] = {}
        for path in self.run_dir.glob(f"**/{RESULTS_NAME}"):
            try:
                run = load_run(path)
            except InvalidResults:
                continue
            if run.complete and (run.seed not in found or run.newest_key > found[run.seed].newest_key):
                found[run.seed] = run
        return found

    def done(self) -> bool:
        return set(self.cfg["seed"]) <= set(self.results())

    def run(self, log) -> bool:
        if self.done():
            log(f"{self.stage}/{self.name}: done before, skipped")
            return True
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.cfg, indent=1) + "\n")
        cmd = [sys.executable, str(REPO / "main.py"), "--config", str(self.config_path), "--output-dir",
               str(self.run_dir)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        tail = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else ""
        log(f"{self.stage}/{self.name}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s "
            f"({shlex.join(cmd)}) {tail}")
        return proc.returncode == 0


def run_all(jobs: list[Job], workers: int, log, report_only: bool = False) -> list[str]:
    """Run ``jobs`` on ``workers`` processes at a time; returns the names of the failed ones (with
    ``report_only``, runs nothing and returns the unfinished ones)."""
    if report_only:
        return [j.name for j in jobs if not j.done()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ok = list(pool.map(lambda j: j.run(log), jobs))
    return [j.name for j, good in zip(jobs, ok) if not good]


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def metrics(run: RunRecord) -> dict[str, float]:
    """A run's A-bar, A_B, mean moved fraction and relative change per tuned task (0 without tuning), and wall time
    (s), from the report tool's reading of its results.json."""
    v = run.values
    return {"a_bar": v["average_accuracy"], "a_last": v["last_accuracy"], "moved": v["moved_fraction"] or 0.0,
            "change": v["relative_change"] or 0.0, "wall": v["wall_seconds"] or 0.0}


def untuned_lambdas(results: dict[int, dict]) -> dict[str, list[float]]:
    """seed -> the ridge lambda RanPAC chose at every task of its untuned run (results.json tasks[i].head)."""
    return {str(seed): [float(t["head"]["ridge_lambda"]) for t in data["tasks"]] for seed, data in results.items()}


def learner_name(base: dict) -> str:
    """The registered learner of a base config's ``model_name`` (``ranpac_mist`` -> ``ranpac``), so that RanPAC's
    fixed-lambda stage applies to the paper configs too."""
    return LEARNERS.resolve(str(base["model_name"]))


def plan_config(base: dict, size: dict, method: str, seeds, epochs: int, lr: Optional[float],
                overrides: dict, lambdas: Optional[dict]) -> dict:
    cfg = {**base, **size, "spr": method, "seed": list(seeds), "progress": False, **overrides}
    cfg["prefix"] = "protocol"
    if method != "none":
        cfg.update(epoch_keys(method, epochs))
        if lr is not None:
            cfg[PRESETS.get(method).lr_key] = lr
    if lambdas is not None:
        cfg["ridge_lambdas_by_seed"] = lambdas
    return cfg


def table(rows: dict[str, dict[int, RunRecord]], methods: list[str], seeds: list[int], lrs: dict[str, float],
          min_change: float, title: str) -> tuple[list[str], dict]:
    """Markdown lines and the JSON summary of one table (one learner, one lambda mode)."""
    lines = [f"### {title}", ""]
    summary: dict[str, Any] = {"methods": {}, "contrasts": {}}
    # each method on the reported seeds it finished; a contrast on the seeds both of its methods finished
    done = {m: [s for s in seeds if s in rows.get(m, {})] for m in ["none", *methods]}
    common = [s for s in seeds if all(s in done[m] for m in done)]
    dense = done.get("ce_finetune", [])
    dense_change = float(np.mean([metrics(rows["ce_finetune"][s])["change"] for s in dense])) if dense else None
    informative = dense_change is not None and dense_change >= min_change
    moved = "not run" if dense_change is None else f"{dense_change:.2e}"
    lines.append(f"Seeds with every method: {len(common)} of {len(seeds)}. Dense CE fine-tuning moved the backbone by a "
                 f"relative {moved} per task: " + ("informative (>= %g)." % min_change if informative else
                                                   f"**NOT informative** (< {min_change:g}: the backbone barely moves, "
                                                   "so the methods cannot differ)."))
    lines += ["", "| method | lr | n | A-bar | A_B | moved % per task | rel. change per task | wall s | "
              "Δ A_B [95% CI] | p | Holm p | Δ A-bar [95% CI] | Holm p |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    family = [(m, "none") for m in methods] + [(a, b) for a, b in CONTRASTS_EXTRA if a in methods and b in methods]
    family = [(a, b) for a, b in family if any(s in done[b] for s in done[a])]
    found: dict[str, list[Contrast]] = {}
    for metric in ("a_last", "a_bar"):
        cs = []
        for a, b in family:
            both = [s for s in done[a] if s in done[b]]
            cs.append(paired(f"{a} - {b}", [metrics(rows[a][s])[metric] for s in both],
                             [metrics(rows[b][s])[metric] for s in both]))
        found[metric] = holm(cs)
    by_name = {metric: {c.name: c for c in cs} for metric, cs in found.items()}

    def ci(c: Optional[Contrast]) -> str:
        if c is None:
            return ""
        if c.low is None:
            return f"{c.mean:+.2f}"
        return f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"

    def pv(p: Optional[float]) -> str:
        return "" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")

    for m in ["none", *methods]:
        vals = [metrics(rows[m][s]) for s in done[m]]
        if not vals:
            continue
        col = {k: np.array([v[k] for v in vals]) for k in vals[0]}
        sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0  # noqa: E731
        c_last, c_bar = by_name["a_last"].get(f"{m} - none"), by_name["a_bar"].get(f"{m} - none")
        lines.append(f"| {PRESETS.get(m).label if m != 'none' else 'none'} | "
                     f"{'' if lrs.get(m) is None else f'{lrs[m]:g}'} | {len(vals)} | {col['a_bar'].mean():.2f} ± {sd(col['a_bar']):.2f} | "
                     f"{col['a_last'].mean():.2f} ± {sd(col['a_last']):.2f} | {100 * col['moved'].mean():.2f} | "
                     f"{col['change'].mean():.1e} | {col['wall'].mean():.0f} | {ci(c_last)} | "
                     f"{pv(c_last.p if c_last else None)} | {pv(c_last.holm if c_last else None)} | {ci(c_bar)} | "
                     f"{pv(c_bar.holm if c_bar else None)} |")
        summary["methods"][m] = {"lr": lrs.get(m), **{k: float(v.mean()) for k, v in col.items()},
                                 "a_bar_sd": sd(col["a_bar"]), "a_last_sd": sd(col["a_last"])}
    for metric, cs in found.items():
        summary["contrasts"][metric] = [c.__dict__ for c in cs]
    lines.append("")
    for a, b in CONTRASTS_EXTRA:
        c = by_name["a_last"].get(f"{a} - {b}")
        if c is not None:
            lines.append(f"- {PRESETS.get(a).label} − {PRESETS.get(b).label}: Δ A_B {ci(c)}, p {pv(c.p)}, Holm "
                         f"{pv(c.holm)}; Δ A-bar {ci(by_name['a_bar'][c.name])}, Holm {pv(by_name['a_bar'][c.name].holm)}.")
    m_family = max(len(family), 1)
    for metric, label in (("a_last", "A_B"), ("a_bar", "A-bar")):
        sds = [c.sd for c in found[metric] if c.sd is not None]
        if sds:
            med = float(np.median(sds))
            n = max((c.n for c in found[metric]), default=0)
            mde = detectable_effect(med, n, alpha=0.05 / m_family)
            mde1 = detectable_effect(med, n)
            lines.append(f"- Smallest detectable effect on {label} (80% power, paired t, n = {n}, median sd "
                         f"of the paired differences {med:.2f}): {mde:.2f} points at Holm's first step (α = 0.05/"
                         f"{m_family}), {mde1:.2f} at α = 0.05 uncorrected.")
            summary[f"detectable_{metric}"] = {"median_sd": med, "holm_first_step": mde, "uncorrected": mde1}
    summary.update({"seeds": common, "dense_relative_change": dense_change, "informative": informative})
    return lines + [""], summary


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "protocol")
    ap.add_argument("--base", type=Path, nargs="+", default=DEFAULT_BASE, help="one base config per learner")
    ap.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    ap.add_argument("--seeds", type=int, nargs="+", default=list(REPORTED_SEEDS))
    ap.add_argument("--calibration-seeds", type=int, nargs="+", default=list(CALIBRATION_SEEDS))
    ap.add_argument("--grid-sgd", type=float, nargs="+", default=list(GRID_SGD))
    ap.add_argument("--grid-adam", type=float, nargs="+", default=list(GRID_ADAM))
    ap.add_argument("--epochs", type=int, default=2, help="training epochs per task of every method")
    ap.add_argument("--size", choices=sorted(SIZES), default="demo")
    ap.add_argument("--min-change", type=float, default=1e-3)
    ap.add_argument("--workers", type=int, default=2, help="main.py processes at a time")
    ap.add_argument("--no-free-lambda", action="store_true", help="skip RanPAC's free-lambda table")
    ap.add_argument("--calibrate-on", default=None, metavar="LEARNER",
                    help="calibrate on this learner only and use its rates for every learner (the tuning phase does "
                         "not depend on the learner); default: each learner on its own runs")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the runs already finished under --out")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized: --size quick, 3 seeds, 1 calibration seed, 2 rates per grid, 1 epoch")
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.seeds, args.calibration_seeds, args.epochs = "quick", args.seeds[:3], args.calibration_seeds[:1], 1
        args.grid_sgd, args.grid_adam = args.grid_sgd[1:], args.grid_adam[1:]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = [m for m in args.methods if m not in PRESETS.names()]
    missing = [str(p) for p in args.base if not p.is_file()]
    bad_learner = args.calibrate_on is not None and args.calibrate_on not in {
        learner_name(json.loads(p.read_text())) for p in args.base if p.is_file()}
    if bad_learner:
        print(f"error: --calibrate-on {args.calibrate_on}: no base config of that learner", file=sys.stderr)
        return 2
    if unknown or missing or set(args.seeds) & set(args.calibration_seeds):
        print(f"error: unknown methods {unknown}, missing base configs {missing}, or a calibration seed is also "
              f"reported ({sorted(set(args.seeds) & set(args.calibration_seeds))})", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.overrides:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    if args.workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.workers))
    out, size = args.out, SIZES[args.size]
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "protocol.log").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    start, failed = time.perf_counter(), []
    bases = {learner_name(b): b for b in (json.loads(p.read_text()) for p in args.base)}
    seeds_all = [*args.calibration_seeds, *args.seeds]
    # 1. untuned
    untuned = {ln: Job(out, "untuned", f"{ln}_none", plan_config(b, size, "none", seeds_all, args.epochs, None,
                                                                     overrides, None)) for ln, b in bases.items()}
    failed += run_all(list(untuned.values()), args.workers, log, args.report_only)
    fixed = {ln: (untuned_lambdas({s: json.loads(r.path.read_text()) for s, r in j.results().items()})
                  if ln == "ranpac" and bases[ln].get("use_RP") else None) for ln, j in untuned.items()}
    # 2. calibration
    calib = {(ln, m, lr): Job(out, "calibration", f"{ln}_{m}_lr{lr_tag(lr)}",
                              plan_config(b, size, m, args.calibration_seeds, args.epochs, lr, overrides, fixed[ln]))
             for ln, b in bases.items() if args.calibrate_on in (None, ln)
             for m in args.methods for lr in grid(m, tuple(args.grid_sgd),
                                                                            tuple(args.grid_adam))}
    failed += run_all(list(calib.values()), args.workers, log, args.report_only)
    chosen: dict[str, dict[str, float]] = {ln: {} for ln in bases}
    calibration_table = {}
    for (ln, m, lr), job in calib.items():
        res = job.results()
        if set(args.calibration_seeds) <= set(res):
            score = float(np.mean([metrics(res[s])["a_bar"] for s in args.calibration_seeds]))
            calibration_table.setdefault(ln, {}).setdefault(m, {})[lr] = score
    for ln, by_method in calibration_table.items():
        for m, scores in by_method.items():
            chosen[ln][m] = max(sorted(scores), key=lambda lr: (scores[lr], -lr))
    if args.calibrate_on is not None:
        chosen = {ln: dict(chosen.get(args.calibrate_on, {})) for ln in bases}
    # 3. main
    main_jobs: dict[tuple[str, str, str], Job] = {}
    for ln, b in bases.items():
        modes = [("fixed", fixed[ln])] if fixed[ln] is not None else [("free", None)]
        if fixed[ln] is not None and not args.no_free_lambda:
            modes.append(("free", None))
        for mode, lambdas in modes:
            main_jobs[(ln, "none", mode)] = Job(out, "main", f"{ln}_none_{mode}", plan_config(
                b, size, "none", args.seeds, args.epochs, None, overrides, lambdas))
            for m in args.methods:
                if m in chosen[ln]:
                    main_jobs[(ln, m, mode)] = Job(out, "main", f"{ln}_{m}_{mode}", plan_config(
                        b, size, m, args.seeds, args.epochs, chosen[ln][m], overrides, lambdas))
    failed += run_all(list(main_jobs.values()), args.workers, log, args.report_only)
    # 4. report
    lines = ["# Comparison protocol (issue 15)", "",
             f"Command: `python exps/importance/protocol.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Size {args.size} {size}; {args.epochs} training epoch(s) per task for every method; reported seeds "
             f"{args.seeds}; calibration seeds {args.calibration_seeds} (never reported); grids SGD {args.grid_sgd}, "
             f"Adam/AdamW {args.grid_adam}."
             + (f" Rates calibrated on {args.calibrate_on} only, used for every learner." if args.calibrate_on else ""),
             "", "## Calibration (mean A-bar over the calibration seeds)", ""]
    for ln, by_method in calibration_table.items():
        lines.append(f"- {ln}: " + "; ".join(
            f"{m} " + ", ".join(f"{lr:g}: {s:.2f}" for lr, s in sorted(sc.items())) + f" -> **{chosen[ln][m]:g}**"
            for m, sc in by_method.items()))
    lines += ["", "## Results (mean ± sample std over the reported seeds; Δ: paired, vs none)", ""]
    report: dict[str, Any] = {"calibration": {ln: {m: {str(k): v for k, v in sc.items()} for m, sc in bm.items()}
                                              for ln, bm in calibration_table.items()},
                              "chosen_lr": chosen, "ridge_lambdas_by_seed": fixed.get("ranpac"), "tables": {}}
    for (ln, mode) in sorted({(k[0], k[2]) for k in main_jobs}):
        rows = {m: main_jobs[(ln, m, mode)].results() for (l2, m, md) in main_jobs if l2 == ln and md == mode}
        title = f"{ln} ({'ridge lambda fixed to the untuned choice' if mode == 'fixed' else 'official free lambda'})" \
            if ln == "ranpac" else ln
        tl, summary = table(rows, [m for m in args.methods if m in rows], args.seeds, {**chosen[ln]},
                            args.min_change, title)
        lines += tl
        report["tables"][f"{ln}/{mode}"] = summary
    wall = time.perf_counter() - start
    lines.append(f"Wall time of this invocation: {wall:.0f} s; {'unfinished' if args.report_only else 'failed'} runs: "
                 f"{', '.join(failed) or 'none'}.")
    (out / "protocol.md").write_text("\n".join(lines) + "\n")
    (out / "protocol.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(f"report: {out / 'protocol.md'}; {wall:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
