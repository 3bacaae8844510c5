"""``OuterFactoredMatrix``: ``L @ (A @ B) @ R``, a FactoredMatrix whose outer factors stay unmultiplied.

``W_E @ model.OV @ W_U`` in TransformerLens multiplies the 50,257 x 768 embedding into every
head's factor. Here ``tensor @ fm`` and ``fm @ tensor`` keep a factor that would widen the product
(more rows than ``fm.ldim``, or more columns than ``fm.rdim``) as an outer factor, and
``fm1 @ fm2`` keeps the small ``fm1.B @ fm2.A`` as the inner factor between ``fm1.A`` and
``fm2.B``. Decompositions go through one QR of each outer factor, shared by every matrix of the
batch and cached across objects (:mod:`lowrank_op.shared_bases` holds the algorithm and its costs).

To TransformerLens code it is a FactoredMatrix: ``.A`` is ``L @ A`` and ``.B`` is ``B @ R``
(formed when read, cached under the package's rule), ``mdim`` is the inner dim, and every other
member keeps its meaning; members without a path of their own here use those formed factors.
"""

from __future__ import annotations

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from lowrank_op import _indexing, shared_bases, topk
from lowrank_op._autograd import sum_to_shape
from lowrank_op._cache import ResultCache
from lowrank_op._checks import as_scalar, check_broadcast, check_factor, check_factors
from lowrank_op._products import fold_matmul
from lowrank_op.errors import DeviceMismatchError, DtypeMismatchError, ShapeMismatchError
from lowrank_op.factored import FactoredMatrix, _warn_if_repeated


def _check_outer(name: str, X: object, inner: Tensor, side: str) -> Tensor:
    X = check_factor(name, X)
    if not isinstance(X, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(X).__name__}.")
    if X.dtype != inner.dtype:
        raise DtypeMismatchError(
            f"`{name}` must have the inner factors' dtype {inner.dtype}, got {X.dtype}; cast it with "
            f"{name}.to({inner.dtype})."
        )
    if X.device != inner.device:
        raise DeviceMismatchError(f"`{name}` is on {X.device} and the inner factors on {inner.device}; move one.")
    size, want = (X.shape[-1], inner.shape[-2]) if side == "left" else (X.shape[-2], inner.shape[-1])
    if size != want:
        what = "columns" if side == "left" else "rows"
        raise ShapeMismatchError(
            f"`{name}` of shape {tuple(X.shape)} has {size} {what}, but the inner product has "
            f"{want} {'rows' if side == 'left' else 'columns'}; they must be equal."
        )
    return X


