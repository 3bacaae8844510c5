"""Factored products whose factors are sharded across a ``torch.distributed`` process group.

``M = A @ B`` with ``A`` (..., ldim, mdim) split by rows and ``B`` (..., mdim, rdim) by columns
over the ranks of a group, as vocabulary-parallel embeddings and FSDP leave them. Decompositions
go through a tall-skinny QR (TSQR) of each factor, so only ``mdim x mdim`` blocks cross ranks,
never anything with ``ldim`` or ``rdim`` rows. The same code runs on gloo (CPU) and NCCL (GPU).
``import lowrank_op`` does not import this module (nor ``torch.distributed``): import it as
``lowrank_op.distributed`` when needed.

Inputs and layouts
------------------
Each factor comes either as this rank's plain shard (``A_local`` (..., ldim_r, mdim),
``B_local`` (..., mdim, rdim_r)) with a ``group`` (default: the world), or as a
``torch.distributed.tensor.DTensor`` on a 1-D device mesh, whose ``.to_local()`` and mesh group
are taken. A factor's *layout* says how it is spread:

* ``"shard"``: split along its outer matrix dim (``A``'s rows, ``B``'s columns; DTensor
  ``Shard(ndim - 2)`` / ``Shard(ndim - 1)``). Shards may be uneven; a rank may hold none.
* ``"replicate"``: every rank holds all of it (DTensor ``Replicate()``).
* ``"batch"``: split along a leading (batch) dim, e.g. by heads under tensor parallelism
  (DTensor ``Shard(d)``, ``d < ndim - 2``): every rank holds whole matrices.

A factor that is not ``"shard"`` needs no communication for its own QR: every rank factorises
its own matrices (Householder) and nothing about that factor is sent. When neither factor is
``"shard"`` the whole product is local and no collective runs at all.

Who computes what
-----------------
Each rank QRs its own rows; the small pieces (``mdim x mdim`` per rank and factor) are
*gathered to rank 0 of the group* (:data:`ROOT`), which runs every small dense decomposition (the
second-level QR of the stacked ``R`` factors, the SVD or norm of the ``mdim x mdim`` core, the
eigenvalues of ``B A``) and *broadcasts* the results. Replicated results (``R``, ``S``, the norm,
eigenvalues) are therefore bitwise identical on every rank by construction, without relying on
LAPACK, BLAS or thread counts being the same everywhere, and every branch that depends on data
(CholeskyQR2's fallback) is decided by rank 0 and broadcast, so the ranks never take different
collectives. Products with a ``"batch"`` factor keep their matrices on the rank that holds them:
there the core is decomposed locally, from a broadcast (identical) ``R`` of the sharded factor.

Communication and its bytes
---------------------------
Every collective goes through one wrapper, which counts the bytes this rank *contributes* (the
payload, ``numel * element_size`` of the flat buffer it passes in; complex values count as two
reals): for ``all_gather``, ``gather`` and ``all_reduce`` that is the rank's own tensor; for
``broadcast`` the payload on rank 0 and nothing on the others. What an algorithm puts on the wire
(a ring all-reduce sends up to ``2 (P - 1) / P`` times its payload) is the backend's business.
:func:`count_bytes` reads the counts. With ``P`` ranks, ``m = mdim``, ``e`` bytes per element of
the compute dtype, per batch member (``K = sum_r min(n_r, m) <= P m`` stacked rows,
``p = min(N, m)`` for ``N`` global rows, ``k = min(ldim, mdim, rdim)``):

=====================================  ======================================================
:func:`tsqr`                           gather ``m^2 e``; rank 0 broadcasts ``(K p + p m) e``
                                       (``p m e`` without ``Q``)
``svdvals()`` / ``norm()``             gather ``2 m^2 e``; rank 0 broadcasts ``k e`` / ``e``
``svd()``                              gather ``2 m^2 e``; rank 0 broadcasts ``(K_A + K_B + 1) k e``
``eigenvalues``                        gather ``m^2 e``; rank 0 broadcasts ``m`` complex values
``trace()``                            all-reduce of one element
``matmul(x)`` (``x`` ..., rdim_r, k)   all-reduce ``m k e`` (+ the shape check)
:func:`sharded_outer_reduction`        gather ``(p^2 + q^2 + q p) e``; rank 0 broadcasts as much
=====================================  ======================================================

Nothing grows with ``ldim`` or ``rdim``. Operations that take new tensors first all-gather one
fixed-size row of int64 describing them (``MAX_DIMS + 3`` to ``2 MAX_DIMS + 8`` of them, 88
to 192 bytes, counted as ``"check"``), so that bad input on any rank makes *every* rank raise together
instead of leaving the others waiting in a collective. Arguments that are not tensors
(``method``, ``layouts``, ``closing``) are taken to be the same on every rank, as in any SPMD
program. Each collective is bounded by the process group's timeout
(``init_process_group(..., timeout=...)``).

Not here: gradients (everything runs under ``torch.no_grad()``), caching (a cache hit on one rank
and a miss on another would deadlock the group; hold on to results instead), and 2-D meshes.

References
----------
Demmel, Grigori, Hoemmen and Langou, "Communication-optimal parallel and sequential QR and LU
factorizations", SIAM J. Sci. Comput. 34 (2012) (TSQR). Fukaya, Nakatsukasa, Yanagisawa and
Yamamoto, "CholeskyQR2: a simple and communication-avoiding algorithm", ScalA 2014.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from lowrank_op import choices, kernels, settings
from lowrank_op._checks import check_choice
from lowrank_op.errors import (
    BroadcastError,
    DeviceMismatchError,
    DtypeMismatchError,
    NotSquareError,
    ShapeMismatchError,
)
from lowrank_op.shared_bases import OuterReduction, _same_view, reduce_outer

QR_METHODS = ("auto", "tsqr", "cholqr2")
LAYOUTS = ("shard", "replicate", "batch")
#: Group rank that runs the small dense decompositions and broadcasts their results.
ROOT = 0
#: Most dims a tensor argument may have: the shape check carries shapes in fixed-size rows.
MAX_DIMS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128)
_OPS = ("all_gather", "gather", "broadcast", "all_reduce")


# --- Byte accounting and the one collective wrapper ----------------------------------------------
@dataclass
class ByteCounter:
    """Bytes this rank contributed to this module's collectives inside a :func:`count_bytes` block.

    Attributes
    ----------
    total : int
        Payload bytes sent (see the module docstring for the convention per collective).
    calls : int
        Collectives taken part in, including broadcasts in which this rank only received.
    by_op : dict[str, int]
        Bytes per collective: ``"all_gather"``, ``"gather"``, ``"broadcast"``, ``"all_reduce"``.
    by_part : dict[str, int]
        Bytes per content: ``"check"`` (shape agreement), ``"tsqr:A"``, ``"tsqr:B^H"``,
        ``"tsqr:X"``, ``"tsqr:L"``, ``"tsqr:R^H"`` (TSQR pieces and second-level factors of one
        factor), ``"cholqr2:A"`` ..., ``"core"`` (results of the small decomposition),
        ``"eigenvalues"``, ``"trace"``, ``"matmul"``, ``"rmatmul"``, ``"closing"``.
    """

    total: int = 0
    calls: int = 0
    by_op: dict[str, int] = field(default_factory=dict)
    by_part: dict[str, int] = field(default_factory=dict)

    def _add(self, op: str, parts: Sequence[tuple[str, int]]) -> None:
        self.calls += 1
        for name, n in parts:
            self.total += n
            self.by_op[op] = self.by_op.get(op, 0) + n
            self.by_part[name] = self.by_part.get(name, 0) + n


_counters: list[ByteCounter] = []


@contextlib.contextmanager
def count_bytes() -> Iterator[ByteCounter]:
    """Count the bytes this rank sends through the module's collectives inside the block.

    Yields
    ------
    ByteCounter
        Filled in as collectives run; blocks nest (each counts everything inside it).

    Examples
    --------
    >>> with count_bytes() as sent:  # doctest: +SKIP
    ...     _, R = tsqr(X_local, want_q=False)
    >>> sent.total, sent.by_part["tsqr:X"]  # doctest: +SKIP
    """
    counter = ByteCounter()
    _counters.append(counter)
    try:
        yield counter
    finally:
        _counters.remove(counter)


@dataclass(frozen=True)
class _Comm:
    """A process group, this rank's place in it, and the device its buffers travel on."""

    group: object
    rank: int
    size: int
    device: torch.device

    @property
    def is_root(self) -> bool:
        return self.rank == ROOT


