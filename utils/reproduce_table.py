"""The table ``python -m utils.reproduce`` writes (issue 28): the paper's layout, rows host / host + method, columns
data sets, A_last and A-bar per cell as mean ± std over the seeds run, beside the ledger's reference
(``exps/ledger.json``) with its source and the difference; Markdown, CSV, and per data set the accuracy curves with the
reference curve where the ledger has one."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from utils.cli import write_output

METRICS = (("last_accuracy", "a_last", "A_last"), ("average_accuracy", "a_bar", "A-bar"))


@dataclass
class Cell:
    """One (row, column): its config, the complete runs' values by seed, the runs not complete, the reference."""

    rel: str
    values: dict[str, dict[int, float]] = field(default_factory=dict)
    curves: dict[int, list[float]] = field(default_factory=dict)
    not_complete: list[str] = field(default_factory=list)
    reference: Optional[dict[str, Any]] = None
    why_none: Optional[str] = None


def row_key(job: Any) -> tuple[str, str]:
    """A job's row: (learner, spr)."""
    return job.learner, job.cfg.spr


def row_label(key: tuple[str, str]) -> str:
    """``RanPAC`` for no tuning phase, ``RanPAC + MIST`` with one (the learner's title, the preset's label)."""
    from utils.registry import LEARNERS, PRESETS

    learner, spr = key
    title = LEARNERS.get(learner).TITLE or learner
    return title if spr == "none" else f"{title} + {PRESETS.get(spr).label}"


def column_key(job: Any) -> tuple[str, str]:
    """A job's column: (data set, backbone)."""
    return job.cfg.dataset, job.cfg.convnet_type


def collect(jobs: Sequence, out: Path) -> dict[tuple, dict[tuple, Cell]]:
    """Row -> column -> :class:`Cell`, from each job's newest run in ``out`` and the ledger."""
    from utils.ledger import load
    from utils.reproduce import job_state
    from utils.results_file import InvalidResults, load_run

    ledger = load()["configs"]
    table: dict[tuple, dict[tuple, Cell]] = {}
    for job in jobs:
        cell = table.setdefault(row_key(job), {}).setdefault(column_key(job), Cell(job.rel))
        entry = ledger.get(job.rel, {})
        cell.reference, cell.why_none = entry.get("reference"), entry.get("why_none")
        state = job_state(job, out)
        if state.status != "done" or state.results is None:
            cell.not_complete.append(f"seed {job.seed}: {state.status}")
            continue
        try:
            run = load_run(state.results)
        except InvalidResults as exc:
            cell.not_complete.append(f"seed {job.seed}: unreadable ({exc})")
            continue
        for key, _, _ in METRICS:
            cell.values.setdefault(key, {})[job.seed] = run.values[key]
        cell.curves[job.seed] = run.top1_curve
    return table


def _ordered(table: dict[tuple, dict[tuple, Cell]]) -> tuple[list[tuple], list[tuple]]:
    from utils.runs import dataset_order, learner_order, method_order

    rows = sorted(table, key=lambda r: (learner_order().index(r[0]), method_order().index(r[1])))
    columns = sorted({c for cells in table.values() for c in cells}, key=lambda c: (dataset_order().index(c[0]), c[1]))
    return rows, columns


def column_label(column: tuple[str, str], columns: Sequence[tuple[str, str]]) -> str:
    """The data set's name, with the backbone when the table has more than one."""
    dataset, backbone = column
    return dataset if len({b for _, b in columns}) == 1 else f"{dataset} ({backbone})"


def summary(cell: Optional[Cell], metric: str, ref_key: str) -> dict[str, Any]:
    """mean, std, n, seeds, reference, its kind and source, and the difference for one metric of a cell."""
    from utils.runs import mean_std

    if cell is None:
        return {"mean": None, "std": None, "n": 0, "seeds": [], "reference": None, "kind": None, "source": None,
                "difference": None, "note": "no config"}
    by_seed = cell.values.get(metric, {})
    mean, std, n = mean_std([by_seed[s] for s in sorted(by_seed)])
    ref = cell.reference or {}
    reference = ref.get(ref_key)
    note = "; ".join(cell.not_complete) if n == 0 else ""
    return {"mean": mean, "std": std, "n": n, "seeds": sorted(by_seed), "reference": reference,
            "kind": ref.get("kind"), "source": ref.get("source"),
            "difference": None if mean is None or reference is None else mean - reference,
            "note": note or ("" if reference is not None else f"no reference: {cell.why_none or 'not in the ledger'}")}


