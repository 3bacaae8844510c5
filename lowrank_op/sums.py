"""Factors of sums that stay factored: ``A1 @ B1 + A2 @ B2`` and ``A @ B + t`` for a number or tensor ``t``.

Pure tensor functions behind :meth:`FactoredMatrix.__add__` / ``__sub__`` / ``__radd__`` /
``__rsub__`` and :meth:`FactoredMatrix.sum`:

* :func:`concat_factors`: ``A1 @ B1 + A2 @ B2 = [A1, A2] @ [B1; B2]``, exact, inner dims add.
* :func:`tensor_term_factors`: a number or a tensor that broadcasts to the product's shape, as
  factors ``P``, ``Q``, so that ``fm + x`` is one FactoredMatrix and every later solve, determinant
  and decomposition is the factored one, right for non-symmetric products. A scalar, row or column
  is a rank-one term (inner dim ``mdim + 1``); a full tensor ``T`` is ``T @ I`` (or ``I @ T``).
  linear_operator would instead make ``fm + t`` a ``SumLinearOperator`` whose ``solve`` and
  ``logdet`` assume a symmetric positive definite sum, silently wrong for a non-symmetric
  ``A @ B``.
* :func:`sum_entries`, :func:`sum_rows`, :func:`sum_columns`, :func:`sum_batch_factors`: the sums
  of linear_operator's ``LinearOperator.sum`` contract, from the factors.

No operator classes here (:mod:`lowrank_op.factored` wraps the results).
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from lowrank_op._checks import check_broadcast
from lowrank_op.kernels import promote


def concat_factors(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``A1 @ B1 + A2 @ B2``: ``([A1, A2], [B1; B2])``, inner dim ``mdim1 + mdim2``.

    Leading dims broadcast separately among the left and the right factors (so a factor shared by
    all batch members stays shared); dtypes promote as in ``+``. Cost: one copy of each factor.
    """
    dtype = torch.promote_types(A1.dtype, A2.dtype)
    lead_a = torch.broadcast_shapes(A1.shape[:-2], A2.shape[:-2])
    lead_b = torch.broadcast_shapes(B1.shape[:-2], B2.shape[:-2])
    A = torch.cat([A1.to(dtype).expand(*lead_a, *A1.shape[-2:]), A2.to(dtype).expand(*lead_a, *A2.shape[-2:])], -1)
    B = torch.cat([B1.to(dtype).expand(*lead_b, *B1.shape[-2:]), B2.to(dtype).expand(*lead_b, *B2.shape[-2:])], -2)
    return A, B


