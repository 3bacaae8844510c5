"""Solves, determinants, pseudo-inverses and least squares against dense float64 references.

``A @ B + D`` (FactoredAddedDiag, Woodbury + determinant lemma): symmetric (``B`` the view ``A.mT``,
the Cholesky path) and non-symmetric (LU), batched and broadcast, ``mdim`` from 1 to above ``n``,
values and gradients; singular and ill-conditioned operators; no CG or Lanczos anywhere on this
path. ``FactoredMatrix.solve`` / ``pinv`` / ``lstsq``. And linear_operator's own CG, run through its
generic ``AddedDiagLinearOperator(fm, DiagLinearOperator(d))`` (not the Woodbury operator), on a
symmetric ``A @ A^T + sigma^2 I`` at n = 2000.
"""

from __future__ import annotations

import math
import warnings
from unittest.mock import MagicMock, patch

import linear_operator
import pytest
import torch
from helpers import assert_scaled_close, factor_specs, make_factors, ref_dtype
from hypothesis import given
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator

from lowrank_op import FactoredAddedDiag, FactoredMatrix, IllConditionedWarning, choices, conditioning, settings

#: Tolerances relative to the size of the reference (its max-abs entry); the test operators have
#: condition numbers below about 100.
RTOL = {torch.float64: 1e-10, torch.complex128: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-4}

#: (A shape, B shape, d shape). B is replaced by the view A.mT in the symmetric cases (A's leading
#: dims then stand for both factors).
CASES = {
    "n12_m3": ((12, 3), (3, 12), (12,)),
    "mdim_1": ((10, 1), (1, 10), (10,)),
    "mdim_near_n": ((12, 11), (11, 12), (12,)),
    "mdim_gt_n": ((6, 9), (9, 6), (6,)),
    "n_1": ((1, 2), (2, 1), (1,)),
    "batched": ((2, 3, 10, 4), (2, 3, 4, 10), (2, 3, 10)),
    "broadcast": ((3, 1, 10, 4), (4, 4, 10), (10,)),
    "diag_batch_only": ((10, 4), (4, 10), (2, 10)),
}
case_params = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
sym_params = pytest.mark.parametrize("symmetric", [False, True], ids=["nonsym", "sym"])
#: bfloat16 operators are factorised in float32 from their exact values (results are float32).
dtype_params = pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128, torch.bfloat16])


def make_operands(case, symmetric: bool, dtype=torch.float64, seed: int = 0, requires_grad: bool = False):
    """Leaves ``A``, ``B`` (None when symmetric), ``d``: a well-conditioned ``A @ B + D``.

    Factors are scaled so that ``A @ B`` has norm about 1 while ``d`` lies in [2, 3]."""
    a_shape, b_shape, d_shape = case
    gen = torch.Generator().manual_seed(seed)
    r = ref_dtype(dtype)
    n, m = a_shape[-2:]
    A = (torch.randn(*a_shape, dtype=r, generator=gen) / math.sqrt(max(n, m))).to(dtype)
    B = None if symmetric else (torch.randn(*b_shape, dtype=r, generator=gen) / math.sqrt(max(n, m))).to(dtype)
    d = (2 + torch.rand(*d_shape, dtype=torch.float64, generator=gen)).to(dtype)
    leaves = [t for t in (A, B, d) if t is not None]
    for t in leaves:
        t.requires_grad_(requires_grad)
    return A, B, d


def build(A, B, d) -> FactoredAddedDiag:
    fm = FactoredMatrix(A, A.mH if B is None else B)
    return fm + DiagLinearOperator(d)


def dense_of(A, B, d) -> torch.Tensor:
    r = ref_dtype(A.dtype)
    Bf = A.mH if B is None else B
    return A.to(r) @ Bf.to(r) + torch.diag_embed(d.to(r))


def close(actual, expected, dtype, what=""):
    scale = expected.abs().max().clamp_min(1.0) if expected.numel() else 1.0
    assert_scaled_close(actual, expected, scale, RTOL[dtype], what)


