"""Pure-tensor kernels for a product ``M = A @ B`` held as its two factors.

Every function here takes the factors ``A`` of shape ``(..., ldim, mdim)`` and ``B`` of shape
``(..., mdim, rdim)`` (leading dims broadcast) and returns tensors. None of them forms ``A @ B``
when it is larger than the factors: the work is an orthogonal-triangular factorisation of each
factor (``O((ldim + rdim) * mdim^2)``) followed by dense linear algebra on a core of at most
``mdim x mdim``.

No classes and no SciPy here; :mod:`lowrank_op.factored` is a thin layer over these functions.

Structure
---------
* **Explicit methods are branch-free.** ``method="householder"`` and ``"cholqr2"`` (QR),
  ``"gram"`` and ``"qr"`` (norm) are straight-line tensor programs: CholeskyQR2 reports its
  failure as a boolean tensor per batch member (:func:`svd_flagged`, :func:`svdvals_flagged`)
  instead of branching on it, so they capture under ``torch.compile(fullgraph=True)``.
* **``"auto"`` is a thin dispatcher outside them.** It picks the QR of each factor from its
  shape (CholeskyQR2 when it has at least ``settings.cholqr2_min_aspect`` rows per column,
  Householder otherwise), reads the flags and falls back to Householder where CholeskyQR2 failed,
  and picks the norm formula from its error estimate; each decision is reported to
  :func:`lowrank_op.choices.record` with the figures it compared. Thresholds are read at run time
  from :mod:`lowrank_op.settings`.
* **Range.** Before a Gram matrix is formed (CholeskyQR2, the Gram norm) the factor is scaled by
  a power of two per batch member (exact) and the scale is put back on the result, so float32
  factors of size ``1e-25`` or ``1e20`` give the representable ``S`` and norm. Householder QR
  scales internally, and the core ``R_A R_B^H`` is as large as the product itself.
* **Non-finite input.** LAPACK's ``geev`` crashes the process on NaN in float32 and complex
  inputs and the SVD and ``syevd`` drivers raise; every LAPACK call on data derived from the
  factors goes through a guard that hands LAPACK zeros for a batch member holding a NaN or
  infinity and sets that member's results to NaN.
* **Gradients.** ``S`` and the norm differentiate through a core projected on orthonormal
  bases held constant (exact to first order; no QR backward, so rank-deficient and zero factors
  give finite gradients); :func:`svd` has an analytic backward for ``(U, S, V)`` pulled back to
  the factors (both in :mod:`lowrank_op._autograd`). Both are first-order only: a second
  derivative raises a RuntimeError that says so.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from lowrank_op import choices, settings
from lowrank_op._autograd import _apply_basis, _ProjectedCore, _SVDBackward
from lowrank_op._checks import check_choice

ORTHO_METHODS = ("auto", "householder", "cholqr2")
NORM_METHODS = ("auto", "gram", "qr")
_EXPLICIT_ORTHO = ("householder", "cholqr2")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decompositions run in: float32 for 16-bit floats, else ``dtype`` itself."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def promote(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast 16-bit factors to float32 (a factor-sized copy); other dtypes pass unchanged."""
    return tuple(t.to(compute_dtype(t.dtype)) for t in tensors)


_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of ``dtype`` (``dtype.to_real()``, which torch.compile cannot trace)."""
    return _REAL.get(dtype, dtype)


def _eye_like(X: Tensor, n: int) -> Tensor:
    return torch.eye(n, dtype=X.dtype, device=X.device)


def _lift(flags: Tensor, trailing: int) -> Tensor:
    """``flags`` of shape ``(...)`` with ``trailing`` size-1 dims appended, so that it broadcasts
    (right-aligned) against a batch of vectors (1) or matrices (2)."""
    return flags.reshape(flags.shape + (1,) * trailing)


# --- Guards: range and non-finite entries ---------------------------------------------------------
def _balance(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(X * 2^-e, 2^e)``: ``X`` scaled per batch member so its largest entry lies in ``[0.5, 1)``.

    The scale ``2^e`` (shape ``(..., 1, 1)``, real, detached) is a power of two, so the scaling is
    exact; ``e`` is clipped to keep ``2^e`` a normal number. Zero and non-finite members keep
    ``e = 0``. Cost ``O(numel)``.
    """
    real = _real_dtype(X.dtype)
    if X.shape[-1] == 0 or X.shape[-2] == 0:
        return X, torch.ones((*X.shape[:-2], 1, 1), dtype=real, device=X.device)
    amax = torch.linalg.vector_norm(X.detach(), float("inf"), dim=(-2, -1), keepdim=True)
    exponent = torch.frexp(torch.where(torch.isfinite(amax), amax, 0)).exponent
    limit = math.frexp(torch.finfo(real).max)[1] - 2
    scale = torch.exp2(exponent.clamp(-limit, limit).to(real))
    return X / scale, scale


