"""RanPAC's ridge regression head: streaming Gram statistics and the ridge-lambda search (algorithms.md §6, step 6.3.4).

Two numerically equivalent solvers (config key ``ridge_solver``): ``"official"`` runs the original 17 + 1
dense ``torch.linalg.solve`` calls bit for bit; ``"fast"`` (default) finds the same lambda from the smaller
of the k x k kernel / M x M Gram matrices with one Cholesky per distinct candidate, and solves for W_o by
Cholesky (:meth:`RidgeAccumulator.solve`; the lambda search is in ``ridge_search.py``; ~14x faster at M = 10000,
bench/ridge.py).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)

RIDGE_GRID = tuple(10.0 ** np.arange(-8, 9))  # 1e-8 .. 1e8, 17 values (algorithms.md §6, step 6.3.4)
RIDGE_TRAIN_FRACTION = 0.8
RIDGE_SOLVERS = ("fast", "official")  # config key ``ridge_solver``
# How far a float32 solve with (Gram + lambda I) may be from the official LU, by rho = eps * (s_max + lambda) /
# lambda (s_max the Gram matrix's largest eigenvalue, bounded above by its trace). Measured on RanPAC features
# (bench/ridge.py inputs, M = 5000, k = 4000): the official hold-out loss is off by ~3e-4 rho relative for rho <= 1 and
# is pure rounding (x1e3 and more) from rho ~ 50. Search candidates with rho <= SEARCH_TRUSTED_RHO keep their fast loss;
# others get the official loss when they could win. The final solve uses Cholesky only for rho <= SOLVE_TRUSTED_RHO,
# where W_o stays within 1e-4 of the official LU; otherwise the official LU itself (bit for bit).
SEARCH_TRUSTED_RHO = 1.0
SOLVE_TRUSTED_RHO = 1e-3


def gram_trace(A: torch.Tensor, gram_of_rows: bool) -> float:
    """trace of a Gram matrix (float64 sum), an upper bound of its largest eigenvalue s_max, in one pass.

    Args:
        A: (n, M) rows whose Gram matrix A^T A is meant (``gram_of_rows``), or a symmetric PSD (M, M) matrix.

    The rounding checks use it in place of s_max: it overestimates rho, so it can only send more candidates
    to the official computation, never fewer.
    """
    if gram_of_rows:
        return float(torch.sum(A * A, dtype=torch.float64))
    return float(A.diagonal().double().sum())


def rounding_ratio(s_max: float, ridge: float, dtype: torch.dtype) -> float:
    """rho = eps(dtype) * (s_max + ridge) / ridge: how much rounding a solve with (Gram + ridge I) can pick up."""
    return torch.finfo(dtype).eps * (s_max + ridge) / ridge


def _check_solver(solver: str) -> None:
    if solver not in RIDGE_SOLVERS:
        raise ValueError(f"ridge solver must be one of {RIDGE_SOLVERS}, got {solver!r}")


def _shifted(S: torch.Tensor, ridge: float) -> torch.Tensor:
    """S + ridge I as a new tensor: only the diagonal changes, each entry ``S_ii + ridge`` rounded once in
    S's dtype, so the result equals the official ``S + ridge * torch.eye(n)`` (ridge * 1 is exact)."""
    A = S.clone()
    A.diagonal().add_(ridge)
    return A


def _cholesky_shifted(S: torch.Tensor, diag: torch.Tensor) -> Optional[torch.Tensor]:
    """Lower Cholesky factor of S with its diagonal replaced by ``diag``, or None if that is not positive definite.

    The diagonal is written into S in place and restored bit for bit before returning, so S is unchanged
    afterwards and no copy of the (n, n) matrix is made. Only S's lower triangle is read. None means a
    non-positive or NaN pivot (not positive definite in S's dtype), so that the caller can take its fallback
    instead of a wrong answer.
    """
    original = S.diagonal().clone()
    try:
        S.diagonal().copy_(diag)
        L, info = torch.linalg.cholesky_ex(S)
    finally:
        S.diagonal().copy_(original)
    return L if int(info.item()) == 0 else None


