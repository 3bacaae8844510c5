"""Pure-tensor kernels for solves with factored matrices.

Four families, all on the factors of ``M = A @ B`` (``A`` of shape ``(..., ldim, mdim)``, ``B`` of
shape ``(..., mdim, rdim)``; leading dims broadcast):

* **Low rank plus diagonal**, ``M = A @ B + diag(d)`` (square, ``n = ldim = rdim``): solves by the
  Woodbury identity and log-determinants by the matrix determinant lemma, through the
  ``mdim x mdim`` *capacitance matrix* ``C = I + B D^{-1} A``::

      M^{-1} = D^{-1} - D^{-1} A C^{-1} B D^{-1},        det M = det D * det C.

  ``C`` is LU-factorised (partial pivoting), which is right for any ``A @ B``; when the operator is
  Hermitian positive definite (:func:`is_hermitian_pair`) it is the Hermitian positive definite
  ``I + A~^H A~`` with ``A~ = D^{-1/2} A`` instead, and Cholesky-factorised. Cost
  ``O(n mdim^2 + mdim^3)`` once, then ``O(n mdim k)`` per solve with ``k`` right-hand sides.
  Nothing ``n x n`` is formed; no iterative method is used.
* **Pseudo-inverse and least squares** of ``A @ B`` from its factored SVD
  (:func:`lowrank_op.kernels.svd`): :func:`pinv_factors`, :func:`lstsq`.
* **Direct solve** of a square ``A @ B`` with ``mdim >= ldim``: :func:`product_solve`.
* **Sums**: :func:`concat_factors`, the factors of ``A1 @ B1 + A2 @ B2``.

Numerical failures are reported, never returned as numbers: a zero (or non-finite) diagonal raises
RuntimeError (the Woodbury identity needs ``D^{-1}``); an exactly singular ``C`` (a zero pivot)
makes solves raise RuntimeError and log-determinants ``-inf``, as ``torch.linalg.slogdet`` does;
and every factorisation comes with an estimate of its condition number, which the callers turn
into an :class:`IllConditionedWarning` when it exceeds ``1 / (ILL_CONDITIONED_RCOND * eps)``. The
estimate is ``N * |C^{-1}|_1``, with ``|C^{-1}|_1`` from Hager's estimator (LAPACK's ``gecon``
method, ``O(mdim^2)`` given the factors) and ``N`` a 1-norm bound on the terms ``C`` is summed from:
``1 + |B|_1 |D^{-1} A|_1`` on the LU path, so that cancellation in forming ``C`` (which is how a
nearly singular ``A @ B + D`` shows itself, whatever ``cond(C)`` is) is caught; ``|C|_1`` on the
Cholesky path, where ``C`` is ``I`` plus a Gram matrix, whose rounding error is relative to ``|C|``.

No SciPy and no operator classes here (the small records :class:`WoodburyFactor` and the warning
class aside); :mod:`lowrank_op.added_diag` and :mod:`lowrank_op.factored` are thin layers over these
functions.

References
----------
Hager, "Condition estimates", SIAM J. Sci. Stat. Comput. 5 (1984); Higham, "FORTRAN codes for
estimating the one-norm of a real or complex matrix", ACM TOMS 14 (1988).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
from torch import Tensor

from lowrank_op.errors import IllConditionedWarning
from lowrank_op.kernels import promote

# --- Thresholds (the only place they live) -------------------------------------------------------
#: A factorisation is reported as ill-conditioned (:class:`IllConditionedWarning`) when its estimated
#: reciprocal 1-norm condition number is below this multiple of the dtype's machine epsilon: the
#: result may then have no correct digits. SciPy's ``solve`` uses the same rule (factor 1).
ILL_CONDITIONED_RCOND = 1.0
#: Iterations of Hager's 1-norm estimator (each two ``mdim x mdim`` triangular solve pairs with one
#: vector). LAPACK's ``xLACN2`` stops after at most 5.
CONDEST_ITERATIONS = 5


class WoodburyFactor(NamedTuple):
    """A factorisation of ``M = A @ B + diag(d)`` through its capacitance matrix (see :func:`factorize`).

    ``hermitian``: ``C = I + left^H left`` Cholesky-factorised (``factor`` lower triangular,
    ``left = D^{-1/2} A``, ``right`` unused, ``scale = sqrt(d)``). Otherwise ``C = I + right @ left``
    LU-factorised (``factor``, ``pivots`` from ``torch.linalg.lu_factor_ex``, ``left = D^{-1} A``,
    ``right = B``, ``scale = d``). ``singular``: bool, shape ``(...)``, an exact zero pivot.
    ``cond``: the condition estimate of the module docstring, shape ``(...)`` (``inf`` if singular).
    """

    hermitian: bool
    left: Tensor
    right: Tensor | None
    scale: Tensor
    factor: Tensor
    pivots: Tensor | None
    singular: Tensor
    cond: Tensor


# --- Helpers --------------------------------------------------------------------------------------
def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real()


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(_real_dtype(dtype)).eps


def ill_conditioned_message(what: str, cond: Tensor, dtype: torch.dtype, advice: str) -> str | None:
    """The warning text when ``cond`` (shape ``(...)``) exceeds the threshold anywhere, else None."""
    limit = 1.0 / (ILL_CONDITIONED_RCOND * _eps(dtype))
    worst = float(cond.max()) if cond.numel() else 0.0
    if worst <= limit:  # also false for NaN: a NaN estimate is reported
        return None
    return (
        f"{what} is ill-conditioned: estimated condition number {worst:.2e} (1-norm) exceeds "
        f"{limit:.1e} = 1/eps for {_real_dtype(dtype)}, so the result may have no correct digits. "
        f"{advice}"
    )


def warn_ill_conditioned(message: str | None, stacklevel: int) -> None:
    """Issue an :class:`IllConditionedWarning` when ``message`` is not None."""
    if message is not None:
        warnings.warn(message, IllConditionedWarning, stacklevel=stacklevel + 1)


def inverse_norm1_estimate(solve, solve_adjoint, like: Tensor) -> Tensor:
    """A lower bound on ``|C^{-1}|_1`` (usually within a factor 3), shape ``(...)``.

    Hager's method with Higham's extra test vector, vectorised over the batch with a fixed number of
    iterations (``CONDEST_ITERATIONS``); ``solve(X)`` applies ``C^{-1}`` and ``solve_adjoint(X)``
    applies ``C^{-H}`` to ``(..., m, 1)`` tensors; ``like`` (``(..., m, m)``) gives shape and dtype.
    Cost ``O(m^2)`` per iteration given the factorisation.
    """
    *batch, m, _ = like.shape
    real = _real_dtype(like.dtype)
    x = like.new_full((*batch, m, 1), 1.0 / m)
    estimate = torch.zeros(batch, dtype=real, device=like.device)
    for _ in range(CONDEST_ITERATIONS):
        y = solve(x)
        estimate = torch.maximum(estimate, y.abs().sum((-2, -1)))
        z = solve_adjoint(torch.where(y == 0, torch.ones_like(y), torch.sgn(y)))
        j = z.abs().argmax(-2, keepdim=True)
        x = torch.zeros_like(x).scatter_(-2, j, 1.0)
    steps = torch.arange(m, dtype=real, device=like.device)
    alternating = (1 - 2 * (steps % 2)) * (1 + steps / max(m - 1, 1))
    y = solve(alternating.to(like.dtype).expand(*batch, m).unsqueeze(-1))
    return torch.maximum(estimate, 2 * y.abs().sum((-2, -1)) / (3 * m))


def _lu_condition(C: Tensor, LU: Tensor, pivots: Tensor, singular: Tensor, data_norm: Tensor) -> Tensor:
    """Estimated condition number ``data_norm * |C^{-1}|_1`` from LU factors, ``inf`` where singular.

    ``data_norm`` is a 1-norm bound on the terms ``C`` was summed from (``|C|_1`` or more), so the
    estimate also covers cancellation in forming ``C``, whose rounding error scales with it.
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


