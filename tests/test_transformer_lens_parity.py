"""TransformerLens's ``FactoredMatrix`` behaviours, one block per row of issue 10's table.

Each is checked against the dense float64 product (or against torch on it); the errors' classes are
in ``test_errors.py``, indexing in full in ``test_indexing.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_scaled_close, dense, make_factors, make_fm, match_multiset, scale_of, tol

from lowrank_op import FactoredMatrix

f64 = torch.float64


class TensorLike:
    """A stand-in for a Tensor that is not one: TransformerLens's ``TensorLike`` protocol, and an
    ``__rmatmul__`` so that ``Tensor @ TensorLike`` works."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    ndim = property(lambda self: self.tensor.ndim)
    shape = property(lambda self: self.tensor.shape)

    def size(self, dim=None):
        return self.tensor.size() if dim is None else self.tensor.size(dim)

    def unsqueeze(self, dim):
        return TensorLike(self.tensor.unsqueeze(dim))

    def squeeze(self, dim):
        return TensorLike(self.tensor.squeeze(dim))

    def broadcast_to(self, shape):
        return TensorLike(self.tensor.broadcast_to(shape))

    def __matmul__(self, other):
        if isinstance(other, FactoredMatrix):
            return NotImplemented
        return TensorLike(self.tensor @ (other.tensor if isinstance(other, TensorLike) else other))

    def __rmatmul__(self, other):
        return TensorLike(other @ self.tensor)


# --- has_leading_dims, and A / B as broadcast views -----------------------------------------------
@pytest.mark.parametrize(
    "a_shape, b_shape, leading",
    [((5, 3), (3, 4), False), ((1, 5, 3), (3, 4), True), ((5, 3), (2, 4, 3, 4), True), ((2, 1, 5, 3), (3, 3, 4), True)],
)
def test_has_leading_dims_and_broadcast_views(a_shape, b_shape, leading):
    A, B = make_factors(a_shape, b_shape)
    fm = FactoredMatrix(A, B)
    assert fm.has_leading_dims is leading
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    assert fm.A.shape == (*batch, 5, 3) and fm.B.shape == (*batch, 3, 4)
    assert fm.A.data_ptr() == A.data_ptr() and fm.B.data_ptr() == B.data_ptr(), "views, not copies"
    assert fm.pair[0].shape == fm.A.shape and fm.pair[1].shape == fm.B.shape
    # Computations keep the factors as given (one factorisation of a shared factor).
    assert fm._A is A and fm._B is B


@pytest.mark.parametrize("inner", [(3, 4), (6, 2)], ids=["core", "dense_pair"])
def test_product_factors_have_the_full_leading_shape(inner):
    m, r = inner
    left = make_fm((2, 1, 5, m), (m, r))
    right = make_fm((r, 3), (4, 3, 6))
    product = left @ right
    assert product.A.shape[:-2] == (2, 4) and product.B.shape[:-2] == (2, 4)
    expected = dense(left.A, left.B) @ dense(right.A, right.B)
    assert_scaled_close(dense(product.A, product.B), expected, scale_of(left.A, left.B) * 10, 1e-12, "product")


