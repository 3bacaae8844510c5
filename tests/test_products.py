"""``fm @ fm`` with factors of extreme, opposite scales: the core is formed from rescaled factors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_scaled_close, dense, make_factors

from lowrank_op import FactoredMatrix
from lowrank_op._products import balanced_core, scale_pow2


def _scaled_pair(a_shape, b_shape, e_a, e_b, dtype, seed):
    """Factors ``(A 2^e_a, B 2^e_b)`` and the unscaled ``(A, B)``: powers of two, so exact."""
    A, B = make_factors(a_shape, b_shape, dtype, seed=seed)
    return (torch.ldexp(A, torch.tensor(e_a)), torch.ldexp(B, torch.tensor(e_b))), (A, B)


@pytest.mark.parametrize(
    "dtype, e",
    [(torch.float64, 660), (torch.float64, -660), (torch.float32, 75), (torch.complex128, 600), (torch.bfloat16, 100)],
)
@pytest.mark.parametrize(
    "shapes",
    [
        (((5, 3), (3, 6)), ((6, 4), (4, 7))),  # the core stays m1 x m2, other.mdim > self.mdim
        (((5, 4), (4, 6)), ((6, 2), (2, 7))),  # other.mdim <= self.mdim
        (((2, 1, 5, 3), (3, 6)), ((6, 3), (4, 3, 7))),  # broadcast leading dims
    ],
)
def test_unbalanced_factors(shapes, dtype, e):
    # fm1 = (A1 2^e, B1 2^-e) and fm2 = (A2 2^-e, B2 2^e): B1 @ A2 alone is 2^-2e times a
    # representable number, which underflows (or overflows), but each product is representable.
    (a1, b1), (a2, b2) = shapes
    (A1, B1), (A1u, B1u) = _scaled_pair(a1, b1, e, -e, dtype, 0)
    (A2, B2), (A2u, B2u) = _scaled_pair(a2, b2, -e, e, dtype, 1)
    product = FactoredMatrix(A1, B1) @ FactoredMatrix(A2, B2)
    assert isinstance(product, FactoredMatrix)
    assert product.mdim == min(a1[-1], b1[-1], b2[-2])
    expected = dense(A1u, B1u) @ dense(A2u, B2u)  # the same value, from the unscaled factors
    got = dense(product._A, product._B)
    assert bool(torch.isfinite(got).all())
    # Backward-error scale of A1 (B1 A2) B2; a zero (underflowed) result misses by about 10% of it.
    norm = lambda X: torch.linalg.matrix_norm(X.to(expected.dtype))  # noqa: E731
    scale = norm(A1u) * norm(dense(B1u, A2u)) * norm(B2u)
    eps = torch.finfo(dtype).eps
    assert_scaled_close(got, expected, scale, 4 * eps, "unbalanced product")


@pytest.mark.parametrize("e", [0, 300, -300, -515, 600, -600])
def test_balanced_core(e):
    # Safe cores are B1 @ A2 itself (k = 0, nothing copied); others are rescaled, and give it back.
    B1, A2 = make_factors((4, 6), (6, 3), torch.float64, seed=3)
    core, k = balanced_core(torch.ldexp(B1, torch.tensor(e)), torch.ldexp(A2, torch.tensor(e)))
    assert (k == 0) == (abs(e) <= 500)
    expected = B1 @ A2  # times 2^(2e), which may not be representable
    torch.testing.assert_close(scale_pow2(core, k - 2 * e), expected, rtol=4 * torch.finfo(torch.float64).eps, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_factors_give_non_finite_products(bad):
    A, B = make_factors((5, 3), (3, 6), torch.float64)
    B = B.clone()
    B[0, 0] = bad
    product = FactoredMatrix(A, B) @ FactoredMatrix(*make_factors((6, 4), (4, 7), torch.float64, seed=1))
    reference = dense(A, B) @ dense(*make_factors((6, 4), (4, 7), torch.float64, seed=1))
    got = product.to_dense()
    assert torch.equal(torch.isnan(got), torch.isnan(reference)) or bool(torch.isnan(got).any())
    assert not bool(torch.isfinite(got).all())


@pytest.mark.parametrize("shapes", [(((0, 3), (3, 6)), ((6, 4), (4, 2))), (((5, 3), (3, 6)), ((6, 0), (0, 2)))])
def test_empty_factors(shapes):
    (a1, b1), (a2, b2) = shapes
    left, right = FactoredMatrix(*make_factors(a1, b1)), FactoredMatrix(*make_factors(a2, b2, seed=1))
    product = left @ right
    torch.testing.assert_close(product.to_dense(), left.to_dense() @ right.to_dense())
