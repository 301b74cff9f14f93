"""The task loop: for each seed and task, learn, evaluate, log the official lines and write results.json.

Only this module iterates over tasks. Output layout (never overwritten)::

    <output_dir>/<model_name>_<spr>_<dataset>/<YYYYmmdd-HHMMSS>/seed<seed>/
        config.json    resolved config, library versions, git commit, GPU, TF32 and determinism settings
        <model_name>_<spr>_<dataset>_seed<seed>.log
        results.json   status, per-task accuracies, accuracy matrix, A-bar, A_B, forgetting, A_tt (after each task)
        checkpoint.pt  what the rest of the run needs (--resume), rewritten atomically after each task
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from backbones import backbone_mean_std
from models import build_learner
from models.base import TaskData
from utils import distributed
from utils.checkpoints import CHECKPOINT_NAME, CheckpointUnreadable, load_checkpoint, read_checkpoint, save_checkpoint  # noqa: F401
from utils.config import ExperimentConfig, config_from_dict, inactive_keys, load_config, parse_override
from utils.data_identity import differences, source_identity
from utils.data_manager import DataManager
from utils.datasets import DataIntegrityError, default_norm, load_source
from utils.errors import CheckpointError, ConfigError, RunStopped, UserError  # noqa: F401 (RunStopped re-exported)
from utils.registry import LEARNERS
from utils.results_file import record_task, write_json
from utils.run_folder import (
    OutputError,
    RunLock,
    check_checkpoint_meta,
    check_seed_folders,
    config_fingerprint,
    move_aside,
    remove_stale_temporaries,
    seed_complete,
)
from utils.runtime import OFFICIAL_TORCH_SEED, log_traceback, resolve_device, runtime_info, seed_torch, setup_logging
from utils.tensorboard_log import open_events

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parent


def environment_info() -> dict[str, Any]:
    """Library versions and the git commit of this checkout (for config.json)."""
    import timm
    import torchvision

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True,
                                    timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "cuda": torch.version.cuda,
            "git_commit": commit, "git_dirty": dirty}


def run_name(cfg: ExperimentConfig) -> str:
    """``<model_name>_<spr>_<dataset>``, the official log-name stem (algorithms.md §8.5)."""
    return f"{cfg.model_name}_{cfg.spr}_{cfg.dataset}"


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def run(cfg: ExperimentConfig, output_dir: Path) -> list[Path]:
    """Run every seed of ``cfg`` one after another in a new run folder (locked while it runs: ``RUN/.lock``).

    Returns:
        The results.json path of each seed.

    Raises:
        RunStopped: ``stop_after_task`` was reached (the run folder can be resumed).
        OutputError: the run folder cannot be created or written.
    """
    setup_processes(cfg)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = None
    if distributed.is_main():
        target = Path(output_dir) / run_name(cfg) / stamp
        try:
            run_dir = _unique_dir(target)
        except OSError as exc:
            raise OutputError(f"--output-dir {output_dir}: cannot create the run folder {target} "
                              f"({exc.strerror or exc}); nothing was written.") from None
    run_dir = distributed.broadcast_object(run_dir)  # torchrun: rank 0 names the folder
    with RunLock(run_dir, enabled=distributed.is_main()):
        return [run_seed(cfg, seed, run_dir / f"seed{seed}") for seed in cfg.seed]


RESUMABLE_KEYS = ("device", "num_workers", "progress", "eval_batch_size", "stop_after_task", "verify_images")


def resume(run_dir: Path, overrides: Sequence[str] = ()) -> list[Path]:
    """Continue a run folder written by :func:`run` after its last completed task, seed by seed.

    The config is the one saved in the folder (``seed*/config.json``); ``overrides`` may change only keys
    that do not affect the results (``RESUMABLE_KEYS``). Seeds already complete are kept as they are.

    Raises:
        ConfigError: the folder holds no run, or an override changes a key that affects the results.
    """
    run_dir = Path(run_dir)
    seed_dirs = sorted(p.parent for p in run_dir.glob("seed*/config.json"))
    if not seed_dirs:
        if (run_dir / "config.json").is_file():  # a seed folder was given
            seed_dirs, run_dir = [run_dir], run_dir.parent
        else:
            raise ConfigError(f"--resume {run_dir}: no seed*/config.json there; expected a run folder written by "
                              "main.py (e.g. runs/<name>/<timestamp>).")
    try:
        saved = json.loads((seed_dirs[0] / "config.json").read_text())
        raw = {k: v for k, v in saved["config"].items() if k != "seed"}
        raw["seed"] = saved["seeds"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--resume {run_dir}: {seed_dirs[0] / 'config.json'} cannot be read as a saved run config "
                          f"({type(exc).__name__}: {exc}).") from None
    for item in overrides:
        key, _ = parse_override(item)
        if key not in RESUMABLE_KEYS:
            raise ConfigError(f"--set {item}: '{key}' cannot change when resuming (it affects the results); only "
                              f"{', '.join(RESUMABLE_KEYS)} can.")
    cfg = config_from_dict(raw, str(seed_dirs[0] / "config.json"))
    check_seed_folders(run_dir, seed_dirs, saved, cfg.seed, fingerprint(cfg))
    for item in overrides:  # validated as on the command line, one key at a time
        key, _ = parse_override(item)
        cfg = dataclasses.replace(cfg, **{key: getattr(load_config(None, [item]), key)})
    setup_processes(cfg)
    paths = []
    with RunLock(run_dir, enabled=distributed.is_main()):
        for seed in cfg.seed:
            out = run_dir / f"seed{seed}"
            if seed_complete(out / "results.json", fingerprint(cfg)):
                logger.info("seed %d is complete; kept as it is", seed)
                paths.append(out / "results.json")
                continue
            paths.append(run_seed(cfg, seed, out, resume=True))
    return paths


def fingerprint(cfg: ExperimentConfig) -> str:
    """The run's :func:`~utils.run_folder.config_fingerprint`: every key but ``RESUMABLE_KEYS``, and the seeds."""
    return config_fingerprint(cfg.to_dict(), cfg.seed, RESUMABLE_KEYS)


