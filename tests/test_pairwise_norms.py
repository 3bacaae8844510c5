"""lowrank_op.pairwise_norms: the row reduction, the Gram route's pair sums and their bound, the
certified fallback; against dense float64 and, for the bound, exact rational arithmetic."""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from helpers import make_factors, ref_dtype

from lowrank_op import _cache, pairwise_norms, settings


def dense_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    M = A.to(ref_dtype(A.dtype)) @ B.to(ref_dtype(B.dtype))
    return M.mH @ M


# (A shape, B shape, rank of A or None)
REDUCTIONS = {
    "tall": ((9, 4), (4, 7), None),
    "tall_batched": ((2, 3, 9, 4), (2, 3, 4, 7), None),
    "broadcast_A": ((9, 4), (3, 4, 7), None),
    "broadcast_B": ((2, 1, 9, 4), (1, 3, 4, 7), None),
    "wide_A": ((3, 5), (5, 7), None),  # n <= m: P = A B
    "square_A": ((4, 4), (4, 7), None),
    "rank_deficient": ((2, 9, 4), (2, 4, 7), 2),
    "single_column_k": ((9, 4), (4, 1), None),
    "single_row_A": ((1, 4), (4, 6), None),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128,
                                   torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", REDUCTIONS.values(), ids=REDUCTIONS.keys())
def test_row_reduction_keeps_the_gram_matrix(case, dtype):
    a_shape, b_shape, rank = case
    A, B = make_factors(a_shape, b_shape, dtype, rank=rank, seed=3)
    P = pairwise_norms.row_reduction(A, B)
    assert P.dtype == pairwise_norms.work_dtype(dtype)
    n, m = a_shape[-2:]
    assert P.shape[-2:] == (min(n, m), b_shape[-1])
    expected = dense_gram(A, B)
    scale = float(torch.linalg.matrix_norm(A.to(ref_dtype(dtype))).max() * torch.linalg.matrix_norm(B.to(ref_dtype(dtype))).max())
    eps = torch.finfo(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype.to_real()).eps
    torch.testing.assert_close(P.mH @ P, expected.expand_as(P.mH @ P), rtol=0, atol=64 * eps * scale**2)


def test_row_reduction_empty_and_nonfinite():
    A, B = torch.randn(0, 6, 3), torch.randn(0, 3, 5)
    assert pairwise_norms.row_reduction(A, B).shape == (0, 3, 5)
    A, B = torch.randn(2, 6, 3), torch.randn(2, 3, 5)
    A[1, 2, 0] = float("nan")
    P = pairwise_norms.row_reduction(A, B)
    assert bool(torch.isnan(P[1]).all()) and bool(torch.isfinite(P[0]).all())
    _cache.shared.clear()


@pytest.mark.parametrize("scale", [1e-25, 1e20])
def test_row_reduction_extreme_scales(scale):
    # A float32 product R @ B at these scales underflows or overflows: it runs in float64.
    A, B = make_factors((9, 4), (4, 7), torch.float32, seed=4)
    A, B = A * scale, B * scale
    P = pairwise_norms.row_reduction(A, B)
    expected = dense_gram(A, B)
    assert bool(torch.isfinite(P).all())
    torch.testing.assert_close(P.mH @ P, expected, rtol=1e-5, atol=0)


def test_row_reduction_gradient_matches_dense():
    A, B = make_factors((9, 4), (4, 7), torch.float64, rank=2, seed=5)
    A, B = A.requires_grad_(), B.requires_grad_()
    Z = torch.randn(7, 3, dtype=torch.float64)
    P = pairwise_norms.row_reduction(A, B)
    (torch.linalg.matrix_norm(P @ Z) ** 2).backward()
    A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
    (torch.linalg.matrix_norm(A2 @ B2 @ Z) ** 2).backward()
    torch.testing.assert_close(A.grad, A2.grad)
    torch.testing.assert_close(B.grad, B2.grad)


# --- The Gram route ------------------------------------------------------------------------------
def exact_sq_norm(P: torch.Tensor, Qt: torch.Tensor) -> Fraction:
    """``|P Qt^H|_F^2`` of two real float64 matrices in exact rational arithmetic."""
    p_rows = [[Fraction(float(x)) for x in row] for row in P.tolist()]
    q_rows = [[Fraction(float(x)) for x in row] for row in Qt.tolist()]
    return sum((sum(a * b for a, b in zip(r, s)) ** 2 for r in p_rows for s in q_rows), Fraction(0))


def cancelling(N_l=3, N_r=4, p=2, q=3, k=9, delta=1e-9, seed=0):
    """``P_i`` whose rows are within ``delta`` of the orthogonal complement of the ``Qt_j``'s rows,
    so ``|P_i Qt_j^H|`` is about ``delta |P_i| |Qt_j|`` and the Gram sum cancels."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=gen))[0]
    Qt = torch.randn(N_r, q, 4, dtype=torch.float64, generator=gen) @ basis[:, :4].mT
    P = torch.randn(N_l, p, k - 4, dtype=torch.float64, generator=gen) @ basis[:, 4:].mT
    return P + delta * torch.randn(N_l, p, k, dtype=torch.float64, generator=gen), Qt


@pytest.mark.parametrize("block", [1, 2, 4, 9, 16])
@pytest.mark.parametrize("delta", [1.0, 1e-4, 1e-9])
def test_gram_sums_within_their_bound_of_exact(block, delta):
    P, Qt = cancelling(delta=delta)
    sq_norms, bound = pairwise_norms.gram_pair_sq_norms(P, Qt, block=block)
    assert sq_norms.shape == bound.shape == (3, 4)
    for i, j in itertools.product(range(3), range(4)):
        exact = exact_sq_norm(P[i], Qt[j])
        err = abs(Fraction(float(sq_norms[i, j])) - exact)
        assert err <= Fraction(float(bound[i, j])), (i, j, float(err), float(bound[i, j]))
        # and the bound is not vacuous: it is far below the size of the data
        assert float(bound[i, j]) < 1e-12 * float(torch.linalg.matrix_norm(P[i]) ** 2 * torch.linalg.matrix_norm(Qt[j]) ** 2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("block", [1, 3, 5, 64])
def test_gram_sums_match_dense(dtype, block):
    gen = torch.Generator().manual_seed(1)
    P = torch.randn(3, 4, 10, dtype=dtype, generator=gen)
    Qt = torch.randn(5, 2, 10, dtype=dtype, generator=gen)
    with settings.pairwise_gram_block(block):
        sq_norms, _ = pairwise_norms.gram_pair_sq_norms(P, Qt)
    expected = torch.linalg.matrix_norm(P[:, None] @ Qt[None].mH) ** 2
    assert not sq_norms.dtype.is_complex
    torch.testing.assert_close(sq_norms, expected, rtol=1e-13, atol=0)


def test_certified_pairs_and_fallback():
    # With a float32 tolerance, pairs scoring about 1e-9 are not certified and are computed
    # directly; pairs of ordinary size are kept.
    P_small, Qt = cancelling(N_l=2, delta=1e-9, seed=2)
    P_big = torch.randn(2, 2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    P = torch.cat([P_small, P_big])
    norms, n_direct = pairwise_norms.pairwise_product_norms(P, Qt, tol=torch.finfo(torch.float32).eps)
    assert n_direct == 2 * Qt.shape[0]
    for i, j in itertools.product(range(4), range(Qt.shape[0])):
        exact = float(exact_sq_norm(P[i], Qt[j])) ** 0.5
        assert float(norms[i, j]) == pytest.approx(exact, rel=1e-7 if i >= 2 else 1e-12), (i, j)


def test_zero_and_nonfinite_pairs_fall_back():
    gen = torch.Generator().manual_seed(4)
    P = torch.randn(3, 2, 6, dtype=torch.float64, generator=gen)
    Qt = torch.randn(2, 2, 6, dtype=torch.float64, generator=gen)
    P[0] = 0
    P[2, 1, 3] = float("nan")
    norms, n_direct = pairwise_norms.pairwise_product_norms(P, Qt, tol=1e-7)
    assert n_direct == 4
    assert bool((norms[0] == 0).all()) and bool(torch.isnan(norms[2]).all())
    torch.testing.assert_close(norms[1], torch.linalg.matrix_norm(P[1] @ Qt.mH), rtol=1e-12, atol=0)


def test_direct_pair_norms_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(5)
    P = torch.randn(4, 3, 8, dtype=torch.float64, generator=gen)
    Qt = torch.randn(5, 2, 8, dtype=torch.float64, generator=gen)
    rows, cols = (t.flatten() for t in torch.meshgrid(torch.arange(4), torch.arange(5), indexing="ij"))
    whole = pairwise_norms.direct_pair_norms(P, Qt, rows, cols)
    monkeypatch.setattr(pairwise_norms, "DIRECT_CHUNK_BYTES", 1)  # one pair per chunk
    torch.testing.assert_close(pairwise_norms.direct_pair_norms(P, Qt, rows, cols), whole, rtol=0, atol=0)
    torch.testing.assert_close(whole, torch.linalg.matrix_norm(P[rows] @ Qt[cols].mH))
    assert pairwise_norms.direct_pair_norms(P, Qt, rows[:0], cols[:0]).shape == (0,)
