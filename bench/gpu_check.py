"""One GPU check (issue 28): every figure docs/performance.md marks "not measured", in one command on one GPU.

Sections, each printing ``gpu_check.<figure>: <value> <unit>`` lines and a ``# <section>: N s`` line:

a. ``mask_share``: one MIST step at the official batch (B = 56, two views: 112 images) on ViT-B/16 at 224 px
   (random weights), timed by ``bench/mist_step.py`` itself, and the mask work's share of the step;
b. ``peak_memory``: ``torch.cuda.max_memory_allocated`` (MiB, reset before each run) of a one-task run
   (``stop_after_task = 0``) of the shipped paper config of every learner of ``LEARNERS`` with ``spr`` none and
   mist, and of every other preset of ``PRESETS`` in front of RanPAC, at the config's own batch size, on stand-in
   data with one epoch per phase (the epoch keys ``utils.smoke`` shrinks) and enough images for one full batch;
c. ``images_per_s``: from the same runs, images per second of each phase of the task: the tuning phase
   (``Learner.tune``, scoring pass included) and the host's training (``train_task``) count the training images
   their steps draw (a two-view step counts each image once), the head update the images it extracts features of,
   the evaluation the test images it predicts; each phase's wall time is taken around the learner's method, with
   the GPU synchronised at both ends. One-epoch runs of a few images include warm-up: lower bounds;
d. ``deterministic``: the same small run (RanPAC + MIST) once with ``deterministic: false`` and twice with
   ``true``, each in its own process (``main.py``; the cuBLAS workspace must be set before the first cuBLAS call):
   the ratio of the task's seconds and whether the two deterministic runs agree (``top1_curve`` and a SHA-256 of
   every tensor of the checkpoint's learner state);
e. ``paper_task``: task 0 of ``exps/ranpac/cifar.json`` as shipped (ViT-B/16 at 224 px, random weights, its
   batch, epochs and ``M``) on a few stand-in images per class: wall time and completion.

Every section catches its own failure (``gpu_check.<section>: FAILED <error>``) and the others still run; the exit
status is 1 if one failed. ``--shrink`` runs the same code paths CPU-sized (``tests/test_gpu_check.py``): the tiny
ViT of ``utils.smoke`` (width 32, two heads, 32 px) or, for the step, a two-block width-32 ViT on 224-px inputs at
B = 2, smoke's three images per class, ``M`` 64. Usage::

    .venv/bin/python bench/gpu_check.py                        # one GPU (cuda when available), about 6 minutes
    .venv/bin/python bench/gpu_check.py --shrink --device cpu  # the CPU form
    .venv/bin/python bench/run_all.py --gpu-check              # the same, through the bench runner
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence
from unittest import mock

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (str(REPO), str(HERE)):  # the project, and the sibling bench mist_step.py
    if _path not in sys.path:
        sys.path.insert(0, _path)

from gpu_check_runs import (  # noqa: E402 - after the path set-up above
    DATASET,
    MAIN_HOST,
    MAIN_SPR,
    PHASES,
    RunRecord,
    data_for,
    images_per_class,
    paper_configs,
    run_in_process_of_its_own,
    run_overrides,
    run_task0,
    shipped_index,
)

#: the step's shrunken backbone: timm kwargs of a two-block width-32 ViT-B/16 on mist_step's 224-px inputs
STEP_TINY = dict(embed_dim=32, depth=2, num_heads=2)
#: estimated seconds on one H100 (not measured: no GPU was available when this was written)
ESTIMATE_S = {"mask_share": 30, "peak_memory_per_run": 8, "deterministic_per_run": 25, "paper_task": 40}
#: the time the whole check should take on one GPU
TARGET_S = 480


def emit(figure: str, value: str) -> None:
    """Print one figure line, ``gpu_check.<figure>: <value>`` (value with its unit)."""
    print(f"gpu_check.{figure}: {value}", flush=True)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------
@dataclass
class Check:
    """The check's settings and what the sections share."""

    device: torch.device
    shrink: bool
    work: Path
    index: dict[tuple[str, str], Path] = field(default_factory=dict)
    records: dict[tuple[str, str], RunRecord] = field(default_factory=dict)
    failed: list[str] = field(default_factory=list)

    def main_config(self) -> Path:
        """The shipped config of RanPAC with MIST on CIFAR-100 (``exps/ranpac/cifar.json``)."""
        path = self.index.get((MAIN_HOST, MAIN_SPR))
        if path is None:
            raise LookupError(f"no shipped {DATASET} config of {MAIN_HOST} with spr {MAIN_SPR}")
        return path