def _norm1(X: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(X.detach(), ord=1)


def _lu_slogdet(LU: Tensor, pivots: Tensor) -> tuple[Tensor, Tensor]:
    """``(sign, log|det|)`` from ``torch.linalg.lu_factor`` output; differentiable through ``LU``."""
    diag = LU.diagonal(dim1=-2, dim2=-1)
    steps = torch.arange(1, pivots.shape[-1] + 1, device=pivots.device, dtype=pivots.dtype)
    swaps = (pivots != steps).sum(-1)
    perm_sign = 1 - 2 * (swaps % 2)
    sign = torch.sgn(diag).prod(-1) * perm_sign.to(diag.dtype)
    return sign, diag.abs().log().sum(-1)


def logdet_from_slogdet(sign: Tensor, logabsdet: Tensor) -> Tensor:
    """``log det`` as ``torch.logdet`` defines it: NaN where the determinant is negative, ``-inf``
    where it is zero; complex (``log|det| + i arg det``) for complex dtypes."""
    if sign.is_complex():
        return logabsdet.to(sign.dtype) + torch.log(sign)
    nan = torch.full_like(logabsdet, float("nan"))
    return torch.where(sign > 0, logabsdet, torch.where(sign == 0, -torch.inf, nan))


# --- Low rank plus diagonal -----------------------------------------------------------------------
def _root(t: Tensor) -> Tensor:
    """The tensor whose memory an autograd view ``t`` looks at (``t`` itself if not a view)."""
    return t if t._base is None else t._base


def _is_adjoint_view(A: Tensor, B: Tensor) -> bool:
    """Whether ``B`` is ``A.mH`` as a view: same memory, offset, sizes, strides and conj bit."""
    Ah = A.mH
    if (B.shape, B.stride(), B.storage_offset()) != (Ah.shape, Ah.stride(), Ah.storage_offset()):
        return False
    if B.is_conj() != Ah.is_conj() or B.is_neg() != Ah.is_neg() or B.dtype != A.dtype:
        return False
    if B.untyped_storage().data_ptr() != A.untyped_storage().data_ptr():
        return False
    # Same memory but not the same autograd history (e.g. ``B = A.detach().mT``): a gradient with
    # respect to one factor alone is not a Hermitian perturbation, so Cholesky's would be wrong.
    if A.requires_grad or B.requires_grad:
        return _root(A) is _root(B)
    return True


def is_hermitian_pair(A: Tensor, B: Tensor, d: Tensor) -> bool:
    """Whether ``A @ B + diag(d)`` is Hermitian positive definite, decided cheaply and exactly.

    True when every ``d`` is real and positive and ``B`` is ``A^H``, which is established either
    (1) structurally: ``B`` is the view ``A.mH`` (``A.mT`` for real ``A``), same memory, strides and
    autograd history, so ``FactoredMatrix(A, A.mT)`` qualifies at no cost; or (2) by value:
    ``torch.equal(B, A.mH)``, an ``O(n mdim)`` comparison, used only when no gradient is recorded for
    ``A`` or ``B`` (a gradient with respect to one factor alone is a non-Hermitian perturbation, which
    the Cholesky path cannot differentiate). Anything else, including ``B`` equal to ``A^H`` up to
    rounding, takes the LU path, which is correct for every operator.
    """
    if B.shape[-2:] != A.shape[-2:][::-1]:
        return False
    if d.is_complex():
        if bool((d.imag != 0).any()):
            return False
        d = d.real
    if not bool((d > 0).all()):
        return False
    if _is_adjoint_view(A, B):
        return True
    if torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        return False
    return B.shape == A.mH.shape and torch.equal(B, A.mH)


def check_diagonal(d: Tensor) -> None:
    """RuntimeError if the diagonal has a zero or non-finite entry (Woodbury needs ``D^{-1}``)."""
    bad = (d == 0) | ~torch.isfinite(d)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise RuntimeError(
            f"the diagonal has a zero or non-finite entry (d{list(index)} = {d[index].item()}); the "
            "Woodbury identity needs an invertible diagonal. Add a nonzero diagonal (e.g. "
            "`add_jitter`), or solve the dense matrix, e.g. torch.linalg.solve(op.to_dense(), y)."
        )


def capacitance(right: Tensor, left: Tensor) -> Tensor:
    """``C = I + right @ left``, shape ``(..., mdim, mdim)``; cost ``O(n mdim^2)``.

    ``I + B (D^{-1} A)`` on the LU path, ``I + A~^H A~`` (``A~ = D^{-1/2} A``) on the Cholesky path.
    Raises RuntimeError if the result is not finite (overflow, or inf/NaN inputs).
    """
    C = right @ left
    C = C + torch.eye(C.shape[-1], dtype=C.dtype, device=C.device)
    if not bool(torch.isfinite(C).all()):
        raise RuntimeError(
            "the capacitance matrix I + B D^{-1} A has non-finite entries: the diagonal is too small "
            "for the factors (overflow), or A, B or the diagonal hold inf/NaN. Rescale, or use float64."
        )
    return C


def factorize(A: Tensor, B: Tensor, d: Tensor, hermitian: bool) -> WoodburyFactor:
    """Factorise ``A @ B + diag(d)`` for Woodbury solves and the determinant lemma.

    Parameters
    ----------
    A : Tensor, shape (..., n, mdim)
    B : Tensor, shape (..., mdim, n)
    d : Tensor, shape (..., n)
        The diagonal; no zero or non-finite entries (RuntimeError otherwise).
    hermitian : bool
        Use the Cholesky path; only valid when :func:`is_hermitian_pair` holds.

    Returns
    -------
    WoodburyFactor
        Differentiable (through ``torch.linalg.lu_factor_ex`` / ``cholesky_ex``) in ``A``, ``B``, ``d``.

    Raises
    ------
    RuntimeError
        A zero or non-finite diagonal entry, or a non-finite capacitance matrix (overflow: the
        diagonal is too small for the factors, or the inputs hold inf/NaN).

    Notes
    -----
    Cost ``O(n mdim^2)`` to form ``C``, ``O(mdim^3)`` to factor it, ``O(mdim^2)`` for the condition
    estimate. 16-bit inputs are computed in float32.
    """
    A, B, d = promote(A, B, d)
    check_diagonal(d)
    if hermitian:
        scale = d.real.sqrt().to(A.dtype) if d.is_complex() else d.sqrt()
        left = A / scale.unsqueeze(-1)
        C = capacitance(left.mH, left)
        L, info = torch.linalg.cholesky_ex(C)
        if bool((info != 0).any()):  # C >= I cannot fail in exact arithmetic
            raise RuntimeError(
                "the Cholesky factorisation of the capacitance matrix I + A^H D^{-1} A failed although "
                "it is Hermitian positive definite in exact arithmetic; the factors are too large for "
                f"{A.dtype}. Rescale them, or use float64."
            )
        with torch.no_grad():
            Ld = L.detach()
            solve = lambda X: torch.cholesky_solve(X, Ld)  # noqa: E731
            cond = _norm1(C) * inverse_norm1_estimate(solve, solve, C)
        singular = torch.zeros(cond.shape, dtype=torch.bool, device=C.device)
        return WoodburyFactor(True, left, None, scale, L, None, singular, cond)
    left = A / d.unsqueeze(-1)
    C = capacitance(B, left)
    LU, pivots, info = torch.linalg.lu_factor_ex(C)
    singular = info != 0
    # C = I + B (D^{-1} A) is summed from terms of 1-norm up to 1 + |B|_1 |D^{-1} A|_1; when they
    # cancel (M nearly singular) C's rounding error is relative to that, not to |C|_1.
    cond = _lu_condition(C, LU, pivots, singular, 1 + _norm1(B) * _norm1(left))
    return WoodburyFactor(False, left, B, d, LU, pivots, singular, cond)


def require_nonsingular(factor: WoodburyFactor) -> None:
    """RuntimeError when the capacitance matrix had an exact zero pivot (``A @ B + D`` is singular)."""
    if bool(factor.singular.any()):
        where = [tuple(int(i) for i in idx) for idx in factor.singular.nonzero()[:3]]
        at = f" (batch index {where})" if factor.singular.dim() else ""
        raise RuntimeError(
            f"A @ B + D is singular: its capacitance matrix I + B D^{{-1}} A has a zero pivot{at}, so "
            "there is no solution to return. Use a least-squares solve of the dense matrix, "
            "torch.linalg.lstsq(op.to_dense(), y), or add a diagonal (e.g. `add_jitter`)."
        )


def solve(factor: WoodburyFactor, rhs: Tensor) -> Tensor:
    """``(A @ B + D)^{-1} rhs`` by the Woodbury identity.

    Parameters
    ----------
    factor : WoodburyFactor
        From :func:`factorize`; must not be singular (see :func:`require_nonsingular`).
    rhs : Tensor, shape (..., n, k)

    Returns
    -------
    Tensor, shape (..., n, k)
        Leading dims broadcast between ``factor`` and ``rhs``.

    Notes
    -----
    ``x = D^{-1} y - D^{-1} A C^{-1} (B D^{-1} y)``: cost ``O(n mdim k + mdim^2 k)``.
    """
    (rhs,) = promote(rhs)
    scale = factor.scale.unsqueeze(-1)
    y = rhs / scale
    if factor.hermitian:  # x = D^{-1/2} (y~ - A~ C^{-1} A~^H y~), y~ = D^{-1/2} rhs
        inner = torch.cholesky_solve(factor.left.mH @ y, factor.factor)
        return (y - factor.left @ inner) / scale
    inner = torch.linalg.lu_solve(factor.factor, factor.pivots, factor.right @ y)
    return y - factor.left @ inner


def slogdet(factor: WoodburyFactor) -> tuple[Tensor, Tensor]:
    """``(sign, log|det(A @ B + D)|)`` by the matrix determinant lemma ``det M = det D det C``.

    Returns
    -------
    sign : Tensor, shape (...)
        ``-1``, ``0`` or ``1`` (a unit complex number for complex dtypes); 0 when ``C`` is singular.
    logabsdet : Tensor, shape (...)
        Real; ``-inf`` when ``C`` is singular. Cost ``O(n + mdim)`` given the factorisation.
    """
    if factor.hermitian:
        logdet_c = 2 * factor.factor.diagonal(dim1=-2, dim2=-1).real.log().sum(-1)
        logabsdet = 2 * factor.scale.real.log().sum(-1) + logdet_c
        return torch.ones_like(logabsdet).to(factor.factor.dtype), logabsdet
    sign_c, logabs_c = _lu_slogdet(factor.factor, factor.pivots)
    d = factor.scale
    return torch.sgn(d).prod(-1) * sign_c, d.abs().log().sum(-1) + logabs_c


# --- Sums -----------------------------------------------------------------------------------------
def concat_factors(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``A1 @ B1 + A2 @ B2``: ``([A1, A2], [B1; B2])``, inner dim ``mdim1 + mdim2``.

    Leading dims broadcast separately among the left and the right factors (so a factor shared by
    all batch members stays shared); dtypes promote as in ``+``. Cost: one copy of each factor.
    """
    dtype = torch.promote_types(A1.dtype, A2.dtype)
    lead_a = torch.broadcast_shapes(A1.shape[:-2], A2.shape[:-2])
    lead_b = torch.broadcast_shapes(B1.shape[:-2], B2.shape[:-2])
    A = torch.cat([A1.to(dtype).expand(*lead_a, *A1.shape[-2:]), A2.to(dtype).expand(*lead_a, *A2.shape[-2:])], -1)
    B = torch.cat([B1.to(dtype).expand(*lead_b, *B1.shape[-2:]), B2.to(dtype).expand(*lead_b, *B2.shape[-2:])], -2)
    return A, B


# --- Pseudo-inverse, least squares and direct solves of A @ B -------------------------------------
def _pinv_scale(S: Tensor, ldim: int, rdim: int, rtol: float | None, atol: float) -> tuple[Tensor, int]:
    """``1 / S`` where ``S > max(atol, rtol * S_max)`` and 0 elsewhere, and how many columns to keep."""
    if rtol is None:
        rtol = max(ldim, rdim) * _eps(S.dtype) if atol == 0 else 0.0
    tol = torch.clamp(rtol * S[..., :1], min=atol) if S.shape[-1] else S[..., :1]
    keep = S > tol
    kept = int(keep.sum(-1).max()) if keep.numel() else 0
    safe = torch.where(keep, S, torch.ones_like(S))
    return torch.where(keep, 1 / safe, torch.zeros_like(S)), kept


def pinv_factors(
    U: Tensor, S: Tensor, V: Tensor, rtol: float | None = None, atol: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Factors ``(V diag(1/S), U^H)`` of the pseudo-inverse of ``U diag(S) V^H``, truncated.

    Parameters
    ----------
    U : Tensor, shape (..., ldim, k)
    S : Tensor, shape (..., k)
        Descending, as from :func:`lowrank_op.kernels.svd`.
    V : Tensor, shape (..., rdim, k)
    rtol, atol : float
        Singular values at most ``max(atol, rtol * S_max)`` are treated as zero, as in
        ``torch.linalg.pinv``; ``rtol=None`` means ``max(ldim, rdim) * eps`` when ``atol`` is 0,
        else 0.

    Returns
    -------
    P : Tensor, shape (..., rdim, r)
    Q : Tensor, shape (..., r, ldim)
        ``pinv(A @ B) = P @ Q``; ``r`` is the largest number of kept singular values over the
        batch (members with fewer get zero columns). Cost ``O((ldim + rdim) k)`` given the SVD.
    """
    scale, kept = _pinv_scale(S, U.shape[-2], V.shape[-2], rtol, atol)
    scale = scale[..., :kept]
    return V[..., :kept] * scale.unsqueeze(-2).to(V.dtype), U[..., :kept].mH


def lstsq(U: Tensor, S: Tensor, V: Tensor, rhs: Tensor, rtol: float | None = None, atol: float = 0.0) -> Tensor:
    """Minimum-norm least-squares solution ``x = pinv(A @ B) rhs`` from the factored SVD.

    Parameters
    ----------
    U, S, V : Tensor
        As for :func:`pinv_factors`.
    rhs : Tensor, shape (..., ldim, c)
    rtol, atol : float
        As for :func:`pinv_factors`.

    Returns
    -------
    Tensor, shape (..., rdim, c)
        Cost ``O((ldim + rdim) k c)`` given the SVD.
    """
    (rhs,) = promote(rhs)
    scale, _ = _pinv_scale(S, U.shape[-2], V.shape[-2], rtol, atol)
    return V @ (scale.unsqueeze(-1).to(V.dtype) * (U.mH @ rhs.to(U.dtype)))


def product_solve(A: Tensor, B: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """``(A @ B)^{-1} rhs`` for a square product with ``mdim >= ldim``, and a condition estimate.

    Parameters
    ----------
    A : Tensor, shape (..., n, mdim)
    B : Tensor, shape (..., mdim, n)
        ``mdim >= n``, so the ``n x n`` product is no larger than ``A``: it is formed.
    rhs : Tensor, shape (..., n, k)

    Returns
    -------
    x : Tensor, shape (..., n, k)
    cond : Tensor, shape (...)
        ``|A|_1 |B|_1 |(A @ B)^{-1}|_1`` (estimated): the 1-norm condition number of ``A @ B``, or
        more where forming the product cancels.

    Raises
    ------
    RuntimeError
        When the LU factorisation finds an exact zero pivot.

    Notes
    -----
    ``O(n^2 mdim)`` to form the product, ``O(n^3)`` for its LU, ``O(n^2 k)`` per solve.
    """
    A, B, rhs = promote(A, B, rhs)
    M = A @ B
    LU, pivots, info = torch.linalg.lu_factor_ex(M)
    singular = info != 0
    if bool(singular.any()):
        raise RuntimeError(
            "A @ B is singular (its LU factorisation has a zero pivot), so it has no inverse. Use "
            "`lstsq(y)` for the minimum-norm least-squares solution, or `pinv()`."
        )
    cond = _lu_condition(M, LU, pivots, singular, _norm1(A) * _norm1(B))
    return torch.linalg.lu_solve(LU, pivots, rhs), cond
