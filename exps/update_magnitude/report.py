"""The update-magnitude experiment's outputs (``exps/update_magnitude/run.py``): the summary per regime, the paired
contrasts between regimes with Holm-adjusted p-values, results.json and results.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from exps.update_magnitude.setting import (
    ADAPTIVE,
    FROZEN,
    INITIALIZED,
    PAPER_TABLE_I,
    REGIMES,
    REINITIALIZED,
    Config,
    RunResult,
)
from utils.cli import write_output
from utils.contrasts import holm, paired


def summarise(runs: Sequence[RunResult]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per regime and metric: the per-seed values, their mean and sample std (ddof 1; 0 for one seed)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for regime in REGIMES:
        rows = [r for r in runs if r.regime == regime]
        if not rows:
            continue
        out[regime] = {}
        for key in ("avg_acc", "task_acc", "forgetting"):
            values = [r.metrics[key] for r in rows]
            out[regime][key] = {"values": values, "mean": float(np.mean(values)),
                                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}
    return out


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]], seeds: Sequence[int]) -> str:
    """Table I layout: rows Initialized / Frozen / Adaptive; ours (mean +- std) beside the paper's numbers."""
    def cell(regime: str, key: str) -> str:
        s = summary[regime][key]
        return f"{s['mean']:.2f} ± {s['std']:.2f}"

    lines = [f"| Method | Split Fashion-MNIST (ours, 5x2, seeds {', '.join(map(str, seeds))}) Avg.Acc / Forgetting "
             "| Task.Acc (ours) | Paper Split CIFAR-10 Avg.Acc / Forgetting | Paper Split P-MNIST Avg.Acc / Forgetting "
             "| Paper Split CIFAR-100 Task.Acc (Table II) |",
             "|---|---|---|---|---|---|"]
    for regime in REGIMES:
        if regime not in summary:
            continue
        paper = PAPER_TABLE_I.get(regime)
        theirs = ("- | - | -" if paper is None else f"{paper['cifar10'][0]:.2f} / {paper['cifar10'][1]:.2f} "
                  f"| {paper['pmnist'][0]:.2f} / {paper['pmnist'][1]:.2f} | {paper['cifar100_task_acc']:.2f}")
        lines.append(f"| {regime.capitalize()} | {cell(regime, 'avg_acc')} / {cell(regime, 'forgetting')} "
                     f"| {cell(regime, 'task_acc')} | {theirs} |")
    return "\n".join(lines) + "\n"


def _matrix_md(result: RunResult) -> str:
    rows = [f"| after task {i} | " + " | ".join("" if a is None else f"{a:.2f}" for a in row) + " |"
            for i, row in enumerate(result.acc_matrix)]
    head = "| | " + " | ".join(f"task {k}" for k in range(len(result.acc_matrix))) + " |"
    return "\n".join([head, "|---" * (len(result.acc_matrix) + 1) + "|"] + rows) + "\n"


#: the planned paired contrasts between regimes (same seed: same network at the start, same task 0, same data order)
CONTRASTS = ((ADAPTIVE, INITIALIZED), (ADAPTIVE, FROZEN), (FROZEN, INITIALIZED), (REINITIALIZED, FROZEN),
             (REINITIALIZED, INITIALIZED))


def contrasts(runs: Sequence[RunResult]) -> dict[str, list[dict[str, Any]]]:
    """Per metric, the planned contrasts of :data:`CONTRASTS` over the seeds both regimes ran: paired mean
    difference, 95% t interval, p-value and Holm-adjusted p-value within the metric's family
    (``utils.contrasts``)."""
    by = {(r.regime, r.seed): r for r in runs}
    out = {}
    for key in ("avg_acc", "task_acc", "forgetting"):
        cs = []
        for a, b in CONTRASTS:
            seeds = sorted(s for (g, s) in by if g == a and (b, s) in by)
            if seeds:
                cs.append(paired(f"{a} - {b}", [by[a, s].metrics[key] for s in seeds],
                                 [by[b, s].metrics[key] for s in seeds]))
        out[key] = [c.__dict__ for c in holm(cs)]
    return out


def contrasts_md(found: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Markdown table of :func:`contrasts`."""
    lines = ["| contrast | n | Δ Avg.Acc [95% CI] | Holm p | Δ Task.Acc [95% CI] | Holm p "
             "| Δ Forgetting [95% CI] | Holm p |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(c: dict[str, Any]) -> str:
        ci = "" if c["low"] is None else f" [{c['low']:+.2f}, {c['high']:+.2f}]"
        p = "-" if c["holm"] is None else ("< 0.001" if c["holm"] < 0.001 else f"{c['holm']:.3f}")
        return f"{c['mean']:+.2f}{ci} | {p}"

    for i, c in enumerate(found["avg_acc"]):
        lines.append(f"| {c['name']} | {c['n']} | {cell(c)} | {cell(found['task_acc'][i])} | "
                     f"{cell(found['forgetting'][i])} |")
    return lines


def write_outputs(out: Path, cfg: Config, tau: float, calibration: dict[str, list[float]],
                  runs: Sequence[RunResult], wall_s: float) -> dict[str, Any]:
    """Write ``results.json`` and ``results.md`` into ``out``; returns the JSON object.

    Raises:
        ToolError: ``out`` or a file in it cannot be written.
    """
    summary = summarise(runs)
    payload = {"config": {**asdict(cfg), "seeds": list(cfg.seeds)},
               "reconstruction": "see exps/update_magnitude/README.md",
               "calibration": {"seed": cfg.calibration_seed, "similarities": calibration, "tau": tau},
               "runs": [asdict(r) for r in runs], "summary": summary, "contrasts": contrasts(runs),
               "paper_table_i": PAPER_TABLE_I, "wall_time_s": wall_s}
    write_output(out / "results.json", json.dumps(payload, indent=2) + "\n")
    md = ["# Update magnitude on Split Fashion-MNIST (reconstruction of arXiv 2602.20796, algorithms.md §14)", "",
          f"train/class {cfg.train_per_class}, test/class {cfg.test_per_class or 'all'}, epochs {cfg.epochs}, "
          f"SGD lr {cfg.lr} momentum {cfg.momentum}, batch {cfg.batch_size}; wall time {wall_s:.0f} s.", "",
          f"Calibration seed {cfg.calibration_seed}: tau = {tau:.4f} (median of the pooled cosines, task 1 once; "
          + "; ".join(f"{k}-probe {[round(s, 4) for s in v]}" for k, v in calibration.items()) + ").", "",
          markdown_table(summary, cfg.seeds), "## Paired contrasts (same seed; Holm within each metric)", "",
          *contrasts_md(payload["contrasts"]), "", "## Adaptive gate per seed", ""]
    for r in runs:
        if r.regime == ADAPTIVE:
            md.append(f"- seed {r.seed}: " + ", ".join(
                f"t{t} {g}" + ("" if s is None else f" (cos {s:+.4f})") for t, (g, s) in
                enumerate(zip(r.regimes, r.similarities))))
    md += ["", "## Accuracy matrices (%, row i = after task i)", ""]
    for r in runs:
        md += [f"### {r.regime}, seed {r.seed}", "", _matrix_md(r)]
    write_output(out / "results.md", "\n".join(md))
    return payload