def setup_processes(cfg: ExperimentConfig) -> torch.device:
    """Resolve the device and, under torchrun, join the process group (gloo on CPU, NCCL on GPUs).

    Raises:
        ConfigError: a bad device, or a global batch smaller than the number of processes.
    """
    device = resolve_device(cfg.device, distributed.local_rank() if distributed.launched() else None)
    distributed.init(device.type)
    if cfg.batch_size < distributed.world_size():
        raise ConfigError(f"key 'batch_size' is {cfg.batch_size} but torchrun started {distributed.world_size()} "
                          "processes; the global batch must hold at least one image per process.")
    return device


def _data_manager(cfg: ExperimentConfig, seed: int) -> DataManager:
    if cfg.use_input_norm is None:
        norm = default_norm(cfg.dataset)
    else:
        norm = backbone_mean_std(cfg.convnet_type) if cfg.use_input_norm else None
    source = load_source(cfg.dataset, cfg.data_root, cfg.input_size, norm, cfg.download,
                         cfg.train_per_class, cfg.test_per_class, verify_images=cfg.verify_images)
    return DataManager(source, cfg.shuffle, seed, cfg.init_cls, cfg.increment)


def warn_config(cfg: ExperimentConfig) -> None:
    """Warn, at the start of a run (its log and stderr), about keys that have no effect: a key of a learner the run
    does not use or a tuning preset's key that ``spr`` does not read (``utils.config.inactive_keys``), and a
    ``*_mist`` learner name with ``spr`` none."""
    for unread in inactive_keys(cfg):
        logger.warning("Config key '%s' = %r has no effect: it belongs to %s, and %s.", unread.key,
                       getattr(cfg, unread.key), unread.owner, unread.why)
    if cfg.model_name.endswith("_mist") and cfg.spr == "none":
        logger.warning("model_name '%s' names the learner with MIST, but spr is 'none': no tuning phase runs (set spr, "
                       "e.g. 'mist', or use '%s').", cfg.model_name, LEARNERS.resolve(cfg.model_name))


