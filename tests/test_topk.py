"""Top-k singular values and eigenvalues (``svds``, ``eigs``) by every method, against dense float64.

Each method is a subclass-free parametrisation: the same checks run for "exact", "arpack",
"propack" and "auto" (with the cost model both left alone and forced onto ARPACK).
"""

from __future__ import annotations

import contextlib

import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowrank_op import FactoredMatrix, PerformanceWarning, UndefinedGradientWarning, choices, kernels, scipy_bridge, topk
from lowrank_op import settings as lr_settings
from lowrank_op.errors import KrylovFailure
from lowrank_op._checks import warn_off_host
from tests.helpers import (
    assert_orthonormal,
    assert_scaled_close,
    check_singular_projectors,
    dense,
    factor_specs,
    make_factors,
    out_dtype,
    real_dtype,
    ref_dtype,
    scale_of,
    tol,
)

#: (a_shape, b_shape, rank of A or None, ks). Krylov methods need a few dozen rows; the shapes cover
#: mdim below and above ldim and rdim, broadcast leading dims, a rank-deficient product asked for
#: exactly its rank and for more, and ``k`` from 1 to close to the limit.
SVDS_CASES = {
    "tall": ((40, 12), (12, 30), None, (1, 5, 11)),
    "mdim_gt_ldim_rdim": ((20, 35), (35, 25), None, (1, 7, 18)),
    "broadcast": ((2, 1, 30, 8), (3, 8, 25), None, (1, 4)),
    "rank_deficient_k_eq_rank": ((40, 12), (12, 30), 4, (4,)),
    "rank_deficient_k_gt_rank": ((40, 12), (12, 30), 4, (7,)),
}
SVDS_DTYPES = (torch.float64, torch.float32, torch.complex128, torch.complex64, torch.bfloat16)
KRYLOV_TOL = {torch.float64: 1e-9, torch.complex128: 1e-9, torch.float32: 5e-5, torch.complex64: 5e-5, torch.bfloat16: 5e-5}



@contextlib.contextmanager
def topk_choices():
    """The choices top-k itself records (its plan and fallbacks), without the kernels' own (the QR
    and norm choices of the exact path)."""
    with choices.recorded() as log:
        mine: list = []
        yield mine
    mine.extend(c for c in log if c.operation in ("svds", "eigs"))


def arpack_for_free():
    """A cost model under which "auto" plans ARPACK wherever ARPACK can deliver ``k``."""
    return lr_settings.topk_cost_model(
        application_seconds_per_unit=0.0, application_overhead_seconds=1e-30, auto_min_krylov_runs=0.0
    )


@pytest.fixture(params=["exact", "arpack", "propack", "auto", "auto_forced_arpack"])
def svds_method(request):
    """The method under test; "auto_forced_arpack" is "auto" with the cost model choosing ARPACK."""
    if request.param == "auto_forced_arpack":
        with arpack_for_free():
            yield "auto"
    else:
        yield request.param


def _svds_cases():
    return [
        pytest.param(a_shape, b_shape, rank, k, id=f"{name}-k{k}")
        for name, (a_shape, b_shape, rank, ks) in SVDS_CASES.items()
        for k in ks
    ]


def check_top_svd(U, S, V, A, B, k, rtol):
    """``(U, S, V)`` are ``k`` leading singular triplets of ``A @ B``: values, residuals, projectors."""
    M = dense(A, B)
    scale = scale_of(A, B)
    lead = M.shape[:-2]
    ldim, rdim = M.shape[-2:]
    assert U.shape == (*lead, ldim, k) and S.shape == (*lead, k) and V.shape == (*lead, rdim, k)
    assert U.dtype == V.dtype == out_dtype(A.dtype) and S.dtype == real_dtype(A.dtype)
    assert bool((S[..., :-1] >= S[..., 1:]).all()), "S must be descending"
    assert_scaled_close(S, torch.linalg.svdvals(M)[..., :k], scale, rtol, "S")
    Ur, Vr = U.to(M.dtype), V.to(M.dtype)
    Sr = S.to(torch.float64)[..., None, :]
    assert_scaled_close(M @ Vr, Ur * Sr, scale, rtol, "M V = U S")
    assert_scaled_close(M.mH @ Ur, Vr * Sr, scale, rtol, "M^H U = V S")
    assert_orthonormal(U, 10 * rtol, "U")
    assert_orthonormal(V, 10 * rtol, "V")
    check_singular_projectors(U, V, M, scale, 10 * rtol)


