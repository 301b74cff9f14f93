"""The task loop: for each seed and task, learn, evaluate, log the official lines and write results.json.

Only this module iterates over tasks. Output layout (never overwritten)::

    <output_dir>/<model_name>_<spr>_<dataset>/<YYYYmmdd-HHMMSS>/seed<seed>/
        config.json    resolved config, library versions, git commit
        <model_name>_<spr>_<dataset>_seed<seed>.log
        results.json   per-task accuracies, accuracy matrix, A-bar, A_B, forgetting, A_tt (rewritten after each task)
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones import backbone_mean_std, build_backbone
from models import build_learner
from models.base import TaskData
from utils.config import ExperimentConfig
from utils.data_manager import DataManager
from utils.datasets import default_norm, load_source
from utils.metrics import grouped_accuracy, summarize, task_accuracies, topk_accuracy
from utils.runtime import OFFICIAL_TORCH_SEED, resolve_device, seed_torch, setup_logging

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
    """``<model_name>_<spr>_<dataset>``, the official log-name stem (SPEC 8.5)."""
    return f"{cfg.model_name}_{cfg.spr}_{cfg.dataset}"


def _unique_dir(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    candidate.mkdir(parents=True)
    return candidate


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None  # NaN (e.g. accuracy over an empty class range) is not valid JSON
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: Path, data: Any) -> None:
    """Write strict JSON atomically (NaN becomes null; a crash mid-write never leaves a truncated file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False))
    tmp.replace(path)


def run(cfg: ExperimentConfig, output_dir: Path) -> list[Path]:
    """Run every seed of ``cfg`` one after another.

    Returns:
        The results.json path of each seed.
    """
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = _unique_dir(Path(output_dir) / run_name(cfg) / stamp)
    return [run_seed(cfg, seed, run_dir / f"seed{seed}") for seed in cfg.seed]


def _data_manager(cfg: ExperimentConfig, seed: int) -> DataManager:
    if cfg.use_input_norm is None:
        norm = default_norm(cfg.dataset)
    else:
        norm = backbone_mean_std(cfg.convnet_type) if cfg.use_input_norm else None
    source = load_source(cfg.dataset, cfg.data_root, cfg.input_size, norm, cfg.download,
                         cfg.train_per_class, cfg.test_per_class)
    return DataManager(source, cfg.shuffle, seed, cfg.init_cls, cfg.increment)


def run_seed(cfg: ExperimentConfig, seed: int, out: Path) -> Path:
    """One full class-incremental run for ``seed``; results.json is rewritten after every task.

    Raises:
        UserError subclasses for missing data/weights or a bad device, before any training.
    """
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(out / f"{run_name(cfg)}_seed{seed}.log")
    resolved = {**cfg.to_dict(), "seed": seed}
    for key, value in resolved.items():
        logger.info("%s: %s", key, value)
    write_json(out / "config.json", {"config": resolved, "seeds": cfg.seed, "environment": environment_info()})

    data = _data_manager(cfg, seed)  # data first: a missing data set fails in seconds
    device = resolve_device(cfg.device)
    seed_torch(seed if cfg.seed_torch_with_seed else OFFICIAL_TORCH_SEED, cfg.allow_tf32)
    backbone = build_backbone(cfg.convnet_type, cfg.pretrained, cfg.weights_path, cfg.input_size, **cfg.backbone_kwargs)
    learner = build_learner(cfg, backbone, device, seed)

    results: dict[str, Any] = {"config": resolved, "seed": seed, "class_order": data.class_order,
                               "task_sizes": data.increments, "device": str(device), "tasks": [],
                               "top1_curve": [], "top5_curve": [], "att_curve": [], "accuracy_matrix": [],
                               "complete": False}
    ranges = [data.task_classes(t) for t in range(data.nb_tasks)]
    for t in range(data.nb_tasks):
        known, seen = ranges[t]
        total, trainable = learner.count_parameters()
        logger.info("All params: %d", total)
        logger.info("Trainable params: %d", trainable)
        start = time.perf_counter()
        task = TaskData(t, known, seen, data.n_classes,
                        train=data.get_dataset(range(known, seen), "train", "train"),
                        train_eval=data.get_dataset(range(known, seen), "train", "test"),
                        test=data.get_dataset(range(0, seen), "test", "test"))
        report = learner.learn_task(task)
        y_topk, y_true = learner.predict(task.test)
        seconds = time.perf_counter() - start
        _record_task(results, t, (known, seen), y_topk, y_true, ranges[: t + 1], report, seconds)
        write_json(out / "results.json", results)
    results["complete"] = True
    write_json(out / "results.json", results)
    return out / "results.json"


def _record_task(results: dict, t: int, classes: tuple[int, int], y_topk: np.ndarray, y_true: np.ndarray,
                 ranges: list, report: dict, seconds: float) -> None:
    """Compute one task's metrics, log the official lines (SPEC 8.2) and append them to ``results``."""
    known, seen = classes
    grouped = grouped_accuracy(y_topk[:, 0], y_true, nb_old=known, increment=10)
    top1, top5 = grouped["total"], topk_accuracy(y_topk, y_true)
    row = task_accuracies(y_topk[:, 0], y_true, ranges)
    results["top1_curve"].append(top1)
    results["top5_curve"].append(top5)
    results["att_curve"].append(grouped["new"])
    results["accuracy_matrix"].append(row)
    results["tasks"].append({"task": t, "classes": [known, seen], "top1": top1, "top5": top5, "grouped": grouped,
                             "old": grouped["old"], "new": grouped["new"], "task_accuracies": row,
                             "seconds": round(seconds, 3), **report})
    results.update(summarize(results["top1_curve"], results["att_curve"], results["accuracy_matrix"]))
    logger.info("No NME accuracy.")
    logger.info("CNN: %s", grouped)
    logger.info("Att_curve: %s", results["att_curve"])
    logger.info("CNN top1 curve: %s", results["top1_curve"])
    logger.info("CNN top5 curve: %s\n", results["top5_curve"])
    logger.info("Average Accuracy (CNN): %s", results["average_accuracy"])
    logger.info("Last Average Accuracy: %s", results["last_accuracy"])
    logger.info("A_tt: %s", results["a_tt"])
    logger.info("Accuracy matrix row (task %d): %s; forgetting: %s; task time %.1f s", t, row,
                results["forgetting"], seconds)

