"""Every shipped config run end to end, small (issue 26): ``python -m utils.smoke [CONFIG ...]``.

Each ``exps/*/*.json`` runs with its own learner, tuning preset and keys for two tasks, on stand-in data written in
its data set's on-disk format (CIFAR-100's pickles, Fashion-MNIST's IDX files, an ImageFolder tree for CUB,
ImageNet-R, ImageNet-A and Cars) with ``init_cls + increment`` classes of a few 32-pixel images, and on a shrunken
backbone of the same family (the config's timm ViT or DINOv2 ViT-S/14 with its real depth, width 32, two heads, no
pretrained weights; EfficientNet-Lite0 as it is, with its packaged weights). Only the keys of :data:`SIZE_KEYS` are
changed, so a config that would fail for any other reason (a key, a combination of keys, a learner or preset path)
fails here: its line says why, and the exit status is 1.

    python -m utils.smoke                         # every shipped config, about 3 minutes on 2 cores
    python -m utils.smoke exps/l2p_mist/cars.json --workers 1
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: the only keys a smoke run changes, and why each may change without changing what the config computes' code path
SIZE_KEYS = {
    "data_root": "the stand-in data",
    "download": "no download: the stand-in data is local",
    "device": "the CPU",
    "num_workers": "0: in-process loading",
    "progress": "no progress bars",
    "seed": "the config's first seed only",
    "input_size": "32 px (28 for DINOv2's 14-px patches)",
    "pretrained": "false for the shrunken ViTs (random weights)",
    "backbone_kwargs": "the shrunken ViT: the family's real depth, width 32, 2 heads, the input size",
    "M": "RanPAC's random-projection width 64 instead of 10,000",
    "mi_epochs": "1 training epoch (plus the scoring pass of a preset that has one)",
    "ablation_epochs": "1 epoch", "warm_epochs": "1 epoch", "epochs": "1 epoch", "ca_epochs": "1 epoch",
    "prompt_epochs": "1 epoch", "init_epochs": "1 epoch", "later_epochs": "1 epoch (when set)",
    "tuning_steps": "1 step (when set)",
}
#: per backbone family: shrunken timm keyword arguments and the input size
SHRUNK = {"vit": (dict(img_size=32, embed_dim=32, num_heads=2, depth=12), 32),
          "dinov2": (dict(img_size=28, embed_dim=32, num_heads=2, depth=12), 28)}
TRAIN_PER_CLASS, TEST_PER_CLASS, SIDE = 3, 2, 32


def family(convnet_type: str) -> Optional[str]:
    """``"dinov2"``, ``"vit"`` or None (a CNN, kept as it is)."""
    if convnet_type == "dinov2_vits14":
        return "dinov2"
    return "vit" if "vit" in convnet_type else None


def _images(n_classes: int, per_class: int, rng: np.random.Generator, side: int = SIDE) -> tuple[np.ndarray, list]:
    """(n_classes * per_class, side, side, 3) uint8 images, a colour per class plus noise, and their labels."""
    colours = rng.integers(30, 225, size=(n_classes, 3))
    labels = [c for c in range(n_classes) for _ in range(per_class)]
    noise = rng.normal(0, 20, size=(len(labels), side, side, 3))
    return np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8), labels


def write_stand_in(dataset: str, n_classes: int, root: Path) -> Path:
    """Stand-in data for ``dataset`` with ``n_classes`` classes under ``root``, in the on-disk format its loader
    reads (``utils/datasets.py``); returns ``root`` (the ``data_root``)."""
    from PIL import Image

    from utils.datasets import IMAGE_FOLDERS

    rng = np.random.default_rng(0)
    if dataset == "cifar224":
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, per in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
            x, y = _images(n_classes, per, rng)
            with open(folder / split, "wb") as fh:
                pickle.dump({"data": x.transpose(0, 3, 1, 2).reshape(len(y), -1), "fine_labels": y}, fh)
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"class_{c:03d}" for c in range(n_classes)]}, fh)
    elif dataset == "fmnist":
        folder = root / "FashionMNIST" / "raw"
        folder.mkdir(parents=True, exist_ok=True)
        for prefix, per in (("train", TRAIN_PER_CLASS), ("t10k", TEST_PER_CLASS)):
            x, y = _images(n_classes, per, rng, side=28)
            gray = x.mean(axis=3).astype(np.uint8)
            (folder / f"{prefix}-images-idx3-ubyte").write_bytes(
                np.array([2051, len(y), 28, 28], dtype=">i4").tobytes() + gray.tobytes())
            (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(
                np.array([2049, len(y)], dtype=">i4").tobytes() + np.array(y, dtype=np.uint8).tobytes())
    else:
        name, test, _ = IMAGE_FOLDERS[dataset]
        for split, per in (("train", TRAIN_PER_CLASS), (test, TEST_PER_CLASS)):
            x, y = _images(n_classes, per, rng)
            for i, (image, label) in enumerate(zip(x, y)):
                path = root / name / split / f"class_{label:03d}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
    return root


def size_overrides(raw: dict[str, Any], data_root: Path) -> dict[str, Any]:
    """The :data:`SIZE_KEYS` values of a smoke run of the config ``raw`` (the file's keys) on ``data_root``.

    Raises:
        ValueError: an override outside :data:`SIZE_KEYS` (a bug of this module).
    """
    from utils.config import inactive_keys, load_config
    from utils.registry import PRESETS

    cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in raw.items() if k != "config"])
    out: dict[str, Any] = {"data_root": str(data_root), "download": False, "device": "cpu", "num_workers": 0,
                           "progress": False, "seed": cfg.seed[:1], "M": 64, "ablation_epochs": 1,
                           "warm_epochs": 1, "epochs": 1, "ca_epochs": 1, "prompt_epochs": 1, "init_epochs": 1}
    if cfg.later_epochs is not None:
        out["later_epochs"] = 1
    if cfg.tuning_steps is not None:
        out["tuning_steps"] = 1
    scoring = cfg.spr != "none" and PRESETS.get(cfg.spr).selective and PRESETS.get(cfg.spr).parts.get("phase") is None
    out["mi_epochs"] = 2 if scoring else 1
    kind = family(cfg.convnet_type)
    if kind is not None:
        kwargs, side = SHRUNK[kind]
        out.update(pretrained=False, input_size=side, backbone_kwargs={**kwargs, **(cfg.backbone_kwargs or {}),
                                                                        "img_size": side})
    else:
        out["input_size"] = 32
    shrunk = load_config(None, [f"{k}={json.dumps(v)}" for k, v in {**raw, **out}.items() if k != "config"])
    for unread in inactive_keys(shrunk):  # an epochs key the run does not read (another learner's or preset's)
        if unread.key not in raw:
            out.pop(unread.key, None)
    bad = set(out) - set(SIZE_KEYS)
    if bad:
        raise ValueError(f"smoke overrides outside SIZE_KEYS: {sorted(bad)}")
    return out


def run_config(path: Path, work: Path) -> tuple[str, str, float, str]:
    """Run one config small; (config, "ok" / "FAILED", seconds, what happened: tasks done or the error)."""
    import trainer
    from utils.config import load_config
    from utils.errors import UserError

    start = time.perf_counter()
    rel = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    try:
        raw = json.loads(path.read_text())
        data = work / "data" / f"{raw.get('dataset', 'cifar224')}_{raw.get('init_cls', 10) + raw.get('increment', 10)}"
        if not data.exists():
            write_stand_in(raw.get("dataset", "cifar224"), raw.get("init_cls", 10) + raw.get("increment", 10), data)
        overrides = size_overrides(raw, data)
        cfg = load_config(path, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        (results,) = trainer.run(cfg, work / "runs" / path.parent.name / path.stem)
        done = json.loads(results.read_text())
        ok = done["status"] == "complete" and len(done["tasks"]) == 2
        return rel, "ok" if ok else "FAILED", time.perf_counter() - start, \
            f"{len(done['tasks'])} tasks, status {done['status']}, A_B {done.get('last_accuracy', float('nan')):.1f}"
    except UserError as exc:
        return rel, "FAILED", time.perf_counter() - start, f"bad input (exit 2): {exc}"
    except Exception as exc:  # noqa: BLE001 - every failure is reported, with its type
        return rel, "FAILED", time.perf_counter() - start, f"{type(exc).__name__}: {exc}"


def _run_quietly(args: tuple[Path, Path]) -> tuple[str, str, float, str]:
    from utils.runtime import logging_quieted

    with logging_quieted():  # the run logs go to each run folder; the table is the output
        return run_config(*args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the configs; print one line per config and a summary. 0: every config ran its two tasks; 1: one did not."""
    from utils.ledger import shipped_configs

    parser = argparse.ArgumentParser(prog="python -m utils.smoke", description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, help="config files (default: every shipped config)")
    parser.add_argument("--workers", type=int, default=2, help="configs run at a time (processes)")
    parser.add_argument("--keep", type=Path, default=None, help="keep the stand-in data and runs in this folder")
    args = parser.parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers is {args.workers}; expected at least 1", file=sys.stderr)
        return 2
    configs = [p.resolve() for p in args.configs] or [REPO / c for c in shipped_configs()]
    missing = [str(p) for p in configs if not p.is_file()]
    if missing:
        print(f"error: no such config file(s): {', '.join(missing)}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        jobs = [(p, work) for p in configs]
        if args.workers == 1:
            rows = [_run_quietly(job) for job in jobs]
        else:
            with ProcessPoolExecutor(max_workers=args.workers) as pool:
                rows = list(pool.map(_run_quietly, jobs))
    for rel, status, seconds, what in rows:
        print(f"{status:6s} {seconds:5.1f} s  {rel}: {what}")
    failed = [r for r in rows if r[1] != "ok"]
    print(f"{len(rows) - len(failed)} of {len(rows)} configs ran two tasks in {time.perf_counter() - start:.0f} s"
          + (f"; FAILED: {', '.join(r[0] for r in failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
