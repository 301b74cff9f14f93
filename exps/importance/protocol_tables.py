"""The comparison protocol's tables (issues 15 and 25): per arm the accuracies, what the arm did to the backbone and to
the old classes, the planned paired contrasts with Holm-corrected p-values, the smallest detectable effect, and the
informativeness rule.

**Informative** (issue 25): a table can show differences between tuning methods only if moving the backbone changes
what the host sees. The reference is dense CE fine-tuning at its calibrated rate: the table is informative when, on
the reported seeds, its paired change of the old-class accuracy against no tuning has a 95% interval that excludes 0
and a mean of at least ``min_old`` points (default 1.0), or its mean old-class feature drift (cosine distance of the
old classes' test-set mean features, ``models/drift.py``) is at least ``min_drift`` (default 1e-3). Otherwise it is
marked **NOT informative**. (Before issue 25 the rule was a relative weight change of at least 1e-3 per task, which
says nothing about the host: a run can move by 8.5e-5 and lose 21 points.)
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from utils.contrasts import Contrast, detectable_effect, holm, paired

#: the per-run values a table reads (``utils.report.RunRecord.values``), by short name
VALUES = {"a_bar": "average_accuracy", "a_last": "last_accuracy", "forgetting": "forgetting",
          "old": "old_class_accuracy", "a_tt": "a_tt", "drift": "feature_drift", "embed": "embedding_share",
          "moved": "moved_fraction", "change": "relative_change", "wall": "wall_seconds"}
#: contrasts besides "arm - none", when both arms ran: (a, b, why)
EXTRA_CONTRASTS = (("mist", "mist_random", "MIST's scores against random scores at the same rate"),
                   ("mist_noembed", "mist", "what excluding the embeddings changes"),
                   ("mist_noembed", "mist_random_noembed", "MIST's scores against random scores, both without the "
                    "embeddings"),
                   ("mist", "ce_finetune", "sparse MIST against dense fine-tuning"),
                   ("piece_f", "piece_s", "PIECE-F against PIECE-S"))
#: the metrics with a Holm family each: A_B and A-bar (every planned contrast), then the verdicts' old-class accuracy,
#: forgetting and new-task accuracy
FAMILIES = (("a_last", "A_B"), ("a_bar", "A-bar"), ("old", "old-class accuracy"), ("forgetting", "forgetting"),
            ("a_tt", "new-task accuracy A_tt"))
DENSE = "ce_finetune"


def metrics(run) -> dict[str, float]:
    """A run's values under :data:`VALUES`' short names (0 for a tuning measure of a run without one, None for a value
    the run does not have)."""
    v = run.values
    out = {short: v.get(key) for short, key in VALUES.items()}
    for short in ("moved", "change"):
        out[short] = out[short] or 0.0
    return out


def ci(c: Optional[Contrast]) -> str:
    """``+m [lo, hi]`` (or ``+m`` with one seed; ``-`` when the contrast was not computed)."""
    if c is None:
        return "-"
    return f"{c.mean:+.2f}" if c.low is None else f"{c.mean:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"


def pv(p: Optional[float]) -> str:
    """A p-value for a table; ``-`` where no test was made (one seed, or every paired difference equal)."""
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def informative(rows: dict, seeds: list[int], min_old: float, min_drift: float) -> tuple[Optional[bool], str]:
    """The rule of the module docstring: (True / False / None when dense fine-tuning did not run, the sentence)."""
    dense = [s for s in seeds if s in rows.get(DENSE, {}) and s in rows.get("none", {})]
    if not dense:
        return None, "Dense CE fine-tuning did not run: informativeness unknown."
    pairs = [(metrics(rows[DENSE][s])["old"], metrics(rows["none"][s])["old"]) for s in dense]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    old = paired("ce - none", [a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
    drifts = [metrics(rows[DENSE][s])["drift"] for s in dense]
    drift = float(np.mean(drifts)) if drifts and None not in drifts else None
    by_old = old is not None and old.low is not None and (old.low > 0 or old.high < 0) and abs(old.mean) >= min_old
    by_drift = drift is not None and drift >= min_drift
    verdict = by_old or by_drift
    text = (f"Dense CE fine-tuning (the reference) changed the old-class accuracy by {ci(old)} points against no "
            f"tuning (paired, n = {old.n if old else 0}) and drifted the old classes' features by "
            f"{'-' if drift is None else f'{drift:.2e}'} (cosine distance): "
            + ("**informative**" if verdict else "**NOT informative**")
            + f" (rule: |Δ old-class accuracy| >= {min_old:g} with a 95% interval excluding 0, or drift >= "
              f"{min_drift:g}).")
    return verdict, text


def by_last_lambda(rows: dict, arms: list[str], seeds: list[int]) -> dict[float, list[float]]:
    """RanPAC with fixed lambdas: the last task's ridge lambda -> |Δ A_B| of every (arm, seed) pair against ``none``
    (points). A small lambda makes the ridge solve rounding-sensitive (``ridge_rho``, models/ridge.py), so a tiny
    change of the features can move the head's predictions a lot; this shows whether the table's spread comes from
    there. Empty for a table without ``ridge_lambdas_by_seed``."""
    out: dict[float, list[float]] = {}
    for a in arms:
        for s in seeds:
            if s not in rows.get(a, {}) or s not in rows.get("none", {}):
                continue
            lambdas = ((getattr(rows[a][s], "config", None) or {}).get("ridge_lambdas_by_seed") or {}).get(str(s))
            x, y = metrics(rows[a][s])["a_last"], metrics(rows["none"][s])["a_last"]
            if lambdas and x is not None and y is not None:
                out.setdefault(float(lambdas[-1]), []).append(abs(x - y))
    return out


def contrasts(rows: dict, arms: list[str], seeds: list[int]) -> dict[str, list[Contrast]]:
    """Per family of :data:`FAMILIES`: every arm against ``none`` and the :data:`EXTRA_CONTRASTS`, each over the seeds
    both arms finished with a value, Holm-adjusted within the family (a contrast without a test does not count)."""
    done = {a: [s for s in seeds if s in rows.get(a, {})] for a in ["none", *arms]}
    family = [(a, "none") for a in arms] + [(a, b) for a, b, _ in EXTRA_CONTRASTS if a in arms and b in done]
    out: dict[str, list[Contrast]] = {}
    for metric, _ in FAMILIES:
        cs = []
        for a, b in family:
            both = [(metrics(rows[a][s])[metric], metrics(rows[b][s])[metric]) for s in done[a] if s in done[b]]
            both = [(x, y) for x, y in both if x is not None and y is not None]
            if both:
                cs.append(paired(f"{a} - {b}", [x for x, _ in both], [y for _, y in both]))
        out[metric] = holm(cs)
    return out


def table(rows: dict[str, dict[int, Any]], arms: list[str], seeds: list[int], lrs: dict[str, float],
          labels: dict[str, str], title: str, min_old: float = 1.0, min_drift: float = 1e-3
          ) -> tuple[list[str], dict]:
    """Markdown lines and the JSON summary of one table (one learner, one lambda mode).

    Args:
        rows: arm -> seed -> the run (``utils.report.RunRecord``); ``"none"`` is the untuned host.
        arms: the compared arms in row order; seeds: the reported seeds; lrs: each arm's rate; labels: row names.
    """
    lines = [f"### {title}", ""]
    done = {a: [s for s in seeds if s in rows.get(a, {})] for a in ["none", *arms]}
    common = [s for s in seeds if all(s in done[a] for a in done)]
    verdict, rule = informative(rows, seeds, min_old, min_drift)
    found = contrasts(rows, arms, seeds)
    by_name = {metric: {c.name: c for c in cs} for metric, cs in found.items()}
    lines += [f"Seeds with every arm: {len(common)} of {len(seeds)}. {rule}", "",
              "| arm | lr | n | A-bar | A_B | forgetting | old-class acc. | A_tt | feature drift (x1e-3) | "
              "embeddings' share % | moved % | rel. change | wall s | Δ A_B [95% CI] | Holm p | Δ A-bar [95% CI] | "
              "Holm p |", "|---" * 17 + "|"]
    summary: dict[str, Any] = {"arms": {}, "contrasts": {}}

    def mean_sd(values: list) -> tuple[Optional[float], float]:
        values = [v for v in values if v is not None]
        if not values:
            return None, 0.0
        return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0

    def fmt(values: list, scale: float = 1.0, digits: int = 2, sd: bool = True) -> str:
        m, s = mean_sd(values)
        if m is None:
            return "-"
        return f"{scale * m:.{digits}f}" + (f" ± {scale * s:.{digits}f}" if sd else "")

    for a in ["none", *arms]:
        vals = [metrics(rows[a][s]) for s in done[a]]
        if not vals:
            continue
        col = {k: [v[k] for v in vals] for k in vals[0]}
        c_last, c_bar = by_name["a_last"].get(f"{a} - none"), by_name["a_bar"].get(f"{a} - none")
        lines.append(f"| {labels.get(a, a)} | {'' if lrs.get(a) is None else f'{lrs[a]:g}'} | {len(vals)} | "
                     f"{fmt(col['a_bar'])} | {fmt(col['a_last'])} | {fmt(col['forgetting'])} | {fmt(col['old'])} | "
                     f"{fmt(col['a_tt'])} | {fmt(col['drift'], 1e3, 3)} | {fmt(col['embed'], 100, 1, False)} | "
                     f"{fmt(col['moved'], 100, 2, False)} | {mean_sd(col['change'])[0]:.1e} | "
                     f"{fmt(col['wall'], 1, 0, False)} | {ci(c_last)} | {pv(c_last.holm if c_last else None)} | "
                     f"{ci(c_bar)} | {pv(c_bar.holm if c_bar else None)} |")
        summary["arms"][a] = {"lr": lrs.get(a), **{k: mean_sd(v)[0] for k, v in col.items()},
                              **{f"{k}_sd": mean_sd(v)[1] for k, v in col.items()}}
    for metric, cs in found.items():
        summary["contrasts"][metric] = [c.__dict__ for c in cs]
    lines.append("")
    for a, b, why in EXTRA_CONTRASTS:
        name = f"{a} - {b}"
        if name not in by_name["a_last"]:
            continue
        parts = [f"Δ {label} {ci(by_name[m].get(name))} "
                 f"(Holm {pv(by_name[m][name].holm if name in by_name[m] else None)})"
                 for m, label in FAMILIES if name in by_name[m]]
        lines.append(f"- {labels.get(a, a)} − {labels.get(b, b)} ({why}): " + "; ".join(parts) + ".")
    for metric, label in FAMILIES[:2]:
        sds = [c.sd for c in found[metric] if c.sd is not None]
        if sds:
            med = float(np.median(sds))
            n = max((c.n for c in found[metric]), default=0)
            m_family = max(sum(1 for c in found[metric] if c.p is not None), 1)
            mde, mde1 = detectable_effect(med, n, alpha=0.05 / m_family), detectable_effect(med, n)
            lines.append(f"- Smallest detectable effect on {label} (80% power, paired t, n = {n}, median sd of the "
                         f"paired differences {med:.2f}): {mde:.2f} points at Holm's first step (α = 0.05/{m_family}), "
                         f"{mde1:.2f} at α = 0.05 uncorrected.")
            summary[f"detectable_{metric}"] = {"median_sd": med, "holm_first_step": mde, "uncorrected": mde1,
                                               "family_size": m_family}
            # per contrast: one with small paired spread can detect much less than the median says
            each = {c.name: detectable_effect(c.sd, c.n, alpha=0.05 / m_family) for c in found[metric]
                    if c.sd is not None and c.p is not None}
            if each:
                named = ["{} − {}".format(*(labels.get(x, x) for x in n.split(" - "))) for n in each]
                lines.append(f"- Per contrast, smallest detectable effect on {label} at Holm's first step: "
                             + "; ".join(f"{n} {v:.2f}" for n, v in zip(named, each.values())) + ".")
                summary[f"detectable_{metric}"]["per_contrast"] = each
    spread = by_last_lambda(rows, arms, seeds)
    if spread:
        lines.append("- |Δ A_B| against none by the seed's last-task ridge lambda (fixed; a small lambda makes the "
                     "head rounding-sensitive): " + "; ".join(
                         f"lambda {lam:g}: median {np.median(v):.2f}, max {max(v):.2f} ({len(v)} arm-seed pairs)"
                         for lam, v in sorted(spread.items())) + ".")
        summary["abs_delta_a_last_by_last_lambda"] = {str(k): v for k, v in sorted(spread.items())}
    summary.update({"seeds": common, "informative": verdict, "informative_rule": rule})
    return lines + [""], summary
