"""Update magnitude vs forgetting (arXiv 2602.20796, algorithms.md §14):
Initialized / Frozen / Adaptive on Split Fashion-MNIST.

**A scaled-down reconstruction**, not the paper's code (none is public; algorithms.md §14.1). The paper trains a
ResNet-style CNN from scratch (9 conv layers: one stem conv, then residual blocks; average pool; FC) on
task-split benchmarks and compares two update regimes with a cosine-gated hybrid (algorithms.md §14.3, §14.4). Here:

- Data: Split Fashion-MNIST, 5 tasks of 2 classes in the natural class order (0-1, 2-3, 4-5, 6-7, 8-9),
  task-incremental (one 2-way head per task, task id given at test time). The first ``train_per_class``
  training images of each class (file order) and the first ``test_per_class`` test images (None: all
  1000). Pixels x / 255, normalised with the Fashion-MNIST mean / std; no augmentation.
- Network: 9 conv blocks as the paper describes them, the first a single layer, the rest residual: timm
  ``ResNet(BasicBlock, layers=(2, 2, 2, 2), channels=WIDTHS, in_chans=1, num_classes=0)``, i.e. the 7x7 stem
  conv and 8 residual BasicBlocks of two 3x3 convs (plus the 1x1 projection shortcuts of a standard ResNet),
  global average pool, then one ``nn.Linear(128, 2)`` head per task. The last residual block
  (``layer4[-1]``) is the task-specific part of the frozen and reinitialized regimes. timm's single-conv
  stem is always 64 channels wide (``stem_width`` only applies to deep stems) and downsamples 4x (stride-2
  conv + max-pool), which would leave layer4 at 1x1 on 28 px input; the stem max-pool is replaced by
  ``nn.Identity`` so the maps are 14 -> 14 -> 7 -> 4 -> 2 px.
- Regimes for a task t >= 1 (task 0 trains the whole network from scratch in every regime):
  ``initialized`` trains the whole trunk + the task's fresh head (large update; the trunk continues from
  the previous task, it is not re-initialised); ``frozen`` trains only the last block + the fresh head, the
  lower layers (stem, 7 blocks) are fixed, BatchNorm statistics included (small update); ``reinitialized`` (the
  other reading of the paper's "Initialized") re-initialises the last block (timm's own init: Kaiming-normal
  convs, BatchNorm reset to scale 1 / shift 0) and then trains it as ``frozen`` does; ``adaptive`` asks
  :class:`models.sparse.gate.MagnitudeGate` at the start of each task: the mean gradient of the task's
  loss w.r.t. all trunk parameters, through the fresh head, with no update (BatchNorm in batch-statistics
  mode, running statistics restored afterwards), is compared with the previous task's by cosine
  similarity; below tau -> ``initialized``, else ``frozen``. Task 0's gradient is fed too, as task 1's
  reference. tau is calibrated on a separate seed (see :func:`calibrate`).
- Training: SGD (lr 0.01, momentum 0.9, no weight decay), batch 64, ``epochs`` epochs per task, a seeded
  shuffle. All heads are created with the network, so a seed gives every regime the same initial
  weights, the same task-0 training and the same data order.
- Metrics (algorithms.md §14.4), from the accuracy matrix a[i][k] (accuracy in % on task k after task i, k <= i):
  Avg.Acc = mean_k a[M-1][k]; Task.Acc = mean_k a[k][k]; Forgetting = mean_{k < M-1} (a[k][k] - a[M-1][k])
  (the paper's definition, not the max-based one of utils/metrics.py). Mean +- sample std (ddof 1) over seeds.

Command: ``OMP_NUM_THREADS=1 .venv/bin/python exps/update_magnitude/run.py --out runs/update_magnitude``.
Writes ``results.json`` and ``results.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from timm.models.resnet import BasicBlock, ResNet  # noqa: E402

from models.sparse.gate import MagnitudeGate  # noqa: E402
from utils.cli import ToolError, run_tool  # noqa: E402
from utils.datasets import Split, load_fmnist  # noqa: E402

logger = logging.getLogger(__name__)

from exps.update_magnitude.report import markdown_table, write_outputs  # noqa: E402
from exps.update_magnitude.setting import (  # noqa: E402,F401
    ADAPTIVE,
    FMNIST_MEAN,
    FMNIST_STD,
    FROZEN,
    INITIALIZED,
    LAST,
    LAYERS,
    REGIMES,
    REINITIALIZED,
    WIDTHS,
    Config,
    RunResult,
    TaskData,
)


class MultiHeadNet(nn.Module):
    """A timm ResNet trunk (features (B, 128)) and one 2-way linear head per task: forward -> logits (B, 2)."""

    def __init__(self, n_tasks: int, classes_per_task: int) -> None:
        super().__init__()
        # zero_init_last=False: timm would zero each block's last BatchNorm scale, which leaves a residual branch
        # (the last block included) at zero with no gradient into its convs for most of a short training
        self.trunk = ResNet(BasicBlock, layers=LAYERS, channels=WIDTHS, in_chans=1, num_classes=0,
                            zero_init_last=False)
        self.trunk.maxpool = nn.Identity()  # 28 px input: keep 14x14 after the stride-2 stem conv
        self.heads = nn.ModuleList(nn.Linear(self.trunk.num_features, classes_per_task) for _ in range(n_tasks))

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.heads[task](self.trunk(x))


def make_tasks(train: Split, test: Split, cfg: Config) -> list[TaskData]:
    """Split Fashion-MNIST into ``cfg.n_tasks`` tasks of consecutive class pairs (natural order)."""
    train, test = train.subsample(cfg.train_per_class), test.subsample(cfg.test_per_class)

    def tensors(split: Split, classes: range) -> tuple[torch.Tensor, torch.Tensor]:
        keep = np.isin(split.targets, list(classes))
        x = torch.from_numpy(np.asarray(split.items)[keep]).float().div_(255.0).sub_(FMNIST_MEAN).div_(FMNIST_STD)
        return x.unsqueeze(1), torch.from_numpy(split.targets[keep] - classes.start)

    tasks = []
    for t in range(cfg.n_tasks):
        classes = range(t * cfg.classes_per_task, (t + 1) * cfg.classes_per_task)
        tasks.append(TaskData(*tensors(train, classes), *tensors(test, classes)))
    return tasks


def last_block(net: MultiHeadNet) -> nn.Module:
    """The trunk's last residual block (``layer4[-1]``), the task-specific part."""
    return net.trunk.get_submodule(LAST)