class OuterFactoredMatrix(FactoredMatrix):
    r"""The matrix ``M = L @ A @ B @ R``, with outer factors ``L`` and ``R`` kept unmultiplied.

    Parameters
    ----------
    A : Tensor, shape (..., p, m)
    B : Tensor, shape (..., m, q)
        The inner factors; ``m`` is :attr:`mdim`.
    left : Tensor, shape (..., n, p), optional
    right : Tensor, shape (..., q, r), optional
        The outer factors (absent: the identity). Usually without leading dims (an embedding
        shared by every head); any that broadcast are fine. Same dtype and device as ``A``.

    Notes
    -----
    Built by ``tensor @ fm``, ``fm @ tensor`` and ``fm1 @ fm2`` (see :mod:`lowrank_op.outer_factored`);
    the constructor is for code that holds the factors already. With ``N`` matrices sharing each
    outer factor:

    ==========================  ==========================================================
    ``S``, ``norm()``           one QR of each outer factor (cached across objects), then
                                ``O(m p^2 + m q^2 + (p + q) m^2)`` per matrix
    ``svd()``                   ``+ O((n + r) m)`` per matrix for ``U``, ``V``
    ``eigenvalues``, ``trace``  ``R L`` once per pair (``O(n p q)``), then ``O(m p q)``
    ``fm @ x``                  ``O(n p + p m + m q + q r)`` per column, nothing formed
    ``.A``, ``.B``, ``AB``      formed when read: ``O(N n p m)``, cached on the instance
    ==========================  ==========================================================

    ``"auto"`` uses a basis only where it pays (:func:`lowrank_op.shared_bases.plan`) and reports
    what it chose to :mod:`lowrank_op.choices`; decomposition methods take ``outer=`` to force
    ``"shared"`` or ``"formed"``.

    Examples
    --------
    >>> import torch
    >>> from lowrank_op import FactoredMatrix
    >>> W_E, W_U = torch.randn(5000, 64), torch.randn(64, 5000)
    >>> ov = FactoredMatrix(torch.randn(8, 64, 16), torch.randn(8, 16, 64))
    >>> circuit = W_E @ ov @ W_U
    >>> type(circuit).__name__, circuit.shape, circuit.mdim
    ('OuterFactoredMatrix', torch.Size([8, 5000, 5000]), 16)
    """

    def __init__(self, A: Tensor, B: Tensor, *outer: Tensor, left: Tensor | None = None,
                 right: Tensor | None = None, sides: str | None = None):
        check_factors(A, B)
        if sides is None:  # the public form: left= and right=
            if outer:
                raise TypeError("pass the outer factors by name: OuterFactoredMatrix(A, B, left=L, right=R).")
            sides = ("L" if left is not None else "") + ("R" if right is not None else "")
        else:  # linear_operator's reconstruction: the present outer factors follow A and B
            if sides not in ("", "L", "R", "LR") or len(outer) != len(sides) or left is not None or right is not None:
                raise TypeError(f"`sides` must be '', 'L', 'R' or 'LR' with as many outer factors; got {sides!r}.")
            it = iter(outer)
            left = next(it) if "L" in sides else None
            right = next(it) if "R" in sides else None
        if left is not None:
            left = _check_outer("left", left, A, "left")
        if right is not None:
            right = _check_outer("right", right, B, "right")
        # Pairwise broadcastable leading dims are jointly broadcastable (per dim, every size other
        # than 1 is the same); check_broadcast takes full shapes and names both operands.
        named = [(f"`{name}`", X) for name, X in (("left", left), ("A", A), ("B", B), ("right", right)) if X is not None]
        for i, (first, X) in enumerate(named):
            for second, Y in named[i + 1 :]:
                check_broadcast(first, X.shape, second, Y.shape)
        LinearOperator.__init__(self, A, B, *(X for X in (left, right) if X is not None), sides=sides)
        self._sides = sides
        self._left, self._right = left, right
        self._cache = ResultCache()

    # --- the four factors ---------------------------------------------------------------------------
    @property
    def inner(self) -> FactoredMatrix:
        """``A @ B`` without the outer factors, a FactoredMatrix of shape (..., p, q)."""
        return FactoredMatrix(self._args[0], self._args[1])

    @property
    def left(self) -> Tensor | None:
        """The left outer factor ``L`` (None for the identity)."""
        return self._left

    @property
    def right(self) -> Tensor | None:
        """The right outer factor ``R`` (None for the identity)."""
        return self._right

    @property
    def _factors(self) -> tuple[Tensor, ...]:
        return tuple(X for X in (self._left, self._args[0], self._args[1], self._right) if X is not None)

    def _chain(self) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
        return self._left, self._args[0], self._args[1], self._right

    def _with(self, L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None) -> OuterFactoredMatrix:
        return OuterFactoredMatrix(A, B, left=L, right=R)

    @property
    def _A(self) -> Tensor:
        """``L @ A``, shape (..., n, m): formed on first read, cached on the instance."""
        L, A = self._left, self._args[0]
        if L is None:
            return A
        return self._cache.get_or_compute("formed:A", (L, A), lambda: fold_matmul(L, A))

    @property
    def _B(self) -> Tensor:
        """``B @ R``, shape (..., m, r): formed on first read, cached on the instance."""
        B, R = self._args[1], self._right
        if R is None:
            return B
        return self._cache.get_or_compute("formed:B", (B, R), lambda: fold_matmul(B, R))

    @property
    def ldim(self) -> int:
        return (self._left if self._left is not None else self._args[0]).shape[-2]

    @property
    def mdim(self) -> int:
        return self._args[0].shape[-1]

    @property
    def rdim(self) -> int:
        return (self._right if self._right is not None else self._args[1]).shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return torch.broadcast_shapes(*(X.shape[:-2] for X in self._factors))

    @property
    def has_leading_dims(self) -> bool:
        return any(X.dim() > 2 for X in self._factors)

    def _aligned_factors(self) -> list[Tensor | None]:
        nb = len(self.batch_shape)
        return [None if X is None else X.reshape((1,) * (nb + 2 - X.dim()) + X.shape) for X in self._chain()]

    def _cached(self, key: str, compute):
        return self._cache.get_or_compute(key, self._factors, compute)

    # --- linear_operator's hooks --------------------------------------------------------------------
    def _matmul(self, rhs: Tensor) -> Tensor:
        L, A, B, R = self._chain()
        out = rhs if R is None else R @ rhs
        out = A @ (B @ out)
        return out if L is None else L @ out

    def _t_matmul(self, rhs: Tensor) -> Tensor:
        L, A, B, R = self._chain()
        out = rhs if L is None else L.mT @ rhs
        out = B.mT @ (A.mT @ out)
        return out if R is None else R.mT @ out

    def _transpose_nonbatch(self) -> OuterFactoredMatrix:
        L, A, B, R = self._chain()
        return self._with(None if R is None else R.mT, B.mT, A.mT, None if L is None else L.mT)

    def _bilinear_derivative(self, left_vecs: Tensor, right_vecs: Tensor) -> tuple[Tensor | None, ...]:
        # For u^T L A B R v: each factor's gradient is (what stands left of it)^H u (v^T what stands
        # right of it)^H, summed over the columns and to the factor's shape.
        if left_vecs.dim() == 1:
            left_vecs, right_vecs = left_vecs.unsqueeze(-1), right_vecs.unsqueeze(-1)
        factors = [X for X in self._chain() if X is not None]
        lefts, u = [], left_vecs  # lefts[i] = (F_0 ... F_{i-1})^H u
        for X in factors:
            lefts.append(u)
            u = X.mH @ u
        rights, v = [None] * len(factors), right_vecs  # rights[i] = F_{i+1} ... F_k v
        for i in range(len(factors) - 1, -1, -1):
            rights[i] = v
            v = factors[i] @ v
        grads = {id(X): sum_to_shape(lefts[i] @ rights[i].mH, X.shape) if X.requires_grad else None
                 for i, X in enumerate(factors)}
        A, B = self._args[0], self._args[1]
        return tuple(grads[id(X)] for X in (A, B, *(X for X in (self._left, self._right) if X is not None)))

    def _expand_batch(self, batch_shape: torch.Size) -> OuterFactoredMatrix:
        L, A, B, R = self._chain()
        bs = tuple(batch_shape)
        return self._with(L, A.expand(*bs, *A.shape[-2:]), B.expand(*bs, *B.shape[-2:]), R)

    def _unsqueeze_batch(self, dim: int) -> OuterFactoredMatrix:
        return self._with(*(None if X is None else X.unsqueeze(dim) for X in self._aligned_factors()))

    def _permute_batch(self, *dims: int) -> OuterFactoredMatrix:
        order = (*dims, len(dims), len(dims) + 1)
        return self._with(*(None if X is None else X.permute(order) for X in self._aligned_factors()))

    def _indexed(self, lead: tuple, row, col) -> OuterFactoredMatrix:
        aligned = self._aligned_factors()
        present = [X for X in aligned if X is not None]
        indexed = iter(_indexing.index_chain(tuple(present), lead, row, col))
        return self._with(*(None if X is None else next(indexed) for X in aligned))

    def _getitem(self, row_index, col_index, *batch_indices) -> OuterFactoredMatrix:
        return self._indexed(batch_indices, row_index, col_index)

    def __getitem__(self, index):
        """As :meth:`FactoredMatrix.__getitem__`; leading-dim, row and column indexing keeps the
        outer factors (rows index ``L``, columns ``R``), the other cases use the formed factors."""
        p = _indexing.plan(index, self.shape)
        if p.entries is None and not (p.between or p.after):
            return self._indexed(p.lead, p.row, p.col)
        return super().__getitem__(index)

    def _mul_constant(self, other) -> OuterFactoredMatrix:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if other.dim():
            other = other[..., None, None]
        return self._scaled(self._args[0] * other)

    def _scaled(self, A: Tensor) -> OuterFactoredMatrix:
        L, _, B, R = self._chain()
        return self._with(L, A, B, R)

    def __mul__(self, other) -> OuterFactoredMatrix:
        return self._scaled(self._args[0] * as_scalar("other", other, self.dtype, self.device))

    __rmul__ = __mul__

    def __truediv__(self, other) -> OuterFactoredMatrix:
        return self._scaled(self._args[0] / as_scalar("other", other, self.dtype, self.device))

    def __neg__(self) -> OuterFactoredMatrix:
        return self._scaled(-self._args[0])

    def squeeze(self, dim: int) -> FactoredMatrix | Tensor:
        """As :meth:`FactoredMatrix.squeeze`; a size-1 leading dim goes from every factor."""
        position = dim + self.dim() if dim < 0 else dim
        if self.shape[position] == 1 and position < self.dim() - 2:
            return self._with(*(None if X is None else X.squeeze(position) for X in self._aligned_factors()))
        return super().squeeze(dim)

    def get_corner(self, k: int = 3) -> Tensor:
        """As :meth:`FactoredMatrix.get_corner`, from the first ``k`` rows of ``L`` and columns of ``R``."""
        corner = self._indexed((), slice(k), slice(k)).to_dense()
        return corner[tuple(slice(k) for _ in range(corner.dim()))]

    def to_dense(self) -> Tensor:
        """The dense product, shape (..., ldim, rdim): ``(L A)(B R)``; costly, and not cached."""
        return self._A @ self._B

    # --- products that keep the outer factors ---------------------------------------------------------
    def __matmul__(self, other):
        """``self @ other``; a Tensor that widens the columns (more of them than its rows) becomes,
        or joins, the right outer factor; a vector is multiplied through the four factors (nothing
        formed); everything else as for FactoredMatrix."""
        if isinstance(other, Tensor) and other.dim() == 1:
            self._check_operand(other, other.shape[-1], self.rdim, "entries")
            return self._matmul(other.unsqueeze(-1)).squeeze(-1)
        if isinstance(other, Tensor) and other.dim() >= 2 and other.shape[-1] > other.shape[-2]:
            self._check_operand(other, other.shape[-2], self.rdim, "rows")
            L, A, B, R = self._chain()
            return self._with(L, A, B, other if R is None else fold_matmul(R, other))
        return super().__matmul__(other)

    def __rmatmul__(self, other):
        """``other @ self``; a Tensor that widens the rows becomes, or joins, the left outer factor; a
        vector is multiplied through the four factors (nothing formed)."""
        if isinstance(other, Tensor) and other.dim() == 1:
            self._check_operand(other, other.shape[-1], self.ldim, "entries")
            return self._t_matmul(other.unsqueeze(-1)).squeeze(-1)
        if isinstance(other, Tensor) and other.dim() >= 2 and other.shape[-2] > other.shape[-1]:
            self._check_operand(other, other.shape[-1], self.ldim, "columns")
            L, A, B, R = self._chain()
            return self._with(other if L is None else fold_matmul(other, L), A, B, R)
        return super().__rmatmul__(other)

    # --- decompositions through the bases (lowrank_op.shared_bases) ---------------------------------
    def svd(self, method: str = "auto", outer: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD ``(U, S, V)`` as :meth:`FactoredMatrix.svd` returns it, through the bases of the
        outer factors; ``outer`` as :func:`lowrank_op.shared_bases.plan`. See
        :func:`lowrank_op.shared_bases.svd` (with a gradient on an outer factor, that side is
        formed)."""
        result = self._cached(f"svd:{method}:{outer}", lambda: shared_bases.svd(*self._chain(), method, outer))
        if torch.is_grad_enabled() and any(X.requires_grad for X in self._factors):
            _warn_if_repeated(result[1])
        return result

    def svdvals(self, method: str = "auto", outer: str = "auto") -> Tensor:
        """Singular values, descending, from the small core (:func:`lowrank_op.shared_bases.svdvals`);
        gradients exact to first order, to every factor."""
        return self._cache.get_or_compute(
            f"svdvals:{method}:{outer}", self._factors, lambda: shared_bases.svdvals(*self._chain(), method, outer),
            reuse={f"svd:{method}:{outer}": lambda decomposition: decomposition[1]},
        )

    def norm(self, method: str = "auto", outer: str = "auto") -> Tensor:
        """Frobenius norm, shape (...), the small core's (:func:`lowrank_op.shared_bases.frobenius_norm`;
        ``method`` is the norm formula, as for :meth:`FactoredMatrix.norm`)."""
        return shared_bases.frobenius_norm(*self._chain(), outer=outer, norm_method=method)

    @property
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``self.B @ self.A`` (TransformerLens's), from the m x m ``B (R L) A``
        (:func:`lowrank_op.shared_bases.reverse_product_eigvals`); cached."""
        self._require_square("eigenvalues")
        return self._cached("eigenvalues", lambda: shared_bases.reverse_product_eigvals(*self._chain()))

    def eigvals(self) -> Tensor:
        """Eigenvalues by descending modulus, shape (..., mdim); when ``mdim > ldim`` the
        ``mdim - ldim`` beyond the product's size are exact zeros, as :meth:`FactoredMatrix.eigvals`
        gives them (:func:`lowrank_op.shared_bases.eigvals`); cached."""
        self._require_square("eigvals")
        return self._cached("eigvals", lambda: shared_bases.eigvals(*self._chain()))

    def trace(self) -> Tensor:
        """Trace of the square product, ``tr((R L) A B)`` (:func:`lowrank_op.shared_bases.trace`)."""
        self._require_square("trace")
        return shared_bases.trace(*self._chain())

    def svds(self, k: int = 6, method: str = "auto", *, return_singular_vectors: bool = True, tol: float = 0.0,
             maxiter: int | None = None, random_state: int = 0, progress: bool = False):
        """:meth:`FactoredMatrix.svds` on the small core ``(R_L A)(B R_R^H)``, whose top triplets are
        the product's with ``U = Q_L U_c``, ``V = Q_R V_c``: ARPACK's operator applications cost
        ``O((p + q) m)`` instead of ``O((n + r) m)``. See :func:`lowrank_op.topk.svds`. As for
        :meth:`svd`, singular vectors with a gradient on an outer factor take the formed path (a
        constant ``Q_L`` would drop the part of ``dU`` outside it)."""
        chain = self._chain()
        sides = (shared_bases.vector_sides if return_singular_vectors else shared_bases.plan)(*chain)
        X, Y = shared_bases.core_factors(*chain, sides=sides, want_q=return_singular_vectors)
        out = topk.svds(X, Y, k, method, return_singular_vectors=return_singular_vectors, tol=tol,
                        maxiter=maxiter, random_state=random_state, progress=progress)
        if not return_singular_vectors:
            return out
        U, S, V = out
        U, V = shared_bases.lift_vectors(chain[0], chain[3], sides, U, V)
        return U, S, V

    def eigs(self, k: int = 6, method: str = "auto", *, tol: float = 0.0, maxiter: int | None = None,
             random_state: int = 0, progress: bool = False) -> Tensor:
        """:meth:`FactoredMatrix.eigs` on the cycle ``((R L) A) B``, which has the product's non-zero
        eigenvalues (:func:`lowrank_op.topk.eigs`)."""
        self._require_square("eigs")
        X, Y = shared_bases._cycle(*self._chain(), "auto", "auto")
        return topk.eigs(X, Y, k, method, tol=tol, maxiter=maxiter, random_state=random_state, progress=progress)

    def __repr__(self) -> str:
        parts = [f"shape={tuple(self.shape)}", f"mdim={self.mdim}"]
        if self._left is not None:
            parts.append(f"left={tuple(self._left.shape)}")
        if self._right is not None:
            parts.append(f"right={tuple(self._right.shape)}")
        return f"OuterFactoredMatrix({', '.join(parts)}, dtype={self.dtype}, device={self.device})"

