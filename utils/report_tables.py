"""The report's table.md and table.csv (``utils/report.py``): one table per metric, the paired differences from no
tuning, where the backbone's change lands, and the lists of incomplete, duplicate, skipped and used runs."""

from __future__ import annotations

import csv
import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from utils.runs import METRICS, Cell, Collection, Metric, config_differences, learner_title, mean_std


def _num(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.10g}"


CSV_FIELDS = ("learner", "method", "dataset", "metric", "unit", "mean", "std", "n", "seeds", "values", "status",
              "incomplete", "incomplete_seeds", "duplicates_ignored")


def csv_rows(col: Collection) -> list[dict[str, Any]]:
    """Long-format rows, one per (learner, method, dataset, metric).

    ``mean``/``std``/``n``/``seeds``/``values`` cover the complete runs only (std: ddof=1, blank for n < 2);
    ``incomplete``/``incomplete_seeds`` are the seeds without a complete run; ``status`` is complete, partial
    (some seeds incomplete) or incomplete (no complete seed); fractions are in [0, 1] as in results.json.
    """
    rows = []
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                if cell is None:
                    continue
                for metric in METRICS:
                    seeds, values = cell.values(metric.key)
                    mean, std, n = mean_std(values)
                    rows.append({"learner": learner, "method": method, "dataset": dataset, "metric": metric.key,
                                 "unit": metric.unit, "mean": _num(mean), "std": _num(std), "n": n,
                                 "seeds": ";".join(map(str, seeds)), "values": ";".join(map(_num, values)),
                                 "status": cell.status, "incomplete": len(cell.incomplete),
                                 "incomplete_seeds": ";".join(str(r.seed) for r in cell.incomplete),
                                 "duplicates_ignored": cell.duplicates_ignored})
    return rows


def write_csv(col: Collection, path: Path) -> None:
    """Write :func:`csv_rows` to ``path``."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(csv_rows(col))


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------
def _md(text: Any) -> str:
    """Escape a value for a Markdown table cell (pipes, newlines)."""
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def format_cell(cell: Optional[Cell], metric: Metric) -> str:
    """``84.50 ± 0.70 (n=3)``; ``(n=1)`` has no ±; ``+k incomplete`` when seeds lack a complete run;
    ``-`` when no complete run has the metric (no tuning phase, single task); blank when never run."""
    if cell is None:
        return ""
    extra = f", +{len(cell.incomplete)} incomplete" if cell.incomplete else ""
    if not cell.runs:
        k = len(cell.incomplete)
        statuses = ", ".join(sorted({r.status for r in cell.incomplete}))
        return f"all incomplete ({k} seed{'s' if k != 1 else ''}: {statuses})"
    _, values = cell.values(metric.key)
    mean, std, n = mean_std(values)
    if mean is None:
        return f"-{' (' + extra[2:] + ')' if extra else ''}"
    text = f"{mean * metric.scale:.{metric.digits}f}"
    if std is not None:
        text += f" ± {std * metric.scale:.{metric.digits}f}"
    return f"{text} (n={n}{extra})"


def metric_table(col: Collection, metric: Metric) -> list[str]:
    """Markdown lines of one metric's table: a bold row per learner opening its group, one row per method."""
    datasets = col.datasets
    lines = ["| Learner / method | " + " | ".join(map(_md, datasets)) + " |",
             "|---" + "|---:" * len(datasets) + "|"]
    for learner in col.learners:
        lines.append(f"| **{_md(learner_title(learner))}** |" + " |" * len(datasets))
        for method in col.methods(learner):
            cells = [format_cell(col.cells.get((learner, method, d)), metric) for d in datasets]
            lines.append(f"| {_md(method)} | " + " | ".join(map(_md, cells)) + " |")
    return lines


PAIRED_METRICS = ("average_accuracy", "last_accuracy", "forgetting")
BASELINE = "none"


def paired_differences(col: Collection, learner: str, method: str, dataset: str, metric: str
                       ) -> tuple[list[int], list[float]]:
    """(seeds, method - baseline) over the seeds where both the method and the learner's ``none`` run completed.

    Runs of one seed share the class order, so the per-seed difference removes the spread that the class order
    alone causes (on small data it dominates the seed standard deviation)."""
    base = col.cells.get((learner, BASELINE, dataset))
    cell = col.cells.get((learner, method, dataset))
    if base is None or cell is None or method == BASELINE:
        return [], []
    b = dict(zip(*base.values(metric)))
    pairs = [(seed, v - b[seed]) for seed, v in zip(*cell.values(metric)) if seed in b]
    return [s for s, _ in pairs], [d for _, d in pairs]


