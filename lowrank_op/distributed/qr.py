"""QR of a factor whose rows are split across a process group, for :mod:`lowrank_op.distributed`.

Householder QR of local and replicated factors; TSQR of a row-sharded one (each rank QRs its own
rows, rank 0 runs the second level on the stacked pieces and broadcasts); CholeskyQR2 across ranks
with its TSQR fallback (decided by rank 0); and :func:`tsqr`, the public entry point.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_op import choices, kernels, settings
from lowrank_op._checks import check_choice
from lowrank_op.distributed.comm import (
    _Comm,
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

QR_METHODS = ("auto", "tsqr", "cholqr2")


# --- QR pieces -----------------------------------------------------------------------------------
def _qr(X: Tensor, want_q: bool) -> tuple[Tensor | None, Tensor]:
    """Householder QR (reduced) with LAPACK never seeing a non-finite batch member (NaN ``Q``, ``R`` there)."""
    X, bad = kernels._lapack_safe(X)
    if want_q:
        Q, R = torch.linalg.qr(X, mode="reduced")
    else:
        Q, R = None, torch.linalg.qr(X, mode="r")[1]
    if bool(bad.any()):
        R = kernels._nan_where(bad, R, 2)
        Q = None if Q is None else kernels._nan_where(bad, Q, 2)
    return Q, R


@dataclass
class _Side:
    """One factor ``X`` (``A``, or ``B^H``) on its way to ``X = Q R`` with ``R`` replicated.

    ``Q`` is this rank's orthonormal factor: of its own rows (TSQR: the first level, to be
    multiplied by its block of the second-level ``Q``; ``blocks`` True) or final (a local factor,
    or CholeskyQR2); None means the identity. ``R`` is None while the TSQR is pending, when
    ``piece`` (the local ``R`` padded to ``m x m``) waits to be gathered.
    """

    name: str
    rows: list[int]
    m: int
    rank: int
    Q: Tensor | None
    R: Tensor | None
    piece: Tensor | None = None
    blocks: bool = False
    Q2: Tensor | None = None  # rank 0 only: the second-level Q, between the gather and the broadcast

    @property
    def K(self) -> int:
        """Rows of the stacked second-level matrix (the local rows, ``min(n_r, m)`` per rank)."""
        return sum(min(n, self.m) for n in self.rows)

    @property
    def p(self) -> int:
        return min(sum(self.rows), self.m)

    def lift(self, Y: Tensor) -> Tensor:
        """This rank's rows of ``Q Z``, from ``Y = Q_2 Z`` (``K`` rows; TSQR) or ``Y = Z`` (``p`` rows)."""
        if self.blocks:
            start = sum(min(n, self.m) for n in self.rows[:self.rank])
            Y = Y[..., start:start + min(self.rows[self.rank], self.m), :]
        return Y if self.Q is None else self.Q @ Y


def _local_side(X: Tensor, name: str, want_q: bool, rank: int) -> _Side:
    """A factor every rank holds whole: Householder where it is tall, else its own ``R`` (``Q = I``)."""
    n, m = X.shape[-2:]
    Q, R = _qr(X, want_q) if n > m else (None, X)
    return _Side(name, [n], m, rank, Q, R)


def _tsqr_side(X: Tensor, name: str, rows: list[int], want_q: bool, rank: int) -> _Side:
    """TSQR's first level: QR of this rank's rows when it has more than ``m`` of them, else the rows
    themselves (``Q_r = I``); the piece is padded with zero rows to ``m x m``, and rank 0 strips the
    padding again (it knows every rank's row count), so the stacked matrix holds only real rows
    and the global ``Q`` is orthonormal exactly, also for rank-deficient ``X``."""
    n, m = X.shape[-2:]
    if n > m:
        Q, piece = _qr(X, want_q)
    else:
        Q, piece = None, torch.cat([X, X.new_zeros((*X.shape[:-2], m - n, m))], -2)
    return _Side(name, rows, m, rank, Q, None, piece, blocks=True)


def _second_level(side: _Side, pieces: Sequence[Tensor], want_q: bool) -> tuple[Tensor | None, Tensor]:
    """On rank 0: ``(Q_2, R)`` of the stacked pieces (``K x m``; ``Q_2`` ``K x p``, ``R`` ``p x m``)."""
    stacked = torch.cat([P[..., :min(n, side.m), :] for P, n in zip(pieces, side.rows)], -2)
    return _qr(stacked, want_q)


def _sum_pieces(gathered: list[list[Tensor]], i: int) -> Tensor:
    """On rank 0: the sum over ranks of part ``i``, always in rank order (deterministic)."""
    total = gathered[0][i]
    for parts in gathered[1:]:
        total = total + parts[i]
    return total


