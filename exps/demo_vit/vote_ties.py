"""How often the L2P/DualPrompt batch vote meets a tie that changes the selected prompt set (issue 24, item 6).

For each config and seed: the learner is built as a run builds it (keys at their initial values, the pretrained query
model), and for every task the vote of ``models.prompt_hosts.batch_vote`` is taken with both tie rules
(``prompt_vote_ties`` "official", the ports' ``torch.topk`` over the ``torch.unique`` counts, and "smaller_id") on

- the task's training batches (the run's training loader: batch ``batch_size``, shuffled, train transforms),
- the test batches the trainer forms (``eval_batch_size``, unshuffled, every class seen so far),
- single-class test batches (each class's test images in batches of ``eval_batch_size``),

counting the batches whose two selected *sets* differ (the order does not matter: L2P averages its prompt outputs and
its prompt slots share one position embedding; DualPrompt selects one id). Nothing trains, so every task sees the
initial keys. Prints one markdown table.

    python exps/demo_vit/vote_ties.py [CONFIG ...] [--seeds 1993 1994 1995]

Default configs: ``exps/demo_vit/fmnist_l2p.json`` and ``exps/demo_vit/fmnist_dualprompt.json`` (DINOv2 ViT-S/14 at
56 px on Fashion-MNIST; DualPrompt's training batches take the task's slot, so only its test votes count).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from models import build_learner  # noqa: E402
from models.base import TaskData  # noqa: E402
from models.prompt_hosts import batch_vote  # noqa: E402
from trainer import _data_manager  # noqa: E402
from utils.cli import run_tool  # noqa: E402
from utils.config import load_config  # noqa: E402
from utils.runtime import OFFICIAL_TORCH_SEED, resolve_device, seed_torch  # noqa: E402

RULES = ("official", "smaller_id")


def votes_differ(learner, x: torch.Tensor) -> bool:
    """True when the two tie rules select different sets of ids for the batch ``x``."""
    net = learner.backbone
    with torch.inference_mode():
        ids = torch.topk(net.similarity(net.query_features(x.to(learner.device))), net.top_k, dim=1).indices
    counts = torch.bincount(ids.reshape(-1), minlength=net.keys.shape[0])
    a, b = (set(batch_vote(counts, net.top_k, rule).tolist()) for rule in RULES)
    return a != b


def measure(path: Path, seed: int) -> dict[str, list[int]]:
    """{kind: [batches whose sets differ, batches]} over every task of one seed."""
    cfg = load_config(path, [f"seed=[{seed}]", "progress=false"])
    device = resolve_device(cfg.device)
    data = _data_manager(cfg, seed)
    seed_torch(OFFICIAL_TORCH_SEED, cfg.allow_tf32, cfg.deterministic)
    learner = build_learner(cfg, device, seed)
    learner.backbone.eval()
    out = {"train": [0, 0], "test": [0, 0], "single-class test": [0, 0]}
    for t in range(data.nb_tasks):
        known, seen = data.task_classes(t)
        task = TaskData(t, known, seen, data.n_classes, data.get_dataset(range(known, seen), "train", "train"),
                        data.get_dataset(range(known, seen), "train", "test"),
                        data.get_dataset(range(0, seen), "test", "test"))
        if learner.cfg.model_name.startswith("l2p"):
            for _, x, _ in learner.loader(task.train, shuffle=True, train=True):
                out["train"][0] += votes_differ(learner, x)
                out["train"][1] += 1
        for _, x, _ in learner.loader(task.test, False, learner.eval_batch_size):
            out["test"][0] += votes_differ(learner, x)
            out["test"][1] += 1
        for c in range(known, seen):
            for _, x, _ in learner.loader(data.get_dataset(range(c, c + 1), "test", "test"), False,
                                          learner.eval_batch_size):
                out["single-class test"][0] += votes_differ(learner, x)
                out["single-class test"][1] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("configs", nargs="*", type=Path, default=[REPO / "exps/demo_vit/fmnist_l2p.json",
                                                                    REPO / "exps/demo_vit/fmnist_dualprompt.json"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1993, 1994, 1995])
    args = parser.parse_args(argv)
    print("| config | batches | differ / total | share |\n|---|---|---|---|")
    for path in args.configs:
        totals: dict[str, list[int]] = {}
        for seed in args.seeds:
            for kind, (d, n) in measure(path, seed).items():
                acc = totals.setdefault(kind, [0, 0])
                acc[0] += d
                acc[1] += n
        for kind, (d, n) in totals.items():
            if n:
                print(f"| {path.name} | {kind} | {d} / {n} | {100 * d / n:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