def run_seed(cfg: ExperimentConfig, seed: int, out: Path, resume: bool = False) -> Path:
    """One full class-incremental run for ``seed``; results.json and a checkpoint are rewritten after every task.

    results.json carries ``status``: ``running`` while the run goes, then ``complete``, ``failed`` (with
    ``error``; the traceback is in the log) or ``interrupted`` (Ctrl-C, SIGTERM, ``stop_after_task``). A resume refused
    before its checkpoint is accepted (a foreign or altered checkpoint, missing data) leaves results.json as it was.

    Args:
        resume: continue after the last task saved in ``out/checkpoint.pt`` (a fresh start if there is none).

    Raises:
        UserError subclasses for missing data/weights or a bad device, before any training; RunStopped;
        KeyboardInterrupt; any failure of the run (after recording it).
    """
    main = distributed.is_main()  # torchrun: only rank 0 writes the log, results.json and checkpoints
    log_file = out / f"{run_name(cfg)}_seed{seed}.log"
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
        setup_logging(log_file if main else None, level=logging.INFO if main else logging.WARNING)
    except OSError as exc:
        raise OutputError(f"cannot write the run folder {out} ({exc.strerror or exc}); no log or results.json was "
                          "written.") from None
    if main:
        remove_stale_temporaries(out)
    resolved = {**cfg.to_dict(), "seed": seed}
    for key, value in resolved.items():
        logger.info("%s: %s", key, value)
    warn_config(cfg)
    fresh: dict[str, Any] = {"config": resolved, "seed": seed, "status": "running", "complete": False,
                             "fingerprint": fingerprint(cfg), "tasks": [], "top1_curve": [], "top5_curve": [],
                             "att_curve": [], "accuracy_matrix": []}
    results = dict(fresh)
    if resume and (out / "results.json").is_file():  # keep what the stopped run wrote, whatever happens next
        try:
            results = {**json.loads((out / "results.json").read_text()), "status": "running"}
        except (OSError, ValueError):
            pass
    checkpoint = out / CHECKPOINT_NAME
    write = write_json if main else (lambda path, data: None)
    written = False
    events = None
    try:
        device = setup_processes(cfg)  # before any data loads: a bad device fails in a second
        try:
            if not (resume and (out / "config.json").is_file()):
                write(out / "config.json", {"config": resolved, "seeds": cfg.seed, "environment": environment_info(),
                                            "runtime": runtime_info(device, cfg)})
            if not resume:  # a resumed seed's results.json stays as it was until its checkpoint is accepted
                write(out / "results.json", results)
        except OSError as exc:
            raise OutputError(f"cannot write {exc.filename or out} ({exc.strerror or exc}); the run did not start.") \
                from None
        written = not resume
        data = _data_manager(cfg, seed)
        _check_data(data, results, resume, out)
        if cfg.stop_after_task is not None and cfg.stop_after_task >= data.nb_tasks - 1:
            logger.warning("stop_after_task = %d: the run has %d tasks (0-%d), so it does not stop early.",
                           cfg.stop_after_task, data.nb_tasks, data.nb_tasks - 1)
        seed_torch(seed if cfg.seed_torch_with_seed else OFFICIAL_TORCH_SEED, cfg.allow_tf32, cfg.deterministic)
        learner = build_learner(cfg, device, seed)
        first = 0
        if resume:
            results, first = _restore(checkpoint, learner, out, fresh, results, seed, data)
            try:
                write(out / "results.json", results)
            except OSError as exc:
                raise OutputError(f"cannot write {exc.filename or out} ({exc.strerror or exc}); the run did not "
                                  "resume.") from None
            written = True
        results.update({"class_order": data.class_order, "task_sizes": data.increments, "device": str(device)})
        events = open_events(cfg, learner, out, results) if main else None
        ranges = [data.task_classes(t) for t in range(data.nb_tasks)]
        for t in range(first, data.nb_tasks):
            _run_task(learner, data, t, ranges, results)
            if cfg.check_replicas:
                distributed.check_replicas(learner.parameters(), f"task {t}")
            if events is not None:
                events.task(t, results)
                results["tensorboard_steps"] = events.counters()
            write(out / "results.json", results)
            if main:
                save_checkpoint(checkpoint, learner, results, t + 1)
            distributed.barrier()
            if cfg.stop_after_task is not None and t == cfg.stop_after_task and t + 1 < data.nb_tasks:
                raise RunStopped(f"stopped after task {t} (stop_after_task); continue with --resume {out.parent}")
        results["status"], results["complete"] = "complete", True
        write(out / "results.json", results)
        return out / "results.json"
    except (KeyboardInterrupt, RunStopped) as exc:
        results["status"] = "interrupted"
        results["error"] = str(exc) or type(exc).__name__
        _record_end(write, out, results, written)
        raise
    except BaseException as exc:
        results["status"], results["error"] = "failed", f"{type(exc).__name__}: {exc}"
        # until a resumed seed's checkpoint is accepted, a refusal (UserError) leaves results.json as it was
        _record_end(write, out, results, written or (resume and not isinstance(exc, UserError)))
        if not isinstance(exc, UserError):
            log_traceback(exc)
        raise
    finally:
        if events is not None:
            events.close()


