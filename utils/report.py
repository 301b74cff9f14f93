"""Collect the results.json files of many runs into a paper-style table (Markdown + CSV) and PNG plots.

Usage::

    python -m utils.report RUNS_DIR [RUNS_DIR ...] --out DIR

Every ``results.json`` under the given folders (searched recursively; the layout written by trainer.py is
``<output_dir>/<model_name>_<spr>_<dataset>/<timestamp>/seed<seed>/results.json``) is read. A run is
identified by (learner, method, dataset, seed): the learner is ``config.model_name`` without its ``_mist``
alias suffix (``ranpac``/``ranpac_mist`` -> RanPAC, ``simplecil``/``simplecil_mist`` -> SimpleCIL), the
method is ``config.spr`` (``none`` = no tuning phase), followed by the composition keys that replace a part
of the preset and the preset's own keys set to a non-default value, e.g. ``mist (importance="random")``,
``magnitude_gate (gate_threshold=0.05)``. Written into DIR:

- ``table.md``: one table per metric (rows grouped by learner, one column per data set), each cell
  ``mean ± sample std (n=seeds)``; the paired differences of each method from the same learner's ``none``
  runs (per seed, so the same class order: Ā, A_B, forgetting); then the incomplete runs, the duplicate runs that were
  ignored, the files that could not be read, the runs used, and the plots.
- ``table.csv``: long format, one row per (learner, method, dataset, metric) with mean, std, n, the seeds
  and their values, and the number of seeds that have only incomplete runs.
- ``curves_<dataset>.png``: top-1 accuracy after each task, one line per learner/method (mean over seeds,
  band = ± sample std).
- ``matrix_<learner>_<method>_<dataset>.png``: the accuracy matrix (mean over seeds), lower triangle, with
  the values written in the cells.

Rules: only runs whose status is ``complete`` are averaged; the others are listed as incomplete and counted
apart. When several results.json describe the same (learner, method, dataset, seed), the newest complete
one is used (newest = latest ``YYYYmmdd-HHMMSS[-n]`` run-folder stamp in its path, then latest file
modification time) and the others are listed as duplicates. A file that is not valid JSON or lacks the
keys a report needs is skipped with a warning (on stderr and in table.md).

Exit status: 0 written; 2 bad input (a folder that does not exist, no results.json found, no valid file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from utils.report_plots import plot_curves, plot_matrices
from utils.report_tables import markdown, write_csv
from utils.runs import Collection, ReportError, collect, find_results


def build_report(dirs: Sequence[Path], out_dir: Path, command: str = "") -> tuple[Collection, list[Path]]:
    """Read the runs under ``dirs`` and write table.md, table.csv and the PNGs into ``out_dir`` (created).

    Returns:
        (what was read, the files written).

    Raises:
        ReportError: see :func:`collect`; or ``out_dir`` cannot be created, or a file in it cannot be written
            (read-only folder, full disk: the message names the file and the cause).
    """
    col = collect(dirs)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"--out {out_dir}: cannot create the folder ({exc.strerror or exc}).") from None
    try:
        plots = plot_curves(col, out_dir) + plot_matrices(col, out_dir)
        (out_dir / "table.md").write_text(markdown(col, plots, command), encoding="utf-8")
        write_csv(col, out_dir / "table.csv")
    except OSError as exc:
        target = exc.filename or out_dir
        raise ReportError(f"--out {out_dir}: cannot write {target} ({exc.strerror or exc}); is the folder writable "
                          "and the disk not full?") from None
    return col, [out_dir / "table.md", out_dir / "table.csv", *plots]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``python -m utils.report`` (``argv`` None: ``sys.argv[1:]``): ``runs``, ``out``,
    ``against_ledger``. argparse exits with status 2 on bad arguments, or when ``--out`` is missing without
    ``--against-ledger``."""
    parser = argparse.ArgumentParser(
        prog="python -m utils.report",
        description="Summarise the results.json files under RUNS_DIR(s): table.md, table.csv and PNG plots.")
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUNS_DIR",
                        help="folder(s) searched recursively for results.json (e.g. runs)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="folder the report is written to (required unless --against-ledger)")
    parser.add_argument("--against-ledger", action="store_true",
                        help="print each run's per-task curve beside the reference of the shipped config it ran "
                             "(exps/ledger.json, docs/results.md) instead of writing a report")
    args = parser.parse_args(argv)
    if args.out is None and not args.against_ledger:
        parser.error("--out DIR is required (or give --against-ledger)")
    return args


def against_ledger(dirs: Sequence[Path]) -> int:
    """``--against-ledger``: 0 when every complete run has a reference; 2 when one has none, a results.json cannot be
    used (one ``warning: skipped FILE: why`` line each on stderr; the other runs are still compared) or nothing was
    found."""
    from utils.ledger import LedgerError, against

    found = find_results(dirs)
    if not found:
        print(f"error: no results.json under {', '.join(map(str, dirs))}", file=sys.stderr)
        return 2
    try:
        lines, missing, skipped = against(found)
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, why in skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    print("\n".join(lines))
    return 2 if missing or skipped else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line; returns 0 when the report is written from every results.json found, 2 on bad input (one
    ``error:`` line on stderr) or when some files were skipped.

    A skipped file gets one ``warning: skipped FILE: why`` line on stderr (and is listed in table.md); the report of
    the other runs is still written, and the exit status is 2 so that a script notices.
    """
    args = parse_args(argv)
    if args.against_ledger:
        try:
            return against_ledger(args.runs)
        except ReportError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    command = "python -m utils.report " + " ".join([*map(str, args.runs), "--out", str(args.out)])
    try:
        col, written = build_report(args.runs, args.out, command)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, why in col.skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    incomplete = sum(1 for r in col.runs if not r.complete)
    print(f"report: {sum(len(c.runs) for c in col.cells.values())} complete "
          f"run(s) used, {incomplete} incomplete, {len(col.duplicates)} duplicate(s), {len(col.skipped)} skipped; "
          f"wrote {len(written)} files to {args.out}")
    for path in written:
        print(f"  {path}")
    return 2 if col.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
