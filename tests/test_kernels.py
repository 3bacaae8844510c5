"""The kernels in lowrank_op.kernels against dense float64 references."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    ALL_DTYPES,
    NORM_METHODS,
    SHAPES,
    SQUARE_SHAPES,
    SVD_METHODS,
    assert_orthonormal,
    assert_scaled_close,
    check_svd,
    dense,
    dense_eigenvalues_padded,
    factor_specs,
    make_factors,
    match_multiset,
    out_dtype,
    real_dtype,
    ref_dtype,
    scale_of,
    tol,
    with_condition,
)
from hypothesis import given
from hypothesis import strategies as st

from lowrank_op import choices, kernels, settings


def methods(log, operation="orthogonalize"):
    """The methods an ``"auto"`` rule recorded for ``operation``, in order."""
    return [c.method for c in log if c.operation == operation]


def cancelling_factors(dtype: torch.dtype, delta: float, seed: int = 0):
    """``A`` (6, 10) and ``B`` (10, 40) whose columns lie within ``delta`` of the null space of ``A``:
    ``|A B|`` is about ``delta |A| |B|``, so the terms of the Gram formula cancel."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(6, 10, dtype=torch.float64, generator=gen)
    null = torch.linalg.svd(A).Vh[6:].mT
    B = null @ torch.randn(4, 40, dtype=torch.float64, generator=gen)
    B = B + delta * torch.randn(10, 40, dtype=torch.float64, generator=gen)
    return A.to(dtype), B.to(dtype)


# --- compute dtype --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype, expected",
    [
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
        (torch.complex64, torch.complex64),
        (torch.complex128, torch.complex128),
    ],
)
def test_compute_dtype(dtype, expected):
    assert kernels.compute_dtype(dtype) == expected


# --- orthogonalize --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128])
@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", [(12, 3), (2, 20, 4), (5, 5), (7, 1)])
def test_orthogonalize_reconstructs(shape, method, dtype):
    X = make_factors(shape, (1, 1), dtype)[0]
    Q, R = kernels.orthogonalize(X, method)
    p = min(shape[-2:])
    assert Q.shape == (*shape[:-1], p) and R.shape == (*shape[:-2], p, shape[-1])
    Xr = X.to(ref_dtype(dtype))
    assert_scaled_close(Q.to(Xr.dtype) @ R.to(Xr.dtype), Xr, torch.linalg.matrix_norm(Xr), tol(X.dtype), "Q R")
    assert_orthonormal(Q, tol(X.dtype, "ortho"), "Q")
    assert bool((R.tril(-1) == 0).all()), "R must be upper triangular"
    no_q, R_only = kernels.orthogonalize(X, method, want_q=False)
    assert no_q is None
    # R is unique up to the phases of its rows: compare R^H R = X^H X.
    gram = R_only.to(Xr.dtype).mH @ R_only.to(Xr.dtype)
    assert_scaled_close(gram, Xr.mH @ Xr, torch.linalg.matrix_norm(Xr) ** 2, tol(X.dtype), "R^H R")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128])
def test_cholqr2_taken_on_well_conditioned_tall_factor(dtype):
    X = with_condition(64, 4, 10.0, torch.float64).to(dtype)
    with choices.recorded() as log:
        Q, R = kernels.orthogonalize(X, "auto")
    assert methods(log) == ["cholqr2"], "method='auto' on a well-conditioned tall factor must use CholeskyQR2"
    assert "16 rows per column" in log[0].reason and "cholqr2_min_aspect = 4" in log[0].reason
    W, T, R_direct, ok, _, _ = kernels._cholqr2_flagged(X, settings.cholqr2_max_defect.value())
    assert bool(ok)
    torch.testing.assert_close(Q, W @ T)
    torch.testing.assert_close(R, R_direct)
    assert_orthonormal(Q, tol(dtype, "ortho"), "Q")