def _collective(op: str, buffer: Tensor, comm: _Comm, parts: Sequence[tuple[str, int]]):
    """Run one collective on a flat ``buffer``, counting ``parts`` (name, bytes) as sent.

    ``all_gather``: list of every rank's buffer. ``gather``: that list on :data:`ROOT`, None
    elsewhere. ``broadcast``: ``buffer`` filled with rank 0's. ``all_reduce``: ``buffer`` summed.
    """
    sent = parts if (op != "broadcast" or comm.is_root) else ()
    for counter in _counters:
        counter._add(op, sent)
    if op == "all_gather":
        out = [torch.empty_like(buffer) for _ in range(comm.size)]
        dist.all_gather(out, buffer, group=comm.group)
        return out
    if op == "gather":
        out = [torch.empty_like(buffer) for _ in range(comm.size)] if comm.is_root else None
        dist.gather(buffer, out, group=comm.group, group_dst=ROOT)
        return out
    if op == "broadcast":
        dist.broadcast(buffer, group=comm.group, group_src=ROOT)
        return buffer
    if op == "all_reduce":
        dist.all_reduce(buffer, group=comm.group)
        return buffer
    raise ValueError(f"`op` must be one of {_OPS}; got {op!r}.")


def _flat(X: Tensor, real: torch.dtype) -> Tensor:
    X = X.detach()  # collectives write in place, behind autograd's back
    return (torch.view_as_real(X) if X.is_complex() else X).reshape(-1).to(real)


