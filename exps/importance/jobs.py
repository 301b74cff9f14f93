"""The comparison protocol's jobs: one ``main.py`` process per config, skipped when its runs are complete, a few at a
time with a fixed thread count each (``exps/importance/protocol.py``)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from utils.results_file import RESULTS_NAME, InvalidResults, RunRecord, load_run

REPO = Path(__file__).resolve().parents[2]


class Job:
    """One ``main.py`` run: a config written to ``configs/<name>.json``, output in ``<stage>/<name>``."""

    def __init__(self, out: Path, stage: str, name: str, cfg: dict[str, Any]) -> None:
        self.stage, self.name, self.cfg = stage, name, cfg
        self.config_path = out / "configs" / f"{name}.json"
        self.run_dir = out / stage / name

    def results(self) -> dict[int, RunRecord]:
        """seed -> the newest complete run of this job's folder (read by the report tool, ``utils.report``)."""
        found: dict[int, RunRecord] = {}
        for path in self.run_dir.glob(f"**/{RESULTS_NAME}"):
            try:
                run = load_run(path)
            except InvalidResults:
                continue
            if run.complete and (run.seed not in found or run.newest_key > found[run.seed].newest_key):
                found[run.seed] = run
        return found

    def done(self) -> bool:
        return set(self.cfg["seed"]) <= set(self.results())

    def missing_seeds(self) -> list[int]:
        """The job's seeds without a complete run yet, in the job's order."""
        finished = self.results()
        return [seed for seed in self.cfg["seed"] if seed not in finished]

    def run(self, log, threads: int) -> bool:
        """Run the seeds that have no complete run yet (all of them the first time), so that an interrupted protocol
        keeps every seed it finished; a seed cut mid-run starts again. Returns whether ``main.py`` exited 0."""
        missing = self.missing_seeds()
        if not missing:
            log(f"{self.stage}/{self.name}: done before, skipped")
            return True
        if len(missing) < len(self.cfg["seed"]):
            log(f"{self.stage}/{self.name}: {len(self.cfg['seed']) - len(missing)} seed(s) done before; running "
                f"{missing}")
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps({**self.cfg, "seed": missing}, indent=1) + "\n")
        cmd = [sys.executable, str(REPO / "main.py"), "--config", str(self.config_path), "--output-dir",
               str(self.run_dir)]
        t0 = time.perf_counter()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        tail = proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr.strip() else ""
        log(f"{self.stage}/{self.name}: exit {proc.returncode} in {time.perf_counter() - t0:.0f} s "
            f"({shlex.join(cmd)}) {tail}")
        return proc.returncode == 0


def run_all(jobs: list[Job], workers: int, threads: int, log, report_only: bool = False) -> list[str]:
    """Run ``jobs`` on ``workers`` processes at a time, each with ``threads`` threads; returns the names of the failed
    ones (with ``report_only``, runs nothing and returns the unfinished ones)."""
    if report_only:
        return [j.name for j in jobs if not j.done()]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        ok = list(pool.map(lambda j: j.run(log, threads), jobs))
    return [j.name for j, good in zip(jobs, ok) if not good]


def lr_tag(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")
