"""What ``fm[index]`` means, and how an index is applied to the two factors.

TransformerLens's meaning, made complete: the index applies to the leading dims as torch applies it
(ints, slices, lists, integer and boolean tensors, NumPy integers and arrays, ``None``, ``True``,
``...``), and to the row and column dims *independently*: an int keeps its dim (a size-1 slice), a
list, 1-D integer tensor or 1-D mask picks rows (or columns), and picks on both dims give the outer
(sub-matrix) selection. The result is the FactoredMatrix ``(A[lead][..., rows, :], B[lead][..., :,
cols])``; nothing of size ``ldim x rdim`` is formed. Three cases give Tensors instead: ``None`` at or
after the row dim (the dense block, with the new dims); a 2-D mask over the row and column dims; and
an integer tensor of two or more dims (an index grid) on the row or column dim together with another
index tensor (on the other matrix dim or a leading dim), which broadcast against each other. The
last two pick entries, as in torch (and as linear_operator's internals expect: its pivoted
Cholesky indexes operators with such grids).

Index kinds follow torch: a 0-dim bool or uint8 tensor is a mask that adds a dim (size 1 or 0), a
uint8 tensor of more dims is a mask, int64 and int32 tensors are integer indices, other integer
tensors of 1 dim or more are refused (0-dim ones are integers), ``[]`` selects nothing.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class BoolScalar:
    """A 0-dim boolean index (``True``, ``torch.tensor(False)``): consumes no dim and adds one of
    size 1 (True) or 0 (False), as in torch."""

    value: bool


@dataclass(frozen=True)
class _Mask:
    """A boolean mask of ``dim()`` dims, replaced by that many integer index tensors."""

    mask: Tensor


@dataclass
class IndexPlan:
    """An index split into what the factors need.

    ``lead`` applies (as torch applies it) to the leading dims of both factors; ``row`` picks rows
    of ``A``, ``col`` columns of ``B``. ``between`` and ``after`` count the ``None`` dims to insert
    between the row and column dims and after the column dim (a dense result). ``entries`` is set
    instead when a mask spans the row and column dims: linear_operator's meaning (torch's), as an
    index with only ints, slices and integer tensors, applied after ``new_dims`` unsqueezes.
    """

    lead: tuple = ()
    row: slice | Tensor | None = None
    col: slice | Tensor | None = None
    between: int = 0
    after: int = 0
    entries: tuple | None = None
    new_dims: tuple[int, ...] = ()


_INTEGER_TENSOR_DTYPES = (torch.int64, torch.int32)
_SUPPORTED = "ints, slices, lists, integer or boolean tensors and arrays, `...`, `None` or `True`/`False`"


def _from_tensor(item: Tensor):
    if item.dim() == 0:
        if item.dtype in (torch.bool, torch.uint8):
            return BoolScalar(bool(item))
        if item.dtype.is_floating_point or item.dtype.is_complex:
            raise IndexError(f"tensor indices must be integers or booleans, got a 0-dim {item.dtype} tensor.")
        return int(item)
    if item.dtype in (torch.bool, torch.uint8):
        return _Mask(item.bool())
    if item.dtype in _INTEGER_TENSOR_DTYPES:
        return item.long()
    if item.dtype.is_floating_point or item.dtype.is_complex:
        raise IndexError(f"tensor indices must be integers or booleans, got {item.dtype}.")
    raise IndexError(
        f"index tensors must be int64, int32, uint8 or bool (as in torch), got {item.dtype}; convert "
        "the index with `idx.long()`."
    )


def _from_array(item: np.ndarray):
    if item.dtype == np.bool_ or item.dtype == np.uint8:
        return _from_tensor(torch.from_numpy(np.ascontiguousarray(item)))
    if item.dtype.kind in "iu":
        return _from_tensor(torch.from_numpy(item.astype(np.int64)))
    raise IndexError(f"array indices must be integers or booleans, got dtype {item.dtype}.")


def _from_sequence(item: list | tuple | range):
    if isinstance(item, range):
        return torch.arange(item.start, item.stop, item.step)
    if len(item) == 0:
        return torch.empty(0, dtype=torch.int64)
    try:
        as_tensor = torch.as_tensor(item)
    except (TypeError, ValueError, RuntimeError):
        raise IndexError(
            f"a list index must hold only integers or only booleans (nested lists for more dims), got "
            f"{item!r}."
        ) from None
    return _from_tensor(as_tensor)


def _convert(item: object):
    """One index item as None, Ellipsis, BoolScalar, int, slice, int64 Tensor or _Mask (index tensors
    stay on their device: torch takes host indices for tensors on any device)."""
    if item is None or item is Ellipsis:
        return item
    if isinstance(item, bool):
        return BoolScalar(item)
    if isinstance(item, slice):
        if item.step is not None and operator.index(item.step) <= 0:
            raise ValueError(f"slice steps must be positive (as in torch), got {item.step}; use `.flip()` to reverse.")
        return item
    if isinstance(item, Tensor):
        return _from_tensor(item)
    if isinstance(item, np.ndarray):
        return _from_array(item) if item.ndim else _convert(item.item())
    if isinstance(item, np.bool_):
        return BoolScalar(bool(item))
    if isinstance(item, (list, tuple, range)):
        return _from_sequence(item)
    if isinstance(item, float) or not hasattr(item, "__index__"):
        raise IndexError(f"unsupported index type {type(item).__name__}; use {_SUPPORTED}.")
    return operator.index(item)  # int, NumPy integers


def _consumed(item: object) -> int:
    if item is None or item is Ellipsis or isinstance(item, BoolScalar):
        return 0
    return item.mask.dim() if isinstance(item, _Mask) else 1


def _expand(index: object, shape: torch.Size) -> list[tuple[object, int, int]]:
    """The index as ``(item, dim, mask_id)`` triples: masks split into one integer tensor per dim,
    ``...`` filled, missing trailing dims padded; ``dim`` is the dim of ``shape`` an item applies to
    (for None and BoolScalar, the dim before which they stand); ``mask_id`` groups a mask's parts."""
    items = [_convert(item) for item in (index if isinstance(index, tuple) else (index,))]
    if sum(item is Ellipsis for item in items) > 1:
        raise IndexError("an index can only have a single ellipsis ('...').")
    used = sum(_consumed(item) for item in items)
    if used > len(shape):
        raise IndexError(
            f"too many indices for a FactoredMatrix of shape {tuple(shape)}: {used} dims were indexed, "
            f"it has {len(shape)}."
        )
    fill = [slice(None)] * (len(shape) - used)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = fill
    else:
        items.extend(fill)

    out: list[tuple[object, int, int]] = []
    dim = 0
    for mask_id, item in enumerate(items):
        if isinstance(item, _Mask):
            mask = item.mask
            if tuple(mask.shape) != tuple(shape[dim : dim + mask.dim()]):
                raise IndexError(
                    f"the shape of the mask {tuple(mask.shape)} does not match the shape "
                    f"{tuple(shape[dim : dim + mask.dim()])} of dims {dim} to {dim + mask.dim() - 1}."
                )
            for part in mask.nonzero().unbind(-1):
                out.append((part, dim, mask_id))
                dim += 1
            continue
        if isinstance(item, int):
            if not -shape[dim] <= item < shape[dim]:
                raise IndexError(f"index {item} is out of range for dim {dim} of size {shape[dim]}.")
            item = item % shape[dim]
        elif isinstance(item, Tensor) and item.numel():
            if bool(((item < -shape[dim]) | (item >= shape[dim])).any()):
                raise IndexError(f"index {item.tolist()} is out of range for dim {dim} of size {shape[dim]}.")
        out.append((item, dim, -1))
        dim += _consumed(item)
    return out


