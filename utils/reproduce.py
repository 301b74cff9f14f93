"""Reproduce a paper table with one command (issue 28): ``python -m utils.reproduce TABLE --out DIR``.

A table is the shipped configs that cover it, picked by what they compute (learner, ``spr``, data set, backbone),
not by a list: ``main`` (every host without and with MIST on the paper's five data sets, ViT-B/16 IN-21k),
``rivals`` (RanPAC and SimpleCIL with no tuning phase, MIST and every rival preset, same data sets), ``demo`` (the
EfficientNet-Lite0 Fashion-MNIST demos of ``exps/demo``) and ``demo_vit`` (the DINOv2 demos of ``exps/demo_vit``).

    python -m utils.reproduce main --out runs/main --plan       # what would run, what is done, data, cost
    python -m utils.reproduce main --out runs/main              # run what is missing, resume what is partial
    python -m utils.reproduce main --out runs/main --nproc 4    # each run on 4 GPUs through torchrun
    python -m utils.reproduce demo --out runs/demo --set device=cpu

Each (config, seed) runs in ``DIR/runs/<folder>/<name>/seed<seed>`` through ``main.py`` (a partial run is continued
with ``--resume``); failures are reported and the other runs go on. The table is then written to
``DIR/<table>.md``, ``DIR/<table>.csv`` and ``DIR/<table>_curves_<data set>.png`` (``utils/reproduce_table.py``).
``--standin`` runs every config small on stand-in data (``utils/smoke.py``'s sizes): the same path on a CPU, in
minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from utils.cli import ToolError, run_tool
from utils.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PAPER_DATASETS = ("cifar224", "cub", "imagenetr", "imageneta", "cars")
PAPER_BACKBONE = "pretrained_vit_b16_224_in21k"
#: the stated utilisation of the GPU-hour estimate: a fraction of an A100's dense TF32 peak (156 TFLOP/s)
PEAK_TFLOPS, UTILISATION = 156.0, 0.4


@dataclass(frozen=True)
class Table:
    """A table of the paper: its title and which shipped configs it holds (``select(rel, cfg)``)."""

    name: str
    title: str
    select: Callable[[str, Any], bool]


def _paper(cfg) -> bool:
    return cfg.dataset in PAPER_DATASETS and cfg.convnet_type == PAPER_BACKBONE


def _learner(cfg) -> str:
    from utils.registry import LEARNERS

    return LEARNERS.resolve(cfg.model_name)


TABLES = {t.name: t for t in (
    Table("main", "MIST's main table: each host without and with MIST (ViT-B/16 IN-21k)",
          lambda rel, cfg: _paper(cfg) and cfg.spr in ("none", "mist")),
    Table("rivals", "MIST and the rival tuning phases in front of RanPAC and SimpleCIL (ViT-B/16 IN-21k)",
          lambda rel, cfg: _paper(cfg) and _learner(cfg) in ("ranpac", "simplecil")),
    Table("demo", "The CPU demos: Fashion-MNIST, EfficientNet-Lite0 (exps/demo)",
          lambda rel, cfg: rel.startswith("exps/demo/")),
    Table("demo_vit", "The ViT demos: Fashion-MNIST, DINOv2 ViT-S/14 (exps/demo_vit)",
          lambda rel, cfg: rel.startswith("exps/demo_vit/")),
)}


@dataclass(frozen=True)
class Job:
    """One run of a table: a shipped config (``rel``, under ``root``) and one seed."""

    rel: str
    cfg: Any
    seed: int
    root: Path = REPO

    @property
    def learner(self) -> str:
        """The config's registered learner name (aliases resolved)."""
        return _learner(self.cfg)

    def folder(self, out: Path) -> Path:
        """Where this job's run folder lives: ``out/runs/<config folder>/<config name>/seed<seed>``."""
        path = Path(self.rel)
        return out / "runs" / path.parent.name / path.stem / f"seed{self.seed}"


@dataclass(frozen=True)
class State:
    """A job's progress in DIR: ``done``, ``partial`` (a run folder to resume) or ``missing``."""

    status: str
    run_dir: Optional[Path] = None
    results: Optional[Path] = None
    tasks_done: int = 0
    tasks_total: Optional[int] = None