def _cholesky_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """X with L L^T X = B: the two triangular solves of ``cholesky_solve``, faster on MKL with many columns."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


def _lower_gram(A: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """The lower triangle (diagonal included) of A A^T, (n, n), in A's dtype; the strict upper triangle is
    left zero except inside the diagonal blocks.

    Computed as ``blocks`` block rows ``S[r_i, :end_i] = A[r_i] A[:end_i]^T``, i.e. (blocks + 1) / (2 blocks)
    of the flops of the full product (62.5 % for 4 blocks). Enough for ``cholesky_ex``, which reads only the
    lower triangle.
    """
    n = A.shape[0]
    S = torch.zeros(n, n, dtype=A.dtype, device=A.device)
    edges = np.linspace(0, n, min(blocks, max(n, 1)) + 1).round().astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        if hi > lo:
            S[lo:hi, :hi] = A[lo:hi] @ A[:hi].T
    return S


class RidgeAccumulator:
    """Streaming statistics G = sum_t H_t^T H_t (M x M) and Q = sum_t H_t^T Y_t (M x C), float32.

    Args:
        dim: projected width M.
        n_classes: C, all classes of the data set.
        device: where G and Q live (official: CPU).
    """

    def __init__(self, dim: int, n_classes: int, device: torch.device | str = "cpu") -> None:
        self.G = torch.zeros(dim, dim, dtype=torch.float32, device=device)
        self.Q = torch.zeros(dim, n_classes, dtype=torch.float32, device=device)

    def update(self, H: torch.Tensor, Y: torch.Tensor) -> None:
        """Add a task's rows. H: (N, M) float32, Y: (N, C) float32 one-hot, both on the accumulator's device."""
        self.Q += H.T @ Y
        self.G += H.T @ H

    def solve(self, ridge: float, solver: str = "fast") -> torch.Tensor:
        """W_o = ((G + ridge I)^-1 Q)^T, shape (C, M), in G's dtype (float32) and on G's device (algorithms.md §6,
        step 5).

        Args:
            ridge: lambda > 0 (the value chosen by :func:`select_ridge`).
            solver: ``"official"``: ``torch.linalg.solve`` (LU with partial pivoting), the original code bit
                for bit. ``"fast"`` (default): where rho = eps * (trace(G) + ridge) / ridge <= SOLVE_TRUSTED_RHO,
                G + ridge I is well enough conditioned that one Cholesky factorisation (n^3/3 flops instead of
                LU's 2n^3/3) and two triangular solves give W_o within ~1e-5 relative (Frobenius) of the official
                LU; otherwise (e.g. M = 10000, 5,000 rows, lambda = 1e5 in bench/ridge.py, where the official W_o
                is itself 4e-4 from the float64 solution) the official LU runs, so W_o is the official one bit
                for bit. If the factorisation fails (not positive definite in float32) the official LU runs too
                (with a warning): never a silent wrong answer.

        Raises:
            ValueError: unknown ``solver``.
            torch.linalg.LinAlgError: G + ridge I exactly singular (the official solve raises the same).
        """
        _check_solver(solver)
        if solver == "official" or rounding_ratio(gram_trace(self.G, False), ridge,
                                                  self.G.dtype) > SOLVE_TRUSTED_RHO:
            # official form, also for the fast solver where float32 rounding dominates (small ridge against
            # ||G||): there only the same LU reproduces the official W_o
            eye = torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device)
            return torch.linalg.solve(self.G + ridge * eye, self.Q).T
        # the diagonal of G + ridge I, entry for entry that of the official G + ridge * eye
        L = _cholesky_shifted(self.G, self.G.diagonal() + ridge)
        if L is None:
            logger.warning("Cholesky of G + %s I failed (not positive definite in %s); using the official LU "
                           "solve", ridge, self.G.dtype)
            return torch.linalg.solve(_shifted(self.G, ridge), self.Q).T
        return _cholesky_solve(L, self.Q).T


def one_hot(labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """labels (N,) int64 -> (N, n_classes) float32 one-hot."""
    return torch.nn.functional.one_hot(labels, n_classes).float()