def plan(index: object, shape: torch.Size) -> IndexPlan:
    """Parse ``index`` for a FactoredMatrix of ``shape``; see the module docstring for the meaning."""
    entries = _expand(index, shape)
    row_dim = len(shape) - 2
    p = next(i for i, (item, dim, _) in enumerate(entries) if dim == row_dim and _consumed(item))
    q = next(i for i, (item, dim, _) in enumerate(entries) if dim == row_dim + 1 and _consumed(item))
    (row, _, row_mask), (col, _, col_mask) = entries[p], entries[q]
    if row_mask >= 0 and row_mask == col_mask:  # one 2-D mask over the rows and the columns
        return _entries_plan(entries, p)

    grids = [item for item in (row, col) if isinstance(item, Tensor) and item.dim() >= 2]
    tensors = [item for item, _, _ in entries[:p] + [entries[p], entries[q]] if isinstance(item, Tensor)]
    if grids and len(tensors) >= 2:
        # Index grids (as linear_operator's own internals build them, e.g. for pivoted Cholesky)
        # broadcast against the other index tensors and pick entries, as in torch.
        return _entries_plan(entries, p)
    lead_masks = {mask for _, _, mask in entries[:p] if mask >= 0}
    for name, item, mask in (("row", row, row_mask), ("column", col, col_mask)):
        if mask >= 0 and mask in lead_masks:
            raise IndexError(
                f"a boolean mask over leading dims and the {name} dim cannot be held as two factors; "
                "index the leading dims and the matrix dims separately, or form the matrix with `.AB`."
            )
        if isinstance(item, Tensor) and item.dim() != 1:
            raise IndexError(
                f"a tensor index on the {name} dim of a FactoredMatrix must be 1-D (rows and columns "
                f"are picked independently), got shape {tuple(item.shape)}; index with `idx.reshape(-1)` "
                "and reshape the result, or form the matrix with `.AB`."
            )
    for item, _, _ in entries[p + 1 :]:
        if isinstance(item, BoolScalar):
            raise IndexError(
                "a boolean scalar index (`True`/`False`) can only stand among the leading dims of a "
                "FactoredMatrix; use `None` to add a dim to the dense result."
            )
    _check_lead_broadcast([item for item, _, _ in entries[:p]])
    return IndexPlan(
        lead=tuple(item for item, _, _ in entries[:p]),
        row=_as_slice(row),
        col=_as_slice(col),
        between=q - p - 1,
        after=len(entries) - q - 1,
    )