@pytest.mark.parametrize("dtype", SVDS_DTYPES, ids=str)
@pytest.mark.parametrize("a_shape, b_shape, rank, k", _svds_cases())
def test_svds_matches_dense(a_shape, b_shape, rank, k, dtype, svds_method):
    A, B = make_factors(a_shape, b_shape, dtype, rank)
    if svds_method == "propack" and rank is not None and k > rank:
        # PROPACK's vectors for the zero singular values may come back far from orthonormal; then
        # the result is refused (test_propack_beyond_rank_is_refused), otherwise checked below.
        try:
            topk.svds(A, B, k, svds_method)
        except RuntimeError as error:
            assert "exceeds the rank" in str(error)
            return
    # PROPACK stops at relative accuracy eps**0.75 of the values; its vectors then carry about
    # the square root of that in float64.
    rtol = max(KRYLOV_TOL[dtype], 1e-7) if svds_method == "propack" else KRYLOV_TOL[dtype]
    U, S, V = topk.svds(A, B, k, svds_method)
    check_top_svd(U, S, V, A, B, k, rtol)
    S_only = topk.svds(A, B, k, svds_method, return_singular_vectors=False)
    assert_scaled_close(S_only, S, scale_of(A, B), rtol, "S without vectors")


@pytest.mark.parametrize("shape", [((1, 6), (6, 40)), ((40, 6), (6, 1)), ((30, 1), (1, 20))], ids=["ldim_1", "rdim_1", "mdim_1"])
@pytest.mark.parametrize("method", ["exact", "propack", "auto"])
def test_svds_single_row_column_or_inner_dim(shape, method):
    A, B = make_factors(*shape)
    U, S, V = topk.svds(A, B, 1, method)
    check_top_svd(U, S, V, A, B, 1, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_propack_beyond_rank_is_refused_or_right(dtype):
    """Beyond the rank, PROPACK has returned vectors far from orthonormal (0.035 to 0.32, by CPU)
    without an error: the result must then be refused, and otherwise be right."""
    A, B = make_factors((40, 12), (12, 30), dtype, rank=4)
    try:
        U, S, V = topk.svds(A, B, 7, "propack")
    except KrylovFailure as error:
        assert re.search(r"PROPACK returned singular vectors \S+ from orthonormal.*exceeds the rank", str(error))
    else:
        check_top_svd(U, S, V, A, B, 7, max(KRYLOV_TOL[dtype], 1e-7))
    check_top_svd(*topk.svds(A, B, 7, "arpack"), A, B, 7, KRYLOV_TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=str)
def test_propack_vector_check_refuses_non_orthonormal_vectors(dtype):
    eps = float(np.finfo(dtype).eps)
    q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((30, 5)))
    u, vh = q.astype(dtype), q[:20].T.copy()
    vh, _ = np.linalg.qr(vh.T)
    vh = vh.T.astype(dtype)
    scipy_bridge._check_orthonormal(u, vh, eps)  # orthonormal: accepted
    bad = u.copy()
    bad[:, 1] = (bad[:, 0] + bad[:, 1]) / np.sqrt(2)  # columns 0 and 1 at 45 degrees: 0.71 off
    with pytest.raises(KrylovFailure, match=r"PROPACK returned singular vectors 0.71 from orthonormal.*exceeds the rank"):
        scipy_bridge._check_orthonormal(bad, vh, eps)


def test_svds_arpack_needs_k_below_min_dim():
    A, B = make_factors((1, 6), (6, 40))
    with pytest.raises(ValueError, match=r"`k` must be an integer satisfying `0 < k < min\(ldim, rdim\)` \(= 0 here\).*method='exact'"):
        topk.svds(A, B, 1, "arpack")


def test_fm_svds_matches_svd_truncated():
    fm = FactoredMatrix(*make_factors((50, 10), (10, 45)))
    U, S, Vh = fm.svd()
    for method in ("exact", "arpack", "propack"):
        U_k, S_k, Vh_k = fm.svds(4, method=method)
        torch.testing.assert_close(S_k, S[:4], rtol=1e-10, atol=0)
        # Same layout as svd(): columns are vectors; compare the rank-4 truncations.
        torch.testing.assert_close(U_k * S_k @ Vh_k.mT, U[:, :4] * S[:4] @ Vh[:, :4].mT, rtol=1e-9, atol=1e-9)
    assert fm.svds(3, return_singular_vectors=False).shape == (3,)


# --- eigenvalues ---------------------------------------------------------------------------------
#: (a_shape, b_shape, ks): mdim below and above n, broadcast leading dims, a rank-deficient A.
EIGS_CASES = {
    "mdim_lt_n": ((40, 12), (12, 40), None, (1, 6, 10)),
    "mdim_gt_n": ((24, 40), (40, 24), None, (1, 8, 22)),
    "broadcast": ((2, 1, 30, 9), (3, 9, 30), None, (1, 5)),
    "rank_deficient": ((40, 12), (12, 40), 6, (3,)),
}
EIGS_DTYPES = (torch.float64, torch.float32, torch.complex128, torch.complex64, torch.float16)
EIGS_TOL = {torch.float64: 1e-9, torch.complex128: 1e-9, torch.float32: 5e-4, torch.complex64: 5e-4, torch.float16: 5e-4}


