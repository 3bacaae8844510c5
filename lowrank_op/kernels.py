"""Pure-tensor kernels for a product ``M = A @ B`` held as its two factors.

Every function here takes the factors ``A`` of shape ``(..., ldim, mdim)`` and ``B`` of shape
``(..., mdim, rdim)`` (leading dims broadcast) and returns tensors. None of them forms ``A @ B``
when it is larger than the factors: the work is an orthogonal-triangular factorisation of each
factor (``O((ldim + rdim) * mdim^2)``) followed by dense linear algebra on a core of at most
``mdim x mdim``.

No classes and no SciPy here; :mod:`lowrank_op.factored` is a thin layer over these functions.

Thresholds that select an algorithm live in the block of constants below and nowhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_op._checks import check_choice

# --- Thresholds (the only place they live) -------------------------------------------------------
#: ``method="auto"`` orthogonalises a factor with CholeskyQR2 when it has at least this many rows
#: per column; shorter factors use Householder QR, which is as fast there (bench/bench_svd.py).
CHOLQR2_MIN_ASPECT = 4
#: CholeskyQR2 is abandoned (and Householder QR used instead) when the Gram matrix of the first
#: pass's Q deviates from the identity by more than this in Frobenius norm. Below it, the second
#: pass is known to give a Q orthogonal to working precision (Yamamoto et al., 2015).
CHOLQR2_MAX_DEFECT = 0.1
#: ``norm(method="auto")`` uses the Gram-matrix formula unless its estimated relative error,
#: ``eps / cancellation`` with ``cancellation = |sum(t)| / sum(|t|)`` over its terms ``t``,
#: exceeds this; then it takes the norm of the QR core, which is accurate to ``eps * |A| |B|``.
GRAM_NORM_MAX_REL_ERROR = 1e-6

ORTHO_METHODS = ("auto", "householder", "cholqr2")
NORM_METHODS = ("auto", "gram", "qr")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decompositions run in: float32 for 16-bit floats, else ``dtype`` itself."""
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def promote(*tensors: Tensor) -> tuple[Tensor, ...]:
    """Cast 16-bit factors to float32 (a factor-sized copy); other dtypes pass unchanged."""
    return tuple(t.to(compute_dtype(t.dtype)) for t in tensors)


def _eye_like(X: Tensor, n: int) -> Tensor:
    return torch.eye(n, dtype=X.dtype, device=X.device)


# --- Orthogonal-triangular factorisations ---------------------------------------------------------
def _cholesky_upper(G: Tensor) -> Tensor | None:
    """Upper Cholesky factor of a Hermitian Gram matrix, or None where any batch member fails."""
    L, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()) or not bool(torch.isfinite(L).all()):
        return None
    return L.mH


def _triangular_inverse(R: Tensor) -> Tensor:
    """``inv(R)`` for a small upper-triangular ``R`` (``m x m``)."""
    return torch.linalg.solve_triangular(R, _eye_like(R, R.shape[-1]), upper=True)