def paired_table(col: Collection) -> list[str]:
    """Markdown lines: per learner, method and data set, the mean ± std over seeds of (method - none) for
    Ā, A_B and forgetting, with the number of paired seeds and how many differences are positive."""
    titles = {m.key: m.title.split(" (")[0] for m in METRICS}
    lines = ["| Learner / method | Dataset | " + " | ".join(f"Δ {titles[m]}" for m in PAIRED_METRICS) + " |",
             "|---|---|" + "---:|" * len(PAIRED_METRICS)]
    rows = 0
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cells = []
                for metric in PAIRED_METRICS:
                    _, diffs = paired_differences(col, learner, method, dataset, metric)
                    mean, std, n = mean_std(diffs)
                    if mean is None:
                        cells.append("-")
                        continue
                    text = f"{mean:+.2f}" + (f" ± {std:.2f}" if std is not None else "")
                    cells.append(f"{text} (n={n}, {sum(d > 0 for d in diffs)} > 0)")
                if any(c != "-" for c in cells):
                    rows += 1
                    lines.append(f"| {_md(learner_title(learner))} / {_md(method)} | {_md(dataset)} | "
                                 + " | ".join(cells) + " |")
    return lines if rows else []


def group_table(col: Collection, top: int = 4) -> list[str]:
    """Markdown lines: per learner, method and data set, the ``top`` parameter groups with the largest mean share of
    the squared backbone change (``tasks[i].drift.groups``, averaged over the tasks that moved the backbone, then
    over the seeds). Empty when no run measured drift."""
    lines = ["| Learner / method | Dataset | n | largest shares of the squared change (mean over tasks and seeds) |",
             "|---|---|---:|---|"]
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                runs = [r for r in (cell.runs if cell else []) if r.groups]
                if not runs:
                    continue
                names = sorted({g for r in runs for g in r.groups})
                mean = {g: float(np.mean([r.groups.get(g, 0.0) for r in runs])) for g in names}
                best = sorted(mean, key=lambda g: -mean[g])[:top]
                lines.append(f"| {_md(learner_title(learner))} / {_md(method)} | {_md(dataset)} | {len(runs)} | "
                             + ", ".join(f"{_md(g)} {100 * mean[g]:.1f}%" for g in best) + " |")
    return lines if len(lines) > 2 else []