def _eigs_cases():
    return [
        pytest.param(a_shape, b_shape, rank, k, id=f"{name}-k{k}")
        for name, (a_shape, b_shape, rank, ks) in EIGS_CASES.items()
        for k in ks
    ]


def check_top_eigenvalues(values, A, B, k, rtol):
    """``values`` are the ``k`` eigenvalues of largest modulus: sorted moduli match the dense ones,
    and each value lies on a dense eigenvalue (conjugate pairs may be split at the k-th place)."""
    M = dense(A, B)
    ev = torch.linalg.eigvals(M)
    lead = M.shape[:-2]
    assert values.shape == (*lead, k)
    assert values.dtype == torch.promote_types(out_dtype(A.dtype), torch.complex64)
    scale = scale_of(A, B)
    moduli = values.abs().to(torch.float64)
    assert bool((moduli[..., :-1] >= moduli[..., 1:] - rtol * scale[..., None]).all()), "not by descending modulus"
    ref_moduli = ev.abs().sort(-1, descending=True).values[..., :k]
    assert_scaled_close(moduli, ref_moduli, scale, rtol, "moduli")
    nearest = (values.to(torch.complex128)[..., :, None] - ev[..., None, :]).abs().min(-1).values
    assert_scaled_close(nearest, torch.zeros_like(nearest), scale, rtol, "distance to a dense eigenvalue")


@pytest.fixture(params=["exact", "arpack", "auto", "auto_forced_arpack"])
def eigs_method(request):
    if request.param == "auto_forced_arpack":
        with arpack_for_free():
            yield "auto"
    else:
        yield request.param


@pytest.mark.parametrize("dtype", EIGS_DTYPES, ids=str)
@pytest.mark.parametrize("a_shape, b_shape, rank, k", _eigs_cases())
def test_eigs_matches_dense(a_shape, b_shape, rank, k, dtype, eigs_method):
    A, B = make_factors(a_shape, b_shape, dtype, rank)
    n = min(A.shape[-2:])
    if eigs_method == "arpack" and k >= n - 1:
        pytest.skip("beyond ARPACK's range; the error is tested separately")
    values = topk.eigs(A, B, k, eigs_method)
    check_top_eigenvalues(values, A, B, k, EIGS_TOL[dtype])


def test_eigs_auto_near_the_limit_takes_exact():
    """k = min(ldim, mdim) - 1 is beyond Arnoldi; "auto" must then compute it exactly."""
    with arpack_for_free():
        assert topk.plan("eigs", 24, 40, 24, 21)[0] == "arpack"
        A, B = make_factors((24, 40), (40, 24))
        with topk_choices() as log:
            values = topk.eigs(A, B, 23, "auto")
    check_top_eigenvalues(values, A, B, 23, 1e-9)
    assert [(c.operation, c.method) for c in log] == [("eigs", "exact")]
    assert "beyond ARPACK's limit 22" in log[0].reason


def test_eigs_symmetric_product_is_real():
    A, _ = make_factors((40, 8), (8, 40))
    values = FactoredMatrix(A, A.mT).eigs(5, method="arpack")
    ref = torch.linalg.eigvalsh(A @ A.mT).flip(-1)[:5]
    torch.testing.assert_close(values.real, ref, rtol=1e-10, atol=0)
    assert float(values.imag.abs().max()) <= 1e-10 * float(ref[0])


