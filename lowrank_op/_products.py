"""Products of factors: batched products that fold broadcast dims into one GEMM, and the small
core of ``fm @ fm``, formed without underflow or overflow from unbalanced factors.

``fold_matmul(X, Y)`` equals ``X @ Y``. Where a leading dim is broadcast (size 1) in one operand
only, torch expands the other operand's partner along it and runs one small product per batch
member: pairing every head with every head, ``(L, H, 1, 1, 64, 768) @ (1, 1, L, H, 768, 64)``,
copies both operands 144 times (4 GB each at GPT-2 small's shapes) and took 3.8 s here on a quiet
machine (12.8 s with other processes on the cores). Folding those dims into the rows of ``X``
and the columns of ``Y`` makes it one ``(L H 64) x 768 x (L H 64)`` GEMM, 0.7 s. Its output is
returned as a permuted view, laid out so that a later product with a factor of either side's
heads (``R_L (L, H, 1, 1, 64, 64) @ C``, ``C @ R_Y (1, 1, L, H, 64, 64)``) folds the other
side's dims without a copy: one ``64 x 64 x (L H 64)`` GEMM per head instead of an expanded copy
and one small product per pair.

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


def _in_memory_order(X: Tensor) -> Tensor:
    """The elements of ``X`` as a 1-D view in memory order when ``X`` is dense (a permuted view of
    a contiguous tensor, as :func:`fold_matmul` returns), else ``X`` itself; for reductions whose
    value does not depend on the order (a maximum), which then read memory once, in order."""
    order = sorted(range(X.dim()), key=lambda d: X.stride(d), reverse=True)
    Y = X.permute(order)
    return Y.view(-1) if Y.is_contiguous() else X


def _amax(X: Tensor) -> float:
    """``max |X|`` as a Python float (NaN when ``X`` holds one, 0 when empty); synchronises with
    the device. Real ``X`` by ``torch.aminmax``: one vectorised pass without a temporary, about
    ten times faster on CPU than ``vector_norm(ord=inf)`` (which the complex case uses)."""
    X = _in_memory_order(X.detach())
    if X.numel() == 0:
        return 0.0
    if X.is_complex():
        return float(torch.linalg.vector_norm(X, ord=float("inf")))
    low, high = torch.aminmax(X)
    return float(torch.maximum(-low, high))  # NaN propagates


def _exponent(X: Tensor) -> int:
    """The binary exponent of ``max |X|``, or 0 when that is zero, inf or NaN or ``X`` is empty
    (nothing to balance; NaN and inf then propagate as they would). Synchronises with the device."""
    if X.numel() == 0:
        return 0
    amax = _amax(X)
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
    amax = _amax(core)
    return math.isfinite(amax) and amax >= 4 * max(inner, 1) * torch.finfo(core.dtype).tiny


def _folded(T: Tensor, order: list[int], shape: list[int]) -> Tensor | None:
    """``T.permute(order)`` reshaped to ``shape`` if that is a view (no copy), else None."""
    try:
        return T.permute(order).view(shape)
    except RuntimeError:
        return None


def fold_matmul(X: Tensor, Y: Tensor) -> Tensor:
    """``X @ Y`` (``X`` (..., n, k), ``Y`` (..., k, r), leading dims broadcast), with the dims
    broadcast in one operand only folded into the product instead of expanded.

    A leading dim of size 1 in ``Y`` but not in ``X`` joins ``X``'s rows; one of size 1 in ``X``
    but not in ``Y`` joins ``Y``'s columns; dims both have stay batch dims. When only one operand
    has dims of its own (``R (L, H, 1, 1, p, p) @ C (L, H, L, H, p, m)``), they are folded only
    when that operand's folded layout is a view of it (as for ``C``, the output of an earlier
    fold): one GEMM per batch member of the shared dims instead of one per pair. The result has
    ``torch.matmul``'s shape and values, up to rounding: a permuted view of the GEMM's output,
    whose layout a further ``fold_matmul`` folds without a copy. Sizes that do not broadcast
    raise torch's ``RuntimeError``.

    Cost: the multiply-adds of ``X @ Y``, without copying either operand along the other's dims
    (with dims on both sides, an operand whose folded layout is not a view is copied once, at its
    own size).
    """
    if X.dim() < 3 and Y.dim() < 3:
        return X @ Y
    nb = max(X.dim(), Y.dim()) - 2
    X = X.reshape((1,) * (nb + 2 - X.dim()) + X.shape)
    Y = Y.reshape((1,) * (nb + 2 - Y.dim()) + Y.shape)
    xs, ys = X.shape[:nb], Y.shape[:nb]
    both = [d for d in range(nb) if xs[d] != 1 and ys[d] != 1]
    x_only = [d for d in range(nb) if xs[d] != 1 and ys[d] == 1]
    y_only = [d for d in range(nb) if xs[d] == 1 and ys[d] != 1]
    if not x_only and not y_only:
        return X @ Y  # batch dims only: torch's own batching copies nothing extra
    out_batch = torch.broadcast_shapes(xs, ys)  # the error torch would give for sizes that do not broadcast
    n, k, r = X.shape[-2], X.shape[-1], Y.shape[-1]
    sizes = lambda dims, shape: [shape[d] for d in dims]  # noqa: E731
    # Each operand's size-1 dims go first (the view drops them), then the batch dims both have.
    ones_x = [d for d in range(nb) if d not in both and d not in x_only]
    ones_y = [d for d in range(nb) if d not in both and d not in y_only]
    rows, cols = math.prod(sizes(x_only, xs)) * n, math.prod(sizes(y_only, ys)) * r
    x_order, x_shape = [*ones_x, *both, *x_only, nb, nb + 1], [*sizes(both, xs), rows, k]
    y_order, y_shape = [*ones_y, *both, nb, *y_only, nb + 1], [*sizes(both, ys), k, cols]
    Xf, Yf = _folded(X, x_order, x_shape), _folded(Y, y_order, y_shape)
    if not (x_only and y_only) and (Xf if x_only else Yf) is None:
        # One side only, and its operand would have to be copied to fold: torch's batching (one
        # product per batch member) is left to it, as it is when nothing is to be folded.
        return X @ Y
    Xf = X.permute(x_order).reshape(x_shape) if Xf is None else Xf
    Yf = Y.permute(y_order).reshape(y_shape) if Yf is None else Yf
    Z = (Xf @ Yf).view(*sizes(both, xs), *sizes(x_only, xs), n, *sizes(y_only, ys), r)
    # Z's dims: both, x_only, n, y_only, r; put the batch dims back in order (size 1 where neither has one).
    nb_z = len(both) + len(x_only)
    position = {d: i for i, d in enumerate(both + x_only)}
    position.update({d: nb_z + 1 + i for i, d in enumerate(y_only)})
    order = [position[d] for d in range(nb) if d in position] + [nb_z, Z.dim() - 1]
    Z = Z.permute(order)
    out_shape = [*out_batch, n, r]
    return Z.reshape(out_shape) if Z.dim() != len(out_shape) else Z


def balanced_core(B1: Tensor, A2: Tensor) -> tuple[Tensor, int]:
    """``(core, k)`` with ``core * 2^k == B1 @ A2`` (as exactly as the product's rounding allows).

    ``core`` is ``B1 @ A2`` itself (``k = 0``) when that came out safe (:func:`_safe`, checked on
    the small core); otherwise it is formed again from ``B1`` and ``A2`` each scaled so that its
    largest entry is about 1, and ``k`` is the power of two to give back to whichever factor
    multiplies ``core``. The check costs one pass over the ``mdim x mdim`` core and a
    synchronisation with the device; the second product is needed only for extreme scales (or a
    core that is exactly zero, or not finite because the factors are not).
    """
    core = fold_matmul(B1, A2)
    if _safe(core, B1.shape[-1]):
        return core, 0
    eB, eA = _exponent(B1), _exponent(A2)
    return fold_matmul(scale_pow2(B1, -eB), scale_pow2(A2, -eA)), eB + eA