def rhs_for(op, k=3, dtype=None, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or op.dtype
    return torch.randn(*op.batch_shape, op.shape[-1], k, dtype=ref_dtype(dtype), generator=gen).to(dtype)


# --- values ---------------------------------------------------------------------------------------
@dtype_params
@sym_params
@case_params
def test_solve_logdet_inv_quad(case, symmetric, dtype):
    A, B, d = make_operands(case, symmetric, dtype)
    op = build(A, B, d)
    M = dense_of(A, B, d)
    assert isinstance(op, FactoredAddedDiag) and op.shape == M.shape
    assert op._factorization().hermitian is symmetric
    y = rhs_for(op)
    x = op.solve(y)
    assert x.shape == y.shape and x.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    close(x, torch.linalg.solve(M, y.to(M.dtype)), dtype, "solve")
    close(torch.linalg.solve(op, y), torch.linalg.solve(M, y.to(M.dtype)), dtype, "torch.linalg.solve")
    close(op.logdet(), torch.logdet(M), dtype, "logdet")
    close(torch.logdet(op), torch.logdet(M), dtype, "torch.logdet")
    sign, logabs = op.slogdet()
    sign_ref, logabs_ref = torch.linalg.slogdet(M)
    close(sign, sign_ref, dtype, "slogdet sign")
    close(logabs, logabs_ref, dtype, "slogdet logabsdet")
    quad_ref = (y.to(M.dtype) * torch.linalg.solve(M, y.to(M.dtype))).sum(-2)
    close(op.inv_quad(y), quad_ref.sum(-1), dtype, "inv_quad")
    close(op.inv_quad(y, reduce_inv_quad=False), quad_ref, dtype, "inv_quad no reduce")
    quad, logdet = op.inv_quad_logdet(y, logdet=True)
    close(quad, quad_ref.sum(-1), dtype, "inv_quad_logdet: inv_quad")
    close(logdet, torch.logdet(M), dtype, "inv_quad_logdet: logdet")
    quad, logdet = op.inv_quad_logdet(y, logdet=False, reduce_inv_quad=False)
    assert logdet is None
    close(quad, quad_ref, dtype, "inv_quad_logdet no reduce")


@sym_params
def test_vector_left_and_broadcast_rhs(symmetric):
    A, B, d = make_operands(CASES["n12_m3"], symmetric)
    op, M = build(A, B, d), dense_of(A, B, d)
    y = torch.randn(12, dtype=torch.float64)
    close(op.solve(y), torch.linalg.solve(M, y), torch.float64, "vector solve")
    close(op.inv_quad(y), y @ torch.linalg.solve(M, y), torch.float64, "vector inv_quad")
    left = torch.randn(5, 12, dtype=torch.float64)
    Y = torch.randn(12, 2, dtype=torch.float64)
    close(op.solve(Y, left), left @ torch.linalg.solve(M, Y), torch.float64, "left @ solve")
    close(linear_operator.solve(op, Y, left), left @ torch.linalg.solve(M, Y), torch.float64, "linear_operator.solve")
    Y = torch.randn(4, 3, 12, 2, dtype=torch.float64)  # more leading dims than the operator
    close(op.solve(Y), torch.linalg.solve(M, Y), torch.float64, "broadcast rhs")


def test_gpytorch_shaped_inv_quad_logdet_batched():
    A, B, d = make_operands(CASES["batched"], symmetric=True)
    op, M = build(A, B, d), dense_of(A, B, d)
    diff = torch.randn(2, 3, 10, dtype=torch.float64)
    quad, logdet = op.inv_quad_logdet(inv_quad_rhs=diff.unsqueeze(-1), logdet=True)
    assert quad.shape == (2, 3) and logdet.shape == (2, 3)
    close(quad, (diff.unsqueeze(-1) * torch.linalg.solve(M, diff.unsqueeze(-1))).sum((-2, -1)), torch.float64)
    close(logdet, torch.logdet(M), torch.float64)


@given(factor_specs(square=True, max_dim=7, rank_deficient=False))
def test_solve_slogdet_property(spec):
    a_shape, b_shape, _, seed = spec
    A, B = make_factors(a_shape, b_shape, seed=seed)
    n, m = a_shape[-2:]
    A = A / math.sqrt(max(n, m))
    B = B / math.sqrt(max(n, m))
    d = 2 + torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    op, M = build(A, B, d), dense_of(A, B, d)
    y = torch.randn(*M.shape[:-1], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    close(op.solve(y), torch.linalg.solve(M, y), torch.float64, "solve")
    sign, logabs = op.slogdet()
    sign_ref, logabs_ref = torch.linalg.slogdet(M)
    close(sign, sign_ref, torch.float64, "sign")
    close(logabs, logabs_ref, torch.float64, "logabsdet")


@pytest.mark.parametrize("make", ["add_jitter", "add_diagonal_scalar", "add_diagonal_vector", "diag_first"])
def test_constructors_agree(make):
    A, B, d = make_operands(CASES["batched"], symmetric=False)
    fm = FactoredMatrix(A, B)
    if make == "add_jitter":
        op, D = fm.add_jitter(2.5), torch.full((10,), 2.5, dtype=torch.float64)
    elif make == "add_diagonal_scalar":
        op, D = fm.add_diagonal(torch.tensor(2.5, dtype=torch.float64)), torch.full((10,), 2.5, dtype=torch.float64)
    elif make == "add_diagonal_vector":
        op, D = fm.add_diagonal(d), d
    else:
        op, D = DiagLinearOperator(d) + fm, d
    assert isinstance(op, FactoredAddedDiag)
    M = dense_of(A, B, D)
    y = rhs_for(op)
    close(op.solve(y), torch.linalg.solve(M, y), torch.float64, make)
    close(op.logdet(), torch.logdet(M), torch.float64, make)


# --- which factorisation --------------------------------------------------------------------------
def test_hermitian_detection_rule():
    A = torch.randn(8, 3, dtype=torch.float64)
    d = torch.rand(8, dtype=torch.float64) + 1
    h = lambda fm, dd=d: (fm + DiagLinearOperator(dd))._factorization().hermitian  # noqa: E731
    assert h(FactoredMatrix(A, A.mT))  # the view
    assert h(FactoredMatrix(A, A.mT.clone()))  # equal values, no gradient recorded
    assert not h(FactoredMatrix(A, A.mT), -d)  # not positive definite
    assert not h(FactoredMatrix(A, A.mT.clone() + 1e-15))  # equal only up to rounding
    Ag = A.clone().requires_grad_(True)
    assert h(FactoredMatrix(Ag, Ag.mT))  # a view keeps its autograd history
    assert not h(FactoredMatrix(Ag, Ag.detach().mT))  # same memory, different history
    assert not h(FactoredMatrix(Ag, Ag.mT.detach().clone().requires_grad_(True)))  # equal, separate leaves
    with torch.no_grad():
        assert h(FactoredMatrix(Ag, Ag.mT.clone()))
    Ac = torch.randn(8, 3, dtype=torch.complex128)
    dc = d.to(torch.complex128)
    assert h(FactoredMatrix(Ac, Ac.mH), dc)
    assert not h(FactoredMatrix(Ac, Ac.mT), dc)  # transpose, not adjoint: complex symmetric
    # Expanded (broadcast) views keep the relation.
    Ab = torch.randn(3, 8, 2, dtype=torch.float64, requires_grad=True)
    op = FactoredMatrix(Ab, Ab.mT) + DiagLinearOperator(torch.rand(4, 1, 8, dtype=torch.float64) + 1)
    assert op._factorization().hermitian
    assert op.representation_tree()(*op.representation())._factorization().hermitian


def test_cache_only_without_gradients_and_invalidated_in_place():
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False)
    op = build(A, B, d)
    assert op._factorization() is op._factorization()
    y = rhs_for(op)
    before = op.solve(y)
    with torch.no_grad():
        d.mul_(2)  # in place: the version counter moves, the cache is dropped
    close(op.solve(y), torch.linalg.solve(dense_of(A, B, d), y), torch.float64, "after in-place edit")
    assert not torch.allclose(before, op.solve(y))
    A.requires_grad_(True)
    assert op._factorization() is not op._factorization()
    assert op._factorization().left.requires_grad


# --- gradients ------------------------------------------------------------------------------------
@sym_params
@pytest.mark.parametrize("case", [CASES["n12_m3"], CASES["mdim_1"], CASES["mdim_near_n"], CASES["broadcast"]],
                         ids=["n12_m3", "mdim_1", "mdim_near_n", "broadcast"])
def test_gradients_match_dense(case, symmetric):
    A, B, d = make_operands(case, symmetric, requires_grad=True)
    y = rhs_for(build(A, B, d)).requires_grad_(True)
    w = torch.randn_like(y)
    leaves = [t for t in (A, B, d, y) if t is not None]

    def loss(solve, logdet, inv_quad):
        return (solve * w).sum() + 0.7 * logdet.sum() + 0.3 * inv_quad.sum()

    op = build(A, B, d)
    quad, logdet = op.inv_quad_logdet(y, logdet=True)
    got = torch.autograd.grad(loss(op.solve(y), logdet, quad), leaves)
    M = dense_of(A, B, d)
    x = torch.linalg.solve(M, y)
    want = torch.autograd.grad(loss(x, torch.logdet(M), (y * x).sum(-2)), leaves)
    for g, r, name in zip(got, want, ["A", "B", "d", "y"] if B is not None else ["A", "d", "y"]):
        close(g, r, torch.float64, f"grad {name}")


def test_gradient_of_logdet_through_lu_and_cholesky_agree():
    A, _, d = make_operands(CASES["n12_m3"], symmetric=True, requires_grad=True)
    chol = (FactoredMatrix(A, A.mT) + DiagLinearOperator(d)).logdet()
    B = A.mT.detach().clone().requires_grad_(True)  # equal values, separate leaf: LU
    op = FactoredMatrix(A, B) + DiagLinearOperator(d)
    lu = op.logdet()
    assert not op._factorization().hermitian
    close(lu, chol, torch.float64, "logdet")
    gA_chol, gd_chol = torch.autograd.grad(chol, (A, d))
    gA_lu, gB_lu, gd_lu = torch.autograd.grad(lu, (A, B, d))
    close(gA_lu + gB_lu.mT, gA_chol, torch.float64, "tied gradient")
    close(gd_lu, gd_chol, torch.float64, "d gradient")


# --- no CG, no Lanczos ----------------------------------------------------------------------------
def test_no_iterative_methods_even_where_linear_operator_would_use_them():
    A, B, d = make_operands(((900, 8), (8, 900), (900,)), symmetric=False)
    cg = MagicMock(wraps=linear_operator.utils.linear_cg)
    lanczos = MagicMock(wraps=linear_operator.utils.lanczos.lanczos_tridiag)
    with patch("linear_operator.utils.linear_cg", new=cg), patch(
        "linear_operator.utils.lanczos.lanczos_tridiag", new=lanczos
    ), linear_operator.settings.max_cholesky_size(0):
        op = build(A, B, d)
        y = rhs_for(op, k=1)
        x = op.solve(y)
        quad, logdet = op.inv_quad_logdet(y, logdet=True)
    assert not cg.called and not lanczos.called
    M = dense_of(A, B, d)
    close(x, torch.linalg.solve(M, y), torch.float64, "solve")
    close(logdet, torch.logdet(M), torch.float64, "logdet")


def test_private_solve_hook_refuses_lanczos():
    A, B, d = make_operands(CASES["n12_m3"], symmetric=True)
    op = build(A, B, d)
    y = rhs_for(op)
    close(op._solve(y), torch.linalg.solve(dense_of(A, B, d), y), torch.float64, "_solve")
    with pytest.raises(NotImplementedError, match="does not run Lanczos"):
        op._solve(y, num_tridiag=2)


# --- singular, ill-conditioned and negative-determinant operators ---------------------------------
def test_negative_determinant_gives_nan_logdet_and_signed_slogdet():
    A = torch.tensor([[3.0], [0.0], [0.0]], dtype=torch.float64)
    B = torch.tensor([[-1.0, 0.0, 0.0]], dtype=torch.float64)
    d = torch.ones(3, dtype=torch.float64)  # A @ B + I = diag(-2, 1, 1)
    op = build(A, B, d)
    M = dense_of(A, B, d)
    assert torch.isnan(op.logdet()) and torch.isnan(torch.logdet(M))
    sign, logabs = op.slogdet()
    assert sign.item() == -1.0
    close(logabs, torch.linalg.slogdet(M).logabsdet, torch.float64)
    # Negative diagonal entries, symmetric factors: also LU, sign from D and C.
    A2 = torch.randn(6, 2, dtype=torch.float64) / 3
    d2 = torch.tensor([-2.0, 2.5, 2.0, -3.0, -2.2, 2.0], dtype=torch.float64)
    op2 = build(A2, None, d2)
    assert not op2._factorization().hermitian
    sign_ref, logabs_ref = torch.linalg.slogdet(dense_of(A2, None, d2))
    sign, logabs = op2.slogdet()
    assert sign.item() == sign_ref.item() == -1.0
    close(logabs, logabs_ref, torch.float64)


def test_complex_logdet_matches_torch():
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False, dtype=torch.complex128)
    op, M = build(A, B, d), dense_of(A, B, d)
    close(op.logdet(), torch.logdet(M), torch.complex128)


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan")])
def test_zero_or_nonfinite_diagonal_raises(bad):
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False)
    d = d.clone()
    d[4] = bad
    op = build(A, B, d)
    y = rhs_for(op)
    for call in (lambda: op.solve(y), op.logdet, lambda: op.inv_quad(y), op.slogdet):
        with pytest.raises(RuntimeError, match=r"the diagonal has a zero or non-finite entry \(d\[4\]"):
            call()