def test_eigs_known_values():
    """A B = Q diag(d) Q^T with known d: Arnoldi on B A (mdim < ldim) finds them."""
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(60, 10, dtype=torch.float64, generator=gen))
    d = torch.tensor([9.0, -8.0, 7.0, 6.5, -6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    for method in ("exact", "arpack"):
        values = topk.eigs(Q * d, Q.mT, 4, method)
        torch.testing.assert_close(values, d[:4].to(torch.complex128), rtol=1e-12, atol=1e-12)


# --- "auto" ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["svd", "svdvals", "eigs"])
def test_plan_depends_on_mdim_and_k(kind):
    assert topk.plan(kind, 20000, 64, 20000, 10) == ("exact", None)
    method, budget = topk.plan(kind, 20000, 4000, 20000, 10)
    assert method == "arpack" and budget > 2 * topk._ncv(10)
    assert topk.plan(kind, 20000, 4000, 20000, 2000) == ("exact", None), "large k must take the exact path"


@pytest.mark.parametrize("kind", ["svd", "svdvals", "eigs"])
def test_plan_budget_grows_with_mdim(kind):
    budgets = [topk.plan(kind, 20000, m, 20000, 1)[1] for m in (2000, 4000, 8000, 16000)]
    assert all(b is not None for b in budgets) and budgets == sorted(budgets)


def test_plan_values_only_is_cheaper_to_do_exactly():
    assert topk.plan("svdvals", 20000, 2000, 20000, 10)[1] < topk.plan("svd", 20000, 2000, 20000, 10)[1]


def test_plan_never_asks_arpack_for_more_than_it_can_give():
    """A huge, short product: ARPACK cannot give k >= min(ldim, rdim), nor Arnoldi k >= n - 1."""
    assert topk.plan("svdvals", 10, 500, 100000, 10) == ("exact", None)
    assert topk.plan("eigs", 300, 20000, 300, 299) == ("exact", None)
    A, B = make_factors((10, 50), (50, 400))
    S = topk.svds(A, B, 10, "auto", return_singular_vectors=False)
    torch.testing.assert_close(S, torch.linalg.svdvals(A @ B), rtol=1e-10, atol=0)


def test_plan_eigs_prices_the_smaller_problem():
    """With ldim < mdim the exact path decomposes the ldim x ldim A B, which is cheap."""
    method, budget = topk.plan("eigs", 300, 20000, 300, 10)
    assert budget is None or budget < 100, "priced as a 20000 x 20000 eigenproblem"


@pytest.mark.parametrize("kind", ["svds", "SVD", None])
def test_plan_rejects_unknown_kind_and_lists_the_kinds(kind):
    with pytest.raises(ValueError, match=r"`kind` must be one of 'svd' \(singular triplets\), 'svdvals' .*'eigs'.*got .*use 'svdvals'"):
        topk.plan(kind, 10, 10, 10, 1)


def test_auto_records_its_plan_with_the_figures():
    A, B = make_factors((2, 40, 12), (12, 30))
    with topk_choices() as log:
        topk.svds(A, B, 3, "auto")
    assert len(log) == 1 and log[0].operation == "svds" and log[0].method == "exact"
    assert "the exact path, est." in log[0].reason and "applications" in log[0].reason
    with arpack_for_free(), topk_choices() as log:
        topk.svds(A, B, 3, "auto")
    assert [c.method for c in log] == ["arpack"] and "ARPACK gets" in log[0].reason
    with topk_choices() as log:
        topk.svds(A, B, 3, "exact")
        topk.eigs(A[..., :30, :], B, 3, "exact")
    assert log == [], "explicit methods choose nothing"


def test_cost_model_is_read_at_run_time():
    default = topk.plan("svdvals", 20000, 4000, 20000, 10)
    assert default[0] == "arpack"
    with lr_settings.topk_cost_model(auto_min_krylov_runs=1e9):
        assert topk.plan("svdvals", 20000, 4000, 20000, 10) == ("exact", None)
        with lr_settings.topk_cost_model(application_overhead_seconds=1.0):  # the inner block keeps 1e9 runs
            assert lr_settings.topk_cost_model.value().auto_min_krylov_runs == 1e9
    assert topk.plan("svdvals", 20000, 4000, 20000, 10) == default
    doubled = lr_settings.TopkCostModel(exact_svdvals_seconds_per_unit=2 * lr_settings.TopkCostModel().exact_svdvals_seconds_per_unit)
    with lr_settings.topk_cost_model(doubled):
        assert topk.plan("svdvals", 20000, 4000, 20000, 10)[1] in range(2 * default[1] - 2, 2 * default[1] + 3)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"application_overhead_seconds": 0.0}, ValueError, "`application_overhead_seconds` of `topk_cost_model` must be a positive finite"),
        ({"auto_min_krylov_runs": -1.0}, ValueError, "`auto_min_krylov_runs` of `topk_cost_model` must be a non-negative finite"),
        ({"exact_svd_seconds_per_unit": float("nan")}, ValueError, "`exact_svd_seconds_per_unit` .* non-negative finite"),
        ({"eig_cubic_weight": "1"}, ValueError, "`eig_cubic_weight` .* non-negative finite number; got '1'"),
        ({"application_seconds": 1.0}, TypeError, "unknown cost-model constant.*application_seconds; the constants are"),
    ],
)
def test_cost_model_setting_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        lr_settings.topk_cost_model(**kwargs)


def test_cost_model_setting_takes_a_model_or_nothing():
    with pytest.raises(TypeError, match="`model` must be a TopkCostModel; got dict"):
        lr_settings.topk_cost_model({"auto_min_krylov_runs": 1.0})


README = Path(__file__).resolve().parent.parent / "README.md"


def _switch_point(kind, ldim, k):
    """The smallest mdim at which plan() runs ARPACK (plan is monotone in mdim from there on)."""
    arpack = [m for m in range(1, 4001) if topk.plan(kind, ldim, m, ldim, k)[0] == "arpack"]
    assert arpack and arpack == list(range(arpack[0], 4001)), "switches back and forth"
    return arpack[0]


def test_readme_switch_points_are_what_plan_returns():
    text = README.read_text()
    section = text[text.index("**The `\"auto\"` rule.**"):]
    sentence = (
        r"At `ldim = rdim = (\d+)` and `k = (\d+)` that means ARPACK from `mdim = (\d+)` for singular values "
        r"\((\d+) with vectors, (\d+) for eigenvalues[;)]"
    )
    match = re.search(sentence.replace(" ", r"\s+"), section)
    assert match, "README's sentence on the switch points has changed; update this test"
    ldim, k, svdvals, svd, eig = map(int, match.groups())
    assert (_switch_point("svdvals", ldim, k), _switch_point("svd", ldim, k), _switch_point("eigs", ldim, k)) == (svdvals, svd, eig)