def is_lower(name: str) -> bool:
    """True for a trunk parameter or buffer name outside the last block (fixed in the frozen regime)."""
    return not name.startswith(LAST + ".")


def reinitialize_last_block(net: MultiHeadNet, generator: torch.Generator) -> None:
    """Fresh parameters for the last block, as the network was initialised (timm's ``ResNet.init_weights`` with
    ``zero_init_last=False``): Kaiming-normal (fan_out, relu) conv weights from ``generator``, BatchNorm weight 1 /
    bias 0 / running statistics reset."""
    block = last_block(net)
    with torch.no_grad():
        for m in block.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()


def set_regime(net: MultiHeadNet, task: int, regime: str) -> list[nn.Parameter]:
    """Put ``net`` in train mode for ``task`` under ``regime``; returns the parameters to optimise.

    ``initialized``: the trunk and head ``task``; ``frozen`` (and ``reinitialized``, after its re-initialisation):
    the last block and head ``task``, every other trunk module in eval mode (BatchNorm running statistics fixed)
    with ``requires_grad`` off. Other heads never train.
    """
    net.train()
    for p in net.parameters():
        p.requires_grad_(False)
    if regime == INITIALIZED:
        modules = [net.heads[task], net.trunk]
    elif regime in (FROZEN, REINITIALIZED):
        net.trunk.eval()
        last_block(net).train()
        modules = [net.heads[task], last_block(net)]
    else:
        raise ValueError(f"regime {regime!r}; expected {INITIALIZED!r}, {FROZEN!r} or {REINITIALIZED!r}")
    params = [p for m in modules for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def train_task(net: MultiHeadNet, task: int, data: TaskData, regime: str, cfg: Config,
               generator: torch.Generator) -> None:
    """SGD on task ``task``'s cross-entropy for ``cfg.epochs`` epochs, shuffled by ``generator``."""
    params = set_regime(net, task, regime)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    n = len(data.y_train)
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            loss = F.cross_entropy(net(data.x_train[idx], task), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in net.parameters():
        p.requires_grad_(True)


def mean_trunk_gradient(net: MultiHeadNet, task: int, data: TaskData, batch_size: int) -> torch.Tensor:
    """Mean gradient of task ``task``'s loss over its training set w.r.t. all trunk parameters (algorithms.md §14.3).

    One pass in file order through head ``task``, no update: BatchNorm uses batch statistics as in
    training, and the running statistics are restored afterwards. Returns a flat float32 vector
    (number of trunk parameters,); every ``.grad`` is cleared again.
    """
    buffers = {k: v.clone() for k, v in net.trunk.state_dict().items() if not k.endswith(("weight", "bias"))}
    net.train()
    net.zero_grad(set_to_none=True)
    n = len(data.y_train)
    for start in range(0, n, batch_size):
        x, y = data.x_train[start:start + batch_size], data.y_train[start:start + batch_size]
        (F.cross_entropy(net(x, task), y, reduction="sum") / n).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in net.trunk.parameters()])
    net.zero_grad(set_to_none=True)
    net.trunk.load_state_dict(buffers, strict=False)
    return flat