def select_jobs(table: str, datasets: Sequence[str] = (), hosts: Sequence[str] = (), seeds: Sequence[int] = (),
                root: Path = REPO) -> list[Job]:
    """The table's jobs, filtered by data set and learner; ``seeds`` replaces each config's seed list.

    Raises:
        ToolError: an unknown table, data set or host name.
    """
    from utils.config import load_config
    from utils.ledger import shipped_configs
    from utils.registry import DATASETS, LEARNERS

    if table not in TABLES:
        raise ToolError(f"unknown table {table!r}; the tables are {', '.join(TABLES)}")
    for name, valid, what in ((datasets, DATASETS.names(), "--datasets"), (hosts, LEARNERS.names(), "--hosts")):
        bad = [n for n in name if n not in valid]
        if bad:
            raise ToolError(f"{what}: unknown name(s) {', '.join(bad)}; expected some of {', '.join(valid)}")
    jobs = []
    for rel in shipped_configs(root):
        cfg = load_config(root / rel)
        if not TABLES[table].select(rel, cfg):
            continue
        if (datasets and cfg.dataset not in datasets) or (hosts and _learner(cfg) not in hosts):
            continue
        jobs += [Job(rel, cfg, seed, root) for seed in (seeds or cfg.seed)]
    return jobs


