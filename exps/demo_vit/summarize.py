"""The six hosts with and without MIST side by side, from the runs of ``exps/demo_vit/run.sh`` (issue 13).

Per host and tuning phase: A_B, A-bar and forgetting (mean ± sample std over seeds), wall time per run, and for the
MIST rows the share of backbone entries the phase moved and its relative weight change per task (evidence that it
changed the model). Then, per host, the paired difference host + MIST - host over the seeds both ran (95% t
interval, Holm-adjusted p over the six hosts, per metric) and the smallest difference the design detects with 80%
power (utils/contrasts.py). Runs are read with the report tool's ``load_run``; the newest complete run per
(host, tuning phase, seed) is used.

Usage: python exps/demo_vit/summarize.py [RUNS (default runs/demo_vit)] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from utils.cli import ToolError, run_tool, write_output  # noqa: E402
from utils.contrasts import detectable_effect, holm, paired  # noqa: E402
from utils.registry import LEARNERS  # noqa: E402
from utils.results_file import InvalidResults, load_run  # noqa: E402

#: the registered learners in report order, and their report titles (a new learner appears without an edit)
HOSTS = tuple(name for name, cls in sorted(LEARNERS.items(), key=lambda item: item[1].ORDER))
TITLES = {name: LEARNERS.get(name).TITLE or name for name in HOSTS}
METRICS = (("last_accuracy", "A_B"), ("average_accuracy", "A-bar"))


def collect(root: Path) -> dict[tuple[str, str], dict[int, dict]]:
    """(host, "none" | "mist") -> seed -> the run's values, the newest complete run of each."""
    runs: dict[tuple[str, str], dict[int, tuple]] = {}
    for path in sorted(root.rglob("results.json")):
        try:
            rec = load_run(path)
        except InvalidResults:
            continue
        host = rec.learner  # the registered learner (aliases such as ranpac_mist resolved)
        if rec.status != "complete" or host not in HOSTS:
            continue
        key, newest = (host, rec.method), runs.setdefault((host, rec.method), {}).get(rec.seed)
        if newest is None or rec.newest_key > newest[0]:
            runs[key][rec.seed] = (rec.newest_key, rec.values)
    return {k: {seed: v for seed, (_, v) in by_seed.items()} for k, by_seed in runs.items()}


def fmt(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return "-"
    values = [v * scale for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def report(runs: dict) -> str:
    lines = ["| host | tuning | seeds | A_B | A-bar | forgetting | wall s / run | moved % / task "
             "| rel. change / task |",
             "|---|---|---|---|---|---|---|---|---|"]
    for host in HOSTS:
        for method in ("none", "mist"):
            vals = list(runs.get((host, method), {}).values())
            col = {m: [v[m] for v in vals if v.get(m) is not None] for m in
                   ("last_accuracy", "average_accuracy", "forgetting", "wall_seconds", "moved_fraction",
                    "relative_change")}
            moved = fmt(col["moved_fraction"], 100.0) if method == "mist" else "-"
            change = (f"{statistics.mean(col['relative_change']):.1e}" if method == "mist" and col["relative_change"]
                      else "-")
            wall = f"{statistics.mean(col['wall_seconds']):.0f}" if col["wall_seconds"] else "-"
            lines.append(f"| {TITLES[host]} | {method} | {len(vals)} | {fmt(col['last_accuracy'])} | "
                         f"{fmt(col['average_accuracy'])} | {fmt(col['forgetting'])} | {wall} | {moved} | {change} |")
    lines += ["", "Paired differences host + MIST - host (points; 95% t interval; Holm over the six hosts per metric; "
              "smallest difference detected with 80% power at this n and spread):", "",
              "| host | n | Δ A_B [95% CI] | Holm p | Δ A-bar [95% CI] | Holm p | detectable Δ A_B / Δ A-bar |",
              "|---|---|---|---|---|---|---|"]
    families = {}
    for metric, _ in METRICS:
        contrasts = []
        for host in HOSTS:
            none, mist = runs.get((host, "none"), {}), runs.get((host, "mist"), {})
            seeds = sorted(set(none) & set(mist))
            if seeds:
                contrasts.append(paired(host, [mist[s][metric] for s in seeds], [none[s][metric] for s in seeds]))
        families[metric] = {c.name: c for c in holm(contrasts)}

    def cell(c) -> tuple[str, str]:
        if c.low is None:
            return f"{c.mean:+.2f}", "-"
        return f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]", "-" if c.holm is None else f"{c.holm:.3f}"

    for host in HOSTS:
        if host not in families["last_accuracy"]:
            continue
        b, a = families["last_accuracy"][host], families["average_accuracy"][host]
        det = [detectable_effect(c.sd, c.n) if c.sd is not None else float("inf") for c in (b, a)]
        lines.append(f"| {TITLES[host]} | {b.n} | {cell(b)[0]} | {cell(b)[1]} | {cell(a)[0]} | {cell(a)[1]} | "
                     f"{det[0]:.1f} / {det[1]:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="?", type=Path, default=Path("runs/demo_vit"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        raise ToolError(f"runs folder {args.runs} does not exist; pass the folder of bash exps/demo_vit/run.sh")
    runs = collect(args.runs)
    if not runs:
        raise ToolError(f"no complete run of the demo's hosts under {args.runs}")
    text = report(runs)
    if args.out:
        write_output(args.out, text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