def tensor_term_factors(
    other: object, shape: torch.Size, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor] | None:
    """Factors ``P``, ``Q`` with ``P @ Q`` = ``other`` broadcast to ``shape``; None when ``other`` is
    neither a number nor a Tensor.

    Parameters
    ----------
    other : number or Tensor
        A Python number (not bool); or a Tensor of ``dtype`` whose shape broadcasts to ``shape``.
    shape : torch.Size
        The product's shape ``(..., ldim, rdim)``.
    dtype, device
        The product's.

    Returns
    -------
    P : Tensor, shape (..., ldim, r)
    Q : Tensor, shape (..., r, rdim)
        ``r = 1`` for a number, a ``()``/``(1,)``/``(..., 1, 1)`` tensor (``c 1 1^T``), a row
        ``(rdim,)``/``(..., 1, rdim)`` (``1 r^T``) or a column ``(..., ldim, 1)`` (``c 1^T``): cost
        ``O(ldim + rdim)``. A full ``(..., ldim, rdim)`` tensor ``T`` gives ``([T], [I])`` with
        ``r = rdim`` when ``rdim <= ldim``, else ``([I], [T])`` with ``r = ldim``: exact, ``r^2`` more
        memory (the identity), and the sum's later decompositions cost as for inner dim
        ``mdim + r``. Gradients flow to ``other``.

    Raises
    ------
    TypeError
        A tensor of another dtype, or a complex number for a real product.
    ValueError
        A tensor whose shape does not broadcast to ``shape``, or on another device.

    Examples
    --------
    >>> P, Q = tensor_term_factors(torch.arange(3.0), torch.Size((2, 3)), torch.float32, torch.device("cpu"))
    >>> P @ Q  # the row, broadcast to (2, 3)
    tensor([[0., 1., 2.],
            [0., 1., 2.]])
    """
    ldim, rdim = shape[-2], shape[-1]
    if isinstance(other, numbers.Number) and not isinstance(other, bool):
        if isinstance(other, complex) and not dtype.is_complex:
            raise TypeError(
                f"cannot add the complex number {other!r} to a FactoredMatrix of dtype {dtype}; "
                "convert the FactoredMatrix first, e.g. FactoredMatrix(A.to(torch.complex128), B.to(torch.complex128))."
            )
        other = torch.tensor(other, dtype=dtype, device=device)
    elif not isinstance(other, Tensor):
        return None
    if other.dtype != dtype:
        raise TypeError(
            f"dtypes differ in a sum: FactoredMatrix of dtype {dtype} and tensor of dtype {other.dtype}; "
            f"cast the tensor with .to({dtype}) (or pass a Python number)."
        )
    if other.device != torch.device(device):
        raise ValueError(
            f"devices differ in a sum: FactoredMatrix on {device} and tensor on {other.device}; move "
            f"the tensor with .to({str(device)!r})."
        )
    t = other
    if t.dim() <= 1:
        if t.dim() == 1 and t.shape[0] not in (1, rdim):
            raise ValueError(
                f"shapes do not match for a sum: FactoredMatrix of shape {tuple(shape)} and tensor of "
                f"shape {tuple(t.shape)}; a 1-D tensor is a row and must have {rdim} entries (or 1)."
            )
        t = t.reshape(1, -1)  # () and (1,) become (1, 1); (rdim,) a row
    rows, cols = t.shape[-2:]
    if rows not in (1, ldim) or cols not in (1, rdim):
        raise ValueError(
            f"shapes do not match for a sum: FactoredMatrix of shape {tuple(shape)} and tensor of "
            f"shape {tuple(other.shape)}; the tensor's last two dims must broadcast to ({ldim}, {rdim})."
        )
    check_broadcast("FactoredMatrix", shape, "tensor", t.shape)
    lead = t.shape[:-2]
    ones_col = torch.ones(ldim, 1, dtype=dtype, device=device)
    ones_row = torch.ones(1, rdim, dtype=dtype, device=device)
    if rows == 1 and cols == 1:  # a (batch of) scalar(s): c 1 1^T
        return t.expand(*lead, ldim, 1), ones_row
    if rows == 1:  # a row: 1 r^T
        return ones_col, t
    if cols == 1:  # a column: c 1^T
        return t, ones_row
    if rdim <= ldim:  # a full tensor: T I (or I T), the smaller identity
        return t, torch.eye(rdim, dtype=dtype, device=device)
    return torch.eye(ldim, dtype=dtype, device=device), t


# --- LinearOperator.sum ---------------------------------------------------------------------------
def sum_entries(A: Tensor, B: Tensor) -> Tensor:
    """``sum_batch 1^T A B 1``: every entry of the (broadcast) product, shape ``()``; ``O((ldim + rdim) mdim)``.

    Computed in float32 for 16-bit factors and returned in their dtype.
    """
    dtype = A.dtype
    A, B = promote(A, B)
    return (A.sum(-2) * B.sum(-1)).sum(-1).sum().to(dtype)


def sum_rows(A: Tensor, B: Tensor) -> Tensor:
    """``(1^T A) B``, the sum over the rows (``dim=-2``), shape ``(..., rdim)``; ``O((ldim + rdim) mdim)``."""
    dtype = A.dtype
    A, B = promote(A, B)
    return (A.sum(-2).unsqueeze(-2) @ B).squeeze(-2).to(dtype)


def sum_columns(A: Tensor, B: Tensor) -> Tensor:
    """``A (B 1)``, the sum over the columns (``dim=-1``), shape ``(..., ldim)``; ``O((ldim + rdim) mdim)``."""
    dtype = A.dtype
    A, B = promote(A, B)
    return (A @ B.sum(-1).unsqueeze(-1)).squeeze(-1).to(dtype)


def sum_batch_factors(A: Tensor, B: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Factors of ``sum_i A_i @ B_i`` over batch dim ``dim`` of ``A`` and ``B``.

    ``A`` ``(..., ldim, mdim)`` and ``B`` ``(..., mdim, rdim)`` must have the same number of dims
    (size 1 where broadcast) and ``0 <= dim < A.dim() - 2``. Where only one factor varies along
    ``dim`` it is summed (``sum_i A_i B = (sum_i A_i) B``: inner dim unchanged); where both do, the
    blocks are concatenated along the inner dim (inner dim ``k mdim`` for ``k`` members). Exact;
    cost one pass over the factors.
    """
    ka, kb = A.shape[dim], B.shape[dim]
    if ka == 1 and kb == 1:
        return A.squeeze(dim), B.squeeze(dim)
    if kb == 1:
        return A.sum(dim), B.squeeze(dim)
    if ka == 1:
        return A.squeeze(dim), B.sum(dim)
    A = A.movedim(dim, -2)  # (..., ldim, k, mdim)
    B = B.movedim(dim, -3)  # (..., k, mdim, rdim)
    return A.reshape(*A.shape[:-2], -1), B.reshape(*B.shape[:-3], -1, B.shape[-1])
