"""The small core of ``fm @ fm``, formed without underflow or overflow from unbalanced factors.

``(A1 B1) @ (A2 B2)`` is held as two factors around the core ``B1 @ A2``. When the factors carry
large opposite scales (``A1 * 1e200`` with ``B1 * 1e-200``), ``B1 @ A2`` can underflow to zero (or
overflow to inf) although every product of the chain is representable. The core is therefore formed
from ``B1`` and ``A2`` scaled by powers of two, which is exact, and the scale is given back to the
one new factor.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: Number of pieces a power-of-two scale is applied in, so that each piece ``2^(k/4)`` is a normal
#: number of the dtype (``|k|`` is at most about twice the dtype's exponent range).
_PIECES = 4


def _pow2(k: Tensor, dtype: torch.dtype) -> Tensor:
    """``2^k`` exactly, as a 0-dim tensor of the real dtype of ``dtype``, for an integer tensor ``k``
    in the normal range of that dtype (built from the exponent bits, not from ``exp2``)."""
    real = dtype.to_real() if dtype.is_complex else dtype
    if real == torch.float64:
        return ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    # float32, and 16-bit dtypes through float32 (every power of two used here is exact in them).
    return ((k.to(torch.int32) + 127) << 23).view(torch.float32).to(real)


def _exponent(X: Tensor) -> Tensor:
    """The binary exponent of ``max |X|`` (0-dim int32), or 0 when that is zero, inf, NaN or ``X`` is
    empty (nothing to balance, and NaN and inf then propagate as they would)."""
    if X.numel() == 0:
        return torch.zeros((), dtype=torch.int32, device=X.device)
    amax = torch.linalg.vector_norm(X, ord=float("inf"))
    if amax.dtype in (torch.float16, torch.bfloat16):
        amax = amax.float()
    _, exponent = torch.frexp(amax)
    usable = torch.isfinite(amax) & (amax > 0)
    return torch.where(usable, exponent, torch.zeros_like(exponent))


def scale_pow2(X: Tensor, k: Tensor) -> Tensor:
    """``X * 2^k``, exact (short of the result's own underflow), for an integer 0-dim tensor ``k``."""
    piece = torch.div(k, _PIECES, rounding_mode="floor")
    rest = k - (_PIECES - 1) * piece
    out = X * _pow2(rest, X.dtype)
    step = _pow2(piece, X.dtype)
    for _ in range(_PIECES - 1):
        out = out * step
    return out


def balanced_core(B1: Tensor, A2: Tensor) -> tuple[Tensor, Tensor]:
    """``(core, k)`` with ``core * 2^k == B1 @ A2`` exactly as the scaled factors allow.

    ``core`` is formed from ``B1`` and ``A2`` each scaled so that its largest entry is about 1;
    ``k`` (0-dim int32) is the power of two to give back to whichever factor multiplies ``core``.
    Costs two passes over ``B1`` and ``A2`` beside the product itself; no host synchronisation.
    """
    eB, eA = _exponent(B1), _exponent(A2)
    core = scale_pow2(B1, -eB) @ scale_pow2(A2, -eA)
    return core, eB + eA
