"""The comparison protocol (issues 15 and 25): calibrated learning rates whose optimum is bracketed, equal training,
fixed ridge lambda, paired seeds, planned contrasts with Holm-corrected p-values, drift measurements and an
informativeness rule based on what the host sees.

Stages (each run is one ``main.py`` process over a config written to ``OUT/configs``; finished runs are skipped, so
an interrupted protocol resumes by running the same command again):

1. **untuned**: every learner with ``spr`` none on the calibration and reported seeds (RanPAC's ridge lambda is
   the official free search; each seed's per-task choice is read from results.json);
2. **calibration**, on the calibration seeds only (never reported): every arm that has a rate of its own at every
   learning rate of its grid (``--grid-sgd`` for an SGD optimizer, ``--grid-adam`` otherwise; the preset's
   ``lr_key``); while the best rate (highest mean A-bar; ties: the smaller rate) is the grid's smallest or largest,
   the grid grows by one rate a factor ``--grid-step`` beyond it (at most ``--max-extend`` times per side), so the
   chosen rate is interior, or the report says it is not. Arms that take another arm's rate (MIST with random scores
   and MIST without its embeddings take MIST's, so that the contrasts isolate the scores and the exclusion) are not
   calibrated;
3. **at one rate** (``--at-rate LR``, optional; before the main stage so that it finishes first): the arms of
   ``--at-rate-methods`` all at the one rate ``LR`` on the reported seeds, for the learners of ``--at-rate-on``, next
   to the same untuned runs as the main stage. The rate is not calibrated: it is read off the calibration curve as one
   where the arms move the backbone enough to change what the host sees, so that MIST against random scores, MIST
   against dense fine-tuning and the embedding exclusion are compared where the tuning phase does something (the
   calibrated rates can all be near no-ops, as on the DINOv2 benchmark);
4. **main**: every arm at its rate on the reported seeds; RanPAC with each seed's lambdas fixed to its untuned run's
   choice (``ridge_lambdas_by_seed``) and, unless ``--no-free-lambda``, with the official free choice.

Every arm trains ``--epochs`` epochs per task (a scoring pass comes on top for the task-level presets); every run
uses the same thread count (``OMP_NUM_THREADS``: the cores over ``--workers``). The report (``OUT/protocol.md``,
``OUT/protocol.json``, ``OUT/calibration.png``) has the calibration curves and, per table, the accuracies, the drift
measurements, the planned contrasts and the informativeness verdict (``protocol_tables.py``).

    python exps/importance/protocol.py --out runs/protocol                 # EfficientNet-Lite0 demo (issue 15)
    python exps/importance/protocol.py --suite dinov2 --out runs/benchmark  # DINOv2 benchmark (issue 25)
    python exps/importance/protocol.py --out runs/protocol_quick --quick    # a few minutes, CI-sized

On a paper data set (GPU): ``--base exps/ranpac/cub.json exps/simplecil/cub.json --size none``.
Exit status: 0 done, 1 a run failed (the report covers what finished), 2 bad arguments.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from arms import VARIANTS, Arm, arm_of, epoch_keys, grid, owned_keys, plan_config  # noqa: E402,F401
from jobs import Job, lr_tag, run_all  # noqa: E402
from protocol_args import (  # noqa: E402,F401
    CALIBRATION_SEEDS,
    DEFAULT_BASE,
    DEFAULT_METHODS,
    GRID_ADAM,
    GRID_SGD,
    REPORTED_SEEDS,
    SIZES,
    SUITES,
    check_args,
    parse_args,
)
from protocol_tables import metrics, table  # noqa: E402

import models  # noqa: E402,F401  (registers the learners and presets)
from utils.registry import LEARNERS, PRESETS  # noqa: E402,F401


def untuned_lambdas(results: dict[int, dict]) -> dict[str, list[float]]:
    """seed -> the ridge lambda RanPAC chose at every task of its untuned run (results.json tasks[i].head)."""
    return {str(seed): [float(t["head"]["ridge_lambda"]) for t in data["tasks"]] for seed, data in results.items()}


def learner_name(base: dict) -> str:
    """The registered learner of a base config's ``model_name`` (``ranpac_mist`` -> ``ranpac``), so that RanPAC's
    fixed-lambda stage applies to the paper configs too."""
    return LEARNERS.resolve(str(base["model_name"]))


@dataclass
class Calibration:
    """Per (learner, arm): the rates tried, their mean A-bar on the calibration seeds, the chosen rate and whether it
    is interior (a tried rate on each side)."""

    grids: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    scores: dict[tuple[str, str], dict[float, float]] = field(default_factory=dict)

    def chosen(self, key: tuple[str, str]) -> Optional[float]:
        sc = self.scores.get(key, {})
        return max(sorted(sc), key=lambda lr: (sc[lr], -lr)) if sc else None

    def interior(self, key: tuple[str, str]) -> bool:
        best, tried = self.chosen(key), sorted(self.scores.get(key, {}))
        return best is not None and tried[0] < best < tried[-1]


def calibrate(out: Path, bases: dict, arms: list[Arm], args, size: dict, overrides: dict, fixed: dict, threads: int,
              log) -> tuple[Calibration, list[str]]:
    """Stage 2 (module docstring): run the grids, extending each towards a better edge, on the calibration seeds."""
    own = [a for a in arms if a.rate_of is None or a.rate_of not in {b.name for b in arms}]
    cal = Calibration({(ln, a.name): list(grid(a.preset, tuple(args.grid_sgd), tuple(args.grid_adam)))
                       for ln in bases if args.calibrate_on in (None, ln) for a in own})
    by_name, jobs, failed = {a.name: a for a in arms}, {}, []
    extended = {k: [0, 0] for k in cal.grids}
    while True:
        new = {}
        for (ln, name), rates in cal.grids.items():
            for lr in rates:
                if (ln, name, lr) not in jobs:
                    new[(ln, name, lr)] = Job(out, "calibration", f"{ln}_{name}_lr{lr_tag(lr)}", plan_config(
                        bases[ln], size, by_name[name], args.calibration_seeds, args.epochs, lr, overrides, fixed[ln]))
        jobs.update(new)
        failed += run_all(list(new.values()), args.workers, threads, log, args.report_only)
        for (ln, name, lr), job in jobs.items():
            res = job.results()
            if set(args.calibration_seeds) <= set(res):
                score = float(np.mean([metrics(res[s])["a_bar"] for s in args.calibration_seeds]))
                cal.scores.setdefault((ln, name), {})[lr] = score
        grown = False
        for key, rates in cal.grids.items():
            if len(cal.scores.get(key, {})) < len(rates):
                continue  # a rate did not finish: no decision
            best = cal.chosen(key)
            if best == min(rates) and extended[key][0] < args.max_extend:
                rates.insert(0, float(f"{min(rates) / args.grid_step:.6g}"))  # 1e-07, not 1.0000000000000002e-07
                extended[key][0] += 1
                grown = True
            elif best == max(rates) and extended[key][1] < args.max_extend:
                rates.append(float(f"{max(rates) * args.grid_step:.6g}"))
                extended[key][1] += 1
                grown = True
        if not grown:
            return cal, failed


def calibration_from(report: dict) -> Calibration:
    """The calibration of an earlier run's protocol.json (``--rates-from``; checked by ``check_rates_from``): its grids
    and mean A-bar per rate, so that the chosen rates, the curves and the interior verdicts are the same."""
    cal = Calibration()
    for key, c in report["calibration"].items():
        ln, name = key.split("/", 1)
        cal.grids[(ln, name)] = [float(lr) for lr in c["grid"]]
        cal.scores[(ln, name)] = {float(lr): float(s) for lr, s in c["scores"].items()}
    return cal


def at_rate_jobs(out: Path, bases: dict, args, size: dict, overrides: dict, fixed: dict
                 ) -> dict[tuple[str, str, str], Job]:
    """Stage 3 (module docstring): (learner, arm, lambda mode) -> the job of that arm at ``--at-rate`` on the reported
    seeds, in the main stage's first lambda mode (RanPAC fixed where its lambdas are); empty without ``--at-rate``."""
    if args.at_rate is None:
        return {}
    jobs = {}
    for ln, b in bases.items():
        if args.at_rate_on is not None and ln not in args.at_rate_on:
            continue
        mode = "fixed" if fixed[ln] is not None else "free"
        for m in args.at_rate_methods:
            jobs[(ln, m, mode)] = Job(out, "at_rate", f"{ln}_{m}_lr{lr_tag(args.at_rate)}", plan_config(
                b, size, arm_of(m), args.seeds, args.epochs, args.at_rate, overrides, fixed[ln]))
    return jobs


