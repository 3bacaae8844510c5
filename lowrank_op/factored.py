"""``FactoredMatrix``: a product ``A @ B`` kept as its factors, as a linear_operator LinearOperator.

The class validates its factors, implements linear_operator's hooks through the factors, and
offers TransformerLens's ``FactoredMatrix`` surface under the same names and meanings. The
numerical work is in :mod:`lowrank_op.kernels`; each method here is a few lines around a kernel.
"""

from __future__ import annotations

import warnings

import torch
from linear_operator.operators import DenseLinearOperator, LinearOperator
from torch import Tensor

from lowrank_op import kernels
from lowrank_op._cache import ResultCache
from lowrank_op._checks import as_scalar, check_broadcast, check_factors, warn_off_host
from lowrank_op._indexing import normalize_index
from lowrank_op.errors import UndefinedGradientWarning


def _sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient back to the shape of the factor it belongs to."""
    extra = grad.dim() - len(shape)
    if extra:
        grad = grad.sum(tuple(range(extra)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


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


class FactoredMatrix(LinearOperator):
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
        A, B = self._expanded()
        if batch_indices:
            A, B = A[batch_indices], B[batch_indices]
        return FactoredMatrix(A[..., row_index, :], B[..., col_index])

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
            grads.append(_sum_to_shape(left_vecs @ (self._B @ right_vecs).mH, self._A.shape))
        else:
            grads.append(None)
        if self._B.requires_grad:
            grads.append(_sum_to_shape((self._A.mH @ left_vecs) @ right_vecs.mH, self._B.shape))
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

    @property
    def A(self) -> Tensor:
        """The left factor, shape ``(..., ldim, mdim)``."""
        return self._A

    @property
    def B(self) -> Tensor:
        """The right factor, shape ``(..., mdim, rdim)``."""
        return self._B

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
        """``(A, B)``."""
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
            raise ValueError(
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
        decomposition = self._cache.get(f"svd:{method}", (self._A, self._B))
        if decomposition is not None:
            return decomposition[1]
        return self._cached(f"svdvals:{method}", lambda: kernels.svdvals(self._A, self._B, method=method))

    @property
    def U(self) -> Tensor:
        """Left singular vectors, shape ``(..., ldim, k)``."""
        return self.svd()[0]

    @property
    def S(self) -> Tensor:
        """Singular values, shape ``(..., k)``, descending (values-only path)."""
        return self.svdvals()

    @property
    def Vh(self) -> Tensor:
        """Right singular vectors as columns, shape ``(..., rdim, k)`` (TransformerLens's Vh)."""
        return self.svd()[2]

    @property
    def V(self) -> Tensor:
        """The same tensor as :attr:`Vh`: right singular vectors as columns."""
        return self.Vh

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of the square product, complex, shape ``(..., mdim)``, by descending modulus.

        From the ``mdim x mdim`` ``B @ A`` (which shares ``A @ B``'s non-zero eigenvalues); when
        ``mdim > ldim``, the ``mdim - ldim`` extra ones are exact zeros. Raises ValueError unless
        ``ldim == rdim``. See :func:`lowrank_op.kernels.eigvals`.
        """
        self._require_square("eigenvalues")
        return self._cached("eigvals", lambda: kernels.eigvals(self._A, self._B))

    def svds(self, k: int = 6, method: str = "auto", **options) -> tuple[Tensor, Tensor, Tensor] | Tensor:
        """The ``k`` largest singular triplets, ``(U, S, Vh)`` laid out as :meth:`svd` returns them.

        ``method`` is ``"auto"``, ``"exact"``, ``"arpack"`` or ``"propack"``; ``options`` are
        ``return_singular_vectors``, ``tol``, ``maxiter``, ``random_state`` and ``progress``. See
        :func:`lowrank_op.topk.svds` for the ``"auto"`` rule and the costs.

        Examples
        --------
        >>> fm = FactoredMatrix(torch.randn(3000, 500), torch.randn(500, 3000))
        >>> U, S, Vh = fm.svds(10, method="arpack")
        >>> torch.allclose(S, fm.S[:10], rtol=1e-4)
        True
        """
        from lowrank_op import topk

        return topk.svds(self._A, self._B, k, method, **options)

    def eigs(self, k: int = 6, method: str = "auto", **options) -> Tensor:
        """The ``k`` eigenvalues of largest modulus of the square product, complex, shape ``(..., k)``.

        ``method`` is ``"auto"``, ``"exact"`` or ``"arpack"`` (Arnoldi on the smaller of ``AB``
        and ``BA``); ``options`` are ``tol``, ``maxiter``, ``random_state`` and ``progress``. See
        :func:`lowrank_op.topk.eigs`. ``eigenvalues`` keeps returning all of them.
        """
        from lowrank_op import topk

        return topk.eigs(self._A, self._B, k, method, **options)

    def to_scipy(self):
        """This 2-D product as a ``scipy.sparse.linalg.LinearOperator``, applied through the factors.

        For SciPy's iterative solvers (``lsqr``, ``lsmr``, ``gmres``, ``svds``, ...). Its
        ``matvec`` costs ``O((ldim + rdim) mdim)``; its dtype is the factors' (float32 for 16-bit
        factors); it records no gradients. Factors on a GPU stay there and every application
        copies a vector to the device and back (a ``PerformanceWarning`` says so once).
        See :class:`lowrank_op.scipy_bridge.FactoredScipyOperator`.
        """
        if self._A.dim() != 2 or self._B.dim() != 2:
            raise ValueError(
                f"to_scipy() needs a 2-D FactoredMatrix; this one has shape {tuple(self.shape)}. Index "
                "one matrix first, e.g. fm[0].to_scipy() (or fm[layer, head] for more leading dims)."
            )
        from lowrank_op import scipy_bridge

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
    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            self._check_operand(other.ldim, self.rdim, "rows", other)
            if self.rdim < min(self.mdim, other.mdim):
                # Both dense products are no larger than the factors they come from.
                return FactoredMatrix(self.to_dense(), other.to_dense())
            core = self._B @ other._A  # (..., mdim, other.mdim)
            if other.mdim <= self.mdim:
                return FactoredMatrix(self._A @ core, other._B)
            return FactoredMatrix(self._A, core @ other._B)
        if isinstance(other, Tensor) and other.dim() >= 2:
            self._check_operand(other.shape[-2], self.rdim, "rows", other)
            if self.rdim > self.mdim:
                return FactoredMatrix(self._A, self._B @ other)
            return FactoredMatrix(self.to_dense(), other)
        if isinstance(other, Tensor):
            self._check_operand(other.shape[-1] if other.dim() else None, self.rdim, "entries", other)
            # As a column, so that batched factors broadcast as they do in torch.matmul.
            return (self._A @ (self._B @ other.unsqueeze(-1))).squeeze(-1)
        return super().__matmul__(other)

    def __rmatmul__(self, other):
        if isinstance(other, Tensor) and other.dim() >= 2:
            self._check_operand(other.shape[-1], self.ldim, "columns", other)
            if self.ldim > self.mdim:
                return FactoredMatrix(other @ self._A, self._B)
            return FactoredMatrix(other, self.to_dense())
        if isinstance(other, Tensor):
            self._check_operand(other.shape[-1] if other.dim() else None, self.ldim, "entries", other)
            return ((other.unsqueeze(-2) @ self._A) @ self._B).squeeze(-2)
        return super().__rmatmul__(other)

    def matmul(self, other):
        """linear_operator's contract: Tensor in, Tensor out; a FactoredMatrix stays factored."""
        if isinstance(other, FactoredMatrix):
            return self @ other
        return super().matmul(other)

    def _check_operand(self, got: int | None, want: int, what: str, other: Tensor | LinearOperator) -> None:
        if other.dtype != self.dtype:
            raise TypeError(
                f"dtypes differ in a product: FactoredMatrix of dtype {self.dtype} and operand of dtype "
                f"{other.dtype}; cast one, e.g. operand.to({self.dtype})."
            )
        if got != want:
            hint = " Use `*` to multiply by a scalar." if other.dim() == 0 else ""
            raise ValueError(
                f"shapes do not match for a product: FactoredMatrix of shape {tuple(self.shape)} "
                f"and operand of shape {tuple(other.shape)}, which needs {want} {what}.{hint}"
            )
        check_broadcast("FactoredMatrix", self.shape, "operand", other.shape)

    def __mul__(self, other) -> FactoredMatrix:
        return FactoredMatrix(self._A * as_scalar("other", other, self.dtype, self.device), self._B)

    __rmul__ = __mul__

    def __truediv__(self, other) -> FactoredMatrix:
        return FactoredMatrix(self._A / as_scalar("other", other, self.dtype, self.device), self._B)

    def __neg__(self) -> FactoredMatrix:
        return FactoredMatrix(-self._A, self._B)

    def __getitem__(self, index):
        new_dims, index = normalize_index(index, self.shape)
        target = self
        for dim in new_dims:
            target = target._unsqueeze_batch(dim)
        return LinearOperator.__getitem__(target, index)

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
        (sign 0, ``-inf``). Otherwise the ``n x n`` product, no larger than ``A``, is formed and
        LU-factorised: ``O(n^2 mdim + n^3)``. linear_operator's default would assume a symmetric
        positive definite operator.
        """
        from lowrank_op import added_diag

        return added_diag.slogdet_product(self)

    def logdet(self) -> Tensor:
        """``log det`` of the square product as ``torch.logdet`` defines it (NaN where negative,
        ``-inf`` where singular); see :meth:`slogdet`."""
        from lowrank_op import added_diag

        return added_diag.inv_quad_logdet_product(self, None, True, True)[1]

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """``tr(R^T M^{-1} R)`` (through :meth:`solve`) and ``log det M`` (:meth:`slogdet`), exactly.

        The inverse quadratic form needs a square, full-rank product (``mdim >= ldim``) and raises
        otherwise, as :meth:`solve` does; returns None for a part not asked for.
        """
        from lowrank_op import added_diag

        return added_diag.inv_quad_logdet_product(self, inv_quad_rhs, logdet, reduce_inv_quad)

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        """``tr(R^T M^{-1} R)``, shape ``(...)`` (or ``(..., k)`` unreduced); see :meth:`inv_quad_logdet`."""
        return self.inv_quad_logdet(inv_quad_rhs, False, reduce_inv_quad)[0]

    def __getstate__(self) -> dict:
        # Cached decompositions may hold autograd graphs, which do not pickle; they are recomputed.
        state = self.__dict__.copy()
        state["_cache"] = ResultCache()
        return state

    # --- sums, diagonals and solves (lowrank_op.woodbury) ---
    def __add__(self, other):
        """``self + other``: stays structured where it can (see :func:`lowrank_op.added_diag.add`).

        A FactoredMatrix gives one FactoredMatrix with concatenated factors (inner dims add,
        leading dims broadcast); a ``DiagLinearOperator`` gives a
        :class:`~lowrank_op.added_diag.FactoredAddedDiag` (Woodbury solves); a Tensor or any other
        operator gives linear_operator's lazy sum.
        """
        from lowrank_op import added_diag

        result = added_diag.add(self, other)
        return super().__add__(other) if result is NotImplemented else result

    def __sub__(self, other):
        """``self - other``; as :meth:`__add__` with ``-other``."""
        return self + (-other) if isinstance(other, FactoredMatrix) else super().__sub__(other)

    def add_diagonal(self, diag: Tensor):
        """``A @ B + diag(diag)`` as a :class:`~lowrank_op.added_diag.FactoredAddedDiag` (Woodbury solves).

        ``diag`` has shape ``(..., n)``, ``(..., 1)`` or ``()`` (the last two give a constant
        diagonal), its leading dims broadcasting to the FactoredMatrix's without adding any (as in
        linear_operator; ``fm + DiagLinearOperator(d)`` broadcasts both ways); the product must be
        square. Cost ``O(1)``: nothing is factorised until a solve.
        """
        from lowrank_op import added_diag

        return added_diag.add_diagonal(self, diag)

    def add_jitter(self, jitter_val: float = 1e-3):
        """``A @ B + jitter_val * I`` as a :class:`~lowrank_op.added_diag.FactoredAddedDiag`."""
        return self.add_diagonal(torch.tensor(jitter_val, dtype=self.dtype, device=self.device))

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
        ``ldim x rdim`` formed. See :func:`lowrank_op.woodbury.pinv_factors`.
        """
        from lowrank_op import woodbury

        return FactoredMatrix(*woodbury.pinv_factors(*self.svd(), rtol=rtol, atol=atol))

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
            Cost ``O((ldim + rdim) (mdim^2 + mdim k) + mdim^3)``; see :func:`lowrank_op.woodbury.lstsq`.
        """
        from lowrank_op import added_diag

        return added_diag.lstsq_product(self, right_tensor, rtol, atol)

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
            :class:`~lowrank_op.woodbury.IllConditionedWarning`.

        Notes
        -----
        With ``mdim >= n`` the ``n x n`` product is no larger than ``A``, so it is formed and
        LU-factorised: ``O(n^2 mdim + n^3)``; no CG, so non-symmetric products are solved
        correctly. See :func:`lowrank_op.woodbury.product_solve`.
        """
        from lowrank_op import added_diag

        return added_diag.solve_product(self, right_tensor, left_tensor)

    def __repr__(self) -> str:
        return (
            f"FactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim}, dtype={self.dtype}, "
            f"device={self.device})"
        )
