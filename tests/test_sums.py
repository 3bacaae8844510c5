"""Sums with FactoredMatrix: ``fm +/- fm`` and ``fm +/- number / tensor`` (either order) stay factored,
``fm + diag`` (either order) is the Woodbury operator, other operators give linear_operator's lazy
sum; ``fm.sum``; the ``diag + fm`` hook (:mod:`lowrank_op.diag_routing`) leaves every other operand
as it was; FactoredAddedDiag's linear_operator plumbing (reconstruction, batching, pickling).
"""

from __future__ import annotations

import pickle

import pytest
import torch
from helpers import assert_scaled_close, factor_specs, make_factors, ref_dtype
from hypothesis import given
from hypothesis import strategies as st
from linear_operator.operators import (
    AddedDiagLinearOperator,
    ConstantDiagLinearOperator,
    DenseLinearOperator,
    DiagLinearOperator,
    SumLinearOperator,
)

from lowrank_op import FactoredAddedDiag, FactoredMatrix, diag_routing

RTOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.complex128: 1e-12}
dtype_params = pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])


def dense(op) -> torch.Tensor:
    return op.to_dense().to(ref_dtype(op.dtype))


def close(actual, expected, dtype=torch.float64, what=""):
    scale = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
    assert_scaled_close(actual, expected, scale, RTOL[dtype], what)


def fm_pair(a1, b1, a2, b2, dtype=torch.float64):
    return FactoredMatrix(*make_factors(a1, b1, dtype, seed=1)), FactoredMatrix(*make_factors(a2, b2, dtype, seed=2))


SUM_SHAPES = {
    "plain": ((5, 3), (3, 4), (5, 2), (2, 4)),
    "mdim_1": ((5, 1), (1, 4), (5, 1), (1, 4)),
    "batched": ((2, 5, 3), (2, 3, 4), (2, 5, 6), (2, 6, 4)),
    "broadcast": ((3, 1, 5, 3), (3, 4), (4, 5, 2), (1, 2, 4)),
}


# --- fm + fm, fm - fm -----------------------------------------------------------------------------
@dtype_params
@pytest.mark.parametrize("shapes", SUM_SHAPES.values(), ids=SUM_SHAPES.keys())
def test_sum_and_difference_stay_factored(shapes, dtype):
    a1, b1, a2, b2 = shapes
    fm1, fm2 = fm_pair(a1, b1, a2, b2, dtype)
    for op, expected in ((fm1 + fm2, dense(fm1) + dense(fm2)), (fm1 - fm2, dense(fm1) - dense(fm2))):
        assert isinstance(op, FactoredMatrix)
        assert op.mdim == fm1.mdim + fm2.mdim and op.dtype == dtype
        assert op.shape == expected.shape
        close(dense(op), expected, dtype)
    added = fm1 + fm2
    # Left and right factors broadcast separately: a factor shared by the batch stays shared.
    assert added.A.shape[:-2] == torch.broadcast_shapes(fm1.A.shape[:-2], fm2.A.shape[:-2])
    assert added.B.shape[:-2] == torch.broadcast_shapes(fm1.B.shape[:-2], fm2.B.shape[:-2])
    close(dense(torch.add(fm1, fm2)), dense(fm1) + dense(fm2), dtype, "torch.add")
    close(dense(fm1.add(fm2)), dense(fm1) + dense(fm2), dtype, "fm.add")


def test_sum_promotes_dtypes_and_keeps_gradients():
    A1, B1 = make_factors((5, 2), (2, 5), torch.float32, seed=1)
    A2, B2 = make_factors((5, 3), (3, 5), torch.float64, seed=2)
    A1.requires_grad_(True)
    A2.requires_grad_(True)
    op = FactoredMatrix(A1, B1) + FactoredMatrix(A2, B2)
    assert op.dtype == torch.float64
    op.to_dense().sum().backward()
    close(A1.grad.double(), B1.double().sum(-1).expand(5, 2), torch.float32)
    close(A2.grad, B2.sum(-1).expand(5, 3), torch.float64)


