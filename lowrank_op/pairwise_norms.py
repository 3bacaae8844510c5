"""Frobenius norms of every pairwise product ``left_i @ right_j`` of two batches of factored matrices.

TransformerLens's composition scores need ``|L_i R_j|_F`` for every left head ``i`` against every
right head ``j`` (20,736 pairs at GPT-2 small's shapes). With ``L_i = A_i B_i`` (``A_i``: ``n x m1``,
``B_i``: ``m1 x k``) and ``R_j = C_j D_j`` (``C_j``: ``k x m2``, ``D_j``: ``m2 x r``), this module
computes them by the Gram route, with a certified bound on its rounding and an exact fallback.

The algorithm
-------------
1. **Row reduction, once per matrix** (:func:`row_reduction`): ``P_i`` (``p x k``, ``p = min(n,
   m1)``) with ``P_i^H P_i = L_i^H L_i``, so ``|L_i Z|_F = |P_i Z|_F`` for every ``Z``: ``P = R B``
   with ``A = Q R`` (the shared, cached basis of :mod:`lowrank_op.shared_bases`), or ``P = A B``
   when ``A`` is wide. The right side is reduced the same way from ``R_j^H``: ``Qt_j`` (``q x k``)
   with ``|Z R_j|_F = |Qt_j Z^H|_F``. ``P`` and ``Qt`` are then held in float64 (complex128), in
   which steps 2 and 3 run.
2. **Pair sums through Gram matrices** (:func:`gram_pair_sq_norms`): ``|P_i Qt_j^H|_F^2 =
   <X_i, Y_j>`` with the ``k x k`` Gram matrices ``X_i = P_i^H P_i`` and ``Y_j = Qt_j^H Qt_j``
   (their real inner product). Both are Hermitian, so only their blocks on and above the diagonal
   are formed (``block x block`` at a time, for every matrix at once), and each block pair adds
   ``(N_l x block^2) @ (block^2 x N_r)`` to all pairs' sums at once, off-diagonal blocks twice.
3. **Certificate and fallback** (:func:`pairwise_product_norms`): the rounding of step 2 is
   bounded per pair (see :func:`gram_pair_sq_norms`); a pair whose bound exceeds ``tol`` times its
   sum is recomputed directly as ``|P_i Qt_j^H|_F`` (a ``p x k x q`` product). Near-zero products,
   where the Gram sum cancels, and non-finite inputs always take the fallback.

Cost, with ``c = (1 + block / k) / 2``: ``c k^2 (N_l p + N_r q)`` multiply-adds to form the Gram
blocks and ``c k^2 N_l N_r`` for the pair sums, all in float64, against ``N_l N_r m1 k m2`` for
forming every pair's ``m1 x m2`` core. At GPT-2 small's shapes (``N = 144``, ``k = 768``,
``m = p = 64``) that is ``1.3e10`` float64 against ``6.5e10`` float32 multiply-adds. Memory: ``P``
and ``Qt`` (``(N_l p + N_r q) k`` float64 numbers) and one block of Gram matrices per side
(``(N_l + N_r) block^2``); nothing of size ``N_l N_r k`` is formed.

Accuracy
--------
Steps 1 and 3 are backward stable: step 1 (in the factors' compute precision, as every
decomposition here) is exact for factors perturbed by a few ``eps`` relative, the accuracy of
``"product"`` and of TransformerLens, and step 3 runs in float64. Step 2 is not
(``<X, Y>`` cancels when ``L_i R_j`` is small against ``|L_i| |R_j|``), which is what the bound
covers: a certified pair's squared norm is within ``tol`` relative of the sum of the rounded
reductions, so its norm is within ``tol / 2``. With ``tol`` the float32 epsilon (what
:func:`lowrank_op.composition_scores` passes for float32 results) almost every pair of real heads
is certified: at GPT-2 small's shapes the bound is below ``2e-11`` of the sum for all pairs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowrank_op import kernels, settings, shared_bases
from lowrank_op._products import _amax

#: Bytes of gathered factors one chunk of the direct fallback may hold.
DIRECT_CHUNK_BYTES = 32 * 2**20


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64, or complex128 for complex ``dtype``: the precision every step here runs in."""
    return torch.complex128 if dtype.is_complex else torch.float64


#: ``max |R| max |B|`` for which a 32-bit product ``R @ B`` neither underflows nor overflows.
_IN_RANGE = (2.0**-60, 2.0**60)