def _check_data(data: DataManager, results: dict, resume: bool, out: Path) -> None:
    """Record the data's identity (``utils.data_identity``) in ``results`` on a fresh start; on a resume, refuse data
    that differ from what the run started with (deleted, added or replaced images).

    Raises:
        DataIntegrityError: the data changed since the run started; the message says how.
    """
    now = source_identity(data.source)
    then = results.get("data")
    if resume and then is not None and then != now:
        raise DataIntegrityError(f"--resume {out.parent}: the data changed since the run started "
                                 f"({'; '.join(differences(then, now))}); restore them or start a new run.")
    results["data"] = now


def _record_end(write, out: Path, results: dict, written: bool) -> None:
    """Write the final status into results.json when the run got as far as writing it (a second write error, e.g. a
    full disk, is logged and does not hide the first one)."""
    if not written:
        return
    try:
        write(out / "results.json", results)
    except OSError as exc:
        logger.error("could not record status %r in %s (%s)", results.get("status"), out / "results.json",
                     exc.strerror or exc)


def _restore(checkpoint: Path, learner, out: Path, fresh: dict, results: dict, seed: int,
             data: DataManager) -> tuple[dict, int]:
    """Where a resumed seed continues: after the checkpoint's last task, or from task 0 when the checkpoint is
    missing or unreadable, with the partial results.json (and the unreadable checkpoint) moved aside, never
    appended to.

    Returns:
        (results so far, index of the next task).

    Raises:
        CheckpointError: a readable checkpoint of another run, config, seed or class order, or an altered one.
    """
    if checkpoint.is_file():
        try:
            state = read_checkpoint(checkpoint)
        except CheckpointUnreadable as exc:
            broken = move_aside(checkpoint, "unreadable") if distributed.is_main() else None
            partial = move_aside(out / "results.json", "partial") if distributed.is_main() else None
            logger.warning("%s; it was moved to %s and the partial results to %s; seed %d restarts from task 0.", exc,
                           broken, partial, seed)
            return dict(fresh), 0
        check_checkpoint_meta(checkpoint, state, fresh["fingerprint"], seed, data.class_order, data.nb_tasks)
        restored, first = load_checkpoint(checkpoint, learner, state)
        restored["status"] = "running"
        logger.info("Resumed from %s after task %d", checkpoint, first - 1)
        return restored, first
    if results.get("tasks"):
        partial = move_aside(out / "results.json", "partial") if distributed.is_main() else None
        logger.warning("seed %d has no checkpoint (%s) but its results.json holds %d task(s): they were moved to %s "
                       "and the seed restarts from task 0.", seed, checkpoint, len(results["tasks"]), partial)
    return dict(fresh), 0


def _run_task(learner, data: DataManager, t: int, ranges: list, results: dict) -> None:
    """Learn and evaluate task ``t``, log the official lines and append its metrics to ``results``."""
    known, seen = ranges[t]
    total, trainable = learner.count_parameters()
    logger.info("All params: %d", total)
    logger.info("Trainable params: %d", trainable)
    start = time.perf_counter()
    task = TaskData(t, known, seen, data.n_classes,
                    train=data.get_dataset(range(known, seen), "train", "train"),
                    train_eval=data.get_dataset(range(known, seen), "train", "test"),
                    test=data.get_dataset(range(0, seen), "test", "test"))
    if learner.drift is not None:
        learner.drift.start()
    report = learner.learn_task(task)
    y_topk, y_true = learner.predict(task.test)
    seconds = time.perf_counter() - start
    if learner.drift is not None:  # after the task's seconds: a measurement, not part of the method's cost
        drift = report["drift"] = learner.drift.finish(task)
        embeddings = drift["groups"].get("embeddings", {}).get("share")
        logger.info("Drift of task %d: relative change %.3g%s; old-class feature drift %s", t, drift["relative_change"],
                    "" if embeddings is None else f", embeddings' share of the squared change {embeddings:.3f}",
                    "-" if drift["old_class_feature_drift_mean"] is None
                    else f"{drift['old_class_feature_drift_mean']:.4g} (cosine distance of test-set class means)")
    record_task(results, t, (known, seen), y_topk, y_true, ranges[: t + 1], report, seconds)