def test_sum_errors():
    fm = FactoredMatrix(torch.randn(5, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"shapes do not match for a sum: .*\(5, 4\) and .*\(5, 5\)"):
        fm + FactoredMatrix(torch.randn(5, 3), torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"leading dims do not broadcast: FactoredMatrix of shape \(2, 5, 4\) and FactoredMatrix of shape \(3, 5, 4\)"):
        FactoredMatrix(torch.randn(2, 5, 3), torch.randn(3, 4)) + FactoredMatrix(
            torch.randn(3, 5, 3), torch.randn(3, 4)
        )


# --- fm + numbers and tensors: one FactoredMatrix, exact ----------------------------------------
#: (A shape, B shape, tensor shape): scalars, rows, columns, full tensors, batched and broadcast.
TERM_SHAPES = {
    "scalar_tensor": ((5, 2), (2, 4), ()),
    "one_entry": ((5, 2), (2, 4), (1,)),
    "row_1d": ((5, 2), (2, 4), (4,)),
    "row": ((2, 5, 2), (2, 4), (1, 4)),
    "column": ((5, 2), (2, 4), (5, 1)),
    "batched_scalars": ((5, 2), (2, 4), (3, 1, 1)),
    "batched_column": ((2, 5, 2), (2, 2, 4), (2, 5, 1)),
    "full": ((5, 2), (2, 4), (5, 4)),
    "full_wide": ((4, 2), (2, 6), (4, 6)),
    "full_broadcast": ((3, 1, 5, 2), (2, 4), (2, 5, 4)),
    "mdim_gt_dims": ((3, 7), (7, 3), (3, 3)),
    "ldim_1": ((1, 2), (2, 4), (1, 4)),
    "empty_rows": ((0, 2), (2, 4), (0, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.bfloat16])
@pytest.mark.parametrize("shapes", TERM_SHAPES.values(), ids=TERM_SHAPES.keys())
def test_fm_plus_tensor_stays_factored_and_exact(shapes, dtype):
    a, b, t_shape = shapes
    fm = FactoredMatrix(*make_factors(a, b, dtype, seed=7))
    t = torch.randn(t_shape, dtype=ref_dtype(dtype), generator=torch.Generator().manual_seed(8)).to(dtype)
    M, T = dense(fm), t.to(ref_dtype(dtype))
    rtol = {torch.bfloat16: 1e-2}.get(dtype, RTOL.get(dtype, 1e-5))
    for name, op, expected in (
        ("fm + t", fm + t, M + T), ("t + fm", t + fm, T + M), ("fm - t", fm - t, M - T), ("t - fm", t - fm, T - M),
        ("torch.add(fm, t)", torch.add(fm, t), M + T), ("torch.add(t, fm)", torch.add(t, fm), M + T),
        ("torch.sub(t, fm)", torch.sub(t, fm), T - M),
    ):
        assert isinstance(op, FactoredMatrix) and op.dtype == dtype, (name, type(op))
        assert op.mdim <= fm.mdim + max(1, min(fm.ldim, fm.rdim))
        scale = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
        assert_scaled_close(dense(op), expected, scale, rtol, name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
def test_fm_plus_number(dtype):
    fm = FactoredMatrix(*make_factors((2, 5, 3), (3, 4), dtype, seed=9))
    M = dense(fm)
    for name, op, expected in (
        ("fm + 2.5", fm + 2.5, M + 2.5), ("2.5 + fm", 2.5 + fm, M + 2.5), ("fm - 3", fm - 3, M - 3),
        ("3.0 - fm", 3.0 - fm, 3 - M), ("fm + 0", fm + 0, M), ("torch.add(fm, 2.0)", torch.add(fm, 2.0), M + 2),
    ):
        assert isinstance(op, FactoredMatrix) and op.dtype == dtype, name
        close(dense(op), expected, dtype, name)
    assert (fm + 2.5).mdim == fm.mdim + 1 and (fm + 2.5).A.shape[:-2] == fm.A.shape[:-2]
    assert (fm + 0) is fm and sum([fm, fm]).mdim == 2 * fm.mdim  # sum() starts from 0
    if dtype.is_complex:
        close(dense(fm + 1j), M + 1j, dtype, "complex number")


def test_square_fm_plus_dense_matrix_solves_exactly_where_linear_operator_would_not():
    """The issue's case: ``fm + torch.diag(d)`` for a non-symmetric product. linear_operator's
    SumLinearOperator would solve it by Cholesky/CG (assuming symmetry); this sum is a FactoredMatrix
    whose solve and logdet are the exact LU ones."""
    A, B = make_factors((6, 2), (2, 6), seed=10)
    d = torch.rand(6, dtype=torch.float64, generator=torch.Generator().manual_seed(10)) + 2
    M = A @ B + torch.diag(d)
    assert not torch.allclose(M, M.mT)
    for op in (FactoredMatrix(A, B) + torch.diag(d), torch.diag(d) + FactoredMatrix(A, B)):
        assert isinstance(op, FactoredMatrix) and op.mdim == 8
        y = torch.randn(6, 2, dtype=torch.float64)
        close(op.solve(y), torch.linalg.solve(M, y), what="solve")
        sign, logabs = op.slogdet()
        ref = torch.linalg.slogdet(M)
        close(sign, ref.sign, what="sign")
        close(logabs, ref.logabsdet, what="logabsdet")


def test_fm_plus_tensor_gradients_match_dense():
    A, B = make_factors((5, 2), (2, 5), seed=11)
    row = torch.randn(1, 5, dtype=torch.float64)
    full = torch.randn(5, 5, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (A, B, row, full)]
    W = torch.randn(5, 5, dtype=torch.float64)
    got = torch.autograd.grad(((3.0 - (FactoredMatrix(A, B) + row) + full).to_dense() * W).sum(), leaves)
    want = torch.autograd.grad(((3.0 - (A @ B + row) + full) * W).sum(), leaves)
    for g, w in zip(got, want):
        close(g, w, what="grad")


def test_sum_with_other_operators_is_lazy():
    fm = FactoredMatrix(*make_factors((2, 5, 3), (3, 5), seed=3))
    T = torch.randn(2, 5, 5, dtype=torch.float64)
    for op in (fm + DenseLinearOperator(T), DenseLinearOperator(T) + fm):
        assert isinstance(op, SumLinearOperator) and not isinstance(op, AddedDiagLinearOperator)
        close(dense(op), dense(fm) + T)


@pytest.mark.parametrize(
    "operand, error, pattern",
    [
        (lambda: torch.ones(5, 4), TypeError,
         r"dtypes differ in a sum: FactoredMatrix of dtype torch.float64 and tensor of dtype torch.float32; cast the tensor with \.to\(torch.float64\)"),
        (lambda: torch.tensor(2.0), TypeError, r"dtypes differ in a sum: .* torch.float32"),
        (lambda: torch.tensor(2), TypeError, r"dtypes differ in a sum: .* torch.int64"),
        (lambda: 1j, TypeError, r"cannot add the complex number \(?-?0?[-+]?1j\)? to a FactoredMatrix of dtype torch.float64; convert the FactoredMatrix first"),
        (lambda: torch.ones(3, dtype=torch.float64), ValueError,
         r"a 1-D tensor is a row and must have 4 entries \(or 1\)"),
        (lambda: torch.ones(5, 3, dtype=torch.float64), ValueError,
         r"shapes do not match for a sum: FactoredMatrix of shape \(3, 5, 4\) and tensor of shape \(5, 3\); the tensor's last two dims must broadcast to \(5, 4\)"),
        (lambda: torch.ones(2, 2, 5, 4, dtype=torch.float64), ValueError,
         r"leading dims do not broadcast: FactoredMatrix of shape \(3, 5, 4\) and tensor of shape \(2, 2, 5, 4\)"),
        (lambda: torch.ones(5, 4, dtype=torch.float64, device="meta"), ValueError,
         r"devices differ in a sum: FactoredMatrix on cpu and tensor on meta; move the tensor with \.to\('cpu'\)"),
    ],
    ids=["dtype_full", "dtype_0d", "int_tensor", "complex_number", "bad_row", "bad_columns", "bad_batch", "device"],
)
def test_fm_plus_tensor_errors(operand, error, pattern):
    fm = FactoredMatrix(torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    other = operand()
    for call in (lambda: fm + other, lambda: other + fm, lambda: fm - other, lambda: other - fm):
        with pytest.raises(error, match=pattern):
            call()


# --- fm.sum ---------------------------------------------------------------------------------------
def abs_scale(fm) -> float:
    """``sum_ijk |A_ik| |B_kj|`` (at least 1): what the rounding error of any sum of entries of
    ``A @ B`` is relative to, whichever order the terms are added in."""
    r = ref_dtype(fm.dtype)
    return max(1.0, float((fm.A.to(r).abs() @ fm.B.to(r).abs()).sum()))


SUM_OF_SHAPES = {
    "square": ((5, 3), (3, 5)),
    "rect_mdim_gt": ((4, 7), (7, 3)),
    "batched": ((2, 4, 3), (2, 3, 5)),
    "broadcast": ((3, 1, 4, 2), (2, 2, 5)),
    "a_only_batched": ((3, 4, 2), (2, 5)),
    "rank_deficient": ((2, 6, 1), (1, 6)),
    "empty_rows": ((2, 0, 3), (3, 4)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
@pytest.mark.parametrize("shapes", SUM_OF_SHAPES.values(), ids=SUM_OF_SHAPES.keys())
def test_sum_matches_dense(shapes, dtype):
    fm = FactoredMatrix(*make_factors(*shapes, dtype, seed=12))
    M = dense(fm)
    scale = abs_scale(fm)
    total = fm.sum()
    assert total.shape == () and total.dtype == dtype
    assert_scaled_close(total, M.sum(), scale, RTOL[dtype], "sum()")
    assert_scaled_close(torch.sum(fm), M.sum(), scale, RTOL[dtype], "torch.sum")
    for dim in (-1, -2, fm.dim() - 1, fm.dim() - 2):
        got = fm.sum(dim)
        assert isinstance(got, torch.Tensor) and got.dtype == dtype
        assert_scaled_close(got, M.sum(dim), scale, RTOL[dtype], f"sum({dim})")
    for dim in range(fm.dim() - 2):
        for d in (dim, dim - fm.dim()):
            got = fm.sum(d)
            assert isinstance(got, FactoredMatrix), d
            assert_scaled_close(dense(got), M.sum(d), scale, RTOL[dtype], f"sum({d})")


@given(factor_specs(), st.sampled_from(["scalar", "row", "column", "full"]))
def test_sum_and_terms_property(spec, term):
    a_shape, b_shape, rank, seed = spec
    fm = FactoredMatrix(*make_factors(a_shape, b_shape, rank=rank, seed=seed))
    M = dense(fm)
    scale = abs_scale(fm)
    assert_scaled_close(fm.sum(), M.sum(), scale, 1e-12, "sum()")
    for dim in range(-fm.dim(), fm.dim()):
        got = fm.sum(dim)
        assert_scaled_close(dense(got) if isinstance(got, FactoredMatrix) else got, M.sum(dim), scale, 1e-12, f"sum({dim})")
    shape = {"scalar": (), "row": (1, fm.rdim), "column": (fm.ldim, 1), "full": (fm.ldim, fm.rdim)}[term]
    t = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    close(dense(t - fm), t - M, what=f"{term} - fm")


def test_sum_of_a_batch_keeps_a_shared_factor_and_gradients():
    A, B = make_factors((3, 4, 2), (2, 5), seed=13)
    fm = FactoredMatrix(A, B)
    summed = fm.sum(0)
    assert summed.mdim == 2  # B is shared: (sum_i A_i) B
    both = FactoredMatrix(A, B.expand(3, 2, 5).clone()).sum(0)
    assert both.mdim == 6  # both vary: factors concatenated
    close(dense(both), dense(fm).sum(0))
    A.requires_grad_(True)
    W = torch.randn(4, 5, dtype=torch.float64)
    got = torch.autograd.grad((FactoredMatrix(A, B).sum(0).to_dense() * W).sum() + FactoredMatrix(A, B).sum(), A)
    want = torch.autograd.grad(((A @ B).sum(0) * W).sum() + (A @ B).sum(), A)
    close(got[0], want[0], what="grad")


def test_sum_bfloat16_is_computed_in_float32():
    A, B = make_factors((40, 3), (3, 40), torch.bfloat16, seed=14)
    fm = FactoredMatrix(A, B)
    M = dense(fm)
    assert fm.sum().dtype == torch.bfloat16
    assert_scaled_close(fm.sum(), M.sum(), abs_scale(fm), 1e-2, "bf16 sum")


def test_sum_errors():
    fm = FactoredMatrix(torch.randn(2, 4, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"`dim` must satisfy `-3 <= dim < 3` for a FactoredMatrix of shape \(2, 4, 4\); got 3"):
        fm.sum(3)
    with pytest.raises(ValueError, match=r"`dim` must satisfy `-3 <= dim < 3`.*got -4"):
        fm.sum(-4)
    with pytest.raises(TypeError, match=r"`dim` must be an int or None, got tuple"):
        fm.sum((0, 1))


# --- fm + diag in every spelling ------------------------------------------------------------------
def _diag_spellings(fm, d):
    D, C = DiagLinearOperator(d), ConstantDiagLinearOperator(d[..., :1], diag_shape=d.shape[-1])
    return {
        "fm + diag": (fm + D, d),
        "diag + fm": (D + fm, d),
        "fm + const": (fm + C, d[..., :1].expand_as(d)),
        "const + fm": (C + fm, d[..., :1].expand_as(d)),
        "fm.add(diag)": (fm.add(D), d),
        "diag.add(fm)": (D.add(fm), d),
        "torch.add(diag, fm)": (torch.add(D, fm), d),
        "torch.add(fm, diag)": (torch.add(fm, D), d),
        "fm - diag": (fm - D, -d),
        "diag - fm": (D - fm, None),
        "add_diagonal": (fm.add_diagonal(d), d),
        "add_jitter": (fm.add_jitter(0.25), torch.full_like(d, 0.25)),
    }


SPELLINGS = list(_diag_spellings(FactoredMatrix(torch.ones(2, 1), torch.ones(1, 2)), torch.ones(2)))


@pytest.mark.parametrize("name", SPELLINGS)
@pytest.mark.parametrize("batched", [False, True], ids=["2d", "batched"])
def test_every_spelling_of_fm_plus_diag_is_woodbury(name, batched):
    a, b = ((2, 6, 3), (2, 3, 6)) if batched else ((6, 3), (3, 6))
    fm = FactoredMatrix(*make_factors(a, b, seed=4))
    d = torch.rand(*fm.batch_shape, 6, dtype=torch.float64) + 1
    op, diag = _diag_spellings(fm, d)[name]
    assert isinstance(op, FactoredAddedDiag), type(op)
    expected = torch.diag_embed(d) - dense(fm) if diag is None else dense(fm) + torch.diag_embed(diag)
    close(dense(op), expected, what=name)
    y = torch.randn(*fm.batch_shape, 6, 2, dtype=torch.float64)
    close(op.solve(y), torch.linalg.solve(expected, y), what=f"{name} solve")


# --- the hook leaves everything else alone --------------------------------------------------------
def _original(cls):
    return cls.__dict__["__add__"]._lowrank_op_original


OTHER_OPERANDS = {
    "dense_operator": lambda n: DenseLinearOperator(torch.randn(n, n, dtype=torch.float64)),
    "tensor": lambda n: torch.randn(n, n, dtype=torch.float64),
    "diag": lambda n: DiagLinearOperator(torch.rand(n, dtype=torch.float64)),
    "constant_diag": lambda n: ConstantDiagLinearOperator(torch.tensor([0.5], dtype=torch.float64), diag_shape=n),
}


@pytest.mark.parametrize("cls", [DiagLinearOperator, ConstantDiagLinearOperator], ids=["diag", "constant_diag"])
@pytest.mark.parametrize("other", OTHER_OPERANDS.values(), ids=OTHER_OPERANDS.keys())
def test_diag_hook_passes_other_operands_through(cls, other):
    if cls is DiagLinearOperator:
        diag = DiagLinearOperator(torch.rand(5, dtype=torch.float64))
    else:
        diag = ConstantDiagLinearOperator(torch.tensor([2.0], dtype=torch.float64), diag_shape=5)
    operand = other(5)
    got, want = diag + operand, _original(cls)(diag, operand)
    assert type(got) is type(want)
    close(dense(got), dense(want))


def test_diag_hook_is_idempotent_and_reversible():
    fm = FactoredMatrix(torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    D = DiagLinearOperator(torch.ones(4, dtype=torch.float64))
    wrapped = DiagLinearOperator.__dict__["__add__"]
    diag_routing.install()
    assert DiagLinearOperator.__dict__["__add__"] is wrapped
    assert not hasattr(wrapped._lowrank_op_original, "_lowrank_op_original")
    try:
        diag_routing.uninstall()
        op = D + fm
        assert type(op) is AddedDiagLinearOperator  # linear_operator's own behaviour
    finally:
        diag_routing.install()
    assert isinstance(D + fm, FactoredAddedDiag)


# --- FactoredAddedDiag's algebra and plumbing -----------------------------------------------------
def _op(batch=(2,), n=6, m=3, seed=5):
    """A non-symmetric, well-conditioned ``A @ B + D`` with a positive determinant."""
    A, B = make_factors((*batch, n, m), (*batch, m, n), seed=seed)
    d = torch.rand(*batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) + 2
    return FactoredMatrix(A / n, B / n) + DiagLinearOperator(d)


def test_algebra_keeps_structure_where_it_can():
    op = _op()
    other = FactoredMatrix(*make_factors((2, 6, 2), (2, 2, 6), seed=6))
    D = DiagLinearOperator(torch.rand(2, 6, dtype=torch.float64))
    T = torch.randn(2, 6, 6, dtype=torch.float64)
    cases = {
        "+ diag": (op + D, FactoredAddedDiag, dense(op) + dense(D)),
        "+ fm": (op + other, FactoredAddedDiag, dense(op) + dense(other)),
        "fm +": (other + op, FactoredAddedDiag, dense(op) + dense(other)),
        "+ op": (op + op, FactoredAddedDiag, 2 * dense(op)),
        "+ tensor": (op + T, FactoredAddedDiag, dense(op) + T),
        "tensor +": (T + op, FactoredAddedDiag, dense(op) + T),
        "- tensor": (op - T, FactoredAddedDiag, dense(op) - T),
        "tensor -": (T - op, FactoredAddedDiag, T - dense(op)),
        "+ number": (op + 2.0, FactoredAddedDiag, dense(op) + 2),
        "number -": (2.0 - op, FactoredAddedDiag, 2 - dense(op)),
        "+ dense op": (op + DenseLinearOperator(T), AddedDiagLinearOperator, dense(op) + T),
        "* -2": (op * -2.0, FactoredAddedDiag, -2 * dense(op)),
        "add_diagonal": (op.add_diagonal(torch.tensor(1.5, dtype=torch.float64)), FactoredAddedDiag,
                         dense(op) + 1.5 * torch.eye(6, dtype=torch.float64)),
        "mT": (op.mT, FactoredAddedDiag, dense(op).mT),
        "expand": (op.expand(3, 2, 6, 6), FactoredAddedDiag, dense(op).expand(3, 2, 6, 6)),
        "unsqueeze": (op.unsqueeze(0), FactoredAddedDiag, dense(op).unsqueeze(0)),
        "batch index": (op[1], FactoredAddedDiag, dense(op)[1]),
    }
    for name, (result, kind, expected) in cases.items():
        assert isinstance(result, kind), (name, type(result))
        close(dense(result), expected, what=name)
        if kind is FactoredAddedDiag:
            y = torch.randn(*result.batch_shape, 6, 1, dtype=torch.float64)
            close(result.solve(y), torch.linalg.solve(expected, y), what=f"{name} solve")
    assert type(op + DenseLinearOperator(T)) is AddedDiagLinearOperator  # generic: not claimed to be Woodbury
    close(op.diagonal(), dense(op).diagonal(dim1=-2, dim2=-1))
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    close(op @ x, dense(op) @ x)
    close(op.mT @ x, dense(op).mT @ x)
    close(op.sum(0).to_dense(), dense(op).sum(0))


def test_svd_is_right_for_nonsymmetric_operators():
    op = _op(batch=())
    U, S, V = op.svd()
    close(S, torch.linalg.svdvals(dense(op)))
    close(dense(U) @ torch.diag_embed(S) @ dense(V).mT, dense(op))


def test_reconstruction_clone_detach_to_and_pickle():
    op = _op()
    rebuilt = op.representation_tree()(*op.representation())
    assert isinstance(rebuilt, FactoredAddedDiag)
    for name, result in {
        "representation_tree": rebuilt,
        "clone": op.clone(),
        "detach": op.detach(),
        "double": op.double(),
        "pickle": pickle.loads(pickle.dumps(op)),
    }.items():
        assert isinstance(result, FactoredAddedDiag) and result.dtype == torch.float64, name
        close(dense(result), dense(op), what=name)
        close(result.logdet(), op.logdet(), what=f"{name} logdet")
    as32 = op.to(torch.float32)
    assert isinstance(as32, FactoredAddedDiag) and as32.dtype == torch.float32
    close(as32.logdet().double(), op.logdet(), torch.float32)
    op.logdet()  # fills the no-grad cache; pickling must still work
    assert isinstance(pickle.loads(pickle.dumps(op)), FactoredAddedDiag)
    assert repr(op) == "FactoredAddedDiag(shape=(2, 6, 6), mdim=3, dtype=torch.float64, device=cpu)"


def test_constructor_and_add_diagonal_errors():
    fm = FactoredMatrix(torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 5, dtype=torch.float64))
    D = DiagLinearOperator(torch.ones(5, dtype=torch.float64))
    pattern = r"takes one FactoredMatrix and one DiagLinearOperator .*\['FactoredMatrix', 'FactoredMatrix'\]"
    with pytest.raises(TypeError, match=pattern):
        FactoredAddedDiag(fm, fm)
    with pytest.raises(TypeError, match="takes one FactoredMatrix and one DiagLinearOperator"):
        FactoredAddedDiag(fm, D, D)
    with pytest.raises(ValueError, match=r"the diagonal has 4 entries but the FactoredMatrix is 5 x 5"):
        fm + DiagLinearOperator(torch.ones(4, dtype=torch.float64))
    pattern = r"the diagonal has dtype torch.float32 but the FactoredMatrix has torch.float64"
    with pytest.raises(TypeError, match=pattern):
        fm + DiagLinearOperator(torch.ones(5))
    with pytest.raises(ValueError, match=r"leading dims do not broadcast: FactoredMatrix of shape \(2, 5, 5\) and diagonal of shape"):
        FactoredMatrix(torch.randn(2, 5, 2), torch.randn(2, 5)) + DiagLinearOperator(torch.ones(3, 5))
    rect = FactoredMatrix(torch.randn(5, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"adding a diagonal needs a square product \(ldim == rdim\); this FactoredMatrix has shape \(5, 4\) .* Add it to a square product"):
        rect + DiagLinearOperator(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"add_diagonal needs a square product"):
        rect.add_diagonal(torch.ones(5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`diag` of shape \(3,\) does not fit a FactoredMatrix of shape \(5, 5\)"):
        fm.add_diagonal(torch.ones(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"`diag` must be a torch.Tensor, got float; use add_jitter"):
        fm.add_diagonal(0.5)