@torch.no_grad()
def evaluate(net: MultiHeadNet, task: int, data: TaskData, batch_size: int = 500) -> float:
    """Top-1 accuracy in % of head ``task`` on the task's test set (task id given)."""
    net.eval()
    correct = sum(int((net(data.x_test[s:s + batch_size], task).argmax(1) == data.y_test[s:s + batch_size]).sum())
                  for s in range(0, len(data.y_test), batch_size))
    return 100.0 * correct / len(data.y_test)


def task_metrics(acc_matrix: Sequence[Sequence[Optional[float]]]) -> dict[str, float]:
    """Avg.Acc, Task.Acc and Forgetting in % (algorithms.md §14.4) of an M x M accuracy matrix (rows: after task i).

    Returns:
        ``{"avg_acc": mean_k a[M-1][k], "task_acc": mean_k a[k][k],
        "forgetting": mean_{k<M-1} (a[k][k] - a[M-1][k])}`` (forgetting 0.0 for M = 1).
    """
    m = len(acc_matrix)
    last = [acc_matrix[m - 1][k] for k in range(m)]
    diag = [acc_matrix[k][k] for k in range(m)]
    drops = [diag[k] - last[k] for k in range(m - 1)]
    return {"avg_acc": float(np.mean(last)), "task_acc": float(np.mean(diag)),
            "forgetting": float(np.mean(drops)) if drops else 0.0}


def _trunk_snapshot(net: MultiHeadNet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.trunk.named_parameters()}


def _update_norm(before: dict[str, torch.Tensor], net: MultiHeadNet) -> dict[str, float]:
    sq = {"lower": 0.0, "last_block": 0.0}
    for k, v in net.trunk.named_parameters():
        sq["lower" if is_lower(k) else "last_block"] += float((v.detach() - before[k]).double().pow(2).sum())
    return {k: s ** 0.5 for k, s in sq.items()}


