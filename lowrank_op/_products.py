"""The small core of ``fm @ fm``, formed without underflow or overflow from unbalanced factors.

``(A1 B1) @ (A2 B2)`` is held as two factors around the core ``B1 @ A2``. When the factors carry
large opposite scales (``A1 * 1e200`` with ``B1 * 1e-200``), ``B1 @ A2`` can underflow to zero (or
overflow to inf) although every product of the chain is representable. Such a core is formed from
``B1`` and ``A2`` scaled by powers of two, which is exact, and the scale is given back to the one
new factor. Cores that come out safe as they are (nearly all) are kept as they are.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Pieces a power-of-two scale is applied in, so that each piece is a normal number of the dtype
#: (a scale is at most about twice the dtype's exponent range).
_PIECES = 4


def _exponent(X: Tensor) -> int:
    """The binary exponent of ``max |X|``, or 0 when that is zero, inf or NaN or ``X`` is empty
    (nothing to balance; NaN and inf then propagate as they would). Synchronises with the device."""
    if X.numel() == 0:
        return 0
    amax = float(torch.linalg.vector_norm(X, ord=float("inf")))
    return math.frexp(amax)[1] if math.isfinite(amax) and amax > 0 else 0


def scale_pow2(X: Tensor, k: int) -> Tensor:
    """``X * 2^k``, exact short of the result's own underflow, applied in pieces that the dtype holds."""
    if k == 0:
        return X
    piece = k // _PIECES
    out = X * math.ldexp(1.0, k - (_PIECES - 1) * piece)
    for _ in range(_PIECES - 1):
        out = out * math.ldexp(1.0, piece)
    return out


def _safe(core: Tensor, inner: int) -> bool:
    """Whether ``core``, a sum of ``inner`` products, came out as accurate as its inputs: finite,
    and its largest entry at least ``4 inner tiny``, so that products lost below the normal range
    (each off by at most ``tiny eps``) cost less than ``eps`` relative to it. A core that underflowed
    (to zero or subnormals) or overflowed (to inf, or NaN from inf - inf) is not."""
    if core.numel() == 0:
        return True
    amax = float(torch.linalg.vector_norm(core, ord=float("inf")))
    return math.isfinite(amax) and amax >= 4 * max(inner, 1) * torch.finfo(core.dtype).tiny


def balanced_core(B1: Tensor, A2: Tensor) -> tuple[Tensor, int]:
    """``(core, k)`` with ``core * 2^k == B1 @ A2`` (as exactly as the product's rounding allows).

    ``core`` is ``B1 @ A2`` itself (``k = 0``) when that came out safe (:func:`_safe`, checked on
    the small core); otherwise it is formed again from ``B1`` and ``A2`` each scaled so that its
    largest entry is about 1, and ``k`` is the power of two to give back to whichever factor
    multiplies ``core``. The check costs one pass over the ``mdim x mdim`` core and a
    synchronisation with the device; the second product is needed only for extreme scales (or a
    core that is exactly zero, or not finite because the factors are not).
    """
    core = B1 @ A2
    if _safe(core, B1.shape[-1]):
        return core, 0
    eB, eA = _exponent(B1), _exponent(A2)
    return scale_pow2(B1, -eB) @ scale_pow2(A2, -eA), eB + eA
