"""``FactoredMatrix``: a product ``A @ B`` kept as its factors, as a linear_operator LinearOperator.

The class validates its factors, implements linear_operator's hooks through the factors, and
offers TransformerLens's ``FactoredMatrix`` surface under the same names and meanings. The
numerical work is in :mod:`lowrank_op.kernels`; each method here is a few lines around a kernel.
"""

from __future__ import annotations

import numbers
import warnings

import torch
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
)
from torch import Tensor

from lowrank_op import _indexing, kernels, scipy_bridge, solves, sums, topk
from lowrank_op._autograd import sum_to_shape
from lowrank_op._cache import ResultCache
from lowrank_op._checks import as_scalar, check_broadcast, check_factors, is_tensor_like, warn_off_host
from lowrank_op._products import balanced_core, scale_pow2
from lowrank_op.errors import (
    DeviceMismatchError,
    DtypeMismatchError,
    NotSquareError,
    ShapeMismatchError,
    UndefinedGradientWarning,
)


def _warn_if_repeated(S: Tensor) -> None:
    if S.shape[-1] < 2:
        return
    with torch.no_grad():
        gaps = S[..., :-1] - S[..., 1:]
        close = gaps <= torch.finfo(S.dtype).eps ** 0.5 * S[..., :1]
    if bool(close.any()):
        warnings.warn(
            "svd(): some singular values are repeated (to within sqrt(eps) * S_max), so gradients "
            "through U and Vh are undefined there; gradients through S are fine. Use S (or norm()) "
            "in the loss, or detach U and Vh.",
            UndefinedGradientWarning,
            stacklevel=3,
        )


def _outer_factored(A: Tensor, B: Tensor, **outer: Tensor) -> FactoredMatrix:
    """``OuterFactoredMatrix(A, B, left=..., right=...)``, imported when first needed: it subclasses
    FactoredMatrix, so its module imports this one."""
    from lowrank_op.outer_factored import OuterFactoredMatrix

    return OuterFactoredMatrix(A, B, **outer)


def _all_tensors(*items: object) -> bool:
    """Whether every item is a torch Tensor (not a TensorLike stand-in, which keeps the plain paths)."""
    return all(isinstance(item, Tensor) for item in items)


