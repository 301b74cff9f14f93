"""The importance formulas and the gate's input against values computed independently (issue 15, item 5).

Each test computes its expectation without the production expression: by hand on a 2-entry model whose per-batch
gradients are chosen, or from per-batch autograd gradients accumulated here in float64. Each catches a mutation that
the rest of the suite let through before issue 15:

- PIECE-S scored with PIECE-F's formula (the estimator, or the preset's ``importance`` part, swapped);
- PIECE-S from means over the batches instead of sums (in the estimator or in the scoring pass);
- the update-magnitude gate fed the summed squared gradients instead of the task's mean gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.loop import TuningLoop
from models.sparse.estimators import PassSums, scoring_pass
from models.sparse.gate import cosine_similarity
from models.sparse.masks import SparsityState
from models.sparse.scopes import select_global
from models.sparse.selective import SelectivePhase
from utils.registry import ESTIMATORS, PRESETS

from test_sparse_tuning import CPU, RANPAC_DEFAULTS, make_cfg, make_loader, make_task, tiny_backbone
from models.sparse import build_tuner

#: per-batch gradients of the 2 entries: A gets 0.5 every batch (consistent and small), B alternates
#: 1 + sqrt(2), 1 - sqrt(2) (mean 1, mean square 3)
ROOT2 = math.sqrt(2.0)
GRADS = [(0.5, 1 + ROOT2), (0.5, 1 - ROOT2), (0.5, 1 + ROOT2), (0.5, 1 - ROOT2)]
# by hand, n = 4: S1 = (2, 4), S2 = (1, 12)
#   PIECE-F = S2                  = (1, 12)                            -> B first
#   PIECE-S = |S1| / sqrt(S2 + 1)  = (2 / sqrt 2, 4 / sqrt 13) = (1.4142, 1.1094) -> A first
#   from means: |S1/n| / sqrt(S2/n + 1) = (0.5 / sqrt 1.25, 1 / 2) = (0.4472, 0.5) -> B first
HAND = {"fisher": (1.0, 12.0), "second_order": (2 / ROOT2, 4 / math.sqrt(13.0))}


class TwoEntries(nn.Module):
    """One (1, 2) weight; the loss of batch b is <c_b, w>, so its gradient is exactly c_b."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, 2))


def hand_pass(moments: bool = True) -> tuple[TwoEntries, PassSums]:
    """The production scoring pass over the 4 batches of GRADS on :class:`TwoEntries`."""
    net = TwoEntries()
    batches = [(torch.tensor([b]), torch.tensor([list(c)]), torch.tensor([0])) for b, c in enumerate(GRADS)]
    state = SparsityState(net.named_parameters(), "name")

    def forward(batch):
        return (batch.x.to(net.weight.dtype) * net.weight).sum()

    sums = scoring_pass(TuningLoop(CPU), net, batches, forward, state, moments=moments)
    return net, sums


@pytest.mark.parametrize("preset", ["piece_f", "piece_s"])
def test_piece_scores_equal_the_hand_values_through_the_preset(preset):
    """The preset's registered estimator, after the production pass, gives the hand values; and the top-1 entry
    differs between PIECE-F (B) and PIECE-S (A), so swapping the two formulas changes the selection."""
    net, sums = hand_pass()
    assert sums.n_batches == 4
    importance = PRESETS.get(preset).parts["importance"]
    scores = ESTIMATORS.get(importance).score(sums, net, torch.Generator())
    want = HAND[importance]
    assert scores["weight"].reshape(-1).tolist() == pytest.approx(want, rel=1e-6)
    top = select_global(scores, 1)["weight"].reshape(-1).tolist()
    assert top == ([False, True] if preset == "piece_f" else [True, False])


def test_piece_s_uses_sums_not_means():
    """With means the +1 weighs differently and B would rank first (0.5 > 0.4472): PIECE-S must rank A first."""
    net, sums = hand_pass()
    assert sums.firsts["weight"].reshape(-1).tolist() == pytest.approx([2.0, 4.0], rel=1e-6)
    assert sums.squares["weight"].reshape(-1).tolist() == pytest.approx([1.0, 12.0], rel=1e-6)
    s = ESTIMATORS.get("second_order").score(sums, net, torch.Generator())["weight"].reshape(-1)
    assert float(s[0]) > float(s[1])
    means = (0.5 / math.sqrt(1.25), 0.5)
    assert s.tolist() != pytest.approx(means, rel=1e-3)


def test_scoring_pass_zeroes_a_batch_nan_gradient_entry_as_pieces_hook():
    """A NaN gradient entry of one batch (finite loss) contributes 0 to S1 and S2, as PIECE's per-batch
    nan_to_num; the other batches still count."""
    net = TwoEntries()
    rows = [(1.0, 5.0), (2.0, 3.0)]
    batches = [(torch.tensor([b]), torch.tensor([list(c)]), torch.tensor([0])) for b, c in enumerate(rows)]
    state = SparsityState(net.named_parameters(), "name")
    calls = []

    def poison_first(grad):  # batch 0's gradient of entry B becomes NaN
        calls.append(1)
        return torch.tensor([[grad[0, 0], float("nan")]]) if len(calls) == 1 else grad

    net.weight.register_hook(poison_first)
    sums = scoring_pass(TuningLoop(CPU), net, batches, lambda b: (b.x.float() * net.weight).sum(), state,
                        moments=True)
    assert sums.firsts["weight"].reshape(-1).tolist() == pytest.approx([3.0, 3.0])
    assert sums.squares["weight"].reshape(-1).tolist() == pytest.approx([5.0, 9.0])


