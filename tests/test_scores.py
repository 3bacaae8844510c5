"""composition_scores against dense float64 scores for every pair of leading indices."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import dense, make_factors, scale_of, tol
from hypothesis import given
from hypothesis import strategies as st

from lowrank_op import FactoredMatrix, choices, composition_scores, shared_bases


def dense_score(L: torch.Tensor, R: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(L @ R) / (torch.linalg.matrix_norm(L) * torch.linalg.matrix_norm(R)))


#: Every method for pairing every left matrix with every right one (``broadcast_dims=True``).
METHODS = ("auto", "gram", "product")


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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pair", PAIRS.values(), ids=PAIRS.keys())
def test_composition_scores_broadcast_dims(pair, dtype, method):
    left = fm_of(*pair[0], dtype, seed=1)
    right = fm_of(*pair[1], dtype, seed=2)
    scores = composition_scores(left, right, method=method)
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


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype, delta, rel", [(torch.float64, 1e-7, 1e-6), (torch.float32, 1e-3, 1e-3)])
def test_composition_scores_small_scores_are_accurate(dtype, delta, rel, method):
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
    with choices.recorded() as log:
        score = composition_scores(left, right, method=method)
    assert float(score) == pytest.approx(expected, rel=rel)
    if method == "gram":  # the Gram sum cancels here: its certificate fails and the pair is computed directly
        assert ("composition_pairs", "direct") in {(c.operation, c.method) for c in log}


# --- Every pair of heads: fm1 @ fm2 keeps the small core, the norm goes through shared bases ------
EPS = {torch.float32: torch.finfo(torch.float32).eps, torch.float64: torch.finfo(torch.float64).eps,
       torch.complex64: torch.finfo(torch.float32).eps, torch.complex128: torch.finfo(torch.float64).eps,
       # 16-bit factors are decomposed in float32 from their exact values
       torch.bfloat16: torch.finfo(torch.float32).eps, torch.float16: torch.finfo(torch.float32).eps}


def dense_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> torch.Tensor:
    """TransformerLens's definition on the formed products, in float64: ``|L R|_F / (|L|_F |R|_F)``."""
    L, R = dense(left.A, left.B), dense(right.A, right.B)
    if broadcast_dims:
        n_left, n_right = L.dim() - 2, R.dim() - 2
        L = L.reshape(*L.shape[:-2], *(1,) * n_right, *L.shape[-2:])
        R = R.reshape(*(1,) * n_left, *R.shape)
    norm = torch.linalg.matrix_norm
    return norm(L @ R) / (norm(L) * norm(R))


