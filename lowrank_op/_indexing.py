"""Index normalisation for FactoredMatrix: bounds, ``None``, ``...`` and lists, before indexing.

linear_operator's ``__getitem__`` handles ints, slices, tensors and one ``...``; this module turns
everything else a torch user writes into that form, or raises ``IndexError`` where torch would, and
where the result could not be held as two factors (a multi-dim tensor index on the rows or the
columns alone).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _as_index_tensor(item: Sequence | Tensor, size: int, dim: int) -> Tensor:
    index = item if isinstance(item, Tensor) else torch.as_tensor(item)
    if index.dtype == torch.bool:
        raise IndexError(
            f"boolean masks are not supported as indices (dim {dim}); pass `mask.nonzero().squeeze(-1)`."
        )
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise IndexError(f"tensor indices must be integers, got {index.dtype} at dim {dim}.")
    if index.numel() and bool(((index < -size) | (index >= size)).any()):
        raise IndexError(
            f"index {index.tolist()} is out of range for dim {dim} of size {size}."
        )
    return index.long()


def _check_int(item: int, size: int, dim: int) -> int:
    """Bounds-check an int index and make it non-negative (linear_operator turns a row or column
    int ``i`` into ``slice(i, i + 1)``, which is empty for ``i = -1``)."""
    if not -size <= item < size:
        raise IndexError(f"index {item} is out of range for dim {dim} of size {size}.")
    return item + size if item < 0 else item


def normalize_index(index: object, shape: torch.Size) -> tuple[tuple[int, ...], tuple]:
    """Split an index into the dims ``None`` inserts and a None-free index linear_operator takes.

    Returns
    -------
    new_dims : tuple of int
        Positions at which to unsqueeze the operator (in order) before applying ``index``.
    index : tuple
        Ints, slices, integer tensors; no ``None``, no lists, at most ``len(shape)`` entries.
    """
    items = index if isinstance(index, tuple) else (index,)
    n_ellipsis = sum(item is Ellipsis for item in items)
    if n_ellipsis > 1:
        raise IndexError("an index can only have a single ellipsis ('...').")
    n_real = sum(item is not None and item is not Ellipsis for item in items)
    if n_real > len(shape):
        raise IndexError(
            f"too many indices for a FactoredMatrix of shape {tuple(shape)}: {n_real} were given, "
            f"it has {len(shape)} dims."
        )
    fill = [slice(None)] * (len(shape) - n_real)
    expanded: list = []
    for item in items:
        expanded.extend(fill if item is Ellipsis else [item])
    if not n_ellipsis:
        expanded.extend(fill)

    new_dims: list[int] = []
    out: list = []
    dim = 0  # dim of the (progressively unsqueezed) operator this entry applies to
    batch_ndim = len(shape) - 2
    for item in expanded:
        if item is None:
            if dim > batch_ndim + len(new_dims):
                raise IndexError(
                    "`None` can only add leading (batch) dims to a FactoredMatrix, not dims between "
                    "or after its last two (matrix) dims."
                )
            new_dims.append(dim)
            out.append(slice(None))
        else:
            size = shape[dim - len(new_dims)]
            if isinstance(item, Tensor) and item.dim() == 0 and not item.dtype.is_floating_point:
                item = int(item)
            if isinstance(item, bool):
                raise IndexError("boolean indices are not supported; use integers.")
            if isinstance(item, int):
                out.append(_check_int(item, size, dim - len(new_dims)))
            elif isinstance(item, slice):
                out.append(item)
            elif isinstance(item, (Tensor, list, range)):
                out.append(_as_index_tensor(list(item) if isinstance(item, range) else item, size, dim - len(new_dims)))
            else:
                raise IndexError(
                    f"unsupported index type {type(item).__name__}; use ints, slices, lists, integer "
                    "tensors, `...` or `None`."
                )
        dim += 1
    _check_matrix_tensor_indices(out)
    return tuple(new_dims), tuple(out)


def _check_matrix_tensor_indices(index: list) -> None:
    """Reject a multi-dim tensor index on the row or column dim unless it selects elements.

    A tensor on the rows (or columns) alone keeps the matrix form, and a multi-dim one would put its
    extra dims between the batch and matrix dims (or after them), which two factors cannot hold.
    With tensors on both rows and columns, or on a batch dim too, elements are gathered instead and
    any tensor shape is fine.
    """
    *batch, row, col = index
    on_matrix = [isinstance(item, Tensor) for item in (row, col)]
    if all(on_matrix) or (any(on_matrix) and any(isinstance(item, Tensor) for item in batch)):
        return
    for name, item in (("row", row), ("column", col)):
        if isinstance(item, Tensor) and item.dim() > 1:
            raise IndexError(
                f"a tensor index on the {name} dim of a FactoredMatrix must be 1-D, got shape "
                f"{tuple(item.shape)}; index with `idx.reshape(-1)` and reshape the result, or form "
                "the matrix with `.AB`."
            )