def test_overflowing_capacitance_raises():
    A, B, _ = make_operands(CASES["n12_m3"], symmetric=False)
    op = build(A * 1e200, B * 1e200, torch.full((12,), 1e-200, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="capacitance matrix .* has non-finite entries"):
        op.solve(rhs_for(op))


def _exactly_singular(batch: bool):
    # A @ B = -e1 e1^T, D = I: M = diag(0, 1, ..., 1), C = 1 - 1 = 0 exactly.
    A = torch.zeros(5, 1, dtype=torch.float64)
    A[0, 0] = 1.0
    B = -A.mT.clone()
    if batch:
        A = torch.stack([A, 0.5 * A])  # the second member is regular
    return A, B, torch.ones(5, dtype=torch.float64)


@pytest.mark.parametrize("batch", [False, True], ids=["single", "batch"])
def test_exactly_singular_operator(batch):
    A, B, d = _exactly_singular(batch)
    op = build(A, B, d)
    y = rhs_for(op)
    at = r" \(batch index \[\(0,\)\]\)" if batch else ""
    with pytest.raises(RuntimeError, match=rf"A @ B \+ D is singular: .* zero pivot{at}, .*lstsq"):
        op.solve(y)
    with pytest.raises(RuntimeError, match="A @ B \\+ D is singular"):
        op.inv_quad_logdet(y, logdet=True)
    # Never a silent -inf: a zero pivot may be rounding, so the caller is told.
    pattern = rf"has an exact zero pivot in torch.float64{at}: the operator is singular to working precision"
    with pytest.warns(IllConditionedWarning, match=pattern) as record:
        logdet = op.logdet()
    assert record[0].filename == __file__
    with pytest.warns(IllConditionedWarning, match=pattern):
        sign, logabs = op.slogdet()
    sign_ref, logabs_ref = torch.linalg.slogdet(dense_of(A, B, d))
    assert torch.equal(sign, sign_ref) and torch.equal(logabs, logabs_ref)
    assert logdet.reshape(-1)[0] == -math.inf


def test_ill_conditioned_operator_warns_with_estimate():
    # C = 1 - (1 - 2^-53) = 2^-53 exactly: M = A @ B + I has an eigenvalue 2^-53.
    A = torch.zeros(5, 1, dtype=torch.float64)
    A[0, 0] = 1.0
    B = -(1 - 2.0**-53) * A.mT
    op = build(A, B, torch.ones(5, dtype=torch.float64))
    y = rhs_for(op)
    pattern = r"ill-conditioned: estimated condition number \d\.\d\de\+1[6-9] \(1-norm\) exceeds 4\.5e\+15"
    with pytest.warns(IllConditionedWarning, match=pattern) as record:
        x = op.solve(y)
    assert record[0].filename == __file__  # stacklevel points at the caller
    close(x, torch.linalg.solve(dense_of(A, B, torch.ones(5, dtype=torch.float64)), y), torch.float64)
    for call in (op.logdet, op.slogdet, lambda: op.inv_quad(y), lambda: op.inv_quad_logdet(y, logdet=True)):
        with pytest.warns(IllConditionedWarning, match="ill-conditioned") as record:
            call()
        assert record[0].filename == __file__


def test_well_conditioned_operator_does_not_warn():
    A, B, d = make_operands(CASES["batched"], symmetric=False)
    op = build(A, B, d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op.inv_quad_logdet(rhs_for(op), logdet=True)


def test_condition_estimate_is_a_tight_lower_bound():
    gen = torch.Generator().manual_seed(3)
    C = torch.randn(4, 30, 30, dtype=torch.float64, generator=gen) + 0.1 * torch.eye(30, dtype=torch.float64)
    LU, piv = torch.linalg.lu_factor(C)
    est = conditioning.inverse_norm1_estimate(
        lambda X: torch.linalg.lu_solve(LU, piv, X), lambda X: torch.linalg.lu_solve(LU, piv, X, adjoint=True), C
    )
    exact = torch.linalg.matrix_norm(torch.linalg.inv(C), ord=1)
    assert bool((est <= exact * (1 + 1e-12)).all()) and bool((est >= exact / 3).all())


@pytest.mark.parametrize(
    "name, rhs, error, pattern",
    [
        ("rows", torch.ones(11, 2, dtype=torch.float64), ValueError,
         r"`right_tensor` must have shape \(\.\.\., 12, k\)"),
        ("dtype", torch.ones(12, 2, dtype=torch.float32), TypeError, "`right_tensor` has dtype torch.float32"),
        ("type", [1.0] * 12, TypeError, "`right_tensor` must be a torch.Tensor"),
        ("batch", torch.ones(3, 12, 2, dtype=torch.float64), ValueError, "do not broadcast"),
    ],
)
def test_bad_right_hand_side(name, rhs, error, pattern):
    A, B, d = make_operands(((2, 12, 3), (2, 3, 12), (12,)), symmetric=False)
    with pytest.raises(error, match=pattern):
        build(A, B, d).solve(rhs)


def test_inv_quad_logdet_needs_something():
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False)
    with pytest.raises(ValueError, match="`inv_quad_logdet` needs `inv_quad_rhs`, `logdet=True`, or both"):
        build(A, B, d).inv_quad_logdet()


# --- FactoredMatrix.solve, pinv, lstsq ------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
@pytest.mark.parametrize(
    "shapes", [((6, 6), (6, 6)), ((2, 5, 8), (8, 5)), ((1, 3), (3, 1))], ids=["square", "wide", "n_1"]
)
def test_factored_solve(shapes, dtype):
    A, B = make_factors(*shapes, dtype=dtype, seed=2)
    A = A + 3 * torch.eye(*A.shape[-2:], dtype=dtype)  # well conditioned
    B = B + 3 * torch.eye(*B.shape[-2:], dtype=dtype)
    fm = FactoredMatrix(A, B)
    M = A.to(ref_dtype(dtype)) @ B.to(ref_dtype(dtype))
    y = torch.randn(*fm.batch_shape, fm.ldim, 2, dtype=ref_dtype(dtype)).to(dtype)
    close(fm.solve(y), torch.linalg.solve(M, y.to(M.dtype)), dtype, "solve")
    close(torch.linalg.solve(fm, y), torch.linalg.solve(M, y.to(M.dtype)), dtype, "torch.linalg.solve")
    left = torch.randn(3, fm.ldim, dtype=ref_dtype(dtype)).to(dtype)
    close(fm.solve(y, left), left.to(M.dtype) @ torch.linalg.solve(M, y.to(M.dtype)), dtype, "with left")
    if fm.dim() == 2:
        close(fm.solve(y[:, 0]), torch.linalg.solve(M, y[:, 0].to(M.dtype)), dtype, "vector")


def test_factored_solve_gradients_nonsymmetric():
    A, B = make_factors((5, 7), (7, 5), seed=4)
    A, B = (A + 3 * torch.eye(5, 7, dtype=torch.float64)).requires_grad_(True), B.requires_grad_(True)
    y = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 2, dtype=torch.float64)
    got = torch.autograd.grad((FactoredMatrix(A, B).solve(y) * w).sum(), (A, B, y))
    want = torch.autograd.grad((torch.linalg.solve(A @ B, y) * w).sum(), (A, B, y))
    for g, r in zip(got, want):
        close(g, r, torch.float64, "grad")