def _gram_in_range(*diagonals: Tensor) -> bool:
    """Whether Gram matrices with these diagonals (squared column norms, shape ``(..., m)``) were
    formed without loss to underflow or overflow, so the factors need no balancing.

    True when every batch member's largest entry, multiplied over the ``diagonals`` given, is
    finite and within ``[tiny / eps^2, max * eps]``. Under ``torch.compile`` it is False without
    looking (the balanced path is branch-free); in eager mode it synchronises once on an
    ``m``-sized tensor, which saves a factor-sized pass in the common case.
    """
    if torch.compiler.is_compiling():
        return False
    real = diagonals[0].real.dtype
    finfo = torch.finfo(real)
    size = None
    for d in diagonals:
        if d.shape[-1] == 0:
            return True
        top = d.real.amax(-1)
        size = top if size is None else size * top
    return bool(((size >= finfo.tiny / finfo.eps**2) & (size <= finfo.max * finfo.eps)).all())


def _nonfinite(X: Tensor) -> Tensor:
    """True per batch member (shape ``(...)``) where ``X`` holds a NaN or an infinity."""
    if X.shape[-1] == 0 or X.shape[-2] == 0:
        return torch.zeros(X.shape[:-2], dtype=torch.bool, device=X.device)
    return ~torch.isfinite(X).all(-1).all(-1)


