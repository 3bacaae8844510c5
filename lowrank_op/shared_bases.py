"""Products with outer factors, ``M = L @ A @ B @ R``, decomposed through one QR of each outer factor.

An attention head's OV circuit is ``W_E (W_V W_O) W_U``: the embedding ``W_E`` (d_vocab x
d_model) and unembedding ``W_U`` are the same for every head of every layer. Multiplying them into
each head's factors costs ``d_vocab d_model d_head`` per head and factor, only to take QRs and Gram
matrices of the results. Here they are factorised once instead.

The algorithm
-------------
With ``L = Q_L R_L`` (``L`` (n, p), ``n > p``, ``Q_L`` orthonormal columns) and
``R^H = Q_R R_R`` (``R`` (q, r), ``r > q``),

.. math::  M = L A B R = Q_L \\,(R_L A)(B R_R^H)\\, Q_R^H,

so the singular values and the Frobenius norm of ``M`` are those of the small product
``(R_L A)(B R_R^H)``, (p x m)(m x q), handed to :mod:`lowrank_op.kernels`; its singular vectors
are ``Q_L U_c`` and ``Q_R V_c``. The eigenvalues of a square ``M`` are, apart from zeros, those of
the m x m ``B (R L) A`` (``eig(XY)`` and ``eig(YX)`` share their non-zero values), with the q x p
``R L`` computed once for the pair, or as ``R_L^H R_L`` when ``R`` is ``L^H`` (the QK circuit's
``W_E ... W_E^T``, or a tied ``W_U``), and the trace is ``tr((R L) A B)``.

Each outer factor's factorisation (CholeskyQR2 with its Householder fallback, or Householder;
:func:`lowrank_op.kernels.orthogonalize`) and each ``R L`` is kept in the package's shared cache
(:class:`lowrank_op._cache.TensorCache`): keyed on the tensor's identity, version and contents,
reused across every product that holds the tensor (OV and QK circuits, all layers), freed with it.

Costs, with ``N`` matrices in the batch sharing each outer factor:

=================================  ==========================================================
one QR of ``L`` (or ``R^H``)       ``O(n p^2)``, once per tensor (then cached)
``R L``                            ``O(n p q)``, once per pair (``O(p^3)`` when ``R = L^H``)
per matrix, values only            ``O(m p^2 + m q^2 + (p + q) m^2)``: nothing of size ``n``
vectors (``svd()``)                ``+ O((n + r) m)`` per matrix for ``U = Q_L U_c``,
                                   ``V = Q_R V_c``
forming ``L A`` and ``B R``        ``O(N n p m)``, what the shared path avoids
norm, a core factor shared         one QR of that factor (cached), then ``O(p m^2)`` per matrix
(``fm1 @ fm2`` for all pairs)      for the formed ``p x m`` reduced core (:func:`frobenius_norm`)
=================================  ==========================================================

A loop over many inner pairs with the same outer factors (every head of every layer:
:func:`lowrank_op.circuits.analysis.analyze`) takes the reductions once with :func:`reduce_outer`, whose
:class:`OuterReduction` forms the cores ``(R_L A, B R_R^H)`` and cycles without looking anything up
again (each lookup fingerprints the factor: about 15 ms for a 50257 x 768 float32 one).

``outer="auto"`` decides per side: the basis is used when the factor is tall (``n > p``), at
least as wide as the inner dim (``p >= m``, so the core keeps every singular value), and either
its factorisation is already cached or the ``N m`` columns it would be multiplied into are at
least its ``p`` columns (forming them would cost at least the factorisation). Otherwise that side
is formed (``L A`` per matrix), which is also what ``"formed"`` does everywhere. Every choice is
reported to :mod:`lowrank_op.choices` (operation ``"outer_factor"``).

Gradients: the factorisations are computed without gradients. When an outer factor needs one,
``R_L`` is recomputed per call as ``Q_L^H L`` with ``Q_L`` held constant, which is exact to first
order for singular values and norms (``L`` lies in ``range(Q_L)``, so the projection loses
nothing), and ``R L`` is recomputed as a product. Singular vectors with gradients on an outer
factor take the formed path (a constant ``Q_L`` would drop the part of ``dU`` outside it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_op import _cache, choices, kernels
from lowrank_op._checks import check_choice
from lowrank_op._products import fold_matmul

OUTER_METHODS = ("auto", "shared", "formed")


@dataclass(frozen=True)
class Basis:
    """``X = Q @ R`` for a factor ``X`` of shape (..., n, p).

    Attributes
    ----------
    R : Tensor, shape (..., min(n, p), p)
        Upper triangular; ``X`` itself (promoted) when ``identity``.
    Q : Tensor, shape (..., n, min(n, p)), or None
        Orthonormal columns; None when not formed, or when ``identity`` (``Q`` is ``I_n``).
    identity : bool
        ``X`` is not tall (``n <= p``): nothing was factorised.
    """

    R: Tensor
    Q: Tensor | None
    identity: bool


def _is_tall(X: Tensor) -> bool:
    return X.shape[-2] > X.shape[-1]


def _factorise(X: Tensor, method: str, want_q: bool) -> Basis:
    """QR of a tall ``X`` (detached, promoted); a batch member holding NaN or infinity gets NaN
    ``Q`` and ``R`` and LAPACK never sees it."""
    X = kernels.promote(X.detach())[0]
    bad = kernels._nonfinite(X)
    if bool(bad.any()):  # a copy only then: the common case reads the factor once more, no more
        X = torch.where(kernels._lift(bad, 2), torch.zeros((), dtype=X.dtype, device=X.device), X)
    W, T, R = kernels._factorise(X, method, want_q, "a shared outer factor")
    Q = None if not want_q else (W if T is None else W @ T)
    if bool(bad.any()):
        R = kernels._nan_where(bad, R, 2)
        Q = None if Q is None else kernels._nan_where(bad, Q, 2)
    return Basis(R, Q, identity=False)


def basis(X: Tensor, method: str = "auto", want_q: bool = False) -> Basis:
    """The orthogonal-triangular factorisation ``X = Q R`` of an outer factor, from the shared cache.

    Parameters
    ----------
    X : Tensor, shape (..., n, p)
        ``L``, or ``R^H`` for a right factor. 16-bit factors are factorised in float32.
    method : {"auto", "householder", "cholqr2"}
        As for :func:`lowrank_op.kernels.orthogonalize`.
    want_q : bool
        Form ``Q`` (``n x p``, the size of ``X``) too. A cached factorisation with ``Q`` also
        serves a request without it.

    Returns
    -------
    Basis
        Without gradients. Cost ``O(n p^2)`` on a miss, one fingerprint of ``X`` (``O(n p)``) on a
        hit. A factor that is not tall gives ``Basis(X, None, identity=True)`` and nothing is cached.
    """
    check_choice("method", method, kernels.ORTHO_METHODS)
    if not _is_tall(X):
        return Basis(kernels.promote(X)[0], None, identity=True)
    with_q = ("basis", method, True)
    if want_q:
        return _cache.shared.get_or_compute(with_q, (X,), lambda: _factorise(X, method, True))
    return _cache.shared.get_or_compute(
        ("basis", method, False), (X,), lambda: _factorise(X, method, False), reuse={with_q: lambda b: b}
    )


def _cached_basis(X: Tensor, method: str) -> bool:
    return any(_cache.shared.peek(("basis", method, q), (X,)) is not None for q in (True, False))


def _needs_grad(X: Tensor | None) -> bool:
    return X is not None and torch.is_grad_enabled() and X.requires_grad


# --- Which sides use their basis ----------------------------------------------------------------
def _sharing(X: Tensor, batch: torch.Size) -> int:
    """How many matrices of ``batch`` share each batch member of the outer factor ``X``."""
    own = math.prod(X.shape[:-2])
    return math.prod(batch) // own if own else 0


def plan(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
         outer: str = "auto") -> tuple[bool, bool]:
    """``(left, right)``: whether each outer factor is used through its basis (True) or formed
    into its inner neighbour (False); see the module docstring for ``outer="auto"``'s rule.

    Parameters
    ----------
    L : Tensor or None, shape (..., n, p)
    A : Tensor, shape (..., p, m)
    B : Tensor, shape (..., m, q)
    R : Tensor or None, shape (..., q, r)
    method : str
        The QR method whose cached factorisations count.
    outer : {"auto", "shared", "formed"}
    """
    check_choice("outer", outer, OUTER_METHODS)
    m = A.shape[-1]
    batch = torch.broadcast_shapes(*(X.shape[:-2] for X in (L, A, B, R) if X is not None))
    decisions, reasons = [], []
    for name, X in (("L", L), ("R^H", None if R is None else R.mH)):
        if X is None:
            decisions.append(False)
            continue
        n, p = X.shape[-2:]
        if outer != "auto":
            use = outer == "shared" and _is_tall(X) and min(n, p) >= m
            why = f"outer={outer!r}" + ("" if use or outer == "formed" else f" but {name} {tuple(X.shape)} cannot be")
        elif not _is_tall(X):
            use, why = False, f"{name} {tuple(X.shape)} is not tall: forming it in costs no more than its factors"
        elif p < m:
            use, why = False, f"{name} {tuple(X.shape)} is narrower than the inner dim {m}"
        elif _sharing(X, batch) * m >= p:
            count = _sharing(X, batch)
            use, why = True, (f"{name} {tuple(X.shape)} is shared by {count} matrices with inner dim {m}: "
                              f"{count * m} columns >= its {p}")
        elif _cached_basis(X, method):
            use, why = True, f"the factorisation of {name} {tuple(X.shape)} is cached"
        else:
            count = _sharing(X, batch)
            use, why = False, (f"{name} {tuple(X.shape)} is shared by {count} matrices with inner dim {m}: "
                               f"{count * m} columns < its {p}, and its factorisation is not cached")
        decisions.append(use)
        reasons.append(f"{name}: {'basis' if use else 'formed'} ({why})")
    if reasons:
        chosen = "+".join("basis" if d else "formed" for d, X in zip(decisions, (L, R)) if X is not None)
        choices.record("outer_factor", chosen, "; ".join(reasons) + ".")
    return decisions[0], decisions[1]


# --- The small core ----------------------------------------------------------------------------
def _left_reduced(L: Tensor, method: str, want_q: bool) -> Tensor:
    """``R_L`` with ``L = Q_L R_L``: cached, or ``Q_L^H L`` (gradient to ``L``, ``Q_L`` constant)."""
    if not _needs_grad(L):
        return basis(L, method, want_q).R
    b = basis(L, method, want_q=True)
    return kernels.promote(L)[0] if b.identity else b.Q.mH @ kernels.promote(L)[0]


def _right_reduced(R: Tensor, method: str, want_q: bool) -> Tensor:
    """``R_R^H`` with ``R^H = Q_R R_R`` (so ``R = R_R^H Q_R^H``); as :func:`_left_reduced`."""
    if not _needs_grad(R):
        return basis(R.mH, method, want_q).R.mH
    b = basis(R.mH, method, want_q=True)
    return kernels.promote(R)[0] if b.identity else kernels.promote(R)[0] @ b.Q


def core_factors(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
                 sides: tuple[bool, bool] = (True, True), want_q: bool = False) -> tuple[Tensor, Tensor]:
    """``(X, Y)`` with ``L A B R = Q_L (X Y) Q_R^H``.

    ``X = R_L A`` where the left side uses its basis (``sides[0]``, from :func:`plan`), else
    ``L A``; ``Y = B R_R^H``, else ``B R``; shapes (..., p, m) and (..., m, q) (``n``, ``r`` on
    formed sides), promoted to the compute dtype. ``Q_L`` (``Q_R``) is the identity on a formed
    side. ``want_q`` asks for factorisations that keep ``Q`` (for vectors afterwards).
    """
    P, A, B, Q = _core_chain(L, A, B, R, method, sides, want_q)
    return (A if P is None else fold_matmul(P, A)), (B if Q is None else fold_matmul(B, Q))


def _core_chain(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str,
                sides: tuple[bool, bool], want_q: bool) -> tuple[Tensor | None, Tensor, Tensor, Tensor | None]:
    """``(P, A, B, Q)`` with ``X = P A`` and ``Y = B Q`` of :func:`core_factors` (None: absent),
    promoted: ``P`` is ``R_L`` or ``L``, ``Q`` is ``R_R^H`` or ``R``."""
    left, right = sides
    A, B = kernels.promote(A, B)
    P = None if L is None else (_left_reduced(L, method, want_q) if left else kernels.promote(L)[0])
    Q = None if R is None else (_right_reduced(R, method, want_q) if right else kernels.promote(R)[0])
    return P, A, B, Q


def svdvals(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
            outer: str = "auto") -> Tensor:
    """Singular values of ``L @ A @ B @ R``, descending, shape (..., min(ldim, mdim, rdim)).

    Parameters
    ----------
    L : Tensor or None, shape (..., n, p)
        None for no left factor (the identity).
    A : Tensor, shape (..., p, m)
    B : Tensor, shape (..., m, q)
    R : Tensor or None, shape (..., q, r)
    method : {"auto", "householder", "cholqr2"}
        QR method of every factorisation (:func:`lowrank_op.kernels.orthogonalize`).
    outer : {"auto", "shared", "formed"}
        Whether outer factors are used through their bases; see the module docstring.

    Notes
    -----
    :func:`lowrank_op.kernels.svdvals` of the core :func:`core_factors`. Cost per matrix
    ``O(m (p^2 + q^2) + (p + q) m^2)`` once the bases are cached.
    """
    sides = plan(L, A, B, R, method, outer)
    return kernels.svdvals(*core_factors(L, A, B, R, method, sides), method=method)


#: Bytes of the largest intermediate of one chunk of :func:`_chain_norm`. Chunks below glibc's
#: largest dynamic mmap threshold (32 MiB) come back from the allocator already paged in: for all
#: pairs of GPT-2 small's heads each fresh 340 MB intermediate of the unchunked product cost about
#: 90 ms of page faults here (the whole norm 350 ms; in 16 MiB chunks 200 ms, in 85 MB ones 350
#: ms), and the extra memory is a few chunks instead of two core-sized arrays.
_CHUNK_BYTES = 2**24


def _chain_norm(factors: list[Tensor]) -> Tensor:
    """Frobenius norm per matrix (shape: the broadcast batch, real) of the formed product of
    ``factors`` (leading dims broadcast), chunked along the batch so that no intermediate exceeds
    about :data:`_CHUNK_BYTES` (a chunk is at least one matrix). Each chunk is
    :func:`~lowrank_op._products.fold_matmul` products left to right, then one pass of sums of
    squares (:func:`_formed_norm`). Cost: the products' multiply-adds; memory: a chunk's
    intermediates."""
    batch = torch.broadcast_shapes(*(F.shape[:-2] for F in factors))
    nb = len(batch)
    factors = [F.reshape((1,) * (nb + 2 - F.dim()) + F.shape) for F in factors]
    rows = factors[0].shape[-2]
    per_matrix = max(rows * F.shape[-1] for F in factors[1:])
    total = math.prod(batch) * per_matrix
    limit = _CHUNK_BYTES // factors[0].element_size()  # entries
    split = next((d for d in range(nb) if batch[d] > 1), None)
    if total <= limit or split is None:
        return _formed_norm(factors)
    step = max(1, limit // (total // batch[split]))
    parts = [
        _chain_norm([F.narrow(split, start, min(step, batch[split] - start)) if F.shape[split] != 1 else F
                     for F in factors])
        for start in range(0, batch[split], step)
    ]
    return torch.cat(parts, split)


def _formed_norm(factors: list[Tensor]) -> Tensor:
    """Frobenius norm per matrix of the product of ``factors`` (aligned to the same number of
    dims), formed.

    A matrix whose sum of squares may have lost accuracy to underflow (norm below
    ``sqrt(k tiny / eps)`` for ``k`` entries, zeros included) or overflowed (not finite) is formed
    again from its factors scaled by powers of two (exact), its entries scaled before squaring;
    NaN and infinite inputs stay so.
    """
    Z = factors[0]
    for F in factors[1:]:
        Z = fold_matmul(Z, F)
    norm = torch.linalg.vector_norm(Z, dim=(-2, -1))
    finfo = torch.finfo(norm.dtype)
    floor = math.sqrt(max(Z.shape[-2] * Z.shape[-1], 1) * finfo.tiny / finfo.eps)
    redo = ~(torch.isfinite(norm) & (norm >= floor))
    if not bool(redo.any()):
        return norm
    where = redo.nonzero(as_tuple=True)
    Z, scale = None, 1
    for F in factors:
        F, F_scale = kernels._balance(F.expand(*norm.shape, *F.shape[-2:])[where])
        Z, scale = (F if Z is None else Z @ F), scale * F_scale
    Z, Z_scale = kernels._balance(Z)
    again = torch.linalg.vector_norm(Z, dim=(-2, -1)) * (Z_scale * scale)[..., 0, 0]
    return norm.index_put(where, again)


def _shared_core_norm(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str,
                      sides: tuple[bool, bool]) -> Tensor | None:
    """``|L A B R|_F`` through the bases of core factors shared across the batch, or None where
    that does not pay; see :func:`frobenius_norm`."""
    # Decided from the shapes alone: X = P A is (p, m), Y = B Q is (m, q), with P = R_L (p_L, p_L)
    # on a side that uses its basis (plan() chose it: L is tall), else L itself; Q likewise.
    p = A.shape[-2] if L is None else (L.shape[-1] if sides[0] else L.shape[-2])
    q = B.shape[-1] if R is None else (R.shape[-2] if sides[1] else R.shape[-1])
    m = A.shape[-1]
    x_batch = torch.broadcast_shapes(*(F.shape[:-2] for F in (L, A) if F is not None))
    y_batch = torch.broadcast_shapes(*(F.shape[:-2] for F in (B, R) if F is not None))
    batch = torch.broadcast_shapes(x_batch, y_batch)
    if m == 0 or math.prod(batch) == 0:
        return None
    shared_x, shared_y = math.prod(batch) // math.prod(x_batch), math.prod(batch) // math.prod(y_batch)
    reduce_x, reduce_y = shared_x > 1 and p > m, shared_y > 1 and q > m
    if not (reduce_x or reduce_y):
        return None
    p2, q2 = (m if reduce_x else p), (m if reduce_y else q)
    if p2 * q2 > m * (p2 + q2):
        return None  # forming the reduced core would cost more than two Gram matrices of it
    sides_reduced = (("X", x_batch, p, m, shared_x, reduce_x), ("Y", y_batch, m, q, shared_y, reduce_y))
    what = " and ".join(f"{name} {(*shape, rows, cols)} (shared by {count} matrices)"
                        for name, shape, rows, cols, count, use in sides_reduced if use)
    choices.record(
        "norm", "formed",
        f"core factor {what} reduced through its QR: the {p2} x {q2} core formed costs {p2 * q2 * m} "
        f"multiply-adds per matrix, two Gram matrices {m * m * (p2 + q2)}, and its norm has no "
        "cancellation to estimate.",
    )
    P, A, B, Q = _core_chain(L, A, B, R, method, sides, want_q=False)
    left = [F for F in (P, A) if F is not None]  # X = P A
    right = [F for F in (B, Q) if F is not None]  # Y = B Q
    if reduce_x:
        X = left[0] if len(left) == 1 else fold_matmul(*left)
        left = [_left_reduced(X, method, want_q=False)]
    if reduce_y:
        Y = right[0] if len(right) == 1 else fold_matmul(*right)
        right = [_right_reduced(Y, method, want_q=False)]
    return _chain_norm(left + right)


def frobenius_norm(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
                   outer: str = "auto", norm_method: str = "auto") -> Tensor:
    """Frobenius norm of ``L @ A @ B @ R``, shape (...): the norm of the core ``X Y``
    (:func:`core_factors`); arguments as :func:`svdvals`.

    With ``norm_method="auto"``, a core factor shared across the batch, ``Y`` of shape
    (..., m, q) with ``q > m`` whose leading dims broadcast against more matrices than it has (or
    ``X`` likewise, ``p > m``), as in ``(fm1 @ fm2).norm()`` for every pair of heads, is reduced
    through its own basis (cached): ``Y = R_Y^H Q_Y^H``, so ``|X Y|_F = |X R_Y^H|_F``. When the
    reduced ``p' x q'`` core costs no more to form than two Gram matrices of it
    (``p' q' <= m (p' + q')``), it is formed, in chunks of the batch of about
    :data:`_CHUNK_BYTES` (:func:`_chain_norm`), and its norm taken by sums of squares:
    accurate to ``O(eps |X| |Y|)`` as ``"qr"`` is, with no Gram error estimate to take. Per matrix
    ``O(p' m q')`` (for all pairs of GPT-2 small's heads, two 64 x 64 x 64 products per pair after
    the core's GEMM), plus one QR of the shared factor. Recorded to :mod:`lowrank_op.choices`
    (``"norm"``, ``"formed"``). Otherwise, and for ``"gram"`` or ``"qr"``,
    :func:`lowrank_op.kernels.frobenius_norm` (``norm_method``) of ``X`` and ``Y``.
    """
    sides = plan(L, A, B, R, method, outer)
    if norm_method == "auto":
        norm = _shared_core_norm(L, A, B, R, method, sides)
        if norm is not None:
            return norm
    return kernels.frobenius_norm(*core_factors(L, A, B, R, method, sides), method=norm_method)


def svd(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
        outer: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``(U, S, V)`` of ``L @ A @ B @ R``; ``V`` holds right singular vectors as columns.

    ``U = Q_L U_c`` and ``V = Q_R V_c`` from :func:`lowrank_op.kernels.svd` of the core, one
    ``(n, p) @ (p, k)`` product per matrix and side (the outputs' own size). When an outer factor
    needs a gradient its side is formed (a constant ``Q_L`` would lose part of ``dU``); arguments
    as :func:`svdvals`.
    """
    sides = vector_sides(L, A, B, R, method, outer)
    X, Y = core_factors(L, A, B, R, method, sides, want_q=True)
    U_c, S, V_c = kernels.svd(X, Y, method=method)
    U, V = lift_vectors(L, R, sides, U_c, V_c, method)
    return U, S, V


def vector_sides(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
                 outer: str = "auto") -> tuple[bool, bool]:
    """:func:`plan` for singular vectors: where an outer factor needs a gradient, every side is
    formed (``U = Q_L U_c`` with ``Q_L`` held constant would lose the part of ``dU`` outside
    ``range(Q_L)``)."""
    if _needs_grad(L) or _needs_grad(R):
        outer = "formed"
    return plan(L, A, B, R, method, outer)


def lift_vectors(L: Tensor | None, R: Tensor | None, sides: tuple[bool, bool], U_c: Tensor, V_c: Tensor,
                 method: str = "auto") -> tuple[Tensor, Tensor]:
    """``(Q_L U_c, Q_R V_c)``: singular vectors of the core of :func:`core_factors` (with these
    ``sides``) as the product's; a formed side's vectors are the product's already. Cost one
    ``(n, p) @ (p, k)`` product per matrix and side that uses its basis."""
    U = fold_matmul(basis(L, method, want_q=True).Q, U_c) if sides[0] else U_c
    V = fold_matmul(basis(R.mH, method, want_q=True).Q, V_c) if sides[1] else V_c
    return U, V


# --- Eigenvalues and traces of a square product ---------------------------------------------------
def _same_view(X: Tensor, Y: Tensor) -> bool:
    return _cache._root(X) is _cache._root(Y) and _cache._layout(X) == _cache._layout(Y)


def closing_product(R: Tensor, L: Tensor, method: str = "auto") -> Tensor:
    """``R @ L`` (``R`` (..., q, n), ``L`` (..., n, p)), the q x p matrix that closes the cycle
    ``B (R L) A``; from the shared cache.

    When ``R`` is ``L^H`` (the same memory read as a conjugate transpose) it is ``R_L^H R_L`` from
    ``L``'s cached factorisation (``O(p^3)``); otherwise ``O(n p q)`` once per pair. With
    gradients on either factor it is the plain product, per call.
    """
    if _needs_grad(R) or _needs_grad(L):
        return fold_matmul(*kernels.promote(R, L))
    if _same_view(R.mH, L) and _is_tall(L):
        b = basis(L, method)
        return b.R.mH @ b.R
    return _cache.shared.get_or_compute(("closing_product",), (R, L), lambda: fold_matmul(*kernels.promote(R, L)))


def _cycle(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str, outer: str) -> tuple[Tensor, Tensor]:
    """``(X, Y)`` with ``eig(Y X) = eig(B R L A)``, the eigenvalues of ``(B R) (L A)``: ``X = (R L) A``
    (``R A`` or ``L A`` when a side is absent), ``Y = B``. ``outer="auto"`` takes ``R L`` when it
    is cached or the batch's ``N m (p + q)`` columns reach its ``p q`` entries; else ``Y X`` is
    ``(B R)(L A)`` formed per matrix (``"formed"``)."""
    check_choice("outer", outer, OUTER_METHODS)
    A, B = kernels.promote(A, B)
    if L is None and R is None:
        return A, B
    if L is None or R is None:
        C = kernels.promote(L if R is None else R)[0]
        return fold_matmul(C, A), B
    p, q = L.shape[-1], R.shape[-2]
    if outer == "auto":
        batch = torch.broadcast_shapes(*(X.shape[:-2] for X in (L, A, B, R)))
        count = math.prod(batch) // max(math.prod(torch.broadcast_shapes(L.shape[:-2], R.shape[:-2])), 1)
        enough = count * A.shape[-1] * (p + q) >= p * q
        cached = not enough and (_cache.shared.peek(("closing_product",), (R, L)) is not None or (
            _same_view(R.mH, L) and _cached_basis(L, method)))
        use = cached or enough
        choices.record(
            "closing_product", "shared" if use else "formed",
            f"R L ({q} x {p}) {'is cached' if cached else f'serves {count} matrices'}"
            + ("" if cached else f": {count * A.shape[-1] * (p + q)} columns {'>=' if use else '<'} {p * q} entries") + ".",
        )
        outer = "shared" if use else "formed"
    if outer == "formed":
        return core_factors(L, A, B, R, method, sides=(False, False))  # (L A, B R)
    return fold_matmul(closing_product(R, L, method), A), B


def reverse_product_eigvals(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
                            outer: str = "auto") -> Tensor:
    """Eigenvalues of ``(B R)(L A)``, complex, shape (..., m), in LAPACK's order: TransformerLens's
    ``eigenvalues`` of the formed product. Cost per matrix ``O(m p q + m^2 q + m^3)`` once ``R L``
    is cached; see :func:`lowrank_op.kernels.reverse_product_eigvals`."""
    return kernels.reverse_product_eigvals(*_cycle(L, A, B, R, method, outer))


def eigvals(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
            outer: str = "auto") -> Tensor:
    """Eigenvalues of the square ``L @ A @ B @ R``, complex, shape (..., m), by descending modulus
    (:func:`lowrank_op.kernels.eigvals` of the cycle). When the product is smaller than the inner
    dim (``n < m``) its own ``n x n`` ``(L A)(B R)`` is decomposed and the other ``m - n`` are exact
    zeros, as :meth:`lowrank_op.FactoredMatrix.eigvals` gives them (forming costs ``O(n p m + m q n)``,
    no more than the cycle with ``n`` that small)."""
    n = (A if L is None else L).shape[-2]
    if n < A.shape[-1]:
        return kernels.eigvals(*core_factors(L, A, B, R, method, sides=(False, False)))  # (L A, B R)
    return kernels.eigvals(*_cycle(L, A, B, R, method, outer))


def trace(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None, method: str = "auto",
          outer: str = "auto") -> Tensor:
    """Trace of the square ``L @ A @ B @ R``, shape (...): ``tr((R L) A B)``, ``O(p q m)`` per matrix."""
    return kernels.trace(*_cycle(L, A, B, R, method, outer))


# --- Outer factors reduced once, for loops over many inner pairs ---------------------------------------
@dataclass(frozen=True)
class OuterReduction:
    """The outer factors of ``L @ A_i @ B_i @ R`` reduced once, for any number of inner pairs ``(A_i, B_i)``.

    Built by :func:`reduce_outer`, which takes each factorisation from the shared cache once; the
    methods here look nothing up and fingerprint nothing, so a loop over layers costs only the
    small products below. Everything is without gradients to ``L`` and ``R`` (the reductions are
    constants); gradients flow to ``A`` and ``B`` through the products.

    Attributes
    ----------
    left : Tensor, shape (..., k_L, p)
        ``R_L`` with ``L = Q_L R_L`` (:func:`basis`); ``L`` itself when ``L`` is not tall.
    right : Tensor, shape (..., q, k_R)
        ``R_R^H`` with ``R^H = Q_R R_R``; ``R`` itself when ``R^H`` is not tall.
    closing : Tensor or None, shape (..., q, p)
        ``R L`` (:func:`closing_product`); None when ``mirrored`` (or when not asked for).
    mirrored : bool
        ``R`` is ``L^H`` (the same memory read as a conjugate transpose: the QK circuit's
        ``W_E ... W_E^T``, or a tied ``W_U``): one factorisation serves both sides, and
        ``R L = R_L^H R_L = right @ left``, so the cycle is the core itself.
    """

    left: Tensor
    right: Tensor
    closing: Tensor | None
    mirrored: bool

    def core(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
        """``(X, Y) = (R_L A, B R_R^H)``, with ``L A B R = Q_L (X Y) Q_R^H``.

        Parameters
        ----------
        A : Tensor, shape (..., p, m)
        B : Tensor, shape (..., m, q)

        Returns
        -------
        X : Tensor, shape (..., k_L, m)
        Y : Tensor, shape (..., m, k_R)
            Promoted to the compute dtype. The singular values and Frobenius norm of ``X Y``
            (:func:`lowrank_op.kernels.svdvals`) are those of ``L A B R``; with ``p >= m`` and
            ``q >= m`` (``k_L = min(n, p)``, ``k_R = min(q, r)``) nothing of its rank is lost.
            Cost ``O(k_L p m + m q k_R)`` per matrix: nothing of size ``n`` or ``r``.
        """
        A, B = kernels.promote(A, B)
        return fold_matmul(self.left, A), fold_matmul(B, self.right)

    def cycle(self, A: Tensor, B: Tensor, core: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """``(X, Y)`` whose :func:`lowrank_op.kernels.eigvals` (``eig(Y X)``) are the non-zero
        eigenvalues of the square ``L A B R`` (``eig(B R L A)``).

        ``(R L A, B)``, an ``O(q p m)`` product per matrix; when ``mirrored``, the core
        ``(R_L A, B R_L^H)`` itself (``B R_L^H R_L A = B R L A``), passed as ``core`` if it is
        already at hand (then this costs nothing). Shapes (..., q, m) and (..., m, q), or the core's.
        """
        if self.mirrored:
            return self.core(A, B) if core is None else core
        if self.closing is None:
            raise ValueError("this OuterReduction was built with closing=False; pass closing=True to reduce_outer.")
        A, B = kernels.promote(A, B)
        return fold_matmul(self.closing, A), B


def reduce_outer(L: Tensor, R: Tensor, method: str = "auto", closing: bool = True) -> OuterReduction:
    """Reduce the outer factors ``L`` and ``R`` of a batch ``L @ A_i @ B_i @ R`` once (see :class:`OuterReduction`).

    Parameters
    ----------
    L : Tensor, shape (..., n, p)
    R : Tensor, shape (..., q, r)
    method : {"auto", "householder", "cholqr2"}
        QR method of the factorisations (:func:`basis`).
    closing : bool
        Also take ``R L`` (:func:`closing_product`; ``R`` (..., q, n) then) for eigenvalues; not
        needed (and not taken) when ``R`` is ``L^H``.

    Returns
    -------
    OuterReduction

    Notes
    -----
    One :func:`basis` lookup of ``L`` and one of ``R^H``, the same single factorisation when ``R``
    is ``L^H`` (the same memory read as a conjugate transpose); then one :func:`closing_product`
    lookup unless ``R`` is ``L^H``. On a miss: ``O(n p^2)`` for ``L``, ``O(r q^2)`` for ``R^H``
    and ``O(n p q)`` for ``R L``, with the factorisation's workspace (one or two buffers the
    size of the factor). On a hit: one fingerprint of each tensor looked up. No gradients to
    ``L`` and ``R``.
    """
    for name, X in (("L", L), ("R", R)):
        if not isinstance(X, Tensor):
            raise TypeError(f"`{name}` must be a torch.Tensor, got {type(X).__name__}.")
        if X.dim() < 2:
            raise ValueError(f"`{name}` must have at least 2 dims, got shape {tuple(X.shape)}.")
    mirrored = _same_view(R.mH, L)
    if closing and not mirrored and R.shape[-1] != L.shape[-2]:
        raise ValueError(f"`R` of shape {tuple(R.shape)} must have as many columns as `L` of shape "
                         f"{tuple(L.shape)} has rows for the closing product R L (square L A B R); "
                         "pass closing=False for singular values only.")
    left = basis(L, method).R
    right = left.mH if mirrored else basis(R.mH, method).R.mH
    closed = None
    if closing and not mirrored:
        with torch.no_grad():  # the cached product, also when L or R requires a gradient
            closed = closing_product(R, L, method)
    return OuterReduction(left, right, closed, mirrored)