def _finish(sides: Sequence[_Side], gathered: list[list[Tensor]] | None, want_q: bool, comm: _Comm,
            batch_of: Callable[[_Side], tuple[int, ...]], device: torch.device) -> None:
    """Complete pending TSQRs: rank 0 factorises the stacked pieces and broadcasts ``Q_2`` and ``R``;
    every rank then has ``R`` (identical) and its ``Q`` (``Q_r`` times its block of ``Q_2``)."""
    if not sides:
        return
    templates, values = [], []
    for i, side in enumerate(sides):
        name, batch, dtype = f"tsqr:{side.name}", batch_of(side), side.piece.dtype
        if want_q:
            templates.append((name, (*batch, side.K, side.p), dtype))
        templates.append((name, (*batch, side.p, side.m), dtype))
        if comm.is_root:
            Q2, R = _second_level(side, [g[i] for g in gathered], want_q)
            values += [Q2, R] if want_q else [R]
    out = iter(_broadcast(templates, values if comm.is_root else None, comm, device))
    for side in sides:
        Q2 = next(out) if want_q else None
        side.R = next(out)
        if want_q:
            side.Q, side.blocks = side.lift(Q2), False
        side.piece = None


# --- CholeskyQR2 across ranks --------------------------------------------------------------------
def _cholqr2_side(X: Tensor, name: str, rows: list[int], want_q: bool, comm: _Comm) -> tuple[_Side | None, str]:
    """CholeskyQR2 of a row-sharded ``X``: ``(side, "")`` with ``R`` and the final local ``Q``, or
    ``(None, why)`` when it failed (the same verdict on every rank: rank 0's, broadcast)."""
    m, total_rows = X.shape[-1], sum(rows)
    if total_rows < m:
        return None, f"it has {total_rows} rows in all, fewer than its {m} columns"
    batch, real = tuple(X.shape[:-2]), kernels._real_dtype(X.dtype)
    part, factors, W = f"cholqr2:{name}", [], X
    max_defect = settings.cholqr2_max_defect.value()
    for attempt in (1, 2):
        gathered = _gather([(part, W.mH @ W)], comm)
        values = None
        if comm.is_root:
            G = _sum_pieces(gathered, 0)
            eye = kernels._eye_like(G, m)
            defect = torch.linalg.matrix_norm(G - eye).nan_to_num(float("inf")) if attempt == 2 else None
            small = torch.ones(batch, dtype=torch.bool, device=X.device) if defect is None else defect <= max_defect
            R_i, ok = kernels._cholesky_upper_flagged(torch.where(kernels._lift(small, 2), G, eye))
            status = 0.0 if bool((ok & small).all()) else (2.0 if not bool(small.all()) else 1.0)
            worst = float(defect.max()) if defect is not None and defect.numel() else 0.0
            values = [R_i, torch.tensor([status, worst], dtype=real, device=X.device)]
        R_i, flags = _broadcast([(part, (*batch, m, m), X.dtype), (part, (2,), real)], values, comm, X.device)
        status, worst = float(flags[0]), float(flags[1])
        if status == 1.0:
            which = "first" if attempt == 1 else "second"
            return None, (f"the Cholesky factorisation of its {which} Gram matrix failed (rank-deficient, condition "
                          "number above about eps**-0.5, non-finite entries, or a Gram matrix out of range)")
        if status == 2.0:
            return None, f"the first pass's orthogonality defect |Q^H Q - I|_F reached {worst:.3g} > {max_defect:g}"
        factors.append(R_i)
        W = torch.linalg.solve_triangular(R_i, W, upper=True, left=False)  # W R_i^{-1}
    return _Side(name, rows, m, comm.rank, W if want_q else None, factors[1] @ factors[0]), ""


def _resolve_method(method: str, name: str, shape: tuple[int, ...]) -> str:
    check_choice("method", method, QR_METHODS)
    if method == "auto":
        choices.record(
            "distributed_qr", "tsqr",
            f"method='auto' takes TSQR for {name} of global shape {shape}: unconditionally stable, with two "
            "collectives of m x m blocks where CholeskyQR2 needs four of the same size.",
        )
        return "tsqr"
    return method


def _sharded_side(X: Tensor, name: str, rows: list[int], method: str, want_q: bool, comm: _Comm) -> _Side:
    """A row-sharded factor: finished by CholeskyQR2 (``method="cholqr2"``, when it succeeds) or a
    pending TSQR side (its pieces go into the caller's gather)."""
    shape = (*X.shape[:-2], sum(rows), X.shape[-1])
    if _resolve_method(method, name, shape) == "cholqr2":
        side, why = _cholqr2_side(X, name, rows, want_q, comm)
        if side is not None:
            return side
        choices.record("distributed_qr", "tsqr", f"CholeskyQR2 on {name} of global shape {shape} fell back: {why}.")
    return _tsqr_side(X, name, rows, want_q, comm.rank)


