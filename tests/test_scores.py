"""composition_scores against dense float64 scores for every pair of leading indices."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import dense, make_factors, tol

from lowrank_op import FactoredMatrix, composition_scores


def dense_score(L: torch.Tensor, R: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(L @ R) / (torch.linalg.matrix_norm(L) * torch.linalg.matrix_norm(R)))


def fm_of(a_shape, b_shape, dtype, seed):
    return FactoredMatrix(*make_factors(a_shape, b_shape, dtype, seed=seed))


# left: (A shape, B shape), right: (A shape, B shape); k = 6 is left.rdim = right.ldim.
PAIRS = {
    "plain": (((5, 3), (3, 6)), ((6, 2), (2, 4))),
    "left_batched": (((2, 5, 3), (3, 6)), ((6, 2), (2, 4))),
    "right_batched": (((5, 3), (3, 6)), ((4, 6, 2), (2, 4))),
    "both_broadcast_factors": (((2, 1, 5, 3), (3, 3, 6)), ((4, 6, 7), (7, 4))),
    "mdim_large": (((2, 5, 9), (9, 6)), ((3, 1, 6, 8), (2, 8, 4))),
    "single_row_col": (((1, 3), (3, 6)), ((6, 1), (1, 1))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.bfloat16])
@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_composition_scores_broadcast_dims(pair, dtype):
    left = fm_of(*pair[0], dtype, seed=1)
    right = fm_of(*pair[1], dtype, seed=2)
    scores = composition_scores(left, right)
    L, R = dense(left.A, left.B), dense(right.A, right.B)
    lead_l, lead_r = L.shape[:-2], R.shape[:-2]
    assert scores.shape == (*lead_l, *lead_r)
    assert not scores.dtype.is_complex
    for i in itertools.product(*map(range, lead_l)):
        for j in itertools.product(*map(range, lead_r)):
            expected = dense_score(L[i], R[j])
            assert float(scores[i + j]) == pytest.approx(expected, rel=10 * tol(dtype), abs=10 * tol(dtype)), (i, j)
    assert bool((scores >= 0).all()) and bool((scores <= 1 + 10 * tol(dtype)).all())


BROADCAST_PAIRS = {
    "same_leading": (((2, 5, 3), (3, 6)), ((2, 6, 2), (2, 4))),
    "broadcast_leading": (((3, 1, 5, 3), (3, 6)), ((4, 6, 2), (2, 4))),
    "one_side_batched": (((5, 3), (3, 6)), ((2, 3, 6, 2), (2, 4))),
    "no_leading": (((5, 3), (3, 6)), ((6, 2), (2, 4))),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex64])
@pytest.mark.parametrize("pair", BROADCAST_PAIRS.values(), ids=BROADCAST_PAIRS.keys())
def test_composition_scores_no_broadcast_dims(pair, dtype):
    left = fm_of(*pair[0], dtype, seed=3)
    right = fm_of(*pair[1], dtype, seed=4)
    scores = composition_scores(left, right, broadcast_dims=False)
    L, R = dense(left.A, left.B), dense(right.A, right.B)
    lead = torch.broadcast_shapes(L.shape[:-2], R.shape[:-2])
    assert scores.shape == lead
    L, R = L.expand(*lead, *L.shape[-2:]), R.expand(*lead, *R.shape[-2:])
    for i in itertools.product(*map(range, lead)):
        assert float(scores[i]) == pytest.approx(dense_score(L[i], R[i]), rel=10 * tol(dtype), abs=10 * tol(dtype)), i


def test_composition_scores_match_transformer_lens_formula():
    # TransformerLens drops left's left and right's right orthogonal factors, which keeps all three
    # norms: collapse_l(left) @ collapse_r(right), norms of the dense pieces.
    left = fm_of((3, 8, 4), (4, 8), torch.float64, seed=5)
    right = fm_of((2, 8, 4), (4, 8), torch.float64, seed=6)
    scores = composition_scores(left, right)
    lc = left.unsqueeze(1).collapse_l()  # (3, 1, k, 8)
    rc = right.unsqueeze(0).collapse_r()  # (1, 2, 8, k)
    tl = torch.linalg.matrix_norm(lc @ rc) / torch.linalg.matrix_norm(lc) / torch.linalg.matrix_norm(rc)
    torch.testing.assert_close(scores, tl)


@pytest.mark.parametrize("dtype, delta, rel", [(torch.float64, 1e-7, 1e-6), (torch.float32, 1e-3, 1e-3)])
def test_composition_scores_small_scores_are_accurate(dtype, delta, rel):
    # left's rows nearly orthogonal to right's columns space: |L R| << |L| |R|.
    gen = torch.Generator().manual_seed(0)
    R_dense = torch.randn(8, 4, dtype=torch.float64, generator=gen)
    null = torch.linalg.svd(R_dense.mT).Vh[4:]  # rows orthogonal to range(R)
    L_dense = torch.randn(6, 4, dtype=torch.float64, generator=gen) @ null
    L_dense = L_dense + delta * torch.randn(6, 8, dtype=torch.float64, generator=gen)
    left = FactoredMatrix(L_dense.to(dtype), torch.eye(8, dtype=dtype))
    right = FactoredMatrix(torch.eye(8, dtype=dtype), R_dense.to(dtype))
    expected = dense_score(dense(left.A, left.B), dense(right.A, right.B))
    assert expected < 10 * delta
    assert float(composition_scores(left, right)) == pytest.approx(expected, rel=rel)