def score_bound(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> torch.Tensor:
    """An absolute error bound from eps: each norm is backward stable, off by ``O(eps)`` times the
    product of its factors' norms, so a score is off by ``O(eps) rho_L rho_R`` with
    ``rho = |A|_F |B|_F / |A B|_F`` (>= 1) on each side."""
    norm = torch.linalg.matrix_norm
    rho = [scale_of(fm.A, fm.B) / norm(dense(fm.A, fm.B)) for fm in (left, right)]
    if broadcast_dims:
        rho[0] = rho[0].reshape((*rho[0].shape, *(1,) * rho[1].dim()))
    return 8 * EPS[left.dtype] * rho[0] * rho[1]


def assert_scores(scores: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    assert scores.shape == expected.shape and not scores.dtype.is_complex
    err = (scores.double() - expected).abs()
    assert bool((err <= bound).all()), f"worst error {float((err / bound).max()):.3g} x the bound"


# left: (A shape, B shape), right: (A shape, B shape), optional rank of both A factors.
HEAD_PAIRS = {
    # right.mdim <= left.mdim: L = left.A outer, core, right.B shared by every left head (reduced)
    "heads_m2_le_m1": (((2, 3, 10, 4), (2, 3, 4, 9)), ((3, 9, 3), (3, 3, 10)), None),
    # right.mdim > left.mdim: left.A shared by every right head (reduced), core, R = right.B outer
    "heads_m2_gt_m1": (((2, 2, 10, 3), (2, 2, 3, 9)), ((3, 9, 4), (3, 4, 10)), None),
    "gpt2_like": (((2, 2, 12, 4), (2, 2, 4, 12)), ((2, 2, 12, 4), (2, 2, 4, 12)), None),
    "mdim_gt_ldim": (((2, 3, 5), (2, 5, 8)), ((3, 8, 6), (3, 6, 4)), None),
    "rank_deficient": (((2, 3, 10, 4), (2, 3, 4, 9)), ((3, 9, 4), (3, 4, 10)), 2),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("pair", HEAD_PAIRS.values(), ids=HEAD_PAIRS.keys())
def test_composition_scores_pairs_of_heads(pair, dtype, method):
    (a1, b1), (a2, b2), rank = pair
    left = FactoredMatrix(*make_factors(a1, b1, dtype, rank=rank, seed=1))
    right = FactoredMatrix(*make_factors(a2, b2, dtype, rank=rank, seed=2))
    with choices.recorded() as log:
        scores = composition_scores(left, right, method=method)
    assert_scores(scores, dense_scores(left, right), score_bound(left, right))
    chosen = {c.method for c in log if c.operation == "composition"}  # "auto" records its choice
    assert len(chosen) == (1 if method == "auto" else 0)
    if len(a1) > 3 and "gram" not in chosen | {method}:  # heads of both: the product's norm took the shared-basis path
        assert ("norm", "formed") in {(c.operation, c.method) for c in log}


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_composition_scores_no_broadcast_dims_shared_right(dtype):
    # right's leading dims broadcast against left's: right.B is shared by both left layers.
    left = FactoredMatrix(*make_factors((2, 3, 10, 4), (2, 3, 4, 9), dtype, seed=1))
    right = FactoredMatrix(*make_factors((1, 3, 9, 3), (1, 3, 3, 10), dtype, seed=2))
    scores = composition_scores(left, right, broadcast_dims=False)
    assert_scores(scores, dense_scores(left, right, False), score_bound(left, right, False))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_composition_scores_zero_head(side, method):
    # A head whose W_O (or W_Q) is zero: its scores are 0 / 0, NaN as in TransformerLens and the
    # dense definition; every other pair is unaffected.
    A1, B1 = make_factors((2, 3, 10, 4), (2, 3, 4, 9), torch.float32, seed=1)
    A2, B2 = make_factors((3, 9, 4), (3, 4, 10), torch.float32, seed=2)
    if side == "left":
        B1 = B1.clone()
        B1[1, 2] = 0
    else:
        A2 = A2.clone()
        A2[0] = 0
    left, right = FactoredMatrix(A1, B1), FactoredMatrix(A2, B2)
    scores, expected = composition_scores(left, right, method=method), dense_scores(left, right)
    zero = torch.isnan(expected)
    assert bool(zero.any()) and torch.equal(torch.isnan(scores), zero)
    bound = score_bound(left, right)
    assert bool(((scores.double() - expected).abs()[~zero] <= bound.expand_as(expected)[~zero]).all())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("a_lead, b_lead", [((0, 2), (3,)), ((2,), (0, 3))])
def test_composition_scores_empty_leading_dims(a_lead, b_lead, method):
    left = FactoredMatrix(*make_factors((*a_lead, 6, 3), (*a_lead, 3, 5), torch.float32, seed=1))
    right = FactoredMatrix(*make_factors((*b_lead, 5, 2), (*b_lead, 2, 6), torch.float32, seed=2))
    scores = composition_scores(left, right, method=method)
    assert scores.shape == (*a_lead, *b_lead)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("empty", ["mdim", "k"])
def test_composition_scores_empty_inner_dim(empty, method):
    # mdim 0 or k 0: every product is zero, every score 0 / 0 (NaN), as for the dense definition.
    if empty == "mdim":
        left = FactoredMatrix(torch.randn(2, 5, 0), torch.randn(2, 0, 6))
        right = FactoredMatrix(*make_factors((3, 6, 2), (3, 2, 5), torch.float32))
    else:
        left = FactoredMatrix(torch.randn(2, 5, 3), torch.randn(2, 3, 0))
        right = FactoredMatrix(torch.randn(3, 0, 2), torch.randn(3, 2, 5))
    scores = composition_scores(left, right, method=method)
    assert scores.shape == (2, 3) and bool(torch.isnan(scores).all())
    assert bool(torch.isnan(dense_scores(left, right)).all())


def test_composition_scores_gradient():
    # First-order exact through the bases (their Q held constant): gradcheck in float64.
    A1, B1 = make_factors((2, 1, 8, 3), (2, 1, 3, 7), torch.float64, seed=1)
    A2, B2 = make_factors((1, 2, 7, 3), (1, 2, 3, 8), torch.float64, seed=2)
    leaves = [X.clone().requires_grad_() for X in (A1, B1, A2, B2)]

    def scores(*factors):
        return composition_scores(FactoredMatrix(*factors[:2]), FactoredMatrix(*factors[2:]), broadcast_dims=False)

    assert torch.autograd.gradcheck(scores, leaves)


@pytest.mark.parametrize("pair", ["heads_m2_le_m1", "heads_m2_gt_m1"])
def test_composition_scores_chunked(pair, monkeypatch):
    # The formed reduced cores are normed in chunks of the batch (a few MB each at full size);
    # chunks of a matrix or two give the same scores as the whole batch at once.
    (a1, b1), (a2, b2), _ = HEAD_PAIRS[pair]
    left = FactoredMatrix(*make_factors(a1, b1, torch.float64, seed=1))
    right = FactoredMatrix(*make_factors(a2, b2, torch.float64, seed=2))
    whole = composition_scores(left, right)
    monkeypatch.setattr(shared_bases, "_CHUNK_BYTES", 40 * 8)  # 40 float64 entries
    chunked = composition_scores(left, right)
    torch.testing.assert_close(chunked, whole, rtol=16 * EPS[torch.float64], atol=0)
    assert_scores(chunked, dense_scores(left, right), score_bound(left, right))


# --- method="gram" and the "auto" rule --------------------------------------------------------
def gpt2_like(n_heads: int = 16, d_model: int = 64, d_head: int = 32, dtype=torch.float32, seed: int = 0):
    """``(OV, QK)`` of ``n_heads`` heads; at the default shapes "gram" needs fewer multiply-adds."""
    gen = torch.Generator().manual_seed(seed)
    W = [0.02 * torch.randn(n_heads, d_model, d_head, generator=gen, dtype=torch.float64) for _ in range(3)]
    W_O = 0.02 * torch.randn(n_heads, d_head, d_model, generator=gen, dtype=torch.float64)
    W_Q, W_K, W_V = (X.to(dtype) for X in W)
    return FactoredMatrix(W_V, W_O.to(dtype)), FactoredMatrix(W_Q, W_K.mT)


def outer_pair():
    """An OuterFactoredMatrix (``OV @ W``, rdim 60) and heads that read its 60 columns."""
    gen = torch.Generator().manual_seed(8)
    OV = FactoredMatrix(torch.randn(6, 48, 8, generator=gen), torch.randn(6, 8, 48, generator=gen))
    right = FactoredMatrix(torch.randn(6, 60, 8, generator=gen), torch.randn(6, 8, 60, generator=gen))
    return OV @ torch.randn(48, 60, generator=gen), right


def test_composition_scores_auto_rule():
    OV, QK = gpt2_like()
    with choices.recorded() as log:
        composition_scores(OV, QK)
    picked = [c for c in log if c.operation == "composition"]
    assert [c.method for c in picked] == ["gram"] and "multiply-adds" in picked[0].reason
    grad_OV = FactoredMatrix(OV.A.clone().requires_grad_(), OV.B)
    cases = {
        "a float64 result": (*gpt2_like(dtype=torch.float64), {}),
        "broadcast_dims=False": (OV, QK, {"broadcast_dims": False}),
        "a factor requires grad": (grad_OV, QK, {}),
        "OuterFactoredMatrix": (*outer_pair(), {}),
        "not fewer": (*gpt2_like(n_heads=1), {}),
    }
    for reason, (left, right, kwargs) in cases.items():
        with choices.recorded() as log:
            composition_scores(left, right, **kwargs)
        picked = [c for c in log if c.operation == "composition"]
        assert [c.method for c in picked] == ["product"] and reason in picked[0].reason, reason


def test_composition_scores_gram_on_outer_factored():
    # Explicit "gram" on an OuterFactoredMatrix forms its factors and gives the same scores.
    left, right = outer_pair()
    assert_scores(composition_scores(left, right, method="gram"), dense_scores(left, right), score_bound(left, right))


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64, torch.bfloat16])
def test_composition_scores_gram_equals_product(dtype):
    OV, QK = gpt2_like(dtype=torch.float32)
    OV = FactoredMatrix(OV.A.to(dtype), OV.B.to(dtype))
    QK = FactoredMatrix(QK.A.to(dtype), QK.B.to(dtype))
    gram, product = (composition_scores(OV, QK, method=m) for m in ("gram", "product"))
    assert gram.dtype == product.dtype == torch.float32
    assert_scores(gram, dense_scores(OV, QK), score_bound(OV, QK))
    torch.testing.assert_close(gram, product, rtol=64 * EPS[torch.float32], atol=0)


def test_composition_scores_gram_gradient():
    # Through the Gram route (its bases held constant, exact to first order), against the dense
    # float64 definition's gradient.
    OV, QK = gpt2_like(n_heads=3, d_model=12, d_head=3, dtype=torch.float32)
    leaves = [X.detach().clone().requires_grad_() for X in (OV.A, OV.B, QK.A, QK.B)]
    weights = torch.randn(3, 3, generator=torch.Generator().manual_seed(7))
    (composition_scores(FactoredMatrix(*leaves[:2]), FactoredMatrix(*leaves[2:]), method="gram") * weights).sum().backward()
    dense_leaves = [X.detach().double().requires_grad_() for X in leaves]
    L, R = dense_leaves[0] @ dense_leaves[1], dense_leaves[2] @ dense_leaves[3]
    norm = torch.linalg.matrix_norm
    dense = norm(L[:, None] @ R[None]) / (norm(L)[:, None] * norm(R)[None])
    (dense * weights.double()).sum().backward()
    for got, want in zip(leaves, dense_leaves):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-4 * float(want.grad.abs().max()))