@torch.no_grad()
def tsqr(X_local: Tensor, group: object = None, want_q: bool = True,
         method: str = "auto") -> tuple[Tensor | None, Tensor]:
    """Reduced QR ``X = Q R`` of a tall ``X`` whose rows are split across a process group.

    Parameters
    ----------
    X_local : Tensor or DTensor, shape (..., n_r, m)
        This rank's rows (any number, 0 included); leading dims and ``m`` the same on every rank.
        A DTensor sharded on its rows is factorised by TSQR; one that is replicated or sharded
        on a leading (batch) dim holds whole matrices on each rank and is factorised locally
        (Householder), with no communication. 16-bit inputs are computed in float32.
    group : ProcessGroup, optional
        The group the rows are split over; default the world (or the DTensor's mesh).
    want_q : bool
        Form this rank's rows of ``Q`` (else None is returned for it).
    method : {"auto", "tsqr", "cholqr2"}
        ``"tsqr"``: below. ``"cholqr2"``: CholeskyQR2, ``G = sum_r X_r^H X_r`` gathered to rank
        0, ``R_1 = chol(G)`` broadcast, ``W_r = X_r R_1^{-1}``, once more on ``W``; BLAS-3 only.
        It fails on rank-deficient or ill-conditioned ``X`` (condition number above about
        ``eps**-0.5``), on NaN, and where the Gram matrix leaves the dtype's range; then it falls
        back to TSQR by itself (rank 0 decides, every rank follows) and records why in
        :mod:`lowrank_op.choices`. ``"auto"``: TSQR always (recorded), which is unconditionally
        stable and needs half as many collectives of the same ``m x m`` size.

    Returns
    -------
    Q_local : Tensor, shape (..., n_r, p), or None
        This rank's rows of ``Q`` (orthonormal columns globally), ``p = min(N, m)`` for the
        ``N = sum_r n_r`` global rows. None when ``want_q`` is false.
    R : Tensor, shape (..., p, m)
        Upper triangular (trapezoidal when ``N < m``), the same bits on every rank (computed on
        rank 0 and broadcast).

    Notes
    -----
    TSQR: each rank QRs its rows (Householder, when it has more than ``m``; a rank with ``m`` or
    fewer rows, 0 included, sends its rows as they are), pads the ``min(n_r, m) x m`` result with
    zero rows to ``m x m``, and the pieces are gathered to rank 0. Rank 0 drops the padding,
    factorises the stacked ``K x m`` matrix (``K = sum_r min(n_r, m) <= P m``) as ``Q_2 R`` and
    broadcasts ``Q_2`` and ``R``; each rank's ``Q`` is its ``Q_r`` times its block of rows of
    ``Q_2``. Dropping the padding matters: padded zero rows would let the second-level QR of a
    rank-deficient matrix put basis vectors where no rows are, and ``Q`` would not be orthonormal.
    Cost: ``O(n_r m^2)`` per rank, ``O(P m^3)`` on rank 0. Bytes sent per rank and batch member:
    88 (the shape check), ``m^2 e`` (the gather; ``e`` bytes per element); rank 0 also
    broadcasts ``(K p + p m) e`` (``p m e`` without ``Q``): nothing depends on ``n_r``.
    CholeskyQR2 sends ``m^2 e`` twice per rank, and rank 0 ``(m^2 + 2) e`` twice. A batch member
    holding NaN or infinity on any rank gives NaN ``R`` (and ``Q``) on every rank. No gradients.

    Examples
    --------
    >>> Q_local, R = tsqr(X_local)  # doctest: +SKIP
    >>> # sum over ranks of Q_local^H Q_local is the identity; Q_local @ R == X_local
    """
    check_choice("method", method, QR_METHODS)
    X, layout, mesh_group = _unwrap("X_local", X_local, "rows", None)
    group = _resolve_group(group, [mesh_group])
    error = _tensor_error("X_local", X)
    if layout != "shard":
        if error is not None:
            raise error[0](error[1])
        choices.record("distributed_qr", "local", f"X_local is {layout!r}: every rank factorises its own "
                                                  "matrices (Householder), with no communication.")
        return _qr(kernels.promote(X)[0], want_q)
    comm = _comm(group, X)
    table = _agree(comm, _fields(X), error, "tsqr", lambda f: f"X_local: {_shown(f)}")
    rows = _check_across("tsqr", "X_local", table, 0, "shard", "rows")
    X = kernels.promote(X)[0]
    side = _sharded_side(X, "X", rows, method, want_q, comm)
    if side.R is None:
        gathered = _gather([("tsqr:X", side.piece)], comm)
        _finish([side], gathered, want_q, comm, lambda s: tuple(X.shape[:-2]), X.device)
    return side.Q if want_q else None, side.R