def _rank_deficient_tall(dtype):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 2, dtype=torch.float64, generator=gen) @ torch.randn(2, 5, dtype=torch.float64, generator=gen)
    return X.to(dtype)


HARD_TALL_FACTORS = {
    "rank_deficient_f32": lambda: _rank_deficient_tall(torch.float32),
    "rank_deficient_f64": lambda: _rank_deficient_tall(torch.float64),
    "cond_1e6_f32": lambda: with_condition(48, 6, 1e6, torch.float32),
    "zero_f64": lambda: torch.zeros(20, 3, dtype=torch.float64),
}


@pytest.mark.parametrize("name", HARD_TALL_FACTORS)
def test_cholqr2_fails_cleanly_and_auto_falls_back(name):
    X = HARD_TALL_FACTORS[name]()
    assert not bool(kernels._cholqr2_flagged(X, settings.cholqr2_max_defect.value())[3])
    with pytest.raises(RuntimeError, match="householder"):
        kernels.orthogonalize(X, "cholqr2")
    with choices.recorded() as log:
        Q, R = kernels.orthogonalize(X, "auto")
    assert methods(log) == ["cholqr2", "householder"], "method='auto' must fall back to Householder QR"
    assert "fell back" in log[1].reason and ("Cholesky" in log[1].reason or "defect" in log[1].reason)
    Xr = X.double()
    assert_scaled_close(Q.double() @ R.double(), Xr, max(float(torch.linalg.matrix_norm(Xr)), 1.0), tol(X.dtype), "Q R")
    assert_orthonormal(Q, tol(X.dtype, "ortho"), "Q")


@pytest.mark.parametrize("name", HARD_TALL_FACTORS)
def test_svd_auto_falls_back_on_hard_tall_factors(name):
    A = HARD_TALL_FACTORS[name]()
    B = make_factors((1, 1), (A.shape[-1], 30), A.dtype, seed=3)[1]
    with pytest.raises(RuntimeError, match="householder"):
        kernels.svd(A, B, method="cholqr2")
    with pytest.raises(RuntimeError, match="householder"):
        kernels.svdvals(A, B, method="cholqr2")
    with choices.recorded() as log:
        U, S, V = kernels.svd(A, B, method="auto")
    # A falls back; B^H (5 x 30... or 30 x n) is not tall enough for CholeskyQR2 or is not factorised.
    assert methods(log)[:2] == ["cholqr2", "householder"]
    check_svd(U, S, V, A, B)
    S_ref = torch.linalg.svdvals(dense(A, B))[: S.shape[-1]]
    assert_scaled_close(kernels.svdvals(A, B, "auto"), S_ref, scale_of(A, B), tol(A.dtype), "svdvals")


def test_svd_cholqr2_taken_on_tall_factors():
    A, B = make_factors((2, 40, 4), (4, 33), torch.float64)
    with choices.recorded() as log:
        U, S, V = kernels.svd(A, B, "auto")
        S2 = kernels.svdvals(A, B, "auto")
    assert methods(log) == ["cholqr2"] * 4  # A and B^H, for each call
    check_svd(U, S, V, A, B)
    assert_scaled_close(S2, S.double(), scale_of(A, B), tol(A.dtype), "svdvals")


def test_check_svd_detects_wrong_results():
    # The comparison helpers must be able to fail: a sign flip is fine, anything else is not.
    A, B = make_factors((7, 4), (4, 6), torch.float64)
    U, S, V = kernels.svd(A, B)
    check_svd(-U, S, -V, A, B)
    flip = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    with pytest.raises(AssertionError, match="U diag"):
        check_svd(U * flip, S, V, A, B)  # one column's sign flipped in U only
    with pytest.raises(AssertionError, match="S"):
        check_svd(U, S.flip(-1).flip(-1) * 1.001, V, A, B)
    W = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64)).Q
    with pytest.raises(AssertionError):
        check_svd(U @ W, S, V @ W, A, B)  # same subspaces, wrong singular vectors