def _task_start_gradients(tuner, loader, task, head) -> list[dict[str, torch.Tensor]]:
    """Per-batch gradients at the current weights, by autograd, one batch at a time, in float64."""
    params = {n: p for n, p in tuner.network.named_parameters() if p.requires_grad and n.startswith("convnet.")}
    out = []
    tuner.network.train()
    for _, x, y in loader:
        grads = torch.autograd.grad(tuner.ce_loss(head, task.known, x, y), list(params.values()), allow_unused=True)
        out.append({n: (torch.zeros_like(p) if g is None else g).double() for (n, p), g in zip(params.items(), grads)})
    return out


@pytest.mark.parametrize("spr", ["piece_f", "piece_s"])
def test_piece_task_selection_is_the_top_k_of_the_hand_formula(monkeypatch, spr):
    """End to end on a tiny ViT: the mask PIECE selects is the global top-k of S2 (PIECE-F) or |S1| / sqrt(S2 + 1)
    (PIECE-S), from per-batch gradients computed here over the official scoring data (the task's images in order,
    batches of 4); and the two formulas' top-k sets differ here."""
    # strict: no tensor is made fully trainable for lack of a selected entry, so the mask is exactly the top-k
    tuner = build_tuner(make_cfg(f"spr={spr}", "top_ratio=0.01", "strict_mask=true"), tiny_backbone(), CPU, 3,
                        RANPAC_DEFAULTS)
    loader = make_loader(n=24, batch=8)
    task = make_task(0, loader)
    heads, seen = [], {}
    real_head, real_select = tuner.prototype_head, SelectivePhase.select

    def capture_head(*a, **kw):
        heads.append(real_head(*a, **kw))
        return heads[-1]

    def capture_select(self, scores, budget):
        grads = _task_start_gradients(tuner, tuner.scoring_loader(task), task, heads[0])
        seen["grads"] = grads
        seen["selected"] = real_select(self, scores, budget)[0]
        return seen["selected"], 0

    monkeypatch.setattr(tuner, "prototype_head", capture_head)
    monkeypatch.setattr(SelectivePhase, "select", capture_select)
    tuner.tune(loader, task)
    grads = seen["grads"]
    assert len(grads) == 6  # 24 images in batches of 4
    names = tuner.candidates()
    s1 = {n: sum(g[n] for g in grads) for n in names}
    s2 = {n: sum(g[n] ** 2 for g in grads) for n in names}
    formulas = {"piece_f": {n: s2[n] for n in names},
                "piece_s": {n: s1[n].abs() / torch.sqrt(s2[n] + 1.0) for n in names}}
    k = sum(int(seen["selected"][n].sum()) for n in names)
    assert k > 10
    tops = {}
    for name, scores in formulas.items():
        flat = torch.cat([scores[n].reshape(-1) for n in names])
        tops[name] = set(torch.topk(flat, k).indices.tolist())
    got = set(torch.cat([seen["selected"][n].reshape(-1) for n in names]).nonzero().reshape(-1).tolist())
    assert tops["piece_f"] != tops["piece_s"]
    assert len(got ^ tops[spr]) <= 2  # a near-tie at the k-th score may swap one entry (float32 vs float64)
    other = "piece_s" if spr == "piece_f" else "piece_f"
    assert len(got ^ tops[other]) > 2


def test_gate_similarity_is_the_cosine_of_the_tasks_mean_gradients(monkeypatch):
    """Two tasks of the gate: task 1's similarity equals cos(mean g of task 1, mean g of task 0) over the candidate
    entries, each mean gradient computed here from per-batch autograd gradients at the task's start."""
    tuner = build_tuner(make_cfg("spr=magnitude_gate"), tiny_backbone(), CPU, 3, RANPAC_DEFAULTS)
    heads, means = [], []
    real_head, real_select = tuner.prototype_head, SelectivePhase.select

    def capture_head(*a, **kw):
        heads.append(real_head(*a, **kw))
        return heads[-1]

    reports = []
    for t in range(2):
        loader = make_loader(n=16, batch=8, seed=t, first=4 * t)
        task = make_task(t, loader)

        def capture_select(self, scores, budget, loader=loader, task=task):
            grads = _task_start_gradients(tuner, loader, task, heads[-1])
            means.append(torch.cat([sum(g[n] for g in grads).reshape(-1) for n in tuner.candidates()]) / len(grads))
            return real_select(self, scores, budget)

        monkeypatch.setattr(tuner, "prototype_head", capture_head)
        monkeypatch.setattr(SelectivePhase, "select", capture_select)
        reports.append(tuner.tune(loader, task))
    similarity = reports[1]["gate"]["similarity"]
    want = float(torch.dot(means[0], means[1]) / (means[0].norm() * means[1].norm()))
    assert similarity == pytest.approx(want, abs=1e-4)
    squares_like = cosine_similarity(means[0] ** 2, means[1] ** 2)
    assert abs(squares_like - want) > 0.05  # the mutation would be visible
