"""Kernels for ``M = A @ B + diag(d)``: Woodbury solves and the matrix determinant lemma.

``A`` of shape ``(..., n, mdim)``, ``B`` of shape ``(..., mdim, n)``, ``d`` of shape ``(..., n)``;
leading dims broadcast. Solves go through the Woodbury identity and log-determinants through the
matrix determinant lemma, both through the ``mdim x mdim`` *capacitance matrix*
``C = I + B D^{-1} A``::

    M^{-1} = D^{-1} - D^{-1} A C^{-1} B D^{-1},        det M = det D * det C.

``C`` is LU-factorised (partial pivoting), which is right for any ``A @ B``; when the operator is
Hermitian positive definite (:func:`is_hermitian_pair`) it is the Hermitian positive definite
``I + A~^H A~`` with ``A~ = D^{-1/2} A`` instead, and Cholesky-factorised. Cost
``O(n mdim^2 + mdim^3)`` once, then ``O(n mdim k)`` per solve with ``k`` right-hand sides. Nothing
``n x n`` is formed; no iterative method is used. ``mdim = 0`` is the diagonal alone (``C`` is
0 x 0); ``n = 0`` is the empty operator (log-determinant 0, empty solves).

Numerical failures are reported, never returned as numbers: a zero (or non-finite) diagonal raises
RuntimeError (the identity needs ``D^{-1}``); an exactly singular ``C`` (a zero pivot) makes
solves raise RuntimeError and log-determinants ``-inf``, as ``torch.linalg.slogdet`` does, with an
:class:`~lowrank_op.errors.IllConditionedWarning` (a zero pivot may be rounding); and every
factorisation comes with a condition estimate (:mod:`lowrank_op.conditioning`), ``N |C^{-1}|_1``
with ``N = 1 + |B|_1 |D^{-1} A|_1`` on the LU path, so that cancellation in forming ``C`` (which is
how a nearly singular ``A @ B + D`` shows itself, whatever ``cond(C)`` is) is caught, and
``N = |C|_1`` on the Cholesky path, where ``C`` is ``I`` plus a Gram matrix.

*32-bit refinement.* A float32 or complex64 capacitance matrix that is ill-conditioned by that
estimate, or has a zero pivot, is formed and factorised again in float64 (complex128) from the same
input values: the solve or determinant is then right for the operator as given, to float32
rounding of the result, instead of lost (a 32-bit ``C`` of a nearly singular operator is rounding
noise, and can even be exactly singular). The callers still warn, since the answer is as sensitive
to the inputs' own rounding as the condition number says. ``lowrank_op.choices`` records it.

The operator class is :class:`lowrank_op.added_diag.FactoredAddedDiag`; solves of ``A @ B`` alone
are in :mod:`lowrank_op.solves`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from lowrank_op import choices, conditioning
from lowrank_op.kernels import promote
from lowrank_op.solves import lu_slogdet

_WIDER = {torch.float32: torch.float64, torch.complex64: torch.complex128}


class WoodburyFactor(NamedTuple):
    """A factorisation of ``M = A @ B + diag(d)`` through its capacitance matrix (see :func:`factorize`).

    ``hermitian``: ``C = I + left^H left`` Cholesky-factorised (``factor`` lower triangular,
    ``left = D^{-1/2} A``, ``right`` unused, ``scale = sqrt(d)``). Otherwise ``C = I + right @ left``
    LU-factorised (``factor``, ``pivots`` from ``torch.linalg.lu_factor_ex``, ``left = D^{-1} A``,
    ``right = B``, ``scale = d``). ``singular``: bool, shape ``(...)``, an exact zero pivot.
    ``cond``: the condition estimate of the module docstring, shape ``(...)`` (``inf`` if singular).
    ``dtype``: the dtype results are returned in (the inputs', float32 for 16-bit ones).
    ``first_cond``: when the factorisation was redone in 64 bits, the estimate of the 32-bit one
    (``inf`` where it had a zero pivot); else None.
    """

    hermitian: bool
    left: Tensor
    right: Tensor | None
    scale: Tensor
    factor: Tensor
    pivots: Tensor | None
    singular: Tensor
    cond: Tensor
    dtype: torch.dtype
    first_cond: Tensor | None = None


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


def _factorize(A: Tensor, B: Tensor, d: Tensor, hermitian: bool) -> WoodburyFactor:
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
            cond = conditioning.norm1(C) * conditioning.inverse_norm1_estimate(solve, solve, C)
        singular = torch.zeros(cond.shape, dtype=torch.bool, device=C.device)
        return WoodburyFactor(True, left, None, scale, L, None, singular, cond, A.dtype)
    left = A / d.unsqueeze(-1)
    C = capacitance(B, left)
    LU, pivots, info = torch.linalg.lu_factor_ex(C)
    singular = info != 0
    # C = I + B (D^{-1} A) is summed from terms of 1-norm up to 1 + |B|_1 |D^{-1} A|_1; when they
    # cancel (M nearly singular) C's rounding error is relative to that, not to |C|_1.
    data_norm = 1 + conditioning.norm1(B) * conditioning.norm1(left)
    cond = conditioning.lu_condition(C, LU, pivots, singular, data_norm)
    return WoodburyFactor(False, left, B, d, LU, pivots, singular, cond, A.dtype)


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
    estimate. 16-bit inputs are computed in float32; a 32-bit ``C`` that is ill-conditioned or
    singular is factorised again in 64 bits (module docstring), at twice that cost or more.

    Examples
    --------
    >>> A, B = torch.randn(100, 3, dtype=torch.float64), torch.randn(3, 100, dtype=torch.float64)
    >>> d = torch.full((100,), 10.0, dtype=torch.float64)
    >>> factor = factorize(A, B, d, hermitian=False)
    >>> y = torch.randn(100, 2, dtype=torch.float64)
    >>> bool(torch.allclose((A @ B + torch.diag(d)) @ solve(factor, y), y))
    True
    """
    A, B, d = promote(A, B, d)
    check_diagonal(d)
    factor = _factorize(A, B, d, hermitian)
    wide = _WIDER.get(A.dtype)
    if wide is None or not conditioning.is_ill_conditioned(factor.cond, A.dtype):
        return factor
    choices.record(
        "woodbury",
        str(wide).removeprefix("torch."),
        f"the {A.dtype} capacitance matrix has estimated condition number {float(factor.cond.max()):.2e} "
        f"> {conditioning.limit(A.dtype):.1e} (or a zero pivot): factorised again in {wide}",
    )
    wider = _factorize(A.to(wide), B.to(wide), d.to(wide.to_real() if not d.is_complex() else wide), hermitian)
    return wider._replace(dtype=A.dtype, first_cond=factor.cond)


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


def warning_message(factor: WoodburyFactor, advice: str) -> str | None:
    """The :class:`~lowrank_op.errors.IllConditionedWarning` text for ``factor``, or None.

    Reported: a zero pivot (``log|det|`` is then ``-inf``, which is exact only for an exactly
    singular operator), an estimate above the limit of the dtype the factorisation ran in, and a
    32-bit factorisation that had to be redone in 64 bits.
    """
    what = "the capacitance matrix I + B D^{-1} A of A @ B + D"
    ran_in = factor.factor.dtype
    if bool(factor.singular.any()):
        where = [tuple(int(i) for i in idx) for idx in factor.singular.nonzero()[:3]]
        at = f" (batch index {where})" if factor.singular.dim() else ""
        return (
            f"{what} has an exact zero pivot in {ran_in.to_real()}{at}: the operator is singular to "
            "working precision, so log|det| is -inf and solves raise. That is exact only if it is "
            f"exactly singular. {advice}"
        )
    message = conditioning.ill_conditioned_message(what, factor.cond, ran_in, advice)
    if message is not None or factor.first_cond is None:
        return message
    first = float(factor.first_cond.max())
    if first == float("inf"):
        reason = "has an exact zero pivot"
    else:
        reason = (
            f"is ill-conditioned (estimated condition number {first:.2e} (1-norm) exceeds "
            f"{conditioning.limit(factor.dtype):.1e} = 1/eps)"
        )
    return (
        f"{what} {reason} in {factor.dtype}, so it was factorised again in {ran_in} (estimated "
        f"condition number {float(factor.cond.max()):.2e} there) and the result rounded to {factor.dtype}. "
        f"It is right for the values given, but a relative change of eps({factor.dtype}) in A, B or d "
        f"can change it by up to the condition number times that. {advice}"
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
        Leading dims broadcast between ``factor`` and ``rhs``; dtype ``factor.dtype``.

    Notes
    -----
    ``x = D^{-1} y - D^{-1} A C^{-1} (B D^{-1} y)``: cost ``O(n mdim k + mdim^2 k)``.
    """
    rhs = rhs.to(factor.factor.dtype)
    scale = factor.scale.unsqueeze(-1)
    y = rhs / scale
    if factor.hermitian:  # x = D^{-1/2} (y~ - A~ C^{-1} A~^H y~), y~ = D^{-1/2} rhs
        inner = torch.cholesky_solve(factor.left.mH @ y, factor.factor)
        x = (y - factor.left @ inner) / scale
    else:
        inner = torch.linalg.lu_solve(factor.factor, factor.pivots, factor.right @ y)
        x = y - factor.left @ inner
    return x.to(factor.dtype)


def slogdet(factor: WoodburyFactor) -> tuple[Tensor, Tensor]:
    """``(sign, log|det(A @ B + D)|)`` by the matrix determinant lemma ``det M = det D det C``.

    Returns
    -------
    sign : Tensor, shape (...)
        ``-1``, ``0`` or ``1`` (a unit complex number for complex dtypes); 0 when ``C`` is singular.
    logabsdet : Tensor, shape (...)
        Real; ``-inf`` when ``C`` is singular; 0 for a 0 x 0 operator. Cost ``O(n + mdim)`` given
        the factorisation.
    """
    if factor.hermitian:
        logdet_c = 2 * factor.factor.diagonal(dim1=-2, dim2=-1).real.log().sum(-1)
        logabsdet = 2 * factor.scale.real.log().sum(-1) + logdet_c
        sign = torch.ones_like(logabsdet).to(factor.factor.dtype)
    else:
        sign_c, logabs_c = lu_slogdet(factor.factor, factor.pivots)
        d = factor.scale
        sign, logabsdet = torch.sgn(d).prod(-1) * sign_c, d.abs().log().sum(-1) + logabs_c
    return sign.to(factor.dtype), logabsdet.to(factor.dtype.to_real())