def _cholqr2(X: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """CholeskyQR2 of a tall ``X`` (``n >= m``), or None when it is not safe to use.

    Returns ``(W, T, R)`` with ``X = (W @ T) @ R`` and ``Q = W @ T`` orthonormal: ``W`` is the
    first pass's ``X inv(R_1)`` (``n x m``) and ``T = inv(R_2)`` (``m x m``) the second pass's
    correction, left unapplied so that a caller who needs ``Q @ Y`` for a small ``Y`` pays one
    ``n x m`` product, ``W @ (T @ Y)``, instead of two. None when a Cholesky factorisation fails
    or the first pass lost orthogonality beyond ``CHOLQR2_MAX_DEFECT``.
    """
    R1 = _cholesky_upper(X.mH @ X)
    if R1 is None:
        return None
    W = X @ _triangular_inverse(R1)
    G2 = W.mH @ W
    defect = torch.linalg.matrix_norm(G2 - _eye_like(G2, G2.shape[-1]))
    if not bool((defect <= CHOLQR2_MAX_DEFECT).all()):  # also catches NaN
        return None
    R2 = _cholesky_upper(G2)
    if R2 is None:
        return None
    return W, _triangular_inverse(R2), R2 @ R1


def _resolve_ortho(X: Tensor, method: str) -> str:
    n, m = X.shape[-2:]
    if method == "auto":
        return "cholqr2" if n >= CHOLQR2_MIN_ASPECT * m else "householder"
    if method == "cholqr2" and n < m:
        raise ValueError(
            f"`method='cholqr2'` needs a factor with at least as many rows as columns; got shape "
            f"{tuple(X.shape)}. Use `method='householder'` or `method='auto'`."
        )
    return method


def _basis(X: Tensor, method: str, want_q: bool) -> tuple[Tensor | None, Tensor | None, Tensor]:
    """``(W, T, R)`` with ``X = Q R`` and ``Q = W @ T`` (``T`` None: ``Q = W``; ``W`` None: not formed)."""
    check_choice("method", method, ORTHO_METHODS)
    if _resolve_ortho(X, method) == "cholqr2":
        result = _cholqr2(X)
        if result is not None:
            return result
        if method == "cholqr2":
            raise RuntimeError(
                f"CholeskyQR2 failed on a factor of shape {tuple(X.shape)}: it is rank-deficient or "
                "too ill-conditioned for a Gram-matrix method. Use `method='householder'` or "
                "`method='auto'` (which falls back by itself)."
            )
    if not want_q and not X.requires_grad:  # mode="r" has no derivative
        return None, None, torch.linalg.qr(X, mode="r")[1]
    Q, R = torch.linalg.qr(X, mode="reduced")
    return Q, None, R


def _apply_basis(basis: tuple[Tensor, Tensor | None] | None, Y: Tensor) -> Tensor:
    """``Q @ Y`` for ``Q = W @ T`` given as ``(W, T)``; None stands for the identity."""
    if basis is None:
        return Y
    W, T = basis
    return W @ (Y if T is None else T @ Y)


def orthogonalize(X: Tensor, method: str = "auto", want_q: bool = True) -> tuple[Tensor | None, Tensor]:
    """Reduced QR factorisation ``X = Q @ R``.

    Parameters
    ----------
    X : Tensor, shape (..., n, m)
    method : {"auto", "householder", "cholqr2"}
        ``"householder"``: LAPACK's Householder QR, the reference. ``"cholqr2"``: CholeskyQR2
        (Gram matrix, Cholesky, once more), BLAS-3 only; raises RuntimeError when a Cholesky
        fails or orthogonality is lost (rank-deficient or ill-conditioned ``X``). ``"auto"``:
        CholeskyQR2 when ``n >= CHOLQR2_MIN_ASPECT * m``, falling back to Householder by itself
        when CholeskyQR2 fails; Householder otherwise.
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
    """
    W, T, R = _basis(X, method, want_q)
    if not want_q:
        return None, R
    return (W if T is None else W @ T), R


# --- The small core -------------------------------------------------------------------------------
_Basis = tuple[Tensor, Tensor | None] | None


def _core(A: Tensor, B: Tensor, method: str, want_bases: bool) -> tuple[_Basis, Tensor, _Basis]:
    """``(Q_A, C, Q_B)`` with ``A @ B = Q_A @ C @ Q_B^H`` and ``C`` at most ``mdim x mdim``.

    Each basis is returned for :func:`_apply_basis`. A factor that is not tall (``mdim >= ldim``
    for ``A``, ``mdim >= rdim`` for ``B``) is used as it is, with an identity basis (None).
    """
    ldim, mdim = A.shape[-2:]
    rdim = B.shape[-1]
    Q_A, left = _side(A, method, want_bases) if mdim < ldim else (None, A)
    Q_B, right = _side(B.mH, method, want_bases) if mdim < rdim else (None, B.mH)
    return Q_A, left @ right.mH, Q_B


def _side(X: Tensor, method: str, want_basis: bool) -> tuple[_Basis, Tensor]:
    """One factor's basis (None unless wanted, so that CholeskyQR2's ``n x m`` buffer is freed
    before the other factor is factorised) and its triangular factor."""
    W, T, R = _basis(X, method, want_basis)
    return ((W, T) if want_basis else None), R


def svd(A: Tensor, B: Tensor, method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of ``A @ B`` through the factors.

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, rdim)
    method : {"auto", "householder", "cholqr2"}
        How each factor is orthogonalised; see :func:`orthogonalize`.

    Returns
    -------
    U : Tensor, shape (..., ldim, k)
    S : Tensor, shape (..., k)
        Descending, real. ``k = min(ldim, mdim, rdim)``.
    V : Tensor, shape (..., rdim, k)
        ``A @ B == U @ diag(S) @ V.mH``.

    Notes
    -----
    ``A = Q_A R_A`` and ``B^H = Q_B R_B``; then ``A B = Q_A (R_A R_B^H) Q_B^H`` and the SVD of the
    ``min(ldim, mdim) x min(rdim, mdim)`` core gives ``U = Q_A U_c``, ``V = Q_B V_c``. Cost
    ``O((ldim + rdim) mdim^2 + mdim^3)``; memory a few factor-sized buffers. ``S`` comes from a
    values-only SVD of the core, which keeps high relative accuracy on small singular values.
    16-bit inputs are computed and returned in float32. Gradients through ``U`` and ``V`` are
    undefined at repeated singular values (torch raises or returns non-finite values there).
    """
    check_choice("method", method, ORTHO_METHODS)
    A, B = promote(A, B)
    Q_A, C, Q_B = _core(A, B, method, want_bases=True)
    U_c, _, Vh_c = torch.linalg.svd(C, full_matrices=False)
    S = torch.linalg.svdvals(C)
    U = _apply_basis(Q_A, U_c)
    V = _apply_basis(Q_B, Vh_c.mH)
    return U, S, V


def svdvals(A: Tensor, B: Tensor, method: str = "auto") -> Tensor:
    """Singular values of ``A @ B``, descending, shape ``(..., min(ldim, mdim, rdim))``.

    As :func:`svd` but never forms ``Q``, ``U`` or ``V``: cost ``O((ldim + rdim) mdim^2 + mdim^3)``
    with a smaller constant.
    """
    check_choice("method", method, ORTHO_METHODS)
    A, B = promote(A, B)
    _, C, _ = _core(A, B, method, want_bases=False)
    return torch.linalg.svdvals(C)


# --- Norms and traces -----------------------------------------------------------------------------
def frobenius_norm(A: Tensor, B: Tensor, method: str = "auto") -> Tensor:
    """Frobenius norm of ``A @ B``, shape ``(...)``, real.

    Parameters
    ----------
    method : {"auto", "gram", "qr"}
        ``"gram"``: ``sqrt(sum((A^H A) * (B B^H)^T))``, two ``mdim x mdim`` Gram matrices, cost
        ``O((ldim + rdim) mdim^2)`` in BLAS-3. Its rounding error grows as the terms of the sum
        cancel (``A @ B`` much smaller than ``|A| |B|``). ``"qr"``: the norm of the QR core of
        :func:`svdvals`, accurate to ``eps * |A| |B|`` always. ``"auto"``: ``"gram"``, switching
        to ``"qr"`` when the estimated relative error ``eps / cancellation`` exceeds
        ``GRAM_NORM_MAX_REL_ERROR``.
    """
    check_choice("method", method, NORM_METHODS)
    A, B = promote(A, B)
    if method != "qr":
        terms = (A.mH @ A) * (B @ B.mH).mT
        total = terms.sum((-2, -1)).real
        if method == "gram":
            return total.clamp_min(0).sqrt()
        eps = torch.finfo(total.dtype).eps
        magnitude = terms.abs().sum((-2, -1))
        if bool((eps * magnitude <= GRAM_NORM_MAX_REL_ERROR * total).all()):
            return total.sqrt()
    _, C, _ = _core(A, B, "auto", want_bases=False)
    return torch.linalg.matrix_norm(C)


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


def eigvals(A: Tensor, B: Tensor) -> Tensor:
    """Eigenvalues of a square ``A @ B``, complex, shape ``(..., mdim)``, by descending modulus.

    Notes
    -----
    ``A B`` and ``B A`` share their non-zero eigenvalues (``B A v = k v`` gives
    ``A B (A v) = k (A v)``), so the ``mdim x mdim`` matrix ``B A`` is decomposed, cost
    ``O(ldim mdim^2 + mdim^3)``. When ``ldim < mdim`` the smaller ``ldim x ldim`` ``A B`` is
    decomposed instead and padded with ``mdim - ldim`` exact zeros, the eigenvalues ``B A`` has
    beyond ``A B``'s.
    """
    A, B = promote(A, B)
    ldim, mdim = A.shape[-2:]
    if ldim < mdim:
        values = _pad_zeros(torch.linalg.eigvals(A @ B), mdim)
    else:
        values = torch.linalg.eigvals(B @ A)
    return _sort_by_magnitude(values)


def reverse_product_eigvals(A: Tensor, B: Tensor) -> Tensor:
    """Eigenvalues of ``B @ A``, complex, shape ``(..., mdim)``, in LAPACK's order (unsorted).

    What TransformerLens's ``FactoredMatrix.eigenvalues`` returns: ``torch.linalg.eig(B @ A)``.
    For a square ``A @ B`` these are its non-zero eigenvalues plus, when ``mdim > ldim``,
    ``mdim - ldim`` more that are zero up to rounding (compare :func:`eigvals`, which sorts by
    modulus and makes those zeros exact). Cost ``O(ldim mdim^2 + mdim^3)``. 16-bit inputs are
    computed in float32 (complex64 results).
    """
    A, B = promote(A, B)
    return torch.linalg.eigvals(B @ A)


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
        ``n - mdim`` of them are the exact zeros of the null space.
    evecs : Tensor, shape (..., n, n), or None

    Raises
    ------
    ValueError
        When ``A @ B`` is not Hermitian to within ``sqrt(eps) * |A|_F |B|_F``, ``eps`` of the
        input dtype.

    Notes
    -----
    With ``Q`` an orthonormal basis of ``range(A)`` (Householder QR, ``n x mdim``),
    ``A B = Q T Q^H`` for the ``mdim x mdim`` ``T = R_A (B Q)``, so its eigenvalues are those of
    ``T`` plus zeros. Cost ``O(n mdim^2 + mdim^3)`` for values; vectors add a complete QR of ``A``
    (``O(n^2 mdim)`` and an ``n x n`` output).
    """
    tol = torch.finfo(A.dtype).eps ** 0.5  # of the input dtype: 16-bit products are symmetric only to 16 bits
    A, B = promote(A, B)
    n, mdim = A.shape[-2:]
    if mdim >= n:
        Q, Q_full, R_A = None, None, None
        T = A @ B
    else:
        mode = "complete" if eigenvectors else "reduced"
        Q_full, R = torch.linalg.qr(A, mode=mode)
        Q, R_A = Q_full[..., :mdim], R[..., :mdim, :]
        T = R_A @ (B @ Q)
    scale = torch.linalg.matrix_norm(A) * torch.linalg.matrix_norm(B)
    defect = _hermitian_defect(T, R_A, B, Q)
    if not bool((defect <= tol * scale).all()):
        worst = float((defect / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())
        raise ValueError(
            "eigh/eigvalsh need a Hermitian (symmetric) product A @ B; this one has relative "
            f"asymmetry {worst:.2e} (tolerance {tol:.1e}). Use `.eigenvalues` for the eigenvalues "
            "of a general square product."
        )
    T = (T + T.mH) / 2
    if not eigenvectors:
        evals = torch.linalg.eigvalsh(T)
        if Q is not None:
            evals = torch.sort(_pad_zeros(evals, n), -1).values
        return evals, None
    evals, W = torch.linalg.eigh(T)
    if Q is None:
        return evals, W
    evals = _pad_zeros(evals, n)
    evecs = torch.cat([Q @ W, Q_full[..., mdim:]], -1)
    order = torch.sort(evals, dim=-1, stable=True).indices
    evals = torch.gather(evals, -1, order)
    evecs = torch.gather(evecs, -1, order.unsqueeze(-2).expand(evecs.shape))
    return evals, evecs
