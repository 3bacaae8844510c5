"""``A @ B + diag(d)`` as a linear_operator operator, solved by the Woodbury identity.

:class:`FactoredAddedDiag` is what ``fm + diag``, ``diag + fm``, ``fm.add_diagonal(d)`` and
``fm.add_jitter(v)`` return for a square :class:`~lowrank_op.FactoredMatrix` ``fm``. Its ``solve``,
``logdet``, ``slogdet``, ``inv_quad`` and ``inv_quad_logdet`` go through the ``mdim x mdim``
capacitance matrix (:mod:`lowrank_op.woodbury`): exact, ``O(n mdim^2 + mdim^3)``, right for
non-symmetric ``A @ B``, differentiable by ordinary autograd, and never CG or Lanczos.

``diag + fm`` (Python asks ``DiagLinearOperator.__add__`` first) reaches this class through the
small hook in :mod:`lowrank_op.diag_routing`, which ``import lowrank_op`` installs. The kernels are
in :mod:`lowrank_op.woodbury`; solves of ``A @ B`` alone in :mod:`lowrank_op.solves`.

Why a subclass of ``AddedDiagLinearOperator``
---------------------------------------------
GPyTorch (its likelihoods, prediction strategies and ``evaluate_kernel``) recognises
``AddedDiagLinearOperator`` and reads its ``_linear_op`` and ``_diag_tensor``; the subclass keeps all
of that, and inherits ``matmul``, ``diagonal``, indexing, batching and ``_args`` reconstruction
(``representation_tree``, ``clone``, ``detach``, ``.to``, pickling). It overrides the solves and
determinants, and ``_svd`` (the inherited one assumes a symmetric operator). linear_operator's
``LowRankRootAddedDiagLinearOperator`` is not reused for ``B = A^T``: its Cholesky adds jitter
silently (``psd_safe_cholesky``) and it accepts only a ``LowRankRootLinearOperator``.
"""

from __future__ import annotations

import numbers

import torch
from linear_operator.operators import (
    AddedDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    LinearOperator,
    SumBatchLinearOperator,
)
from torch import Tensor

from lowrank_op import conditioning, solves, woodbury
from lowrank_op._cache import ResultCache
from lowrank_op._checks import check_broadcast
from lowrank_op.factored import FactoredMatrix

_ADVICE = "Add a larger diagonal (e.g. `add_jitter`), or use float64."


