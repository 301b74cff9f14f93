"""The results ledger (issue 15): what every shipped config is expected to give, and where the number comes from.

``exps/ledger.json`` holds, for every ``exps/*/*.json`` config, either a reference (A-bar, A_last, the per-task
curve when known, its source: a paper, an official log or our run; the seeds, backbone tag and timm version) or the
reason there is none. ``docs/results.md`` is generated from it (``python -m utils.ledger --write-docs``; a test
checks that it is current). ``python -m utils.report RUN --against-ledger`` prints each run of RUN beside the
reference of the shipped config it was run from (:func:`against`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
LEDGER = REPO / "exps" / "ledger.json"
DOCS = REPO / "docs" / "results.md"
KINDS = ("paper", "official_log", "our_run")
#: config keys that do not change what a run computes, or that a user sets for the machine: not compared when a
#: run is matched to a shipped config
IGNORED_KEYS = {"seed", "device", "data_root", "num_workers", "progress", "prefix", "eval_batch_size", "download",
                "pretrained_path", "weights_path", "output_dir", "stop_after_task", "config", "verify_images",
                "check_replicas"}


class LedgerError(ValueError):
    """A ledger that does not cover the shipped configs, or a run that matches none of them."""


def load(path: Optional[Path] = None) -> dict[str, Any]:
    """The ledger, checked: every config it names exists, every reference has a known ``kind``, a source and at
    least one of A-bar / A_last, a curve (when given) ends at A_last and averages to A-bar (to 0.01).

    Raises:
        LedgerError: a malformed entry (the message names the config).
    """
    path = path or LEDGER
    data = json.loads(path.read_text())
    check(data, path)
    return data


def check(data: dict[str, Any], path: Optional[Path] = None) -> None:
    """The checks of :func:`load` on a ledger's content.

    Raises:
        LedgerError: a malformed entry (the message names the config).
    """
    path = path or LEDGER
    for config, entry in data["configs"].items():
        ref = entry.get("reference")
        if ref is None:
            if not entry.get("why_none"):
                raise LedgerError(f"{path}: {config} has neither a reference nor a why_none")
            continue
        if ref.get("kind") not in KINDS or not ref.get("source"):
            raise LedgerError(f"{path}: {config}: kind must be one of {KINDS} and a source given")
        if ref.get("a_bar") is None and ref.get("a_last") is None:
            raise LedgerError(f"{path}: {config}: a reference needs a_bar or a_last")
        curve = ref.get("curve")
        if curve:
            if ref.get("a_last") is not None and abs(curve[-1] - ref["a_last"]) > 0.01:
                raise LedgerError(f"{path}: {config}: curve ends at {curve[-1]}, a_last is {ref['a_last']}")
            if ref.get("a_bar") is not None and abs(sum(curve) / len(curve) - ref["a_bar"]) > 0.01:
                raise LedgerError(f"{path}: {config}: the curve's mean is not a_bar {ref['a_bar']}")


def shipped_configs(root: Optional[Path] = None) -> list[str]:
    """Every shipped config, as ``exps/<folder>/<name>.json`` (the ledger file itself excluded)."""
    root = root or REPO
    return sorted(str(p.relative_to(root)) for p in (root / "exps").glob("*/*.json"))


def resolved(path: Path) -> dict[str, Any]:
    """A shipped config with every key it does not set at its default (``load_config(path).to_dict()``).

    Raises:
        ConfigError: the file does not load.
    """
    from utils.config import load_config

    return load_config(path).to_dict()


def match(run_config: dict[str, Any], ledger: dict[str, Any], root: Optional[Path] = None) -> Optional[str]:
    """The shipped config a run's config came from, compared on the resolved configs (defaults filled in, so a run
    that overrides a key the shipped file leaves at its default, e.g. ``hard_freeze: true``, is not that config's
    run): every key but ``IGNORED_KEYS`` has the same value, keys the run does not record (written by an older
    version) aside. None when no shipped config matches."""
    root = root or REPO
    for config in ledger["configs"]:
        path = root / config
        if not path.is_file():
            continue
        shipped = resolved(path)
        if all(run_config[k] == v for k, v in shipped.items() if k not in IGNORED_KEYS and k in run_config):
            return config
    return None


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def against(results: Sequence[Path], ledger: Optional[dict] = None, root: Optional[Path] = None
            ) -> tuple[list[str], int, list[tuple[Path, str]]]:
    """Lines comparing each complete results.json with its shipped config's reference, per task; how many runs had no
    reference (no matching config, or a config whose reference is None); and the files that could not be read, with
    why (each read by the report tool's ``utils.report.load_run``, which checks every value it uses: a truncated file
    or a value of the wrong type is skipped, the other runs are still compared)."""
    from utils.results_file import InvalidResults, load_run

    ledger = ledger or load()
    lines, missing, skipped = [], 0, []
    for path in results:
        try:
            run = load_run(path)
        except InvalidResults as exc:
            skipped.append((path, str(exc)))
            continue
        if not run.complete:
            lines.append(f"{path}: not complete (status {run.status!r}); skipped")
            continue
        config = match(run.config, ledger, root)
        if config is None:
            missing += 1
            lines.append(f"{path}: its config matches no shipped config (exps/*/*.json); no reference")
            continue
        entry = ledger["configs"][config]
        ref = entry.get("reference")
        if ref is None:
            missing += 1
            lines.append(f"{path}: run of {config}; no reference: {entry['why_none']}")
            continue
        lines.append(f"{path}: run of {config} (seed {run.seed}) against {ref['kind']}: {ref['source']}")
        if ref.get("seeds") and len(ref["seeds"]) > 1:
            lines.append(f"  note: the reference is the mean over seeds {ref['seeds']}; compare the mean of your runs "
                         "of those seeds (python -m utils.report)")
        if ref.get("seeds") and run.seed not in ref["seeds"]:
            lines.append(f"  note: the reference is for seed(s) {ref['seeds']}; seed {run.seed} has another "
                         "class order")
        want = ref.get("curve") or []
        lines.append("  | task | this run | reference | difference |")
        lines.append("  |---|---|---|---|")
        for t, got in enumerate(run.top1_curve):
            r = want[t] if t < len(want) else None
            lines.append(f"  | {t} | {got:.2f} | {_fmt(r)} | {'-' if r is None else f'{got - r:+.2f}'} |")
        for label, got, r in (("A-bar", run.values["average_accuracy"], ref.get("a_bar")),
                              ("A_last", run.values["last_accuracy"], ref.get("a_last"))):
            lines.append(f"  | {label} | {got:.2f} | {_fmt(r)} | {'-' if r is None else f'{got - r:+.2f}'} |")
    return lines, missing, skipped


def markdown(ledger: dict[str, Any]) -> str:
    """docs/results.md from the ledger."""
    lines = ["# Results ledger", "", "Generated from `exps/ledger.json` by `python -m utils.ledger --write-docs`; edit "
             "the JSON, not this file. `python -m utils.report RUN --against-ledger` prints a run beside its row.", "",
             "Metrics: " + "; ".join(f"**{k}**: {v}" for k, v in ledger["metrics"].items()) + ".", "",
             "## Configs with a reference", "",
             "| config | A-bar | A_last | kind | seeds | backbone | timm | source | notes |",
             "|---|---|---|---|---|---|---|---|---|"]
    without = []
    for config, entry in ledger["configs"].items():
        ref = entry.get("reference")
        if ref is None:
            without.append((config, entry["why_none"]))
            continue
        seeds = "any" if not ref.get("seeds") else ", ".join(map(str, ref["seeds"]))
        notes = ref.get("notes") or ""
        if ref.get("curve"):
            notes = (notes + " Curve: " + ", ".join(f"{v:.2f}" for v in ref["curve"]) + ".").strip()
        lines.append(f"| `{config}` | {_fmt(ref.get('a_bar'))} | {_fmt(ref.get('a_last'))} | {ref['kind']} | {seeds} | "
                     f"{ref['backbone']} | {ref['timm']} | {ref['source']} | {notes} |")
    lines += ["", "## Published numbers for hosts not shipped yet", "",
              "| would be | A-bar | A_last | issue | source |", "|---|---|---|---|---|"]
    for p in ledger.get("pending", []):
        lines.append(f"| `{p['config']}` | {_fmt(p['a_bar'])} | {_fmt(p['a_last'])} | {p['issue']} | {p['source']} |")
    lines += ["", f"## Configs without a reference ({len(without)})", "", "| config | why |", "|---|---|"]
    lines += [f"| `{c}` | {why} |" for c, why in without]
    return "\n".join(lines) + "\n"


def add(ledger: dict[str, Any], config: str, why_none: Optional[str] = None,
        reference: Optional[dict[str, Any]] = None, replace: bool = False,
        root: Optional[Path] = None) -> dict[str, Any]:
    """``ledger`` with an entry for the shipped config ``config`` (``exps/<folder>/<name>.json``): a reference (kind,
    source, a_bar and/or a_last, seeds, backbone, timm, curve, notes) or the reason there is none.

    Raises:
        LedgerError: the file is not a shipped config that loads, the entry exists (without ``replace``), both or
            neither of ``why_none`` and ``reference`` are given, or the reference is incomplete.
    """
    from utils.errors import ConfigError

    root = root or REPO
    path = root / config
    if config not in shipped_configs(root) or not path.is_file():
        raise LedgerError(f"{config}: not a shipped config (expected exps/<folder>/<name>.json under {root})")
    try:
        resolved(path)
    except ConfigError as exc:
        raise LedgerError(f"{config} does not load: {exc}") from None
    if config in ledger["configs"] and not replace:
        raise LedgerError(f"{config} has an entry already; give --replace to overwrite it")
    if (why_none is None) == (reference is None):
        raise LedgerError("give either --why-none or a reference (--kind, --source and --a-bar and/or --a-last)")
    entry = {"reference": None, "why_none": why_none} if reference is None else {"reference": reference}
    candidate = {**ledger, "configs": dict(sorted({**ledger["configs"], config: entry}.items()))}
    check(candidate)
    return candidate


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: print or write docs/results.md, or ``--add`` an entry; exit 0, or 2 for a bad entry or a
    shipped config without one."""
    parser = argparse.ArgumentParser(prog="python -m utils.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-docs", action="store_true", help=f"regenerate {DOCS.relative_to(REPO)}")
    parser.add_argument("--add", metavar="CONFIG", help="add an entry for a shipped config (exps/<folder>/<name>.json) "
                                                        "and regenerate the docs")
    parser.add_argument("--why-none", help="--add: why the config has no reference number")
    parser.add_argument("--kind", choices=KINDS, help="--add: the reference's kind")
    parser.add_argument("--source", help="--add: where the reference number comes from (paper table, log, run)")
    parser.add_argument("--a-bar", type=float, help="--add: the reference's A-bar (%%)")
    parser.add_argument("--a-last", type=float, help="--add: the reference's A_last (%%)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="--add: the reference's seeds")
    parser.add_argument("--backbone", default="", help="--add: the reference's backbone")
    parser.add_argument("--timm", default=None, help="--add: the timm version of the reference run")
    parser.add_argument("--curve", type=float, nargs="*", default=None, help="--add: the per-task curve (%%)")
    parser.add_argument("--notes", default="", help="--add: notes")
    parser.add_argument("--replace", action="store_true", help="--add: overwrite an existing entry")
    args = parser.parse_args(argv)
    try:
        ledger = load()
        if args.add:
            reference = None if args.kind is None else {
                "kind": args.kind, "source": args.source, "seeds": args.seeds, "backbone": args.backbone,
                "timm": args.timm, "a_bar": args.a_bar, "a_last": args.a_last, "curve": args.curve,
                "notes": args.notes}
            config = Path(args.add).resolve()
            config = str(config.relative_to(REPO.resolve())) if config.is_relative_to(REPO.resolve()) else args.add
            ledger = add(ledger, config, args.why_none, reference, args.replace)
            LEDGER.write_text(json.dumps(ledger, indent=1, ensure_ascii=False) + "\n")
            print(f"added {args.add} to {LEDGER}")
            args.write_docs = True
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    missing = sorted(set(shipped_configs()) - set(ledger["configs"]))
    if missing and args.add:  # adding entries one at a time: say what is left, but the entry is written
        print(f"note: {LEDGER}: still no entry for {', '.join(missing)} (add each with --add)", file=sys.stderr)
    elif missing:
        print(f"error: {LEDGER}: no entry for {', '.join(missing)}", file=sys.stderr)
        return 2
    if args.write_docs:
        DOCS.write_text(markdown(ledger))
        print(f"wrote {DOCS}")
    else:
        print(markdown(ledger))
    return 0


if __name__ == "__main__":
    sys.exit(main())
