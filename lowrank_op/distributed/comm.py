"""The collectives of :mod:`lowrank_op.distributed`, and what checks their inputs.

The one wrapper every collective goes through, with its byte counting (:class:`ByteCounter`,
:func:`count_bytes`; the convention per collective is in the package docstring); packing of named
tensors into one flat buffer, and gather, broadcast and all-reduce of them; the process group and
the device buffers travel on; DTensor unwrapping (layouts); and the shape agreement: one small
all-gather of fixed-size int64 rows, so that bad input on any rank makes every rank raise together.
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

from lowrank_op import kernels

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