class FactoredAddedDiag(AddedDiagLinearOperator):
    r"""``M = A @ B + D``: a square FactoredMatrix plus a diagonal, solved by the Woodbury identity.

    Usually made by ``fm + diag``, ``diag + fm``, ``fm.add_diagonal(d)`` or ``fm.add_jitter(v)``.

    Parameters
    ----------
    *linear_ops : FactoredMatrix and DiagLinearOperator, in either order
        ``fm`` of shape ``(..., n, n)`` (factors ``A`` ``(..., n, mdim)``, ``B`` ``(..., mdim, n)``)
        and a ``DiagLinearOperator`` (or ``ConstantDiagLinearOperator``) of shape ``(..., n, n)``
        and the same dtype; leading dims broadcast.
    preconditioner_override : callable, optional
        Passed to ``AddedDiagLinearOperator``; used only by linear_operator's generic CG, which this
        class does not call.

    Notes
    -----
    With the capacitance matrix ``C = I + B D^{-1} A`` (``mdim x mdim``)::

        M^{-1} = D^{-1} - D^{-1} A C^{-1} B D^{-1}     (Woodbury)
        det M  = det D * det C                          (matrix determinant lemma)

    ============================================  ===================================
    first solve / logdet (factorises ``C``)       ``O(n mdim^2 + mdim^3)``
    each further solve with ``k`` columns         ``O(n mdim k + mdim^2 k)``
    ============================================  ===================================

    *Which factorisation.* Cholesky of ``I + A^H D^{-1} A`` when the operator is Hermitian positive
    definite by :func:`lowrank_op.woodbury.is_hermitian_pair`: ``d`` real and positive, and ``B`` is
    the view ``A.mH`` / ``A.mT`` (e.g. ``FactoredMatrix(A, A.mT)``), or equals it exactly when no
    gradient is recorded. LU with partial pivoting otherwise, which is right for any ``A @ B``.

    *Singular and ill-conditioned operators.* A zero or non-finite diagonal entry raises
    RuntimeError in every solve and determinant (Woodbury needs ``D^{-1}``). A capacitance matrix
    with an exact zero pivot (``M`` singular) makes solves and inverse quadratic forms raise
    RuntimeError, and ``logdet`` return ``-inf`` (as ``torch.logdet`` does) with an
    :class:`~lowrank_op.errors.IllConditionedWarning`, since a zero pivot may be rounding. When the
    estimated 1-norm condition number of ``C`` exceeds ``1/eps``
    (:class:`lowrank_op.settings.ill_conditioned_rcond`), the warning reports the estimate; a
    float32 (complex64) ``C`` past that limit is factorised again in float64 (complex128), so that a
    nearly singular 32-bit operator still gets its right ``log|det|`` and solves
    (:mod:`lowrank_op.woodbury`, "32-bit refinement"). ``mdim = 0`` is the diagonal alone; a 0 x 0
    operator has log-determinant 0 and empty solves.

    *Sign of the determinant.* ``logdet`` follows ``torch.logdet``: NaN where the determinant of a
    real operator is negative (possible when ``A @ B`` is not positive definite or ``d`` has
    negative entries). :meth:`slogdet` returns the sign and ``log|det|``.

    The factorisation is cached on the instance under the package's one rule
    (:mod:`lowrank_op._cache`): reused only while ``A``, ``B`` and ``d`` hold the same contents and
    no gradient is being recorded; with gradients it is recomputed per call, so each result has its
    own autograd graph.

    Examples
    --------
    >>> import torch
    >>> from lowrank_op import FactoredMatrix
    >>> A, B = torch.randn(500, 8, dtype=torch.float64), torch.randn(8, 500, dtype=torch.float64)
    >>> op = FactoredMatrix(A, B).add_diagonal(torch.full((500,), 2.0, dtype=torch.float64))
    >>> x = op.solve(torch.ones(500, dtype=torch.float64))
    >>> bool(torch.allclose(op @ x, torch.ones(500, dtype=torch.float64)))
    True
    """

    def __init__(self, *linear_ops: LinearOperator, preconditioner_override=None):
        _check_operands(linear_ops)
        super().__init__(*linear_ops, preconditioner_override=preconditioner_override)
        self._cache = ResultCache()

    @property
    def factored(self) -> FactoredMatrix:
        """The low-rank part ``A @ B``."""
        return self._linear_op

    def _factorization(self) -> woodbury.WoodburyFactor:
        """The Woodbury factorisation, from this instance's cache (:mod:`lowrank_op._cache` says when)."""

        def compute() -> woodbury.WoodburyFactor:
            A, B, d = self._linear_op._A, self._linear_op._B, self._diag_tensor._diagonal()
            return woodbury.factorize(A, B, d, woodbury.is_hermitian_pair(A, B, d))

        return self._cache.get_or_compute("woodbury", self.representation(), compute)

    def _checked_factorization(self, stacklevel: int, need_nonsingular: bool) -> woodbury.WoodburyFactor:
        """The factorisation; RuntimeError if singular and ``need_nonsingular``; the warning if any.

        ``stacklevel`` counts from the caller of this method (1: the caller itself)."""
        factor = self._factorization()
        if need_nonsingular:
            woodbury.require_nonsingular(factor)
        conditioning.warn_ill_conditioned(woodbury.warning_message(factor, _ADVICE), stacklevel=stacklevel + 1)
        return factor

    # --- solves and determinants ------------------------------------------------------------------
    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``M^{-1} right_tensor`` (or ``left_tensor @ M^{-1} right_tensor``) by the Woodbury identity.

        Parameters
        ----------
        right_tensor : Tensor, shape (..., n, k) or (n,)
        left_tensor : Tensor, shape (..., o, n), optional

        Returns
        -------
        Tensor, shape (..., n, k), (n,) or (..., o, k)
            Leading dims broadcast. Cost ``O(n mdim k)`` after the factorisation (class Notes).

        Raises
        ------
        RuntimeError
            ``M`` is singular (zero pivot in ``C``) or the diagonal has a zero entry.
        """
        rhs, vector = solves.as_columns("right_tensor", right_tensor, self.shape, self.dtype)
        result = woodbury.solve(self._checked_factorization(2, need_nonsingular=True), rhs)
        result = result.squeeze(-1) if vector else result
        return result if left_tensor is None else left_tensor @ result

    def _solve(self, rhs: Tensor, preconditioner=None, num_tridiag: int = 0) -> Tensor:
        if num_tridiag:
            raise NotImplementedError(
                "FactoredAddedDiag does not run Lanczos tridiagonalisation; its log-determinant is "
                "exact: call logdet() or inv_quad_logdet(..., logdet=True)."
            )
        return woodbury.solve(self._checked_factorization(2, need_nonsingular=True), rhs)

    def inv_quad_logdet(
        self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True
    ) -> tuple[Tensor | None, Tensor | None]:
        """``tr(R^T M^{-1} R)`` and ``log det M`` from one factorisation of ``C``.

        Parameters
        ----------
        inv_quad_rhs : Tensor, shape (..., n, k) or (n,), optional
        logdet : bool
        reduce_inv_quad : bool
            Sum the inverse quadratic form over the ``k`` columns (shape ``(...)``) or not
            (shape ``(..., k)``).

        Returns
        -------
        inv_quad : Tensor or None
            None when ``inv_quad_rhs`` is None.
        logdet : Tensor, shape (...), or None
            None unless ``logdet``; NaN where a real operator's determinant is negative.

        Notes
        -----
        Cost ``O(n mdim^2 + mdim^3)`` for the factorisation plus ``O(n mdim k)``: exact, no
        stochastic trace estimation.
        """
        return self._inv_quad_logdet(inv_quad_rhs, logdet, reduce_inv_quad, stacklevel=3)

    def _inv_quad_logdet(self, inv_quad_rhs, logdet, reduce_inv_quad, stacklevel):
        solves.require_something(inv_quad_rhs, logdet)
        inv_quad = None
        if inv_quad_rhs is not None:
            rhs, vector = solves.as_columns("inv_quad_rhs", inv_quad_rhs, self.shape, self.dtype)
        factor = self._checked_factorization(stacklevel, need_nonsingular=inv_quad_rhs is not None)
        if inv_quad_rhs is not None:
            inv_quad = solves.inv_quad(rhs.to(factor.dtype), woodbury.solve(factor, rhs), reduce_inv_quad or vector)
        logdet_term = solves.logdet_from_slogdet(*woodbury.slogdet(factor)) if logdet else None
        return inv_quad, logdet_term

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        """``tr(R^T M^{-1} R)``, shape ``(...)`` (or ``(..., k)`` without reduction); see :meth:`inv_quad_logdet`."""
        return self._inv_quad_logdet(inv_quad_rhs, False, reduce_inv_quad, stacklevel=3)[0]

    def logdet(self) -> Tensor:
        """``log det M``, shape ``(...)``, by the determinant lemma: NaN where negative, ``-inf`` if singular."""
        return self._inv_quad_logdet(None, True, True, stacklevel=3)[1]

    def slogdet(self) -> tuple[Tensor, Tensor]:
        """``(sign, log|det M|)``, each shape ``(...)``, as ``torch.linalg.slogdet`` defines them.

        ``sign`` is -1, 0 or 1 (a unit complex number for complex dtypes); cost as :meth:`logdet`.
        """
        return woodbury.slogdet(self._checked_factorization(2, need_nonsingular=False))

    # --- structure --------------------------------------------------------------------------------
    def __neg__(self) -> FactoredAddedDiag:
        return FactoredAddedDiag(-self._linear_op, self._diag_tensor.mul(-1))

    def __add__(self, other):
        if isinstance(other, FactoredAddedDiag):
            return FactoredAddedDiag(self._linear_op + other._linear_op, self._diag_tensor + other._diag_tensor)
        if isinstance(other, DiagLinearOperator):
            return FactoredAddedDiag(self._linear_op, self._diag_tensor + other)
        if isinstance(other, (FactoredMatrix, Tensor, numbers.Number)) and not isinstance(other, bool):
            # A number, row or column joins the factors as a rank-one term; a full (..., n, n)
            # tensor raises TypeError there, as FactoredMatrix + tensor does.
            return FactoredAddedDiag(self._linear_op + other, self._diag_tensor)
        # Any other operator: linear_operator's lazy sum, with its generic (symmetric) solves.
        return AddedDiagLinearOperator(self._linear_op + other, self._diag_tensor)

    def __radd__(self, other):
        return self + other

    def __sub__(self, other):
        return self + (other.mul(-1) if isinstance(other, LinearOperator) else -other)

    def __rsub__(self, other):
        return (-self) + other

    def _svd(self) -> tuple[LinearOperator, Tensor, LinearOperator]:
        # The inherited _svd adds the diagonal to the factored singular values, which is right only
        # for a symmetric positive semi-definite A @ B; this one is dense, O(n^3).
        U, S, Vh = torch.linalg.svd(self.to_dense(), full_matrices=False)
        return DenseLinearOperator(U), S, DenseLinearOperator(Vh.mH)

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        full = slice(None)
        if isinstance(row_index, slice) and row_index == full and isinstance(col_index, slice) and col_index == full:
            # Batch indexing only: index both operands and stay a FactoredAddedDiag (the inherited
            # SumLinearOperator._getitem would return a plain sum).
            return LinearOperator._getitem(self, row_index, col_index, *batch_indices)
        return super()._getitem(row_index, col_index, *batch_indices)

    def _sum_batch(self, dim: int) -> LinearOperator:
        return SumBatchLinearOperator(self, dim)

    def __repr__(self) -> str:
        return (
            f"FactoredAddedDiag(shape={tuple(self.shape)}, mdim={self._linear_op.mdim}, "
            f"dtype={self.dtype}, device={self.device})"
        )


def _check_operands(linear_ops: tuple) -> None:
    kinds = sorted(type(op).__name__ for op in linear_ops)
    fms = [op for op in linear_ops if isinstance(op, FactoredMatrix)]
    diags = [op for op in linear_ops if isinstance(op, DiagLinearOperator)]
    if len(linear_ops) != 2 or len(fms) != 1 or len(diags) != 1:
        raise TypeError(
            "FactoredAddedDiag takes one FactoredMatrix and one DiagLinearOperator (either order); "
            f"got {kinds}. Use linear_operator's AddedDiagLinearOperator or SumLinearOperator for "
            "other operands."
        )
    fm, diag = fms[0], diags[0]
    fm._require_square(
        "adding a diagonal", "Add it to a square product, e.g. FactoredMatrix(A, B) with B of shape (mdim, ldim)."
    )
    if diag.shape[-1] != fm.ldim:
        raise ValueError(
            f"the diagonal has {diag.shape[-1]} entries but the FactoredMatrix is {fm.ldim} x {fm.rdim}; "
            "they must match."
        )
    if diag.dtype != fm.dtype:
        raise TypeError(
            f"the diagonal has dtype {diag.dtype} but the FactoredMatrix has {fm.dtype}; cast one, "
            f"e.g. the diagonal tensor with .to({fm.dtype})."
        )
    check_broadcast("FactoredMatrix", fm.shape, "diagonal", diag.shape)