# --- an int on a matrix dim keeps it; picks on both are outer --------------------------------------
@pytest.mark.parametrize(
    "index, reference",
    [
        ((0, 1, 2), lambda D: D[0, 1, 2:3]),
        ((0, 1, -1), lambda D: D[0, 1, -1:]),
        ((0, 1, 2, 3), lambda D: D[0, 1, 2:3, 3:4]),
        ((..., -1), lambda D: D[..., -1:]),
        ((..., -1, -1), lambda D: D[..., -1:, -1:]),
        ((0, 1, [0, 2], [1, 3]), lambda D: D[0, 1][[0, 2]][:, [1, 3]]),
        ((0, 1, torch.tensor([0, 2]), torch.tensor([1, 3])), lambda D: D[0, 1][[0, 2]][:, [1, 3]]),
        ((..., [4, 0, 4], 2), lambda D: D[..., [4, 0, 4], 2:3]),
        ((slice(None), 0, [1], [5, 0]), lambda D: D[:, 0][..., [1], :][..., [5, 0]]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
def test_matrix_dim_indices(index, reference, dtype):
    fm = make_fm((3, 1, 5, 4), (2, 4, 6), dtype)
    out = fm[index]
    assert isinstance(out, FactoredMatrix)
    expected = reference(dense(fm.A, fm.B))
    assert out.shape == expected.shape
    assert_scaled_close(dense(out.A, out.B), expected, scale_of(fm.A, fm.B).amax(), tol(dtype, "stored"), str(index))


@pytest.mark.parametrize(
    "index, reference",
    [
        ((..., None), lambda D: D[..., None]),
        ((0, slice(None), None), lambda D: D[0, :, None]),
        ((0, 1, 2, None, 3), lambda D: D[0, 1, 2:3, None, 3:4]),
        ((torch.tensor([True, False, True]),), lambda D: D[[0, 2]]),
        ((..., torch.tensor([True, False, False, True, True]), slice(None)), lambda D: D[..., [0, 3, 4], :]),
        ((slice(None), [False, True], 0), lambda D: D[:, [1], 0:1]),
        ((0, 0, torch.rand(5, 6) > 0.5), lambda D, m=None: None),  # entries; reference built below
    ],
)
def test_none_after_the_matrix_dims_and_masks(index, reference):
    fm = make_fm((3, 1, 5, 4), (2, 4, 6))
    D = dense(fm.A, fm.B)
    out = fm[index]
    expected = reference(D)
    if expected is None:  # a 2-D mask over rows and columns: the selected entries, as torch gives them
        expected = D[index]
        assert type(out) is torch.Tensor
    if isinstance(out, FactoredMatrix):
        out = dense(out.A, out.B)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)


# --- TensorLike operands keep their type -----------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [((2, 3), (3, 4)), ((2, 6), (6, 4)), ((3, 2, 3), (3, 4))])
def test_tensor_like_operands(a_shape, b_shape):
    fm = make_fm(a_shape, b_shape)
    D = dense(fm.A, fm.B)
    X, v = torch.randn(4, 5, dtype=f64), torch.randn(4, dtype=f64)
    Y, w = torch.randn(7, 2, dtype=f64), torch.randn(2, dtype=f64)

    right = fm @ TensorLike(X)
    assert isinstance(right, FactoredMatrix) and isinstance(right.AB, TensorLike)
    torch.testing.assert_close(right.AB.tensor, D @ X)
    left = TensorLike(Y) @ fm
    assert isinstance(left, FactoredMatrix) and isinstance(left.AB, TensorLike)
    torch.testing.assert_close(left.AB.tensor, Y @ D)
    assert left.shape == (*fm.batch_shape, 7, 4) and left.has_leading_dims == fm.has_leading_dims
    vec = fm @ TensorLike(v)
    assert isinstance(vec, TensorLike)
    torch.testing.assert_close(vec.tensor, D @ v)
    rvec = TensorLike(w) @ fm
    assert isinstance(rvec, TensorLike)
    torch.testing.assert_close(rvec.tensor, w @ D)
    assert isinstance(repr(right), str)


def test_tensor_like_factors_BA_and_errors():
    A, B = torch.randn(4, 3, dtype=f64), torch.randn(3, 4, dtype=f64)
    fm = FactoredMatrix(TensorLike(A), B)
    assert isinstance(fm.BA, TensorLike)
    torch.testing.assert_close(fm.BA.tensor, B @ A)
    assert fm.A.tensor is A and fm.shape == (4, 4)
    with pytest.raises(ValueError, match=r"shapes do not match for a product: .* which needs 4 rows"):
        fm @ TensorLike(torch.randn(3, 2, dtype=f64))
    with pytest.raises(ValueError, match=r"inner dimensions differ"):
        FactoredMatrix(TensorLike(A), torch.randn(4, 4, dtype=f64))


# --- eigenvalues are TransformerLens's; eigvals() sorted -------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("a_shape, b_shape", [((5, 3), (3, 5)), ((3, 6), (6, 3)), ((2, 1, 4, 4), (3, 4, 4))])
def test_eigenvalues_are_those_of_BA(a_shape, b_shape, dtype):
    fm = make_fm(a_shape, b_shape, dtype)
    ev = fm.eigenvalues
    assert ev.shape == (*fm.batch_shape, fm.mdim)
    if dtype in (torch.bfloat16, torch.float16):
        assert ev.dtype == torch.complex64
    # In LAPACK's order: the order of eig(B @ A) computed here in the same working precision.
    work = torch.promote_types(dtype, torch.float32)
    lapack = torch.linalg.eigvals(fm._B.to(work) @ fm._A.to(work))
    scale = scale_of(fm.A, fm.B)[..., None]
    assert bool(((ev - lapack).abs() <= tol(dtype, "eig") * scale).all())
    ref = torch.linalg.eigvals(dense(fm.B, fm.A))
    assert_scaled_close(match_multiset(ev, ref), ref, scale_of(fm.A, fm.B), tol(dtype, "eig"), "eigenvalues")
    # eigvals(): the same multiset up to rounding, sorted by modulus, the extra ones exact zeros.
    sorted_ev = fm.eigvals()
    assert bool((sorted_ev.abs()[..., :-1] >= sorted_ev.abs()[..., 1:]).all())
    assert_scaled_close(match_multiset(sorted_ev, ref), ref, scale_of(fm.A, fm.B), tol(dtype, "eig"), "eigvals")


# --- the syntax follows TransformerLens; linear_operator's methods keep its contract --------------
def test_operators_and_methods_side_by_side():
    fm = make_fm((2, 5, 3), (3, 4))
    D = dense(fm.A, fm.B)
    X = torch.randn(4, 6, dtype=f64)
    assert isinstance(fm @ X, FactoredMatrix)
    assert type(fm.matmul(X)) is torch.Tensor and type(torch.matmul(fm, X)) is torch.Tensor
    torch.testing.assert_close(fm.matmul(X), D @ X)
    W = torch.randn(2, 5, 4, dtype=f64)
    torch.testing.assert_close(fm.mul(W).to_dense(), D * W)  # elementwise, linear_operator's
    with pytest.raises(ValueError, match="must be a scalar"):
        fm * W  # TransformerLens's `*`: scalars only
    torch.testing.assert_close(fm.T.to_dense(), D.mT)
    torch.testing.assert_close(fm.transpose(-1, -2).to_dense(), D.mT)


@pytest.mark.parametrize("dim", [0, 1, -3, -4])
def test_unsqueeze_leading_positions(dim):
    fm = make_fm((2, 5, 3), (3, 4))
    out = fm.unsqueeze(dim)
    assert isinstance(out, FactoredMatrix)
    torch.testing.assert_close(dense(out.A, out.B), dense(fm.A, fm.B).unsqueeze(dim))


@pytest.mark.parametrize("scalar", [np.float64(2.5), np.float32(-2.0), np.int64(3)], ids=["f64", "f32", "i64"])
def test_numpy_scalars_multiply(scalar):
    fm = make_fm((2, 5, 3), (3, 4))
    D = dense(fm.A, fm.B)
    for out in (fm * scalar, scalar * fm):
        assert isinstance(out, FactoredMatrix)
        torch.testing.assert_close(out.to_dense(), D * float(scalar))
