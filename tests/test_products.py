"""Products of factors: ``fm @ fm`` (an OuterFactoredMatrix around the small core, formed from rescaled
factors at extreme, opposite scales) and ``fold_matmul`` against ``torch.matmul``."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_scaled_close, dense, make_factors, tol
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_op import FactoredMatrix, _products, choices
from lowrank_op._products import balanced_core, fold_matmul, scale_pow2
from lowrank_op.outer_factored import OuterFactoredMatrix

EPS32, EPS64 = torch.finfo(torch.float32).eps, torch.finfo(torch.float64).eps


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


# --- fold_matmul: torch.matmul's values and shape, broadcast dims folded into one GEMM ------------
@st.composite
def matmul_operands(draw):
    """``(X, Y)`` that torch.matmul accepts: 1..4 leading dims broadcast in any pattern (a size in
    both operands, or in one and 1 or nothing in the other, sizes 1 to 3), inner sizes 1 to 4, a
    size 0 now and then, and views that are not contiguous (transposed, strided, expanded,
    permuted)."""
    batch = draw(st.lists(st.integers(1, 3), min_size=1, max_size=4))
    n, k, r = (draw(st.integers(1, 4)) for _ in range(3))
    empty = draw(st.sampled_from([None] * 6 + ["batch", "inner"]))  # a size 0 in a quarter of the cases
    if empty == "batch" and batch:
        batch[draw(st.integers(0, len(batch) - 1))] = 0
    elif empty is not None:
        zero = draw(st.integers(0, 2))
        n, k, r = (0 if i == zero else size for i, size in enumerate((n, k, r)))
    owners = [draw(st.sampled_from(["both", "x", "y", "x", "y"])) for _ in batch]  # who has each dim
    x_lead = [b if owner != "y" else 1 for b, owner in zip(batch, owners)]
    y_lead = [b if owner != "x" else 1 for b, owner in zip(batch, owners)]
    x_lead = x_lead[draw(st.sampled_from([0, 0, 0, len(x_lead)])):]  # or no leading dims at all
    y_lead = y_lead[draw(st.sampled_from([0, 0, 0, len(y_lead)])):]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return _layout(draw, (*x_lead, n, k), gen), _layout(draw, (*y_lead, k, r), gen)


def _layout(draw, shape, gen):
    kind = draw(st.sampled_from(["contiguous", "transposed", "strided", "expanded", "permuted"]))
    if kind == "transposed":
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=torch.float64, generator=gen).mT
    if kind == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1], dtype=torch.float64, generator=gen)[..., ::2]
    if kind == "expanded" and any(size > 1 for size in shape[:-2]):
        d = next(d for d, size in enumerate(shape[:-2]) if size > 1)  # stride 0 there, as FactoredMatrix.A
        return torch.randn(*shape[:d], 1, *shape[d + 1:], dtype=torch.float64, generator=gen).expand(shape)
    if kind == "permuted" and len(shape) > 3:
        return torch.randn(shape[1], shape[0], *shape[2:], dtype=torch.float64, generator=gen).transpose(0, 1)
    return torch.randn(shape, dtype=torch.float64, generator=gen)


@settings(max_examples=200)
@given(operands=matmul_operands())
def test_fold_matmul_matches_torch(operands):
    X, Y = operands
    expected = torch.matmul(X, Y)
    got = fold_matmul(X, Y)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=8 * X.shape[-1] * EPS64, atol=8 * X.shape[-1] * EPS64)


@pytest.mark.parametrize("x_shape, y_shape", [
    ((2, 3, 4), (3, 4, 5)), ((2, 1, 3, 4), (3, 1, 4, 5)),  # leading dims that do not broadcast
    ((3, 4), (5, 2)), ((2, 1, 3, 4), (1, 5, 5, 2)), ((2, 3, 4), (1, 5, 2)),  # inner sizes that differ
])
def test_fold_matmul_refuses_what_torch_refuses(x_shape, y_shape):
    X, Y = torch.randn(x_shape), torch.randn(y_shape)
    with pytest.raises(RuntimeError):
        torch.matmul(X, Y)
    with pytest.raises(RuntimeError):
        fold_matmul(X, Y)


def test_fold_matmul_chains_fold_without_copies():
    # The pairing of composition scores: C = (L, H, 1, 1) x (1, 1, L, H) is one GEMM; R_L @ C and
    # C @ R_Y then fold C's own dims (a view of the GEMM's output) into one GEMM per shared head.
    gen = torch.Generator().manual_seed(0)
    B1 = torch.randn(3, 2, 1, 1, 4, 9, dtype=torch.float64, generator=gen)
    A2 = torch.randn(1, 1, 3, 2, 9, 5, dtype=torch.float64, generator=gen)
    R_L = torch.randn(3, 2, 1, 1, 4, 4, dtype=torch.float64, generator=gen)
    R_Y = torch.randn(1, 1, 3, 2, 5, 5, dtype=torch.float64, generator=gen)
    C = fold_matmul(B1, A2)
    torch.testing.assert_close(C, B1 @ A2)
    X = fold_matmul(R_L, C)
    torch.testing.assert_close(X, R_L @ (B1 @ A2))
    assert X.untyped_storage().nbytes() == X.numel() * X.element_size()  # no expanded copy behind it
    torch.testing.assert_close(fold_matmul(X, R_Y), R_L @ (B1 @ A2) @ R_Y)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_exponent_and_safe_on_permuted_views(bad):
    C = fold_matmul(torch.randn(2, 1, 3, 4, dtype=torch.float64), torch.randn(1, 2, 4, 3, dtype=torch.float64))
    assert not C.is_contiguous()
    assert _products._amax(C) == float(C.abs().max())
    C = C.clone()
    C[1, 0, 2, 1] = bad
    assert not _products._safe(C, 4)
    assert _products._exponent(C) == 0


# --- fm1 @ fm2: an OuterFactoredMatrix with the small core as its own factor ----------------------
OUTER_PAIRS = {
    # (fm1 A, fm1 B), (fm2 A, fm2 B): fm1.rdim == fm2.ldim
    "m2_le_m1": (((7, 4), (4, 9)), ((9, 3), (3, 8))),
    "m2_gt_m1": (((7, 3), (3, 9)), ((9, 4), (4, 8))),
    "pairs_of_heads": (((3, 2, 1, 1, 7, 3), (3, 2, 1, 1, 3, 9)), ((1, 1, 2, 2, 9, 3), (1, 1, 2, 2, 3, 8))),
    "broadcast_factors": (((2, 1, 7, 3), (3, 9)), ((9, 4), (4, 4, 8))),
    "mdim_gt_ldim": (((3, 5), (5, 9)), ((9, 6), (6, 2))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.complex64])
@pytest.mark.parametrize("pair", OUTER_PAIRS.values(), ids=OUTER_PAIRS.keys())
def test_fm_matmul_fm_is_outer_factored(pair, dtype):
    (a1, b1), (a2, b2) = pair
    fm1 = FactoredMatrix(*make_factors(a1, b1, dtype, seed=1))
    fm2 = FactoredMatrix(*make_factors(a2, b2, dtype, seed=2))
    product = fm1 @ fm2
    assert isinstance(product, OuterFactoredMatrix)
    D1, D2 = dense(fm1.A, fm1.B), dense(fm2.A, fm2.B)
    expected = D1 @ D2
    scale = torch.linalg.matrix_norm(D1) * torch.linalg.matrix_norm(D2)
    rt = tol(dtype)
    assert product.shape == expected.shape and product.dtype == dtype
    assert product.mdim == min(fm1.mdim, fm2.mdim)
    assert product.A.shape == (*expected.shape[:-2], expected.shape[-2], product.mdim)
    assert product.B.shape == (*expected.shape[:-2], product.mdim, expected.shape[-1])
    assert_scaled_close(dense(product.A, product.B), expected, scale, rt, "A @ B")
    assert_scaled_close(product.AB, expected, scale, rt, "AB")
    assert_scaled_close(product.norm(), torch.linalg.matrix_norm(expected), scale, rt, "norm")
    k = min(product.ldim, product.mdim, product.rdim)
    assert_scaled_close(product.S, torch.linalg.svdvals(expected)[..., :k], scale, rt, "S")


def test_fm_matmul_fm_narrow_middle_is_plain():
    # fm1.rdim below both inner dims: the dense products are the smaller factors.
    fm1 = FactoredMatrix(*make_factors((6, 5), (5, 2)))
    fm2 = FactoredMatrix(*make_factors((2, 5), (5, 7), seed=1))
    product = fm1 @ fm2
    assert type(product) is FactoredMatrix and product.mdim == 2
    torch.testing.assert_close(product.to_dense(), fm1.to_dense() @ fm2.to_dense())


@pytest.mark.parametrize("e", [-45, 45])
def test_shared_core_norm_out_of_range(e):
    # Outer factors scaled by 2^e: the formed core's entries are about 2^(2e) (float32 holds them),
    # their squares are not (they underflow or overflow); the norm is scaled back exactly.
    (A1, B1), (A2, B2) = make_factors((2, 1, 9, 3), (2, 1, 3, 8), torch.float32, seed=1), \
        make_factors((1, 3, 8, 3), (1, 3, 3, 9), torch.float32, seed=2)
    scaled = FactoredMatrix(A1 * 2.0**e, B1) @ FactoredMatrix(A2, B2 * 2.0**e)
    with choices.recorded() as log:
        norm = scaled.norm()
    assert ("norm", "formed") in {(c.operation, c.method) for c in log}
    expected = torch.linalg.matrix_norm(dense(A1, B1) @ dense(A2, B2))
    assert bool(torch.isfinite(norm).all())
    torch.testing.assert_close(norm.double() * 2.0 ** (-2 * e), expected, rtol=64 * EPS32, atol=0)