def plot_calibration(cal: Calibration, labels: dict[str, str], path: Path) -> None:
    """A-bar against the learning rate (log scale), one line per (learner, arm), the chosen rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (ln, name), sc in sorted(cal.scores.items()):
        rates = sorted(sc)
        line = ax.plot(rates, [sc[r] for r in rates], marker="o", label=f"{ln}: {labels.get(name, name)}")[0]
        best = cal.chosen((ln, name))
        ax.plot([best], [sc[best]], marker="*", markersize=14, color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("mean A-bar on the calibration seeds (%)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    overrides = {}
    for item in args.overrides:
        k, _, v = item.partition("=")
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    threads = int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // max(args.workers, 1)))
    out, size = args.out, SIZES[args.size]
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "protocol.log").open("a")

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    start, failed = time.perf_counter(), []
    arms = [arm_of(m) for m in args.methods]
    labels = {"none": "none", **{a.name: a.label for a in [*arms, *map(arm_of, args.at_rate_methods)]}}
    bases = {learner_name(b): b for b in (json.loads(p.read_text()) for p in args.base)}
    seeds_all = [*args.calibration_seeds, *args.seeds]
    # 1. untuned
    untuned = {ln: Job(out, "untuned", f"{ln}_none", plan_config(b, size, "none", seeds_all, args.epochs, None,
                                                                     overrides, None)) for ln, b in bases.items()}
    failed += run_all(list(untuned.values()), args.workers, threads, log, args.report_only)
    fixed = {ln: (untuned_lambdas({s: json.loads(r.path.read_text()) for s, r in j.results().items()})
                  if ln == "ranpac" and bases[ln].get("use_RP") else None) for ln, j in untuned.items()}
    # 2. calibration
    if args.rates_from is not None:
        cal = calibration_from(json.loads(args.rates_from.read_text()))
        log(f"calibration: taken from {args.rates_from}, not run")
        labels.update({name: arm_of(name).label for (_, name) in cal.scores if name not in labels})  # arms not run
    else:
        cal, calibration_failed = calibrate(out, bases, arms, args, size, overrides, fixed, threads, log)
        failed += calibration_failed
    chosen: dict[str, dict[str, float]] = {ln: {} for ln in bases}
    for (ln, name) in cal.scores:
        chosen.setdefault(ln, {})[name] = cal.chosen((ln, name))  # a learner of --rates-from may have no base
    if args.calibrate_on is not None:
        chosen = {ln: dict(chosen.get(args.calibrate_on, {})) for ln in bases}
    for ln in bases:
        for a in arms:
            if a.rate_of is not None and a.rate_of in chosen[ln]:
                chosen[ln][a.name] = chosen[ln][a.rate_of]
    # 3. main (planned here, run after the one-rate stage, which shares its untuned jobs)
    main_jobs: dict[tuple[str, str, str], Job] = {}
    for ln, b in bases.items():
        modes = [("fixed", fixed[ln])] if fixed[ln] is not None else [("free", None)]
        if fixed[ln] is not None and not args.no_free_lambda:
            modes.append(("free", None))
        for mode, lambdas in modes:
            main_jobs[(ln, "none", mode)] = Job(out, "main", f"{ln}_none_{mode}", plan_config(
                b, size, "none", args.seeds, args.epochs, None, overrides, lambdas))
            for a in arms:
                if a.name in chosen[ln]:
                    main_jobs[(ln, a.name, mode)] = Job(out, "main", f"{ln}_{a.name}_{mode}", plan_config(
                        b, size, a, args.seeds, args.epochs, chosen[ln][a.name], overrides, lambdas))
    at_jobs = at_rate_jobs(out, bases, args, size, overrides, fixed)
    first = [main_jobs[(ln, "none", mode)] for (ln, _, mode) in at_jobs if (ln, "none", mode) in main_jobs]
    # one queue, the one-rate stage first: a worker that finishes early goes on to the main stage at once
    queue = list(dict.fromkeys(first)) + list(at_jobs.values()) + [j for j in main_jobs.values() if j not in first]
    failed += run_all(queue, args.workers, threads, log, args.report_only)
    # 5. report
    lines = ["# Comparison protocol (issues 15, 25)", "",
             f"Command: `python exps/importance/protocol.py {shlex.join(argv if argv is not None else sys.argv[1:])}`",
             f"Size {args.size} {size}; {args.epochs} training epoch(s) per task for every arm; reported seeds "
             f"{args.seeds}; calibration seeds {args.calibration_seeds} (never reported); starting grids SGD "
             f"{args.grid_sgd}, Adam/AdamW {args.grid_adam}, extended by x{args.grid_step:g} up to {args.max_extend} "
             f"times per side; every run with {threads} thread(s), {args.workers} at a time."
             + (f" Rates calibrated on {args.calibrate_on} only, used for every learner." if args.calibrate_on else "")
            + (f" Calibration taken from `{args.rates_from}` (not run again)." if args.rates_from else "")
            + (f" One-rate stage: {', '.join(args.at_rate_methods)} at lr {args.at_rate:g} on "
               f"{', '.join(args.at_rate_on or sorted(bases))}." if args.at_rate is not None else ""),
             "", "## Calibration (mean A-bar over the calibration seeds)", ""]
    for (ln, name), sc in sorted(cal.scores.items()):
        best = cal.chosen((ln, name))
        lines.append(f"- {ln}, {labels[name]}: " + ", ".join(
            (f"**{lr:g}: {s:.2f}**" if lr == best else f"{lr:g}: {s:.2f}") for lr, s in sorted(sc.items()))
            + (" (interior)" if cal.interior((ln, name)) else " (**not bracketed**: the best rate is at the edge)"))
    same = [a for a in arms if a.rate_of is not None and a.rate_of in {b.name for b in arms}]
    if same:
        lines.append("- Not calibrated, at another arm's rate: " + ", ".join(
            f"{a.label} (at {labels[a.rate_of]}'s)" for a in same))
    if cal.scores:
        plot_calibration(cal, labels, out / "calibration.png")
        lines += ["", "![calibration](calibration.png)"]
    lines += ["", "## Results (mean ± sample std over the reported seeds; Δ: paired, vs none)", ""]
    report: dict[str, Any] = {"calibration": {f"{ln}/{name}": {"grid": sorted(cal.scores.get((ln, name), {})),
                                                                "scores": {str(k): v for k, v in sorted(sc.items())},
                                                                "chosen": cal.chosen((ln, name)),
                                                                "interior": cal.interior((ln, name))}
                                              for (ln, name), sc in cal.scores.items()},
                              "chosen_lr": chosen, "ridge_lambdas_by_seed": fixed.get("ranpac"), "threads": threads,
                              "tables": {}}
    for (ln, mode) in sorted({(k[0], k[2]) for k in main_jobs}):
        rows = {m: main_jobs[(ln, m, md)].results() for (l2, m, md) in main_jobs if l2 == ln and md == mode}
        title = f"{ln} ({'ridge lambda fixed to the untuned choice' if mode == 'fixed' else 'official free lambda'})" \
            if ln == "ranpac" else ln
        tl, summary = table(rows, [a.name for a in arms if a.name in rows], args.seeds, {**chosen[ln]}, labels,
                            title, args.min_old_accuracy, args.min_drift)
        lines += tl
        report["tables"][f"{ln}/{mode}"] = summary
    for (ln, mode) in sorted({(k[0], k[2]) for k in at_jobs}):
        rows = {"none": main_jobs[(ln, "none", mode)].results(),
                **{m: at_jobs[(ln, m, md)].results() for (l2, m, md) in at_jobs if l2 == ln and md == mode}}
        title = (f"{ln}{' (ridge lambda fixed to the untuned choice)' if mode == 'fixed' else ''}, every arm at lr "
                 f"{args.at_rate:g} (one rate read off the calibration curve, not calibrated)")
        tl, summary = table(rows, [m for m in args.at_rate_methods if m in rows], args.seeds,
                            {m: args.at_rate for m in rows if m != "none"}, labels, title, args.min_old_accuracy,
                            args.min_drift)
        lines += tl
        report["tables"][f"{ln}/{mode}/at_rate"] = summary
    wall = time.perf_counter() - start
    lines.append(f"Wall time of this invocation: {wall:.0f} s; {'unfinished' if args.report_only else 'failed'} runs: "
                 f"{', '.join(failed) or 'none'}.")
    (out / "protocol.md").write_text("\n".join(lines) + "\n")
    (out / "protocol.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    log(f"report: {out / 'protocol.md'}; {wall:.0f} s; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
