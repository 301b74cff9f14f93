"""RanPAC's ridge regression head: streaming Gram statistics and the ridge-lambda search (SPEC 6, step 6.3.4).

Two numerically equivalent solvers (config key ``ridge_solver``): ``"official"`` runs the original 17 + 1
dense ``torch.linalg.solve`` calls bit for bit; ``"fast"`` (default) finds the same lambda from the smaller
of the k x k kernel / M x M Gram matrices with one Cholesky per distinct candidate, and solves for W_o by
Cholesky (see :func:`select_ridge`, :meth:`RidgeAccumulator.solve`; ~14x faster at M = 10000, bench/ridge.py).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

RIDGE_GRID = tuple(10.0 ** np.arange(-8, 9))  # 1e-8 .. 1e8, 17 values (SPEC 6, step 6.3.4)
RIDGE_TRAIN_FRACTION = 0.8
RIDGE_SOLVERS = ("fast", "official")  # config key ``ridge_solver``
# How far a float32 solve with (Gram + lambda I) may be from the official LU, by rho = eps * (s_max + lambda) /
# lambda (s_max the Gram matrix's largest eigenvalue, bounded above by its trace). Measured on RanPAC features (bench/ridge.py inputs, M =
# 5000, k = 4000): the official hold-out loss is off by ~3e-4 rho relative for rho <= 1 and is pure rounding
# (x1e3 and more) from rho ~ 50. Search candidates with rho <= SEARCH_TRUSTED_RHO keep their fast loss; others
# get the official loss when they could win. The final solve uses Cholesky only for rho <= SOLVE_TRUSTED_RHO,
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
        """W_o = ((G + ridge I)^-1 Q)^T, shape (C, M), in G's dtype (float32) and on G's device (SPEC 6, step 5).

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
    """The official hold-out losses, with the fit done in the smaller of two equivalent spaces (SPEC 6).

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
    """Pick the ridge by hold-out MSE on the given rows (official ``optimise_ridge_parameter``; SPEC 6 step 4,
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