def row_reduction(A: Tensor, B: Tensor) -> Tensor:
    """``P`` with ``P^H P = (A B)^H (A B)``, never forming ``A @ B`` unless ``A`` is wide.

    Parameters
    ----------
    A : Tensor, shape (..., n, m)
    B : Tensor, shape (..., m, k)

    Returns
    -------
    P : Tensor, shape (..., p, k), ``p = min(n, m)``, float64 or complex128
        ``R @ B`` with ``A = Q R`` when ``n > m``; ``A @ B`` when ``n <= m``. So
        ``|A B Z|_F = |P Z|_F`` for every ``Z``.

    Notes
    -----
    Cost ``O(n m^2 + m^2 k)``. ``R`` is the shared basis of ``A``
    (:func:`lowrank_op.shared_bases.basis`: CholeskyQR2 with its Householder fallback, cached on
    ``A`` across calls) in the factors' compute precision (float32 for 16-bit factors), and so is
    the product, unless ``max |R| max |B|`` is outside ``[2**-60, 2**60]`` (where a float32 product
    could underflow or overflow): then the product runs in float64. Both steps are backward
    stable. Under autograd (a factor requires grad) ``R`` is ``Q^H A`` with ``Q`` held constant,
    which is exact to first order and finite for rank-deficient ``A``.
    """
    A, B = kernels.promote(A, B)
    work = work_dtype(torch.promote_types(A.dtype, B.dtype))
    if A.shape[-2] <= A.shape[-1]:
        R = A
    elif torch.is_grad_enabled() and (A.requires_grad or B.requires_grad):
        R = shared_bases.basis(A, want_q=True).Q.mH @ A
    else:
        R = shared_bases.basis(A).R
    if R.dtype != work:
        scale = _amax(R) * _amax(B)
        if not _IN_RANGE[0] <= scale <= _IN_RANGE[1]:  # also NaN: the product then gives NaN in float64
            return R.to(work) @ B.to(work)
    return (R @ B).to(work)