def section_mask_share(check: Check) -> None:
    """a. ``bench/mist_step.py``'s step at B = 56 (112 images of 224 px, ViT-B/16; shrunken: a two-block width-32
    ViT, B = 2), run through its own ``main``; prints its step, fwd+bwd and mask times (ms) and the mask share."""
    import mist_step

    argv = ["mist_step.py", "--device", str(check.device)]
    argv += ["--quick", "--batch", "2", "--repeats", "1"] if check.shrink else ["--full"]
    patches = [mock.patch.object(sys, "argv", argv)]
    if check.shrink:
        patches.append(mock.patch.object(mist_step, "build_backbone",
                                         functools.partial(mist_step.build_backbone, **STEP_TINY)))
    captured = io.StringIO()
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        stack.enter_context(contextlib.redirect_stdout(captured))
        mist_step.main()
    lines = captured.getvalue().splitlines()
    figures = dict(m.groups() for m in (re.match(r"^mist_step\.(\S+): (\S+)", line) for line in lines) if m)
    print(next((line for line in lines if line.startswith("# mist_step")), "# mist_step: no header"), flush=True)
    batch = 2 if check.shrink else 56
    for name in ("mask.fast_ms", "mask.reference_ms", "fwd_bwd_ms", "step_ms"):
        emit(f"mask.{name.removeprefix('mask.')}", f"{figures[name]} ms")
    emit("mask_share", f"{figures['mask_share']} of a step (B={batch}, {2 * batch} images of 224 px"
                       f"{', two-block width-32 ViT' if check.shrink else ', ViT-B/16'})")


def section_peak_memory(check: Check) -> None:
    """b. Peak GPU memory (MiB) of a one-task run of each learner / preset at its shipped batch size (the CPU:
    ``n/a (cpu)``, the runs still made); keeps each run's record for section c. A failed run prints its own
    FAILED line and the others still run.

    Raises:
        RuntimeError: a run failed (after every run was tried).
    """
    failed = []
    for pc in paper_configs(check.index):
        figure = f"peak_mib.{pc.host}.{pc.spr}"
        try:
            data = data_for(pc.raw, check.shrink, check.work / "data")
            overrides = run_overrides(pc.raw, data, str(check.device), check.shrink)
            overrides["spr"] = pc.raw.get("spr", "none")
            record = run_task0(pc.path, overrides, check.work / "runs" / f"{pc.host}_{pc.spr}", check.device)
        except Exception as exc:  # noqa: BLE001 - every failure is reported, the other configs still run
            failed.append(figure)
            emit(figure, f"FAILED {type(exc).__name__}: {exc} ({pc.label})")
            traceback.print_exc(file=sys.stderr)
            continue
        check.records[(pc.host, pc.spr)] = record
        value = "n/a (cpu)" if record.peak_mib is None else f"{record.peak_mib:.0f} MiB"
        base = f", {record.base_mib:.0f} MiB allocated before" if record.base_mib else ""
        emit(figure, f"{value} ({pc.label}, batch {record.batch_size}, run {record.wall_s:.1f} s{base})")
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed: {', '.join(failed)}")


def section_images_per_s(check: Check) -> None:
    """c. Images per second of each phase of section b's runs (see the module docstring for what counts).

    Raises:
        RuntimeError: section b left no run.
    """
    if not check.records:
        raise RuntimeError("section peak_memory left no run to read")
    for (host, spr), record in check.records.items():
        for phase in PHASES.values():
            seconds, images = record.seconds.get(phase), record.images.get(phase, 0)
            figure = f"images_per_s.{host}.{spr}.{phase}"
            if seconds is None:
                if phase == "tuning" and spr != "none":  # e.g. a preset the learner's official code does not run
                    emit(figure, "n/a (no tuning phase ran in task 0)")
                continue
            if images == 0:
                emit(figure, f"n/a (no images in this phase; {seconds:.2f} s)")
                continue
            emit(figure, f"{images / max(seconds, 1e-9):.1f} images/s ({images} images in {seconds:.2f} s)")


def section_deterministic(check: Check) -> None:
    """d. The ``deterministic`` key's cost (ratio of task 0's seconds, deterministic over default) and whether two
    deterministic runs of RanPAC + MIST (one epoch per phase, shipped batch) agree bit for bit."""
    path = check.main_config()
    raw = json.loads(path.read_text())
    data = data_for(raw, check.shrink, check.work / "data")
    base = run_overrides(raw, data, str(check.device), check.shrink)
    runs = []
    for i, deterministic in enumerate((False, True, True)):
        start = time.perf_counter()
        results, checksum = run_in_process_of_its_own(path, {**base, "deterministic": deterministic},
                                                      check.work / "deterministic" / str(i))
        runs.append((deterministic, results, checksum, time.perf_counter() - start))
    task_s = [r[1]["tasks"][0]["seconds"] for r in runs]
    (_, default, default_sum, _), (_, first, first_sum, _), (_, second, second_sum, _) = runs
    emit("deterministic.task_s", f"{task_s[0]:.2f} / {task_s[1]:.2f} / {task_s[2]:.2f} s (default / deterministic "
                                 "x2; task 0 learn + evaluate, each run a process of its own)")
    emit("deterministic.run_s", " / ".join(f"{r[3]:.1f}" for r in runs) + " s (whole command, imports included)")
    emit("deterministic.time_ratio", f"{(task_s[1] + task_s[2]) / 2 / task_s[0]:.3f} x (deterministic / default, "
                                     f"{path.relative_to(REPO)}, one epoch per phase)")
    equal = first["top1_curve"] == second["top1_curve"] and first_sum == second_sum
    emit("deterministic_equal", f"{str(equal).lower()} (top1_curve {first['top1_curve']} / {second['top1_curve']},"
                                f" weights sha256 {first_sum} / {second_sum})")
    emit("deterministic.default_equal", f"{str(default_sum == first_sum).lower()} (the default run's weights "
                                        f"{default_sum} against the deterministic ones; information only)")