def run_regime(regime: str, tasks: Sequence[TaskData], cfg: Config, seed: int,
               threshold: Optional[float] = None) -> RunResult:
    """Train the task sequence under ``regime`` (``initialized``, ``frozen`` or ``adaptive``) with one seed.

    Args:
        threshold: tau of the adaptive gate (required for ``adaptive``, ignored otherwise).
    """
    if regime not in REGIMES:
        raise ValueError(f"regime {regime!r}; expected one of {', '.join(REGIMES)}")
    torch.manual_seed(seed)
    net = MultiHeadNet(len(tasks), cfg.classes_per_task)
    shuffle = torch.Generator().manual_seed(seed)
    # the reinitialized regime's draws, apart from the data order
    fresh = torch.Generator().manual_seed(1_000_003 + seed)
    gate = None
    if regime == ADAPTIVE:
        if threshold is None:
            raise ValueError("the adaptive regime needs a threshold")
        gate = MagnitudeGate(threshold, cfg.budget_large, cfg.budget_small, memory="previous")
    m = len(tasks)
    acc: list[list[Optional[float]]] = [[None] * m for _ in range(m)]
    out = RunResult(regime, seed, acc, {}, [])
    for t, data in enumerate(tasks):
        chosen, similarity = (INITIALIZED if t == 0 or regime == ADAPTIVE else regime), None
        if gate is not None:
            decision = gate.decide(mean_trunk_gradient(net, t, data, cfg.batch_size))
            chosen, similarity = (INITIALIZED if t == 0 else decision.regime), decision.similarity
        before = _trunk_snapshot(net)
        if chosen == REINITIALIZED and t > 0:
            reinitialize_last_block(net, fresh)
        train_task(net, t, data, chosen, cfg, shuffle)
        out.update_norm.append(_update_norm(before, net))
        out.regimes.append(chosen)
        out.similarities.append(similarity)
        for k in range(t + 1):
            acc[t][k] = evaluate(net, k, tasks[k])
        logger.info("%s seed %d task %d (%s%s): acc %s", regime, seed, t, chosen,
                    "" if similarity is None else f", cos {similarity:+.4f}", [round(a, 2) for a in acc[t][:t + 1]])
    out.metrics = task_metrics(acc)
    return out


def calibrate(tasks: Sequence[TaskData], cfg: Config, seed: int) -> tuple[float, dict[str, list[float]]]:
    """tau for the reported seeds, from a separate (unreported) seed.

    The similarity at task t depends on how tasks < t were trained, so the gate's probe runs twice on the
    calibration seed, once with every task forced to ``initialized`` (tau = 1.01) and once to ``frozen``
    (tau = -1.01: the gate's float64 cosine can round to just below -1, so -1.0 would not force it).
    tau is the median of the pooled similarities of tasks 1..M-1 of both probes, task 1's counted once
    (it follows the same task 0 in both, so its value is the same): 2M - 3 values.

    Returns:
        (tau, {"initialized": [...], "frozen": [...]}): the similarities of tasks 1..M-1 in each probe run.
    """
    sims = {}
    for forced, tau in ((INITIALIZED, 1.01), (FROZEN, -1.01)):
        result = run_regime(ADAPTIVE, tasks, cfg, seed, threshold=tau)
        assert result.regimes[1:] == [forced] * (len(tasks) - 1)
        sims[forced] = [float(s) for s in result.similarities[1:]]
    return float(np.median(sims[INITIALIZED] + sims[FROZEN][1:])), sims


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/update_magnitude"), help="output folder")
    p.add_argument("--train-per-class", type=int, default=Config.train_per_class,
                   help="training images per class (first N in file order; 0 = all)")
    p.add_argument("--test-per-class", type=int, default=0, help="test images per class (0 = all 1000)")
    p.add_argument("--epochs", type=int, default=Config.epochs, help="epochs per task")
    p.add_argument("--seeds", type=int, nargs="+", default=list(Config.seeds), help="reported seeds")
    p.add_argument("--calibration-seed", type=int, default=Config.calibration_seed, help="seed that sets tau")
    p.add_argument("--threshold", type=float, default=None, help="skip calibration and use this tau")
    p.add_argument("--data-root", default=Config.data_root, help="Fashion-MNIST root (Debian package found too)")
    p.add_argument("--quick", action="store_true", help="tiny CI run: 20 train / 20 test per class, 1 epoch, seed 0")
    p.add_argument("--rewrite", action="store_true",
                   help="run nothing: rewrite results.json / results.md in --out from its results.json")
    args = p.parse_args(argv)
    problem = check_args(args)
    if problem:
        raise ToolError(problem)
    return args


