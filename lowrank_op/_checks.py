"""Argument validation shared by the modules: errors that name the argument and say what to do.

Never ``assert``: these checks must survive ``python -O``.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

from lowrank_op.errors import (
    BroadcastError,
    DeviceMismatchError,
    DtypeMismatchError,
    PerformanceWarning,
    ShapeMismatchError,
)

#: What TransformerLens's ``TensorLike`` protocol asks of an object that stands in for a Tensor.
TENSOR_LIKE_MEMBERS = ("ndim", "shape", "size", "unsqueeze", "squeeze", "broadcast_to", "__matmul__")


def is_tensor_like(X: object) -> bool:
    """True for a duck-typed stand-in for a Tensor (TransformerLens's ``TensorLike`` protocol: the
    members in :data:`TENSOR_LIKE_MEMBERS`), False for Tensors, LinearOperators and NumPy arrays
    (which have no ``unsqueeze``)."""
    if isinstance(X, Tensor) or type(X).__module__.startswith("linear_operator"):
        return False
    return all(hasattr(X, member) for member in TENSOR_LIKE_MEMBERS)


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Raise ValueError unless ``value`` is one of ``allowed``, naming the set."""
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def check_factor(name: str, X: object) -> Tensor:
    """A factor must be a floating or complex tensor with at least 2 dims (or a TensorLike stand-in
    with at least 2 dims, whose dtype is its own business)."""
    if is_tensor_like(X):
        if X.ndim < 2:
            raise ValueError(
                f"`{name}` must have at least 2 dims (..., rows, cols), got shape {tuple(X.shape)}."
            )
        return X
    if not isinstance(X, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor, got {type(X).__name__}; convert it with "
            f"torch.as_tensor({name}, dtype=torch.float32)."
        )
    if not (X.dtype.is_floating_point or X.dtype.is_complex):
        raise TypeError(
            f"`{name}` must have a floating or complex dtype, got {X.dtype}; cast it with "
            f"{name}.float() (or .double())."
        )
    if X.dim() < 2:
        raise ValueError(
            f"`{name}` must have at least 2 dims (..., rows, cols), got shape {tuple(X.shape)}; "
            f"add a dim with {name}.unsqueeze(0) for a single row or unsqueeze(-1) for a column."
        )
    return X


BROADCAST_HINT = "index or unsqueeze one of them so they follow torch broadcasting rules."


def check_broadcast(
    left_name: str, left_shape: torch.Size, right_name: str, right_shape: torch.Size, hint: str = BROADCAST_HINT
) -> torch.Size:
    """The broadcast of two operands' leading dims (all but the last two).

    Raises :class:`~lowrank_op.errors.BroadcastError` (a ValueError and, as in TransformerLens, a
    RuntimeError) naming the first dim, from the right, where the sizes clash.
    """
    left, right = tuple(left_shape[:-2]), tuple(right_shape[:-2])
    for offset in range(1, min(len(left), len(right)) + 1):
        a, b = left[-offset], right[-offset]
        if a != b and a != 1 and b != 1:
            raise BroadcastError(
                f"leading dims do not broadcast: {left_name} of shape {tuple(left_shape)} and {right_name} "
                f"of shape {tuple(right_shape)} (sizes {a} and {b} mismatch at dim {-offset - 2}); {hint}"
            )
    return torch.Size(torch.broadcast_shapes(left, right))


def check_factors(A: object, B: object) -> torch.Size:
    """Validate the pair ``(A, B)`` and return the broadcast batch shape."""
    A = check_factor("A", A)
    B = check_factor("B", B)
    if A.shape[-1] != B.shape[-2]:
        raise ShapeMismatchError(
            f"inner dimensions differ: `A` of shape {tuple(A.shape)} has mdim {A.shape[-1]} columns but "
            f"`B` of shape {tuple(B.shape)} has {B.shape[-2]} rows; they must be equal."
        )
    if is_tensor_like(A) or is_tensor_like(B):
        return check_broadcast("`A`", A.shape, "`B`", B.shape)
    if A.dtype != B.dtype:
        raise DtypeMismatchError(
            f"`A` and `B` must have the same dtype, got A {A.dtype} and B {B.dtype}; cast one, "
            "e.g. B.to(A.dtype)."
        )
    if A.device != B.device:
        raise DeviceMismatchError(
            f"`A` and `B` must be on the same device, got A on {A.device} and B on {B.device}; "
            "move one with .to(device)."
        )
    return check_broadcast("`A`", A.shape, "`B`", B.shape)


def warn_off_host(X: Tensor, what: str, stacklevel: int = 3) -> None:
    """Warn once per call that ``what`` moves vectors between ``X``'s device and the host;
    ``stacklevel`` counts from this function (3: the caller of its caller)."""
    if X.device.type != "cpu":
        warnings.warn(
            f"{what} runs on the host: every operator application copies a vector from {X.device} "
            "to the host and back, and the host waits for the device each time. Use method='exact' "
            "(it runs on the device) or move the factors with .cpu() to avoid the round-trips.",
            PerformanceWarning,
            stacklevel=stacklevel,
        )


def as_scalar(name: str, value: object, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A Python number or one-element tensor as a 0-dim tensor of ``dtype``; else an error."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ShapeMismatchError(
                f"`{name}` must be a scalar, got a tensor of shape {tuple(value.shape)}. Use `@` for "
                "matrix products; for an elementwise product form the dense matrix with `.AB`."
            )
        value = value.reshape(())
    elif not isinstance(value, numbers.Number) or isinstance(value, bool):
        raise TypeError(f"`{name}` must be a number or a one-element tensor, got {type(value).__name__}.")
    if (torch.is_complex(value) if isinstance(value, Tensor) else isinstance(value, complex)) and not dtype.is_complex:
        raise TypeError(
            f"`{name}` is complex but the FactoredMatrix is {dtype}; convert it first with "
            ".to(torch.complex64) (or complex128)."
        )
    return torch.as_tensor(value, dtype=dtype, device=device)