# --- svd / svdvals --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_svd_matches_dense(shape, method, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    U, S, V = kernels.svd(A, B, method)
    assert check_svd(U, S, V, A, B) > 0, "no singular vector was compared"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", ["auto", "householder"])
@pytest.mark.parametrize(
    "a_shape, b_shape, rank",
    [((3, 1, 9, 6), (4, 6, 8), 2), ((30, 5), (5, 25), 3), ((4, 7), (7, 5), 1), ((2, 12, 3), (3, 12), 2)],
)
def test_svd_rank_deficient(a_shape, b_shape, rank, method, dtype):
    A, B = make_factors(a_shape, b_shape, dtype, rank=rank)
    U, S, V = kernels.svd(A, B, method)
    check_svd(U, S, V, A, B)
    if dtype != torch.bfloat16:  # rounding to bfloat16 makes X @ Y full rank again
        trailing = S[..., rank:] <= tol(dtype) * scale_of(A, B)[..., None]
        assert bool(trailing.all()), "trailing singular values must vanish"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_svdvals_matches_dense(shape, method, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    S = kernels.svdvals(A, B, method)
    k = min(A.shape[-2], A.shape[-1], B.shape[-1])
    M = dense(A, B)
    assert S.shape == (*M.shape[:-2], k)
    assert S.dtype == real_dtype(dtype)
    assert_scaled_close(S, torch.linalg.svdvals(M)[..., :k], scale_of(A, B), tol(dtype), "svdvals")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(spec=factor_specs(), method=st.sampled_from(["auto", "householder"]))
def test_svd_svdvals_norm_consistent_hypothesis(dtype, spec, method):
    a_shape, b_shape, rank, seed = spec
    A, B = make_factors(a_shape, b_shape, dtype, rank, seed)
    U, S, V = kernels.svd(A, B, method)
    check_svd(U, S, V, A, B)
    scale = scale_of(A, B)
    S2 = kernels.svdvals(A, B, method)
    assert_scaled_close(S2, S.double(), scale, tol(dtype), "svdvals vs svd")
    M = dense(A, B)
    for norm_method in NORM_METHODS:
        n = kernels.frobenius_norm(A, B, norm_method)
        assert n.dtype == real_dtype(dtype)
        assert_scaled_close(n, torch.linalg.matrix_norm(M), scale, tol(dtype), f"norm {norm_method}")
    # The Frobenius norm is the 2-norm of the singular values.
    S_norm = torch.linalg.vector_norm(S.double(), dim=-1)
    assert_scaled_close(S_norm, torch.linalg.matrix_norm(M), scale, tol(dtype), "|S|")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64])
@given(spec=factor_specs(rank_deficient=False))
def test_svd_cholqr2_hypothesis(dtype, spec):
    a_shape, b_shape, _, seed = spec
    A, B = make_factors(a_shape, b_shape, dtype, None, seed)
    U, S, V = kernels.svd(A, B, "cholqr2")
    check_svd(U, S, V, A, B)


# --- norms, traces, diagonals ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", NORM_METHODS)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_frobenius_norm_matches_dense(shape, method, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    n = kernels.frobenius_norm(A, B, method)
    M = dense(A, B)
    assert n.shape == M.shape[:-2]
    assert n.dtype == real_dtype(dtype)
    assert_scaled_close(n, torch.linalg.matrix_norm(M), scale_of(A, B), tol(dtype), "norm")


