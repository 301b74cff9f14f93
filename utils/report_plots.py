"""The report's PNG plots (``utils/report.py``): top-1 curves per data set and accuracy matrices per cell."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from utils.runs import Collection, learner_title, method_order, ordered


def safe_name(text: str) -> str:
    """A file-name-safe version of a learner, method or data set name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text) or "_"


def _padded(rows: Sequence[Sequence[Optional[float]]], width: int) -> np.ndarray:
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        vals = [np.nan if v is None else v for v in row[:width]]
        out[i, : len(vals)] = vals
    return out


def _nan_mean_std(arr: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample std (ddof=1) over ``axis`` ignoring NaN; std is NaN where fewer than 2 values."""
    count = np.sum(~np.isnan(arr), axis=axis)
    total = np.nansum(arr, axis=axis)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    dev = np.where(np.isnan(arr), 0.0, arr - np.expand_dims(mean, axis)) ** 2
    var = np.where(count > 1, dev.sum(axis=axis) / np.maximum(count - 1, 1), np.nan)
    return mean, np.sqrt(var)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    return fig


def _save(fig, path: Path) -> None:
    """``fig.savefig(path)``; an OSError (read-only folder, full disk) carries ``path`` as its file name."""
    try:
        fig.savefig(path)
    except OSError as exc:
        if exc.filename is None:
            exc.filename = str(path)
        raise


def plot_curves(col: Collection, out_dir: Path) -> list[Path]:
    """Write ``curves_<dataset>.png`` per data set: one panel per learner (shared y axis), the mean top-1 curve
    over seeds per method (one colour per method in every panel), a light ± std band, the legend under each
    panel.

    Reads the complete runs' ``top1_curve``; returns the files written.
    """
    import matplotlib

    colours = matplotlib.colormaps["tab10"]
    all_methods = ordered({k[1] for k in col.cells}, method_order())
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
    written = []
    for dataset in col.datasets:
        learners = [learner for learner in col.learners
                    if any(col.cells.get((learner, m, dataset)) and col.cells[(learner, m, dataset)].runs
                           for m in col.methods(learner))]
        if not learners:
            continue
        n_lines = max(len(col.methods(learner)) for learner in learners)
        fig = _figure(5.2 * len(learners), 4.2 + 0.22 * ((n_lines + 1) // 2))
        axes = fig.subplots(1, len(learners), sharey=True, squeeze=False)[0]
        for ax, learner in zip(axes, learners):
            for method in col.methods(learner):
                cell = col.cells.get((learner, method, dataset))
                if cell is None or not cell.runs:
                    continue
                width = max(len(r.top1_curve) for r in cell.runs)
                mean, std = _nan_mean_std(_padded([r.top1_curve for r in cell.runs], width))
                x = np.arange(1, width + 1)
                k = all_methods.index(method)
                colour = colours(k % 10)
                ax.plot(x, mean, color=colour, marker=markers[k % len(markers)], markersize=3.5,
                        linestyle="-" if k < 10 else "--", label=f"{method} (n={len(cell.runs)})")
                if len(cell.runs) > 1:
                    band = np.nan_to_num(std)
                    ax.fill_between(x, np.clip(mean - band, 0, 100), np.clip(mean + band, 0, 100), color=colour,
                                    alpha=0.07, linewidth=0)
            ax.set_title(f"{learner_title(learner)}", fontsize=10)
            ax.set_xlabel("task")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
        axes[0].set_ylabel("top-1 accuracy on all seen classes (%)")
        fig.suptitle(f"{dataset}: top-1 accuracy after each task (mean, band ± std over seeds)", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"curves_{safe_name(dataset)}.png"
        _save(fig, path)
        written.append(path)
    return written


def plot_matrices(col: Collection, out_dir: Path) -> list[Path]:
    """Write ``matrix_<learner>_<method>_<dataset>.png`` per cell with complete runs: the mean accuracy matrix
    (row i = after task i, column j = task j's classes), lower triangle, values in the cells.

    Reads the complete runs' ``accuracy_matrix``; returns the files written.
    """
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")
    written = []
    for learner in col.learners:
        for method in col.methods(learner):
            for dataset in col.datasets:
                cell = col.cells.get((learner, method, dataset))
                if cell is None or not cell.runs:
                    continue
                size = max(len(r.accuracy_matrix) for r in cell.runs)
                if size == 0:
                    continue
                stack = np.full((len(cell.runs), size, size), np.nan)  # NaN pads matrices of other lengths
                for k, r in enumerate(cell.runs):
                    stack[k, : len(r.accuracy_matrix)] = _padded(r.accuracy_matrix, size)
                mean, _ = _nan_mean_std(stack)
                mean[np.triu_indices(size, k=1)] = np.nan
                side = min(max(4.5, 0.55 * size + 2.5), 18.0)
                fig = _figure(side + 0.8, side)
                ax = fig.add_subplot()
                image = ax.imshow(np.ma.masked_invalid(mean), cmap=cmap, vmin=0, vmax=100)
                fontsize = max(5.0, min(10.0, 130.0 / size))
                for i in range(size):
                    for j in range(i + 1):
                        v = mean[i, j]
                        ax.text(j, i, "–" if np.isnan(v) else f"{v:.1f}", ha="center", va="center",
                                fontsize=fontsize, color="white" if np.isnan(v) or v < 60 else "black")
                ticks = np.arange(size)
                step = max(1, size // 20)
                ax.set_xticks(ticks[::step], [str(t + 1) for t in ticks[::step]])
                ax.set_yticks(ticks[::step], [str(t + 1) for t in ticks[::step]])
                ax.set_xlabel("accuracy on task j's classes")
                ax.set_ylabel("after learning task i")
                n = len(cell.runs)
                ax.set_title(f"{learner_title(learner)} / {method} on {dataset}\naccuracy matrix (%), mean of "
                             f"{n} seed{'s' if n != 1 else ''}", fontsize=10)
                for spine in ax.spines.values():
                    spine.set_visible(False)
                fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="%")
                fig.tight_layout()
                path = out_dir / f"matrix_{safe_name(learner)}_{safe_name(method)}_{safe_name(dataset)}.png"
                _save(fig, path)
                written.append(path)
    return written
