"""OuterFactoredMatrix, ``L @ (A @ B) @ R`` with its outer factors kept, against dense float64 references.

Every result is compared with the dense product ``L @ A @ B @ R`` formed in float64 (complex128)
from the exact factor values, errors bounded relative to ``|L|_F |A|_F |B|_F |R|_F`` (per leading
index; :func:`helpers.chain_scale`). The shapes cover the circuits the class is for (OV circuits
``W_E ov W_U`` with batched inner and 2-D outer factors, QK circuits ``W_E qk W_E^T`` with the tied
view, a tied unembedding) and the edges of the basis rule: batched outer factors broadcasting with
the inner ones, one side only, a rank-deficient embedding (repeated rows: CholeskyQR2 falls back),
outer factors that are not tall or narrower than the inner dim, ``mdim > ldim``, single rows and
columns, empty dims. The caches, the ``"auto"`` rule and the kernels of
:mod:`lowrank_op.shared_bases` are in ``test_shared_bases.py``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import (
    Chain,
    assert_orthonormal,
    assert_scaled_close,
    chain_scale,
    check_svd_of,
    dense_chain,
    dense_eigenvalues_padded,
    make_chain,
    match_multiset,
    real_dtype,
    ref_dtype,
    tol,
)

from lowrank_op import FactoredMatrix, choices
from lowrank_op.errors import BroadcastError, DeviceMismatchError, DtypeMismatchError, NotSquareError, ShapeMismatchError
from lowrank_op.outer_factored import OuterFactoredMatrix

#: name -> (chain, the "auto" choice it gets, as recorded for operation "outer_factor").
CHAINS: dict[str, tuple[Chain, str]] = {
    # W_E (24 x 6) ov (3 heads, d_head 2) W_U: 3 * 2 columns reach W_E's 6, so both bases are used.
    "ov": (Chain((24, 6), (3, 6, 2), (3, 2, 6), (6, 20)), "basis+basis"),
    "ov_square": (Chain((24, 6), (3, 6, 2), (3, 2, 6), (6, 24)), "basis+basis"),
    "qk_tied": (Chain((24, 6), (3, 6, 2), (3, 2, 6), (6, 24), tie="R=L^T"), "basis+basis"),
    "tied_unembed": (Chain((24, 6), (3, 6, 2), (3, 2, 6), (6, 24), tie="L=R^T"), "basis+basis"),
    # outer factors with leading dims of their own, broadcasting against the inner ones
    "batched_outer": (Chain((2, 1, 24, 5), (3, 5, 2), (3, 2, 5), (2, 1, 5, 20)), "basis+basis"),
    "batched_outer_tied": (Chain((2, 1, 24, 5), (3, 5, 2), (3, 2, 5), (2, 1, 5, 24), tie="R=L^T"), "basis+basis"),
    # too few matrices share the factor to pay for its factorisation: formed
    "unshared_outer": (Chain((2, 24, 6), (2, 6, 2), (2, 2, 6), (6, 20)), "formed+formed"),
    "left_only": (Chain((24, 6), (3, 6, 2), (3, 2, 5), None), "basis"),
    "right_only": (Chain(None, (3, 5, 2), (3, 2, 6), (6, 20)), "basis"),
    "left_only_square": (Chain((24, 6), (2, 6, 3), (2, 3, 24), None), "basis"),
    # an embedding with repeated rows: a tall factor of rank 4 < 6
    "repeated_rows": (Chain((24, 6), (3, 6, 2), (3, 2, 6), (6, 24), tie="R=L^T", distinct_rows=4), "basis+basis"),
    # fewer rows than columns: not tall, nothing to factorise
    "non_tall_outer": (Chain((4, 6), (3, 6, 2), (3, 2, 6), (6, 5)), "formed+formed"),
    "mdim_gt_ldim": (Chain((5, 8), (8, 7), (7, 8), (8, 5)), "formed+formed"),
    # outer factors narrower (3) than the inner dim (7)
    "narrow_outer": (Chain((24, 3), (3, 7), (7, 3), (3, 24)), "formed+formed"),
    "mdim_1": (Chain((24, 6), (6, 6, 1), (6, 1, 6), (6, 24), tie="R=L^T"), "basis+basis"),
    "single_row": (Chain((1, 6), (3, 6, 2), (3, 2, 6), (6, 20)), "formed+basis"),
    "single_column": (Chain((24, 6), (3, 6, 2), (3, 2, 6), (6, 1)), "basis+formed"),
    "single_entry": (Chain((1, 6), (6, 2), (2, 6), (6, 1)), "formed+formed"),
    "empty_rows": (Chain((0, 6), (3, 6, 2), (3, 2, 6), (6, 20)), "formed+basis"),
    "empty_batch": (Chain((24, 6), (0, 6, 2), (0, 2, 6), (6, 24), tie="R=L^T"), "formed+formed"),
}
SQUARE = {name: case for name, case in CHAINS.items() if case[0].square}
#: float32, float64, complex128 and the 16-bit dtypes (held as given, decomposed in float32).
DTYPES = (torch.float32, torch.float64, torch.complex128, torch.float16, torch.bfloat16)

chain_params = pytest.mark.parametrize("name", list(CHAINS))
square_params = pytest.mark.parametrize("name", list(SQUARE))
dtype_params = pytest.mark.parametrize("dtype", DTYPES, ids=str)


def setup_chain(chain: Chain, dtype: torch.dtype = torch.float64, seed: int = 0):
    """``(fm, (L, A, B, R), M, scale)``: the OuterFactoredMatrix, its factors, the dense float64
    product and the error scale."""
    factors = make_chain(chain, dtype, seed)
    L, A, B, R = factors
    return OuterFactoredMatrix(A, B, left=L, right=R), factors, dense_chain(*factors), chain_scale(*factors)


def setup(name: str, dtype: torch.dtype = torch.float64, seed: int = 0):
    return setup_chain(CHAINS[name][0], dtype, seed)


def k_of(fm) -> int:
    return min(fm.ldim, fm.mdim, fm.rdim)


def assert_fm_close(fm, expected, scale, rtol, what=""):
    """``fm`` (a FactoredMatrix) holds ``expected``, checked from its factors in float64."""
    assert isinstance(fm, FactoredMatrix), type(fm)
    assert fm.shape == expected.shape, (fm.shape, expected.shape)
    if isinstance(fm, OuterFactoredMatrix):
        actual = dense_chain(*fm._chain())
    else:
        actual = fm._A.to(expected.dtype) @ fm._B.to(expected.dtype)
    assert_scaled_close(actual, expected, scale, rtol, what)


# --- construction, the four factors, and the FactoredMatrix surface ---------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.bfloat16], ids=str)
@chain_params
def test_properties(name, dtype):
    fm, (L, A, B, R), M, scale = setup(name, dtype)
    assert fm.left is L and fm.right is R and fm._args[0] is A and fm._args[1] is B
    assert fm.shape == M.shape and fm.batch_shape == M.shape[:-2] and fm.dtype == dtype
    assert (fm.ldim, fm.mdim, fm.rdim) == (M.shape[-2], A.shape[-1], M.shape[-1])
    assert fm.has_leading_dims == any(X.dim() > 2 for X in (L, A, B, R) if X is not None)
    assert isinstance(fm.inner, FactoredMatrix) and fm.inner._A is A and fm.inner._B is B
    # To TransformerLens code it is a FactoredMatrix: .A is L @ A, .B is B @ R (formed, broadcast).
    r = ref_dtype(dtype)
    LA = A.to(r) if L is None else L.to(r) @ A.to(r)
    BR = B.to(r) if R is None else B.to(r) @ R.to(r)
    assert fm.A.shape == (*fm.batch_shape, fm.ldim, fm.mdim) and fm.B.shape == (*fm.batch_shape, fm.mdim, fm.rdim)
    assert fm.A.dtype == fm.B.dtype == dtype
    rtol = tol(dtype, "stored")
    assert_scaled_close(fm.A, LA.expand(fm.A.shape), chain_scale(L, A, None, None), rtol, ".A")
    assert_scaled_close(fm.B, BR.expand(fm.B.shape), chain_scale(None, B, None, R), rtol, ".B")
    assert fm._A is fm._A, "the formed factor is cached on the instance"
    for dense_product in (fm.AB, fm.to_dense()):
        assert dense_product.dtype == dtype
        # The formed factors are rounded to the dtype first: a 16-bit AB carries two roundings.
        assert_scaled_close(dense_product, M, scale, 2 * rtol, "AB")
    assert "OuterFactoredMatrix(shape=" in repr(fm) and f"mdim={fm.mdim}" in repr(fm)


# --- decompositions ---------------------------------------------------------------------------------
@dtype_params
@chain_params
def test_S_svd_norm(name, dtype):
    fm, (L, A, B, R), M, scale = setup(name, dtype)
    k = k_of(fm)
    S = fm.S
    assert S.shape == (*fm.batch_shape, k) and S.dtype == real_dtype(dtype)
    assert_scaled_close(S, torch.linalg.svdvals(M)[..., :k], scale, tol(dtype), "S")
    U, S2, V = fm.svd()
    check_svd_of(U, S2, V, M, scale, dtype, k)
    assert fm.U is U and fm.V is V, "svd() is cached"
    norm = fm.norm()
    assert norm.shape == fm.batch_shape and norm.dtype == real_dtype(dtype)
    assert_scaled_close(norm, torch.linalg.matrix_norm(M), scale, tol(dtype), "norm")
    for method in ("gram", "qr"):
        assert_scaled_close(fm.norm(method), torch.linalg.matrix_norm(M), scale, tol(dtype), f"norm {method}")


@dtype_params
@square_params
def test_eigenvalues_eigvals_trace(name, dtype):
    fm, (L, A, B, R), M, scale = setup(name, dtype)
    r = M.dtype
    # TransformerLens's meaning: the eigenvalues of fm.B @ fm.A, i.e. of B R L A (m x m), LAPACK's order.
    BA = B.to(r) @ (R.to(r) if R is not None else torch.eye(fm.rdim, dtype=r)) @ (
        L.to(r) if L is not None else torch.eye(fm.ldim, dtype=r)) @ A.to(r)
    ev = fm.eigenvalues
    assert ev.shape == (*fm.batch_shape, fm.mdim) and ev.dtype.is_complex and ev.dtype.to_real() == real_dtype(dtype)
    ref = torch.linalg.eigvals(BA)
    assert_scaled_close(match_multiset(ev, ref), ref, scale, tol(dtype, "eig"), "eigenvalues")
    assert fm.eigenvalues is ev, "cached"
    # eigvals(): by descending modulus, the mdim - ldim beyond the product's size exact zeros.
    values = fm.eigvals()
    assert values.shape == ev.shape and values.dtype == ev.dtype
    assert bool((values.abs()[..., :-1] >= values.abs()[..., 1:]).all())
    if fm.mdim > fm.ldim:
        assert bool((values[..., fm.ldim :] == 0).all())
    padded = dense_eigenvalues_padded(M, fm.mdim)
    assert_scaled_close(match_multiset(values, padded), padded, scale, tol(dtype, "eig"), "eigvals")
    trace_ref = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)
    trace = fm.trace()
    assert trace.shape == fm.batch_shape and trace.dtype.is_complex == dtype.is_complex
    assert_scaled_close(trace, trace_ref, scale, tol(dtype), "trace")
    assert_scaled_close(ev.to(torch.complex128).sum(-1), trace_ref.to(torch.complex128), scale, tol(dtype, "eig"), "sum(ev)")


@pytest.mark.parametrize("name", ["ov", "qk_tied", "batched_outer", "repeated_rows", "non_tall_outer", "mdim_gt_ldim"])
@pytest.mark.parametrize("outer", ["shared", "formed"])
def test_forcing_outer_gives_the_same_results(name, outer):
    fm, factors, M, scale = setup(name)
    auto = fm.svdvals()
    forced = fm.svdvals(outer=outer)
    assert_scaled_close(forced, torch.linalg.svdvals(M)[..., : k_of(fm)], scale, tol(torch.float64), "S")
    assert_scaled_close(forced, auto, scale, tol(torch.float64), "S vs auto")
    assert_scaled_close(fm.norm(outer=outer), torch.linalg.matrix_norm(M), scale, tol(torch.float64), "norm")
    check_svd_of(*fm.svd(outer=outer), M, scale, torch.float64, k_of(fm))
    with choices.recorded() as log:
        fm.norm(outer=outer)
    decisions = [c for c in log if c.operation == "outer_factor"]
    assert len(decisions) == 1
    if outer == "formed":
        assert set(decisions[0].method.split("+")) == {"formed"} and "outer='formed'" in decisions[0].reason


@chain_params
def test_auto_choice_is_recorded(name):
    fm, *_ = setup(name)
    with choices.recorded() as log:
        fm.norm()
    decisions = [c for c in log if c.operation == "outer_factor"]
    assert [c.method for c in decisions] == [CHAINS[name][1]], [str(c) for c in decisions]
    for part in decisions[0].reason.split("; "):
        assert part.startswith(("L: ", "R^H: ")) and "(" in part  # each side with its figures


#: Chains for the top-k members, with inner dims wide enough for ARPACK (k < the core's dims - 1).
TOPK_CHAINS = {
    "ov": Chain((40, 8), (2, 8, 6), (2, 6, 8), (8, 30)),
    "qk_tied": Chain((40, 8), (2, 8, 6), (2, 6, 8), (8, 40), tie="R=L^T"),
    "batched_outer_tied": Chain((2, 1, 40, 8), (2, 8, 6), (2, 6, 8), (2, 1, 8, 40), tie="R=L^T"),
    "left_only": Chain((40, 8), (2, 8, 6), (2, 6, 30), None),
    "narrow_outer": Chain((40, 4), (4, 7), (7, 4), (4, 40)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128], ids=str)
@pytest.mark.parametrize("name", ["ov", "qk_tied", "batched_outer_tied", "left_only", "narrow_outer"])
@pytest.mark.parametrize("method", ["exact", "arpack"])
def test_svds(name, method, dtype):
    fm, factors, M, scale = setup_chain(TOPK_CHAINS[name], dtype)
    k = 2
    U, S, V = fm.svds(k, method)
    assert U.shape == (*fm.batch_shape, fm.ldim, k) and V.shape == (*fm.batch_shape, fm.rdim, k)
    assert S.shape == (*fm.batch_shape, k) and S.dtype == real_dtype(dtype)
    assert_scaled_close(S, torch.linalg.svdvals(M)[..., :k], scale, tol(dtype), "svds S")
    assert_orthonormal(U, tol(dtype, "ortho"), "svds U")
    assert_orthonormal(V, tol(dtype, "ortho"), "svds V")
    r = M.dtype  # each triplet: M v = s u
    assert_scaled_close(M @ V.to(r), U.to(r) * S.to(r)[..., None, :], scale, tol(dtype), "M v = s u")
    assert_scaled_close(fm.svds(k, method, return_singular_vectors=False), S, scale, tol(dtype), "values only")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128], ids=str)
@pytest.mark.parametrize("name", ["qk_tied", "batched_outer_tied", "narrow_outer"])
@pytest.mark.parametrize("method", ["exact", "arpack"])
def test_eigs(name, method, dtype):
    fm, factors, M, scale = setup_chain(TOPK_CHAINS[name], dtype)
    k = 2
    values = fm.eigs(k, method)
    assert values.shape == (*fm.batch_shape, k) and values.dtype.is_complex
    assert values.dtype.to_real() == real_dtype(dtype)
    dense_values = dense_eigenvalues_padded(M, fm.mdim)
    # The k of largest modulus; which member of a conjugate pair comes first is not fixed, so the
    # moduli are compared in order and each value with its nearest dense eigenvalue.
    top = dense_values.abs()[..., :k]
    assert_scaled_close(values.abs(), top, scale, tol(dtype, "eig"), "|eigs|")
    nearest = (values.to(torch.complex128)[..., :, None] - dense_values[..., None, :]).abs().amin(-1)
    assert_scaled_close(nearest, torch.zeros_like(nearest), scale, tol(dtype, "eig"), "eigs are eigenvalues")


def test_square_only_members_refuse_a_rectangular_product():
    fm, *_ = setup("ov")
    for member in (lambda: fm.eigenvalues, fm.eigvals, fm.trace, lambda: fm.eigs(1)):
        with pytest.raises(NotSquareError, match=r"needs a square product"):
            member()


# --- products ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["ov", "qk_tied", "batched_outer", "left_only", "right_only", "single_row"])
def test_products_with_vectors_and_matrices(name, dtype):
    fm, factors, M, scale = setup(name, dtype)
    gen = torch.Generator().manual_seed(1)
    r = M.dtype
    x = torch.randn(fm.rdim, dtype=r, generator=gen).to(dtype)
    y = torch.randn(fm.ldim, dtype=r, generator=gen).to(dtype)
    X = torch.randn(fm.rdim, 3, dtype=r, generator=gen).to(dtype)
    Y = torch.randn(2, fm.ldim, dtype=r, generator=gen).to(dtype)
    Xb = torch.randn(*fm.batch_shape, fm.rdim, 2, dtype=r, generator=gen).to(dtype)
    rtol = 4 * tol(dtype, "stored")  # each of the four factors' products is rounded to the dtype
    cases = {
        "fm @ x": (lambda: fm @ x, M @ x.to(r), x),
        "y @ fm": (lambda: y @ fm, y.to(r) @ M, y),
        "fm.matmul(X)": (lambda: fm.matmul(X), M @ X.to(r), X),
        "fm.matmul(Xb)": (lambda: fm.matmul(Xb), M @ Xb.to(r), Xb),
        "torch.matmul(fm, X)": (lambda: torch.matmul(fm, X), M @ X.to(r), X),
        "fm.rmatmul(Y)": (lambda: fm.rmatmul(Y), Y.to(r) @ M, Y),
        "torch.matmul(Y, fm)": (lambda: torch.matmul(Y, fm), Y.to(r) @ M, Y),
    }
    for what, (compute, expected, operand) in cases.items():
        out = compute()
        assert type(out) is torch.Tensor and out.dtype == dtype, what
        assert_scaled_close(out, expected, scale * float(torch.linalg.vector_norm(operand.to(r))), rtol, what)
    # With a matrix, `@` follows TransformerLens: a FactoredMatrix.
    for what, out, expected, operand in (("fm @ X", fm @ X, M @ X.to(r), X), ("Y @ fm", Y @ fm, Y.to(r) @ M, Y)):
        assert isinstance(out, FactoredMatrix), what
        assert_fm_close(out, expected, scale * float(torch.linalg.matrix_norm(operand.to(r))), rtol, what)
    # Operands that do not fit are refused with the package's errors, vectors included.
    other = torch.float32 if dtype != torch.float32 else torch.float64
    for bad, error in ((torch.ones(fm.rdim, dtype=other), DtypeMismatchError), (torch.ones(fm.rdim + 1, dtype=dtype), ShapeMismatchError)):
        with pytest.raises(error):
            fm @ bad
    with pytest.raises(ShapeMismatchError):
        torch.ones(fm.ldim + 1, dtype=dtype) @ fm


@pytest.mark.parametrize("name", ["ov", "qk_tied", "batched_outer", "left_only", "right_only"])
def test_widening_products_keep_the_outer_factors(name):
    fm, (L, A, B, R), M, scale = setup(name)
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(fm.rdim, fm.rdim + 7, dtype=torch.float64, generator=gen)
    tall = torch.randn(fm.ldim + 5, fm.ldim, dtype=torch.float64, generator=gen)
    right = fm @ wide
    assert isinstance(right, OuterFactoredMatrix) and right.mdim == fm.mdim and right.left is L
    assert right.right is wide if R is None else right.right.shape == (*R.shape[:-1], wide.shape[-1])
    assert_fm_close(right, M @ wide, scale * float(torch.linalg.matrix_norm(wide)), 1e-12, "fm @ wide")
    left = tall @ fm
    assert isinstance(left, OuterFactoredMatrix) and left.mdim == fm.mdim and left.right is R
    assert left.left is tall if L is None else left.left.shape == (*L.shape[:-2], tall.shape[-2], L.shape[-1])
    assert_fm_close(left, tall @ M, scale * float(torch.linalg.matrix_norm(tall)), 1e-12, "tall @ fm")
    both = tall @ fm @ wide
    assert_scaled_close(both.S, torch.linalg.svdvals(tall @ M @ wide)[..., : k_of(both)],
                        scale * float(torch.linalg.matrix_norm(tall) * torch.linalg.matrix_norm(wide)), 1e-11, "S")


def test_products_of_factored_matrices_build_it():
    gen = torch.Generator().manual_seed(3)

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=gen)

    W_E, W_U = t(30, 8), t(8, 30)
    ov = FactoredMatrix(t(4, 8, 2), t(4, 2, 8))
    circuit = W_E @ ov @ W_U  # TransformerLens's construction: both outer factors kept
    assert isinstance(circuit, OuterFactoredMatrix) and circuit.left is W_E and circuit.right is W_U
    assert circuit.mdim == 2 and circuit.shape == (4, 30, 30)
    M = W_E @ ov.A @ ov.B @ W_U
    assert_scaled_close(circuit.S, torch.linalg.svdvals(M)[..., :2], chain_scale(W_E, ov.A, ov.B, W_U), 1e-11, "S")
    # fm1 @ fm2 keeps the small core B1 @ A2 between A1 and B2.
    fm1 = FactoredMatrix(t(3, 30, 6), t(6, 9))
    fm2 = FactoredMatrix(t(9, 4), t(4, 25))
    product = fm1 @ fm2
    assert isinstance(product, OuterFactoredMatrix) and product.mdim == 4
    assert product.left is fm1._A and product._args[1] is fm2._B
    expected = dense_chain(fm1._A, fm1._B, fm2._A, fm2._B)
    scale = chain_scale(fm1._A, fm1._B, fm2._A, fm2._B)
    assert_fm_close(product, expected, scale, 1e-12, "fm1 @ fm2")
    assert_scaled_close(product.S, torch.linalg.svdvals(expected)[..., :4], scale, 1e-11, "S of fm1 @ fm2")
    # A tensor that does not widen the product is multiplied in, as before.
    narrow = t(30, 3)
    assert type(circuit @ narrow) is FactoredMatrix


# --- shape operations ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@pytest.mark.parametrize("name", ["ov", "qk_tied", "batched_outer", "left_only", "right_only", "mdim_gt_ldim"])
def test_transpose(name, dtype):
    fm, (L, A, B, R), M, scale = setup(name, dtype)
    for T in (fm.T, fm.mT, fm.transpose(-1, -2)):
        assert isinstance(T, OuterFactoredMatrix) and (T.ldim, T.mdim, T.rdim) == (fm.rdim, fm.mdim, fm.ldim)
        assert_fm_close(T, M.mT, scale, tol(dtype), "T")  # the transpose, not the conjugate transpose
        assert (T.left is None) == (R is None) and (T.right is None) == (L is None)
    assert_fm_close(fm.T.T, M, scale, tol(dtype), "T.T")
    assert_scaled_close(fm.T.S, torch.linalg.svdvals(M)[..., : k_of(fm)], scale, tol(dtype), "S of T")


#: (index, reference on the dense (3, 24, 20) product), TransformerLens's meaning: an int on a
#: matrix dim keeps it, picks on both matrix dims select a sub-matrix.
INDEX_CASES = {
    "lead_int": (1, lambda D: D[1]),
    "lead_slice": (slice(0, 2), lambda D: D[0:2]),
    "lead_list": ([2, 0], lambda D: D[[2, 0]]),
    "lead_mask": (torch.tensor([True, False, True]), lambda D: D[torch.tensor([True, False, True])]),
    "row_int": ((0, 3), lambda D: D[0, 3:4]),
    "row_slice": ((slice(None), slice(2, 9)), lambda D: D[:, 2:9]),
    "row_list": ((..., [5, 1, 5], slice(None)), lambda D: D[..., [5, 1, 5], :]),
    "row_mask": ((..., torch.arange(24) % 3 == 0, slice(None)), lambda D: D[..., torch.arange(24) % 3 == 0, :]),
    "col_int": ((..., -1), lambda D: D[..., -1:]),
    "col_list": ((..., slice(None), [0, 19, 4]), lambda D: D[..., [0, 19, 4]]),
    "col_array": ((..., slice(None), np.array([3, 2])), lambda D: D[..., [3, 2]]),
    "picks_on_both": ((..., [1, 2], [3, 4, 5]), lambda D: D[..., [1, 2], :][..., [3, 4, 5]]),
    "all_three": ((2, 7, slice(1, 4)), lambda D: D[2, 7:8, 1:4]),
    "single_entry": ((1, 5, 6), lambda D: D[1, 5:6, 6:7]),
    "new_lead_dim": ((None, 0), lambda D: D[None, 0]),
    "row_empty": ((..., [], slice(None)), lambda D: D[..., :0, :]),
}


@pytest.mark.parametrize("name", ["ov", "batched_outer"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_indexing(name, case):
    fm, (L, A, B, R), M, scale = setup(name)
    index, reference = INDEX_CASES[case]
    if name == "batched_outer":  # shape (2, 3, 24, 20): the same index on the second leading dim on
        index = (slice(None), *(index if isinstance(index, tuple) else (index,)))
        expected = torch.stack([reference(M[i]) for i in range(2)])
    else:
        expected = reference(M)
    result = fm[index]
    assert isinstance(result, OuterFactoredMatrix), type(result)
    assert_fm_close(result, expected, scale.amax(), 1e-13, case)
    # Rows index L only and columns R only: the other outer factor is not copied.
    if case.startswith("row"):
        assert result.right.data_ptr() == R.data_ptr() and result.right.numel() == R.numel()
    if case.startswith("col"):
        assert result.left.data_ptr() == L.data_ptr() and result.left.numel() == L.numel()
    if case.startswith("lead") and L.dim() == 2:  # a 2-D outer factor shared over the leading dims
        assert result.left.numel() == L.numel(), "not expanded along the leading dims"
        if case in ("lead_int", "lead_slice"):
            assert result.left.data_ptr() == L.data_ptr(), "a view"
    assert_scaled_close(result.S, torch.linalg.svdvals(expected)[..., : k_of(result)], scale.amax(), 1e-11, f"S of {case}")


def test_indexing_that_picks_entries_or_adds_matrix_dims_gives_tensors():
    fm, factors, M, scale = setup("ov")
    mask = torch.zeros(24, 20, dtype=torch.bool)
    mask[3, 4] = mask[10, 0] = True
    for index, expected in (
        ((..., mask), M[..., mask]),
        ((..., torch.tensor([[0], [2]]), torch.tensor([1, 3])), M[..., torch.tensor([[0], [2]]), torch.tensor([1, 3])]),
        ((0, slice(None), None), M[0, :, None]),
    ):
        result = fm[index]
        assert type(result) is torch.Tensor
        assert_scaled_close(result, expected, scale.amax(), 1e-13, str(index))


@pytest.mark.parametrize("name", ["ov", "qk_tied", "batched_outer", "right_only"])
def test_sums_and_arithmetic(name):
    fm, (L, A, B, R), M, scale = setup(name)
    rtol = 1e-12
    assert_scaled_close(fm.sum(), M.sum(), scale.sum() * M.shape[-1] * M.shape[-2], rtol, "sum()")
    assert_scaled_close(fm.sum(-1), M.sum(-1), scale[..., None] * M.shape[-1], rtol, "sum(-1)")
    assert_scaled_close(fm.sum(-2), M.sum(-2), scale[..., None] * M.shape[-2], rtol, "sum(-2)")
    batch_sum = fm.sum(0)
    assert isinstance(batch_sum, FactoredMatrix)
    assert_fm_close(batch_sum, M.sum(0), scale.sum(0), rtol, "sum(0)")
    for what, result, expected in (
        ("fm * 2.5", fm * 2.5, 2.5 * M),
        ("2.5 * fm", 2.5 * fm, 2.5 * M),
        ("fm / 4", fm / 4, M / 4),
        ("-fm", -fm, -M),
        ("fm * tensor(3)", fm * torch.tensor(3.0, dtype=torch.float64), 3 * M),
    ):
        # Scalar multiples keep the outer factors (the scale goes into A).
        assert isinstance(result, OuterFactoredMatrix) and result.left is L and result.right is R, what
        assert_fm_close(result, expected, 4 * scale, rtol, what)
    for what, result, expected in (
        ("fm + fm", fm + fm, 2 * M),
        ("fm - fm", fm - fm, 0 * M),
        ("fm + FactoredMatrix", fm + FactoredMatrix(fm.A, fm.B), 2 * M),
        ("fm + 1.5", fm + 1.5, M + 1.5),
        ("tensor + fm", M[0, 0] + fm, M + M[0, 0]),
    ):
        assert_fm_close(result, expected, 2 * scale + scale.amax(), rtol, what)
    with pytest.raises(ShapeMismatchError):
        fm * torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("name", ["ov", "batched_outer", "left_only", "right_only"])
def test_unsqueeze_squeeze_permute_expand(name):
    fm, (L, A, B, R), M, scale = setup(name)
    nb = len(fm.batch_shape)
    for dim in (0, nb, -3):
        result = fm.unsqueeze(dim)
        assert isinstance(result, OuterFactoredMatrix)
        assert_fm_close(result, M.unsqueeze(dim), scale.unsqueeze(dim if dim >= 0 else dim + 2), 1e-13, f"unsqueeze({dim})")
    single = fm[:1] if nb == 1 else fm[:, :1]
    position = nb - 1
    squeezed = single.squeeze(position)
    # A size-1 leading dim goes from every factor; the outer factors stay outer factors.
    assert isinstance(squeezed, OuterFactoredMatrix) and squeezed.batch_shape == single.batch_shape[:-1]
    assert (squeezed.left is None) == (L is None) and (squeezed.right is None) == (R is None)
    assert_fm_close(squeezed, M[:1].squeeze(0) if nb == 1 else M[:, :1].squeeze(1), scale.amax(), 1e-13, "squeeze")
    assert fm.squeeze(-2) is fm  # a row dim of size 24: nothing to squeeze
    column = fm[..., :1].squeeze(-1)
    assert type(column) is torch.Tensor
    assert_scaled_close(column, M[..., 0], scale[..., None], 1e-13, "squeeze(-1)")
    # linear_operator's permute and expand of the leading dims
    if nb == 2:
        permuted = fm.permute(1, 0, 2, 3)
        assert isinstance(permuted, OuterFactoredMatrix)
        assert_fm_close(permuted, M.permute(1, 0, 2, 3), scale.mT, 1e-13, "permute")
    expanded = single.expand(*single.batch_shape[:-1], 4, *single.shape[-2:])
    assert isinstance(expanded, OuterFactoredMatrix)
    assert_fm_close(expanded, dense_chain(*single._chain()).expand(expanded.shape), scale.amax(), 1e-13, "expand")
    S_ref = torch.linalg.svdvals(dense_chain(*single._chain()))[..., : k_of(fm)]
    assert_scaled_close(expanded.S, S_ref.expand(*expanded.batch_shape, -1), scale.amax(), 1e-11, "S of expand")


@pytest.mark.parametrize("name", ["ov", "batched_outer", "right_only", "single_row"])
def test_get_corner(name):
    fm, factors, M, scale = setup(name)
    for k in (1, 3):
        corner = fm.get_corner(k)
        assert type(corner) is torch.Tensor
        assert_scaled_close(corner, M[tuple(slice(k) for _ in range(M.dim()))], scale.amax(), 1e-13, f"get_corner({k})")


# --- gradients -------------------------------------------------------------------------------------
def _leaves(factors):
    """Fresh leaves for the factors, a tied ``R = L.mT`` kept tied (one leaf, used twice)."""
    L, A, B, R = factors
    leaves = [None if X is None else X.detach().clone().requires_grad_(True) for X in (L, A, B)]
    if R is not None and L is not None and R.data_ptr() == L.data_ptr():
        R_leaf = leaves[0].mT
    else:
        R_leaf = None if R is None else R.detach().clone().requires_grad_(True)
    return [*leaves, R_leaf]


def _grads(leaves):
    return [None if X is None or not X.is_leaf else X.grad for X in leaves]


def _dense_trace_powers(M):
    """``tr(M^2) + tr(M^3) / 10 = sum(ev^2) + sum(ev^3) / 10``: smooth in the eigenvalues, so its
    gradient is defined for repeated ones; the dense reference of the eigenvalue loss."""
    M2 = M @ M
    return torch.diagonal(M2, dim1=-2, dim2=-1).sum() + torch.diagonal(M2 @ M, dim1=-2, dim2=-1).sum() / 10


#: what -> (loss of the OuterFactoredMatrix, loss of the dense product)
LOSSES = {
    "S": (lambda fm: (fm.S * torch.arange(1, k_of(fm) + 1)).sum(),
          lambda M, k: (torch.linalg.svdvals(M)[..., :k] * torch.arange(1, k + 1)).sum()),
    "norm": (lambda fm: fm.norm().sum(), lambda M, k: torch.linalg.matrix_norm(M).sum()),
    "eigenvalues": (lambda fm: (fm.eigenvalues**2).real.sum() + (fm.eigenvalues**3).real.sum() / 10,
                    lambda M, k: _dense_trace_powers(M)),
    "trace": (lambda fm: fm.trace().sum(), lambda M, k: torch.diagonal(M, dim1=-2, dim2=-1).sum()),
}


#: chain -> the losses whose gradient is defined there: eigenvalue losses need a full-rank m x m
#: B R L A (torch's eig backward is NaN at repeated eigenvalues, so not with mdim above a dim of
#: the product), S losses distinct singular values (not the zeros beyond a rank below k).
GRADIENT_CASES = [
    (name, what)
    for name, whats in {
        "ov_square": LOSSES, "qk_tied": LOSSES, "tied_unembed": LOSSES, "batched_outer_tied": LOSSES,
        "left_only_square": LOSSES, "repeated_rows": LOSSES, "unshared_outer": ("S", "norm"),
        "non_tall_outer": ("S", "norm"), "mdim_gt_ldim": ("S", "norm", "trace"), "narrow_outer": ("norm", "trace"),
    }.items()
    for what in whats
]


@pytest.mark.parametrize("name, what", GRADIENT_CASES)
def test_gradients_to_every_factor_match_dense(name, what):
    chain = CHAINS[name][0]
    loss, dense_loss = LOSSES[what]
    factors = make_chain(chain, torch.float64, seed=4)
    leaves = _leaves(factors)
    L, A, B, R = leaves
    fm = OuterFactoredMatrix(A, B, left=L, right=R)
    k = k_of(fm)
    with torch.no_grad():  # a result cached without gradients must not be handed back below
        loss(fm)
    loss(fm).backward()
    ref = _leaves(factors)
    dense_loss(dense_chain(*ref), k).backward()
    for got, want, which in zip(_grads(leaves), _grads(ref), "LABR"):
        if want is None:
            assert got is None, which
            continue
        assert got is not None and got.shape == want.shape, which
        assert_scaled_close(got, want, float(want.abs().max()), 1e-9, f"d{what}/d{which}")


@pytest.mark.parametrize("member", ["svd", "svds"])
def test_gradients_of_singular_vectors_take_the_formed_path(member):
    # n = r = p + 1 = m + 1: the dense thin SVD has one zero singular value, so its autograd is
    # defined (a repeated zero would make torch's backward NaN).
    chain = Chain((5, 4), (2, 4, 4), (2, 4, 4), (4, 5))
    factors = make_chain(chain, torch.float64, seed=5)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, dtype=torch.float64, generator=gen), torch.randn(5, dtype=torch.float64, generator=gen)
    w = torch.arange(1.0, 5.0, dtype=torch.float64)

    def vector_loss(U, V):  # sign-invariant in each singular pair
        return ((x @ U[..., :4]) ** 2 * w + (y @ V[..., :4]) ** 2 * w).sum()

    for on_outer in (True, False):
        leaves = _leaves(factors)
        if not on_outer:
            leaves[0].requires_grad_(False)
            leaves[3].requires_grad_(False)
        fm = OuterFactoredMatrix(leaves[1], leaves[2], left=leaves[0], right=leaves[3])
        with choices.recorded() as log, warnings.catch_warnings():
            warnings.simplefilter("error")  # distinct singular values: no UndefinedGradientWarning
            U, S, V = fm.svd() if member == "svd" else fm.svds(4, "exact")
        decision = next(c for c in log if c.operation == "outer_factor")
        # Gradient on an outer factor: a constant Q_L would lose part of dU, so that side is formed.
        assert decision.method == ("formed+formed" if on_outer else "basis+basis"), str(decision)
        vector_loss(U, V).backward()
        ref = _leaves(factors)
        U_ref, _, Vh_ref = torch.linalg.svd(dense_chain(*ref), full_matrices=False)
        vector_loss(U_ref, Vh_ref.mH).backward()
        for got, want, which in zip(_grads(leaves), _grads(ref), "LABR"):
            if not on_outer and which in "LR":
                assert got is None
                continue
            assert_scaled_close(got, want, float(want.abs().max()), 1e-9, f"d(vectors)/d{which}")


# --- bad and non-finite input ------------------------------------------------------------------------
def _bad_inputs():
    A, B = torch.randn(3, 6, 2), torch.randn(3, 2, 6)
    t = torch.randn
    return A, B, {
        "left has the wrong number of columns":
            (dict(left=t(20, 5)), ShapeMismatchError, r"`left` of shape \(20, 5\) has 5 columns"),
        "right has the wrong number of rows":
            (dict(right=t(5, 20)), ShapeMismatchError, r"`right` of shape \(5, 20\) has 5 rows"),
        "left of another dtype":
            (dict(left=t(20, 6, dtype=torch.float64)), DtypeMismatchError, r"`left` must have the inner factors' dtype"),
        "right of another dtype":
            (dict(right=t(6, 20, dtype=torch.float16)), DtypeMismatchError, r"`right` must have the inner factors' dtype"),
        "left on another device": (dict(left=t(20, 6, device="meta")), DeviceMismatchError, r"`left` is on meta"),
        "right on another device": (dict(right=t(6, 20, device="meta")), DeviceMismatchError, r"`right` is on meta"),
        "left not a tensor": (dict(left=np.ones((20, 6), dtype=np.float32)), TypeError, r"`left` must be a torch.Tensor"),
        "right an integer tensor":
            (dict(right=torch.ones(6, 20, dtype=torch.int64)), TypeError, r"`right` must have a floating or complex dtype"),
        "left of one dim": (dict(left=t(6)), ValueError, r"`left` must have at least 2 dims"),
        "left's leading dims do not broadcast":
            (dict(left=t(4, 20, 6)), BroadcastError, r"`left` of shape \(4, 20, 6\) and `A`"),
        "right's leading dims do not broadcast": (dict(right=t(2, 6, 20)), BroadcastError, r"`right` of shape \(2, 6, 20\)"),
        "outer leading dims clash with each other":
            (dict(left=t(4, 1, 20, 6), right=t(5, 1, 6, 20)), BroadcastError, r"`left` .* `right`"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()[2]))
def test_bad_input_names_the_argument(case):
    A, B, cases = _bad_inputs()
    kwargs, error, message = cases[case]
    with pytest.raises(error, match=message):
        OuterFactoredMatrix(A, B, **kwargs)
    assert issubclass(error, (ValueError, TypeError))


def test_outer_factors_are_passed_by_name():
    A, B = torch.randn(6, 2), torch.randn(2, 6)
    with pytest.raises(TypeError, match=r"pass the outer factors by name"):
        OuterFactoredMatrix(A, B, torch.randn(20, 6))
    with pytest.raises(ShapeMismatchError, match=r"inner dimensions differ"):
        OuterFactoredMatrix(A, torch.randn(3, 6), left=torch.randn(20, 6))


VALUES = {
    "S": lambda fm: fm.S,
    "svd": lambda fm: torch.cat([X.reshape(*fm.batch_shape, -1).abs() for X in fm.svd()], -1),
    "svdvals formed": lambda fm: fm.svdvals(outer="formed"),
    "eigenvalues": lambda fm: fm.eigenvalues,
    "eigvals": lambda fm: fm.eigvals(),
    "svds": lambda fm: fm.svds(1)[1],
    "eigs": lambda fm: fm.eigs(1),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex64], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["left", "right", "one_member_of_batched_left"])
def test_non_finite_outer_factor_gives_nan_never_a_crash(where, bad, dtype):
    # LAPACK's geev crashes the process on NaN in float32 and complex input; every path must guard.
    L, A, B, _ = make_chain(Chain((3, 24, 6) if where.startswith("one") else (24, 6), (3, 6, 2), (3, 2, 6), None), dtype)
    L = L.clone()
    R = L.mT.clone()  # square, untied: the closing product R L is formed
    if where == "right":
        R[1, 5] = bad
    elif where == "left":
        L[3, 2] = bad
    else:
        L[1, 3, 2] = bad
    fm = OuterFactoredMatrix(A, B, left=L, right=R)
    hit = torch.tensor([True, True, True]) if not where.startswith("one") else torch.tensor([False, True, False])
    M, scale = dense_chain(L, A, B, R), chain_scale(L, A, B, R)
    for what, value in VALUES.items():
        result = value(fm)
        assert bool(result[hit].isnan().all()), f"{what}: {result}"
        if not bool(hit.all()):  # the other members are unaffected
            good = ~hit
            assert bool(torch.isfinite(result[good]).all()), what
            if what in ("S", "svdvals formed"):
                assert_scaled_close(result[good], torch.linalg.svdvals(M[good])[..., :2], scale[good], tol(dtype), what)
    # The norm and the trace are sums: non-finite (NaN, or infinity where no inf - inf occurred).
    for what, result in (("norm", fm.norm()), ("trace", fm.trace())):
        assert not bool(torch.isfinite(result[hit]).any()), f"{what}: {result}"
        assert bool(torch.isfinite(result[~hit]).all()), what