@pytest.mark.parametrize("dtype, delta, rtol", [(torch.float64, 1e-7, 1e-8), (torch.float32, 1e-3, 1e-4)])
def test_frobenius_norm_auto_switches_to_qr_when_product_cancels(dtype, delta, rtol):
    A, B = cancelling_factors(dtype, delta)
    ref = torch.linalg.matrix_norm(dense(A, B))
    assert float(ref / scale_of(A, B)) < 10 * delta  # the construction cancels
    gram = kernels.frobenius_norm(A, B, "gram")
    # The Gram formula really is inaccurate here, so the test below can tell the paths apart.
    assert float((gram.double() - ref).abs() / ref) > 10 * rtol
    with choices.recorded() as log:
        auto = kernels.frobenius_norm(A, B, "auto")
    assert methods(log, "norm") == ["qr"], "norm(method='auto') must switch to the QR core when the Gram terms cancel"
    assert "> gram_norm_max_rel_error = 1e-06" in log[0].reason
    assert float((auto.double() - ref).abs() / ref) < rtol
    qr = kernels.frobenius_norm(A, B, "qr")
    assert float((qr.double() - ref).abs() / ref) < rtol


def test_frobenius_norm_auto_stays_on_gram_without_cancellation():
    A, B = make_factors((3, 30, 4), (4, 25), torch.float32)
    with choices.recorded() as log:
        n = kernels.frobenius_norm(A, B, "auto")
    assert methods(log, "norm") == ["gram"] and methods(log) == []
    assert "<= gram_norm_max_rel_error = 1e-06" in log[0].reason
    assert_scaled_close(n, torch.linalg.matrix_norm(dense(A, B)), scale_of(A, B), tol(A.dtype), "norm")


def test_frobenius_norm_of_zero_product():
    A = torch.zeros(2, 5, 3, dtype=torch.float64)
    B = torch.randn(3, 4, dtype=torch.float64)
    for method in NORM_METHODS:
        n = kernels.frobenius_norm(A, B, method)
        assert n.shape == (2,) and bool((n == 0).all())


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SQUARE_SHAPES.values(), ids=SQUARE_SHAPES.keys())
def test_trace_and_diagonal_match_dense(shape, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    M = dense(A, B)
    t = kernels.trace(A, B)
    d = kernels.diagonal(A, B)
    assert t.shape == M.shape[:-2] and d.shape == M.shape[:-1]
    rtol = tol(dtype, "stored")  # 16-bit factors give 16-bit traces
    assert_scaled_close(t, torch.diagonal(M, dim1=-2, dim2=-1).sum(-1), scale_of(A, B), rtol, "trace")
    assert_scaled_close(d, torch.diagonal(M, dim1=-2, dim2=-1), scale_of(A, B), rtol, "diagonal")


# --- eigenvalues ----------------------------------------------------------------------------------
def check_eigvals(ev: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> None:
    dtype = A.dtype
    mdim = A.shape[-1]
    M = dense(A, B)
    assert ev.shape == (*M.shape[:-2], mdim)
    assert ev.dtype == (torch.complex128 if real_dtype(dtype) == torch.float64 else torch.complex64)
    mod = ev.abs()
    assert bool((mod[..., :-1] >= mod[..., 1:]).all()), "eigenvalues must be sorted by descending modulus"
    ldim = A.shape[-2]
    if mdim > ldim:
        assert bool((ev[..., ldim:] == 0).all()), "the mdim - ldim extra eigenvalues are exact zeros"
    ref = dense_eigenvalues_padded(M, mdim)
    assert_scaled_close(match_multiset(ev, ref), ref, scale_of(A, B), tol(dtype, "eig"), "eigenvalues")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape", SQUARE_SHAPES.values(), ids=SQUARE_SHAPES.keys())
def test_eigvals_match_dense(shape, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    check_eigvals(kernels.eigvals(A, B), A, B)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eigvals_rank_deficient(dtype):
    A, B = make_factors((2, 8, 5), (5, 8), dtype, rank=2)
    ev = kernels.eigvals(A, B)
    check_eigvals(ev, A, B)
    assert bool((ev[..., 2:].abs() <= tol(dtype, "eig") * scale_of(A, B)[..., None]).all())


def test_eigvals_known_values():
    # A B = P diag(d) P^-1 with known eigenvalues, among them a complex pair.
    P = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    D = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, -2.0, 1.0]], dtype=torch.float64)
    ev = kernels.eigvals(P @ D, torch.linalg.inv(P))
    expected = torch.tensor([3, 1 + 2j, 1 - 2j], dtype=torch.complex128)
    torch.testing.assert_close(match_multiset(ev, expected), expected)
    assert float(ev[0].real) == pytest.approx(3.0)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(spec=factor_specs(square=True))
