"""The comparison protocol's command line (``exps/importance/protocol.py``): named suites and sizes, the arguments and
their defaults, and the checks that run before any job (exit 2 with one sentence)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Optional

from arms import VARIANTS, arm_of, owned_keys

from models.sparse.presets import compared_methods
from utils.config import load_config
from utils.errors import ConfigError
from utils.registry import LEARNERS, PRESETS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DESCRIPTION = ("The comparison protocol (issues 15 and 25): calibrated learning rates whose optimum is bracketed, "
               "equal training, fixed ridge lambda, paired seeds, planned contrasts with Holm-corrected p-values, "
               "drift measurements and an informativeness rule based on what the host sees.")

#: the demo's size: Fashion-MNIST at 32 px, 60 training and 50 test images per class, batch 32
SIZES = {
    "demo": dict(input_size=32, train_per_class=60, test_per_class=50, batch_size=32),
    "quick": dict(input_size=32, train_per_class=12, test_per_class=10, batch_size=8),
    "none": {},
}
DEFAULT_BASE = [HERE / "fmnist_ranpac_none.json", HERE / "fmnist_simplecil_none.json"]
#: the presets marked ``compare`` and MIST, in report order (models.sparse.presets.compared_methods)
DEFAULT_METHODS = tuple(compared_methods()[1:])
GRID_SGD, GRID_ADAM = (1e-4, 1e-3, 1e-2), (1e-5, 1e-4, 1e-3)
REPORTED_SEEDS = tuple(range(2001, 2011))
CALIBRATION_SEEDS = (1990, 1991)
#: named argument sets (``--suite``); the command line's own values win where given
SUITES: dict[str, dict[str, Any]] = {
    "dinov2": dict(base=[HERE / "dinov2_ranpac_none.json", HERE / "dinov2_simplecil_none.json"],
                   methods=["ce_finetune", "mist_random", "mist_noembed", "spu", "gps", "mist"], size="none",
                   epochs=2, calibrate_on="ranpac", no_free_lambda=True,
                   # the calibration curve's knee: dense CE loses 21 points of A-bar there, MIST 3.8, SPU and GPS
                   # 0.2-0.3 (RanPAC, calibration seeds); SimpleCIL's prototype head, unlike RanPAC's ridge head at
                   # small lambda, does not amplify tiny feature changes
                   at_rate=1e-5, at_rate_on=["simplecil"],
                   at_rate_methods=["ce_finetune", "mist", "mist_random", "mist_noembed", "mist_random_noembed"]),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "protocol")
    ap.add_argument("--suite", choices=sorted(SUITES), default=None,
                    help="a named set of base configs, arms and sizes (dinov2: the issue-25 benchmark)")
    ap.add_argument("--base", type=Path, nargs="+", default=None, help="one base config per learner")
    ap.add_argument("--methods", nargs="+", default=None,
                    help=f"arms: registered presets or {', '.join(VARIANTS)}")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(REPORTED_SEEDS))
    ap.add_argument("--calibration-seeds", type=int, nargs="+", default=list(CALIBRATION_SEEDS))
    ap.add_argument("--grid-sgd", type=float, nargs="+", default=list(GRID_SGD))
    ap.add_argument("--grid-adam", type=float, nargs="+", default=list(GRID_ADAM))
    ap.add_argument("--grid-step", type=float, default=10.0, help="factor between a grid's edge and its extension")
    ap.add_argument("--max-extend", type=int, default=3, help="extensions of a grid per side at most")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs per task of every arm (default 2)")
    ap.add_argument("--size", choices=sorted(SIZES), default=None)
    ap.add_argument("--min-old-accuracy", type=float, default=1.0,
                    help="informative: dense fine-tuning changes the old-class accuracy by at least this (points)")
    ap.add_argument("--min-drift", type=float, default=1e-3,
                    help="informative: or drifts the old classes' features by at least this cosine distance")
    ap.add_argument("--workers", type=int, default=2, help="main.py processes at a time")
    ap.add_argument("--no-free-lambda", action="store_true", default=None, help="skip RanPAC's free-lambda table")
    ap.add_argument("--calibrate-on", default=None, metavar="LEARNER",
                    help="calibrate on this learner only and use its rates for every learner (the tuning phase does "
                         "not depend on the learner); default: each learner on its own runs")
    ap.add_argument("--at-rate", type=float, default=None, metavar="LR",
                    help="also run --at-rate-methods all at this one rate (not calibrated) before the main stage")
    ap.add_argument("--at-rate-methods", nargs="+", default=None,
                    help="arms of the one-rate stage, any arm (default: those of --methods)")
    ap.add_argument("--at-rate-on", nargs="+", default=None, metavar="LEARNER",
                    help="learners of the one-rate stage (default: every learner)")
    ap.add_argument("--rates-from", type=Path, default=None, metavar="PROTOCOL_JSON",
                    help="skip the calibration stage: take the calibration (grids, curves, chosen rates) from an "
                         "earlier run's protocol.json, e.g. to run the main stage again on other seeds or learners")
    ap.add_argument("--report-only", action="store_true",
                    help="run nothing: write the report from the runs already finished under --out")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=JSON")
    ap.add_argument("--quick", action="store_true",
                    help="CI-sized: --size quick, 3 seeds, 1 calibration seed, 2 rates per grid, 1 epoch")
    args = ap.parse_args(argv)
    suite = SUITES.get(args.suite, {})
    defaults = dict(base=DEFAULT_BASE, methods=list(DEFAULT_METHODS), size="demo", epochs=2, calibrate_on=None,
                    no_free_lambda=False, at_rate=None, at_rate_methods=None, at_rate_on=None)
    for key, value in {**defaults, **suite}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.at_rate_methods is None:
        args.at_rate_methods = list(args.methods)
    if args.quick:
        args.size, args.seeds, args.calibration_seeds, args.epochs = (
            "quick", args.seeds[:3], args.calibration_seeds[:1], 1)
        args.grid_sgd, args.grid_adam = args.grid_sgd[1:], args.grid_adam[1:]
    return args


def check_args(args) -> Optional[str]:
    """The first thing wrong with the command line, as one sentence, or None. Checked before any run: numbers in range,
    seeds distinct and never both calibration and reported, arms and base configs that exist, ``--set`` keys that the
    protocol does not own and values that the project's config validation accepts for every base config."""
    finite = lambda x: x == x and abs(x) != float("inf")  # noqa: E731
    numbers = [("--epochs", args.epochs, 1), ("--workers", args.workers, 1), ("--max-extend", args.max_extend, 0)]
    for flag, value, low in numbers:
        if value < low:
            return f"{flag} is {value}; expected an integer >= {low}"
    for flag, values in (("--grid-sgd", args.grid_sgd), ("--grid-adam", args.grid_adam)):
        if not values or any(not finite(v) or v <= 0 for v in values) or len(set(values)) != len(values):
            return f"{flag} is {values}; expected distinct finite learning rates > 0"
    if not finite(args.grid_step) or args.grid_step <= 1:
        return f"--grid-step is {args.grid_step}; expected a finite factor > 1"
    for flag, value in (("--min-old-accuracy", args.min_old_accuracy), ("--min-drift", args.min_drift)):
        if not finite(value) or value < 0:
            return f"{flag} is {value}; expected a finite number >= 0"
    for flag, seeds in (("--seeds", args.seeds), ("--calibration-seeds", args.calibration_seeds)):
        if not seeds or len(set(seeds)) != len(seeds):
            return f"{flag} is {seeds}; expected distinct seeds"
    if set(args.seeds) & set(args.calibration_seeds):
        return f"seeds {sorted(set(args.seeds) & set(args.calibration_seeds))} are both calibration and reported seeds"
    for flag, names in (("--methods", args.methods), ("--at-rate-methods", args.at_rate_methods or [])):
        unknown = [m for m in names if m not in VARIANTS and m not in PRESETS.names()]
        if unknown:
            return f"{flag}: unknown arm(s) {unknown}; expected registered presets or {', '.join(VARIANTS)}"
    missing = [str(p) for p in args.base if not p.is_file()]
    if missing:
        return f"--base: no such config file(s) {missing}"
    every_arm = [arm_of(m) for m in [*args.methods, *(args.at_rate_methods or [])]]
    owned = sorted({item.partition("=")[0] for item in args.overrides} & owned_keys(every_arm))
    if owned:
        return f"--set {', '.join(owned)}: the protocol sets these keys itself (seeds, presets, rates, epochs, lambdas)"
    learners = set()
    for path in args.base:
        try:
            cfg = load_config(path, args.overrides)
        except ConfigError as exc:
            return str(exc)
        learners.add(LEARNERS.resolve(cfg.model_name))
    if args.rates_from is not None:
        problem = check_rates_from(args.rates_from, learners, args.calibrate_on)
        if problem:
            return problem
    elif args.calibrate_on is not None and args.calibrate_on not in learners:
        return f"--calibrate-on {args.calibrate_on}: no base config of that learner ({', '.join(sorted(learners))})"
    if args.at_rate is not None and (not finite(args.at_rate) or args.at_rate <= 0):
        return f"--at-rate is {args.at_rate}; expected a finite learning rate > 0"
    stray = [ln for ln in (args.at_rate_on or []) if ln not in learners]
    if stray:
        return f"--at-rate-on: no base config of learner(s) {stray} ({', '.join(sorted(learners))})"
    return None


def check_rates_from(path: Path, learners: set[str], calibrate_on: Optional[str]) -> Optional[str]:
    """What is wrong with ``--rates-from PATH`` for these learners, or None: the file must be a protocol.json whose
    ``calibration`` maps ``"learner/arm"`` to its ``grid`` and ``scores``, with a calibrated learner for each base
    config's learner (or ``--calibrate-on``'s)."""
    try:
        report = json.loads(path.read_text())
        calibrated = {key.split("/")[0] for key, c in report["calibration"].items() if c["grid"] and c["scores"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"--rates-from {path}: not a readable protocol.json with a 'calibration' section ({exc})"
    needed = {calibrate_on} if calibrate_on is not None else learners
    if not needed <= calibrated:
        return (f"--rates-from {path}: no calibration for learner(s) {sorted(needed - calibrated)} (it has "
                f"{sorted(calibrated) or 'none'}); pass --calibrate-on with one of them")
    return None
