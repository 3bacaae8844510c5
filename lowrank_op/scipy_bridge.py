"""The SciPy view of a product ``A @ B`` and the Krylov solvers (ARPACK, PROPACK) that run on it.

SciPy is imported here and nowhere else. :mod:`lowrank_op.topk` decides when to call these
functions; each of them works on one 2-D product at a time, applies it only through its factors
(``x -> A (B x)`` and ``y -> B^H (A^H y)``, ``O((ldim + rdim) mdim)`` per vector) and never forms
``A @ B``.

:class:`ScipyProtocol` is the second base class of :class:`lowrank_op.FactoredMatrix`: it makes a
2-D FactoredMatrix a ``scipy.sparse.linalg.LinearOperator`` too, so that ``lsqr(fm, b)`` and
``lsmr(fm, b)`` take it directly (see its docstring for what cannot work and why).
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.sparse.linalg as sla
import torch
from torch import Tensor

from lowrank_op import kernels, settings
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


def eig_residuals(A: Tensor, B: Tensor, values: Tensor, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Residuals of eigenpairs of ``M = A @ B`` in float64 (complex128), from the factors.

    Parameters
    ----------
    A : Tensor, shape (n, p)
    B : Tensor, shape (p, n)
    values : Tensor, shape (k,)
    vectors : Tensor, shape (n, k)
        Column ``i`` the eigenvector of ``values[i]``; scaled to unit norm here.

    Returns
    -------
    residuals : Tensor, shape (k,)
        ``|M x_i - values[i] x_i|`` with ``|x_i| = 1``, float64.
    scale : Tensor, shape ()
        ``max_i |M x_i|``: a lower bound of ``|M|_2``, at least ``max_i |values[i]|`` for true
        eigenpairs.

    Notes
    -----
    ``O(n p k)``: two products of the float64 factors with ``k`` vectors; ``M`` is not formed.
    """
    c = torch.complex128
    X = vectors.to(c)
    X = X / torch.linalg.vector_norm(X, dim=0).clamp_min(torch.finfo(torch.float64).tiny)
    MX = A.to(c) @ (B.to(c) @ X)
    residuals = torch.linalg.vector_norm(MX - X * values.to(c), dim=0)
    scale = torch.linalg.vector_norm(MX, dim=0).max() if X.shape[1] else torch.zeros((), dtype=torch.float64)
    return residuals, scale


