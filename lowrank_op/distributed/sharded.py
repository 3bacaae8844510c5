""":class:`ShardedFactoredMatrix`: ``M = A @ B`` with ``A`` split by rows and ``B`` by columns.

Decompositions orthogonalise each sharded factor by :mod:`lowrank_op.distributed.qr` and decompose
the small core on rank 0 (or locally, next to a ``"batch"`` factor); square products
(eigenvalues, trace) and products with sharded operands (matmul, rmatmul).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_op import choices, kernels
from lowrank_op._checks import check_choice
from lowrank_op.distributed.comm import (
    LAYOUTS,
    MAX_DIMS,
    _WIDTH,
    Error,
    _agree,
    _all_reduce,
    _broadcast,
    _check_across,
    _comm,
    _fields,
    _gather,
    _per_rank,
    _resolve_group,
    _shape_of,
    _shown,
    _tensor_error,
    _unwrap,
)
from lowrank_op.distributed.qr import (
    QR_METHODS,
    _finish,
    _local_side,
    _second_level,
    _sharded_side,
    _sum_pieces,
)
from lowrank_op.errors import (
    BroadcastError,
    DeviceMismatchError,
    DtypeMismatchError,
    NotSquareError,
    ShapeMismatchError,
)

# --- The sharded product -------------------------------------------------------------------------
def _core_values(what: str, C: Tensor) -> list[Tensor]:
    """``[S]``, ``[norm]`` or ``[U_c, S, V_c]`` of the small core ``C``, LAPACK never seeing NaN."""
    if what == "svdvals":
        return [kernels._svdvals_safe(C)]
    if what == "norm":
        C, scale = kernels._balance(C)  # the sum of squares must neither overflow nor underflow
        return [torch.linalg.matrix_norm(C) * scale[..., 0, 0]]
    C, bad = kernels._lapack_safe(C)
    U_c, _, Vh_c = torch.linalg.svd(C, full_matrices=False)
    S = torch.linalg.svdvals(C)  # values-only: high relative accuracy on small singular values
    return [kernels._nan_where(bad, U_c, 2), kernels._nan_where(bad, S, 1), kernels._nan_where(bad, Vh_c.mH, 2)]


class ShardedFactoredMatrix:
    """``M = A @ B`` with ``A`` split by rows and ``B`` by columns across a process group.

    A plain class rather than a ``LinearOperator``: every method is a collective that all ranks
    must call together, in the same order, which generic LinearOperator code (solvers, autograd
    functions, ``_args`` rebuilding) cannot promise; and the results are sharded tensors, not
    operators. Every call communicates afresh (no cache: a hit on one rank and a miss on another
    would deadlock the group).

    Parameters
    ----------
    A_local : Tensor or DTensor, shape (..., ldim_r, mdim)
        This rank's rows of ``A`` (``"shard"``), or all of it (``"replicate"``), or its own batch
        members whole (``"batch"``, e.g. heads).
    B_local : Tensor or DTensor, shape (..., mdim, rdim_r)
        This rank's columns of ``B``, or all of it, or its own batch members whole.
    group : ProcessGroup, optional
        Default: the world, or the DTensors' mesh group.
    layouts : tuple of two of {"shard", "replicate", "batch"}, optional
        For plain tensors; default ``("shard", "shard")``. DTensors give their own (a given
        layout must agree with the placement).

    Raises
    ------
    TypeError, ValueError
        On every rank together (after one small all-gather) when any rank's factors are not
        floating tensors, do not fit (inner dims, broadcasting batch dims, dtypes, devices), or do
        not fit together across ranks (mdim, dtypes, batch dims of a sharded factor).

    Notes
    -----
    The constructor all-gathers one row of ``2 MAX_DIMS + 7`` int64 (184 bytes) per rank: the
    layouts, dtypes and local shapes, from which the global shape and both partitions are read,
    so :attr:`eigenvalues` and :meth:`trace` check the partitions without communicating again.
    When neither factor is ``"shard"`` nothing is gathered and every method is local (the
    decompositions by Householder QR of each factor, whatever ``method`` says).
    A ``"batch"`` factor may be combined with a ``"shard"`` one (e.g. a shared row-sharded
    ``A`` and heads-sharded ``B``): the sharded factor's ``R`` is broadcast and the core is
    decomposed on the rank that holds its matrices; eigenvalues and traces of such products are
    not offered. Results of decompositions are in the compute dtype (float32 for 16-bit factors).

    Examples
    --------
    >>> fm = ShardedFactoredMatrix(A_local, B_local)  # doctest: +SKIP
    >>> S = fm.S                    # replicated, identical on every rank
    >>> U_local, S, V_local = fm.svd()
    >>> y_local = fm @ x_local      # x split like B's columns, y like A's rows
    """

    def __init__(self, A_local: Tensor, B_local: Tensor, group: object = None, *,
                 layouts: tuple[str, str] | None = None):
        if layouts is not None:
            if not isinstance(layouts, (tuple, list)) or len(layouts) != 2:
                raise ValueError(f"`layouts` must be a pair of {LAYOUTS}; got {layouts!r}.")
            for value in layouts:
                check_choice("layouts", value, LAYOUTS)
        given = tuple(layouts) if layouts is not None else (None, None)
        A, la, group_a = _unwrap("A_local", A_local, "rows", given[0])
        B, lb, group_b = _unwrap("B_local", B_local, "cols", given[1])
        self._group = _resolve_group(group, [group_a, group_b])
        self._A, self._B, self._layouts = A, B, (la, lb)
        error = _tensor_error("A_local", A) or _tensor_error("B_local", B) or self._pair_error(A, B)
        self._distributed = "shard" in self._layouts
        if not self._distributed:
            if error is not None:
                raise error[0](error[1])
            self._comm, self._rows, self._cols = None, [A.shape[-2]], [B.shape[-1]]
            return
        self._comm = _comm(self._group, A)
        table = _agree(self._comm, [LAYOUTS.index(la), LAYOUTS.index(lb), *_fields(A), *_fields(B)], error,
                       "ShardedFactoredMatrix",
                       lambda f: f"A_local: {_shown(f[2:])}; B_local: {_shown(f[2 + _WIDTH:])}")
        if len({tuple(t[:2]) for t in table}) > 1:
            raise ValueError("ShardedFactoredMatrix: the ranks disagree on the layouts; "
                             f"{_per_rank([(LAYOUTS[t[0]], LAYOUTS[t[1]]) for t in table])}.")
        self._rows = _check_across("ShardedFactoredMatrix", "A_local", table, 2, la, "rows")
        self._cols = _check_across("ShardedFactoredMatrix", "B_local", table, 2 + _WIDTH, lb, "cols")

    @staticmethod
    def _pair_error(A: Tensor, B: Tensor) -> Error:
        if A.shape[-1] != B.shape[-2]:
            return ShapeMismatchError, (f"`A_local` of shape {tuple(A.shape)} and `B_local` of shape {tuple(B.shape)} "
                                        "must share the inner dim mdim (A_local.shape[-1] == B_local.shape[-2]).")
        if A.dtype != B.dtype:
            return DtypeMismatchError, f"`A_local` ({A.dtype}) and `B_local` ({B.dtype}) must have one dtype."
        if A.device != B.device:
            return DeviceMismatchError, f"`A_local` ({A.device}) and `B_local` ({B.device}) must be on one device."
        try:
            torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
        except RuntimeError:
            return BroadcastError, (f"the leading dims of `A_local` {tuple(A.shape[:-2])} and `B_local` "
                                    f"{tuple(B.shape[:-2])} must broadcast.")
        return None

    # --- Description -----------------------------------------------------------------------------
    @property
    def group(self) -> object:
        return self._group

    @property
    def layouts(self) -> tuple[str, str]:
        """The layouts of ``A`` and ``B`` (see the module docstring)."""
        return self._layouts

    @property
    def A_local(self) -> Tensor:
        return self._A

    @property
    def B_local(self) -> Tensor:
        return self._B

    @property
    def row_sizes(self) -> list[int]:
        """``A``'s local row counts on every rank (one entry when ``A`` is not ``"shard"``)."""
        return list(self._rows) if self._layouts[0] == "shard" else [self._A.shape[-2]]

    @property
    def col_sizes(self) -> list[int]:
        """``B``'s local column counts on every rank (one entry when ``B`` is not ``"shard"``)."""
        return list(self._cols) if self._layouts[1] == "shard" else [self._B.shape[-1]]

    @property
    def batch_shape(self) -> torch.Size:
        """Leading dims (this rank's, for a ``"batch"`` factor)."""
        return torch.broadcast_shapes(self._A.shape[:-2], self._B.shape[:-2])

    @property
    def shape(self) -> torch.Size:
        """``(..., ldim, rdim)``: the global matrix dims (leading dims as :attr:`batch_shape`)."""
        return torch.Size((*self.batch_shape, sum(self.row_sizes), sum(self.col_sizes)))

    @property
    def mdim(self) -> int:
        return self._A.shape[-1]

    @property
    def dtype(self) -> torch.dtype:
        """The factors' dtype (decompositions come back in :func:`lowrank_op.kernels.compute_dtype` of it)."""
        return self._A.dtype

    def __repr__(self) -> str:
        rank = f"rank {self._comm.rank} of {self._comm.size}" if self._comm is not None else "local"
        return f"ShardedFactoredMatrix(shape={tuple(self.shape)}, mdim={self.mdim}, layouts={self._layouts}, {rank})"

    # --- Decompositions --------------------------------------------------------------------------
    def _local(self, what: str):
        A, B = kernels.promote(self._A, self._B)
        choices.record("distributed_qr", "local", f"layouts {self._layouts}: no factor is sharded on its matrix "
                                                  "dims, so every rank decomposes its own matrices.")
        if what == "svdvals":
            return kernels.svdvals(A, B, method="householder")
        if what == "norm":
            return kernels.frobenius_norm(A, B, method="qr")
        return kernels.svd(A, B, method="householder")

    @torch.no_grad()
    def _decompose(self, what: str, method: str):
        check_choice("method", method, QR_METHODS)
        if not self._distributed:
            return self._local(what)
        comm, want_q = self._comm, what == "svd"
        A, B = kernels.promote(self._A, self._B)
        sides = []
        for X, name, layout, rows in ((A, "A", self._layouts[0], self._rows),
                                      (B.mH, "B^H", self._layouts[1], self._cols)):
            if layout == "shard":
                sides.append(_sharded_side(X, name, rows, method, want_q, comm))
            else:
                sides.append(_local_side(X, name, want_q, comm.rank))
        pending = [s for s in sides if s.R is None]
        gathered = _gather([(f"tsqr:{s.name}", s.piece) for s in pending], comm) if pending else None
        batch = tuple(self.batch_shape)
        shapes = {"A": tuple(A.shape[:-2]), "B^H": tuple(B.shape[:-2])}
        if "batch" in self._layouts:  # the core stays with the rank that holds its matrices
            _finish(pending, gathered, want_q, comm, lambda s: shapes[s.name], A.device)
            values = _core_values(what, sides[0].R @ sides[1].R.mH)
            if what != "svd":
                return values[0]
            U_c, S, V_c = values
            return sides[0].lift(U_c), S, sides[1].lift(V_c)
        # Rank 0 finishes the TSQRs and decomposes the core: one gather, one broadcast.
        values = None
        if comm.is_root:
            for i, side in enumerate(pending):
                side.Q2, side.R = _second_level(side, [g[i] for g in gathered], want_q)
            values = _core_values(what, sides[0].R @ sides[1].R.mH)
            if what == "svd":  # the blocks of Q_2 U_c and Q_2 V_c, so each rank needs only its own rows
                U_c, S, V_c = values
                values = [sides[0].Q2 @ U_c if sides[0].blocks else U_c, S,
                          sides[1].Q2 @ V_c if sides[1].blocks else V_c]
        real = kernels._real_dtype(A.dtype)
        k = min(sides[0].p, sides[1].p)
        if what == "svdvals":
            templates = [("core", (*batch, k), real)]
        elif what == "norm":
            templates = [("core", batch, real)]
        else:
            templates = [("core", (*batch, s.K if s.blocks else s.p, k), A.dtype) for s in sides]
            templates.insert(1, ("core", (*batch, k), real))
        out = _broadcast(templates, values, comm, A.device)
        if what != "svd":
            return out[0]
        return sides[0].lift(out[0]), out[1], sides[1].lift(out[2])

    def svdvals(self, method: str = "auto") -> Tensor:
        """Singular values of the global product, descending, shape (..., k), replicated.

        Parameters
        ----------
        method : {"auto", "tsqr", "cholqr2"}
            How each sharded factor is orthogonalised; see :func:`tsqr` (``"auto"``: TSQR).

        Returns
        -------
        S : Tensor, shape (..., k)
            ``k = min(ldim, mdim, rdim)``; the same bits on every rank.

        Notes
        -----
        ``A = Q_A R_A`` and ``B^H = Q_B R_B`` by TSQR, and ``S`` are the singular values of the
        core ``R_A R_B^H`` (at most ``mdim x mdim``), computed on rank 0 with the second-level
        QRs, from one gather of both factors' pieces. Bytes sent per rank and batch member:
        ``2 m^2 e``; rank 0 also broadcasts ``k`` reals. Cost ``O((ldim_r + rdim_r) m^2)`` per
        rank, ``O(P m^3)`` on rank 0. A batch member holding NaN gives NaN on every rank.
        """
        return self._decompose("svdvals", method)

    @property
    def S(self) -> Tensor:
        """Singular values, shape (..., k), descending, replicated (:meth:`svdvals`)."""
        return self.svdvals()

    def svd(self, method: str = "auto") -> tuple[Tensor, Tensor, Tensor]:
        """Thin SVD ``M = U diag(S) V^H``, with ``U`` split like ``A``'s rows and ``V`` like ``B``'s columns.

        Parameters
        ----------
        method : {"auto", "tsqr", "cholqr2"}
            As for :meth:`svdvals`.

        Returns
        -------
        U_local : Tensor, shape (..., ldim_r, k)
            This rank's rows of ``U`` (all of them for a factor that is not ``"shard"``).
        S : Tensor, shape (..., k)
            Descending, real, replicated (the same bits on every rank).
        V_local : Tensor, shape (..., rdim_r, k)
            This rank's rows of ``V`` (right singular vectors as columns).

        Notes
        -----
        Rank 0 factorises the stacked pieces (``Q_2``, ``R`` per factor), decomposes the core
        ``R_A R_B^H = U_c S V_c^H`` and broadcasts ``Q_2A U_c``, ``S``, ``Q_2B V_c``; each rank
        multiplies its block by its first-level ``Q_r``. Bytes sent per rank and batch member:
        ``2 m^2 e``; rank 0 also broadcasts ``(K_A + 1 + K_B) k e`` (``K <= P m``). Cost per rank
        ``O((ldim_r + rdim_r) m^2)``. No gradients.
        """
        return self._decompose("svd", method)

    def norm(self, method: str = "auto") -> Tensor:
        """Frobenius norm of the global product, shape (...), replicated: ``|R_A R_B^H|_F``.

        From the TSQR core as :meth:`svdvals` (``method`` likewise), the core scaled by a power of
        two first so that its sum of squares neither overflows nor underflows. Bytes sent per
        rank and batch member: ``2 m^2 e``; rank 0 also broadcasts one real.
        """
        return self._decompose("norm", method)

    # --- Square products -------------------------------------------------------------------------
    def _aligned(self, what: str) -> tuple[Tensor, Tensor]:
        """``(A_piece, B_piece)`` on this rank with ``B A = sum_r B_piece A_piece``: the columns of
        ``B`` that meet this rank's rows of ``A`` (or the reverse)."""
        la, lb = self._layouts
        ldim, rdim = self.shape[-2:]
        if ldim != rdim:
            raise NotSquareError(f"{what} needs a square product (ldim == rdim); this one has shape "
                                 f"{tuple(self.shape)}.")
        if "batch" in self._layouts:
            raise ValueError(
                f"{what} of a product with a factor sharded on a leading dim and the other on its matrix "
                f"dims (layouts {self._layouts}) is not offered: redistribute both to 'shard' or both to 'batch'."
            )
        if la == lb == "shard":
            if self._rows != self._cols:
                raise ValueError(
                    f"{what} needs B's column partition to equal A's row partition, so that each rank holds the "
                    f"columns of B that meet its rows of A; local sizes per rank: A rows {self._rows}, "
                    f"B columns {self._cols}. Split B's columns as A's rows are split."
                )
            return self._A, self._B
        rank = self._comm.rank
        if la == "shard":
            start = sum(self._rows[:rank])
            return self._A, self._B[..., start:start + self._rows[rank]]
        start = sum(self._cols[:rank])
        return self._A[..., start:start + self._cols[rank], :], self._B

    @property
    @torch.no_grad()
    def eigenvalues(self) -> Tensor:
        """Eigenvalues of ``B @ A``, complex, shape (..., mdim), in LAPACK's order, replicated.

        As :attr:`lowrank_op.FactoredMatrix.eigenvalues`: ``B A`` shares the square ``A B``'s
        non-zero eigenvalues. ``B A = sum_r B_r A_r`` over the ranks' aligned pieces; rank 0 sums
        them (in rank order) and decomposes it, then broadcasts the eigenvalues.

        Raises
        ------
        ValueError
            (a NotSquareError) unless ``ldim == rdim``; on every rank when both factors are
            ``"shard"`` and ``B``'s column partition differs from ``A``'s row partition (read at
            construction), naming every rank's local sizes.

        Notes
        -----
        Bytes sent per rank and batch member: ``m^2 e`` (the gather); rank 0 also broadcasts ``m``
        complex values. Cost ``O(ldim_r m^2)`` per rank, ``O(P m^2 + m^3)`` on rank 0. A batch
        member holding NaN gives NaN (LAPACK's ``geev`` never sees it).
        """
        if not self._distributed:
            if self._A.shape[-2] != self._B.shape[-1]:
                raise NotSquareError(f"eigenvalues needs a square product; this one has shape {tuple(self.shape)}.")
            return kernels.reverse_product_eigvals(self._A, self._B)
        A, B = kernels.promote(*self._aligned("eigenvalues"))
        comm, batch = self._comm, tuple(self.batch_shape)
        complex_dtype = torch.promote_types(A.dtype, torch.complex64)
        gathered = _gather([("eigenvalues", B @ A)], comm)
        values = None
        if comm.is_root:
            found, bad = kernels._eigvals_safe(_sum_pieces(gathered, 0))
            values = [kernels._nan_where(bad, found, 1)]
        return _broadcast([("eigenvalues", (*batch, self.mdim), complex_dtype)], values, comm, A.device)[0]

    @torch.no_grad()
    def trace(self) -> Tensor:
        """Trace of the square product, shape (...), replicated: one all-reduce of a scalar per batch member.

        ``sum_r tr(A_r B_r) = sum_r sum(A_r * B_r^T)`` over aligned pieces (same requirements as
        :attr:`eigenvalues`). Bytes sent per rank: one element per batch member. Cost
        ``O(ldim_r m)``. In the factors' dtype, as :meth:`lowrank_op.FactoredMatrix.trace`.
        """
        if not self._distributed:
            if self._A.shape[-2] != self._B.shape[-1]:
                raise NotSquareError(f"trace needs a square product; this one has shape {tuple(self.shape)}.")
            return kernels.trace(self._A, self._B)
        A, B = self._aligned("trace")
        return _all_reduce("trace", kernels.trace(A, B), self._comm)

    # --- Products --------------------------------------------------------------------------------
    def _operand(self, name: str, x: object, rows: int, what: str, sharded: bool, check: bool) -> Tensor:
        """Validate an operand (shape (..., rows, k) or (rows,)), on every rank together when the
        product then all-reduces (``sharded``) and ``check`` is on."""
        error = None
        if not isinstance(x, Tensor):
            error = TypeError, f"`{name}` must be a torch.Tensor, got {type(x).__name__}."
        elif x.dtype != self.dtype:
            error = DtypeMismatchError, f"`{name}` must have the factors' dtype {self.dtype}, got {x.dtype}."
        elif not 1 <= x.dim() <= MAX_DIMS or x.shape[-2 if x.dim() > 1 else -1] != rows:
            error = ShapeMismatchError, (f"`{name}` of shape {tuple(x.shape)} must have shape (..., {rows}, k) or "
                                         f"({rows},) on this rank, to match the factor's local size {rows}.")
        else:
            try:
                torch.broadcast_shapes(x.shape[:-2], self.batch_shape)
            except RuntimeError:
                error = BroadcastError, (f"the leading dims of `{name}` {tuple(x.shape[:-2])} must broadcast against "
                                         f"the product's {tuple(self.batch_shape)}.")
        if sharded and check:
            table = _agree(self._comm, _fields(x), error, what, lambda f: f"{name}: {_shown(f)}")
            shapes = [_shape_of(f) for f in table]
            keys = [(s[:-2] + s[-1:]) if len(s) > 1 else () for s in shapes]
            if len(set(keys)) > 1 or len({len(s) for s in shapes}) > 1:
                raise ValueError(f"{what}: `{name}` must have the same dims on every rank but its rows; "
                                 f"shapes {_per_rank(shapes)}.")
        elif error is not None:
            raise error[0](error[1])
        return x

    @torch.no_grad()
    def matmul(self, x_local: Tensor, *, check: bool = True) -> Tensor:
        """``M @ x`` for ``x`` split like ``B``'s columns; the result is split like ``A``'s rows.

        Parameters
        ----------
        x_local : Tensor, shape (..., rdim_r, k) or (rdim_r,)
            This rank's rows of ``x`` (all of them when ``B`` is not ``"shard"``).
        check : bool
            All-gather the operand's shape first (88 bytes), so that a bad operand on any rank
            raises on every rank. With False a bad operand raises only where it is, and the other
            ranks wait in the all-reduce until the group's timeout.

        Returns
        -------
        Tensor, shape (..., ldim_r, k) or (ldim_r,)

        Notes
        -----
        ``z = B x = sum_r B_r x_r`` by one all-reduce of an ``m x k`` block per batch member
        (bytes sent per rank: ``m k e``), then ``A_local @ z``. Cost ``O((ldim_r + rdim_r) m k)``.
        """
        x = self._operand("x_local", x_local, self._B.shape[-1], "matmul", self._layouts[1] == "shard", check)
        vector = x.dim() == 1
        z = self._B @ (x[:, None] if vector else x)
        if self._layouts[1] == "shard":
            z = _all_reduce("matmul", z, self._comm)
        y = self._A @ z
        return y[..., 0] if vector else y

    def __matmul__(self, other: Tensor) -> Tensor:
        return self.matmul(other)

    @torch.no_grad()
    def rmatmul(self, y_local: Tensor, *, check: bool = True) -> Tensor:
        """``y^H M`` for ``y`` split like ``A``'s rows; the result is split like ``B``'s columns.

        Parameters
        ----------
        y_local : Tensor, shape (..., ldim_r, k) or (ldim_r,)
        check : bool
            As for :meth:`matmul`.

        Returns
        -------
        Tensor, shape (..., k, rdim_r) or (rdim_r,)

        Notes
        -----
        ``w = y^H A = sum_r y_r^H A_r`` by one all-reduce of a ``k x m`` block per batch member
        (bytes sent per rank: ``k m e``), then ``w @ B_local``.
        """
        y = self._operand("y_local", y_local, self._A.shape[-2], "rmatmul", self._layouts[0] == "shard", check)
        vector = y.dim() == 1
        w = (y[:, None] if vector else y).mH @ self._A
        if self._layouts[0] == "shard":
            w = _all_reduce("rmatmul", w, self._comm)
        out = w @ self._B
        return out[..., 0, :] if vector else out
