"""The SciPy view (``fm.to_scipy()``): products against dense float64, and SciPy's iterative solvers
(lsqr, lsmr, gmres) on it against dense least-squares and direct solutions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from lowrank_op import FactoredMatrix, PerformanceWarning
from lowrank_op.scipy_bridge import FactoredScipyOperator
from tests.helpers import dense, make_factors

NUMPY = {torch.float32: np.float32, torch.float64: np.float64, torch.complex64: np.complex64,
         torch.complex128: np.complex128, torch.bfloat16: np.float32, torch.float16: np.float32}
#: Relative tolerance of a product in the operator's dtype (16-bit factors run in float32).
PRODUCT_TOL = {np.float32: 1e-5, np.float64: 1e-12, np.complex64: 1e-5, np.complex128: 1e-12}

SHAPES = {
    "tall": ((30, 6), (6, 25)),
    "mdim_gt_ldim_rdim": ((7, 12), (12, 9)),
    "ldim_1": ((1, 5), (5, 8)),
    "rdim_1": ((8, 5), (5, 1)),
}


def _rng_array(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if np.issubdtype(dtype, np.complexfloating):
        x = x + 1j * rng.standard_normal(shape)
    return x.astype(dtype)


def _close(actual, expected, rtol):
    expected = np.asarray(expected)
    assert np.abs(actual - expected).max() <= rtol * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("dtype", list(NUMPY), ids=str)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_products_match_dense(shape, dtype):
    A, B = make_factors(*shape, dtype)
    op = FactoredMatrix(A, B).to_scipy()
    M = dense(A, B).numpy()
    ldim, rdim = M.shape
    npdtype = NUMPY[dtype]
    assert op.shape == (ldim, rdim) and op.dtype == np.dtype(npdtype)
    rtol = PRODUCT_TOL[npdtype]
    x, y = _rng_array(rdim, npdtype), _rng_array(ldim, npdtype, 1)
    X, Y = _rng_array((rdim, 3), npdtype, 2), _rng_array((ldim, 3), npdtype, 3)
    for got, want in [
        (op.matvec(x), M @ x),
        (op @ x, M @ x),
        (op.rmatvec(y), M.conj().T @ y),
        (op.matmat(X), M @ X),
        (op.rmatmat(Y), M.conj().T @ Y),
        (op.H.matvec(y), M.conj().T @ y),
        (op.T.matvec(y), M.T @ y),
    ]:
        assert got.dtype == np.dtype(npdtype)
        _close(got, want, rtol)
    assert op.matvec(x.reshape(-1, 1)).shape == (ldim, 1)


def test_other_vector_dtypes():
    """A float64 vector on a float32 operator comes back float64; a complex vector on a real
    operator is applied as its real and imaginary parts, not truncated."""
    A, B = make_factors((30, 6), (6, 25), torch.float32)
    op = FactoredMatrix(A, B).to_scipy()
    M = dense(A, B).numpy()
    x = _rng_array(25, np.float64)
    assert op.matvec(x).dtype == np.float64
    _close(op.matvec(x), M @ x, 1e-5)
    z = _rng_array(25, np.complex128)
    assert op.matvec(z).dtype == np.complex128
    _close(op.matvec(z), M @ z, 1e-5)
    _close(op.rmatvec(_rng_array(30, np.complex64)), M.T @ _rng_array(30, np.complex64), 1e-5)


def test_counts_applications():
    A, B = make_factors((30, 6), (6, 25))
    op = FactoredScipyOperator(A, B)
    op.matvec(np.ones(25))
    op.rmatmat(np.ones((30, 4)))
    op.H.matmat(np.ones((30, 2)))
    assert op.applications == 7


def test_view_is_detached_and_shares_the_factors():
    A, B = make_factors((30, 6), (6, 25))
    A.requires_grad_(True)
    op = FactoredMatrix(A, B).to_scipy()
    assert not op.A.requires_grad and op.A.data_ptr() == A.data_ptr()


def test_batched_fm_is_refused_with_advice():
    fm = FactoredMatrix(*make_factors((2, 30, 6), (6, 25)))
    with pytest.raises(ValueError, match=r"to_scipy\(\) needs a 2-D FactoredMatrix; this one has shape \(2, 30, 25\)\. Index one matrix first"):
        fm.to_scipy()
    assert fm[1].to_scipy().shape == (30, 25)


def test_non_cpu_factors_warn():
    fm = FactoredMatrix(*(t.to("meta") for t in make_factors((30, 6), (6, 25))))
    with pytest.warns(PerformanceWarning, match="meta to the host"):
        fm.to_scipy()


# --- SciPy's iterative solvers on the view -------------------------------------------------------------
LSQ_CASES = {
    # (a_shape, b_shape, rank of A): overdetermined full column rank (unique solution), a
    # rank-deficient product (the minimum-norm solution), underdetermined (minimum norm).
    "overdetermined": ((60, 12), (12, 10), None),
    "rank_deficient": ((60, 12), (12, 40), 5),
    "underdetermined": ((15, 12), (12, 40), None),
}


# SciPy's float32 lsmr overflows in its own condition estimate (a warning, not an error of ours).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("solver", ["lsqr", "lsmr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32], ids=str)
@pytest.mark.parametrize("a_shape, b_shape, rank", list(LSQ_CASES.values()), ids=list(LSQ_CASES))
def test_least_squares_solvers_match_dense(a_shape, b_shape, rank, dtype, solver):
    A, B = make_factors(a_shape, b_shape, dtype, rank)
    op = FactoredMatrix(A, B).to_scipy()
    M = dense(A, B)
    rhs = _rng_array(M.shape[0], NUMPY[dtype])
    # float32 rounding lifts the product's zero singular values to about 1e-7 of the largest; the
    # reference pseudo-inverse drops those, as a float32 solver stopped at 1e-7 cannot see them.
    pinv_rtol = 1e-5 if dtype == torch.float32 else None
    x_ref = (torch.linalg.pinv(M, rtol=pinv_rtol) @ torch.from_numpy(rhs).to(M.dtype)).numpy()
    limit = {"iter_lim" if solver == "lsqr" else "maxiter": 2000}
    fn = getattr(sla, solver)
    if dtype == torch.float32:
        x = fn(op, rhs, atol=1e-7, btol=1e-7, **limit)[0]
        rtol = 2e-3
    else:
        x = fn(op, rhs, atol=1e-14, btol=1e-14, **limit)[0]
        rtol = 1e-8
    assert np.linalg.norm(x - x_ref) <= rtol * np.linalg.norm(x_ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_gmres_matches_dense_solve(dtype):
    """A square product with mdim >= ldim is non-singular (almost surely)."""
    A, B = make_factors((20, 30), (30, 20), dtype)
    op = FactoredMatrix(A, B).to_scipy()
    M = dense(A, B)
    rhs = _rng_array(20, NUMPY[dtype])
    x, info = sla.gmres(op, rhs, rtol=1e-13, restart=20, maxiter=50)
    assert info == 0
    x_ref = torch.linalg.solve(M, torch.from_numpy(rhs).to(M.dtype)).numpy()
    assert np.linalg.norm(x - x_ref) <= 1e-8 * np.linalg.norm(x_ref)


def test_scipy_svds_on_the_view_matches_fm_svds():
    """The view is a complete LinearOperator: SciPy's own svds runs on it."""
    fm = FactoredMatrix(*make_factors((60, 12), (12, 40)))
    s = sla.svds(fm.to_scipy(), k=4, return_singular_vectors=False, rng=np.random.default_rng(0))
    np.testing.assert_allclose(np.sort(s)[::-1], fm.S[:4].numpy(), rtol=1e-10)