def test_auto_falls_back_to_exact_when_arpack_runs_over_budget():
    A, B = make_factors((40, 12), (12, 30))
    no_budget = lr_settings.topk_cost_model(application_overhead_seconds=1e9, auto_min_krylov_runs=0.0)
    with no_budget, topk_choices() as log:
        U, S, V = topk.svds(A, B, 3, "auto")
    assert [c.method for c in log] == ["arpack", "exact"]
    assert "ARPACK gets 0 applications" in log[0].reason and "ARPACK over its budget" in log[1].reason
    check_top_svd(U, S, V, A, B, 3, 1e-10)


def test_auto_falls_back_to_exact_when_arpack_does_not_converge():
    A, B = make_factors((2, 60, 30), (30, 60))
    with arpack_for_free(), topk_choices() as log:
        values = topk.eigs(A, B, 5, "auto", maxiter=1)
    assert [c.method for c in log] == ["arpack", "exact", "exact"]
    assert "matrix (1,) of the batch: ARPACK failed (ARPACK did not converge" in log[2].reason
    check_top_eigenvalues(values, A, B, 5, 1e-9)


def test_budget_stops_the_operator():
    A, B = make_factors((40, 12), (12, 30))
    op = scipy_bridge.FactoredScipyOperator(A, B, max_applications=4)
    for _ in range(4):
        op.matvec(np.ones(30))
    with pytest.raises(scipy_bridge.BudgetExceeded, match="budget 4"):
        op.H.matvec(np.ones(40))
    assert op.applications == op.H.applications == 4


def test_auto_takes_exact_path_while_recording_gradients():
    A, B = make_factors((40, 12), (12, 30))
    A.requires_grad_(True)
    with arpack_for_free(), topk_choices() as log:
        U, S, V = topk.svds(A, B, 3, "auto")
    assert [c.method for c in log] == ["exact"] and "gradients are being recorded" in log[0].reason
    S.sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad).all()


def test_explicit_krylov_method_warns_that_results_are_detached():
    A, B = make_factors((40, 12), (12, 30))
    A.requires_grad_(True)
    with pytest.warns(UndefinedGradientWarning, match="records no gradients"):
        S = topk.svds(A, B, 3, "arpack", return_singular_vectors=False)
    assert not S.requires_grad
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        topk.svds(A, B, 3, "arpack", return_singular_vectors=False)


# --- batches, determinism, progress, devices ---------------------------------------------------------
@pytest.mark.parametrize("method", ["arpack", "propack"])
def test_krylov_results_are_deterministic_and_batch_independent(method):
    A, B = make_factors((3, 40, 12), (12, 30))
    U, S, V = topk.svds(A, B, 4, method)
    U2, S2, V2 = topk.svds(A, B, 4, method)
    assert torch.equal(S, S2) and torch.equal(U, U2) and torch.equal(V, V2)
    U1, S1, V1 = topk.svds(A[1], B, 4, method)
    assert torch.equal(S[1], S1) and torch.equal(U[1], U1)
    other = topk.svds(A[1], B, 4, method, random_state=7)
    torch.testing.assert_close(other[1], S1, rtol=1e-10, atol=0)


def test_eigs_deterministic():
    A, B = make_factors((2, 40, 12), (12, 40))
    assert torch.equal(topk.eigs(A, B, 4, "arpack"), topk.eigs(A, B, 4, "arpack"))


@pytest.mark.parametrize("method", ["exact", "arpack", "auto"])
def test_empty_batch(method):
    A, B = make_factors((0, 40, 12), (12, 40))
    U, S, V = topk.svds(A, B, 3, method)
    assert U.shape == (0, 40, 3) and S.shape == (0, 3) and V.shape == (0, 40, 3)
    assert topk.eigs(A, B, 3, method).shape == (0, 3)


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    A, B = make_factors((3, 40, 12), (12, 30))
    S = topk.svds(A, B, 2, "arpack", return_singular_vectors=False, progress=True)
    assert S.shape == (3, 2)
    assert "3/3" in capsys.readouterr().err


def test_progress_without_tqdm_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    A, B = make_factors((2, 40, 12), (12, 30))
    with pytest.raises(ImportError, match=r"lowrank_op\[progress\]"):
        topk.svds(A, B, 2, progress=True)


def test_warn_off_host_names_the_device():
    with pytest.warns(PerformanceWarning, match="cuda:0 to the host"):
        warn_off_host(types.SimpleNamespace(device=torch.device("cuda", 0)), "method='arpack'")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_off_host(torch.zeros(1), "method='arpack'")