def check_eigenpairs(A: Tensor, B: Tensor, values: Tensor, vectors: Tensor, tol: float, eps: float) -> None:
    """Raise :class:`KrylovFailure` unless every eigenpair of ``A @ B`` passes the residual test.

    The test (:class:`lowrank_op.settings.krylov_residual_factor`): ``|M x_i - lambda_i x_i| <=
    tol_eff * s`` for unit ``x_i``, with ``tol_eff = tol + factor * eps * sqrt(p)``, ``p`` the
    inner dim of ``A @ B`` and ``s`` from :func:`eig_residuals`. NaN residuals fail it.
    Shapes as :func:`eig_residuals`; ``eps`` is the precision the pairs were computed in.
    """
    residuals, scale = eig_residuals(A, B, values, vectors)
    tol_eff = tol + settings.krylov_residual_factor.value() * eps * A.shape[-1] ** 0.5
    bound = tol_eff * float(scale)
    worst = int(residuals.argmax()) if residuals.numel() else 0
    ok = bool((residuals <= bound).all()) and bool(torch.isfinite(scale))
    if not ok:
        ratio = float(residuals[worst]) / float(scale) if float(scale) > 0 else float("nan")
        raise KrylovFailure(
            f"ARPACK reported convergence, but its eigenpair {worst} has residual |M x - lambda x| = "
            f"{ratio:.2g} * s, above the {tol_eff:.2g} * s accepted (s = max |M x_i| = {float(scale):.3g}); "
            "its own convergence test was too optimistic. Use float64 factors, raise `maxiter`, or "
            "use method='exact'."
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
    smaller: the two share their non-zero eigenvalues. ARPACK's eigenvectors are computed too and
    every pair is checked by :func:`check_eigenpairs` before the values are returned. Returns a
    complex tensor of shape ``(k,)``, by descending modulus, on the factors' device.

    Raises
    ------
    KrylovFailure
        A RuntimeError, when ARPACK does not converge or its pairs fail the residual test;
        :class:`BudgetExceeded` when ``max_applications`` is reached first.

    Notes
    -----
    The residual test cannot see an eigenvalue that ARPACK missed altogether: on clustered
    spectra Arnoldi can return accurate eigenpairs that are not the ``k`` largest.
    """
    ldim, mdim = A.shape
    op = FactoredScipyOperator(A, B, max_applications) if ldim <= mdim else FactoredScipyOperator(B, A, max_applications)
    n = op.shape[0]
    try:
        values, vectors = sla.eigs(
            op, k=k, which="LM", tol=tol, maxiter=maxiter, return_eigenvectors=True,
            v0=_start_vector(n, op.dtype, random_state),
        )
    except sla.ArpackError as error:
        raise KrylovFailure(
            f"ARPACK did not converge to the top {k} eigenvalues of the {n} x {n} product ({error}); "
            "raise `maxiter`, loosen `tol`, or use method='exact'."
        ) from error
    values_t = torch.from_numpy(np.ascontiguousarray(values))
    vectors_t = torch.from_numpy(np.ascontiguousarray(vectors)).to(op.A.device)
    check_eigenpairs(op.A, op.B, values_t.to(op.A.device), vectors_t, tol, float(np.finfo(op.dtype).eps))
    complex_dtype = torch.promote_types(op.A.dtype, torch.complex64)
    return kernels._sort_by_magnitude(values_t.to(device=op.A.device, dtype=complex_dtype))


# --- FactoredMatrix as a SciPy LinearOperator ---------------------------------------------------------
class ScipyProtocol(sla.LinearOperator):
    """The second base class of :class:`lowrank_op.FactoredMatrix`: SciPy's operator protocol.

    It makes ``isinstance(fm, scipy.sparse.linalg.LinearOperator)`` true, so
    ``aslinearoperator(fm)`` returns ``fm`` itself and the solvers that only apply the operator
    (``lsqr``; ``lsmr``, which also calls ``np.result_type(fm, ...)``, answered by
    ``__numpy_dtype__``) run on ``fm`` directly. It adds SciPy's names that linear_operator does
    not define and changes none that it does (linear_operator's ``LinearOperator`` comes first
    in the MRO, so its ``dtype``, ``shape``, ``T``, ``transpose``, ``ndim``, ``__matmul__``,
    ``__mul__``, ``__add__``, ... win; SciPy's ``__init__`` never runs):

    - ``matvec``, ``rmatvec``, ``matmat``, ``rmatmat`` and ``dot`` take and return NumPy arrays,
      as :meth:`FactoredMatrix.to_scipy`'s view does (they delegate to it; 2-D only);
    - ``H`` and ``adjoint()`` are the conjugate transpose as a FactoredMatrix, ``(B^H, A^H)``;
    - ``fm(x)`` applies the operator: ``fm.matmul(x)`` for a Tensor, ``fm.dot(x)`` otherwise
      (SciPy's ``A(x)`` means ``A @ x``); ``fm ** p`` stays unsupported.

    What cannot work: ``fm.dtype`` must stay a ``torch.dtype`` for linear_operator and GPyTorch,
    and SciPy's other entry points read ``A.dtype`` as a NumPy dtype after ``aslinearoperator``
    (``gmres``, ``cg``, ``minres`` and the other Krylov solvers through ``make_system``:
    ``A.dtype.char``; ``svds``, ``eigs``, ``eigsh``: ``np.issubdtype(A.dtype, ...)``). A
    ``torch.dtype`` cannot be converted (it cannot be subclassed or given a
    ``__numpy_dtype__``), so those need ``fm.to_scipy()``.
    """

    def _scipy_view(self) -> FactoredScipyOperator:
        if self._A.dim() != 2 or self._B.dim() != 2:
            raise ValueError(
                "SciPy's operator protocol (matvec, rmatvec, lsqr(fm, b), ...) needs a 2-D FactoredMatrix; "
                f"this one has shape {tuple(self.shape)}. Index one matrix first, e.g. fm[0]."
            )
        return FactoredScipyOperator(self._A, self._B)

    @property
    def __numpy_dtype__(self) -> np.dtype:
        """The NumPy dtype of the products (float32 for 16-bit factors): NumPy's protocol (2.4+)
        for ``np.result_type(fm, ...)``, which ``lsmr`` calls; ``fm.dtype`` stays torch's."""
        return np.dtype(_NUMPY_DTYPES[kernels.compute_dtype(self.dtype)])

    def matvec(self, x):
        return self._scipy_view().matvec(x)

    def rmatvec(self, x):
        return self._scipy_view().rmatvec(x)

    def matmat(self, X):
        return self._scipy_view().matmat(X)

    def rmatmat(self, X):
        return self._scipy_view().rmatmat(X)

    def dot(self, x):
        return self._scipy_view().dot(x)

    def _matvec(self, x):
        return self._scipy_view()._matvec(x)

    def _rmatvec(self, x):
        return self._scipy_view()._rmatvec(x)

    def _matmat(self, X):
        return self._scipy_view()._matmat(X)

    def _rmatmat(self, X):
        return self._scipy_view()._rmatmat(X)

    def _adjoint(self):
        return type(self)(self._B.mH, self._A.mH)

    def _transpose(self):
        return self._transpose_nonbatch()

    def __call__(self, x):
        if isinstance(x, Tensor):
            return self.matmul(x)
        return self.dot(x)

    def __pow__(self, p):
        return NotImplemented
