"""FactoredMatrix's TransformerLens surface, operators and autograd against dense float64 references."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from helpers import (
    ALL_DTYPES,
    NORM_METHODS,
    SHAPES,
    SQUARE_SHAPES,
    SVD_METHODS,
    assert_scaled_close,
    check_svd,
    dense,
    dense_eigenvalues_padded,
    factor_specs,
    make_factors,
    make_fm,
    match_multiset,
    out_dtype,
    real_dtype,
    ref_dtype,
    scale_of,
    tol,
)
from hypothesis import given

import lowrank_op
from lowrank_op import FactoredMatrix, kernels

shape_params = pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
#: The class is a thin layer over the kernels (tests/test_kernels.py runs every shape, dtype and
#: method); its decompositions are checked on the shapes that stress broadcasting and the paths.
FEW_SHAPES = {name: SHAPES[name] for name in ("broadcast", "tall_batched", "mdim_1", "ldim_1")}
few_shape_params = pytest.mark.parametrize("shape", FEW_SHAPES.values(), ids=FEW_SHAPES.keys())
square_params = pytest.mark.parametrize("shape", SQUARE_SHAPES.values(), ids=SQUARE_SHAPES.keys())


def k_of(fm: FactoredMatrix) -> int:
    return min(fm.ldim, fm.mdim, fm.rdim)


def assert_fm_equals_dense(fm, expected: torch.Tensor, scale, rtol: float, what: str = "") -> None:
    assert isinstance(fm, FactoredMatrix), type(fm)
    assert fm.shape == expected.shape, (fm.shape, expected.shape)
    assert_scaled_close(dense(fm.A, fm.B), expected, scale, rtol, what)


# --- construction and the plain properties --------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@shape_params
def test_properties(shape, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    fm = FactoredMatrix(A, B)
    M = dense(A, B)
    # Computations use the factors as given; the public A, B (and pair) are broadcast views, as in
    # TransformerLens.
    assert fm._A is A and fm._B is B
    for public, given in ((fm.A, A), (fm.B, B)):
        assert public.shape == (*M.shape[:-2], *given.shape[-2:])
        assert torch.equal(public, given.expand(public.shape))
        assert public.data_ptr() == given.data_ptr(), "a view, not a copy"
        if public.shape == given.shape:
            assert public is given
    assert torch.equal(fm.pair[0], fm.A) and torch.equal(fm.pair[1], fm.B) and len(fm.pair) == 2
    assert fm.has_leading_dims == (A.dim() > 2 or B.dim() > 2)
    assert (fm.ldim, fm.mdim, fm.rdim) == (A.shape[-2], A.shape[-1], B.shape[-1])
    assert fm.shape == M.shape and fm.size() == M.shape
    assert fm.ndim == M.dim() == fm.dim()
    assert fm.batch_shape == M.shape[:-2]
    assert fm.dtype == dtype and fm.device == A.device
    AB = fm.AB
    assert isinstance(AB, torch.Tensor) and AB.dtype == dtype and AB.shape == M.shape
    assert_scaled_close(AB, M, scale_of(A, B), tol(dtype, "stored"), "AB")
    assert_scaled_close(fm.to_dense(), M, scale_of(A, B), tol(dtype, "stored"), "to_dense")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@square_params
def test_BA(shape, dtype):
    A, B = make_factors(*shape, dtype=dtype)
    fm = FactoredMatrix(A, B)
    r = ref_dtype(dtype)
    expected = B.to(r) @ A.to(r)
    assert fm.BA.shape == (*fm.batch_shape, fm.mdim, fm.mdim) and fm.BA.dtype == dtype
    assert_scaled_close(fm.BA, expected, scale_of(A, B), tol(dtype, "stored"), "BA")


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((5, 3), (3, 4)), ((2, 5, 3), (3, 4)), ((3, 1, 5, 3), (4, 3, 4)), ((2, 1, 1, 2, 3), (3, 1))],
    ids=["2d", "3d", "4d_broadcast", "5d"],
)
def test_T(a_shape, b_shape, dtype):
    fm = make_fm(a_shape, b_shape, dtype)
    M = dense(fm.A, fm.B)
    T = fm.T
    assert_fm_equals_dense(T, M.mT, scale_of(fm.A, fm.B), tol(dtype), "T")
    assert (T.ldim, T.mdim, T.rdim) == (fm.rdim, fm.mdim, fm.ldim)
    # T is the transpose, not the conjugate transpose.
    assert_fm_equals_dense(T.T, M, scale_of(fm.A, fm.B), tol(dtype), "T.T")


# --- svd and its derived members ------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", SVD_METHODS)
@few_shape_params
def test_svd(shape, method, dtype):
    fm = make_fm(*shape, dtype=dtype)
    U, S, Vh = fm.svd(method)
    assert check_svd(U, S, Vh, fm.A, fm.B) > 0


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@shape_params
def test_U_S_Vh_V(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    U, S, V = fm.U, fm.S, fm.V
    check_svd(U, S, V, fm.A, fm.B)
    with pytest.warns(DeprecationWarning, match=r"Vh returns V .* use \.V"):
        Vh = fm.Vh
    assert Vh is V, "Vh is a deprecated alias of V"
    assert fm.U is fm.svd()[0] and fm.V is fm.svd()[2]
    assert_scaled_close(fm.S, fm.svd()[1].double(), scale_of(fm.A, fm.B), tol(dtype), "S vs svd()[1]")
    assert_scaled_close(fm.svdvals(), fm.svd()[1].double(), scale_of(fm.A, fm.B), tol(dtype), "svdvals")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
@pytest.mark.parametrize("method", ["auto", "householder"])
def test_svd_rank_deficient(method, dtype):
    fm = make_fm((3, 1, 12, 6), (4, 6, 10), dtype, rank=2)
    U, S, Vh = fm.svd(method)
    check_svd(U, S, Vh, fm.A, fm.B)
    assert bool((S[..., 2:] <= tol(dtype) * scale_of(fm.A, fm.B)[..., None]).all())


def test_svd_cached_and_instance_freed():
    fm = make_fm((6, 3), (3, 5))
    first = fm.svd()
    second = fm.svd()
    assert all(a is b for a, b in zip(first, second)), "svd() must return the cached objects"
    assert fm.S is fm.S
    assert fm.svd("householder")[0] is fm.svd("householder")[0]
    square = make_fm((5, 3), (3, 5))
    assert square.eigenvalues is square.eigenvalues
    refs = [weakref.ref(fm), weakref.ref(square)]
    square.svd()
    del fm, square, first, second
    gc.collect()
    assert all(r() is None for r in refs), "a global cache keeps FactoredMatrix objects alive"


def test_cache_cleared_by_requires_grad():
    A, B = make_factors((6, 3), (3, 5))
    fm = FactoredMatrix(A, B)
    U = fm.svd()[0]
    fm.requires_grad_(True)
    U2 = fm.svd()[0]
    assert U2 is not U and U2.requires_grad


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@shape_params
def test_make_even(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    even = fm.make_even()
    k = k_of(fm)
    assert isinstance(even, FactoredMatrix)
    assert even.shape == fm.shape and even.mdim == k
    assert even.dtype == out_dtype(dtype)
    scale = scale_of(fm.A, fm.B)
    assert_scaled_close(dense(even.A, even.B), dense(fm.A, fm.B), scale, tol(dtype), "make_even product")
    # Balanced: A^H A = B B^H = diag(S), S the singular values.
    S = fm.S.double()
    diag = torch.diag_embed(S).to(ref_dtype(dtype))
    Ae, Be = even.A.to(ref_dtype(dtype)), even.B.to(ref_dtype(dtype))
    assert_scaled_close(Ae.mH @ Ae, diag, scale, tol(dtype), "A^H A")
    assert_scaled_close(Be @ Be.mH, diag, scale, tol(dtype), "B B^H")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@shape_params
def test_collapse_l_and_r(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    k = k_of(fm)
    M = dense(fm.A, fm.B)
    scale = scale_of(fm.A, fm.B)
    U, S, Vh = fm.svd()
    cl = fm.collapse_l()
    cr = fm.collapse_r()
    assert isinstance(cl, torch.Tensor) and isinstance(cr, torch.Tensor)
    assert cl.shape == (*fm.batch_shape, k, fm.rdim) and cr.shape == (*fm.batch_shape, fm.ldim, k)
    assert cl.dtype == cr.dtype == out_dtype(dtype)
    r = M.dtype
    assert_scaled_close(U.to(r) @ cl.to(r), M, scale, tol(dtype), "U @ collapse_l")
    assert_scaled_close(cr.to(r) @ Vh.to(r).mH, M, scale, tol(dtype), "collapse_r @ Vh^H")
    # Removing an orthogonal factor keeps the singular values.
    S_ref = torch.linalg.svdvals(M)[..., :k]
    assert_scaled_close(torch.linalg.svdvals(cl.to(r)), S_ref, scale, tol(dtype), "svdvals(collapse_l)")
    assert_scaled_close(torch.linalg.svdvals(cr.to(r)), S_ref, scale, tol(dtype), "svdvals(collapse_r)")


# --- eigenvalues, norm, trace ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@square_params
def test_eigvals(shape, dtype):
    # eigvals(): sorted by descending modulus, the mdim - ldim extra ones exact zeros.
    fm = make_fm(*shape, dtype=dtype)
    ev = fm.eigvals()
    M = dense(fm.A, fm.B)
    assert ev.shape == (*fm.batch_shape, fm.mdim)
    assert ev.dtype.is_complex and ev.dtype.to_real() == real_dtype(dtype)
    assert bool((ev.abs()[..., :-1] >= ev.abs()[..., 1:]).all())
    if fm.mdim > fm.ldim:
        assert bool((ev[..., fm.ldim :] == 0).all())
    ref = dense_eigenvalues_padded(M, fm.mdim)
    assert_scaled_close(match_multiset(ev, ref), ref, scale_of(fm.A, fm.B), tol(dtype, "eig"), "eigvals")


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@square_params
def test_eigenvalues(shape, dtype):
    # eigenvalues: TransformerLens's, the eigenvalues of the mdim x mdim B @ A (LAPACK's order, which
    # is not asserted), 16-bit factors giving complex64.
    fm = make_fm(*shape, dtype=dtype)
    ev = fm.eigenvalues
    assert ev.shape == (*fm.batch_shape, fm.mdim)
    assert ev.dtype.is_complex and ev.dtype.to_real() == real_dtype(dtype)
    ref = torch.linalg.eigvals(dense(fm.B, fm.A))
    assert_scaled_close(match_multiset(ev, ref), ref, scale_of(fm.A, fm.B), tol(dtype, "eig"), "eigenvalues")
    assert fm.eigenvalues is ev, "cached"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("method", NORM_METHODS)
@few_shape_params
def test_norm(shape, method, dtype):
    fm = make_fm(*shape, dtype=dtype)
    n = fm.norm(method)
    M = dense(fm.A, fm.B)
    assert n.shape == fm.batch_shape and n.dtype == real_dtype(dtype)
    assert_scaled_close(n, torch.linalg.matrix_norm(M), scale_of(fm.A, fm.B), tol(dtype), "norm")


def test_norm_default_is_auto_and_accurate_under_cancellation():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(2, 6, 10, dtype=torch.float64, generator=gen)
    null = torch.linalg.svd(A).Vh[..., 6:, :].mT
    B = null @ torch.randn(4, 30, dtype=torch.float64, generator=gen)
    B = B + 1e-7 * torch.randn(10, 30, dtype=torch.float64, generator=gen)
    fm = FactoredMatrix(A, B)
    ref = torch.linalg.matrix_norm(A @ B)
    rel = ((fm.norm() - ref).abs() / ref).max()
    assert float(rel) < 1e-8
    assert float(((fm.norm("gram") - ref).abs() / ref).max()) > 1e-6  # what "auto" avoided


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@square_params
def test_trace(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    t = fm.trace()
    M = dense(fm.A, fm.B)
    assert t.shape == fm.batch_shape and t.dtype == dtype
    rtol = tol(dtype, "stored")  # 16-bit factors give a 16-bit trace
    assert_scaled_close(t, torch.diagonal(M, dim1=-2, dim2=-1).sum(-1), scale_of(fm.A, fm.B), rtol, "trace")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex64, torch.complex128, torch.bfloat16])
@given(spec=factor_specs(square=True))
def test_hypothesis_S_norm_eigenvalues_trace(dtype, spec):
    a_shape, b_shape, rank, seed = spec
    fm = FactoredMatrix(*make_factors(a_shape, b_shape, dtype, rank, seed))
    M = dense(fm.A, fm.B)
    scale = scale_of(fm.A, fm.B)
    k = k_of(fm)
    assert_scaled_close(fm.S, torch.linalg.svdvals(M)[..., :k], scale, tol(dtype), "S")
    for method in NORM_METHODS:
        assert_scaled_close(fm.norm(method), torch.linalg.matrix_norm(M), scale, tol(dtype), f"norm {method}")
    ref = dense_eigenvalues_padded(M, fm.mdim)
    assert_scaled_close(match_multiset(fm.eigenvalues, ref), ref, scale, tol(dtype, "eig"), "eigenvalues")
    # sum of eigenvalues = trace; sum of squared singular values = squared norm.
    trace_ref = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)
    ev_sum = fm.eigenvalues.to(torch.complex128).sum(-1)
    assert_scaled_close(ev_sum, trace_ref.to(torch.complex128), scale, tol(dtype, "eig"), "sum(eig)")
    assert_scaled_close(fm.trace(), trace_ref, scale, tol(dtype, "stored"), "trace")
    S_sq = fm.S.double().square().sum(-1)
    assert_scaled_close(S_sq, fm.norm().double().square(), scale**2, tol(dtype), "|S|^2 = norm^2")


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
@given(spec=factor_specs(rank_deficient=False))
def test_hypothesis_svd(method, dtype, spec):
    a_shape, b_shape, _, seed = spec
    fm = FactoredMatrix(*make_factors(a_shape, b_shape, dtype, None, seed))
    check_svd(*fm.svd(method), fm.A, fm.B)
    even = fm.make_even()
    assert_scaled_close(dense(even.A, even.B), dense(fm.A, fm.B), scale_of(fm.A, fm.B), tol(dtype), "make_even")


# --- get_corner, unsqueeze ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 10])
@pytest.mark.parametrize(
    "a_shape, b_shape",
    [((5, 4), (4, 6)), ((3, 1, 5, 4), (4, 4, 6)), ((2, 1, 3), (3, 1))],
    ids=["2d", "broadcast", "thin"],
)
def test_get_corner(a_shape, b_shape, k):
    fm = make_fm(a_shape, b_shape)
    M = dense(fm.A, fm.B)
    corner = fm.get_corner(k)
    expected = M[tuple(slice(k) for _ in range(M.dim()))]
    assert isinstance(corner, torch.Tensor)
    assert corner.shape == expected.shape
    torch.testing.assert_close(corner, expected)
    torch.testing.assert_close(fm.get_corner(), M[tuple(slice(3) for _ in range(M.dim()))])


@pytest.mark.parametrize(
    "a_shape, b_shape, dim",
    [
        ((5, 4), (4, 6), 0),
        ((5, 4), (4, 6), -3),
        ((3, 1, 5, 4), (4, 4, 6), 1),
        ((3, 1, 5, 4), (4, 4, 6), 2),
        ((2, 5, 4), (4, 6), -4),
    ],
)
def test_unsqueeze(a_shape, b_shape, dim):
    fm = make_fm(a_shape, b_shape)
    M = dense(fm.A, fm.B)
    out = fm.unsqueeze(dim)
    scale = scale_of(fm.A, fm.B).unsqueeze(dim if dim >= 0 else dim + 2)
    assert_fm_equals_dense(out, M.unsqueeze(dim), scale, tol(torch.float64), "unsqueeze")


# --- @ and the linear_operator products -----------------------------------------------------------
MATMUL_CASES = {
    "2d": ((5, 4), (4, 6)),
    "broadcast": ((3, 1, 5, 4), (4, 4, 6)),
    "batched_B": ((5, 4), (2, 4, 6)),
    "batched_both": ((2, 5, 4), (2, 4, 6)),
    "mdim_large": ((2, 3, 8), (8, 4)),
    "ones": ((1, 1), (1, 1)),
}
matmul_params = pytest.mark.parametrize("shape", MATMUL_CASES.values(), ids=MATMUL_CASES.keys())


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32])
@matmul_params
def test_matmul_vector(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    M = dense(fm.A, fm.B)
    v = make_factors((1, 1), (fm.rdim,), dtype, seed=5)[1]
    w = make_factors((1, 1), (fm.ldim,), dtype, seed=6)[1]
    r = M.dtype
    out = fm @ v
    assert type(out) is torch.Tensor and out.dtype == dtype
    expected = M @ v.to(r)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.to(r), expected, rtol=tol(dtype) * 10, atol=tol(dtype) * 10)
    out = w @ fm
    assert type(out) is torch.Tensor
    expected = w.to(r) @ M
    assert out.shape == expected.shape
    torch.testing.assert_close(out.to(r), expected, rtol=tol(dtype) * 10, atol=tol(dtype) * 10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@matmul_params
@pytest.mark.parametrize("cols", [1, 3, 9])
@pytest.mark.parametrize("other_lead", [(), (2, 1, 1)], ids=["plain", "batched"])
def test_matmul_matrix(shape, cols, other_lead, dtype):
    fm = make_fm(*shape, dtype=dtype)
    M = dense(fm.A, fm.B)
    X = make_factors((1, 1), (*other_lead, fm.rdim, cols), dtype, seed=8)[1]
    Y = make_factors((1, 1), (*other_lead, cols, fm.ldim), dtype, seed=9)[1]
    out = fm @ X
    assert isinstance(out, FactoredMatrix)
    assert out.mdim == min(fm.mdim, fm.rdim)
    torch.testing.assert_close(out.to_dense(), M @ X)
    out = Y @ fm
    assert isinstance(out, FactoredMatrix)
    assert out.mdim == min(fm.mdim, fm.ldim)
    torch.testing.assert_close(out.to_dense(), Y @ M)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@matmul_params
def test_matmul_factored(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    for other_shape in [((fm.rdim, 2), (2, 3)), ((2, 1, 1, fm.rdim, 7), (7, 3)), ((fm.rdim, 1), (1, 1))]:
        other = make_fm(*other_shape, dtype=dtype, seed=4)
        out = fm @ other
        assert isinstance(out, FactoredMatrix)
        assert out.mdim <= min(fm.mdim, other.mdim)
        expected = dense(fm.A, fm.B) @ dense(other.A, other.B)
        torch.testing.assert_close(out.to_dense(), expected)
        torch.testing.assert_close(fm.matmul(other).to_dense(), expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@matmul_params
def test_linear_operator_products_return_tensors(shape, dtype):
    fm = make_fm(*shape, dtype=dtype)
    M = dense(fm.A, fm.B)
    X = make_factors((1, 1), (fm.rdim, 3), dtype, seed=8)[1]
    Y = make_factors((1, 1), (3, fm.ldim), dtype, seed=9)[1]
    v = make_factors((1, 1), (fm.rdim,), dtype, seed=5)[1]
    r = M.dtype
    rt = tol(dtype) * 10
    cases = [
        (fm.matmul(X), M @ X.to(r)),
        (torch.matmul(fm, X), M @ X.to(r)),
        (fm.rmatmul(Y), Y.to(r) @ M),
        (torch.matmul(Y, fm), Y.to(r) @ M),
        (fm.matmul(v), M @ v.to(r)),
    ]
    for out, expected in cases:
        assert type(out) is torch.Tensor
        assert out.shape == expected.shape and out.dtype == dtype
        torch.testing.assert_close(out.to(r), expected, rtol=rt, atol=rt)


# --- scalars, negation, repr ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.bfloat16])
def test_scalar_products(dtype):
    fm = make_fm((3, 1, 5, 4), (4, 4, 6), dtype)
    M = dense(fm.A, fm.B)
    scale = scale_of(fm.A, fm.B)
    rt = tol(dtype, "stored")
    t2 = torch.tensor(2.0)
    cases = {
        "fm * 2": (fm * 2, 2 * M),
        "2 * fm": (2 * fm, 2 * M),
        "fm * 2.5": (fm * 2.5, 2.5 * M),
        "fm / 4": (fm / 4, M / 4),
        "-fm": (-fm, -M),
        "tensor * fm": (t2 * fm, 2 * M),
        "fm * tensor": (fm * t2, 2 * M),
        "fm * 1-element tensor": (fm * torch.tensor([3.0]), 3 * M),
        "fm / tensor": (fm / t2, M / 2),
    }
    if dtype.is_complex:
        cases["fm * 1j"] = (fm * 1j, 1j * M)
        cases["(1+2j) * fm"] = ((1 + 2j) * fm, (1 + 2j) * M)
    for name, (out, expected) in cases.items():
        assert isinstance(out, FactoredMatrix), name
        assert out.dtype == dtype, name
        assert out.mdim == fm.mdim, name
        assert_fm_equals_dense(out, expected, 3 * scale, rt, name)


def test_repr():
    fm = make_fm((2, 5, 3), (3, 4), torch.float32)
    text = repr(fm)
    for part in ("FactoredMatrix", "(2, 5, 4)", "mdim=3", "torch.float32", "cpu"):
        assert part in text, (part, text)
    assert "torch.complex128" in repr(make_fm((5, 3), (3, 4), torch.complex128))


# --- 16-bit inputs --------------------------------------------------------------------------------
def test_bfloat16_decompositions_in_float32():
    fm = make_fm((3, 1, 12, 4), (4, 4, 12), torch.bfloat16)
    assert fm.dtype == torch.bfloat16 and fm.AB.dtype == torch.bfloat16
    U, S, Vh = fm.svd()
    assert U.dtype == S.dtype == Vh.dtype == torch.float32
    assert fm.norm().dtype == torch.float32
    assert fm.eigenvalues.dtype == torch.complex64
    assert fm.make_even().dtype == torch.float32
    assert fm.collapse_l().dtype == fm.collapse_r().dtype == torch.float32
    check_svd(U, S, Vh, fm.A, fm.B)


# --- autograd -------------------------------------------------------------------------------------
def _leaf(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float64, generator=gen).requires_grad_(True)


GRAD_SHAPES = {"tall": ((6, 3), (3, 5)), "mdim_large": ((3, 5), (5, 4)), "batched": ((2, 4, 3), (3, 4))}
grad_params = pytest.mark.parametrize("shape", GRAD_SHAPES.values(), ids=GRAD_SHAPES.keys())


@grad_params
def test_gradcheck_S(shape):
    A, B = _leaf(*shape[0], seed=1), _leaf(*shape[1], seed=2)
    S = FactoredMatrix(A, B).S
    assert bool((S[..., :-1] - S[..., 1:] > 1e-2).all()) and bool((S > 1e-2).all())  # distinct, non-zero
    assert torch.autograd.gradcheck(lambda a, b: FactoredMatrix(a, b).S, (A, B))


@pytest.mark.parametrize("method", NORM_METHODS)
@grad_params
def test_gradcheck_norm(shape, method):
    A, B = _leaf(*shape[0], seed=1), _leaf(*shape[1], seed=2)
    assert torch.autograd.gradcheck(lambda a, b: FactoredMatrix(a, b).norm(method), (A, B))


def test_gradcheck_norm_auto_on_the_qr_path():
    # |A B| is about 3e-6 |A| |B|: the Gram terms cancel and "auto" takes the QR core. gradcheck's
    # step must stay well below |A B| for the finite differences to be linear.
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    null = torch.linalg.svd(A).Vh[4:].mT
    B = null @ torch.randn(2, 5, dtype=torch.float64, generator=gen)
    B = B + 3e-6 * torch.randn(6, 5, dtype=torch.float64, generator=gen)
    A.requires_grad_(True)
    B.requires_grad_(True)
    with lowrank_op.choices.recorded() as log:
        assert torch.autograd.gradcheck(lambda a, b: FactoredMatrix(a, b).norm("auto"), (A, B), eps=1e-8)
    assert {c.method for c in log if c.operation == "norm"} == {"qr"}, "the case must exercise the QR path"


@pytest.mark.parametrize("method", SVD_METHODS)
def test_gradcheck_svd_gauge_invariant(method):
    # Gradients through U and Vh, at distinct singular values, of quantities that do not depend on
    # the sign of each singular vector: the reconstruction and the leading projectors. Tall factors,
    # so that "auto" and "cholqr2" take the CholeskyQR2 path.
    A, B = _leaf(8, 2, seed=3), _leaf(2, 9, seed=4)

    def fn(a, b):
        U, S, Vh = FactoredMatrix(a, b).svd(method)
        return (U * S) @ Vh.mT, U[:, :1] @ U[:, :1].mT, Vh[:, 1:] @ Vh[:, 1:].mT

    S = FactoredMatrix(A, B).S.detach()
    assert bool((S[:-1] - S[1:] > 1e-1).all()) and float(S[-1]) > 1e-1
    # fast_mode checks the Jacobian along random directions: one backward pass, not one per output.
    assert torch.autograd.gradcheck(fn, (A, B), fast_mode=True)


@pytest.mark.parametrize("a_shape, b_shape", [((4, 3), (3, 4)), ((3, 5), (5, 3)), ((2, 4, 4), (4, 4))])
def test_gradcheck_eigenvalues(a_shape, b_shape):
    A, B = _leaf(*a_shape, seed=0), _leaf(*b_shape, seed=100)
    ev = FactoredMatrix(A, B).eigvals().detach()
    assert bool((ev.imag != 0).any()), "each case includes a complex pair"
    # Distinct eigenvalues, and distinct moduli apart from conjugate pairs, so that the order by
    # modulus cannot change under gradcheck's perturbations.
    nonzero = ev[..., : min(a_shape[-2], a_shape[-1])]
    n = nonzero.shape[-1]
    off = ~torch.eye(n, dtype=torch.bool)
    dist = (nonzero[..., :, None] - nonzero[..., None, :]).abs()[..., off]
    conj = (nonzero[..., :, None] - nonzero[..., None, :].conj()).abs()[..., off] < 1e-12
    mod_gap = (nonzero.abs()[..., :, None] - nonzero.abs()[..., None, :]).abs()[..., off]
    assert float(dist.min()) > 1e-2
    assert bool((conj | (mod_gap > 1e-2)).all())

    def fn(a, b):
        values = FactoredMatrix(a, b).eigvals()
        return values.real, values.imag

    assert torch.autograd.gradcheck(fn, (A, B))


@grad_params
def test_gradcheck_trace(shape):
    a_shape = shape[0]
    b_shape = (*shape[1][:-1], a_shape[-2])
    A, B = _leaf(*a_shape, seed=1), _leaf(*b_shape, seed=2)
    assert torch.autograd.gradcheck(lambda a, b: FactoredMatrix(a, b).trace(), (A, B))


# --- review fixes: complex gradients, cache invalidation, dtypes of operands ----------------------
def test_complex_gradients_through_matmul_match_plain_autograd():
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(4, 3, dtype=torch.complex128, generator=gen).requires_grad_(True)
    B = torch.randn(3, 5, dtype=torch.complex128, generator=gen).requires_grad_(True)
    x = torch.randn(5, 2, dtype=torch.complex128, generator=gen)
    (FactoredMatrix(A, B).matmul(x).abs() ** 2).sum().backward()
    A2, B2 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    ((A2 @ (B2 @ x)).abs() ** 2).sum().backward()
    torch.testing.assert_close(A.grad, A2.grad)
    torch.testing.assert_close(B.grad, B2.grad)


def test_cached_decompositions_follow_in_place_changes():
    A = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    B = torch.randn(3, 15, dtype=torch.float64)
    fm = FactoredMatrix(A, B)
    optimizer = torch.optim.SGD([A], lr=0.1)
    for _ in range(3):  # a training loop: each step changes A in place
        optimizer.zero_grad()
        S = fm.S
        torch.testing.assert_close(S, torch.linalg.svdvals(A.detach() @ B)[:3])
        S.sum().backward()
        optimizer.step()
    with torch.no_grad():
        A.mul_(2.0)
    torch.testing.assert_close(fm.svd()[1], torch.linalg.svdvals(A.detach() @ B)[:3])
    with torch.no_grad():
        first = fm.svd()
        assert fm.svd() is first  # unchanged factors, no graph wanted: the cached result
    assert fm.svd()[1] is not fm.svd()[1]  # a graph is wanted: each call gets its own


def test_products_refuse_a_different_dtype():
    fm = FactoredMatrix(torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"dtypes differ in a product: FactoredMatrix of dtype torch.float64 and operand of dtype torch.float32"):
        fm @ torch.randn(3)
    with pytest.raises(TypeError, match=r"dtypes differ in a product"):
        torch.randn(2, 4) @ fm


def test_svd_warns_when_gradients_of_singular_vectors_are_undefined():
    from lowrank_op import UndefinedGradientWarning

    A = torch.eye(6, 3, dtype=torch.float64).requires_grad_(True)  # singular values 1, 1, 1
    B = torch.eye(3, 5, dtype=torch.float64)
    with pytest.warns(UndefinedGradientWarning, match=r"gradients through U and Vh are undefined"):
        FactoredMatrix(A, B).svd()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FactoredMatrix(A.detach(), B).svd()  # no gradient recorded: no warning
        with torch.no_grad():
            FactoredMatrix(A, B).svd()
        distinct = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
        FactoredMatrix(torch.cat([distinct, torch.zeros(3, 3, dtype=torch.float64)]).requires_grad_(True), B).svd()