def test_factored_solve_errors():
    with pytest.raises(ValueError, match=r"solve needs a square product \(ldim == rdim\); this FactoredMatrix has shape .* Use `fm.lstsq\(y\)` .* `fm.pinv\(\)`"):
        FactoredMatrix(torch.randn(5, 6), torch.randn(6, 4)).solve(torch.ones(5))
    low_rank = FactoredMatrix(torch.randn(5, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    pattern = r"rank at most mdim = 3 < 5 = ldim, so it is singular.*`fm.lstsq\(y\)`.*`fm.pinv\(\)`"
    with pytest.raises(ValueError, match=pattern):
        low_rank.solve(torch.ones(5, dtype=torch.float64))
    A = torch.randn(4, 6, dtype=torch.float64)
    A[2] = 0  # a zero row: A @ B is exactly singular
    with pytest.raises(RuntimeError, match=r"A @ B is singular .* `lstsq\(y\)` .* `pinv\(\)`"):
        FactoredMatrix(A, torch.randn(6, 4, dtype=torch.float64)).solve(torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`right_tensor` must have shape \(\.\.\., 4, k\) or \(4,\)"):
        FactoredMatrix(torch.randn(4, 6), torch.randn(6, 4)).solve(torch.ones(3))


def test_factored_solve_ill_conditioned_warns():
    A = torch.eye(3, 4, dtype=torch.float64)
    B = torch.eye(4, 3, dtype=torch.float64)
    B[2, 2] = 1e-17
    with pytest.warns(IllConditionedWarning, match=r"A @ B is ill-conditioned: .* `fm.lstsq\(y\)`"):
        FactoredMatrix(A, B).solve(torch.ones(3, dtype=torch.float64))


PINV_SHAPES = {
    "tall_low_rank": ((9, 4), (4, 7), None),
    "wide_inner": ((4, 7), (7, 5), None),
    "rank_deficient_A": ((10, 5), (5, 8), 2),
    "batched": ((2, 3, 8, 3), (3, 3, 6), None),
    "batched_rank_deficient": ((2, 8, 4), (4, 6), 2),
    "mdim_1": ((6, 1), (1, 5), None),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
@pytest.mark.parametrize("spec", PINV_SHAPES.values(), ids=PINV_SHAPES.keys())
def test_pinv_and_lstsq(spec, dtype):
    a_shape, b_shape, rank = spec
    A, B = make_factors(a_shape, b_shape, dtype=dtype, rank=rank, seed=5)
    fm = FactoredMatrix(A, B)
    M = A.to(ref_dtype(dtype)) @ B.to(ref_dtype(dtype))
    P = fm.pinv()
    assert isinstance(P, FactoredMatrix) and P.shape == M.mT.shape
    expected_rank = min(*a_shape[-2:], b_shape[-1]) if rank is None else rank
    assert P.mdim == expected_rank  # truncated to the numerical rank
    # The reference truncates by the same rule, in float64.
    pinv_ref = torch.linalg.pinv(M, rtol=max(fm.ldim, fm.rdim) * torch.finfo(dtype).eps)
    close(P.to_dense(), pinv_ref, dtype, "pinv")
    y = torch.randn(*fm.batch_shape, fm.ldim, 3, dtype=ref_dtype(dtype)).to(dtype)
    x = fm.lstsq(y)
    assert x.shape == (*fm.batch_shape, fm.rdim, 3)
    close(x, pinv_ref @ y.to(M.dtype), dtype, "lstsq")
    if fm.dim() == 2:
        close(fm.lstsq(y[:, 0]), pinv_ref @ y[:, 0].to(M.dtype), dtype, "lstsq vector")


def test_pinv_tolerances():
    U, _ = torch.linalg.qr(torch.randn(8, 3, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))
    S = torch.tensor([4.0, 1.0, 1e-3], dtype=torch.float64)
    fm = FactoredMatrix(U * S, V.mT)
    assert fm.pinv().mdim == 3
    assert fm.pinv(rtol=1e-2).mdim == 2
    assert fm.pinv(atol=2.0).mdim == 1
    close(fm.pinv(atol=2.0).to_dense(), torch.outer(V[:, 0], U[:, 0]) / 4, torch.float64)
    y = torch.randn(8, dtype=torch.float64)
    close(fm.lstsq(y, rtol=1e-2), (V[:, :2] / S[:2]) @ (U[:, :2].mT @ y), torch.float64)


def test_pinv_gradient_matches_dense():
    A, B = make_factors((7, 3), (3, 6), seed=6)
    A.requires_grad_(True)
    B.requires_grad_(True)
    W = torch.randn(6, 7, dtype=torch.float64)
    got = torch.autograd.grad((FactoredMatrix(A, B).pinv().to_dense() * W).sum(), (A, B))
    want = torch.autograd.grad((torch.linalg.pinv(A @ B) * W).sum(), (A, B))
    for g, r in zip(got, want):
        close(g, r, torch.float64, "pinv grad")


def test_lstsq_errors():
    fm = FactoredMatrix(torch.randn(5, 2), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"`right_tensor` must have shape \(\.\.\., 5, k\) or \(5,\)"):
        fm.lstsq(torch.ones(4))
    with pytest.raises(TypeError, match="`right_tensor` must be a torch.Tensor"):
        fm.lstsq(None)


# --- linear_operator's own CG, on its generic AddedDiagLinearOperator ------------------------------
def test_linear_operator_cg_on_generic_added_diag_matches_dense():
    """CG through linear_operator's generic path: ``AddedDiagLinearOperator(fm, DiagLinearOperator(d))``
    (constructed directly, so the Woodbury operator is not involved), ``max_cholesky_size(0)`` to
    force CG; and ``linear_operator.utils.linear_cg`` on the operator's matmul."""
    n, m, sigma2 = 2000, 16, 0.5
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(n, m, dtype=torch.float64, generator=gen) / math.sqrt(m)
    fm = FactoredMatrix(A, A.mT)
    d = torch.full((n,), sigma2, dtype=torch.float64)
    generic = AddedDiagLinearOperator(fm, DiagLinearOperator(d))
    assert type(generic) is AddedDiagLinearOperator
    y = torch.randn(n, 2, dtype=torch.float64, generator=gen)
    expected = torch.linalg.solve(A @ A.mT + sigma2 * torch.eye(n, dtype=torch.float64), y)

    cg = MagicMock(wraps=linear_operator.utils.linear_cg)
    with patch("linear_operator.utils.linear_cg", new=cg), linear_operator.settings.max_cholesky_size(0), \
            linear_operator.settings.cg_tolerance(1e-10), linear_operator.settings.max_cg_iterations(100):
        x = generic.solve(y)  # preconditioned by linear_operator's pivoted Cholesky
    assert cg.called
    assert float((x - expected).norm() / expected.norm()) < 1e-8

    x = linear_operator.utils.linear_cg(generic._matmul, y, tolerance=1e-6, max_iter=100)  # unpreconditioned
    assert float((x - expected).norm() / expected.norm()) < 1e-6
    # The Woodbury operator on the same matrix: same answer, exact, no CG.
    close((fm + DiagLinearOperator(d)).solve(y), expected, torch.float64, "Woodbury")


def test_nearly_singular_random_operator_warns():
    # B = -(1 - 1e-17) pinv(A): M = I - (1 - 1e-17) P_A has eigenvalues 1e-17 (rounded), and
    # C = I + B A cancels to rounding noise, whatever its own condition number.
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    op = build(A, -(1 - 1e-17) * torch.linalg.pinv(A), torch.ones(40, dtype=torch.float64))
    with pytest.warns(IllConditionedWarning, match=r"estimated condition number .* exceeds"):
        op.solve(torch.randn(40, 1, dtype=torch.float64, generator=gen))


# --- FactoredMatrix's own log-determinant and inverse quadratic form (no diagonal) ----------------
def _square_fm(n, mdim, kind, batch=(), seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, mdim, dtype=torch.float64, generator=gen)
    if kind == "symmetric_indefinite":
        signs = torch.tensor([(-1.0) ** i for i in range(mdim)], dtype=torch.float64)
        return FactoredMatrix(A, (A * signs).mT.contiguous())
    return FactoredMatrix(A, torch.randn(*batch, mdim, n, dtype=torch.float64, generator=gen))


@pytest.mark.parametrize("kind", ["nonsymmetric", "symmetric_indefinite"])
@pytest.mark.parametrize("batch", [(), (3,)])
@pytest.mark.parametrize("mdim", [5, 9])
def test_product_slogdet_logdet_inv_quad_match_dense(kind, batch, mdim):
    fm = _square_fm(5, mdim, kind, batch)
    dense = fm.A @ fm.B
    sign, logabs = fm.slogdet()
    ref_sign, ref_logabs = torch.linalg.slogdet(dense)
    torch.testing.assert_close(sign, ref_sign)
    torch.testing.assert_close(logabs, ref_logabs)
    torch.testing.assert_close(fm.logdet(), torch.logdet(dense), equal_nan=True)
    rhs = torch.randn(*batch, 5, 2, dtype=torch.float64)
    ref = (rhs * torch.linalg.solve(dense, rhs)).sum(-2)
    torch.testing.assert_close(fm.inv_quad(rhs), ref.sum(-1))
    torch.testing.assert_close(fm.inv_quad(rhs, reduce_inv_quad=False), ref)
    inv_quad, logdet = fm.inv_quad_logdet(rhs, logdet=True)
    torch.testing.assert_close(inv_quad, ref.sum(-1))
    torch.testing.assert_close(logdet, torch.logdet(dense), equal_nan=True)


def test_product_logdet_is_nan_for_a_negative_determinant_and_differentiable():
    A = torch.tensor([[1.0, 0.0], [0.0, -2.0]], dtype=torch.float64, requires_grad=True)
    B = torch.eye(2, dtype=torch.float64, requires_grad=True)
    fm = FactoredMatrix(A, B)
    assert torch.isnan(fm.logdet())
    torch.testing.assert_close(fm.slogdet()[0], torch.tensor(-1.0, dtype=torch.float64))
    A2 = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    B2 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: FactoredMatrix(a, b).slogdet()[1], (A2, B2))


def test_product_with_mdim_below_n_is_singular():
    fm = _square_fm(6, 3, "nonsymmetric", (2,))
    sign, logabs = fm.slogdet()
    assert bool((sign == 0).all()) and bool((logabs == -torch.inf).all())
    assert bool((fm.logdet() == -torch.inf).all())
    with pytest.raises(ValueError, match=r"rank at most mdim = 3 < 6 = ldim.*lstsq"):
        fm.inv_quad(torch.randn(2, 6, 1, dtype=torch.float64))


def test_product_inv_quad_logdet_errors():
    fm = _square_fm(4, 5, "nonsymmetric")
    with pytest.raises(ValueError, match=r"`inv_quad_logdet` needs `inv_quad_rhs`, `logdet=True`, or both"):
        fm.inv_quad_logdet()
    rect = FactoredMatrix(torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"slogdet/logdet needs a square product"):
        rect.logdet()
    with pytest.raises(ValueError, match=r"inv_quad needs a square product \(ldim == rdim\); .* Use `fm.lstsq\(y\)`"):
        rect.inv_quad_logdet(torch.ones(5, 1, dtype=torch.float64))


def test_solve_and_lstsq_validate_the_right_hand_side():
    fm = _square_fm(4, 5, "nonsymmetric", (2,))
    with pytest.raises(TypeError, match=r"`right_tensor` has dtype torch.float32 but the operator has torch.float64"):
        fm.solve(torch.randn(2, 4, 1))
    with pytest.raises(TypeError, match=r"`right_tensor` has dtype torch.complex128"):
        fm.lstsq(torch.randn(2, 4, 1, dtype=torch.complex128))
    with pytest.raises(ValueError, match=r"leading dims do not broadcast: the operator of shape \(2, 4, 4\) and `right_tensor`"):
        fm.solve(torch.randn(3, 4, 1, dtype=torch.float64))
    rect = FactoredMatrix(torch.randn(6, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"`right_tensor` must have shape \(\.\.\., 6, k\) or \(6,\)"):
        rect.lstsq(torch.randn(4, dtype=torch.float64))
    y = torch.randn(6, dtype=torch.float64)
    torch.testing.assert_close(rect.lstsq(y), torch.linalg.pinv(rect.A @ rect.B) @ y)


def test_negated_factored_added_diag():
    fm = _square_fm(5, 2, "nonsymmetric")
    op = fm + DiagLinearOperator(torch.full((5,), 3.0, dtype=torch.float64))
    neg = -op
    assert isinstance(neg, FactoredAddedDiag)
    torch.testing.assert_close(neg.to_dense(), -op.to_dense())
    y = torch.randn(5, dtype=torch.float64)
    torch.testing.assert_close(neg.solve(y), torch.linalg.solve(-op.to_dense(), y))


# --- the product's determinant with NaN / Inf factors (mdim < ldim) --------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
def test_product_logdet_with_nonfinite_factors_is_nan_like_torch(bad, dtype):
    A, B = make_factors((3, 5, 2), (2, 5), dtype=dtype, seed=8)
    A = A.clone()
    A[1, 0, 0] = bad  # member 1 only; B is shared
    fm = FactoredMatrix(A, B)
    sign, logabs = fm.slogdet()
    logdet = fm.logdet()
    dense = A.to(ref_dtype(dtype)) @ B.to(ref_dtype(dtype))
    assert bool(torch.isnan(torch.logdet(dense[1]))) and bool(torch.isnan(logdet[1]))
    assert bool(torch.isnan(logabs[1])) and bool(torch.isnan(sign[1]))
    for i in (0, 2):  # the finite members stay exactly singular
        assert logabs[i] == -math.inf and sign[i] == 0 and logdet[i].real == -math.inf
    B2 = B.clone()
    B2[0, 3] = bad  # in the shared factor: every member
    assert bool(torch.isnan(FactoredMatrix(A[0], B2).logdet()))
    assert bool(torch.isnan(FactoredMatrix(A[0], B2).slogdet()[1]))


# --- a near-singular 32-bit Woodbury operator: refined in 64 bits, never a silent (0, -inf) --------
def _float32_near_singular(kind: str):
    if kind == "zero_pivot":
        # float32(-1/3) * 3 rounds to -1, so the float32 capacitance 1 + b a is exactly 0; the
        # operator of these float32 values is diag(1 + b a, 1) with 1 + b a = -3 * 2^-25 * ... != 0.
        A = torch.tensor([[3.0], [0.0]])
        B = torch.tensor([[-1.0 / 3.0, 0.0]])
    else:
        # B = -(1 - 1e-9) pinv(A) in float32: M = I + A B has eigenvalues ~1e-8, cond about 1e9.
        gen = torch.Generator().manual_seed(0)
        A64 = torch.randn(40, 5, dtype=torch.float64, generator=gen)
        A, B = A64.float(), (-(1 - 1e-9) * torch.linalg.pinv(A64)).float()
    return A, B, torch.ones(A.shape[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
@pytest.mark.parametrize("kind", ["zero_pivot", "random_cond_1e9"])
def test_float32_near_singular_woodbury_is_refined_and_warns(kind, dtype):
    A, B, d = (t.to(dtype) for t in _float32_near_singular(kind))
    r = ref_dtype(dtype)
    M = A.to(r) @ B.to(r) + torch.diag(d.to(r))  # the operator of exactly these values
    ref = torch.linalg.slogdet(M)
    assert ref.sign != 0 and torch.linalg.cond(M) > 1e7
    op = FactoredMatrix(A, B) + DiagLinearOperator(d)
    reason = r"has an exact zero pivot" if kind == "zero_pivot" else r"is ill-conditioned \(estimated condition number"
    pattern = (
        rf"{reason} .*in {dtype}, so it was factorised again in {r} \(estimated condition number "
        rf".* there\) and the result rounded to {dtype}"
    )
    with choices.recorded() as log, pytest.warns(IllConditionedWarning, match=pattern) as record:
        sign, logabs = op.slogdet()
    assert record[0].filename == __file__
    assert [(c.operation, c.method) for c in log] == [("woodbury", str(r).removeprefix("torch."))]
    assert sign.dtype == dtype and logabs.dtype == torch.float32
    eps32 = torch.finfo(torch.float32).eps
    assert abs(sign.item() - ref.sign.item()) <= 100 * eps32
    assert abs(logabs.item() - ref.logabsdet.item()) <= 100 * eps32 * max(1.0, abs(ref.logabsdet.item()))
    y = torch.randn(A.shape[0], 2, generator=torch.Generator().manual_seed(1)).to(dtype)
    with pytest.warns(IllConditionedWarning):
        x = op.solve(y)
    x_ref = torch.linalg.solve(M, y.to(r))
    assert x.dtype == dtype
    assert_scaled_close(x, x_ref, x_ref.abs().max(), 100 * eps32, "refined solve")


def test_well_conditioned_float32_is_not_refined_and_the_limit_is_a_setting():
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False, dtype=torch.float32)
    with choices.recorded() as log, warnings.catch_warnings():
        warnings.simplefilter("error")
        build(A, B, d).logdet()
    assert log == []
    A, B, d = _float32_near_singular("random_cond_1e9")
    with settings.ill_conditioned_rcond(1e-6), choices.recorded() as log, warnings.catch_warnings():
        warnings.simplefilter("error")  # limit 1/(1e-6 eps): neither refined nor reported
        (FactoredMatrix(A, B) + DiagLinearOperator(d)).logdet()
    assert log == []
    with pytest.raises(ValueError, match=r"`ill_conditioned_rcond` must be a positive finite number; got 0"):
        settings.ill_conditioned_rcond(0)
    with pytest.raises(ValueError, match=r"`condest_iterations` must be a positive integer; got 0"):
        settings.condest_iterations(0)


def test_condest_iterations_setting_is_used():
    gen = torch.Generator().manual_seed(4)
    C = torch.randn(20, 20, dtype=torch.float64, generator=gen)
    LU, piv = torch.linalg.lu_factor(C)
    calls = []

    def solve(X):
        calls.append(1)
        return torch.linalg.lu_solve(LU, piv, X)

    with settings.condest_iterations(2):
        conditioning.inverse_norm1_estimate(solve, lambda X: torch.linalg.lu_solve(LU, piv, X, adjoint=True), C)
    assert len(calls) == 3  # two iterations and Higham's extra vector


# --- empty operators: mdim = 0 (the diagonal alone) and n = 0 --------------------------------------
@pytest.mark.parametrize("shapes", [((5, 0), (0, 5), (5,)), ((2, 4, 0), (0, 4), (4,)), ((0, 3), (3, 0), (0,)),
                                    ((0, 0), (0, 0), (0,)), ((2, 0, 0), (0, 0), (0,))],
                         ids=["mdim_0", "mdim_0_batched", "n_0", "empty", "empty_batched"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["nonsym", "sym"])
def test_empty_woodbury_operators(shapes, symmetric):
    a_shape, b_shape, d_shape = shapes
    A = torch.randn(a_shape, dtype=torch.float64)
    B = None if symmetric else torch.randn(b_shape, dtype=torch.float64)
    d = 2 + torch.rand(d_shape, dtype=torch.float64)
    op, M = build(A, B, d), dense_of(A, B, d)
    assert op._factorization().hermitian or not symmetric  # empty B equals A^H: either path is right
    y = torch.randn(*M.shape[:-1], 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = op.solve(y)
        assert x.shape == y.shape
        close(x, torch.linalg.solve(M, y), torch.float64, "solve")
        close(op.logdet(), torch.logdet(M), torch.float64, "logdet")
        sign, logabs = op.slogdet()
        ref = torch.linalg.slogdet(M)
        close(sign, ref.sign, torch.float64, "sign")
        close(logabs, ref.logabsdet, torch.float64, "logabsdet")
        quad_ref = (y * torch.linalg.solve(M, y)).sum(-2)
        close(op.inv_quad(y), quad_ref.sum(-1), torch.float64, "inv_quad")
        quad, logdet = op.inv_quad_logdet(y, logdet=True, reduce_inv_quad=False)
        close(quad, quad_ref, torch.float64, "inv_quad_logdet: inv_quad")
        close(logdet, torch.logdet(M), torch.float64, "inv_quad_logdet: logdet")


def test_empty_product_solves():
    fm = FactoredMatrix(torch.randn(0, 3, dtype=torch.float64), torch.randn(3, 0, dtype=torch.float64))
    assert fm.solve(torch.ones(0, 2, dtype=torch.float64)).shape == (0, 2)
    assert fm.logdet() == 0 and fm.slogdet()[0] == 1
    assert fm.inv_quad(torch.ones(0, 2, dtype=torch.float64)) == 0


# --- the Woodbury cache: edits through .data and NumPy, no_grad then grad --------------------------
@pytest.mark.parametrize("edit", ["A.data", "A numpy", "d.data", "d numpy"])
def test_woodbury_cache_sees_edits_the_version_counter_misses(edit):
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False)
    op = build(A, B, d)
    y = rhs_for(op)
    before = op.solve(y)
    first = op._factorization()
    assert op._factorization() is first  # cached
    version = (A._version, d._version)
    if edit == "A.data":
        A.data[0, 0] += 1.0
    elif edit == "A numpy":
        A.numpy()[0, 0] += 1.0
    elif edit == "d.data":
        d.data[0] += 1.0
    else:
        d.numpy()[0] += 1.0
    assert (A._version, d._version) == version  # the edit is invisible to the version counter
    assert op._factorization() is not first
    after = op.solve(y)
    close(after, torch.linalg.solve(dense_of(A, B, d), y), torch.float64, f"after {edit}")
    assert not torch.allclose(before, after)
    close(op.logdet(), torch.logdet(dense_of(A, B, d)), torch.float64, "logdet")


def test_woodbury_result_from_no_grad_is_not_reused_for_gradients():
    A, B, d = make_operands(CASES["n12_m3"], symmetric=False, requires_grad=True)
    op = build(A, B, d)
    y = rhs_for(op)
    with torch.no_grad():
        cached = op._factorization()
        op.logdet()
        op.solve(y)
    assert not cached.left.requires_grad
    quad, logdet = op.inv_quad_logdet(y, logdet=True)
    assert op._factorization() is not cached and logdet.requires_grad
    got = torch.autograd.grad(logdet + quad + op.solve(y).sum(), (A, B, d))
    M = dense_of(A, B, d)
    x = torch.linalg.solve(M, y)
    want = torch.autograd.grad(torch.logdet(M) + (y * x).sum() + x.sum(), (A, B, d))
    for g, w, name in zip(got, want, "ABd"):
        close(g, w, torch.float64, f"grad {name}")


def test_refined_float32_gradients_match_float64():
    A, B, d = _float32_near_singular("random_cond_1e9")
    A, B, d = (t.clone().requires_grad_(True) for t in (A, B, d))
    with pytest.warns(IllConditionedWarning):
        logdet = (FactoredMatrix(A, B) + DiagLinearOperator(d)).slogdet()[1]
    got = torch.autograd.grad(logdet, (A, B, d))
    A64, B64, d64 = (t.detach().double().requires_grad_(True) for t in (A, B, d))
    want = torch.autograd.grad(torch.linalg.slogdet(A64 @ B64 + torch.diag(d64))[1], (A64, B64, d64))
    for g, w, name in zip(got, want, "ABd"):
        assert g.dtype == torch.float32
        # d log|det M| = M^{-T}: as large as cond(M); compared relative to its size, in float32.
        assert_scaled_close(g, w, w.abs().max(), 1e-4, f"grad {name}")
