"""Condition estimation for the package's direct solves, and the ill-conditioning warning.

A factorisation that a solve or a determinant goes through (the ``mdim x mdim`` capacitance
matrix of :mod:`lowrank_op.woodbury`, the ``n x n`` product of :mod:`lowrank_op.solves`) comes
with an estimate of its 1-norm condition number, ``N * |C^{-1}|_1``: ``|C^{-1}|_1`` from Hager's
estimator (LAPACK's ``gecon`` method, ``O(m^2)`` per iteration given the factors) and ``N`` a
1-norm bound on the terms ``C`` was formed from (``|C|_1`` or more; see the callers). When the
estimate exceeds ``1 / (ill_conditioned_rcond * eps)`` for the dtype the factorisation ran in, the
caller issues an :class:`~lowrank_op.errors.IllConditionedWarning` through
:func:`warn_ill_conditioned`.

The two thresholds are :class:`lowrank_op.settings.ill_conditioned_rcond` and
:class:`lowrank_op.settings.condest_iterations`, changeable for a ``with`` block.

Pure tensor functions: no operator classes, no SciPy.

References
----------
Hager, "Condition estimates", SIAM J. Sci. Stat. Comput. 5 (1984); Higham, "FORTRAN codes for
estimating the one-norm of a real or complex matrix", ACM TOMS 14 (1988).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

from lowrank_op import settings
from lowrank_op.errors import IllConditionedWarning


def eps(dtype: torch.dtype) -> float:
    """Machine epsilon of ``dtype``'s real counterpart."""
    return torch.finfo(dtype.to_real()).eps


def limit(dtype: torch.dtype) -> float:
    """The condition number above which a factorisation in ``dtype`` is reported ill-conditioned."""
    return 1.0 / (settings.ill_conditioned_rcond.value() * eps(dtype))


def is_ill_conditioned(cond: Tensor, dtype: torch.dtype) -> bool:
    """Whether any entry of ``cond`` (shape ``(...)``) exceeds :func:`limit` or is NaN."""
    if not cond.numel():
        return False
    return bool((~(cond <= limit(dtype))).any())


def ill_conditioned_message(what: str, cond: Tensor, dtype: torch.dtype, advice: str) -> str | None:
    """The warning text when ``cond`` (shape ``(...)``) exceeds :func:`limit` anywhere, else None.

    ``what`` names the matrix (``"A @ B"``), ``dtype`` is the dtype the factorisation ran in and
    ``advice`` says what to do next. A NaN estimate is reported too.
    """
    if not is_ill_conditioned(cond, dtype):
        return None
    worst = float(cond.max())
    return (
        f"{what} is ill-conditioned: estimated condition number {worst:.2e} (1-norm) exceeds "
        f"{limit(dtype):.1e} = 1/eps for {dtype.to_real()}, so the result may have no correct digits. "
        f"{advice}"
    )


def warn_ill_conditioned(message: str | None, stacklevel: int) -> None:
    """Issue an :class:`IllConditionedWarning` when ``message`` is not None.

    ``stacklevel`` counts from the caller of this function (1: the caller itself).
    """
    if message is not None:
        warnings.warn(message, IllConditionedWarning, stacklevel=stacklevel + 1)


def norm1(X: Tensor) -> Tensor:
    """``|X|_1`` (largest absolute column sum), shape ``(...)``, without autograd; 0 for empty ``X``."""
    return torch.linalg.matrix_norm(X.detach(), ord=1)


def inverse_norm1_estimate(
    solve: Callable[[Tensor], Tensor], solve_adjoint: Callable[[Tensor], Tensor], like: Tensor
) -> Tensor:
    """A lower bound on ``|C^{-1}|_1`` (usually within a factor 3), shape ``(...)``.

    Parameters
    ----------
    solve, solve_adjoint : callable
        Apply ``C^{-1}`` and ``C^{-H}`` to ``(..., m, 1)`` tensors.
    like : Tensor, shape (..., m, m)
        Gives the batch shape, ``m`` and the dtype.

    Returns
    -------
    Tensor, shape (...)
        Real. 0 for ``m = 0`` (the inverse of a 0 x 0 matrix has norm 0).

    Notes
    -----
    Hager's method with Higham's extra test vector, vectorised over the batch with a fixed number
    of iterations (:class:`lowrank_op.settings.condest_iterations`). Cost ``O(m^2)`` per iteration
    given the factorisation.
    """
    *batch, m, _ = like.shape
    real = like.dtype.to_real()
    estimate = torch.zeros(batch, dtype=real, device=like.device)
    if m == 0:
        return estimate
    x = like.new_full((*batch, m, 1), 1.0 / m)
    for _ in range(settings.condest_iterations.value()):
        y = solve(x)
        estimate = torch.maximum(estimate, y.abs().sum((-2, -1)))
        z = solve_adjoint(torch.where(y == 0, torch.ones_like(y), torch.sgn(y)))
        j = z.abs().argmax(-2, keepdim=True)
        x = torch.zeros_like(x).scatter_(-2, j, 1.0)
    steps = torch.arange(m, dtype=real, device=like.device)
    alternating = (1 - 2 * (steps % 2)) * (1 + steps / max(m - 1, 1))
    y = solve(alternating.to(like.dtype).expand(*batch, m).unsqueeze(-1))
    return torch.maximum(estimate, 2 * y.abs().sum((-2, -1)) / (3 * m))


def lu_condition(C: Tensor, LU: Tensor, pivots: Tensor, singular: Tensor, data_norm: Tensor) -> Tensor:
    """Estimated condition number ``data_norm * |C^{-1}|_1`` from LU factors, ``inf`` where singular.

    Parameters
    ----------
    C : Tensor, shape (..., m, m)
    LU, pivots : Tensor
        From ``torch.linalg.lu_factor_ex(C)``.
    singular : Tensor, bool, shape (...)
        Where the factorisation met an exact zero pivot.
    data_norm : Tensor, shape (...) or ()
        A 1-norm bound on the terms ``C`` was summed from (``|C|_1`` or more), so that the estimate
        also covers cancellation in forming ``C``, whose rounding error scales with it.

    Returns
    -------
    Tensor, shape (...)
        Real, without autograd; ``O(m^2)`` given the factors.
    """
    with torch.no_grad():
        LU, C = LU.detach(), C.detach()
        if bool(singular.any()):  # keep the estimate of the regular members finite
            eye = torch.eye(LU.shape[-1], dtype=LU.dtype, device=LU.device)
            LU = torch.where(singular[..., None, None], eye, LU)
        inv_norm = inverse_norm1_estimate(
            lambda X: torch.linalg.lu_solve(LU, pivots, X),
            lambda X: torch.linalg.lu_solve(LU, pivots, X, adjoint=True),
            C,
        )
        cond = (data_norm.detach() * inv_norm).expand(singular.shape)
        return torch.where(singular, torch.inf, cond)