def _cell_text(s: dict[str, Any]) -> str:
    if s["mean"] is None:
        ours = f"no run ({s['note']})" if s["note"] else "no run"
    else:
        ours = f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})" if s["std"] is not None else f"{s['mean']:.2f} (n=1)"
    if s["reference"] is None:
        return f"{ours}; no reference" if s["mean"] is not None else ours
    diff = "" if s["difference"] is None else f", {s['difference']:+.2f}"
    return f"{ours} / ref {s['reference']:.2f} [{s['kind']}]{diff}"


def markdown(table_def: Any, table: dict[tuple, dict[tuple, Cell]], standin: bool = False) -> str:
    """The Markdown table: one block per metric, cells ``ours ± std (n) / ref R [kind], difference``, then the
    references' sources."""
    rows, columns = _ordered(table)
    lines = [f"# {table_def.title}", "",
             "Each cell: our mean ± sample std over the seeds run (n), the ledger's reference [its kind] and our mean "
             "minus the reference. Generated by `python -m utils.reproduce " + table_def.name + "`.", ""]
    if standin:
        lines += ["**Stand-in runs** (`--standin`: a few stand-in images, shrunken backbones): these numbers check the "
                  "path, they are not comparable with the references.", ""]
    for metric, ref_key, title in METRICS:
        lines += [f"## {title} (%)", "", "| | " + " | ".join(column_label(c, columns) for c in columns) + " |",
                  "|---|" + "---|" * len(columns)]
        for row in rows:
            texts = [_cell_text(summary(table[row].get(c), metric, ref_key)) for c in columns]
            lines.append(f"| {row_label(row)} | " + " | ".join(texts) + " |")
        lines.append("")
    sources = sorted({(cell.rel, cell.reference["source"]) for cells in table.values() for cell in cells.values()
                      if cell.reference})
    if sources:
        lines += ["## Sources of the references", ""] + [f"- `{rel}`: {source}" for rel, source in sources]
    return "\n".join(lines) + "\n"


def csv_text(table: dict[tuple, dict[tuple, Cell]]) -> str:
    """Long format: one line per (row, column, metric)."""
    rows, columns = _ordered(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "learner", "spr", "dataset", "backbone", "config", "metric", "mean", "std", "n", "seeds",
                     "reference", "reference_kind", "reference_source", "difference", "note"])
    for row in rows:
        for column in columns:
            cell = table[row].get(column)
            for metric, ref_key, title in METRICS:
                s = summary(cell, metric, ref_key)
                writer.writerow([row_label(row), *row, *column, cell.rel if cell else "", title, s["mean"], s["std"],
                                 s["n"], " ".join(map(str, s["seeds"])), s["reference"], s["kind"], s["source"],
                                 s["difference"], s["note"]])
    return buffer.getvalue()


def plot_curves(table: dict[tuple, dict[tuple, Cell]], out: Path, name: str) -> list[Path]:
    """One PNG per column: each row's mean top-1 curve over tasks (solid) and its reference curve (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows, columns = _ordered(table)
    written = []
    for column in columns:
        fig, ax = plt.subplots(figsize=(6, 4))
        drawn = False
        for k, row in enumerate(rows):
            cell = table[row].get(column)
            if cell is None:
                continue
            color = f"C{k % 10}"
            curves = [c for c in cell.curves.values() if c]
            if curves:
                width = min(len(c) for c in curves)
                mean = np.mean([c[:width] for c in curves], axis=0)
                ax.plot(range(1, width + 1), mean, color=color, marker="o", label=f"{row_label(row)} (n={len(curves)})")
                drawn = True
            ref = (cell.reference or {}).get("curve")
            if ref:
                ax.plot(range(1, len(ref) + 1), ref, color=color, linestyle="--", label=f"{row_label(row)}, reference")
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        ax.set(xlabel="task", ylabel="top-1 accuracy on the seen classes (%)", title=column_label(column, columns))
        ax.legend(fontsize=7)
        path = out / f"{name}_curves_{column[0]}{'' if len({b for _, b in columns}) == 1 else '_' + column[1]}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written


def write_table(table_def: Any, jobs: Sequence, out: Path, standin: bool = False) -> list[Path]:
    """Write ``out/<table>.md``, ``out/<table>.csv`` and the curves; returns the paths.

    Raises:
        ToolError: a file cannot be written.
    """
    table = collect(jobs, out)
    md, csv_path = out / f"{table_def.name}.md", out / f"{table_def.name}.csv"
    write_output(md, markdown(table_def, table, standin))
    write_output(csv_path, csv_text(table))
    return [md, csv_path, *plot_curves(table, out, table_def.name)]
