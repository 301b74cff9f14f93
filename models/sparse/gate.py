"""Update-magnitude control (arXiv 2602.20796, algorithms.md §14.3): a cosine gate between task gradients.

**A reconstruction.** The paper publishes the rule in words only: at the start of task t, compare the
current task's gradient g_t with the previous task's by cosine similarity; below a threshold the task is
deemed unrelated and gets *more* task-specific capacity (a large update, toward "initialized" training),
otherwise it trains in the "frozen" regime (a small update). Threshold, how g_{t-1} is stored and what the
two budgets are, are not public; here they are config keys (``gate_threshold``, ``gate_memory``,
``gate_ema``, ``gate_budget_large``, ``gate_budget_small``), documented in docs/deviations.md.

What is stored: the mean gradient of a task, one flat float32 vector over the tuned entries. With
``memory="previous"`` the reference for task t is task t-1's mean gradient; with ``memory="ema"`` it is
m_t = ema * m_{t-1} + (1 - ema) * g_t (m_0 = g_0), an exponential moving average over the tasks so far.
The first task has no reference: it is assigned the large budget ("initialized"; the network has nothing
of its own to protect yet) with similarity None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from models.sparse.presets import unread_by_preset
from utils.config import ConfigKeys, config_keys, key

INITIALIZED, FROZEN = "initialized", "frozen"
MEMORY_RULES = ("previous", "ema")


@config_keys("Update-magnitude control, spr magnitude_gate (models/sparse/gate.py)", unused_because=unread_by_preset)
class GateKeys(ConfigKeys):
    gate_threshold: float = key(
        0.5, "magnitude_gate: cosine similarity below which a task gets the large budget (algorithms.md §14.3).",
        ge=-1, le=1
    )
    gate_budget_large: float = key(0.01, "magnitude_gate: selected fraction of the 'initialized' regime.", gt=0, le=1)
    gate_budget_small: float = key(0.001, "magnitude_gate: selected fraction of the 'frozen' regime.", gt=0, le=1)
    gate_memory: str = key(
        "previous", "magnitude_gate reference gradient: previous (the last task's mean gradient) or ema.",
        choices=MEMORY_RULES,
    )
    gate_ema: float = key(0.5, "magnitude_gate: decay of the reference EMA (gate_memory 'ema').", ge=0, lt=1)


@dataclass(frozen=True)
class GateDecision:
    """One task's decision.

    Attributes:
        similarity: cosine(g_t, reference) in [-1, 1], or None on the first task (no reference).
        regime: ``"initialized"`` (similarity < threshold, or first task: large budget) or ``"frozen"``.
        budget: the fraction of tuned entries the task may update (the regime's budget).
    """

    similarity: Optional[float]
    regime: str
    budget: float

    def to_dict(self) -> dict[str, Any]:
        """``similarity``, ``regime`` and ``budget`` as a dict (results.json's ``gate`` entry)."""
        return asdict(self)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """cos(a, b) = <a, b> / (|a| |b|) of two flat vectors, in float64, clamped to [-1, 1] (rounding can reach
    1 + 2e-16); 0.0 when either is all zeros.

    Raises:
        ValueError: different sizes.
    """
    if a.numel() != b.numel():
        raise ValueError(f"gradients of different sizes: {a.numel()} and {b.numel()} entries")
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    norm = float(a64.norm() * b64.norm())
    return 0.0 if norm == 0.0 else min(1.0, max(-1.0, float(torch.dot(a64, b64)) / norm))


class MagnitudeGate:
    """The cosine gate of algorithms.md §14.3 with its memory of past task gradients.

    Args:
        threshold: tau; similarity < tau -> the large budget ("initialized" regime).
        budget_large: fraction of tuned entries updated in the "initialized" regime, in (0, 1].
        budget_small: fraction updated in the "frozen" regime, in (0, 1].
        memory: ``"previous"`` (the last task's mean gradient) or ``"ema"``.
        ema: the EMA's decay in [0, 1) (``memory="ema"`` only).

    Raises:
        ValueError: an unknown memory rule or a budget outside (0, 1].
    """

    def __init__(self, threshold: float, budget_large: float, budget_small: float, memory: str = "previous",
                 ema: float = 0.5) -> None:
        if memory not in MEMORY_RULES:
            raise ValueError(f"gate memory {memory!r}; expected one of {', '.join(MEMORY_RULES)}")
        for name, value in (("budget_large", budget_large), ("budget_small", budget_small)):
            if not 0.0 < value <= 1.0:
                raise ValueError(f"gate {name} = {value}; expected a fraction in (0, 1]")
        self.threshold, self.memory, self.ema = float(threshold), memory, float(ema)
        self.budget_large, self.budget_small = float(budget_large), float(budget_small)
        self.reference: Optional[torch.Tensor] = None  # flat float32, on the gradient's device

    def decide(self, gradient: torch.Tensor) -> GateDecision:
        """Gate the task whose mean gradient is ``gradient`` (flat, any float dtype), then remember it.

        Raises:
            ValueError: ``gradient`` has another size than the stored reference.
        """
        g = gradient.detach().reshape(-1).float()
        if self.reference is None:
            decision = GateDecision(None, INITIALIZED, self.budget_large)
        else:
            s = cosine_similarity(g, self.reference)
            decision = (GateDecision(s, INITIALIZED, self.budget_large) if s < self.threshold
                        else GateDecision(s, FROZEN, self.budget_small))
        if self.reference is None or self.memory == "previous":
            self.reference = g.clone()
        else:
            self.reference.mul_(self.ema).add_(g, alpha=1.0 - self.ema)
        return decision

    def state_dict(self) -> dict[str, Any]:
        """The stored reference gradient (None before the first task)."""
        return {"reference": None if self.reference is None else self.reference.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the reference as float32). Raises KeyError when ``reference`` is missing."""
        ref = state["reference"]
        self.reference = None if ref is None else ref.float().clone()