def _pack(named: Sequence[tuple[str, Tensor]], comm: _Comm) -> tuple[Tensor, list[tuple[str, int]]]:
    """One flat real buffer on the communication device, and the bytes of each named part."""
    real = kernels._real_dtype(named[0][1].dtype)
    flats = [_flat(X, real) for _, X in named]
    parts = [(name, f.numel() * f.element_size()) for (name, _), f in zip(named, flats)]
    return torch.cat(flats).to(comm.device), parts


Template = tuple[str, tuple[int, ...], torch.dtype]


def _unpack(buffer: Tensor, templates: Sequence[Template], device: torch.device) -> list[Tensor]:
    out, at = [], 0
    for _, shape, dtype in templates:
        n = math.prod(shape) * (2 if dtype.is_complex else 1)
        chunk = buffer[at:at + n].to(device)
        at += n
        if dtype.is_complex:
            out.append(torch.view_as_complex(chunk.reshape(*shape, 2).contiguous()).to(dtype))
        else:
            out.append(chunk.reshape(shape).to(dtype))
    return out


def _gather(named: Sequence[tuple[str, Tensor]], comm: _Comm) -> list[list[Tensor]] | None:
    """Every rank's ``named`` tensors (the same shapes on every rank) on :data:`ROOT`, by rank."""
    buffer, parts = _pack(named, comm)
    out = _collective("gather", buffer, comm, parts)
    if out is None:
        return None
    device = named[0][1].device
    templates = [(name, tuple(X.shape), X.dtype) for name, X in named]
    return [_unpack(b, templates, device) for b in out]


def _broadcast(templates: Sequence[Template], values: Sequence[Tensor] | None, comm: _Comm,
               device: torch.device) -> list[Tensor]:
    """Rank 0's ``values`` (shapes and dtypes as ``templates``; None on the other ranks) on every rank."""
    real = kernels._real_dtype(templates[0][2])
    if comm.is_root:
        buffer, parts = _pack([(name, X) for (name, _, _), X in zip(templates, values)], comm)
    else:
        n = sum(math.prod(shape) * (2 if dtype.is_complex else 1) for _, shape, dtype in templates)
        buffer, parts = torch.empty(n, dtype=real, device=comm.device), ()
    return _unpack(_collective("broadcast", buffer, comm, parts), templates, device)