# --- a 2-D FactoredMatrix is itself a SciPy LinearOperator ----------------------------------------------
def test_fm_is_a_scipy_linear_operator_that_keeps_torch_dtype():
    A, B = make_factors((30, 6), (6, 25), torch.bfloat16)
    fm = FactoredMatrix(A, B)
    assert isinstance(fm, sla.LinearOperator) and sla.aslinearoperator(fm) is fm
    assert fm.dtype == torch.bfloat16 and fm.shape == torch.Size((30, 25))
    assert np.result_type(fm, np.float32) == np.float32  # __numpy_dtype__: the compute dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32], ids=str)
def test_protocol_products_match_the_view(dtype):
    A, B = make_factors((30, 6), (6, 25), dtype)
    fm = FactoredMatrix(A, B)
    view = fm.to_scipy()
    npdtype = NUMPY[dtype]
    x, y = _rng_array(25, npdtype), _rng_array(30, npdtype, 1)
    X, Y = _rng_array((25, 3), npdtype, 2), _rng_array((30, 3), npdtype, 3)
    for got, want in [
        (fm.matvec(x), view.matvec(x)),
        (fm.rmatvec(y), view.rmatvec(y)),
        (fm.matmat(X), view.matmat(X)),
        (fm.rmatmat(Y), view.rmatmat(Y)),
        (fm.dot(X), view.dot(X)),
        (fm(x), view.matvec(x)),
        (fm.H.matvec(y), view.rmatvec(y)),
        (fm.adjoint().matmat(Y), view.rmatmat(Y)),
        (fm.T.matvec(y), view.T.matvec(y)),
    ]:
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    assert isinstance(fm.H, FactoredMatrix) and fm.H.shape == (25, 30)
    torch.testing.assert_close(fm.H.to_dense(), dense(A, B).mH.to(dtype), rtol=1e-5, atol=1e-5)
    t = torch.from_numpy(x)
    torch.testing.assert_close(fm(t), fm.matmul(t))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("solver", ["lsqr", "lsmr"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128, torch.float32], ids=str)
def test_least_squares_solvers_take_fm_itself(solver, dtype):
    A, B = make_factors((60, 12), (12, 40), dtype, 5)
    fm = FactoredMatrix(A, B)
    rhs = _rng_array(60, NUMPY[dtype])
    fn = getattr(sla, solver)
    on_fm, on_view = fn(fm, rhs), fn(fm.to_scipy(), rhs)
    np.testing.assert_array_equal(on_fm[0], on_view[0])
    assert on_fm[1:3] == on_view[1:3]  # stopping reason and iterations


def test_entry_points_that_read_a_numpy_dtype_need_the_view():
    """README: gmres, cg, svds, eigs read ``A.dtype`` as a NumPy dtype, so they need
    ``fm.to_scipy()``; if SciPy stops reading it, this test says README can be updated."""
    fm = FactoredMatrix(*make_factors((20, 30), (30, 20)))
    rhs = _rng_array(20, np.float64)
    for call in (lambda op: sla.gmres(op, rhs), lambda op: sla.cg(op, rhs), lambda op: sla.svds(op, 2),
                 lambda op: sla.eigs(op, 2)):
        with pytest.raises((TypeError, AttributeError), match="torch.float64|char"):
            call(fm)
        call(fm.to_scipy())


def test_protocol_refuses_batches_and_powers():
    fm = FactoredMatrix(*make_factors((2, 30, 6), (6, 25)))
    with pytest.raises(ValueError, match=r"SciPy's operator protocol .* needs a 2-D FactoredMatrix; this one has shape \(2, 30, 25\)"):
        fm.matvec(np.ones(25))
    with pytest.raises(TypeError, match=r"unsupported operand type\(s\) for \*\*"):
        fm[0] ** 2