def _lapack_safe(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(X with non-finite batch members zeroed, their mask)``: what LAPACK may safely see."""
    bad = _nonfinite(X)
    return torch.where(_lift(bad, 2), torch.zeros((), dtype=X.dtype, device=X.device), X), bad


def _nan_where(bad: Tensor, Y: Tensor, trailing: int) -> Tensor:
    """``Y`` (a batch of vectors, ``trailing=1``, or matrices, 2) with the batch members flagged in
    ``bad`` (shape broadcasting to ``Y``'s leading dims) set to NaN."""
    nan = torch.full((), float("nan"), dtype=Y.dtype, device=Y.device)
    return torch.where(_lift(bad, trailing), nan, Y)


# --- Orthogonal-triangular factorisations ---------------------------------------------------------
#: ``(W, T, R)`` with ``X = (W @ T) @ R``: ``W`` None means the identity basis (``R`` is ``X``),
#: ``T`` None means ``Q = W``, ``W`` may be None also when ``Q`` was not asked for.
_Side = tuple[Tensor | None, Tensor | None, Tensor]


def _cholesky_upper_flagged(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(R, ok)``: the upper Cholesky factor of a Hermitian ``G`` where it succeeds (``ok`` True per
    batch member), the identity where it fails. Branch-free."""
    L, info = torch.linalg.cholesky_ex(G)
    ok = (info == 0) & torch.isfinite(L).all(-1).all(-1)
    return torch.where(_lift(ok, 2), L, _eye_like(G, G.shape[-1])).mH, ok


def _triangular_inverse(R: Tensor) -> Tensor:
    """``inv(R)`` for a small upper-triangular ``R`` (``m x m``)."""
    return torch.linalg.solve_triangular(R, _eye_like(R, R.shape[-1]), upper=True)


def _cholqr2_flagged(X: Tensor, max_defect: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """CholeskyQR2 of a tall ``X`` (``n >= m``), branch-free: ``(W, T, R, ok, first_ok, defect)``.

    ``X = (W @ T) @ R`` with ``Q = W @ T`` orthonormal where ``ok`` (shape ``(...)``) is True:
    ``W`` is the first pass's ``X inv(R_1)`` (``n x m``) and ``T = inv(R_2)`` (``m x m``) the
    second pass's correction, left unapplied so that ``Q @ Y`` for a small ``Y`` costs one
    ``n x m`` product, ``W @ (T @ Y)``. ``ok`` is False where a Cholesky factorisation failed
    (``first_ok`` says whether the first did) or where the first pass's orthogonality defect
    ``|W^H W - I|_F`` (``defect``) exceeds ``max_defect``; members holding NaN or infinity count as
    ``ok`` (their results are NaN). When the Gram matrix's diagonal shows lost range (see
    :func:`_gram_in_range`; always under ``torch.compile``), ``X`` is scaled by a power of two
    per batch member and the Gram matrix formed again, so it neither underflows nor overflows.
    """
    G1 = X.mH @ X
    if _gram_in_range(G1.diagonal(dim1=-2, dim2=-1)):
        Xs, scale = X, torch.ones((), dtype=_real_dtype(X.dtype), device=X.device)
    else:
        Xs, scale = _balance(X)
        G1 = Xs.mH @ Xs
    nonfinite = ~torch.isfinite(G1).all(-1).all(-1)  # NaN or infinity in X reaches its Gram matrix
    R1, first_ok = _cholesky_upper_flagged(G1)
    W = Xs @ _triangular_inverse(R1)
    G2 = W.mH @ W
    eye = _eye_like(G2, G2.shape[-1])
    defect = torch.linalg.matrix_norm(G2 - eye)
    small = defect <= max_defect  # False for NaN
    R2, second_ok = _cholesky_upper_flagged(torch.where(_lift(small, 2), G2, eye))
    ok = (first_ok & small & second_ok) | nonfinite
    return W, _triangular_inverse(R2), _nan_where(nonfinite, (R2 @ R1) * scale, 2), ok, first_ok, defect


def _householder(X: Tensor, want_q: bool) -> _Side:
    if not want_q and not (torch.is_grad_enabled() and X.requires_grad):  # mode="r" has no derivative
        return None, None, torch.linalg.qr(X, mode="r")[1]
    Q, R = torch.linalg.qr(X, mode="reduced")
    return Q, None, R


def _check_cholqr2_shape(X: Tensor) -> None:
    if X.shape[-2] < X.shape[-1]:
        raise ValueError(
            f"`method='cholqr2'` needs a factor with at least as many rows as columns; got shape "
            f"{tuple(X.shape)}. Use `method='householder'` or `method='auto'`."
        )


def _cholqr2_cause(X: Tensor, ok: Tensor, first_ok: Tensor, defect: Tensor, max_defect: float) -> str:
    """One sentence on why CholeskyQR2 failed, with the figures (a host synchronisation)."""
    failed = f"{int((~ok).sum())} of {ok.numel()} batch member(s)" if ok.dim() else "the factor"
    if not bool(first_ok.all()):
        return (
            f"the Cholesky factorisation of its Gram matrix failed on {failed} (numerically "
            "rank-deficient, or condition number above about eps**-0.5)"
        )
    worst = float(torch.where(ok, 0, defect.nan_to_num(float("inf"))).max())
    if worst > max_defect:
        return (
            f"the first pass's orthogonality defect |Q^H Q - I|_F reached {worst:.3g} > "
            f"cholqr2_max_defect {max_defect:g} on {failed}"
        )
    return f"the second Cholesky factorisation failed on {failed}"


def _resolve_ortho(X: Tensor, method: str, name: str) -> str:
    """The explicit QR method for ``X``; an ``"auto"`` choice is recorded with its figures."""
    if method != "auto":
        if method == "cholqr2":
            _check_cholqr2_shape(X)
        return method
    n, m = X.shape[-2:]
    min_aspect = settings.cholqr2_min_aspect.value()
    chosen = "cholqr2" if n >= min_aspect * m else "householder"
    ratio = f"{n / m:.3g}" if m else "inf"
    choices.record(
        "orthogonalize",
        chosen,
        f"{name} of shape {tuple(X.shape)} has {ratio} rows per column, "
        f"{'at least' if chosen == 'cholqr2' else 'below'} cholqr2_min_aspect = {min_aspect:g}.",
    )
    return chosen


def _factorise(X: Tensor, method: str, want_q: bool, name: str) -> _Side:
    """QR of one factor through the dispatcher: ``"auto"`` falls back from CholeskyQR2 to
    Householder where it failed (recorded), explicit ``"cholqr2"`` raises there."""
    chosen = _resolve_ortho(X, method, name)
    if chosen == "householder":
        return _householder(X, want_q)
    max_defect = settings.cholqr2_max_defect.value()
    W, T, R, ok, first_ok, defect = _cholqr2_flagged(X, max_defect)
    if bool(ok.all()):
        return W, T, R
    cause = _cholqr2_cause(X, ok, first_ok, defect, max_defect)
    if method == "cholqr2":
        raise RuntimeError(
            f"CholeskyQR2 failed on a factor of shape {tuple(X.shape)}: {cause}; it is rank-deficient or "
            "too ill-conditioned for a Gram-matrix method. Use `method='householder'` or "
            "`method='auto'` (which falls back by itself)."
        )
    choices.record(
        "orthogonalize", "householder", f"CholeskyQR2 on {name} of shape {tuple(X.shape)} fell back: {cause}."
    )
    return _householder(X, want_q)


def _factorise_flagged(X: Tensor, method: str, want_q: bool) -> tuple[_Side, Tensor | None]:
    """QR of one factor by an explicit method, branch-free: ``(side, ok)`` (``ok`` None: cannot fail)."""
    if method == "householder":
        return _householder(X, want_q), None
    _check_cholqr2_shape(X)
    W, T, R, ok, _, _ = _cholqr2_flagged(X, settings.cholqr2_max_defect.value())
    return (W, T, R), ok


def orthogonalize(X: Tensor, method: str = "auto", want_q: bool = True) -> tuple[Tensor | None, Tensor]:
    """Reduced QR factorisation ``X = Q @ R``.

    Parameters
    ----------
    X : Tensor, shape (..., n, m)
    method : {"auto", "householder", "cholqr2"}
        ``"householder"``: LAPACK's Householder QR, the reference. ``"cholqr2"``: CholeskyQR2
        (Gram matrix, Cholesky, once more; ``X`` scaled by a power of two where the Gram matrix
        would lose range), BLAS-3 only; raises RuntimeError when a Cholesky fails or the first
        pass's orthogonality defect ``|Q_1^H Q_1 - I|_F`` exceeds ``settings.cholqr2_max_defect``
        (rank-deficient or ill-conditioned ``X``). ``"auto"``: CholeskyQR2 when
        ``n >= settings.cholqr2_min_aspect * m``, falling back to Householder by itself (and
        recording why in :mod:`lowrank_op.choices`) when CholeskyQR2 fails; Householder otherwise.
    want_q : bool
        When false, ``Q`` is not formed (``None`` is returned in its place).

    Returns
    -------
    Q : Tensor, shape (..., n, p), or None
        Orthonormal columns, ``p = min(n, m)``.
    R : Tensor, shape (..., p, m)
        Upper triangular (trapezoidal when ``m > n``).

    Notes
    -----
    Cost ``O(n m^2)``. CholeskyQR2 is accurate when ``cond(X)`` is below about ``eps**-0.5``
    (Yamamoto, Nakatsukasa, Yanagisawa and Fukaya, 2015); the defect check guards the rest.
    Gradients flow through both paths by ordinary autograd.
    """
    check_choice("method", method, ORTHO_METHODS)
    W, T, R = _factorise(X, method, want_q, "the factor")
    if not want_q:
        return None, R
    return (W if T is None else W @ T), R


# --- The small core -------------------------------------------------------------------------------
def _sides(A: Tensor, B: Tensor, method: str, want_q: bool, flagged: bool) -> tuple[_Side, _Side, Tensor | None]:
    """``(side_A, side_B, ok)``: QR of ``A`` and of ``B^H`` where the factor is tall, else the factor
    itself with an identity basis. With ``flagged`` the methods must be explicit and run
    branch-free (``ok``: per batch member, None when nothing can fail); else through
    :func:`_factorise` (``ok`` None)."""
    ldim, mdim = A.shape[-2:]
    rdim = B.shape[-1]
    sides, flags = [], []
    for X, tall, name in ((A, mdim < ldim, "A"), (B.mH, mdim < rdim, "B^H")):
        if not tall:
            sides.append((None, None, X))
        else:
            if flagged:
                side, ok = _factorise_flagged(X, method, want_q)
                flags.append(ok)
            else:
                side = _factorise(X, method, want_q, name)
            # Without Q, drop CholeskyQR2's n x m buffer W now, before the other factor is
            # factorised: the peak is then one factor-sized buffer, not two.
            sides.append(side if want_q else (None, None, side[2]))
            del side  # the loop variable would keep W alive through the next factorisation
    flags = [f for f in flags if f is not None]
    ok = flags[0] & flags[1] if len(flags) == 2 else (flags[0] if flags else None)
    return sides[0], sides[1], ok


def _needs_grad(*tensors: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _core(
    A: Tensor, B: Tensor, method: str, flagged: bool = False, what: str = "singular values"
) -> tuple[Tensor, Tensor | None]:
    """``(C, ok)``: the core ``C = R_A R_B^H`` (at most ``mdim x mdim``) with ``A @ B = Q_A C Q_B^H``.

    When gradients are recorded, the factorisations run without them and ``C`` carries the
    first-order gradient of :class:`lowrank_op._autograd._ProjectedCore`; else ``Q`` is not formed (``mode="r"``).
    """
    if not _needs_grad(A, B):
        side_A, side_B, ok = _sides(A, B, method, want_q=False, flagged=flagged)
        return side_A[2] @ side_B[2].mH, ok
    with torch.no_grad():
        (W_A, T_A, R_A), (W_B, T_B, R_B), ok = _sides(A.detach(), B.detach(), method, want_q=True, flagged=flagged)
    return _ProjectedCore.apply(A, B, R_A, R_B, W_A, T_A, W_B, T_B, what), ok


def _unbalance(S: Tensor, scale_A: Tensor, scale_B: Tensor) -> Tensor:
    """Values ``(..., k)`` of the balanced product scaled back by the factors' scales."""
    return S * scale_A[..., 0] * scale_B[..., 0]


def _svdvals_safe(C: Tensor) -> Tensor:
    C, bad = _lapack_safe(C)
    return _nan_where(bad, torch.linalg.svdvals(C), 1)


def _check_ortho_method(method: str, flagged: bool) -> None:
    check_choice("method", method, _EXPLICIT_ORTHO if flagged else ORTHO_METHODS)


def _svdvals(A: Tensor, B: Tensor, method: str, flagged: bool) -> tuple[Tensor, Tensor | None]:
    _check_ortho_method(method, flagged)
    A, B = promote(A, B)
    C, ok = _core(A, B, method, flagged)
    S = _svdvals_safe(C)
    return (S if ok is None else _nan_where(~ok, S, 1)), ok


def svdvals(A: Tensor, B: Tensor, method: str = "auto") -> Tensor:
    """Singular values of ``A @ B``, descending, shape ``(..., min(ldim, mdim, rdim))``.

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, rdim)
    method : {"auto", "householder", "cholqr2"}
        How each factor is orthogonalised; see :func:`orthogonalize`.

    Notes
    -----
    As :func:`svd` but never forms ``Q``, ``U`` or ``V`` (without gradients): cost
    ``O((ldim + rdim) mdim^2 + mdim^3)`` with a smaller constant. With gradients, ``Q`` is formed
    and the backward is ``dA = Q_A gC R_B``, ``dB = R_A^H gC Q_B^H`` with
    ``gC = U_c diag(gS) V_c^H`` (first order only; see :class:`lowrank_op._autograd._ProjectedCore`), finite on
    rank-deficient and zero factors. A batch member holding NaN or infinity gives NaN.
    """
    return _svdvals(A, B, method, flagged=False)[0]


def svdvals_flagged(A: Tensor, B: Tensor, method: str = "householder") -> tuple[Tensor, Tensor | None]:
    """:func:`svdvals` by an explicit method, branch-free (``torch.compile(fullgraph=True)``).

    Returns ``(S, ok)``: ``ok`` (shape ``(...)``, bool) is False where CholeskyQR2 failed, and
    ``S`` is NaN there; None when no factor went through CholeskyQR2. ``method`` is
    ``"householder"`` or ``"cholqr2"``; nothing falls back and nothing is recorded.
    """
    return _svdvals(A, B, method, flagged=True)


def _svd(A: Tensor, B: Tensor, method: str, flagged: bool) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    _check_ortho_method(method, flagged)
    A, B = promote(A, B)
    grad = _needs_grad(A, B)
    with torch.no_grad() if grad else contextlib.nullcontext():
        Ad, Bd = (A.detach(), B.detach()) if grad else (A, B)
        (W_A, T_A, R_A), (W_B, T_B, R_B), ok = _sides(Ad, Bd, method, want_q=True, flagged=flagged)
        C, bad = _lapack_safe(R_A @ R_B.mH)
        U_c, _, Vh_c = torch.linalg.svd(C, full_matrices=False)
        S = torch.linalg.svdvals(C)  # values-only: high relative accuracy on small singular values
        if ok is not None:
            bad = bad | ~ok
        # NaN in the small factors reaches every entry of U = Q_A U_c and V = Q_B V_c.
        U_c, S, V_c = _nan_where(bad, U_c, 2), _nan_where(bad, S, 1), _nan_where(bad, Vh_c.mH, 2)
    if grad:
        U, S, V = _SVDBackward.apply(A, B, W_A, T_A, U_c, S, W_B, T_B, V_c)
    else:
        U, V = _apply_basis((W_A, T_A), U_c), _apply_basis((W_B, T_B), V_c)
    return U, S, V, ok


def svd(A: Tensor, B: Tensor, method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``A @ B`` through the factors.

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, rdim)
    method : {"auto", "householder", "cholqr2"}
        How each tall factor is orthogonalised; see :func:`orthogonalize` (``"auto"``:
        CholeskyQR2 on a factor with at least ``settings.cholqr2_min_aspect`` rows per column,
        falling back to Householder where it fails; Householder otherwise; each choice recorded
        in :mod:`lowrank_op.choices`). ``"householder"`` runs branch-free (compiles with
        ``fullgraph=True``); for CholeskyQR2 inside a compiled graph use :func:`svd_flagged`.

    Returns
    -------
    U : Tensor, shape (..., ldim, k)
    S : Tensor, shape (..., k)
        Descending, real. ``k = min(ldim, mdim, rdim)``.
    V : Tensor, shape (..., rdim, k)
        ``A @ B == U @ diag(S) @ V.mH``.

    Notes
    -----
    ``A = Q_A R_A`` and ``B^H = Q_B R_B``; then
    ``A B = Q_A (R_A R_B^H) Q_B^H`` and the SVD of the ``min(ldim, mdim) x min(rdim, mdim)`` core
    gives ``U = Q_A U_c``, ``V = Q_B V_c``. Cost ``O((ldim + rdim) mdim^2 + mdim^3)``; memory a
    few factor-sized buffers. ``S`` comes from a values-only SVD of the core, which keeps high
    relative accuracy on small singular values. 16-bit inputs are computed and returned in
    float32. A batch member holding NaN or infinity gives NaN (LAPACK never sees it).

    Gradients use the analytic backward of :class:`lowrank_op._autograd._SVDBackward` (no QR backward): through ``S``
    they are finite on rank-deficient factors; through ``U`` and ``V`` they are undefined at
    repeated non-zero singular values (infinite there, as for ``torch.linalg.svd``). First order
    only: a second derivative raises RuntimeError.
    """
    return _svd(A, B, method, flagged=False)[:3]


def svd_flagged(A: Tensor, B: Tensor, method: str = "householder") -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`svd` by an explicit method, branch-free (``torch.compile(fullgraph=True)``).

    Returns ``(U, S, V, ok)``: ``ok`` (shape ``(...)``, bool) is False where CholeskyQR2 failed
    and ``U``, ``S``, ``V`` are NaN there; None when no factor went through CholeskyQR2.
    ``method`` is ``"householder"`` or ``"cholqr2"``; nothing falls back and nothing is recorded.
    """
    return _svd(A, B, method, flagged=True)


# --- Norms and traces -----------------------------------------------------------------------------
def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(max(x, 0))`` with derivative 0 at 0 (as ``torch.linalg.matrix_norm`` at a zero matrix);
    NaN stays NaN."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, 1).sqrt(), torch.where(torch.isnan(x), x, 0))


def _gram_norm(G_A: Tensor, G_B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(norm, total, magnitude)`` from ``G_A = A^H A`` and ``G_B = B B^H``: the Gram formula and
    the figures of its error estimate."""
    terms = G_A * G_B.mT
    total = terms.sum((-2, -1)).real
    return _safe_sqrt(total), total, terms.abs().sum((-2, -1))


def _qr_norm(A: Tensor, B: Tensor) -> Tensor:
    C, _ = _core(A, B, "householder", what="norm")
    C, scale = _balance(C)  # matrix_norm squares the entries: keep them in range
    return torch.linalg.matrix_norm(C) * scale[..., 0, 0]


def frobenius_norm(A: Tensor, B: Tensor, method: str = "auto") -> Tensor:
    """Frobenius norm of ``A @ B``, shape ``(...)``, real.

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, rdim)
    method : {"auto", "gram", "qr"}
        ``"gram"``: ``sqrt(sum((A^H A) * (B B^H)^T))``, two ``mdim x mdim`` Gram matrices, cost
        ``O((ldim + rdim) mdim^2)`` in BLAS-3. Its rounding error grows as the terms ``t`` of the
        sum cancel (``A @ B`` much smaller than ``|A| |B|``). ``"qr"``: the norm of the QR core of
        :func:`svdvals`, accurate to ``eps * |A| |B|`` always. ``"auto"``: ``"gram"``, unless its
        estimated relative error ``eps * sum(|t|) / sum(t)`` exceeds
        ``settings.gram_norm_max_rel_error`` for some batch member; then ``"qr"`` for all. The
        choice and both figures are recorded in :mod:`lowrank_op.choices`.

    Notes
    -----
    When the Gram matrices' diagonals show lost range (``max diag(A^H A) * max diag(B B^H)``
    outside ``[tiny / eps^2, max * eps]``, or non-finite), each factor is scaled by a power of two
    per batch member (exact) and the Gram matrices are formed again, so float32 factors of size
    ``1e-25`` or ``1e20`` give the representable norm. That check synchronises once in eager
    mode; under ``torch.compile`` the factors are always scaled, and ``"gram"`` and ``"qr"``
    capture with ``fullgraph=True``; ``"auto"`` synchronises once more for its choice. The QR
    core of ``"qr"`` always runs Householder QR. The gradient at a zero product is 0 (as
    ``torch.linalg.matrix_norm``'s); through ``"qr"`` it is first order only (see
    :class:`lowrank_op._autograd._ProjectedCore`); through ``"gram"`` second derivatives are ordinary autograd.
    """
    check_choice("method", method, NORM_METHODS)
    A, B = promote(A, B)
    one = torch.ones((1, 1), dtype=_real_dtype(A.dtype), device=A.device)
    scale_A = scale_B = one
    if method == "qr":
        norm = _qr_norm(A, B)
    else:
        G_A, G_B = A.mH @ A, B @ B.mH
        if not _gram_in_range(G_A.diagonal(dim1=-2, dim2=-1), G_B.diagonal(dim1=-2, dim2=-1)):
            A, scale_A = _balance(A)
            B, scale_B = _balance(B)
            G_A, G_B = A.mH @ A, B @ B.mH
        norm, total, magnitude = _gram_norm(G_A, G_B)
        if method == "auto":
            limit = settings.gram_norm_max_rel_error.value()
            eps = torch.finfo(total.dtype).eps
            ok = eps * magnitude <= limit * total
            ratio = eps * magnitude.detach() / total.detach().clamp_min(torch.finfo(total.dtype).tiny)
            estimate = float(ratio.max()) if ratio.numel() else 0.0
            gram = bool(ok.all())
            choices.record(
                "norm",
                "gram" if gram else "qr",
                f"estimated relative error of the Gram formula {estimate:.3g} "
                f"{'<=' if gram else '>'} gram_norm_max_rel_error = {limit:g}.",
            )
            if not gram:
                norm = _qr_norm(A, B)
    return _unbalance(norm[..., None], scale_A, scale_B)[..., 0]


def trace(A: Tensor, B: Tensor) -> Tensor:
    """Trace of a square ``A @ B`` as ``sum(A * B^T)``: shape ``(...)``, cost ``O(ldim mdim)``."""
    return (A * B.mT).sum((-2, -1))


def diagonal(A: Tensor, B: Tensor) -> Tensor:
    """Diagonal of a square ``A @ B``: shape ``(..., ldim)``, cost ``O(ldim mdim)``."""
    return (A * B.mT).sum(-1)


# --- Eigenvalues ----------------------------------------------------------------------------------
def _pad_zeros(values: Tensor, size: int) -> Tensor:
    """``values`` (..., k) extended with exact zeros to (..., size): the null space's eigenvalues."""
    return torch.cat([values, values.new_zeros((*values.shape[:-1], size - values.shape[-1]))], dim=-1)


def _sort_by_magnitude(values: Tensor) -> Tensor:
    order = torch.sort(values.abs(), dim=-1, descending=True, stable=True).indices
    return torch.gather(values, -1, order)


def _eigvals_safe(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(torch.linalg.eigvals(X), bad)`` with LAPACK's ``geev`` never seeing a non-finite member."""
    X, bad = _lapack_safe(X)
    return torch.linalg.eigvals(X), bad


def eigvals(A: Tensor, B: Tensor) -> Tensor:
    """Eigenvalues of a square ``A @ B``, complex, shape ``(..., mdim)``, by descending modulus.

    Notes
    -----
    ``A B`` and ``B A`` share their non-zero eigenvalues (``B A v = k v`` gives
    ``A B (A v) = k (A v)``), so the ``mdim x mdim`` matrix ``B A`` is decomposed, cost
    ``O(ldim mdim^2 + mdim^3)``. When ``ldim < mdim`` the smaller ``ldim x ldim`` ``A B`` is
    decomposed instead and padded with ``mdim - ldim`` exact zeros, the eigenvalues ``B A`` has
    beyond ``A B``'s. A batch member whose matrix holds NaN or infinity gets NaN eigenvalues
    (LAPACK's ``geev`` would crash the process on it).
    """
    A, B = promote(A, B)
    ldim, mdim = A.shape[-2:]
    if ldim < mdim:
        values, bad = _eigvals_safe(A @ B)
        values = _pad_zeros(values, mdim)
    else:
        values, bad = _eigvals_safe(B @ A)
    return _nan_where(bad, _sort_by_magnitude(values), 1)


def reverse_product_eigvals(A: Tensor, B: Tensor) -> Tensor:
    """Eigenvalues of ``B @ A``, complex, shape ``(..., mdim)``, in LAPACK's order (unsorted).

    What TransformerLens's ``FactoredMatrix.eigenvalues`` returns: ``torch.linalg.eig(B @ A)``.
    For a square ``A @ B`` these are its non-zero eigenvalues plus, when ``mdim > ldim``,
    ``mdim - ldim`` more that are zero up to rounding (compare :func:`eigvals`, which sorts by
    modulus and makes those zeros exact). Cost ``O(ldim mdim^2 + mdim^3)``. 16-bit inputs are
    computed in float32 (complex64 results). A batch member holding NaN or infinity gets NaN.
    """
    A, B = promote(A, B)
    values, bad = _eigvals_safe(B @ A)
    return _nan_where(bad, values, 1)


def _balance_inner(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``(A D, D^-1 B)`` for the power-of-two diagonal ``D`` that brings each column norm of ``A``
    and the matching row norm of ``B`` to within a factor 2 of each other: the product is
    unchanged (exactly), and ``|A D|_F |D^-1 B|_F`` comes close to what the product needs.
    Cost ``O((ldim + rdim) mdim)``; the factors are expanded to the broadcast batch."""
    if A.shape[-1] == 0 or A.shape[-2] == 0 or B.shape[-1] == 0:
        return A, B
    a = torch.linalg.vector_norm(A.detach(), dim=-2)  # (..., mdim)
    b = torch.linalg.vector_norm(B.detach(), dim=-1)
    usable = (a > 0) & (b > 0) & torch.isfinite(a) & torch.isfinite(b)
    ratio = torch.where(usable, b, 1) / torch.where(usable, a, 1)
    exponent = torch.frexp(torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, 1)).exponent
    limit = math.frexp(torch.finfo(a.dtype).max)[1] - 2
    d = torch.exp2(torch.div(exponent, 2, rounding_mode="floor").clamp(-limit, limit).to(a.dtype))
    return A * d[..., None, :], B / d[..., :, None]


def _hermitian_defect(T: Tensor, R_A: Tensor | None = None, B: Tensor | None = None, Q: Tensor | None = None) -> Tensor:
    """How far a square ``A @ B`` is from Hermitian, from its projected core; shape ``(...)``.

    With ``A = Q R_A`` (``Q`` orthonormal, ``n x mdim``) and ``T = Q^H A B Q``, ``A B`` is
    Hermitian exactly when ``T`` is and ``A B (I - Q Q^H) = 0``. The defect is
    ``|T - T^H|_F + |R_A (B - (B Q) Q^H)|_F``, an ``mdim x n`` computation. Without ``Q``
    (``T`` is ``A @ B`` itself) it is ``|T - T^H|_F``.
    """
    defect = torch.linalg.matrix_norm(T - T.mH)
    if Q is not None:
        defect = defect + torch.linalg.matrix_norm(R_A @ (B - (B @ Q) @ Q.mH))
    return defect


def symeig(A: Tensor, B: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor | None]:
    """Eigendecomposition of a Hermitian (symmetric) ``A @ B``, which may be indefinite.

    Parameters
    ----------
    A : Tensor, shape (..., n, mdim)
    B : Tensor, shape (..., mdim, n)
    eigenvectors : bool

    Returns
    -------
    evals : Tensor, shape (..., n)
        Ascending and real; negative eigenvalues are kept (no clamping). When ``mdim < n``,
        ``n - mdim`` of them are the exact zeros of the null space. NaN for a batch member whose
        factors hold NaN or infinity.
    evecs : Tensor, shape (..., n, n), or None

    Raises
    ------
    ValueError
        When ``A @ B`` is not Hermitian to within ``sqrt(eps) * |A @ B|_F`` (``eps`` of the
        input dtype, ``|A @ B|_F`` from :func:`frobenius_norm`), for any finite batch member.

    Notes
    -----
    The inner dim is balanced first (``A D``, ``D^-1 B`` for a power-of-two diagonal ``D``), so
    factors with columns and rows scaled inversely are judged by their product. With ``Q`` an
    orthonormal basis of ``range(A)`` (Householder QR, ``n x mdim``), ``A B = Q T Q^H`` for the
    ``mdim x mdim`` ``T = R_A (B Q)``, so its eigenvalues are those of ``T`` plus zeros. Cost
    ``O(n mdim^2 + mdim^3)`` for values; vectors add a complete QR of ``A`` (``O(n^2 mdim)`` and
    an ``n x n`` output).
    """
    tol = torch.finfo(A.dtype).eps ** 0.5  # of the input dtype: 16-bit products are symmetric only to 16 bits
    A, B = promote(A, B)
    A, B = _balance_inner(A, B)
    n, mdim = A.shape[-2:]
    if mdim >= n:
        Q, Q_full, R_A = None, None, None
        T = A @ B
    else:
        mode = "complete" if eigenvectors else "reduced"
        Q_full, R = torch.linalg.qr(A, mode=mode)
        Q, R_A = Q_full[..., :mdim], R[..., :mdim, :]
        T = R_A @ (B @ Q)
    scale = frobenius_norm(A, B).detach()
    defect = _hermitian_defect(T, R_A, B, Q).detach()
    T, bad = _lapack_safe(T)
    bad = bad | ~torch.isfinite(scale) | ~torch.isfinite(defect)
    accepted = (defect <= tol * scale) | bad
    if not bool(accepted.all()):
        relative = torch.where(accepted, 0, defect / scale.clamp_min(torch.finfo(scale.dtype).tiny))
        raise ValueError(
            "eigh/eigvalsh need a Hermitian (symmetric) product A @ B; this one has relative "
            f"asymmetry |M - M^H|_F / |M|_F = {float(relative.max()):.2e} (tolerance {tol:.1e}). "
            "Use `.eigenvalues` for the eigenvalues of a general square product."
        )
    T = (T + T.mH) / 2
    if not eigenvectors:
        evals = torch.linalg.eigvalsh(T)
        if Q is not None:
            evals = torch.sort(_pad_zeros(evals, n), -1).values
        return _nan_where(bad, evals, 1), None
    evals, W = torch.linalg.eigh(T)
    if Q is None:
        return _nan_where(bad, evals, 1), _nan_where(bad, W, 2)
    evals = _pad_zeros(evals, n)
    evecs = torch.cat([Q @ W, Q_full[..., mdim:]], -1)
    order = torch.sort(evals, dim=-1, stable=True).indices
    evals = torch.gather(evals, -1, order)
    evecs = torch.gather(evecs, -1, order.unsqueeze(-2).expand(evecs.shape))
    return _nan_where(bad, evals, 1), _nan_where(bad, evecs, 2)
