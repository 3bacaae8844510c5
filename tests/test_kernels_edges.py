"""lowrank_op.kernels at the edges: what "auto" records, settings, extreme scales, gradients at
rank-deficient and zero factors, unbalanced symmetric products, and non-finite input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import dense, make_factors, ref_dtype, with_condition
from hypothesis import given
from hypothesis import strategies as st

from lowrank_op import FactoredMatrix, choices, kernels, settings


def methods(log, operation="orthogonalize"):
    return [c.method for c in log if c.operation == operation]


def eps_of(dtype: torch.dtype) -> float:
    return torch.finfo(kernels.compute_dtype(dtype)).eps


# --- "auto" records its choices; settings change them -----------------------------------------------
def test_auto_records_the_qr_choice_per_factor_with_its_figures():
    A, B = make_factors((40, 4), (4, 10), torch.float64)  # A: 10 rows per column; B^H: 2.5
    with choices.recorded() as log:
        kernels.svd(A, B)
    assert methods(log) == ["cholqr2", "householder"]
    assert "A of shape (40, 4) has 10 rows per column, at least cholqr2_min_aspect = 4" in log[0].reason
    assert "B^H of shape (10, 4) has 2.5 rows per column, below cholqr2_min_aspect = 4" in log[1].reason
    with choices.recorded() as log:
        kernels.svd(A, B, "householder")  # explicit methods record nothing
    assert log == []


def test_setting_cholqr2_min_aspect_changes_the_choice():
    A, B = make_factors((40, 4), (4, 10), torch.float64)
    with settings.cholqr2_min_aspect(11), choices.recorded() as log:
        kernels.svdvals(A, B)
    assert methods(log) == ["householder", "householder"] and "cholqr2_min_aspect = 11" in log[0].reason
    with settings.cholqr2_min_aspect(2), choices.recorded() as log:
        kernels.svdvals(A, B)
    assert methods(log) == ["cholqr2", "cholqr2"]


def test_setting_cholqr2_max_defect_makes_auto_fall_back_and_cholqr2_raise():
    # cond 1e3: the first pass's defect is about eps * cond^2 ~ 1e-10, far above 1e-14.
    X = with_condition(64, 4, 1e3, torch.float64)
    B = torch.randn(4, 3, dtype=torch.float64)  # mdim >= rdim: B is used as it is
    with choices.recorded() as log:
        kernels.svd(X, B)
    assert methods(log) == ["cholqr2"]
    with settings.cholqr2_max_defect(1e-14):
        with choices.recorded() as log:
            U, S, V = kernels.svd(X, B)
        assert methods(log) == ["cholqr2", "householder"]
        assert "orthogonality defect" in log[1].reason and "> cholqr2_max_defect 1e-14" in log[1].reason
        torch.testing.assert_close(S, torch.linalg.svdvals(X @ B))
        with pytest.raises(RuntimeError, match=r"CholeskyQR2 failed on a factor of shape \(64, 4\): the first pass's orthogonality defect"):
            kernels.svd(X, B, "cholqr2")


def test_cholqr2_fallback_reason_counts_failed_batch_members():
    gen = torch.Generator().manual_seed(1)
    low_rank = torch.randn(40, 2, dtype=torch.float64, generator=gen) @ torch.randn(2, 5, dtype=torch.float64, generator=gen)
    A = torch.stack([torch.randn(40, 5, dtype=torch.float64, generator=gen), low_rank, low_rank])
    with choices.recorded() as log:
        kernels.orthogonalize(A)
    assert methods(log) == ["cholqr2", "householder"]
    assert "2 of 3 batch member(s)" in log[1].reason


def test_setting_gram_norm_max_rel_error_changes_the_choice():
    A, B = make_factors((30, 4), (4, 25), torch.float32)
    with choices.recorded() as log:
        kernels.frobenius_norm(A, B)
    assert methods(log, "norm") == ["gram"]
    with settings.gram_norm_max_rel_error(1e-12), choices.recorded() as log:
        n = kernels.frobenius_norm(A, B)
    assert methods(log, "norm") == ["qr"] and "> gram_norm_max_rel_error = 1e-12" in log[0].reason
    ref = torch.linalg.matrix_norm(dense(A, B))
    assert abs(float(n) - float(ref)) <= 50 * eps_of(A.dtype) * float(ref)


# --- extreme scales ----------------------------------------------------------------------------------
SCALES = {
    torch.float32: [(1e-25, 1.0), (1e20, 1.0), (1e-25, 1e-12), (1e18, 1e-30)],
    torch.bfloat16: [(1e-25, 1.0), (1e20, 1.0)],
    torch.float16: [(2.0**-14, 2.0**-10), (2.0**14, 1.0)],
    torch.complex64: [(1e-25, 1.0), (1e20, 1.0)],
}


@pytest.mark.parametrize("dtype", SCALES)
@pytest.mark.parametrize("method", ["auto", "householder", "cholqr2"])
def test_svd_svdvals_norm_at_extreme_scales(dtype, method):
    for scale_a, scale_b in SCALES[dtype]:
        # A tall (CholeskyQR2 and the QR core run), batched with a member 8x smaller.
        A, B = make_factors((2, 24, 3), (3, 10), torch.float64)
        A = (A * scale_a * torch.tensor([1.0, 0.125], dtype=torch.float64)[:, None, None]).to(dtype)
        B = (B * scale_b).to(dtype)
        M = dense(A, B)
        S_ref = torch.linalg.svdvals(M)[..., :3]
        n_ref = torch.linalg.matrix_norm(M)
        bound = 50 * eps_of(dtype) * n_ref[..., None]
        S = kernels.svdvals(A, B, method)
        assert bool(((S.double() - S_ref).abs() <= bound).all()), (scale_a, scale_b, S, S_ref)
        U, S2, V = kernels.svd(A, B, method)
        assert bool(((S2.double() - S_ref).abs() <= bound).all()), (scale_a, scale_b)
        recon = (U.to(M.dtype) * S2.double()[..., None, :]) @ V.to(M.dtype).mH
        assert bool(((recon - M).abs() <= bound[..., None]).all())
        for norm_method in ("auto", "gram", "qr"):
            n = kernels.frobenius_norm(A, B, norm_method)
            assert bool(((n.double() - n_ref).abs() <= bound[..., 0]).all()), (norm_method, scale_a, scale_b, n, n_ref)


def test_balance_scales_by_exact_powers_of_two():
    X = torch.tensor([[3e-30, -1e-31], [0.0, 7e-32]], dtype=torch.float32)
    Xs, scale = kernels._balance(X)
    mantissa, _ = torch.frexp(scale)
    assert float(mantissa) == 0.5, "the scale must be a power of two"
    assert torch.equal(Xs * scale, X)
    assert 0.5 <= float(Xs.abs().max()) < 1
    zero, one = kernels._balance(torch.zeros(2, 3, 4))
    assert torch.equal(zero, torch.zeros(2, 3, 4)) and torch.equal(one, torch.ones(2, 1, 1))


# --- gradients at rank-deficient and zero factors ------------------------------------------------------
def rank_deficient_cases(dtype):
    """(name, A, B, rank of A @ B): a zero column, a duplicated column, a batch of both."""
    A, B = make_factors((2, 9, 4), (4, 7), dtype, seed=5)
    zero, dup = A[0].clone(), A[1].clone()
    zero[:, 3] = 0
    dup[:, 3] = dup[:, 1]
    return [("zero_column", zero, B, 3), ("duplicated_column", dup, B, 3), ("batch", torch.stack([zero, dup]), B, 3)]


def grads(fn, A, B):
    A = A.detach().clone().requires_grad_(True)
    B = B.detach().clone().requires_grad_(True)
    return torch.autograd.grad(fn(A, B), (A, B))


def assert_grads_close(actual, expected, dtype, scale):
    for g, r in zip(actual, expected):
        assert bool(torch.isfinite(g).all()), "gradient must be finite"
        assert bool(((g.to(r.dtype) - r).abs() <= 1e3 * eps_of(dtype) * scale).all()), float((g.to(r.dtype) - r).abs().max())


LOSSES = {"S_squared": lambda S, r: S.pow(2).sum(), "top_r": lambda S, r: S[..., :r].sum()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.complex128])
@pytest.mark.parametrize("loss", LOSSES)
def test_singular_value_gradients_match_dense_on_rank_deficient_factors(dtype, loss):
    f = LOSSES[loss]
    for name, A, B, r in rank_deficient_cases(dtype):
        ref = grads(lambda a, b: f(torch.linalg.svdvals(a @ b), r), A.to(ref_dtype(dtype)), B.to(ref_dtype(dtype)))
        scale = float(torch.linalg.matrix_norm(dense(A, B)).max()) * (1 + float(A.abs().max() + B.abs().max()))
        for path, svals in {
            "S": lambda a, b: FactoredMatrix(a, b).S,
            "svd().S": lambda a, b: FactoredMatrix(a, b).svd()[1],
            "kernels.svdvals(cholqr2 off)": lambda a, b: kernels.svdvals(a, b, "householder"),
        }.items():
            assert_grads_close(grads(lambda a, b: f(svals(a, b), r), A, B), ref, dtype, scale)


def test_norm_gradient_at_a_zero_factor_is_zero_as_dense():
    A = torch.randn(2, 8, 3, dtype=torch.float64)
    B = torch.zeros(3, 6, dtype=torch.float64)  # LoRA's zero initialisation
    ref = grads(lambda a, b: torch.linalg.matrix_norm(a @ b).sum(), A, B)
    assert all(bool((g == 0).all()) for g in ref)
    for method in ("auto", "gram", "qr"):
        got = grads(lambda a, b: FactoredMatrix(a, b).norm(method).sum(), A, B)
        for g in got:
            assert bool((g == 0).all()), method
        got = grads(lambda a, b: FactoredMatrix(a, b).norm(method).sum(), B.mT, A.mT)  # zero on the left
        for g in got:
            assert bool((g == 0).all()), method


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_norm_gradients_match_dense_on_rank_deficient_factors(dtype):
    for name, A, B, r in rank_deficient_cases(dtype):
        ref = grads(lambda a, b: torch.linalg.matrix_norm(a @ b).sum(), A, B)
        for method in ("gram", "qr"):
            assert_grads_close(grads(lambda a, b: kernels.frobenius_norm(a, b, method).sum(), A, B), ref, dtype, 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
def test_make_even_gradients_of_the_product_are_finite_and_match_dense_when_full_rank(dtype):
    def product_loss(a, b):
        even = FactoredMatrix(a, b).make_even()
        return (even.A @ even.B).abs().pow(2).sum() + (even.A.abs().pow(2).sum() + even.B.abs().pow(2).sum())

    def dense_loss(a, b):
        U, S, Vh = torch.linalg.svd(a @ b, full_matrices=False)
        k = min(a.shape[-1], a.shape[-2], b.shape[-1])
        root = S[..., :k].sqrt()
        X, Y = U[..., :k] * root[..., None, :], root[..., :, None] * Vh[..., :k, :]
        return (X @ Y).abs().pow(2).sum() + (X.abs().pow(2).sum() + Y.abs().pow(2).sum())

    A, B = make_factors((2, 9, 4), (4, 7), dtype, seed=2)
    assert_grads_close(grads(product_loss, A, B), grads(dense_loss, A, B), dtype, 10.0)
    for name, A, B, r in rank_deficient_cases(dtype):
        for g in grads(product_loss, A, B):
            assert bool(torch.isfinite(g).all()), name


def test_svd_gradients_match_dense_for_gauge_invariant_losses_batched_complex():
    A, B = make_factors((2, 7, 3), (3, 5), torch.complex128, seed=4)
    W = torch.randn(7, 7, dtype=torch.complex128)

    def loss(U, S, V):
        P = U[..., :2] @ U[..., :2].mH
        return (P * W).real.sum() + (S * torch.arange(3.0, dtype=torch.float64)).sum() + (V[..., :1] @ V[..., :1].mH).real.diagonal(dim1=-2, dim2=-1).pow(2).sum()

    def dense_svd(a, b):
        U, S, Vh = torch.linalg.svd(a @ b, full_matrices=False)
        return U[..., :3], S[..., :3], Vh.mH[..., :3]

    assert_grads_close(grads(lambda a, b: loss(*kernels.svd(a, b)), A, B), grads(lambda a, b: loss(*dense_svd(a, b)), A, B), torch.complex128, 10.0)


@pytest.mark.parametrize(
    "what, fn",
    [
        ("singular values", lambda fm: fm.S.sum()),
        ("SVD", lambda fm: fm.svd()[1].sum()),
        ("norm", lambda fm: fm.norm("qr")),
    ],
)
def test_second_derivatives_raise_a_clear_error(what, fn):
    A, B = make_factors((8, 3), (3, 6), torch.float64)
    A.requires_grad_(True)
    (gA,) = torch.autograd.grad(fn(FactoredMatrix(A, B)), A, create_graph=True)
    with pytest.raises(RuntimeError, match=rf"second derivatives through the factored {what} are not supported"):
        gA.sum().backward()


# --- eigh / eigvalsh with unbalanced factors ------------------------------------------------------------
@given(
    n=st.integers(2, 7),
    mdim=st.integers(1, 6),
    log_scales=st.lists(st.floats(-1.0, 1.0), min_size=6, max_size=6),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_symeig_judges_symmetry_relative_to_the_product(n, mdim, log_scales, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, mdim, dtype=torch.float64, generator=gen)
    d = 300.0 ** torch.tensor(log_scales[:mdim], dtype=torch.float64)  # 1/300 .. 300
    A, B = (X * d).to(dtype), (X.mT / d[:, None]).to(dtype)  # A @ B = X X^T, symmetric
    evals, _ = kernels.symeig(A, B)
    ref = torch.linalg.eigvalsh(dense(A, B) / 2 + dense(A, B).mT / 2)
    assert bool(((evals.double() - ref).abs() <= 1e3 * eps_of(dtype) * float(torch.linalg.matrix_norm(X) ** 2)).all())
    # Clearly not symmetric: A @ B = X (X^T + W) with |X W| comparable to |X X^T|.
    W = torch.randn(mdim, n, dtype=torch.float64, generator=gen)
    asym = X @ W
    if float(torch.linalg.matrix_norm(asym - asym.mT)) < 0.1 * float(torch.linalg.matrix_norm(X @ X.mT + asym)):
        return  # e.g. mdim == 1 with W parallel to X^T: nothing clearly asymmetric to refuse
    B_bad = ((X.mT + W) / d[:, None]).to(dtype)
    with pytest.raises(ValueError, match=r"relative asymmetry \|M - M\^H\|_F / \|M\|_F = .*`\.eigenvalues`"):
        kernels.symeig(A, B_bad)


# --- non-finite input never reaches LAPACK -----------------------------------------------------------------
NAN_SCRIPT = textwrap.dedent(
    """
    import torch
    from lowrank_op import FactoredMatrix, kernels
    bad = []
    for dtype in (torch.float32, torch.complex64, torch.float16, torch.bfloat16, torch.float64, torch.complex128):
        for shape in (((2, 5, 3), (3, 5)), ((2, 4, 6), (6, 4)), ((2, 12, 2), (2, 12))):
            gen = torch.Generator().manual_seed(0)
            A = torch.randn(*shape[0], generator=gen).to(dtype)
            B = torch.randn(*shape[1], generator=gen).to(dtype)
            for poison in (float("nan"), float("inf")) if dtype == torch.float32 else (float("nan"),):
                A1 = A.clone()
                A1[0, 1, 1] = poison
                fm = FactoredMatrix(A1, B)
                outs = {
                    "eigvals": kernels.eigvals(A1, B),
                    "reverse_product_eigvals": kernels.reverse_product_eigvals(A1, B),
                    "eigs": fm.eigs(2, method="exact"),
                    "svdvals": kernels.svdvals(A1, B),
                    "svd": kernels.svd(A1, B)[0],
                    "S": fm.S,
                    "norm": fm.norm(),
                }
                for name, out in outs.items():
                    # NaN for the poisoned member (the norm may be inf, as the dense norm is), the
                    # other member untouched.
                    first = ~torch.isfinite(out[0]) if name == "norm" else torch.isnan(out[0])
                    if not (bool(first.all()) and bool(torch.isfinite(out[1]).all())):
                        bad.append((name, dtype, shape, poison))
                A2 = A.clone()
                A2[0, 0, 0] = poison
                evals, evecs = kernels.symeig(A2, A2.mT.contiguous(), eigenvectors=True)
                if not (bool(torch.isnan(evals[0]).all()) and bool(torch.isfinite(evals[1]).all())):
                    bad.append(("symeig", dtype, shape, poison))
    print("BAD", bad)
    """
)


def test_non_finite_members_give_nan_without_crashing_lapack():
    # A subprocess: LAPACK's geev kills the process on NaN, which must be reported, not fatal.
    result = subprocess.run([sys.executable, "-c", NAN_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"crashed with return code {result.returncode}: {result.stderr[-2000:]}"
    assert "BAD []" in result.stdout, result.stdout[-2000:]


# --- empty dims and 16-bit gradients ---------------------------------------------------------------------
@pytest.mark.parametrize("a_shape, b_shape", [((0, 3), (3, 4)), ((4, 0), (0, 5)), ((2, 6, 3), (3, 0)), ((0, 5, 2), (2, 5))])
def test_empty_dims_give_empty_or_zero_results_with_gradients(a_shape, b_shape):
    A, B = make_factors(a_shape, b_shape, torch.float64)
    A.requires_grad_(True)
    k = min(a_shape[-2], a_shape[-1], b_shape[-1])
    lead = torch.broadcast_shapes(a_shape[:-2], b_shape[:-2])
    U, S, V = kernels.svd(A, B)
    assert U.shape == (*lead, a_shape[-2], k) and S.shape == (*lead, k) and V.shape == (*lead, b_shape[-1], k)
    assert kernels.svdvals(A, B).shape == (*lead, k)
    for method in ("auto", "gram", "qr"):
        n = kernels.frobenius_norm(A, B, method)
        assert n.shape == lead and bool((n == 0).all())
        (g,) = torch.autograd.grad(n.sum() + kernels.svdvals(A, B).sum(), A)
        assert g.shape == A.shape and bool((g == 0).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_singular_value_gradients_match_dense(dtype):
    A, B = make_factors((2, 9, 3), (3, 7), dtype, seed=3)
    A[0, :, 2] = 0
    got = grads(lambda a, b: FactoredMatrix(a, b).S.pow(2).sum() + FactoredMatrix(a, b).norm().sum(), A, B)
    ref = grads(lambda a, b: torch.linalg.svdvals(a @ b).pow(2).sum() + torch.linalg.matrix_norm(a @ b).sum(), A.double(), B.double())
    for g, r in zip(got, ref):
        assert g.dtype == dtype
        scale = float(r.abs().max())
        assert bool(((g.double() - r).abs() <= 4 * torch.finfo(dtype).eps * scale).all())