def markdown(col: Collection, plots: Sequence[Path], command: str = "") -> str:
    """The whole table.md: metric tables with footnotes, then incomplete, duplicate, skipped and used runs, plots."""
    n_used = sum(len(c.runs) for c in col.cells.values())
    n_incomplete = sum(1 for r in col.runs if not r.complete)
    out = ["# Results", ""]
    if command:
        out += [f"Generated by `{command}` on {datetime.datetime.now():%Y-%m-%d %H:%M}.", ""]
    out += [f"Read {col.found} results.json file(s) under {', '.join(f'`{r}`' for r in col.roots)}: "
            f"{n_used} complete run(s) used, {n_incomplete} incomplete run(s) (not averaged), "
            f"{len(col.duplicates)} duplicate(s) ignored, {len(col.skipped)} file(s) skipped.", ""]
    if col.skipped:
        out += [f"**Warning:** {len(col.skipped)} results.json file(s) could not be used; see "
                "[Skipped files](#skipped-files).", ""]
    for metric in METRICS:
        out += [f"## {metric.title}", ""] + metric_table(col, metric) + [""]
    groups = group_table(col)
    if groups:
        out += ["## Where the backbone's change lands", ""] + groups + [""]
    paired = paired_table(col)
    if paired:
        out += ["## Paired differences from no tuning phase (same seed = same class order)", ""] + paired + [""]
    out += ["Notes:", "",
            "- Each cell: mean ± sample standard deviation (ddof=1) over seeds; n = number of seeds with a complete "
            "run; n=1 shows no ±. Only runs with status `complete` are averaged.",
            "- `+k incomplete`: k more seeds have only incomplete runs (see [Incomplete runs](#incomplete-runs)); "
            "`all incomplete`: no seed of that cell completed. A blank cell: never run.",
            "- Method = `spr` (`none`: no tuning phase). Learner = `model_name` without its `_mist` alias suffix.",
            "- Ā = mean over tasks of the top-1 accuracy on all classes seen so far; A_B = that accuracy after the "
            "last task; forgetting = mean drop from each earlier task's best accuracy to its final one "
            "(`-` for a single task).",
            "- Backbone updated per step / selected: mean over the tasks that ran a tuning phase of "
            "`updated_fraction_per_step` / `selected_fraction`, in % of the backbone's entries "
            "(`-`: no tuning phase, or the method reports no selection).",
            "- Backbone entries moved / relative weight change: mean over the tuned tasks of `moved_fraction` "
            "(share of entries whose value the tuning phase changed; weight decay moves unselected entries too) and of "
            "`relative_change` (||theta - theta_0|| / ||theta_0|| over the task's phase).",
            "- Old-class accuracy: top-1 accuracy on the test images of the classes of every task before the last, "
            "after the last task. Old-class feature drift: mean over those classes of 1 - cos between their test-set "
            "mean feature (the module the tuning phase tunes) after the last task and after the task that introduced "
            "them (`tasks[i].drift`, evaluation data only; `-`: not measured). Embeddings' share: mean over the tasks "
            "that moved the backbone of ||d theta_embeddings||^2 / ||d theta||^2 over the whole task (tuning phase and "
            "the learner's own training).",
            "- Wall time: sum over tasks of each task's `seconds` (learning and evaluation).",
            "- Paired differences: for each seed where both ran, the method's value minus the same learner's `none` "
            "run (same class order); mean ± sample std over those seeds, and how many differences are > 0. A "
            "difference whose ± spans 0 is inside the seed spread.",
            "- Several runs of the same learner, method, data set and seed: the newest complete one is used "
            "(see [Duplicate runs](#duplicate-runs)).", ""]
    mixed = [(k, config_differences(c.runs)) for k, c in col.cells.items()]
    mixed = [(k, d) for k, d in mixed if d]
    if mixed:
        out += ["**Warning:** these cells average seeds whose configs differ (beyond seed and runtime keys):", ""]
        out += [f"- {learner_title(k[0])} / {k[1]} / {k[2]}: {', '.join(d)}" for k, d in mixed] + [""]

    out += ["## Incomplete runs", ""]
    incomplete = sorted((r for r in col.runs if not r.complete), key=lambda r: (r.key, str(r.path)))
    if incomplete:
        kept = {id(r) for c in col.cells.values() for r in c.incomplete}
        out += ["| Learner | Method | Dataset | Seed | Status | Tasks done | Error | Note | Path |",
                "|---|---|---|---:|---|---|---|---|---|"]
        for r in incomplete:
            total = "?" if r.tasks_total is None else r.tasks_total
            note = "not averaged" if id(r) in kept else "superseded (see Duplicate runs)"
            out.append(f"| {_md(learner_title(r.learner))} | {_md(r.method)} | {_md(r.dataset)} | {r.seed} | "
                       f"{_md(r.status)} | {r.tasks_done} of {total} | {_md(r.error or '')} | {note} | "
                       f"`{_md(r.path)}` |")
    else:
        out.append("None.")
    out += ["", "## Duplicate runs", ""]
    if col.duplicates:
        out += ["| Learner | Method | Dataset | Seed | Ignored (status) | Used (status) | Config differs in |",
                "|---|---|---|---:|---|---|---|"]
        for ignored, kept_run in sorted(col.duplicates, key=lambda d: (d[0].key, str(d[0].path))):
            diff = ", ".join(config_differences([ignored, kept_run])) or "-"
            out.append(f"| {_md(learner_title(ignored.learner))} | {_md(ignored.method)} | {_md(ignored.dataset)} | "
                       f"{ignored.seed} | `{_md(ignored.path)}` ({_md(ignored.status)}) | `{_md(kept_run.path)}` "
                       f"({_md(kept_run.status)}) | {_md(diff)} |")
    else:
        out.append("None.")
    out += ["", "## Skipped files", ""]
    if col.skipped:
        out += ["| File | Reason |", "|---|---|"]
        out += [f"| `{_md(p)}` | {_md(why)} |" for p, why in col.skipped]
    else:
        out.append("None.")
    out += ["", "## Runs used", "", "| Learner | Method | Dataset | Seed | Model name | Ā (%) | A_B (%) | Path |",
            "|---|---|---|---:|---|---:|---:|---|"]
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                for r in sorted(cell.runs, key=lambda r: r.seed) if cell else []:
                    out.append(f"| {_md(learner_title(learner))} | {_md(method)} | {_md(dataset)} | {r.seed} | "
                               f"{_md(r.model_name)} | {r.values['average_accuracy']:.2f} | "
                               f"{r.values['last_accuracy']:.2f} | `{_md(r.path)}` |")
    out += ["", "## Plots", ""]
    out += [f"![{p.stem}]({p.name})" for p in plots] or ["None (no complete run)."]
    return "\n".join(out) + "\n"