def _check_lead_broadcast(lead: list) -> None:
    """Index tensors on leading dims broadcast together, as in torch (a boolean scalar counts as a
    tensor of shape ``(1,)`` or ``(0,)``); IndexError where they do not."""
    shapes = [tuple(item.shape) for item in lead if isinstance(item, Tensor)]
    if not shapes:
        return
    shapes += [(int(item.value),) for item in lead if isinstance(item, BoolScalar)]
    try:
        torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise IndexError(
            f"index tensors on the leading dims must broadcast together (as in torch); got shapes "
            f"{', '.join(str(shape) for shape in shapes)}."
        ) from None


def _as_slice(item: object) -> slice | Tensor:
    return slice(item, item + 1) if isinstance(item, int) else item


def _entries_plan(entries: list, row_position: int) -> IndexPlan:
    """linear_operator's (torch's) meaning, for a mask over the row and column dims: the entries."""
    new_dims, index = [], []
    for position, (item, _, _) in enumerate(entries):
        if isinstance(item, BoolScalar):
            raise IndexError("a boolean scalar index cannot be combined with a mask over the row and column dims.")
        if item is None:
            if position > row_position:
                raise IndexError("`None` cannot follow a mask over the row and column dims.")
            new_dims.append(len(index))
            index.append(slice(None))
        else:
            index.append(item)
    return IndexPlan(entries=tuple(index), new_dims=tuple(new_dims))


def _aligned_index(X: Tensor, full_shape: torch.Size, lead: tuple) -> tuple:
    """``lead`` adjusted for a factor ``X`` whose leading dims are size 1 where ``full_shape`` (the
    broadcast leading shape) is not: there ints become 0, slices ``:`` and integer tensors zeros of
    as many dims, so the factor is not copied along dims it is shared over."""
    out, dim = [], 0
    for item in lead:
        if item is None or isinstance(item, BoolScalar):
            out.append(item if item is None else item.value)
            continue
        if X.shape[dim] == 1 and full_shape[dim] != 1:
            if isinstance(item, int):
                item = 0
            elif isinstance(item, slice):
                item = slice(None)
            else:
                item = item.new_zeros((1,) * item.dim())
        out.append(item)
        dim += 1
    return tuple(out)


def index_factors(A: Tensor, B: Tensor, lead: tuple, row: slice | Tensor, col: slice | Tensor) -> tuple[Tensor, Tensor]:
    """``(A[lead][..., row, :], B[lead][..., :, col])`` for factors with the same number of leading
    dims (size 1 where broadcast), without expanding either along the dims it is shared over."""
    A, B = index_chain((A, B), lead, row, col)
    return A, B


def index_chain(factors: tuple[Tensor, ...], lead: tuple, row: slice | Tensor, col: slice | Tensor) -> tuple[Tensor, ...]:
    """:func:`index_factors` for a chain of factors ``F_0 F_1 ... F_k`` (all with the same number
    of leading dims, size 1 where broadcast): ``lead`` indexes every factor's leading dims, ``row``
    the rows of ``F_0`` and ``col`` the columns of ``F_k``; none is expanded along a dim it is
    shared over."""
    full = torch.broadcast_shapes(*(F.shape[:-2] for F in factors))
    if lead:
        factors = tuple(F[(*_aligned_index(F, full, lead), slice(None), slice(None))] for F in factors)
    # Rows and columns apart from the leading dims: their index tensors do not broadcast with those.
    first, *middle, last = factors
    return (first[..., row, :], *middle, last[..., :, col])