def test_krylov_on_another_device_warns_once_and_auto_stays_on_it():
    """On the meta device (a non-CPU device that needs no hardware): "auto" runs the exact path
    there without a warning; "arpack" warns once before SciPy is reached."""
    A, B = (t.to("meta") for t in make_factors((40, 12), (12, 40)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert topk.svds(A, B, 3, "auto", return_singular_vectors=False).device.type == "meta"
        assert topk.eigs(A, B, 3, "auto").device.type == "meta"
    with pytest.warns(PerformanceWarning) as record, pytest.raises(Exception):
        topk.svds(A, B, 3, "arpack")
    assert sum(issubclass(r.category, PerformanceWarning) for r in record) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_krylov_results_return_to_the_device():
    A, B = (t.float().cuda() for t in make_factors((200, 30), (30, 150)))
    with pytest.warns(PerformanceWarning):
        U, S, V = topk.svds(A, B, 5, "arpack")
    assert S.device == A.device
    torch.testing.assert_close(S, topk.svds(A, B, 5, "exact")[1], rtol=1e-4, atol=0)


# --- errors -----------------------------------------------------------------------------------------
SVDS_K_RULE = r"`k` must be an integer satisfying `0 < k <= min\(ldim, mdim, rdim\)` \(= 12 here\)"
EIGS_K_RULE = r"`k` must be an integer satisfying `0 < k <= min\(ldim, mdim\)` \(= 12 here\)"


@pytest.mark.parametrize(
    "fn, b_shape, k, method, match",
    [
        *[(topk.svds, (12, 30), k, "auto", SVDS_K_RULE) for k in (0, -1, 13, 2.5, True, "3")],
        *[(topk.eigs, (12, 40), k, "auto", EIGS_K_RULE) for k in (0, 13, 1.0)],
        (topk.svds, (12, 12), 12, "arpack", r"`0 < k < min\(ldim, rdim\)` \(= 11 here\); got 12\. ARPACK needs it; use method='exact'"),
        (topk.eigs, (12, 40), 11, "arpack", r"`0 < k < min\(ldim, mdim\) - 1` \(= 10 here\); got 11\. ARPACK needs it"),
    ],
)
def test_k_out_of_range(fn, b_shape, k, method, match):
    A, B = make_factors((40, 12), b_shape)
    with pytest.raises(ValueError, match=match):
        fn(A, B, k, method)


def test_propack_takes_k_up_to_min_dim():
    A, B = make_factors((20, 35), (35, 25))
    assert topk.svds(A, B, 20, "propack", return_singular_vectors=False).shape == (20,)


@pytest.mark.parametrize("fn, method", [(topk.svds, "lobpcg"), (topk.svds, "Auto"), (topk.eigs, "propack"), (topk.eigs, None)])
def test_unknown_method(fn, method):
    A, B = make_factors((40, 12), (12, 40))
    allowed = topk.SVDS_METHODS if fn is topk.svds else topk.EIGS_METHODS
    names = ", ".join(repr(m) for m in allowed)
    with pytest.raises(ValueError, match=f"`method` must be one of {names}; got {method!r}"):
        fn(A, B, 3, method)


def test_eigs_needs_square_product():
    A, B = make_factors((40, 12), (12, 30))
    with pytest.raises(ValueError, match=r"eigenvalues need a square product \(ldim == rdim\); got shape \(40, 30\).*svds"):
        topk.eigs(A, B, 3)


@pytest.mark.parametrize(
    "option, value, error, match",
    [
        ("tol", -1.0, ValueError, "`tol` must be a non-negative finite number"),
        ("tol", float("inf"), ValueError, "`tol` must be a non-negative finite number.*got inf"),
        ("tol", float("nan"), ValueError, "`tol` must be a non-negative finite number.*got nan"),
        ("tol", "0", TypeError, "`tol` must be a real number.*got str"),
        ("tol", None, TypeError, "`tol` must be a real number"),
        ("tol", True, TypeError, "`tol` must be a real number"),
        ("maxiter", 0, ValueError, "`maxiter` must be a positive integer or None; got 0"),
        ("maxiter", -3, ValueError, "`maxiter` must be a positive integer or None"),
        ("maxiter", 2.5, TypeError, "`maxiter` must be a positive integer or None; got float"),
        ("maxiter", "10", TypeError, "`maxiter` must be a positive integer or None; got str"),
        ("random_state", -1, ValueError, "`random_state` must be a non-negative integer seed"),
        ("random_state", 1.5, TypeError, "`random_state` must be a non-negative integer seed"),
        ("random_state", np.random.default_rng(0), TypeError, "`random_state` must be a non-negative integer seed.*got Generator"),
        ("progress", "yes", TypeError, "`progress` must be True or False"),
    ],
)
def test_option_errors(option, value, error, match):
    A, B = make_factors((40, 12), (12, 40))
    with pytest.raises(error, match=match):
        topk.svds(A, B, 3, **{option: value})
    with pytest.raises(error, match=match):
        topk.eigs(A, B, 3, **{option: value})
    with pytest.raises(error, match=match):
        FactoredMatrix(A, B).svds(3, **{option: value})


def test_option_types_that_are_accepted():
    A, B = make_factors((40, 12), (12, 30))
    S = topk.svds(A, B, 3, "arpack", return_singular_vectors=np.False_, tol=np.float32(0), maxiter=np.int64(500), random_state=np.int8(1))
    torch.testing.assert_close(S, torch.linalg.svdvals(A @ B)[:3], rtol=1e-9, atol=0)


def test_return_singular_vectors_must_be_a_bool():
    A, B = make_factors((40, 12), (12, 30))
    with pytest.raises(TypeError, match="`return_singular_vectors` must be True or False; got 'u'"):
        topk.svds(A, B, 3, return_singular_vectors="u")


def test_factors_are_validated():
    A, B = make_factors((40, 12), (12, 30))
    with pytest.raises(TypeError, match="`A` must be a torch.Tensor"):
        topk.svds(A.numpy(), B, 3)
    with pytest.raises(ValueError, match="inner dimensions differ"):
        topk.eigs(A, B[:5], 3)


def test_complex_arpack_k_limit_is_one_lower():
    """SciPy's svds runs ARPACK's non-symmetric driver for complex operators, which needs
    k < n - 1; asking for k = min(ldim, rdim) - 1 raised a raw TypeError from inside SciPy."""
    A, B = make_factors((20, 35), (35, 25), torch.complex128)
    with pytest.raises(ValueError, match=r"`0 < k < min\(ldim, rdim\) - 1` \(= 18 here\); got 19\. ARPACK needs it"):
        topk.svds(A, B, 19, "arpack")
    check_top_svd(*topk.svds(A, B, 18, "arpack"), A, B, 18, 1e-9)
    assert topk.plan("svd", 20, 35, 25, 19, is_complex=True)[0] == "exact"
    with arpack_for_free():
        check_top_svd(*topk.svds(A, B, 19, "auto"), A, B, 19, 1e-9)
    A, B = make_factors((20, 35), (35, 25), torch.float64)
    check_top_svd(*topk.svds(A, B, 19, "arpack"), A, B, 19, 1e-9)


# --- the exact path runs on the whole batch -----------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128], ids=str)
def test_batched_exact_path_matches_each_matrix(dtype):
    A, B = make_factors((2, 1, 20, 6), (3, 6, 18), dtype)
    U, S, V = topk.svds(A, B, 4, "exact")
    values = topk.eigs(A[..., :18, :], B, 4, "exact")
    eps = torch.finfo(S.dtype).eps
    for i in range(2):
        for j in range(3):
            a, b = A[i, 0], B[j]
            scale = float(torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))
            U1, S1, V1 = topk.svds(a, b, 4, "exact")
            assert float((S[i, j] - S1).abs().max()) <= 100 * eps * scale
            P, P1 = U[i, j] @ U[i, j].mH, U1 @ U1.mH
            assert float((P - P1).abs().max()) <= 1e3 * eps ** 0.5
            v1 = topk.eigs(a[:18], b, 4, "exact")
            assert float((values[i, j] - v1).abs().max()) <= 1e3 * eps ** 0.5 * scale


@pytest.mark.parametrize("solver", ["arpack", "propack"])
def test_krylov_non_convergence_is_a_runtime_error(solver):
    A, B = make_factors((200, 60), (60, 200), torch.float64)
    with pytest.raises(RuntimeError, match=f"{solver.upper()} did not converge.*raise `maxiter`.*method='exact'"):
        topk.svds(A, B, 10, solver, maxiter=1 if solver == "arpack" else 10)


def test_eigs_non_convergence_is_a_runtime_error():
    A, B = make_factors((200, 60), (60, 200))
    with pytest.raises(RuntimeError, match="ARPACK did not converge to the top 10 eigenvalues of the 60 x 60"):
        topk.eigs(A, B, 10, "arpack", maxiter=1)


def test_references_are_float64():
    """Guard for the helpers above: the references really are double precision."""
    A, B = make_factors((4, 3), (3, 4), torch.float32)
    assert dense(A, B).dtype == ref_dtype(A.dtype) == torch.float64
    assert tol(torch.float32) > tol(torch.float64)


# --- shapes from hypothesis --------------------------------------------------------------------------
@settings(max_examples=25)
@given(spec=factor_specs(max_dim=14), data=st.data())
def test_svds_hypothesis(spec, data):
    a_shape, b_shape, rank, seed = spec
    A, B = make_factors(a_shape, b_shape, torch.float64, rank, seed)
    ldim, mdim, rdim = A.shape[-2], A.shape[-1], B.shape[-1]
    k = data.draw(st.integers(1, min(ldim, mdim, rdim)), label="k")
    methods = ["exact", "auto"] + (["arpack"] if k < min(ldim, rdim) else [])
    for method in methods:
        check_top_svd(*topk.svds(A, B, k, method), A, B, k, 1e-9)


@settings(max_examples=25)
@given(spec=factor_specs(square=True, max_dim=14), data=st.data())
def test_eigs_hypothesis(spec, data):
    a_shape, b_shape, rank, seed = spec
    A, B = make_factors(a_shape, b_shape, torch.float64, rank, seed)
    n = min(A.shape[-2:])
    k = data.draw(st.integers(1, n), label="k")
    methods = ["exact", "auto"] + (["arpack"] if k < n - 1 and rank is None else [])
    for method in methods:
        check_top_eigenvalues(topk.eigs(A, B, k, method), A, B, k, 1e-8)


@pytest.mark.parametrize("module", ["lowrank_op.topk", "lowrank_op.factored"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch}, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


# --- ARPACK's eigenpairs are checked by their residuals ---------------------------------------------
def _dense_eigenpairs(A, B, k):
    M = (A.to(torch.complex128) @ B.to(torch.complex128))
    w, X = torch.linalg.eig(M)
    order = w.abs().argsort(descending=True)[:k]
    return w[order], X[:, order]


def test_residual_check_accepts_true_eigenpairs_and_refuses_a_perturbed_one():
    A, B = make_factors((30, 8), (8, 30))
    w, X = _dense_eigenpairs(A, B, 4)
    eps = torch.finfo(torch.float64).eps
    residuals, scale = scipy_bridge.eig_residuals(A, B, w, X)
    assert float(residuals.max()) <= 1e3 * eps * float(scale)
    assert float(scale) >= float(w.abs().max()) * (1 - 1e-12)
    scipy_bridge.check_eigenpairs(A, B, w, X, 0.0, eps)
    w_bad = w.clone()
    w_bad[2] *= 1 + 1e-4  # a value 1e-4 off: its residual is about 1e-4 |lambda_2|
    with pytest.raises(KrylovFailure, match=r"ARPACK reported convergence, but its eigenpair 2 has residual .* above the .* accepted.*method='exact'"):
        scipy_bridge.check_eigenpairs(A, B, w_bad, X, 0.0, eps)
    X_bad = X.clone()
    X_bad[:, 0] += 1e-3 * X[:, 1]
    with pytest.raises(KrylovFailure, match="eigenpair 0 has residual"):
        scipy_bridge.check_eigenpairs(A, B, w, X_bad, 0.0, eps)
    # A looser tol accepts what it should: the 1e-4 error is within tol = 1e-3.
    scipy_bridge.check_eigenpairs(A, B, w_bad, X, 1e-3, eps)
    with pytest.raises(KrylovFailure, match="eigenpair 1 has residual"):
        nan = X.clone()
        nan[0, 1] = float("nan")
        scipy_bridge.check_eigenpairs(A, B, w, nan, 0.0, eps)


def test_failed_residual_check_raises_for_arpack_and_falls_back_under_auto():
    """With the accepted residual made impossibly small, ARPACK's pairs (which are fine) fail:
    an explicit "arpack" raises, "auto" records the failure and returns the exact values."""
    A, B = make_factors((40, 12), (12, 40))
    check_top_eigenvalues(topk.eigs(A, B, 4, "arpack"), A, B, 4, 1e-9)  # passes the default check
    with lr_settings.krylov_residual_factor(1e-30):
        with pytest.raises(KrylovFailure, match="ARPACK reported convergence, but its eigenpair"):
            topk.eigs(A, B, 4, "arpack")
        with arpack_for_free(), topk_choices() as log:
            values = topk.eigs(A, B, 4, "auto")
    assert [c.method for c in log] == ["arpack", "exact"] and "ARPACK reported convergence" in log[1].reason
    check_top_eigenvalues(values, A, B, 4, 1e-9)


def test_nan_factors_give_nan_or_a_clear_error():
    A, B = make_factors((40, 12), (12, 40))
    A[3, 2] = float("nan")
    # The exact paths go through the kernels' NaN guard: NaN results, no LAPACK call on NaN.
    for result in (
        topk.svds(A, B, 3, "exact", return_singular_vectors=False),
        topk.svds(A, B, 3, "auto")[1],
        topk.eigs(A, B, 3, "exact"),
    ):
        assert torch.isnan(result).all()
    # ARPACK sees the NaN through the operator: a NaN result or a clear error, never a crash.
    for call in (lambda: topk.svds(A, B, 3, "arpack")[1], lambda: topk.eigs(A, B, 3, "arpack")):
        try:
            result = call()
        except RuntimeError as error:  # torch's LinAlgError or KrylovFailure, both RuntimeErrors
            assert re.search("non-finite|NaN|nan|ARPACK", str(error)), str(error)
        else:
            assert torch.isnan(result).any()