def _gamma(n: int, unit: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of an ``n``-term sum."""
    return n * unit / (1 - n * unit)


def _flat_real(X: Tensor) -> Tensor:
    """``X`` of shape (N, a, b) as (N, a b) real numbers (real and imaginary parts side by side), so
    that ``flat(X) @ flat(Y)^T`` is ``Re <X, Y>``."""
    if X.is_complex():
        X = torch.view_as_real(X)
    return X.reshape(X.shape[0], math.prod(X.shape[1:]))


def gram_pair_sq_norms(P: Tensor, Qt: Tensor, block: int | None = None) -> tuple[Tensor, Tensor]:
    """``|P_i Qt_j^H|_F^2`` for every pair through the Gram matrices, with a bound on its rounding.

    Parameters
    ----------
    P : Tensor, shape (N_l, p, k), float64 or complex128
    Qt : Tensor, shape (N_r, q, k), the same dtype
    block : int, optional
        Edge of the Gram blocks; default ``settings.pairwise_gram_block``.

    Returns
    -------
    sq_norms : Tensor, shape (N_l, N_r), real
        ``sum over blocks of w <P_i[:, I]^H P_i[:, J], Qt_j[:, I]^H Qt_j[:, J]>`` for the blocks
        ``I <= J`` of the ``k`` columns, ``w = 2`` off the diagonal.
    bound : Tensor, shape (N_l, N_r), real, detached
        A bound on ``|sq_norms - |P_i Qt_j^H|_F^2|`` from the rounding of this function:
        ``1.1 (g_p |P_i|^2 |Y_j| + g_q |X_i| |Qt_j|^2 + g_K |X_i| |Y_j|)`` with Frobenius norms,
        ``|X_i| = |P_i P_i^H|_F``, ``g_n`` Higham's ``gamma_n`` (``sqrt(2) gamma_{n+2}`` for
        complex) and ``K`` the terms a pair's sum adds (``2 block^2`` plus the number of blocks).
        It follows from ``|fl(x^H y) - x^H y| <= g_n |x|^H |y|`` for each Gram entry and each
        pair sum and from Cauchy-Schwarz, to first order in the unit roundoff (1.1 covers the rest).

    Notes
    -----
    Cost ``c k^2 (N_l p + N_r q + N_l N_r)`` multiply-adds, ``c = (1 + block / k) / 2``; memory
    one block of Gram matrices per side, ``(N_l + N_r) block^2`` numbers.
    """
    block = settings.pairwise_gram_block.value() if block is None else block
    N_l, p, k = P.shape
    N_r, q, _ = Qt.shape
    real = kernels._real_dtype(P.dtype)
    sq_norms = torch.zeros(N_l, N_r, dtype=real, device=P.device)
    starts = range(0, k, block)
    # Without autograd the blocks are written into two buffers allocated once: a fresh allocation
    # of this size per block is page-faulted in again each time (a sixth of the loop's time).
    differentiable = torch.is_grad_enabled() and (P.requires_grad or Qt.requires_grad)
    edge = min(block, k)
    X_buf, Y_buf = (None, None) if differentiable else (P.new_empty(N_l * edge * edge), Qt.new_empty(N_r * edge * edge))
    for a in starts:
        I = slice(a, min(a + block, k))
        for b in starts[a // block:]:
            J = slice(b, min(b + block, k))
            weight = 1.0 if a == b else 2.0
            if differentiable:
                X = _flat_real(P[:, :, I].mH @ P[:, :, J])
                Y = _flat_real(Qt[:, :, I].mH @ Qt[:, :, J])
                sq_norms = sq_norms.addmm(X, Y.mT, alpha=weight)
                continue
            size = (I.stop - I.start, J.stop - J.start)
            X = torch.matmul(P[:, :, I].mH, P[:, :, J], out=X_buf[: N_l * size[0] * size[1]].view(N_l, *size))
            Y = torch.matmul(Qt[:, :, I].mH, Qt[:, :, J], out=Y_buf[: N_r * size[0] * size[1]].view(N_r, *size))
            sq_norms.addmm_(_flat_real(X), _flat_real(Y).mT, alpha=weight)
    with torch.no_grad():
        unit = torch.finfo(real).eps / 2
        n_blocks = len(starts) * (len(starts) + 1) // 2
        if P.is_complex():
            g_p, g_q = math.sqrt(2) * _gamma(p + 2, unit), math.sqrt(2) * _gamma(q + 2, unit)
            g_K = _gamma(2 * block * block + n_blocks, unit)
        else:
            g_p, g_q, g_K = _gamma(p, unit), _gamma(q, unit), _gamma(block * block + n_blocks, unit)
        P_sq, Qt_sq = (torch.linalg.matrix_norm(Z.detach()) ** 2 for Z in (P, Qt))
        X_norm, Y_norm = (torch.linalg.matrix_norm(Z.detach() @ Z.detach().mH) for Z in (P, Qt))
        bound = 1.1 * (
            g_p * P_sq[:, None] * Y_norm[None, :]
            + g_q * X_norm[:, None] * Qt_sq[None, :]
            + g_K * X_norm[:, None] * Y_norm[None, :]
        )
    return sq_norms, bound


def direct_pair_norms(P: Tensor, Qt: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``|P_i Qt_j^H|_F`` for the listed pairs ``(rows[t], cols[t])``, shape (T,), by forming each
    ``p x q`` product; chunked so that the gathered factors stay within :data:`DIRECT_CHUNK_BYTES`.
    Cost ``T p k q``."""
    per_pair = max(1, (P.shape[1] + Qt.shape[1]) * P.shape[2] * P.element_size())
    chunk = max(1, DIRECT_CHUNK_BYTES // per_pair)
    parts = [
        torch.linalg.matrix_norm(P[rows[s:s + chunk]] @ Qt[cols[s:s + chunk]].mH)
        for s in range(0, rows.numel(), chunk)
    ]
    if not parts:
        return P.new_zeros(0, dtype=kernels._real_dtype(P.dtype))
    return torch.cat(parts)


def pairwise_product_norms(P: Tensor, Qt: Tensor, tol: float) -> tuple[Tensor, int]:
    """``|P_i Qt_j^H|_F`` for every pair: the Gram route, certified per pair to ``tol``.

    Parameters
    ----------
    P : Tensor, shape (N_l, p, k), float64 or complex128 (from :func:`row_reduction`)
    Qt : Tensor, shape (N_r, q, k), the same dtype
    tol : float
        A pair's Gram sum is kept when :func:`gram_pair_sq_norms`'s bound is at most ``tol`` times
        the sum (its norm is then within ``tol / 2`` relative); other pairs are recomputed by
        :func:`direct_pair_norms`.

    Returns
    -------
    norms : Tensor, shape (N_l, N_r), real
    n_direct : int
        How many pairs took the direct fallback.
    """
    sq_norms, bound = gram_pair_sq_norms(P, Qt)
    detached = sq_norms.detach()
    certified = (bound <= tol * detached) & (detached > 0)  # False where the sum is NaN, zero or negative
    norms = torch.where(certified, torch.where(certified, sq_norms, 1).sqrt(), 0)
    rows, cols = torch.nonzero(~certified, as_tuple=True)
    if rows.numel():
        norms = norms.index_put((rows, cols), direct_pair_norms(P, Qt, rows, cols))
    return norms, int(rows.numel())
