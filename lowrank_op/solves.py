"""Solves and determinants of a product ``M = A @ B`` alone (no diagonal added).

What :meth:`FactoredMatrix.solve`, ``lstsq``, ``pinv``, ``slogdet``, ``logdet``, ``inv_quad`` and
``inv_quad_logdet`` compute, as pure functions of the factors (``A`` of shape ``(..., ldim, mdim)``,
``B`` of shape ``(..., mdim, rdim)``; leading dims broadcast):

* **Pseudo-inverse and least squares** from the factored SVD (:func:`lowrank_op.kernels.svd`):
  :func:`pinv_factors`, :func:`lstsq`. Any shape, any rank; nothing ``ldim x rdim`` is formed.
* **Direct solve** of a square ``A @ B`` with ``mdim >= ldim`` (:func:`product_solve`): the
  ``n x n`` product is then no larger than ``A``, so it is formed and LU-factorised, which is
  right for non-symmetric products (no CG). With ``mdim < ldim`` the product is singular.
* **Determinant** (:func:`product_slogdet`): exactly zero when ``mdim < ldim`` (rank below ``n``),
  NaN where a factor holds NaN or Inf (as ``torch.logdet`` of the formed product gives);
  otherwise the LU of the formed ``n x n`` product.

Also the helpers the Woodbury operator shares: :func:`as_columns` (validation of a right-hand
side), :func:`lu_slogdet`, :func:`logdet_from_slogdet`, :func:`inv_quad`. The operator
``A @ B + D`` is in :mod:`lowrank_op.woodbury` (kernels) and :mod:`lowrank_op.added_diag` (class).
No operator classes and no SciPy here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_op import conditioning
from lowrank_op._checks import check_broadcast
from lowrank_op.kernels import promote


# --- validation -----------------------------------------------------------------------------------
def as_columns(
    name: str, rhs: object, shape: torch.Size, dtype: torch.dtype, rows: int | None = None
) -> tuple[Tensor, bool]:
    """Validate a right-hand side for an operator of ``shape`` and ``dtype``.

    Parameters
    ----------
    name : str
        The argument's name, for the error messages.
    rhs : object
        Must be a Tensor of ``dtype``, shape ``(..., rows, k)`` or ``(rows,)``, whose leading dims
        broadcast with the operator's.
    rows : int, optional
        The number of rows wanted; default ``shape[-1]`` (the operator's columns).

    Returns
    -------
    rhs : Tensor, shape (..., rows, k)
    vector : bool
        Whether ``rhs`` was a vector (then ``k = 1``).
    """
    n = shape[-1] if rows is None else rows
    if not isinstance(rhs, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(rhs).__name__}.")
    if rhs.dtype != dtype:
        raise TypeError(f"`{name}` has dtype {rhs.dtype} but the operator has {dtype}; cast it with .to({dtype}).")
    got = rhs.shape[-1] if rhs.dim() == 1 else (rhs.shape[-2] if rhs.dim() >= 2 else None)
    if got != n:
        raise ValueError(
            f"`{name}` must have shape (..., {n}, k) or ({n},) for an operator of shape "
            f"{tuple(shape)}; got shape {tuple(rhs.shape)}."
        )
    check_broadcast("the operator", shape, f"`{name}`", rhs.shape)
    return (rhs.unsqueeze(-1), True) if rhs.dim() == 1 else (rhs, False)


def require_something(inv_quad_rhs: Tensor | None, logdet: bool) -> None:
    """ValueError when ``inv_quad_logdet`` is asked for neither of its parts."""
    if inv_quad_rhs is None and not logdet:
        raise ValueError("`inv_quad_logdet` needs `inv_quad_rhs`, `logdet=True`, or both.")


# --- determinants ---------------------------------------------------------------------------------
def lu_slogdet(LU: Tensor, pivots: Tensor) -> tuple[Tensor, Tensor]:
    """``(sign, log|det|)`` from ``torch.linalg.lu_factor`` output, each shape ``(...)``.

    Differentiable through ``LU``; ``(1, 0)`` for a 0 x 0 matrix.
    """
    diag = LU.diagonal(dim1=-2, dim2=-1)
    steps = torch.arange(1, pivots.shape[-1] + 1, device=pivots.device, dtype=pivots.dtype)
    swaps = (pivots != steps).sum(-1)
    perm_sign = 1 - 2 * (swaps % 2)
    sign = torch.sgn(diag).prod(-1) * perm_sign.to(diag.dtype)
    return sign, diag.abs().log().sum(-1)


def logdet_from_slogdet(sign: Tensor, logabsdet: Tensor) -> Tensor:
    """``log det`` as ``torch.logdet`` defines it.

    NaN where the determinant is negative or ``sign`` is NaN, ``-inf`` where it is zero; complex
    (``log|det| + i arg det``) for complex dtypes.
    """
    if sign.is_complex():
        return logabsdet.to(sign.dtype) + torch.log(sign)
    nan = torch.full_like(logabsdet, float("nan"))
    return torch.where(sign > 0, logabsdet, torch.where(sign == 0, -torch.inf, nan))


def _nonfinite_members(A: Tensor, B: Tensor) -> Tensor:
    """bool, shape ``batch``: members whose ``A`` or ``B`` holds a NaN or an Inf."""
    return ~torch.isfinite(A).flatten(-2).all(-1) | ~torch.isfinite(B).flatten(-2).all(-1)


def product_slogdet(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(sign, log|det(A @ B)|)`` of a square product, exactly.

    Parameters
    ----------
    A : Tensor, shape (..., n, mdim)
    B : Tensor, shape (..., mdim, n)

    Returns
    -------
    sign : Tensor, shape (...)
        ``-1``, ``0`` or ``1`` (a unit complex number for complex dtypes); NaN where a factor holds
        NaN or Inf.
    logabsdet : Tensor, shape (...)
        Real; ``-inf`` where the determinant is zero, NaN where a factor holds NaN or Inf.

    Notes
    -----
    With ``mdim < n`` the product has rank at most ``mdim < n``: its determinant is exactly zero
    (sign 0, ``-inf``) for finite factors, at cost ``O(n mdim)`` (the finiteness check). With a NaN
    or Inf in a factor the formed product would hold NaN (``inf * 0``, ``inf - inf``), and
    ``torch.logdet`` of it is NaN; so is this. Otherwise the ``n x n`` product, no larger than
    ``A``, is formed and LU-factorised: ``O(n^2 mdim + n^3)``. 16-bit factors give float32.

    Examples
    --------
    >>> A, B = torch.randn(5, 2), torch.randn(2, 5)
    >>> product_slogdet(A, B)
    (tensor(0.), tensor(-inf))
    >>> A[0, 0] = float("nan")
    >>> product_slogdet(A, B)
    (tensor(nan), tensor(nan))
    """
    A, B = promote(A, B)
    n, mdim = A.shape[-2], A.shape[-1]
    if mdim >= n:
        return torch.linalg.slogdet(A @ B)
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    bad = _nonfinite_members(A, B).expand(batch)
    real = A.dtype.to_real()
    nan = torch.tensor(float("nan"), dtype=real, device=A.device)
    logabsdet = torch.where(bad, nan, torch.tensor(-torch.inf, dtype=real, device=A.device))
    sign = torch.where(bad, nan, torch.zeros((), dtype=real, device=A.device)).to(A.dtype)
    if A.is_complex():  # NaN + NaN i, as torch.linalg.slogdet gives for complex NaN input
        sign = torch.where(bad, torch.complex(nan, nan).to(A.dtype), sign)
    return sign, logabsdet


# --- direct solve ---------------------------------------------------------------------------------
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
    cond = conditioning.lu_condition(M, LU, pivots, singular, conditioning.norm1(A) * conditioning.norm1(B))
    return torch.linalg.lu_solve(LU, pivots, rhs), cond


def solve_product(A: Tensor, B: Tensor, rhs: Tensor, stacklevel: int = 1) -> Tensor:
    """``(A @ B)^{-1} rhs`` for a square product: :func:`product_solve` behind the rank check and the warning.

    Parameters
    ----------
    A : Tensor, shape (..., n, mdim)
    B : Tensor, shape (..., mdim, n)
    rhs : Tensor, shape (..., n, k)
    stacklevel : int
        Where the :class:`~lowrank_op.errors.IllConditionedWarning` points, counted from the
        caller of this function (1: the caller itself).

    Raises
    ------
    ValueError
        ``mdim < n``: ``A @ B`` has rank below ``n``, so it is singular.
    RuntimeError
        An exact zero pivot (see :func:`product_solve`).
    """
    n, mdim = A.shape[-2], A.shape[-1]
    if mdim < n:
        raise ValueError(
            f"A @ B has rank at most mdim = {mdim} < {n} = ldim, so it is singular and solve "
            "has no answer. Use `fm.lstsq(y)` for the minimum-norm least-squares solution, or "
            "`fm.pinv()`; to regularise, solve `fm.add_jitter(v)` or `fm + diag` (Woodbury)."
        )
    x, cond = product_solve(A, B, rhs)
    message = conditioning.ill_conditioned_message("A @ B", cond, x.dtype, "Use `fm.lstsq(y)` or `fm.pinv()`.")
    conditioning.warn_ill_conditioned(message, stacklevel=stacklevel + 1)
    return x


def inv_quad(rhs: Tensor, solution: Tensor, reduce: bool) -> Tensor:
    """``sum_i r_i x_i`` over the rows of ``rhs`` and ``solution`` (``(..., n, k)``), as linear_operator
    defines ``inv_quad`` (no conjugate): shape ``(..., k)``, or ``(...)`` summed over the ``k``
    columns when ``reduce``."""
    quad = (rhs * solution).sum(-2)
    return quad.sum(-1) if reduce else quad


# --- pseudo-inverse and least squares -------------------------------------------------------------
def _pinv_scale(S: Tensor, ldim: int, rdim: int, rtol: float | None, atol: float) -> tuple[Tensor, int]:
    """``1 / S`` where ``S > max(atol, rtol * S_max)`` and 0 elsewhere, and how many columns to keep."""
    if rtol is None:
        rtol = max(ldim, rdim) * conditioning.eps(S.dtype) if atol == 0 else 0.0
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
