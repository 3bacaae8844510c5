"""The SciPy view of a product ``A @ B`` and the Krylov solvers (ARPACK, PROPACK) that run on it.

SciPy is imported here and nowhere else. :mod:`lowrank_op.topk` decides when to call these
functions; each of them works on one 2-D product at a time, applies it only through its factors
(``x -> A (B x)`` and ``y -> B^H (A^H y)``, ``O((ldim + rdim) mdim)`` per vector) and never forms
``A @ B``.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
from torch import Tensor

from lowrank_op import kernels
from lowrank_op.errors import BudgetExceeded, KrylovFailure

#: PROPACK's default Lanczos basis size (SciPy's ``maxiter`` for ``solver="propack"``) is
#: ``max(10 k, PROPACK_MIN_BASIS)``: SciPy's ``10 k`` alone did not converge for k = 1 on a
#: 40 x 30 Gaussian product. PROPACK does not restart for the largest values, so it must converge
#: within this basis; it holds ``(ldim + rdim) x basis`` numbers.
PROPACK_MIN_BASIS = 100
#: ``tol=0`` asks PROPACK for relative accuracy ``eps**PROPACK_TOL_EXPONENT`` of the singular
#: values (SciPy passes it 0, which PROPACK could not meet on a 20 x 25 float64 product even with
#: a full Lanczos basis; ``eps**0.75`` is PROPACK's own level of orthogonality).
PROPACK_TOL_EXPONENT = 0.75
#: PROPACK's singular vectors are checked: ``|U^H U - I|`` and ``|V^H V - I|`` (max entry) must
#: stay below ``PROPACK_MAX_DEFECT * sqrt(eps)``. PROPACK returned vectors 0.17 from orthonormal,
#: with no error, when ``k`` exceeded the rank of the product.
PROPACK_MAX_DEFECT = 10.0

_NUMPY_DTYPES = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.complex64: np.complex64,
    torch.complex128: np.complex128,
}


class FactoredScipyOperator(sla.LinearOperator):
    """``A @ B`` as a ``scipy.sparse.linalg.LinearOperator`` of shape ``(ldim, rdim)``.

    Parameters
    ----------
    A : Tensor, shape (ldim, mdim)
    B : Tensor, shape (mdim, rdim)
        2-D, same dtype and device. They are held as they are (16-bit factors as a float32 copy),
        detached: SciPy records no gradients.
    max_applications : int, optional
        Raise :class:`BudgetExceeded` once more than this many vectors have been multiplied
        (``matvec`` and ``rmatvec`` columns together). ``None``: no limit.

    Notes
    -----
    ``matvec``/``matmat`` compute ``A (B X)`` and ``rmatvec``/``rmatmat`` compute
    ``B^H (A^H X)``: ``O((ldim + rdim) mdim c)`` for ``c`` columns, with buffers of ``mdim x c``
    and ``ldim x c`` (or ``rdim x c``). The product runs where the factors are; vectors on a
    non-CPU device travel to it and back on every call. ``dtype`` is the factors' (float32 for
    16-bit ones). A real vector of another precision is cast to ``dtype`` and the result cast
    back; a complex vector given to a real operator is applied as its real and imaginary parts.
    ``applications`` counts the vectors multiplied so far.
    """

    def __init__(self, A: Tensor, B: Tensor, max_applications: int | None = None, _count: list[int] | None = None):
        A, B = kernels.promote(A.detach(), B.detach())
        self.A, self.B = A, B
        self.max_applications = max_applications
        self._count = [0] if _count is None else _count  # shared with the adjoint
        super().__init__(dtype=np.dtype(_NUMPY_DTYPES[A.dtype]), shape=(A.shape[0], B.shape[1]))

    def _apply(self, left: Tensor, right: Tensor, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X)
        out_dtype = np.result_type(self.dtype, X.dtype)
        if np.iscomplexobj(X) and not np.issubdtype(self.dtype, np.complexfloating):
            return self._apply(left, right, X.real) + 1j * self._apply(left, right, X.imag)
        n = X.shape[1] if X.ndim == 2 else 1
        if self.max_applications is not None and self.applications + n > self.max_applications:
            raise BudgetExceeded(f"{self.applications} vectors applied, {n} more asked, budget {self.max_applications}")
        self._count[0] += n
        x = torch.from_numpy(np.array(X, dtype=self.dtype, order="C")).to(left.device)
        return (left @ (right @ x)).cpu().numpy().astype(out_dtype, copy=False)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(self.A, self.B, x)

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._apply(self.B.mH, self.A.mH, x)

    _matmat = _matvec
    _rmatmat = _rmatvec

    @property
    def applications(self) -> int:
        """Vectors multiplied so far, by this operator and its adjoint together."""
        return self._count[0]

    def _adjoint(self) -> FactoredScipyOperator:
        return FactoredScipyOperator(self.B.mH, self.A.mH, self.max_applications, self._count)


def _start_vector(n: int, dtype: np.dtype, random_state: int) -> np.ndarray:
    """The seeded Krylov start vector: standard normal (real and imaginary parts if complex)."""
    rng = np.random.default_rng(random_state)
    v0 = rng.standard_normal(n)
    if np.issubdtype(dtype, np.complexfloating):
        v0 = v0 + 1j * rng.standard_normal(n)
    return v0.astype(dtype)


def _to_torch(X: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(X)).to(device=like.device)


def svds(
    A: Tensor,
    B: Tensor,
    k: int,
    solver: str,
    *,
    want_vectors: bool,
    tol: float,
    maxiter: int | None,
    random_state: int,
    max_applications: int | None = None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """Top-``k`` singular triplets of one 2-D ``A @ B`` by ``scipy.sparse.linalg.svds``.

    Returns ``(U, S, V)``: ``U`` (ldim, k), ``S`` (k,) descending, ``V`` (rdim, k) with the right
    singular vectors as columns (``None`` for ``U`` and ``V`` unless ``want_vectors``), on the
    factors' device in their compute dtype.

    Raises
    ------
    KrylovFailure
        A RuntimeError, when ARPACK or PROPACK does not converge; :class:`BudgetExceeded` (a RuntimeError) when
        ``max_applications`` is reached first.
    """
    op = FactoredScipyOperator(A, B, max_applications)
    ldim, rdim = op.shape
    v0 = _start_vector(ldim if solver == "propack" else min(ldim, rdim), op.dtype, random_state)
    if solver == "propack":
        maxiter = max(10 * k, PROPACK_MIN_BASIS) if maxiter is None else maxiter
        eps = float(np.finfo(op.dtype).eps)
        tol = tol if tol > 0 else eps ** (PROPACK_TOL_EXPONENT / 2)  # SciPy passes PROPACK tol**2
    compute_vectors = want_vectors or solver == "propack"  # PROPACK's are checked
    try:
        result = sla.svds(
            op, k=k, tol=tol, v0=v0, maxiter=maxiter, solver=solver,
            return_singular_vectors=compute_vectors, rng=np.random.default_rng(random_state),
        )
    except (sla.ArpackError, scipy.linalg.LinAlgError) as error:
        raise KrylovFailure(
            f"{solver.upper()} did not converge to the top {k} singular values of the {ldim} x {rdim} "
            f"product ({error}); raise `maxiter`, loosen `tol`, or use method='exact'."
        ) from error
    if not compute_vectors:
        return None, _to_torch(result[::-1].copy(), op.A), None
    u, s, vh = result
    if solver == "propack":
        _check_orthonormal(u, vh, eps)
    order = np.argsort(-s, kind="stable")
    if not want_vectors:
        return None, _to_torch(s[order], op.A), None
    U = _to_torch(u[:, order], op.A)
    V = _to_torch(vh[order].conj().T, op.A)
    return U, _to_torch(s[order], op.A), V


def _check_orthonormal(u: np.ndarray, vh: np.ndarray, eps: float) -> None:
    eye = np.eye(u.shape[1])
    defect = max(np.abs(u.conj().T @ u - eye).max(), np.abs(vh @ vh.conj().T - eye).max())
    if not defect <= PROPACK_MAX_DEFECT * np.sqrt(eps):
        raise KrylovFailure(
            f"PROPACK returned singular vectors {defect:.2g} from orthonormal, so its results cannot be "
            "trusted; this happens when `k` exceeds the rank of the product. Ask for fewer values or "
            "use method='arpack' or 'exact'."
        )


def eigs(
    A: Tensor,
    B: Tensor,
    k: int,
    *,
    tol: float,
    maxiter: int | None,
    random_state: int,
    max_applications: int | None = None,
) -> Tensor:
    """Top-``k`` eigenvalues by modulus of one square 2-D ``A @ B`` by ARPACK's Arnoldi iteration.

    Arnoldi runs on ``A B`` (``ldim x ldim``) or on ``B A`` (``mdim x mdim``), whichever is
    smaller: the two share their non-zero eigenvalues. Returns a complex tensor of shape
    ``(k,)``, by descending modulus, on the factors' device.

    Raises
    ------
    KrylovFailure
        A RuntimeError, when ARPACK does not converge; :class:`BudgetExceeded` when ``max_applications`` is
        reached first.
    """
    ldim, mdim = A.shape
    op = FactoredScipyOperator(A, B, max_applications) if ldim <= mdim else FactoredScipyOperator(B, A, max_applications)
    n = op.shape[0]
    try:
        values = sla.eigs(
            op, k=k, which="LM", tol=tol, maxiter=maxiter, return_eigenvectors=False,
            v0=_start_vector(n, op.dtype, random_state),
        )
    except sla.ArpackError as error:
        raise KrylovFailure(
            f"ARPACK did not converge to the top {k} eigenvalues of the {n} x {n} product ({error}); "
            "raise `maxiter`, loosen `tol`, or use method='exact'."
        ) from error
    complex_dtype = torch.promote_types(op.A.dtype, torch.complex64)
    return kernels._sort_by_magnitude(_to_torch(values, op.A).to(complex_dtype))
