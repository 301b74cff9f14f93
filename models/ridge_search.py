"""RanPAC's ridge-lambda search (algorithms.md §6, step 6.3.4): the hold-out loss of every candidate of the grid on an
80/20 split of the current task's rows, official (17 dense solves, bit for bit) or fast (one factorisation per distinct
candidate of the smaller of the kernel / Gram matrices, the official loss wherever rounding could decide)."""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from models.ridge import (
    RIDGE_GRID,
    RIDGE_TRAIN_FRACTION,
    SEARCH_TRUSTED_RHO,
    _check_solver,
    _cholesky_shifted,
    _cholesky_solve,
    _lower_gram,
    gram_trace,
    rounding_ratio,
)

logger = logging.getLogger(__name__)


def _holdout_losses_official(Ha, Ya, Hb, Yb, grid: Sequence[float]) -> list[float]:
    """The original ``optimise_ridge_parameter``: one dense M x M solve per candidate (kept as it was)."""
    G, Q = Ha.T @ Ha, Ha.T @ Ya
    eye = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    losses = []
    for ridge in grid:
        W = torch.linalg.solve(G + ridge * eye, Q).T
        losses.append(torch.mean((Yb - Hb @ W.T) ** 2).item())
    return losses


class _OfficialCandidates:
    """Hold-out losses of single candidates computed exactly as the official loop computes them.

    G_v = H_a^T H_a, Q_v = H_a^T Y_a and the identity are formed on first use (M x M). Each loss is
    ``mean((Y_b - H_b solve(G_v + ridge * eye, Q_v))^2)``, bit for bit the official value for that ridge;
    candidates whose shifted diagonal is bitwise equal share one computation (their matrices are equal).
    """

    def __init__(self, Ha: torch.Tensor, Ya: torch.Tensor, Hb: torch.Tensor, Yb: torch.Tensor) -> None:
        self.Ha, self.Ya, self.Hb, self.Yb = Ha, Ya, Hb, Yb
        self._G: Optional[torch.Tensor] = None
        self._Q: Optional[torch.Tensor] = None
        self._eye: Optional[torch.Tensor] = None
        self._done: list[tuple[torch.Tensor, float]] = []

    @property
    def G(self) -> torch.Tensor:
        if self._G is None:
            self._G = self.Ha.T @ self.Ha
        return self._G

    @property
    def Q(self) -> torch.Tensor:
        if self._Q is None:
            self._Q = self.Ha.T @ self.Ya
        return self._Q

    def loss(self, ridge: float) -> float:
        if self._eye is None:
            self._eye = torch.eye(self.G.shape[0], dtype=self.G.dtype, device=self.G.device)
        A = self.G + ridge * self._eye
        value = _lookup(self._done, A.diagonal())
        if value is None:
            try:
                W = torch.linalg.solve(A, self.Q).T
                value = torch.mean((self.Yb - self.Hb @ W.T) ** 2).item()
            except torch.linalg.LinAlgError:  # exactly singular: the official code would stop; never chosen here
                value = float("inf")
            self._done.append((A.diagonal().clone(), value))
        return value


def _lookup(done: list[tuple[torch.Tensor, float]], diag: torch.Tensor) -> Optional[float]:
    """The loss stored for a bitwise equal shifted diagonal, else None."""
    return next((value for d, value in done if torch.equal(d, diag)), None)


def _holdout_losses_fast(Ha, Ya, Hb, Yb, grid: Sequence[float]) -> list[float]:
    """The official hold-out losses, with the fit done in the smaller of two equivalent spaces (algorithms.md §6).

    With k fit rows and M features, for lambda > 0 (push-through identity)
        W_lambda^T = (H_a^T H_a + lambda I_M)^-1 H_a^T Y_a = H_a^T (H_a H_a^T + lambda I_k)^-1 Y_a,
    so the held-out predictions are P_lambda = H_b W_lambda^T = X (S + lambda I)^-1 R with
        k < M  (kernel form): S = H_a H_a^T (k x k), R = Y_a (k x C), X = H_b H_a^T (N - k, k);
        k >= M (primal form): S = H_a^T H_a (M x M), R = H_a^T Y_a (M x C), X = H_b, formed as the official.
    S + lambda I is symmetric positive definite for lambda > 0; per candidate it is factorised by Cholesky
    (``cholesky_ex``, n^3/3 flops, vs LU's 2n^3/3 on the M x M system) in the inputs' dtype, and
    loss = mean((Y_b - P_lambda)^2) over all (N - k) x C entries, as the official.

    Accuracy: the kernel system is never worse conditioned than the official M x M one (K = H_a H_a^T has
    the eigenvalues of H_a^T H_a less M - k of its zeros), and
    Cholesky is backward stable, so each loss is at least as accurate as the official one; where the official
    float32 solve is accurate (lambda >> eps_32 * ||H_a||_2^2) the two agree to rounding (~1e-6 relative).
    Exact shortcuts, no approximation:
      - a candidate whose shifted diagonal is bitwise equal to an earlier successful one's has a bitwise equal
        matrix, factor and loss, and is not recomputed (float32 ``S_ii + lambda`` rounds to ``S_ii`` for every
        lambda below half an ulp of S_ii, e.g. lambda <= 0.1 when S_ii ~ 1e7: 8 of the 17 official values);
      - a candidate whose Cholesky fails (not positive definite in the dtype: lambda below the rounding of
        S) gets the official loss for that lambda, computed by the official code (:class:`_OfficialCandidates`,
        M x M LU), so it is the official value bit for bit.

    Returns:
        One loss (Python float) per grid value, in grid order.
    """
    k, M = Ha.shape
    official = _OfficialCandidates(Ha, Ya, Hb, Yb)
    if k < M:
        S = _lower_gram(Ha)  # lower triangle only: all that Cholesky reads
        R, X = Ya, Hb @ Ha.T
    else:
        S, R, X = official.G, official.Q, Hb
    losses: list[float] = []
    done: list[tuple[torch.Tensor, float]] = []  # (shifted diagonal, loss) of successful factorisations
    for ridge in grid:
        diag = S.diagonal() + ridge  # S_ii + ridge rounded once, as in the official S + ridge * eye
        loss = _lookup(done, diag)
        if loss is None:
            L = _cholesky_shifted(S, diag)  # S itself is left unchanged (in the primal form it is official.G)
            if L is None:
                logger.debug("ridge search: Cholesky failed for lambda=%s; official solve", ridge)
                loss = official.loss(ridge)
            else:
                loss = torch.mean((Yb - X @ _cholesky_solve(L, R)) ** 2).item()
                done.append((diag, loss))
        losses.append(loss)
    return losses