def job_state(job: Job, out: Path) -> State:
    """The newest run of ``job`` under its folder: complete (done), another status (partial: resumable), none."""
    from utils.results_file import InvalidResults, load_run

    found = sorted(job.folder(out).glob("*/*/seed*/results.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        return State("missing")
    path = found[-1]
    try:
        run = load_run(path)
    except InvalidResults:
        return State("partial", path.parent.parent, path)
    status = "done" if run.complete else "partial"
    return State(status, path.parent.parent, path, run.tasks_done, run.tasks_total)


def data_presence(cfg: Any, cache: dict) -> tuple[bool, str, Optional[tuple[int, int]]]:
    """(present, the loader's message when not, (train, test) image counts when present) of a config's data set."""
    from utils.registry import DATASETS

    key = (cfg.dataset, str(Path(cfg.data_root).expanduser()))
    if key not in cache:
        try:
            train, test = DATASETS.get(cfg.dataset).load(Path(cfg.data_root).expanduser(), False)
            cache[key] = (True, "", (len(train.targets), len(test.targets)))
        except UserError as exc:
            cache[key] = (False, str(exc), None)
    return cache[key]


def plan_lines(jobs: Sequence[Job], out: Path, data_root: Optional[str] = None) -> list[str]:
    """The ``--plan`` report: one row per job (status, data, counted cost), the missing data sets' messages, totals
    and how the cost was counted."""
    from utils.reproduce_cost import NOMINAL_SIZES, backbone_cost, peak_bytes, run_work

    cache: dict = {}
    rows = ["| config | seed | learner | preset | data set | status | data | images trained / forward only | "
            "TFLOP | GPU-h | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    messages: dict[str, str] = {}
    total_flops = total_hours = 0.0
    for job in jobs:
        cfg = job.cfg if data_root is None else job.cfg.replace(data_root=data_root)
        state = job_state(job, out)
        present, message, sizes = data_presence(cfg, cache)
        if not present:
            messages.setdefault(cfg.dataset, message)
        counted = sizes or NOMINAL_SIZES.get(cfg.dataset)
        if counted is None:
            rows.append(f"| `{job.rel}` | {job.seed} | {job.learner} | {cfg.spr} | {cfg.dataset} | {state.status} | "
                        f"{'present' if present else 'MISSING'} | - | - | - | - |")
            continue
        work = run_work(cfg, *counted)
        cost = backbone_cost(cfg.convnet_type, cfg.input_size, json.dumps(cfg.backbone_kwargs, sort_keys=True))
        flops = work.flops(cost)
        hours = flops / (PEAK_TFLOPS * 1e12 * UTILISATION) / 3600
        total_flops += flops
        total_hours += hours
        status = state.status if state.status != "partial" else f"partial ({state.tasks_done}/{state.tasks_total})"
        rows.append(f"| `{job.rel}` | {job.seed} | {job.learner} | {cfg.spr} | {cfg.dataset} | {status} | "
                    f"{'present' if present else 'MISSING (nominal size)'} | {work.trained:,.0f} / "
                    f"{work.forward_only:,.0f} | {flops / 1e12:,.0f} | {hours:.3g} | "
                    f"{peak_bytes(cost, work) / 2**30:.2f} |")
    done = sum(job_state(j, out).status == "done" for j in jobs)
    lines = [*rows, "", f"{len(jobs)} runs: {done} done, {len(jobs) - done} to run or resume; "
             f"{total_flops / 1e15:,.1f} PFLOP, {total_hours:.3g} GPU-hours in all at {UTILISATION:.0%} of "
             f"{PEAK_TFLOPS:.0f} TFLOP/s (an A100's dense TF32 peak)."]
    for dataset, message in messages.items():
        lines += ["", f"data set {dataset} is missing: {message}"]
    from utils.reproduce_cost import __doc__ as how

    lines += ["", "How the cost is counted: " + " ".join(how.split("\n\n")[1].split())]
    return lines


def command(job: Job, state: State, out: Path, sets: Sequence[str], nproc: int) -> list[str]:
    """The ``main.py`` command that runs (missing) or continues (partial) ``job``."""
    launcher = [sys.executable] if nproc <= 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   f"--nproc_per_node={nproc}"]
    if state.status == "partial" and state.run_dir is not None:
        return [*launcher, str(REPO / "main.py"), "--resume", str(state.run_dir)]
    args = ["--config", str(job.root / job.rel), "--set", f"seed=[{job.seed}]", "--output-dir", str(job.folder(out))]
    return [*launcher, str(REPO / "main.py"), *args, *[a for s in sets for a in ("--set", s)]]


def standin_sets(job: Job, out: Path) -> list[str]:
    """``--standin``: the smoke runner's size overrides and stand-in data (``utils/smoke.py``) as ``--set`` items."""
    from utils import smoke

    raw = json.loads((job.root / job.rel).read_text())
    n = raw.get("init_cls", 10) + raw.get("increment", 10)
    data = out / "standin" / f"{raw.get('dataset', 'cifar224')}_{n}"
    if not data.exists():
        smoke.write_stand_in(raw.get("dataset", "cifar224"), n, data)
    return [f"{k}={json.dumps(v)}" for k, v in smoke.size_overrides(raw, data).items() if k != "seed"]


def run_jobs(jobs: Sequence[Job], out: Path, sets: Sequence[str], nproc: int, standin: bool) -> list[tuple[Job, int]]:
    """Run every job that is not done (resume the partial ones); returns the failed jobs with their exit status."""
    failed = []
    for i, job in enumerate(jobs, 1):
        state = job_state(job, out)
        if state.status == "done":
            print(f"[{i}/{len(jobs)}] {job.rel} seed {job.seed}: done", flush=True)
            continue
        extra = [*(standin_sets(job, out) if standin else []), *sets]
        cmd = command(job, state, out, extra, nproc)
        what = "resuming" if state.status == "partial" else "running"
        print(f"[{i}/{len(jobs)}] {job.rel} seed {job.seed}: {what}", flush=True)
        code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}).returncode
        if code != 0:
            failed.append((job, code))
            print(f"[{i}/{len(jobs)}] {job.rel} seed {job.seed}: FAILED (exit {code}); the others go on", flush=True)
    return failed


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; exit status 0, 1 when a run failed, 2 for bad arguments."""
    from utils.reproduce_table import write_table

    parser = argparse.ArgumentParser(prog="python -m utils.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("table", help=f"one of: {', '.join(TABLES)}")
    parser.add_argument("--out", type=Path, required=True, help="folder of the runs and the table")
    parser.add_argument("--plan", action="store_true", help="print what would run, what is done, data and cost")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs) per run, through torchrun")
    parser.add_argument("--datasets", nargs="*", default=[], help="only these data sets")
    parser.add_argument("--hosts", nargs="*", default=[], help="only these learners")
    parser.add_argument("--seeds", type=int, nargs="*", default=[], help="these seeds instead of each config's")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to every new run (e.g. device=cpu, data_root=/data)")
    parser.add_argument("--standin", action="store_true", help="small runs on stand-in data (the CPU path check)")
    parser.add_argument("--table-only", action="store_true", help="write the table from the runs in DIR; run nothing")
    parser.add_argument("--root", type=Path, default=REPO, help="the tree whose exps/ holds the configs (default: "
                                                                "this repository)")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        raise ToolError(f"--nproc is {args.nproc}; expected 1 or more")
    jobs = select_jobs(args.table, args.datasets, args.hosts, args.seeds, args.root)
    if not jobs:
        raise ToolError(f"table {args.table!r} has no config left after the filters")
    root = next((s.split("=", 1)[1] for s in args.sets if s.startswith("data_root=")), None)
    if args.plan:
        print(f"# {TABLES[args.table].title}: {len(jobs)} runs in {args.out}\n")
        print("\n".join(plan_lines(jobs, args.out, root)))
        return 0
    failed = [] if args.table_only else run_jobs(jobs, args.out, args.sets, args.nproc, args.standin)
    written = write_table(TABLES[args.table], jobs, args.out, standin=args.standin)
    print("wrote " + ", ".join(str(p) for p in written))
    if failed:
        print(f"{len(failed)} run(s) failed: " + "; ".join(f"{j.rel} seed {j.seed} (exit {c})" for j, c in failed),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
