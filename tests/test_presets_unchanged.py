"""The ``spr`` presets behave exactly as before the tuning phase became a composition (issue 6, item 1).

``tests/golden/presets.json`` was written by ``python tests/test_presets_unchanged.py --write`` at commit
0b0f7f5, before the refactor: for every official ``spr`` value (and ``ce_finetune``) on both learners, a
tiny 2-task run (tiny random ViT, 6 colour classes, 2 epochs per tuning phase, official momentum and
weight decay, the random drop on). Each entry holds the top-1/top-5 curves, the tuning reports (wall times
left out) and a SHA-256 per tensor of what the checkpoint keeps: backbone weights, projection head,
frozen sets and update counts, and the classifier.

Masks, counts, accuracies and reports must match exactly. Weights must match bit for bit on the platform
the file was written on (same torch version and CPU capability); elsewhere, float kernels may differ in
the last bits, so the weights are compared through their float64 sums and norms (relative 1e-5) instead.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import trainer  # noqa: E402
from utils.config import load_config  # noqa: E402

from test_sparse_tuning import tiny_overrides, write_image_folder  # noqa: E402

GOLDEN = HERE / "golden" / "presets.json"
CASES = [(learner, spr) for learner in ("ranpac", "simplecil")
         for spr in ("mist", "rand", "l2", "grad", "run", "cerun", "ce_finetune")]
WALL = ("wall_time_s", "seconds", "time_s")


def platform() -> str:
    return f"torch {torch.__version__}, cpu {torch.backends.cpu.get_cpu_capability()}"


def _flatten(prefix: str, obj, out: dict) -> None:
    if isinstance(obj, torch.Tensor):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _strip(report):
    if isinstance(report, dict):
        return {k: _strip(v) for k, v in report.items() if k not in WALL}
    if isinstance(report, list):
        return [_strip(v) for v in report]
    return report


def digest(root: Path, out: Path, learner: str, spr: str) -> dict:
    """Run the tiny case and summarise it (see the module docstring)."""
    cfg = load_config(None, tiny_overrides(root, learner, spr=spr, ablation_epochs=2))
    (path,) = trainer.run(cfg, out)
    results = json.loads(path.read_text())
    state = torch.load(path.parent / trainer.CHECKPOINT_NAME, weights_only=True)["learner"]
    tensors: dict = {}
    _flatten("backbone", state["backbone"], tensors)
    _flatten("head", state["head"], tensors)
    if state["tuner"] is not None:
        _flatten("simclr", state["tuner"]["simclr"], tensors)
        _flatten("sparsity", state["tuner"]["sparsity"], tensors)
    floats = {n: t for n, t in tensors.items() if t.is_floating_point()}
    return {
        "top1": results["top1_curve"], "top5": results["top5_curve"],
        "tuning": [_strip(task.get("tuning")) for task in results["tasks"]],
        "sha": {n: _sha(t) for n, t in sorted(tensors.items())},
        "masks": {n: _sha(t) for n, t in sorted(tensors.items()) if not t.is_floating_point()},
        "sums": {n: [float(t.double().sum()), float(t.double().norm())] for n, t in sorted(floats.items())},
    }


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("presets_images"))


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("learner,spr", CASES)
def test_preset_matches_the_run_before_the_refactor(image_root, tmp_path, golden, learner, spr):
    want = golden["cases"][f"{learner}/{spr}"]
    got = digest(image_root, tmp_path, learner, spr)
    assert got["top1"] == want["top1"] and got["top5"] == want["top5"]
    assert got["tuning"] == want["tuning"]
    assert got["masks"] == want["masks"]
    assert sorted(got["sha"]) == sorted(want["sha"])
    if golden["platform"] == platform():
        assert got["sha"] == want["sha"]
    else:
        for name, (s, n) in want["sums"].items():
            assert got["sums"][name] == pytest.approx([s, n], rel=1e-5, abs=1e-7), name


def main() -> None:
    import tempfile

    if "--write" not in sys.argv:
        raise SystemExit("usage: python tests/test_presets_unchanged.py --write  (rewrites tests/golden/presets.json)")
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_image_folder(Path(tmp) / "images")
        cases = {f"{l}/{s}": digest(root, Path(tmp) / f"{l}_{s}", l, s) for l, s in CASES}
    GOLDEN.write_text(json.dumps({"platform": platform(), "cases": cases}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(cases)} cases, {platform()})")


if __name__ == "__main__":
    main()