def _all_reduce(name: str, X: Tensor, comm: _Comm) -> Tensor:
    buffer, parts = _pack([(name, X)], comm)
    return _unpack(_collective("all_reduce", buffer, comm, parts), [(name, tuple(X.shape), X.dtype)], X.device)[0]


# --- Groups, DTensors and the shape agreement ----------------------------------------------------
def _dtensor_module(X: object):
    """The ``torch.distributed.tensor`` module when ``X`` is a DTensor, else None. DTensors exist only once
    ``torch.distributed.tensor`` is imported, so it is looked up, never imported, here."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is None or not isinstance(X, module.DTensor):
        return None
    return module


def _unwrap(name: str, X: object, side: str, layout: str | None) -> tuple[object, str, object]:
    """``(local tensor, layout, mesh group or None)`` of a factor; ``side`` is ``"rows"`` for a
    factor sharded by rows (``A``, ``L``, ``X``), ``"cols"`` for one sharded by columns."""
    if _dtensor_module(X) is None:
        return X, layout or "shard", None
    mesh = X.device_mesh
    if mesh.ndim != 1:
        raise ValueError(
            f"`{name}` is a DTensor on a {mesh.ndim}-D device mesh {tuple(mesh.shape)}; only 1-D meshes are "
            "read. Pass `.to_local()` shards with the `group` they are split over instead."
        )
    placement, ndim = X.placements[0], X.dim()
    outer = ndim - 2 if side == "rows" else ndim - 1
    what = "rows" if side == "rows" else "columns"
    if placement.is_replicate():
        found = "replicate"
    elif placement.is_shard():
        dim = placement.dim % ndim
        if dim == outer:
            found = "shard"
        elif dim < ndim - 2:
            found = "batch"
        else:
            raise ValueError(
                f"`{name}` of global shape {tuple(X.shape)} is sharded on its inner dim mdim ({placement}); "
                f"only its {what} (Shard({outer})), a leading dim or Replicate() are read: "
                f"`.redistribute(placements=[Shard({outer})])` it first."
            )
    else:
        raise ValueError(
            f"`{name}` has placement {placement}; only Shard and Replicate are read. Reduce it first, "
            f"e.g. `.redistribute(placements=[Shard({outer})])`."
        )
    if layout is not None and layout != found:
        raise ValueError(f"`layouts` says {layout!r} for `{name}`, but the DTensor's placement {placement} is "
                         f"{found!r}; leave `layouts` None for DTensors.")
    return X.to_local(), found, mesh.get_group()


def _resolve_group(group: object, mesh_groups: Sequence[object]) -> object:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) on every "
            "rank first."
        )
    found = [g for g in ([group] if group is not None else []) + list(mesh_groups) if g is not None]
    chosen = found[0] if found else dist.group.WORLD
    if any(g is not chosen for g in found[1:]):
        raise ValueError(
            "the factors' DTensor meshes and `group` name different process groups; put both factors on one "
            "1-D mesh (and leave `group` None, or pass that mesh's group)."
        )
    return chosen


def _comm(group: object, hint: object) -> _Comm:
    """Buffers travel on CUDA under NCCL (the factor's device, else the current one), else on the CPU."""
    backend = str(dist.get_backend(group)).lower()
    device = torch.device("cpu")
    if "nccl" in backend:
        if isinstance(hint, Tensor) and hint.device.type == "cuda":
            device = hint.device
        elif "gloo" not in backend or (isinstance(hint, Tensor) and hint.device.type == "cuda"):
            device = torch.device("cuda", torch.cuda.current_device())
    return _Comm(group, dist.get_rank(group), dist.get_world_size(group), device)


def _fields(X: object) -> list[int]:
    """A tensor's description for the shape agreement: ``[dtype code, ndim, *shape]``, padded."""
    if not isinstance(X, Tensor) or X.dim() > MAX_DIMS:
        return [-1, -1] + [-1] * MAX_DIMS
    code = _DTYPES.index(X.dtype) if X.dtype in _DTYPES else -1
    return [code, X.dim(), *X.shape, *([-1] * (MAX_DIMS - X.dim()))]


_WIDTH = 2 + MAX_DIMS


def _shape_of(fields: Sequence[int]) -> tuple[int, ...] | None:
    return None if fields[1] < 0 else tuple(fields[2:2 + fields[1]])


def _dtype_of(fields: Sequence[int]) -> str:
    return str(_DTYPES[fields[0]]) if fields[0] >= 0 else "another dtype"


def _shown(fields: Sequence[int]) -> str:
    shape = _shape_of(fields)
    return "not a tensor of at most 8 dims" if shape is None else f"shape {shape}, {_dtype_of(fields)}"


Error = tuple[type, str] | None


def _tensor_error(name: str, X: object) -> Error:
    """Why ``X`` cannot be a factor or operand on this rank, or None."""
    if not isinstance(X, Tensor):
        return TypeError, f"`{name}` must be a torch.Tensor (or a DTensor), got {type(X).__name__}."
    if not (X.dtype.is_floating_point or X.dtype.is_complex):
        return TypeError, (f"`{name}` must have a floating or complex dtype, got {X.dtype}; cast it with "
                           f"{name}.double() (or .float()).")
    if not 2 <= X.dim() <= MAX_DIMS:
        return ValueError, (f"`{name}` must have 2 to {MAX_DIMS} dims (..., rows, cols), got shape "
                            f"{tuple(X.shape)}.")
    return None


def _agree(comm: _Comm, fields: list[int], error: Error, what: str,
           describe: Callable[[list[int]], str]) -> list[list[int]]:
    """All-gather one int64 row per rank (``[error kind, *fields]``): every rank's ``fields``.

    When any rank found its input bad (``error``), every rank raises: the erring rank its own
    message, the others the same kind of error naming that rank and its input (``describe``).
    """
    kind = 0 if error is None else (1 if issubclass(error[0], TypeError) else 2)
    row = torch.tensor([kind, *fields], dtype=torch.int64, device=comm.device)
    table = [r.tolist() for r in _collective("all_gather", row, comm, [("check", row.numel() * row.element_size())])]
    if error is not None:
        raise error[0](f"{error[1]} (On rank {comm.rank} of {comm.size}; every rank of the group raises with it.)")
    bad = [r for r, t in enumerate(table) if t[0]]
    if bad:
        r = bad[0]
        raise (TypeError if table[r][0] == 1 else ValueError)(
            f"{what}: rank {r} of {comm.size} rejected its input ({describe(table[r][1:])}); its own error says "
            "why. Every rank of the group raises with it, so none is left waiting in a collective."
        )
    return [t[1:] for t in table]


def _per_rank(values: Sequence[object]) -> str:
    return "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))


def _check_across(what: str, name: str, table: list[list[int]], at: int, layout: str, side: str) -> list[int]:
    """Check that a factor described at ``table[r][at:at + _WIDTH]`` fits together across ranks;
    return the local sizes of its outer dim per rank. The dtype and every dim must agree except
    the sharded one (``"shard"``: the outer dim, ``side`` rows or cols; ``"batch"``: the leading dims)."""
    described = [t[at:at + _WIDTH] for t in table]
    dtypes = [_dtype_of(f) for f in described]
    if len(set(dtypes)) > 1:
        raise TypeError(f"{what}: `{name}` must have one dtype on every rank; {_per_rank(dtypes)}.")
    shapes = [_shape_of(f) for f in described]
    outer = -2 if side == "rows" else -1
    if layout == "shard":
        keys = [s[:len(s) + outer] + s[len(s) + outer + 1:] for s in shapes]
        rule = f"every dim but its {'rows' if side == 'rows' else 'columns'}"
    elif layout == "replicate":
        keys, rule = shapes, "its whole shape"
    else:
        keys, rule = [s[-2:] for s in shapes], "its matrix dims"
    if len(set(keys)) > 1:
        raise ValueError(
            f"{what}: `{name}` ({layout!r}) must agree across ranks in {rule}; shapes {_per_rank(shapes)}. "
            "Only the sharded dim may differ between ranks (give the others the same sizes everywhere)."
        )
    return [s[outer] for s in shapes]


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
