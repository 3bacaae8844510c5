""":func:`sharded_outer_reduction`: the shared outer factors of the circuits, sharded across ranks.

:func:`lowrank_op.shared_bases.reduce_outer` for a row-sharded ``L`` (a vocabulary-parallel
``W_E``) and a column-sharded ``R`` (``W_U``), by TSQR (:mod:`lowrank_op.distributed.qr`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_op import kernels
from lowrank_op.distributed.comm import (
    LAYOUTS,
    _WIDTH,
    _agree,
    _broadcast,
    _check_across,
    _comm,
    _fields,
    _gather,
    _resolve_group,
    _shown,
    _tensor_error,
    _unwrap,
)
from lowrank_op.distributed.qr import _local_side, _second_level, _sum_pieces, _tsqr_side
from lowrank_op.errors import DtypeMismatchError, ShapeMismatchError
from lowrank_op.shared_bases import OuterReduction, _same_view, reduce_outer

# --- Shared outer factors ------------------------------------------------------------------------
@torch.no_grad()
def sharded_outer_reduction(L_local: Tensor, R_local: Tensor, group: object = None,
                            closing: bool = True) -> OuterReduction:
    """:func:`lowrank_op.shared_bases.reduce_outer` for a row-sharded ``L`` and a column-sharded ``R``.

    For the circuits ``L @ A_i @ B_i @ R`` with a vocabulary-parallel embedding ``L = W_E`` and
    unembedding ``R = W_U``: the reduction is replicated, so the per-head analysis runs unchanged
    on every rank (:meth:`OuterReduction.core`, :meth:`OuterReduction.cycle`).

    Parameters
    ----------
    L_local : Tensor or DTensor, shape (..., n_r, p)
        This rank's rows of ``L`` (``Replicate()`` DTensors: all of it).
    R_local : Tensor or DTensor, shape (..., q, r_r)
        This rank's columns of ``R``; ``L_local.mH`` itself (the same memory) on every rank for a
        mirrored pair such as the QK circuit's ``W_E ... W_E^T``.
    group : ProcessGroup, optional
    closing : bool
        Also form ``R L = sum_r R_r L_r`` (q x p) for eigenvalues; needs ``R``'s column
        partition to equal ``L``'s row partition (ValueError on every rank otherwise, naming the
        local sizes). Not formed when mirrored.

    Returns
    -------
    OuterReduction
        ``left = R_L`` (``L = Q_L R_L`` by TSQR), ``right = R_R^H`` (``R^H = Q_R R_R``),
        ``closing = R L`` or None, ``mirrored``; every tensor the same bits on every rank.
        Unlike :func:`reduce_outer`, ``left`` is ``R_L`` (``min(n, p) x p``) also when ``L`` is
        not tall (``n <= p``): ``L = Q_L R_L`` with ``Q_L`` square orthogonal then, so the
        core's singular values and norm are the same.

    Notes
    -----
    One gather of the TSQR pieces of ``L`` and ``R^H`` and of the local ``R_r L_r``, rank 0
    finishes both QRs and sums the closing pieces in rank order, one broadcast. Bytes sent per
    rank and batch member: ``(p^2 + q^2 + q p) e``; rank 0 also broadcasts
    ``(p_L p + q p_R + q p) e`` (``p_L = min(n, p)``, ``p_R = min(r, q)``), plus the shape check.
    Factors that are both replicated go to :func:`reduce_outer` locally.
    """
    L, layout_l, group_l = _unwrap("L_local", L_local, "rows", None)
    R, layout_r, group_r = _unwrap("R_local", R_local, "cols", None)
    group = _resolve_group(group, [group_l, group_r])
    if "batch" in (layout_l, layout_r):
        raise ValueError("outer factors shared by every head are not sharded on a leading dim; pass them sharded "
                         "on their rows (L) and columns (R), or replicated.")
    error = _tensor_error("L_local", L) or _tensor_error("R_local", R)
    if error is None and L.dtype != R.dtype:
        error = DtypeMismatchError, f"`L_local` ({L.dtype}) and `R_local` ({R.dtype}) must have one dtype."
    if "shard" not in (layout_l, layout_r):
        if error is not None:
            raise error[0](error[1])
        return reduce_outer(L, R, closing=closing)
    comm = _comm(group, L)
    mirrored = error is None and _same_view(R.mH, L)
    table = _agree(comm, [int(mirrored), LAYOUTS.index(layout_l), LAYOUTS.index(layout_r), *_fields(L), *_fields(R)],
                   error, "sharded_outer_reduction",
                   lambda f: f"L_local: {_shown(f[3:])}; R_local: {_shown(f[3 + _WIDTH:])}")
    mirrored = all(t[0] for t in table)
    rows = _check_across("sharded_outer_reduction", "L_local", table, 3, layout_l, "rows")
    cols = _check_across("sharded_outer_reduction", "R_local", table, 3 + _WIDTH, layout_r, "cols")
    closing = closing and not mirrored
    L_piece, R_piece = L, R
    if closing:
        if layout_l == layout_r == "shard" and rows != cols:
            raise ValueError(
                "sharded_outer_reduction: the closing product R L needs R's column partition to equal L's row "
                f"partition; local sizes per rank: L rows {rows}, R columns {cols}. Split them alike, or pass "
                "closing=False for singular values only."
            )
        if layout_l != layout_r:
            if sum(rows if layout_l == "shard" else rows[:1]) != sum(cols if layout_r == "shard" else cols[:1]):
                raise ShapeMismatchError(f"`R` must have as many columns as `L` has rows for R L; L rows {rows}, "
                                         f"R columns {cols}. Pass closing=False for singular values only.")
            if layout_l == "shard":
                start = sum(rows[:comm.rank])
                R_piece = R[..., start:start + rows[comm.rank]]
            else:
                start = sum(cols[:comm.rank])
                L_piece = L[..., start:start + cols[comm.rank], :]
    L, R, L_piece, R_piece = kernels.promote(L, R, L_piece, R_piece)
    sides = [_tsqr_side(L, "L", rows, False, comm.rank) if layout_l == "shard"
             else _local_side(L, "L", False, comm.rank)]
    if not mirrored:
        sides.append(_tsqr_side(R.mH, "R^H", cols, False, comm.rank) if layout_r == "shard"
                     else _local_side(R.mH, "R^H", False, comm.rank))
    pending = [s for s in sides if s.R is None]
    named = [(f"tsqr:{s.name}", s.piece) for s in pending]
    if closing:
        named.append(("closing", R_piece @ L_piece))
    gathered = _gather(named, comm)
    templates = [(f"tsqr:{s.name}", (*(L if s.name == "L" else R).shape[:-2], s.p, s.m), L.dtype)
                 for s in pending]
    values = None
    if comm.is_root:
        values = [_second_level(s, [g[i] for g in gathered], False)[1] for i, s in enumerate(pending)]
        if closing:
            values.append(_sum_pieces(gathered, len(pending)))
    if closing:
        batch = torch.broadcast_shapes(L.shape[:-2], R.shape[:-2])
        templates.append(("closing", (*batch, R.shape[-2], L.shape[-1]), L.dtype))
    out = iter(_broadcast(templates, values, comm, L.device))
    for s in pending:
        s.R = next(out)
    closed = next(out) if closing else None
    left = sides[0].R
    right = left.mH if mirrored else sides[1].R.mH
    return OuterReduction(left, right, closed, mirrored)