def section_paper_task(check: Check) -> None:
    """e. Task 0 of ``exps/ranpac/cifar.json`` with its own batch, epochs and ``M`` (shrunken: smoke's backbone,
    input and ``M``) on a few stand-in images per class: wall time, completion, peak memory."""
    path = check.main_config()
    raw = json.loads(path.read_text())
    data = data_for(raw, check.shrink, check.work / "data")
    overrides = run_overrides(raw, data, str(check.device), check.shrink, epochs_as_shipped=True)
    record = run_task0(path, overrides, check.work / "paper_task", check.device)
    from utils.config import load_config

    cfg = load_config(path, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
    emit("paper_task.wall_s", f"{record.wall_s:.1f} s ({path.relative_to(REPO)} task 0: {cfg.convnet_type} at "
                              f"{cfg.input_size} px, batch {cfg.batch_size}, mi_epochs {cfg.mi_epochs}, M {cfg.M}, "
                              f"{images_per_class(raw, check.shrink)} images per class)")
    emit("paper_task.completed", f"true (task 0 recorded, top1 {record.task['top1']:.1f}, task seconds "
                                 f"{record.task['seconds']:.1f})")
    emit("paper_task.peak_mib", "n/a (cpu)" if record.peak_mib is None else f"{record.peak_mib:.0f} MiB")


SECTIONS: Sequence[tuple[str, Callable[[Check], None]]] = (
    ("mask_share", section_mask_share), ("peak_memory", section_peak_memory),
    ("images_per_s", section_images_per_s), ("deterministic", section_deterministic),
    ("paper_task", section_paper_task))


def print_budget(check: Check, n_runs: int) -> None:
    """The estimated seconds of each section at full size on one H100 (estimates: :data:`ESTIMATE_S`)."""
    per = {"mask_share": ESTIMATE_S["mask_share"], "peak_memory": n_runs * ESTIMATE_S["peak_memory_per_run"],
           "images_per_s": 0, "deterministic": 3 * ESTIMATE_S["deterministic_per_run"],
           "paper_task": ESTIMATE_S["paper_task"]}
    print("# budget (estimated, full size on one H100): " + ", ".join(f"{k} {v} s" for k, v in per.items())
          + f" ({n_runs} one-task runs; images_per_s reads peak_memory's); total about {sum(per.values())} s of "
          f"{TARGET_S} s" + ("; this run is the shrunken CPU form" if check.shrink else ""), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run every section; 0 when all printed their figures, 1 when one failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shrink", action="store_true", help="CPU sizes: tiny ViTs, few images (the test's form)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stand-in data and run folders here")
    args = parser.parse_args(argv)
    from utils.runtime import logging_quieted

    with logging_quieted():  # the runs' logs go to their run folders; the figures are the output
        return _run_sections(args)


def _run_sections(args: argparse.Namespace) -> int:
    """Print every section's figures for the parsed arguments; 0 when all printed, 1 when one failed."""
    start = time.perf_counter()
    device = torch.device(args.device)
    if args.shrink:  # tiny ops run faster without thread hand-offs (the tests' setting, tests/conftest.py)
        torch.set_num_threads(1)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# gpu_check: device {device} ({name}), {'shrunken' if args.shrink else 'full size'}; "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        check = Check(device, args.shrink, args.keep or Path(tmp))
        try:
            check.index = shipped_index()
            print_budget(check, len(paper_configs(check.index)))
        except Exception as exc:  # noqa: BLE001 - reported; the sections that need the configs fail on their own
            emit("configs", f"FAILED {type(exc).__name__}: {exc}")
            check.failed.append("configs")
        for section, fn in SECTIONS:
            t0 = time.perf_counter()
            try:
                fn(check)
            except Exception as exc:  # noqa: BLE001 - every section reports its failure, the others still run
                check.failed.append(section)
                emit(section, f"FAILED {type(exc).__name__}: {exc}")
                traceback.print_exc(file=sys.stderr)
            print(f"# {section}: {time.perf_counter() - t0:.0f} s", flush=True)
    total = time.perf_counter() - start
    emit("total_s", f"{total:.0f} s (target on one GPU: under {TARGET_S} s)"
         + (f"; FAILED: {', '.join(check.failed)}" if check.failed else ""))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