def check_args(args: argparse.Namespace) -> Optional[str]:
    """The first thing wrong with the command line, as one sentence, or None (checked before anything runs)."""
    seeds = [*args.seeds, args.calibration_seed]
    if any(not 0 <= s < 2 ** 32 for s in seeds):
        return f"--seeds {args.seeds} / --calibration-seed {args.calibration_seed}: seeds are integers in [0, 2^32)"
    if len(set(args.seeds)) != len(args.seeds) or args.calibration_seed in args.seeds:
        return (f"--seeds {args.seeds}: expected distinct seeds, none equal to --calibration-seed "
                f"{args.calibration_seed} (it is never reported)")
    for flag, value, low in (("--epochs", args.epochs, 1), ("--train-per-class", args.train_per_class, 0),
                             ("--test-per-class", args.test_per_class, 0)):
        if value < low:
            return f"{flag} is {value}; expected an integer >= {low}"
    if args.threshold is not None and not -1.0 <= args.threshold <= 1.0:
        return f"--threshold is {args.threshold}; expected a cosine similarity in [-1, 1]"
    if args.rewrite and not (args.out / "results.json").is_file():
        return f"--rewrite: {args.out / 'results.json'} does not exist; run the experiment first"
    return None


def rewrite(out: Path) -> dict[str, Any]:
    """``--rewrite``: the outputs again from ``out/results.json`` (e.g. with the contrasts of a newer version)."""
    old = json.loads((out / "results.json").read_text())
    cfg = Config(**{**old["config"], "seeds": tuple(old["config"]["seeds"])})
    runs = [RunResult(**r) for r in old["runs"]]
    cal = old["calibration"]
    return write_outputs(out, cfg, cal["tau"], cal["similarities"], runs, old["wall_time_s"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Calibrate tau, run every regime on every seed, write the results; returns 0."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.rewrite:
        payload = rewrite(args.out)
        print(markdown_table(payload["summary"], payload["config"]["seeds"]))
        return 0
    torch.set_num_threads(1)
    cfg = Config(train_per_class=args.train_per_class or None, test_per_class=args.test_per_class or None,
                 epochs=args.epochs, seeds=tuple(args.seeds), calibration_seed=args.calibration_seed,
                 data_root=args.data_root)
    if args.quick:
        cfg.train_per_class, cfg.test_per_class, cfg.epochs, cfg.seeds = 20, 20, 1, (0,)
    start = time.perf_counter()
    train, test = load_fmnist(Path(cfg.data_root), download=False)
    tasks = make_tasks(train, test, cfg)
    if args.threshold is None:
        tau, calibration = calibrate(tasks, cfg, cfg.calibration_seed)
    else:
        tau, calibration = args.threshold, {}
    logger.info("tau = %.4f (calibration %s)", tau, calibration)
    runs = [run_regime(regime, tasks, cfg, seed, threshold=tau) for seed in cfg.seeds for regime in REGIMES]
    payload = write_outputs(args.out, cfg, tau, calibration, runs, time.perf_counter() - start)
    print(markdown_table(payload["summary"], cfg.seeds))
    logger.info("wrote %s and %s in %.0f s", args.out / "results.json", args.out / "results.md", payload["wall_time_s"])
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main))