def test_eigvals_hypothesis(dtype, spec):
    a_shape, b_shape, rank, seed = spec
    A, B = make_factors(a_shape, b_shape, dtype, rank, seed)
    check_eigvals(kernels.eigvals(A, B), A, B)


# --- symeig ---------------------------------------------------------------------------------------
def hermitian_factors(n: int, mdim: int, dtype: torch.dtype, signs=None, lead=()):
    """``A = X diag(d)``, ``B = X^H``: a Hermitian ``A @ B``, indefinite when ``signs`` has a -1.
    ``X`` is rounded to ``dtype`` first and ``d`` holds powers of two, so the factors are exact."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(*lead, n, mdim, dtype=ref_dtype(dtype), generator=gen).to(dtype)
    d = 2.0 ** torch.arange(mdim, dtype=torch.float64).remainder(4).sub(1)
    if signs is not None:
        d = d * torch.tensor(signs, dtype=torch.float64)
    return X * d.to(dtype), X.mH.contiguous()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128, torch.bfloat16])
@pytest.mark.parametrize(
    "n, mdim, signs, lead",
    [
        (6, 3, None, ()),
        (6, 3, [1, -1, 1], (2,)),
        (4, 6, [1, -1, -1, 1, 1, -1], ()),
        (5, 5, None, (2,)),
        (1, 1, None, ()),
    ],
)
@pytest.mark.parametrize("eigenvectors", [False, True])
def test_symeig_matches_dense(n, mdim, signs, lead, dtype, eigenvectors):
    A, B = hermitian_factors(n, mdim, dtype, signs, lead)
    M = dense(A, B)
    M = (M + M.mH) / 2
    evals, evecs = kernels.symeig(A, B, eigenvectors=eigenvectors)
    assert evals.shape == (*lead, n)
    assert evals.dtype == real_dtype(dtype)
    assert bool((evals[..., :-1] <= evals[..., 1:]).all()), "eigenvalues must be ascending"
    scale = scale_of(A, B)
    assert_scaled_close(evals, torch.linalg.eigvalsh(M), scale, tol(dtype), "eigvalsh")
    if not eigenvectors:
        assert evecs is None
        return
    assert evecs.shape == (*lead, n, n) and evecs.dtype == out_dtype(dtype)
    assert_orthonormal(evecs, tol(dtype, "ortho"), "eigenvectors")
    V = evecs.to(M.dtype)
    assert_scaled_close(M @ V, V * evals.to(torch.float64)[..., None, :], scale, tol(dtype), "M V = V diag(e)")


def test_symeig_rejects_non_hermitian():
    A, B = make_factors((5, 3), (3, 5), torch.float64)
    with pytest.raises(ValueError, match=r"Hermitian.*`\.eigenvalues`"):
        kernels.symeig(A, B)


def test_symeig_rejects_product_hermitian_only_on_range_of_A():
    # A B = X X^T + X W (I - Q Q^T): its projection Q^T (A B) Q is symmetric, A B itself is not.
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(6, 2, dtype=torch.float64, generator=gen)
    Q = torch.linalg.qr(X).Q
    W = torch.randn(2, 6, dtype=torch.float64, generator=gen)
    B = X.mT + W @ (torch.eye(6, dtype=torch.float64) - Q @ Q.mT)
    T = Q.mT @ X @ B @ Q
    torch.testing.assert_close(T, T.mT)  # the construction hides the asymmetry from the core
    with pytest.raises(ValueError, match=r"`\.eigenvalues`"):
        kernels.symeig(X, B)