def test_composition_scores_method_errors():
    OV, QK = gpt2_like()
    with pytest.raises(ValueError, match="`method` must be one of"):
        composition_scores(OV, QK, method="svd")
    with pytest.raises(ValueError, match="broadcast_dims=True"):
        composition_scores(OV, QK, broadcast_dims=False, method="gram")


@st.composite
def score_pairs(draw):
    """``(left A, left B), (right A, right B)`` shapes sharing ``k``, 0..2 leading dims per side
    (sizes 0..3, so empty batches too; each factor may hold a dim as 1), and a rank for the A
    factors or None. Any of ``ldim``, ``m1``, ``m2``, ``rdim`` may exceed ``k`` or be 1."""
    k = draw(st.integers(1, 7))
    ldim, m1, m2, rdim = (draw(st.integers(1, 7)) for _ in range(4))

    def leading():
        batch = draw(st.lists(st.integers(0, 3), max_size=2))
        return [draw(st.sampled_from([b, 1])) for b in batch], [draw(st.sampled_from([b, 1])) for b in batch]

    (la, lb), (ra, rb) = leading(), leading()
    rank = draw(st.sampled_from([None, 1]))
    return ((*la, ldim, m1), (*lb, m1, k)), ((*ra, k, m2), (*rb, m2, rdim)), rank, draw(st.integers(0, 2**31 - 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.bfloat16])
@given(spec=score_pairs(), method=st.sampled_from(METHODS))
def test_composition_scores_hypothesis(dtype, spec, method):
    (a1, b1), (a2, b2), rank, seed = spec
    left = FactoredMatrix(*make_factors(a1, b1, dtype, rank=rank, seed=seed))
    right = FactoredMatrix(*make_factors(a2, b2, dtype, rank=rank, seed=seed + 1))
    scores, expected = composition_scores(left, right, method=method), dense_scores(left, right)
    assert scores.shape == expected.shape and scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    undefined = torch.isnan(expected)  # 0 / 0 where a side's product is zero
    assert torch.equal(torch.isnan(scores), undefined)
    bound = score_bound(left, right).expand_as(expected)
    assert bool(((scores.double() - expected).abs()[~undefined] <= bound[~undefined]).all())