class FactoredMatrix(LinearOperator, scipy_bridge.ScipyProtocol):
    r"""The matrix ``M = A @ B``, held as its factors and never formed unless asked for.

    Parameters
    ----------
    A : Tensor, shape (..., ldim, mdim)
    B : Tensor, shape (..., mdim, rdim)
        Floating or complex, same dtype and device. Leading dims broadcast (as views; nothing is
        copied). float16 and bfloat16 factors are held as given; decompositions run in float32
        and return float32.

    Notes
    -----
    Costs, with ``k = min(ldim, mdim, rdim)``:

    ============================  ===============================================
    ``fm @ x`` (x: rdim x c)      ``O((ldim + rdim) mdim c)``, never ``ldim x rdim``
    ``svd()``, ``S``              ``O((ldim + rdim) mdim^2 + mdim^3)``
    ``norm()``                    ``O((ldim + rdim) mdim^2)`` (two Gram matrices)
    ``eigenvalues``               ``O(ldim mdim^2 + mdim^3)``
    ``svds(k)``, ``eigs(k)``      exact as above, or ARPACK at ``O((ldim + rdim) mdim)`` per
                                  application (``method="auto"`` chooses)
    ``AB`` / ``to_dense()``       ``O(ldim mdim rdim)`` time, ``ldim x rdim`` memory
    ============================  ===============================================

    The ``@`` operator follows TransformerLens: ``fm @ vector`` is a Tensor, ``fm @ matrix`` and
    ``matrix @ fm`` are FactoredMatrix objects (whichever inner dim is smaller is kept), and
    ``fm @ fm`` stays factored. ``fm.matmul``, ``fm.rmatmul`` and ``torch.matmul`` keep
    linear_operator's contract (a Tensor in gives a Tensor out) so GPyTorch keeps working.

    Results of ``svd()``, ``S`` and ``eigenvalues`` are cached on the instance (not in a global
    cache, so the instance can be freed) under the package's one rule (:mod:`lowrank_op._cache`):
    reused only while the factors hold the same contents (in-place edits, ``.data`` edits and NumPy
    views all count) and only for results without an autograd graph, so every call that records
    gradients gets a graph of its own.

    Examples
    --------
    >>> import torch
    >>> from lowrank_op import FactoredMatrix
    >>> fm = FactoredMatrix(torch.randn(1000, 8), torch.randn(8, 1000))
    >>> fm.shape, fm.S.shape
    (torch.Size([1000, 1000]), torch.Size([8]))
    """

    def __init__(self, A: Tensor, B: Tensor):
        check_factors(A, B)
        super().__init__(A, B)
        self._cache = ResultCache()

    # --- linear_operator's required hooks ---------------------------------------------------------
    def _size(self) -> torch.Size:
        return torch.Size((*self.batch_shape, self.ldim, self.rdim))

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self._A @ (self._B @ rhs)

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        return self._B.mT @ (self._A.mT @ rhs)

    def _transpose_nonbatch(self) -> FactoredMatrix:
        return FactoredMatrix(self._B.mT, self._A.mT)

    # --- linear_operator's hooks, overridden where the factors make them cheap or right ------------
    def _aligned(self) -> tuple[Tensor, Tensor]:
        """``A`` and ``B`` viewed with the same number of leading dims (size-1 where broadcast)."""
        nb = len(self.batch_shape)
        A, B = self._A, self._B
        return A.reshape((1,) * (nb + 2 - A.dim()) + A.shape), B.reshape((1,) * (nb + 2 - B.dim()) + B.shape)

    def _expanded(self, batch_shape: torch.Size | None = None) -> tuple[Tensor, Tensor]:
        """``A`` and ``B`` expanded (as views) to ``batch_shape``, by default the full batch shape."""
        bs = tuple(self.batch_shape if batch_shape is None else batch_shape)
        return self._A.expand(*bs, *self._A.shape[-2:]), self._B.expand(*bs, *self._B.shape[-2:])

    def _expand_batch(self, batch_shape: torch.Size) -> FactoredMatrix:
        return FactoredMatrix(*self._expanded(batch_shape))

    def _unsqueeze_batch(self, dim: int) -> FactoredMatrix:
        A, B = self._aligned()
        return FactoredMatrix(A.unsqueeze(dim), B.unsqueeze(dim))

    def _permute_batch(self, *dims: int) -> FactoredMatrix:
        A, B = self._aligned()
        order = (*dims, len(dims), len(dims) + 1)
        return FactoredMatrix(A.permute(order), B.permute(order))

    def _getitem(self, row_index, col_index, *batch_indices) -> FactoredMatrix:
        # linear_operator's hook (torch's meaning, which __getitem__ of linear_operator relies on);
        # factors shared over a leading dim are not copied along it.
        return FactoredMatrix(*_indexing.index_factors(*self._aligned(), batch_indices, row_index, col_index))

    def _get_indices(self, row_index: Tensor, col_index: Tensor, *batch_indices: Tensor) -> Tensor:
        A, B = self._expanded()
        rows = A[(*batch_indices, row_index)]  # (..., mdim)
        cols = B.mT[(*batch_indices, col_index)]  # (..., mdim)
        return (rows * cols).sum(-1)

    def _diagonal(self) -> Tensor:
        return kernels.diagonal(self._A, self._B)

    def _mul_constant(self, other: float | Tensor) -> FactoredMatrix:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if other.dim():  # a batch of constants, shape batch_shape
            other = other[..., None, None]
        return FactoredMatrix(self._A * other, self._B)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        # d/dA sum_i u_i^T A B v_i = U (B V)^H and d/dB = (A^H U) V^H (torch's convention for complex
        # gradients; the plain transposes for real dtypes), summed to each factor's shape.
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        grads = []
        if self._A.requires_grad:
            grads.append(sum_to_shape(left_vecs @ (self._B @ right_vecs).mH, self._A.shape))
        else:
            grads.append(None)
        if self._B.requires_grad:
            grads.append(sum_to_shape((self._A.mH @ left_vecs) @ right_vecs.mH, self._B.shape))
        else:
            grads.append(None)
        return tuple(grads)

    def _svd(self) -> tuple[LinearOperator, Tensor, LinearOperator]:
        U, S, V = self.svd()
        return DenseLinearOperator(U), S, DenseLinearOperator(V)

    def _symeig(self, eigenvectors: bool = False, return_evals_as_lazy: bool | None = False):
        self._require_square("eigh/eigvalsh")
        evals, evecs = kernels.symeig(self._A, self._B, eigenvectors=eigenvectors)
        return evals, (DenseLinearOperator(evecs) if evecs is not None else None)

    def to_dense(self) -> Tensor:
        """The dense product ``A @ B``, shape ``(..., ldim, rdim)``: costly, and not cached."""
        return self._A @ self._B

    # --- the TransformerLens surface --------------------------------------------------------------
    @property
    def _A(self) -> Tensor:
        """The left factor as given (leading dims not broadcast): what every computation uses, so a
        factor shared across the batch is factorised once."""
        return self._args[0]

    @property
    def _B(self) -> Tensor:
        """The right factor as given (leading dims not broadcast)."""
        return self._args[1]

    def _broadcast(self, X: Tensor) -> Tensor:
        shape = (*self.batch_shape, *X.shape[-2:])
        return X if tuple(X.shape) == shape else X.broadcast_to(shape)

    @property
    def A(self) -> Tensor:
        """The left factor, shape ``(..., ldim, mdim)``: broadcast (as a view, nothing copied) to the
        full leading shape, as in TransformerLens. Computations use the factor as given."""
        return self._broadcast(self._A)

    @property
    def B(self) -> Tensor:
        """The right factor, shape ``(..., mdim, rdim)``, broadcast (as a view) like :attr:`A`."""
        return self._broadcast(self._B)

    @property
    def has_leading_dims(self) -> bool:
        """Whether either factor, as given, has dims before its last two (TransformerLens's attribute)."""
        return len(self._A.shape) > 2 or len(self._B.shape) > 2

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(self._A.shape[:-2], self._B.shape[:-2])

    @property
    def ldim(self) -> int:
        return self._A.shape[-2]

    @property
    def mdim(self) -> int:
        return self._A.shape[-1]

    @property
    def rdim(self) -> int:
        return self._B.shape[-1]

    @property
    def pair(self) -> tuple[Tensor, Tensor]:
        """``(A, B)``, both broadcast (as views) to the full leading shape."""
        return self.A, self.B

    @property
    def AB(self) -> Tensor:
        """The dense product, shape ``(..., ldim, rdim)``: expensive in time and memory."""
        return self.to_dense()

    @property
    def BA(self) -> Tensor:
        """The reverse product ``B @ A``, shape ``(..., mdim, mdim)``; needs ``ldim == rdim``."""
        self._require_square("BA")
        return self._B @ self._A

    @property
    def T(self) -> FactoredMatrix:
        """The transpose of the last two dims, for any number of leading dims: ``(B^T, A^T)``."""
        return self._transpose_nonbatch()

    def _require_square(self, what: str, advice: str = "") -> None:
        if self.ldim != self.rdim:
            raise NotSquareError(
                f"{what} needs a square product (ldim == rdim); this FactoredMatrix has shape "
                f"{tuple(self.shape)} (ldim {self.ldim}, rdim {self.rdim}).{' ' + advice if advice else ''}"
            )

    def _cached(self, key: str, compute):
        """``compute()``, or its result from this instance's cache (:mod:`lowrank_op._cache` says when)."""
        return self._cache.get_or_compute(key, (self._A, self._B), compute)

    def svd(self, method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD through the factors: ``(U, S, Vh)`` with ``U @ diag(S) @ Vh.mH == AB``.

        As in TransformerLens, ``Vh`` is the transpose of the usual Vh: the right singular
        vectors as columns.

        Parameters
        ----------
        method : {"auto", "householder", "cholqr2"}
            How the factors are orthogonalised. ``"auto"`` uses CholeskyQR2 on factors with at
            least ``settings.cholqr2_min_aspect`` rows per column and falls back to Householder QR
            by itself if CholeskyQR2 fails (rank-deficient or ill-conditioned factors);
            Householder otherwise. ``"cholqr2"`` raises RuntimeError instead of falling back.

        Returns
        -------
        U : Tensor, shape (..., ldim, k)
        S : Tensor, shape (..., k)
            Real, descending; ``k = min(ldim, mdim, rdim)``.
        Vh : Tensor, shape (..., rdim, k)

        Notes
        -----
        QR of ``A`` and of ``B^H``, then the SVD of the small ``R_A R_B^H`` core; see
        :func:`lowrank_op.kernels.svd`. Cost ``O((ldim + rdim) mdim^2 + mdim^3)``. Every
        ``"auto"`` choice (and a CholeskyQR2 fallback, with its cause) is reported to
        :mod:`lowrank_op.choices`; the thresholds are in :mod:`lowrank_op.settings`. Gradients
        flow through all three outputs by an analytic backward (no QR backward): through ``S``
        they are finite on rank-deficient factors, through ``U`` and ``Vh`` they are undefined at
        repeated singular values. First order only: a second derivative raises RuntimeError.
        16-bit factors give float32 results; a batch member holding NaN or infinity gives NaN.

        Warns
        -----
        UndefinedGradientWarning
            When gradients are being recorded and two singular values are equal to within
            ``sqrt(eps) * S_max`` (zeros of a rank-deficient product included): the gradients of
            ``U`` and ``Vh`` are undefined there (those of ``S`` are fine).
        """
        result = self._cached(f"svd:{method}", lambda: kernels.svd(self._A, self._B, method=method))
        if torch.is_grad_enabled() and (self._A.requires_grad or self._B.requires_grad):
            _warn_if_repeated(result[1])
        return result

    def svdvals(self, method: str = "auto") -> Tensor:
        """Singular values, shape ``(..., k)``, descending, without forming U or V.

        ``method`` as for :meth:`svd`; see :func:`lowrank_op.kernels.svdvals`. Gradients are exact
        to first order and finite on rank-deficient and zero factors (the backward projects on
        orthonormal bases held constant); a second derivative raises RuntimeError.
        """
        return self._cache.get_or_compute(
            f"svdvals:{method}",
            (self._A, self._B),
            lambda: kernels.svdvals(self._A, self._B, method=method),
            reuse={f"svd:{method}": lambda decomposition: decomposition[1]},  # S of a cached svd()
        )

    @property
    def U(self) -> Tensor:
        """Left singular vectors, shape ``(..., ldim, k)``."""
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        """Singular values, shape ``(..., k)``, descending (values-only path)."""
        return self.svdvals()

    @property
    def V(self) -> Tensor:
        """Right singular vectors as columns, shape ``(..., rdim, k)``: ``AB == U @ diag(S) @ V.mH``."""
        return self.svd()[2]

    @property
    def Vh(self) -> Tensor:
        """Deprecated alias of :attr:`V` (as in TransformerLens, it has always been ``V``, not its
        conjugate transpose); warns ``DeprecationWarning``."""
        warnings.warn(
            "FactoredMatrix.Vh returns V (the right singular vectors as columns), not its conjugate "
            "transpose; use .V (and .V.mH for the conjugate transpose). Vh is kept as a deprecated alias, "
            "as in TransformerLens.",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.svd()[2]

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``B @ A``, complex, shape ``(..., mdim)``, in LAPACK's order: TransformerLens's.

        ``B @ A`` shares the square ``A @ B``'s non-zero eigenvalues; when ``mdim > ldim`` its
        ``mdim - ldim`` extra ones are zero up to rounding. 16-bit factors give complex64. Cost
        ``O(ldim mdim^2 + mdim^3)``; cached on the instance. Raises
        :class:`~lowrank_op.errors.NotSquareError` (a ValueError and an AssertionError) unless
        ``ldim == rdim``. :meth:`eigvals` gives them sorted, with exact zeros. See
        :func:`lowrank_op.kernels.reverse_product_eigvals`.
        """
        self._require_square("eigenvalues")
        return self._cached("eigenvalues", lambda: kernels.reverse_product_eigvals(self._A, self._B))

    def eigvals(self) -> Tensor:
        """Eigenvalues of the square product, complex, shape ``(..., mdim)``, by descending modulus.

        From the smaller of ``B @ A`` and ``A @ B``: when ``mdim > ldim`` the ``ldim x ldim``
        product is decomposed and the ``mdim - ldim`` others are exact zeros (where
        :attr:`eigenvalues`, TransformerLens's, has rounding noise in LAPACK's order). Cost
        ``O(n mdim^2 + n^3)``, ``n = min(ldim, mdim)``; cached. See :func:`lowrank_op.kernels.eigvals`.
        """
        self._require_square("eigvals")
        return self._cached("eigvals", lambda: kernels.eigvals(self._A, self._B))

    def svds(
        self,
        k: int = 6,
        method: str = "auto",
        *,
        return_singular_vectors: bool = True,
        tol: float = 0.0,
        maxiter: int | None = None,
        random_state: int = 0,
        progress: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor] | Tensor:
        """The ``k`` largest singular triplets, ``(U, S, Vh)`` laid out as :meth:`svd` returns them.

        Parameters
        ----------
        k : int
            ``0 < k <= min(ldim, mdim, rdim)``; ARPACK also needs ``k < min(ldim, rdim)``
            (``k < min(ldim, rdim) - 1`` for complex factors).
        method : {"auto", "exact", "arpack", "propack"}
            ``"auto"`` takes the exact path unless the cost model of :func:`lowrank_op.topk.plan`
            expects ARPACK to pay, and falls back to it when ARPACK runs over its budget or fails;
            :func:`lowrank_op.choices.recorded` shows what it chose.
        return_singular_vectors : bool
        tol : float
            Krylov tolerance (SciPy's meaning; 0 is machine precision).
        maxiter : int, optional
            Krylov iteration limit.
        random_state : int
            Seed of the Krylov start vector (the same for every matrix of a batch).
        progress : bool
            A tqdm progress bar over the matrices a Krylov method loops over.

        Returns
        -------
        U : Tensor, shape (..., ldim, k)
        S : Tensor, shape (..., k)
            Real, descending; the only output when ``return_singular_vectors`` is False.
        Vh : Tensor, shape (..., rdim, k)
            Right singular vectors as columns (TransformerLens's layout).

        Notes
        -----
        Exact path: ``O((ldim + rdim) mdim^2 + mdim^3)``, one batched call. ARPACK:
        ``O((ldim + rdim) mdim)`` per application, one matrix at a time. See
        :func:`lowrank_op.topk.svds`.

        Examples
        --------
        >>> fm = FactoredMatrix(torch.randn(600, 100), torch.randn(100, 500))
        >>> U, S, Vh = fm.svds(5, method="arpack")
        >>> torch.allclose(S, fm.S[:5], rtol=1e-4)
        True
        """
        return topk.svds(
            self._A, self._B, k, method, return_singular_vectors=return_singular_vectors, tol=tol,
            maxiter=maxiter, random_state=random_state, progress=progress,
        )

    def eigs(
        self,
        k: int = 6,
        method: str = "auto",
        *,
        tol: float = 0.0,
        maxiter: int | None = None,
        random_state: int = 0,
        progress: bool = False,
    ) -> Tensor:
        """The ``k`` eigenvalues of largest modulus of the square product.

        Parameters
        ----------
        k : int
            ``0 < k <= min(ldim, mdim)``; ARPACK also needs ``k < min(ldim, mdim) - 1``.
        method : {"auto", "exact", "arpack"}
            ``"arpack"``: Arnoldi on the smaller of ``AB`` and ``BA``, its eigenpairs checked by
            their residuals. ``"auto"`` as for :meth:`svds`, with the eigenvalue cost model.
        tol, maxiter, random_state, progress
            As for :meth:`svds`.

        Returns
        -------
        values : Tensor, shape (..., k)
            Complex, by descending modulus. ``eigenvalues`` keeps returning all of them.

        Notes
        -----
        Exact path: ``O(ldim mdim^2 + mdim^3)``, one batched call; Arnoldi: ``O(ldim mdim)`` per
        application. See :func:`lowrank_op.topk.eigs`.
        """
        return topk.eigs(
            self._A, self._B, k, method, tol=tol, maxiter=maxiter, random_state=random_state, progress=progress
        )

    def to_scipy(self):
        """This 2-D product as a ``scipy.sparse.linalg.LinearOperator`` with a NumPy dtype.

        A 2-D FactoredMatrix is itself a SciPy LinearOperator (``lsqr(fm, b)``, ``lsmr(fm, b)``
        and ``fm.matvec(x)`` work), but its ``dtype`` is a ``torch.dtype``, so SciPy's solvers
        that read ``A.dtype`` (``gmres``, ``cg``, ``minres``, ``svds``, ``eigs``, ...) need this
        view (:class:`lowrank_op.scipy_bridge.ScipyProtocol` says why). Its ``matvec`` costs
        ``O((ldim + rdim) mdim)``; its dtype is the factors' (float32 for 16-bit factors); it
        records no gradients. Factors on a GPU stay there and every application copies a vector
        to the device and back (a ``PerformanceWarning`` says so once).
        See :class:`lowrank_op.scipy_bridge.FactoredScipyOperator`.
        """
        if self._A.dim() != 2 or self._B.dim() != 2:
            raise ValueError(
                f"to_scipy() needs a 2-D FactoredMatrix; this one has shape {tuple(self.shape)}. Index "
                "one matrix first, e.g. fm[0].to_scipy() (or fm[layer, head] for more leading dims)."
            )
        warn_off_host(self._A, "to_scipy()")
        return scipy_bridge.FactoredScipyOperator(self._A, self._B)

    def norm(self, method: str = "auto") -> Tensor:
        """Frobenius norm, shape ``(...)``, from two ``mdim x mdim`` Gram matrices (no SVD).

        ``method`` is one of ``"auto"``, ``"gram"``, ``"qr"``. ``"auto"`` takes the Gram formula
        unless its estimated relative error exceeds ``settings.gram_norm_max_rel_error``, then
        the QR core (recorded in :mod:`lowrank_op.choices`); see
        :func:`lowrank_op.kernels.frobenius_norm`. Factors of extreme scale (float32 ``1e-25``,
        ``1e20``) neither underflow nor overflow; the gradient at a zero product is 0, as
        ``torch.linalg.matrix_norm``'s.
        """
        return kernels.frobenius_norm(self._A, self._B, method=method)

    def trace(self) -> Tensor:
        """Trace of the square product, shape ``(...)``, cost ``O(ldim mdim)``."""
        self._require_square("trace")
        return kernels.trace(self._A, self._B)

    def make_even(self) -> FactoredMatrix:
        """The same matrix as ``(U sqrt(S), sqrt(S) Vh^H)``: inner dim k, balanced factors.

        From :meth:`svd`. ``sqrt`` has derivative 0 at the zero singular values of a rank-deficient
        product, so gradients stay finite there.
        """
        U, S, Vh = self.svd()
        root = kernels._safe_sqrt(S)  # derivative 0 (not infinite) at the zeros of a rank-deficient product
        return FactoredMatrix(U * root[..., None, :].to(U.dtype), root[..., :, None].to(Vh.dtype) * Vh.mH)

    def collapse_l(self) -> Tensor:
        """``diag(S) Vh^H``, shape ``(..., k, rdim)``: the matrix with its left orthogonal factor removed."""
        _, S, Vh = self.svd()
        return S[..., :, None].to(Vh.dtype) * Vh.mH

    def collapse_r(self) -> Tensor:
        """``U diag(S)``, shape ``(..., ldim, k)``: the matrix with its right orthogonal factor removed."""
        U, S, _ = self.svd()
        return U * S[..., None, :].to(U.dtype)

    def get_corner(self, k: int = 3) -> Tensor:
        """The top-left ``k`` entries of every dim (leading dims too) of the product, as a Tensor."""
        corner = self._A[..., :k, :] @ self._B[..., :, :k]
        return corner[tuple(slice(k) for _ in range(corner.dim()))]

    # --- operators ---------------------------------------------------------------------------------
    # NumPy defers binary operators to this class (so ``ndarray @ fm`` reaches __rmatmul__'s TypeError).
    __array_ufunc__ = None

    def __matmul__(self, other):
        """``self @ other``, as in TransformerLens: a vector gives a Tensor, a matrix (Tensor or
        TensorLike, batched or not) or a FactoredMatrix gives a FactoredMatrix whose inner dim is the
        smaller available one.

        Two cases give its subclass :class:`~lowrank_op.outer_factored.OuterFactoredMatrix`, with
        the same ``A``, ``B`` and ``mdim`` (formed when read): a Tensor with more columns than rows
        (``ov @ W_U``) is kept as the right outer factor instead of multiplied into ``B``; and
        ``fm @ fm`` keeps its ``mdim x other.mdim`` core ``B @ other.A`` as an inner factor between
        ``A`` and ``other.B``. The core is formed from factors rescaled by powers of two where it
        would under- or overflow (exact; then the product is formed into one factor, as before)."""
        if isinstance(other, FactoredMatrix):
            self._check_operand(other, other.ldim, self.rdim, "rows")
            if self.rdim < min(self.mdim, other.mdim):
                # Both dense products are no larger than the factors they come from.
                return FactoredMatrix(self.to_dense(), other.to_dense())
            if isinstance(self._B, Tensor) and isinstance(other._A, Tensor):
                core, k = balanced_core(self._B, other._A)  # (..., mdim, other.mdim), times 2^k
            else:
                core, k = self._B @ other._A, 0
            if k == 0 and _all_tensors(core, self._A, other._B):
                # The small core stays a factor of its own; self.A and other.B stay outer factors,
                # factorised once however many pairs they join (lowrank_op.outer_factored).
                if other.mdim <= self.mdim:
                    return _outer_factored(core, other._B, left=self._A)
                return _outer_factored(self._A, core, right=other._B)
            if other.mdim <= self.mdim:
                return FactoredMatrix(scale_pow2(self._A @ core, k), other._B)
            return FactoredMatrix(self._A, scale_pow2(core @ other._B, k))
        if isinstance(other, Tensor) or is_tensor_like(other):
            if len(other.shape) >= 2:
                self._check_operand(other, other.shape[-2], self.rdim, "rows")
                if self.rdim > self.mdim and other.shape[-1] > other.shape[-2] and _all_tensors(other, self._A, self._B):
                    # ``other`` widens the product (``ov @ W_U``): kept as an outer factor.
                    return _outer_factored(self._A, self._B, right=other)
                if self.rdim > self.mdim:
                    return FactoredMatrix(self._A, self._B @ other)
                return FactoredMatrix(self.to_dense(), other)
            self._check_operand(other, other.shape[-1] if len(other.shape) else None, self.rdim, "entries")
            # As a column, so that batched factors broadcast as they do in torch.matmul.
            return (self._A @ (self._B @ other.unsqueeze(-1))).squeeze(-1)
        if isinstance(other, LinearOperator):
            return super().__matmul__(other)
        raise self._operand_type_error(other)

    def __rmatmul__(self, other):
        if isinstance(other, Tensor) or is_tensor_like(other):
            if len(other.shape) >= 2:
                self._check_operand(other, other.shape[-1], self.ldim, "columns")
                if self.ldim > self.mdim and other.shape[-2] > other.shape[-1] and _all_tensors(other, self._A, self._B):
                    # ``other`` widens the product (``W_E @ ov``): kept as an outer factor.
                    return _outer_factored(self._A, self._B, left=other)
                if self.ldim > self.mdim:
                    return FactoredMatrix(other @ self._A, self._B)
                return FactoredMatrix(other, self.to_dense())
            self._check_operand(other, other.shape[-1] if len(other.shape) else None, self.ldim, "entries")
            return ((other.unsqueeze(-2) @ self._A) @ self._B).squeeze(-2)
        if isinstance(other, LinearOperator):
            return super().__rmatmul__(other)
        raise self._operand_type_error(other)

    def matmul(self, other):
        """linear_operator's contract: Tensor in, Tensor out; a FactoredMatrix stays factored.

        Operands are checked first: a dtype or device other than the factors', or a size that does
        not fit, raises an error that says so (instead of torch's or linear_operator's own)."""
        if isinstance(other, FactoredMatrix):
            return self @ other
        if isinstance(other, Tensor):
            if other.dim() >= 2:
                self._check_operand(other, other.shape[-2], self.rdim, "rows")
            else:
                self._check_operand(other, other.shape[-1] if other.dim() else None, self.rdim, "entries")
            return super().matmul(other)
        if isinstance(other, LinearOperator):
            return super().matmul(other)
        raise self._operand_type_error(other)

    def _operand_type_error(self, other: object) -> TypeError:
        return TypeError(
            f"a product needs a torch.Tensor, a FactoredMatrix or a LinearOperator operand, got "
            f"{type(other).__name__}; convert it with torch.as_tensor(other, dtype={self.dtype}, "
            f"device='{self.device}')."
        )

    def _check_operand(self, other, got: int | None, want: int, what: str) -> None:
        """Dtype, device, size and leading dims of a product operand (TensorLike: size and dims only)."""
        dtype, device = getattr(other, "dtype", None), getattr(other, "device", None)
        # The left factor as held (``_args[0]``): a subclass may form ``_A`` only when it is read.
        own_dtype, own_device = getattr(self._args[0], "dtype", None), getattr(self._args[0], "device", None)
        if None not in (dtype, own_dtype) and dtype != own_dtype:
            raise DtypeMismatchError(
                f"dtypes differ in a product: FactoredMatrix of dtype {own_dtype} and operand of dtype "
                f"{dtype}; cast one, e.g. operand.to({own_dtype})."
            )
        if None not in (device, own_device) and device != own_device:
            raise DeviceMismatchError(
                f"devices differ in a product: FactoredMatrix on {own_device} and operand on {device}; "
                f"move one, e.g. operand.to('{own_device}')."
            )
        if got != want:
            hint = " Use `*` to multiply by a scalar." if len(other.shape) == 0 else ""
            raise ShapeMismatchError(
                f"shapes do not match for a product: FactoredMatrix of shape {tuple(self.shape)} "
                f"and operand of shape {tuple(other.shape)}, which needs {want} {what}.{hint}"
            )
        check_broadcast("FactoredMatrix", self.shape, "operand", other.shape)

    def __mul__(self, other) -> FactoredMatrix:
        """``fm * c`` for a number or one-element tensor ``c`` (TransformerLens's ``*``); any other
        operand raises :class:`~lowrank_op.errors.ShapeMismatchError` (a ValueError and an
        AssertionError). Elementwise products are :meth:`mul` (linear_operator's)."""
        return FactoredMatrix(self._A * as_scalar("other", other, self.dtype, self.device), self._B)

    __rmul__ = __mul__

    def __truediv__(self, other) -> FactoredMatrix:
        return FactoredMatrix(self._A / as_scalar("other", other, self.dtype, self.device), self._B)

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self._A, self._B)

    def __getitem__(self, index):
        """``fm[index]``: TransformerLens's meaning, made complete (see :mod:`lowrank_op._indexing`).

        Parameters
        ----------
        index : int, slice, list, Tensor, ndarray, None, bool, Ellipsis, or a tuple of them
            Leading dims are indexed as torch indexes them. Rows and columns are indexed
            independently: an int keeps its dim (size 1), a list, 1-D integer tensor or 1-D mask
            picks rows (or columns), picks on both give the sub-matrix.

        Returns
        -------
        FactoredMatrix
            ``(A[lead][..., rows, :], B[lead][..., :, cols])``; cost ``O(1)`` for ints and slices
            (views), ``O(picked rows x mdim)`` otherwise; factors shared over a leading dim are not
            copied along it.
        Tensor
            In three cases: ``None`` at or after the row dim (the dense indexed block, with the
            new dims); a 2-D mask over the rows and columns, or index grids (integer tensors of 2
            or more dims on a matrix dim, broadcasting with another index tensor), which pick
            entries as torch does.

        Notes
        -----
        linear_operator's meaning (an int drops its dim, 1-D tensors on both dims pick entries)
        is its ``LinearOperator.__getitem__`` over this class's ``_getitem`` / ``_get_indices``
        hooks; linear_operator's internals index with index grids, whose meaning is the same here.
        """
        p = _indexing.plan(index, self.shape)
        if p.entries is not None:
            target = self
            for dim in p.new_dims:
                target = target._unsqueeze_batch(dim)
            # linear_operator builds index tensors on the operator's device; host ones join them there.
            entries = tuple(i.to(self.device) if isinstance(i, Tensor) else i for i in p.entries)
            return LinearOperator.__getitem__(target, entries)
        result = FactoredMatrix(*_indexing.index_factors(*self._aligned(), p.lead, p.row, p.col))
        if not (p.between or p.after):
            return result
        dense = result.to_dense()
        return dense.reshape(*dense.shape[:-1], *(1,) * p.between, dense.shape[-1], *(1,) * p.after)

    def squeeze(self, dim: int) -> FactoredMatrix | Tensor:
        """linear_operator's ``squeeze``: a size-1 leading dim goes (a FactoredMatrix); a size-1 row
        or column dim gives the dense remaining column or row (a Tensor); otherwise ``self``."""
        position = dim + self.dim() if dim < 0 else dim
        if self.shape[position] != 1:
            return self
        if position < self.dim() - 2:
            A, B = self._aligned()
            return FactoredMatrix(A.squeeze(position), B.squeeze(position))
        return self.to_dense().squeeze(position)

    def unsqueeze(self, dim: int) -> FactoredMatrix:
        """A new leading dim of size 1 at ``dim``: ``0 <= dim <= len(batch_shape)``, or counted from
        the right, ``-self.dim() - 1 <= dim <= -3``. TransformerLens also accepted positions among
        the last two dims, which change what the product means; those raise ValueError here."""
        n_lead = self.dim() - 2
        position = dim + self.dim() + 1 if dim < 0 else dim
        if not 0 <= position <= n_lead:
            raise ValueError(
                f"`dim` must be a leading-dim position, {-self.dim() - 1} <= dim <= -3 or 0 <= dim <= "
                f"{n_lead}, for a FactoredMatrix of shape {tuple(self.shape)}; got {dim}. A new dim among "
                "the last two would change what the product means; unsqueeze `.AB` for that."
            )
        return self._unsqueeze_batch(position)

    def __iter__(self):
        if self.dim() == 2:
            raise TypeError(
                "iteration over a 2-D FactoredMatrix is not supported (it would yield rows one by "
                "one); index rows explicitly, e.g. fm[i], or form the matrix with .AB."
            )
        return (self[i] for i in range(self.shape[0]))

    def slogdet(self) -> tuple[Tensor, Tensor]:
        """``(sign, log|det|)`` of the square product, exactly, each shape ``(...)``.

        With ``mdim < ldim`` the product has rank below ``ldim``: the determinant is exactly zero
        (sign 0, ``-inf``), or NaN (sign and value) where a factor holds NaN or Inf, as
        ``torch.logdet`` of the formed product gives. Otherwise the ``n x n`` product, no larger
        than ``A``, is formed and LU-factorised: ``O(n^2 mdim + n^3)``. linear_operator's default
        would assume a symmetric positive definite operator. See
        :func:`lowrank_op.solves.product_slogdet`.
        """
        self._require_square("slogdet/logdet")
        return solves.product_slogdet(self._A, self._B)

    def logdet(self) -> Tensor:
        """``log det`` of the square product as ``torch.logdet`` defines it (NaN where negative or
        where a factor holds NaN/Inf, ``-inf`` where singular); see :meth:`slogdet`."""
        return solves.logdet_from_slogdet(*self.slogdet())

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """``tr(R^T M^{-1} R)`` (as :meth:`solve` solves) and ``log det M`` (:meth:`slogdet`), exactly.

        The inverse quadratic form needs a square, full-rank product (``mdim >= ldim``) and raises
        otherwise, as :meth:`solve` does; returns None for a part not asked for.
        """
        solves.require_something(inv_quad_rhs, logdet)
        inv_quad = None if inv_quad_rhs is None else self.inv_quad(inv_quad_rhs, reduce_inv_quad)
        return inv_quad, (self.logdet() if logdet else None)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        """``tr(R^T M^{-1} R)``, shape ``(...)`` (or ``(..., k)`` unreduced), through :meth:`solve`'s
        LU; see :meth:`inv_quad_logdet`."""
        self._require_square("inv_quad", "Use `fm.lstsq(y)` or `fm.pinv()`.")
        rhs, vector = solves.as_columns("inv_quad_rhs", inv_quad_rhs, self.shape, self.dtype)
        solution = solves.solve_product(self._A, self._B, rhs, stacklevel=3)
        return solves.inv_quad(rhs, solution, reduce_inv_quad or vector)

    def __getstate__(self) -> dict:
        # Cached decompositions may hold autograd graphs, which do not pickle; they are recomputed.
        state = self.__dict__.copy()
        state["_cache"] = ResultCache()
        return state

    # --- sums (lowrank_op.sums), diagonals (lowrank_op.added_diag) ---------------------------------
    def __add__(self, other):
        """``self + other``, kept factored, so that later solves stay exact for non-symmetric products.

        ============================================  ===============================================
        ``other``                                     result
        ============================================  ===============================================
        FactoredMatrix                                one FactoredMatrix, factors concatenated
                                                      (inner dims add, leading dims broadcast)
        a number, a ``()`` / ``(..., 1, 1)`` tensor,  one FactoredMatrix of inner dim ``mdim + 1``:
        a row ``(..., 1, rdim)`` / ``(rdim,)``,       the rank-one term joins the factors (exact,
        a column ``(..., ldim, 1)``                   ``O(ldim + rdim)``); ``fm + 0`` is ``fm``
        a full ``(..., ldim, rdim)`` tensor ``T``     one FactoredMatrix ``[A, T] [B; I]`` (or
                                                      ``[A, I] [B; T]``, the smaller identity)
        ``DiagLinearOperator``, ``FactoredAddedDiag`` a :class:`~lowrank_op.added_diag.FactoredAddedDiag`
                                                      (Woodbury solves, ``O(n mdim^2)``)
        any other LinearOperator                      linear_operator's lazy ``SumLinearOperator``
        ============================================  ===============================================

        linear_operator's own rule would make ``fm + tensor`` a ``SumLinearOperator``, whose
        ``solve`` and ``logdet`` assume a symmetric positive definite sum: silently wrong for a
        non-symmetric ``A @ B``. A diagonal is best added as ``DiagLinearOperator(d)`` or with
        :meth:`add_diagonal` (Woodbury), not as ``torch.diag(d)``, which becomes the dense case.
        Tensors must have the FactoredMatrix's dtype (TypeError otherwise); see
        :func:`lowrank_op.sums.tensor_term_factors`.

        Examples
        --------
        >>> fm = FactoredMatrix(torch.ones(4, 2), torch.ones(2, 4))
        >>> (fm + 1.0).mdim, (fm - torch.ones(4)).mdim, (torch.eye(4) + fm).mdim
        (3, 3, 6)
        """
        if isinstance(other, FactoredMatrix):
            if other.shape[-2:] != self.shape[-2:]:
                raise ValueError(
                    f"shapes do not match for a sum: FactoredMatrix of shape {tuple(self.shape)} and "
                    f"FactoredMatrix of shape {tuple(other.shape)}; the last two dims must be equal."
                )
            check_broadcast("FactoredMatrix", self.shape, "FactoredMatrix", other.shape)
            return FactoredMatrix(*sums.concat_factors(self._A, self._B, other._A, other._B))
        if isinstance(other, (DiagLinearOperator, AddedDiagLinearOperator)):
            from lowrank_op.added_diag import FactoredAddedDiag  # it subclasses linear_operator's and imports this module

            if isinstance(other, DiagLinearOperator):
                return FactoredAddedDiag(self, other)
            if isinstance(other, FactoredAddedDiag):
                return other + self
        if isinstance(other, numbers.Number) and not isinstance(other, (bool, complex)) and other == 0:
            return self
        term = sums.tensor_term_factors(other, self.shape, self.dtype, self.device)
        if term is not None:
            return FactoredMatrix(*sums.concat_factors(self._A, self._B, *term))
        return super().__add__(other)

    def __radd__(self, other):
        """``other + self``: the same as ``self + other`` (reached from ``tensor + fm``, ``3.0 + fm``)."""
        return self + other

    def __sub__(self, other):
        """``self - other``: ``self + (-other)``, with :meth:`__add__`'s rules."""
        if isinstance(other, FactoredMatrix):
            return self + (-other)
        if isinstance(other, LinearOperator):
            return self + other.mul(-1)
        if isinstance(other, Tensor) and (other.dtype != self.dtype or other.device != self.device):
            return self + other  # __add__'s dtype or device error, before any work on `other`
        if isinstance(other, (Tensor, numbers.Number)) and not isinstance(other, bool):
            return self + (-other)
        return super().__sub__(other)

    def __rsub__(self, other):
        """``other - self``: ``(-self) + other``, with :meth:`__add__`'s rules."""
        return (-self) + other

    def sum(self, dim: int | None = None) -> Tensor | FactoredMatrix:
        """Sums as linear_operator's ``LinearOperator.sum`` defines them, from the factors.

        Parameters
        ----------
        dim : int or None
            None: all entries, batch included, ``sum 1^T A B 1``, a 0-dim Tensor. The last dim
            (``-1``): the sum of each row, ``A (B 1)``, a Tensor of shape ``(..., ldim)``. The one
            before (``-2``): the sum of each column, ``(1^T A) B``, shape ``(..., rdim)``. A batch
            dim: a FactoredMatrix with that dim summed (:func:`lowrank_op.sums.sum_batch_factors`:
            a factor constant along it is kept, otherwise the members' factors are concatenated,
            inner dim ``k mdim``).

        Returns
        -------
        Tensor or FactoredMatrix
            In the factors' dtype. Cost ``O((ldim + rdim) mdim)`` per member; nothing
            ``ldim x rdim`` is formed.

        Examples
        --------
        >>> fm = FactoredMatrix(torch.ones(3, 4, 2), torch.ones(2, 5))  # every entry is 2
        >>> fm.sum(), fm.sum(-1).shape, fm.sum(0).shape, fm.sum(0).mdim
        (tensor(120.), torch.Size([3, 4]), torch.Size([4, 5]), 2)
        """
        if dim is None:
            return sums.sum_entries(self._A, self._B)
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise TypeError(f"`dim` must be an int or None, got {type(dim).__name__}.")
        nd = self.dim()
        if not -nd <= dim < nd:
            raise ValueError(
                f"`dim` must satisfy `-{nd} <= dim < {nd}` for a FactoredMatrix of shape {tuple(self.shape)}; got {dim}."
            )
        dim = int(dim) % nd
        if dim == nd - 1:
            return sums.sum_columns(self._A, self._B)
        if dim == nd - 2:
            return sums.sum_rows(self._A, self._B)
        return FactoredMatrix(*sums.sum_batch_factors(*self._aligned(), dim))

    def add_diagonal(self, diag: Tensor):
        """``A @ B + diag(diag)`` as a :class:`~lowrank_op.added_diag.FactoredAddedDiag` (Woodbury solves).

        ``diag`` has shape ``(..., n)``, ``(..., 1)`` or ``()`` (the last two give a constant
        diagonal), its leading dims broadcasting to the FactoredMatrix's without adding any (as in
        linear_operator; ``fm + DiagLinearOperator(d)`` broadcasts both ways); the product must be
        square. Cost ``O(1)``: nothing is factorised until a solve.
        """
        if not isinstance(diag, Tensor):
            raise TypeError(f"`diag` must be a torch.Tensor, got {type(diag).__name__}; use add_jitter for a number.")
        self._require_square("add_diagonal")
        n = self.ldim
        try:
            if diag.dim() and diag.shape[-1] != 1:
                operator = DiagLinearOperator(diag.expand(*self.batch_shape, n))
            else:
                operator = ConstantDiagLinearOperator(diag.expand(*self.batch_shape, 1), diag_shape=n)
        except RuntimeError:
            raise ValueError(
                f"`diag` of shape {tuple(diag.shape)} does not fit a FactoredMatrix of shape {tuple(self.shape)}: "
                f"it must broadcast to ({', '.join(map(str, (*self.batch_shape, n)))}) or be a scalar."
            ) from None
        return self + operator

    def add_jitter(self, jitter_val: float = 1e-3):
        """``A @ B + jitter_val * I`` as a :class:`~lowrank_op.added_diag.FactoredAddedDiag`."""
        return self.add_diagonal(torch.tensor(jitter_val, dtype=self.dtype, device=self.device))

    # --- solves and determinants of A @ B alone (lowrank_op.solves) ---------------------------------
    def pinv(self, rtol: float | None = None, atol: float = 0.0) -> FactoredMatrix:
        """The Moore-Penrose pseudo-inverse ``V diag(1/S) U^H``, truncated, as a FactoredMatrix.

        Parameters
        ----------
        rtol, atol : float
            Singular values at most ``max(atol, rtol * S_max)`` are dropped, as in
            ``torch.linalg.pinv``; ``rtol=None`` means ``max(ldim, rdim) * eps`` when ``atol`` is 0.

        Returns
        -------
        FactoredMatrix, shape (..., rdim, ldim)
            Inner dim ``r``, the number of kept singular values (the largest over the batch; other
            members get zero columns).

        Notes
        -----
        From the cached factored SVD (:meth:`svd`): ``O((ldim + rdim) mdim^2 + mdim^3)``, nothing
        ``ldim x rdim`` formed. See :func:`lowrank_op.solves.pinv_factors`.
        """
        return FactoredMatrix(*solves.pinv_factors(*self.svd(), rtol=rtol, atol=atol))

    def lstsq(self, right_tensor: Tensor, rtol: float | None = None, atol: float = 0.0) -> Tensor:
        """The minimum-norm least-squares solution ``pinv(A @ B) @ right_tensor``.

        Parameters
        ----------
        right_tensor : Tensor, shape (..., ldim, k) or (ldim,)
        rtol, atol : float
            As for :meth:`pinv`.

        Returns
        -------
        Tensor, shape (..., rdim, k) or (rdim,)
            Cost ``O((ldim + rdim) (mdim^2 + mdim k) + mdim^3)``; see :func:`lowrank_op.solves.lstsq`.
        """
        rhs, vector = solves.as_columns("right_tensor", right_tensor, self.shape, self.dtype, rows=self.ldim)
        result = solves.lstsq(*self.svd(), rhs, rtol=rtol, atol=atol)
        return result.squeeze(-1) if vector else result

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``(A @ B)^{-1} right_tensor`` for a square, full-rank product (``mdim >= ldim``).

        Parameters
        ----------
        right_tensor : Tensor, shape (..., n, k) or (n,)
        left_tensor : Tensor, shape (..., o, n), optional
            If given, ``left_tensor @ (A @ B)^{-1} right_tensor`` is returned.

        Returns
        -------
        Tensor, shape (..., n, k), (n,) or (..., o, k)

        Raises
        ------
        ValueError
            The product is not square, or ``mdim < ldim`` (rank-deficient, so singular): use
            :meth:`lstsq` or :meth:`pinv`.
        RuntimeError
            The product is exactly singular (a zero pivot); an ill-conditioned one gives an
            :class:`~lowrank_op.errors.IllConditionedWarning`.

        Notes
        -----
        With ``mdim >= n`` the ``n x n`` product is no larger than ``A``, so it is formed and
        LU-factorised: ``O(n^2 mdim + n^3)``; no CG, so non-symmetric products are solved
        correctly. See :func:`lowrank_op.solves.solve_product`.
        """
        self._require_square("solve", "Use `fm.lstsq(y)` for the minimum-norm least-squares solution, or `fm.pinv()`.")
        rhs, vector = solves.as_columns("right_tensor", right_tensor, self.shape, self.dtype)
        result = solves.solve_product(self._A, self._B, rhs, stacklevel=2)
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def __repr__(self) -> str:
        dtype = getattr(self._A, "dtype", type(self._A).__name__)
        device = getattr(self._A, "device", None)
        return f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim}, dtype={dtype}, device={device})"