def _official_where_rounding_dominates(losses: list[float], Ha, Ya, Hb, Yb, grid: Sequence[float]) -> list[float]:
    """Replace the fast losses that could win by the official ones where the official solve is rounding-dominated.

    For a small ridge against s_max = ||H_a||_2^2 the official float32 M x M solve (which has M - k zero
    eigenvalues when k < M) returns a solution dominated by rounding, so its hold-out loss is large and that
    ridge is never chosen, whereas the exact (fast) loss may be the smallest (near-interpolation). To choose as
    the official code does, every such candidate whose fast loss is not clearly above the best trusted one
    gets its official loss (:class:`_OfficialCandidates`, the official computation bit for bit). Candidates
    where both forms are accurate keep their fast loss. On realistic inputs the best trusted candidate wins
    and no official solve runs.

    Returns:
        The losses to take the argmin of, in grid order.
    """
    s_max = gram_trace(Ha, True)  # >= ||H_a||_2^2
    suspect = [rounding_ratio(s_max, float(r), Ha.dtype) > SEARCH_TRUSTED_RHO for r in grid]
    trusted = [loss for loss, bad in zip(losses, suspect) if not bad]
    bar = min(trusted) * (1 + 1e-3) if trusted else float("inf")
    official = None
    out = list(losses)
    for j, (loss, bad) in enumerate(zip(losses, suspect)):
        if bad and loss <= bar:
            official = official or _OfficialCandidates(Ha, Ya, Hb, Yb)
            out[j] = official.loss(float(grid[j]))
    if official is not None:
        logger.debug("ridge search: official losses for rounding-dominated candidates: %s",
                     {float(r): v for r, v, b in zip(grid, out, suspect) if b})
    return out


def select_ridge(H: torch.Tensor, Y: torch.Tensor, grid: Sequence[float] = RIDGE_GRID,
                 train_fraction: float = RIDGE_TRAIN_FRACTION, solver: str = "fast") -> float:
    """Pick the ridge by hold-out MSE on the given rows (official ``optimise_ridge_parameter``; algorithms.md §6 step 4,
    RanPAC, McDonnell et al., NeurIPS 2023).

    The first ``k = int(train_fraction * N)`` rows fit ``W_lambda = ((H_a^T H_a + lambda I)^-1 H_a^T Y_a)^T``;
    the loss is the mean squared error over every entry of the remaining rows x all C columns. The first
    grid value with the smallest loss wins (``np.argmin`` over the losses in grid order, ties included).

    Args:
        H: (N, M) float32 features (float64 works too), in the (shuffled) loader order.
        Y: (N, C) one-hot targets, H's dtype and device.
        grid: candidate ridge values, all > 0.
        train_fraction: share of rows used to fit.
        solver: ``"official"``: one dense M x M ``torch.linalg.solve`` per candidate, the original code bit for
            bit. ``"fast"`` (default): the same losses from one Gram matrix of the smaller side (k x k kernel
            form when k < M, M x M otherwise) and one Cholesky per distinct shifted matrix, see
            :func:`_holdout_losses_fast`; then every candidate where the official float32 solve is dominated by
            rounding (rho > SEARCH_TRUSTED_RHO) and whose fast loss could win gets its official loss
            (:func:`_official_where_rounding_dominates`). So the choice is the official one unless two losses
            tie to within ~3e-4 relative.

    Returns:
        The chosen ridge value (a Python float).

    Raises:
        ValueError: unknown ``solver``.
        torch.linalg.LinAlgError: an M x M system exactly singular in the dtype (official form only; the fast
            form gives such a candidate an infinite loss, so it is never chosen, where the official code stops).
    """
    _check_solver(solver)
    n_fit = int(train_fraction * H.shape[0])
    Ha, Ya, Hb, Yb = H[:n_fit], Y[:n_fit], H[n_fit:], Y[n_fit:]
    if solver == "official":
        losses = _holdout_losses_official(Ha, Ya, Hb, Yb, grid)
    else:
        losses = _official_where_rounding_dominates(_holdout_losses_fast(Ha, Ya, Hb, Yb, grid), Ha, Ya, Hb, Yb, grid)
    logger.debug("ridge search (%s): %s", solver, dict(zip(map(float, grid), losses)))
    return float(grid[int(np.argmin(np.asarray(losses)))])


