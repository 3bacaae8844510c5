"""Every error the package raises on bad arguments: its type and the words of its message."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from helpers import make_factors, make_fm, with_condition

from lowrank_op import FactoredMatrix, composition_scores, kernels


def f64(*shape):
    return torch.randn(*shape, dtype=torch.float64)


DTYPE = r"`A` must have a floating or complex dtype, got "
INNER = r"inner dimensions differ: `A` of shape \(3, 2\) has mdim 2 columns but `B` of shape \(3, 4\) has 3 rows"
SAME_DTYPE = r"`A` and `B` must have the same dtype, got A torch\.float64 and B torch\.float32; cast one"
LEADING = (
    r"leading dims do not broadcast: `A` of shape \(2, 3, 2\) and `B` of shape \(3, 2, 4\) \(sizes 2 and 3 "
    r"mismatch at dim -3\); index or unsqueeze"
)


# --- construction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "A, B, exc, match",
    [
        (np.ones((3, 2)), f64(2, 3), TypeError, r"`A` must be a torch\.Tensor, got ndarray"),
        (f64(3, 2), [[1.0, 2.0, 3.0]] * 2, TypeError, r"`B` must be a torch\.Tensor, got list"),
        (3.0, f64(2, 3), TypeError, r"`A` must be a torch\.Tensor, got float"),
        (None, None, TypeError, r"`A` must be a torch\.Tensor, got NoneType"),
        (torch.ones(3, 2, dtype=torch.int64), f64(2, 3), TypeError, DTYPE + r"torch\.int64; cast it with A\.float\(\)"),
        (f64(3, 2), torch.ones(2, 3, dtype=torch.int32), TypeError, r"`B`" + DTYPE[3:] + r"torch\.int32"),
        (torch.ones(3, 2, dtype=torch.bool), f64(2, 3), TypeError, DTYPE + r"torch\.bool"),
        (torch.ones(3, 2, dtype=torch.uint8), f64(2, 3), TypeError, r"floating or complex dtype"),
        (f64(3), f64(3, 2), ValueError, r"`A` must have at least 2 dims .* got shape \(3,\)"),
        (f64(3, 2), f64(2), ValueError, r"`B` must have at least 2 dims .* got shape \(2,\)"),
        (torch.tensor(1.0, dtype=torch.float64), f64(1, 1), ValueError, r"`A` must have at least 2 dims"),
        (f64(3, 2), f64(3, 4), ValueError, INNER),
        (f64(2, 3, 2), f64(3, 2, 4), ValueError, LEADING),
        (f64(2, 1, 3, 2), f64(4, 3, 2, 4), ValueError, r"do not broadcast: .* \(sizes 2 and 4 mismatch at dim -4\)"),
        (f64(3, 2), torch.randn(2, 3), TypeError, SAME_DTYPE),
        (torch.randn(3, 2, dtype=torch.complex64), torch.randn(2, 3), TypeError, r"same dtype"),
        (f64(3, 2), f64(2, 3).to("meta"), ValueError, r"same device, got A on cpu and B on meta"),
    ],
)
def test_constructor_errors(A, B, exc, match):
    with pytest.raises(exc, match=match):
        FactoredMatrix(A, B)


# --- method= choices ------------------------------------------------------------------------------
SVD_CHOICES = re.escape("`method` must be one of 'auto', 'householder', 'cholqr2'; got")
NORM_CHOICES = re.escape("`method` must be one of 'auto', 'gram', 'qr'; got")


@pytest.mark.parametrize("bad", ["foo", "Auto", "qr", None, 1])
def test_unknown_svd_method(bad):
    fm = make_fm((6, 3), (3, 5))
    for call in (fm.svd, fm.svdvals):
        with pytest.raises(ValueError, match=SVD_CHOICES):
            call(bad)
    A, B = fm.A, fm.B
    for call in (kernels.svd, kernels.svdvals):
        with pytest.raises(ValueError, match=SVD_CHOICES):
            call(A, B, bad)
    with pytest.raises(ValueError, match=SVD_CHOICES):
        kernels.orthogonalize(A, bad)


@pytest.mark.parametrize("bad", ["frobenius", "householder", None])
def test_unknown_norm_method(bad):
    fm = make_fm((6, 3), (3, 5))
    with pytest.raises(ValueError, match=NORM_CHOICES):
        fm.norm(bad)
    with pytest.raises(ValueError, match=NORM_CHOICES):
        kernels.frobenius_norm(fm.A, fm.B, bad)


def test_unknown_method_message_names_the_value():
    with pytest.raises(ValueError, match=r"got 'foo'\.$"):
        make_fm((6, 3), (3, 5)).svd("foo")


def test_cholqr2_needs_a_tall_factor():
    message = r"`method='cholqr2'` needs a factor with at least as many rows as columns; got shape \(3, 5\)"
    with pytest.raises(ValueError, match=message):
        kernels.orthogonalize(f64(3, 5), "cholqr2")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholqr2_numerical_failure_names_householder(dtype):
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(40, 2, dtype=torch.float64, generator=gen) @ torch.randn(2, 5, dtype=torch.float64, generator=gen)
    X = X.to(dtype)
    fm = FactoredMatrix(X, torch.randn(5, 30, dtype=dtype))
    message = r"CholeskyQR2 failed on a factor of shape \(40, 5\).*`method='householder'`"
    with pytest.raises(RuntimeError, match=message):
        fm.svd("cholqr2")
    with pytest.raises(RuntimeError, match=message):
        fm.svdvals("cholqr2")
    ill = with_condition(48, 6, 1e6, torch.float32)
    with pytest.raises(RuntimeError, match="householder"):
        FactoredMatrix(ill, torch.randn(6, 30)).svd("cholqr2")


# --- square-only members --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "member, what",
    [
        (lambda fm: fm.BA, "BA"),
        (lambda fm: fm.eigenvalues, "eigenvalues"),
        (lambda fm: fm.trace(), "trace"),
        (lambda fm: fm.eigh(), "eigh/eigvalsh"),
        (lambda fm: fm.eigvalsh(), "eigh/eigvalsh"),
    ],
    ids=["BA", "eigenvalues", "trace", "eigh", "eigvalsh"],
)
@pytest.mark.parametrize("shape", [((5, 3), (3, 4)), ((2, 4, 3), (3, 6)), ((1, 2), (2, 3))])
def test_square_only(member, what, shape):
    fm = make_fm(*shape)
    shape = re.escape(str(tuple(fm.shape)))
    message = (
        rf"{re.escape(what)} needs a square product \(ldim == rdim\); this FactoredMatrix has shape {shape} "
        rf"\(ldim {fm.ldim}, rdim {fm.rdim}\)"
    )
    with pytest.raises(ValueError, match=message):
        member(fm)


@pytest.mark.parametrize("call", [lambda fm: fm.eigh(), lambda fm: fm.eigvalsh()], ids=["eigh", "eigvalsh"])
def test_eigh_on_non_symmetric_product(call):
    fm = make_fm((2, 5, 3), (3, 5))
    message = r"need a Hermitian \(symmetric\) product A @ B; .*relative asymmetry .* Use `\.eigenvalues`"
    with pytest.raises(ValueError, match=message):
        call(fm)


def test_eigh_accepts_symmetric_product():
    X = f64(5, 3)
    evals, _ = FactoredMatrix(X, X.mT).eigh()
    torch.testing.assert_close(evals, torch.linalg.eigvalsh(X @ X.mT))


NOT_SCALAR = r"`other` must be a scalar, got a tensor of shape "


# --- scalars --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "op", [lambda fm, x: fm * x, lambda fm, x: x * fm, lambda fm, x: fm / x], ids=["mul", "rmul", "div"]
)
@pytest.mark.parametrize(
    "other, exc, match",
    [
        (torch.ones(2, dtype=torch.float64), ValueError, NOT_SCALAR + r"\(2,\)\. Use `@`"),
        (torch.ones(1, 2, dtype=torch.float64), ValueError, NOT_SCALAR + r"\(1, 2\)"),
        ("2", TypeError, r"`other` must be a number or a one-element tensor, got str"),
        (True, TypeError, r"`other` must be a number or a one-element tensor, got bool"),
        (1j, TypeError, r"`other` is complex but the FactoredMatrix is torch\.float64; convert it first"),
        (torch.tensor(2j), TypeError, r"`other` is complex but the FactoredMatrix is torch\.float64"),
    ],
)
def test_scalar_errors(op, other, exc, match):
    fm = make_fm((5, 3), (3, 4))
    with pytest.raises(exc, match=match):
        op(fm, other)


def test_non_scalar_tensor_times_fm_2d():
    fm = make_fm((5, 3), (3, 4))
    with pytest.raises(ValueError, match=r"`other` must be a scalar, got a tensor of shape \(5, 4\)"):
        fm * f64(5, 4)


# --- products -------------------------------------------------------------------------------------
SHAPE_MISMATCH = r"shapes do not match for a product: FactoredMatrix of shape \(2, 5, 4\) and operand of shape "


@pytest.mark.parametrize(
    "op, match",
    [
        (lambda fm: fm @ f64(3, 2), SHAPE_MISMATCH + r"\(3, 2\), which needs 4 rows"),
        (lambda fm: fm @ f64(2, 5, 2), SHAPE_MISMATCH + r"\(2, 5, 2\), which needs 4 rows"),
        (lambda fm: fm @ f64(5), SHAPE_MISMATCH + r"\(5,\), which needs 4 entries"),
        (lambda fm: fm @ torch.tensor(2.0).double(), SHAPE_MISMATCH + r"\(\), which needs 4 entries\. Use `\*`"),
        (lambda fm: f64(2, 4) @ fm, SHAPE_MISMATCH + r"\(2, 4\), which needs 5 columns"),
        (lambda fm: f64(4) @ fm, SHAPE_MISMATCH + r"\(4,\), which needs 5 entries"),
        (lambda fm: fm @ make_fm((5, 2), (2, 3)), SHAPE_MISMATCH + r"\(5, 3\), which needs 4 rows"),
    ],
    ids=["matrix", "batched_matrix", "vector", "scalar", "rmatrix", "rvector", "factored"],
)
def test_matmul_shape_mismatch(op, match):
    fm = make_fm((2, 5, 3), (3, 4))
    with pytest.raises(ValueError, match=match):
        op(fm)


BATCH_MISMATCH = r"leading dims do not broadcast: FactoredMatrix of shape \(2, 5, 4\) and operand of shape "


@pytest.mark.parametrize(
    "op, match",
    [
        (lambda fm: fm @ f64(3, 4, 2), BATCH_MISMATCH + r"\(3, 4, 2\) \(sizes 2 and 3 mismatch at dim -3\); index or"),
        (lambda fm: f64(3, 2, 5) @ fm, BATCH_MISMATCH + r"\(3, 2, 5\) \(sizes 2 and 3 mismatch at dim -3\); index or"),
        (lambda fm: fm @ make_fm((3, 4, 2), (2, 6)), BATCH_MISMATCH + r"\(3, 4, 6\) \(sizes 2 and 3 mismatch at dim -3\)"),
    ],
    ids=["matrix", "rmatrix", "factored"],
)
def test_matmul_leading_dims_mismatch(op, match):
    fm = make_fm((2, 5, 3), (3, 4))
    with pytest.raises(ValueError, match=match):
        op(fm)


# --- composition_scores ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "left, right, name",
    [
        (f64(4, 5), "fm", "Tensor"),
        ("fm", f64(5, 6), "Tensor"),
        (None, "fm", "NoneType"),
    ],
)
def test_composition_scores_types(left, right, name):
    fm = make_fm((4, 3), (3, 4))
    left = fm if isinstance(left, str) else left
    right = fm if isinstance(right, str) else right
    message = rf"`left` and `right` must be FactoredMatrix objects, got .*{name}.*; wrap a dense matrix W"
    with pytest.raises(TypeError, match=message):
        composition_scores(left, right)


@pytest.mark.parametrize("broadcast_dims", [True, False])
def test_composition_scores_shapes(broadcast_dims):
    left = make_fm((2, 4, 3), (3, 5))
    right = make_fm((6, 3), (3, 4))
    message = (
        r"composition scores need left\.rdim == right\.ldim; got `left` of shape \(2, 4, 5\) and "
        r"`right` of shape \(6, 4\)"
    )
    with pytest.raises(ValueError, match=message):
        composition_scores(left, right, broadcast_dims=broadcast_dims)


def test_composition_scores_leading_dims_that_do_not_broadcast():
    left = FactoredMatrix(*make_factors((2, 4, 3), (3, 5)))
    right = FactoredMatrix(*make_factors((3, 5, 3), (3, 4)))
    message = (
        r"leading dims do not broadcast: `left` of shape \(2, 4, 5\) and `right` of shape \(3, 5, 4\) "
        r"\(sizes 2 and 3 mismatch at dim -3\); pass `broadcast_dims=True`"
    )
    with pytest.raises(ValueError, match=message):
        composition_scores(left, right, broadcast_dims=False)
    assert composition_scores(left, right).shape == (2, 3)


def test_float_tensor_index_is_refused():
    fm = make_fm((5, 3), (3, 4))
    with pytest.raises(IndexError, match=r"tensor indices must be integers or booleans, got torch\.float32\."):
        fm[torch.tensor([0.0, 1.0])]


def test_add_diagonal_needs_a_tensor():
    fm = make_fm((4, 3), (3, 4))
    with pytest.raises(TypeError, match=r"`diag` must be a torch.Tensor, got float; use add_jitter for a number"):
        fm.add_diagonal(1.0)


# --- TransformerLens's exception classes, kept as second bases -----------------------------------
@pytest.mark.parametrize(
    "call, clear, legacy, match",
    [
        (lambda: FactoredMatrix(f64(3, 2), f64(3, 4)), ValueError, AssertionError, INNER),
        (lambda: make_fm((5, 3), (3, 4)) @ make_fm((5, 2), (2, 3)), ValueError, AssertionError, "which needs 4 rows"),
        (lambda: make_fm((5, 3), (3, 4)) @ f64(5, 2), ValueError, AssertionError, "which needs 4 rows"),
        (lambda: f64(2, 4) @ make_fm((5, 3), (3, 4)), ValueError, AssertionError, "which needs 5 columns"),
        (lambda: make_fm((5, 3), (3, 4)).BA, ValueError, AssertionError, r"BA needs a square product"),
        (lambda: make_fm((5, 3), (3, 4)).eigenvalues, ValueError, AssertionError, "eigenvalues needs a square"),
        (lambda: make_fm((5, 3), (3, 4)).eigvals(), ValueError, AssertionError, "eigvals needs a square"),
        (lambda: make_fm((5, 3), (3, 4)) * f64(2), ValueError, AssertionError, NOT_SCALAR),
        (lambda: f64(2, 2) * make_fm((5, 3), (3, 4)), ValueError, AssertionError, NOT_SCALAR),
        (lambda: FactoredMatrix(f64(9, 5, 3), f64(2, 4, 3, 7)), ValueError, RuntimeError, r"sizes 9 and 4 mismatch"),
        (lambda: make_fm((2, 5, 3), (3, 4)) @ f64(4, 4, 2), ValueError, RuntimeError, r"do not broadcast"),
        (lambda: FactoredMatrix(f64(3, 2), torch.randn(2, 3)), TypeError, RuntimeError, SAME_DTYPE),
        (lambda: FactoredMatrix(f64(3, 2), f64(2, 3).to("meta")), ValueError, RuntimeError, "same device"),
    ],
    ids=["inner", "fm_at_fm", "fm_at_matrix", "matrix_at_fm", "BA", "eigenvalues", "eigvals", "mul", "rmul",
         "broadcast", "matmul_broadcast", "dtype", "device"],
)
def test_transformer_lens_exception_classes(call, clear, legacy, match):
    # Both the clear class and TransformerLens's (AssertionError / RuntimeError) catch the error.
    for cls in (clear, legacy):
        with pytest.raises(cls, match=match):
            call()


def test_error_classes_are_exported_from_errors():
    from lowrank_op import errors

    assert issubclass(errors.NotSquareError, errors.ShapeMismatchError)
    for cls, bases in [
        (errors.ShapeMismatchError, (ValueError, AssertionError)),
        (errors.BroadcastError, (ValueError, RuntimeError)),
        (errors.DtypeMismatchError, (TypeError, RuntimeError)),
        (errors.DeviceMismatchError, (ValueError, RuntimeError)),
    ]:
        assert all(issubclass(cls, base) for base in bases), cls


# --- product operands -----------------------------------------------------------------------------
OPERAND_TYPE = r"a product needs a torch\.Tensor, a FactoredMatrix or a LinearOperator operand, got "


@pytest.mark.parametrize(
    "op, exc, match",
    [
        (lambda fm: fm @ np.ones((4, 2)), TypeError, OPERAND_TYPE + r"ndarray; convert it with torch\.as_tensor\(other, dtype=torch\.float32"),
        (lambda fm: np.ones((2, 5)) @ fm, TypeError, OPERAND_TYPE + r"ndarray"),
        (lambda fm: fm @ [[1.0, 2.0]] * 4, TypeError, OPERAND_TYPE + r"list"),
        (lambda fm: [1.0] * 5 @ fm, TypeError, OPERAND_TYPE + r"list"),
        (lambda fm: fm.matmul(np.ones(4)), TypeError, OPERAND_TYPE + r"ndarray"),
        (lambda fm: fm.matmul("x"), TypeError, OPERAND_TYPE + r"str"),
        (lambda fm: fm.matmul(torch.ones(4, 2, dtype=torch.float64)), TypeError,
         r"dtypes differ in a product: FactoredMatrix of dtype torch\.float32 and operand of dtype torch\.float64; cast one"),
        (lambda fm: fm @ torch.ones(4, dtype=torch.float64), TypeError, r"dtypes differ in a product"),
        (lambda fm: fm.matmul(torch.ones(5, 2)), ValueError, r"operand of shape \(5, 2\), which needs 4 rows"),
        (lambda fm: fm.matmul(torch.ones(3)), ValueError, r"operand of shape \(3,\), which needs 4 entries"),
        (lambda fm: fm @ torch.empty(4, 3, device="meta"), ValueError,
         r"devices differ in a product: FactoredMatrix on cpu and operand on meta; move one, e\.g\. operand\.to\('cpu'\)"),
        (lambda fm: torch.empty(3, 5, device="meta") @ fm, ValueError, r"devices differ in a product"),
        (lambda fm: fm.matmul(torch.empty(4, device="meta")), ValueError, r"devices differ in a product"),
        (lambda fm: fm @ FactoredMatrix(torch.ones(4, 2, device="meta"), torch.ones(2, 3, device="meta")), ValueError,
         r"devices differ in a product"),
    ],
    ids=["ndarray", "r_ndarray", "list", "r_list", "matmul_ndarray", "matmul_str", "matmul_dtype", "vector_dtype",
         "matmul_rows", "matmul_entries", "meta", "r_meta", "matmul_meta", "fm_meta"],
)
def test_product_operand_errors(op, exc, match):
    fm = make_fm((5, 3), (3, 4), torch.float32)
    with pytest.raises(exc, match=match):
        op(fm)


@pytest.mark.parametrize("dim", [-1, -2, 3, 4, -5])
def test_unsqueeze_inside_the_matrix_dims(dim):
    fm = make_fm((2, 5, 3), (3, 4))
    message = (
        rf"`dim` must be a leading-dim position, -4 <= dim <= -3 or 0 <= dim <= 1, for a FactoredMatrix of "
        rf"shape \(2, 5, 4\); got {dim}\. A new dim among the last two"
    )
    with pytest.raises(ValueError, match=message):
        fm.unsqueeze(dim)


def test_tensor_like_factor_needs_two_dims():
    from test_transformer_lens_parity import TensorLike

    with pytest.raises(ValueError, match=r"`B` must have at least 2 dims \(\.\.\., rows, cols\), got shape \(3,\)"):
        FactoredMatrix(f64(2, 3), TensorLike(f64(3)))
