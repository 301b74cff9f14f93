"""The plain per-tensor reference of MIST's masked step (algorithms.md §4.6),
the documented equivalent of the fast path.

``plan.py`` (flat buffer, :class:`GradientPlan`) is the default; this module is what it is tested equal to
(``tests/test_sparse_fast.py``) and measured against (``bench/mist_step.py``), written straight from the official
sequence (docs/algorithms.md §4.6):

- :class:`ReferenceState` and :func:`reference_masked_grads_`: MIST's across-task state as the official code
  keeps it (bool frozen masks, int32 overlap counts, one per parameter) and its per-step gradient sequence,
  tensor by tensor (algorithms.md §4.6): zero the frozen entries, draw the Bernoulli keep decisions on the selected
  entries, multiply by mask and draw, by 0.9 ** count, zero the frozen entries again.
- :class:`ReferenceMistTuner`: a whole MIST task (algorithms.md §4.4-4.7) on that state and sequence, for comparing
  masks, frozen sets, counts and weights with :class:`models.sparse.tuner.SparseTuner`.

These are deliberately slow and literal; no learner runs them.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Optional

import torch
from torch.utils.data import DataLoader

from models.sparse.estimators import mi_fisher, scoring_pass
from models.sparse.masks import OVERLAP_BASE, quantile, select_top
from models.sparse.tuner import SparseTuner, TaskView

# first frozen zeroing skips these names (algorithms.md §4.6.2)
ZERO_1_SKIP = ("fc.weight", "fc.sigma", "norm", "simclr")
ZERO_2_SKIP = ("fc.weight", "fc.sigma", "bias", "norm")  # zeroing inside masked_update skips these (4.6.3.3)
EXEMPT = ("fc.weight", "fc.sigma", "bias", "norm", "simclr")  # full masks, never frozen (4.5, 4.7)


class ReferenceState:
    """Official MIST state: ``frozen[name]`` bool and ``overlap[name]`` int32 for every parameter
    (algorithms.md §4.1)."""

    def __init__(self, params: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = list(params)
        self.frozen = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in params}
        self.overlap = {n: torch.zeros_like(p, dtype=torch.int32) for n, p in params}

    def nbytes(self) -> int:
        """Bytes of the frozen masks and overlap counts."""
        return sum(t.numel() * t.element_size() for d in (self.frozen, self.overlap) for t in d.values())


def reference_select(scores: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """algorithms.md §4.5: full mask for exempt names, else score >= quantile(score, 1 - rate)."""
    return {n: torch.ones_like(s, dtype=torch.bool) if any(e in n for e in EXEMPT) else select_top(s, rate)
            for n, s in scores.items()}


def reference_draw(mask: torch.Tensor, keep_prob: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """algorithms.md §4.6.3.1: r = 0; r[mask] ~ Bernoulli(keep_prob) (float32, the mask's shape)."""
    r = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    probs = torch.full((int(mask.sum()),), keep_prob, device=mask.device)
    r[mask] = torch.bernoulli(probs, generator=generator)
    return r


def reference_masked_grads_(grads: Mapping[str, Optional[torch.Tensor]], selected: Mapping[str, torch.Tensor],
                            state: ReferenceState, keep: Mapping[str, torch.Tensor]) -> None:
    """The official per-step sequence on each gradient, in place (algorithms.md §4.6 steps 2-3),
    given the draws ``keep``; a None gradient is skipped."""
    for name, g in grads.items():
        if g is None:
            continue
        frozen = state.frozen.get(name)
        if frozen is not None and not any(s in name for s in ZERO_1_SKIP):
            g[frozen] = 0
        g.mul_(selected[name].float() * keep[name])
        if name in state.overlap:
            g.mul_(torch.pow(OVERLAP_BASE, state.overlap[name]))
        if frozen is not None and not any(s in name for s in ZERO_2_SKIP):
            g[frozen] = 0


def reference_end_task(scores: Mapping[str, torch.Tensor], selected: Mapping[str, torch.Tensor], state: ReferenceState,
                       freeze_quantile: float) -> None:
    """algorithms.md §4.7: frozen |= score >= quantile(score, q_f); overlap += mask, for every non-exempt name
    (``scores`` float, ``selected`` bool, each of its parameter's shape)."""
    for name, s in scores.items():
        if name in state.frozen and not any(e in name for e in EXEMPT):
            state.frozen[name] |= s >= quantile(s, freeze_quantile)
            state.overlap[name] += selected[name]


class ReferenceMistTuner(SparseTuner):
    """MIST as the official ``_mist_run`` does it (official exemption names), on :class:`ReferenceState`."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference = ReferenceState(self.network.named_parameters())

    def tune(self, loader: DataLoader, task: TaskView) -> dict[str, Any]:
        """One MIST task (algorithms.md §4.4-4.7) with the per-tensor sequence; returns ``{"selected": name -> bool
        mask}`` (no accounting). ``task`` is unused.

        Raises:
            NonFiniteError: a loss of the scoring pass was NaN or infinite.
        """
        cfg = self.cfg
        optimizer, scheduler = self.make_optimizer()
        self.state.frozen_mask = lambda name: self.reference.frozen[name]  # the scoring pass zeroes these
        sums = scoring_pass(self.loop, self.network, loader, lambda b: self.loss(b.x, b.y), self.state,
                            moments=False, scheduler=scheduler)
        scores = mi_fisher(sums, self.network, self.score_generator)
        selected = reference_select(scores, cfg.select_rate)
        params = self.named_trainables()
        for _ in range(2, cfg.mi_epochs + 1):
            self.network.train()
            for _, x, y in loader:
                loss = self.loss(x, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grads = {n: p.grad for n, p in params.items()}
                keep = {n: reference_draw(selected[n], cfg.keep_prob, self.drop_generator) for n in grads}
                reference_masked_grads_(grads, selected, self.reference, keep)
                optimizer.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()  # type: ignore[union-attr]  # Optional by type; MIST's mist_sgd always has one
        reference_end_task(scores, selected, self.reference, self.freeze_quantile)
        self.network.eval()
        return {"selected": selected}
