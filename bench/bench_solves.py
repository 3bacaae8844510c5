"""Woodbury solve and log-determinant of ``A @ B + D`` beside dense torch and linear_operator's generic path.

Shapes: ``n`` = 4096 and 20000, ``mdim`` = 64, float64, one right-hand side (a GP's ``K^{-1} y``),
2 threads. Two operators per ``n``:

- ``sym``: ``A @ A^T + D`` (``FactoredMatrix(A, A.mT)``, the Cholesky path), a low-rank-plus-noise
  GP covariance, symmetric positive definite, so linear_operator's generic path is valid on it;
- ``nonsym``: ``A @ B + D`` with ``B = A^T + E``, ``E`` a small random perturbation (the LU path;
  ``det > 0``), where the generic path's symmetric assumption does not hold.

Cases in each group (``solve[sym_n4096]``, ``logdet[nonsym_n20000]``, ...):

- ``woodbury``: ``(FactoredMatrix(A, B) + DiagLinearOperator(d)).solve(y)`` / ``.logdet()``,
  a fresh operator every round (factorisation included);
- ``dense`` (baseline, n = 4096 only): ``torch.linalg.solve`` / ``slogdet`` of the formed matrix;
- ``linear_operator generic``: ``AddedDiagLinearOperator(fm, DiagLinearOperator(d))`` with its
  default ``solve`` / ``logdet``. At these sizes (above ``max_cholesky_size`` = 800) its defaults
  are preconditioned CG for solves and CG + stochastic Lanczos quadrature for log-determinants;
  the cases pin that with ``max_cholesky_size(0)``. On ``nonsym`` it is timed at n = 4096 only (it
  runs into CG's 1000-iteration cap and returns garbage; at n = 20000 a call takes minutes).

The summary's ratio column is "vs dense" (there is no linear_operator column in bench/conftest.py);
each case's ``rel_err`` (solve: ``|M x - y| / |y|``; logdet: relative to the exact value) is in
``extra_info``. Run from the repository root::

    python -m pytest bench/bench_solves.py --benchmark-only
"""

from __future__ import annotations

import functools
import math
import warnings

import linear_operator
import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator

from bench.common import measure
from lowrank_op import FactoredMatrix

torch.set_num_threads(2)

MDIM = 64
#: GP training-set sizes: one where the dense matrix is formed as a baseline, one where it is not.
SIZES = {"n4096": 4096, "n20000": 20000}
DENSE_SIZES = ("n4096",)
KINDS = ("sym", "nonsym")
#: Woodbury accuracy asserted in the bench (float64, operators with cond(M) below about 1e3).
MAX_REL_ERR = 1e-10


@functools.cache
def operands(size: str, kind: str):
    """``A`` (n, 64), ``B`` (64, n), ``d`` in [0.5, 1.5], ``y`` (n, 1).

    ``B`` is the view ``A.mT`` for ``sym`` and ``A^T + E`` (``E`` entries of size 0.1 ``|A|``) for
    ``nonsym``."""
    n = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(n, MDIM, dtype=torch.float64, generator=gen) / math.sqrt(MDIM)
    E = 0.1 * torch.randn(MDIM, n, dtype=torch.float64, generator=gen) / math.sqrt(MDIM)
    B = A.mT if kind == "sym" else A.mT + E
    d = 0.5 + torch.rand(n, dtype=torch.float64, generator=gen)
    y = torch.randn(n, 1, dtype=torch.float64, generator=gen)
    return A, B, d, y


@functools.cache
def exact_logdet(size: str, kind: str) -> float:
    A, B, d, _ = operands(size, kind)
    return float((FactoredMatrix(A, B) + DiagLinearOperator(d)).logdet())


def residual(size: str, kind: str, x: torch.Tensor) -> float:
    A, B, d, y = operands(size, kind)
    return float((A @ (B @ x) + d[:, None] * x - y).norm() / y.norm())


def woodbury_setup(size, kind):
    A, B, d, _ = operands(size, kind)
    return lambda: ((FactoredMatrix(A, B) + DiagLinearOperator(d),), {})


def generic_setup(size, kind):
    A, B, d, _ = operands(size, kind)
    return lambda: ((AddedDiagLinearOperator(FactoredMatrix(A, B), DiagLinearOperator(d)),), {})


def generic_params():
    return [
        pytest.param(size, kind, id=f"{kind}_{size}")
        for size in SIZES
        for kind in KINDS
        if kind == "sym" or size in DENSE_SIZES
    ]


all_params = pytest.mark.parametrize(
    "size, kind", [pytest.param(s, k, id=f"{k}_{s}") for s in SIZES for k in KINDS]
)
dense_params = pytest.mark.parametrize(
    "size, kind", [pytest.param(s, k, id=f"{k}_{s}") for s in DENSE_SIZES for k in KINDS]
)


# --- solve ----------------------------------------------------------------------------------------
@all_params
def test_solve_woodbury(benchmark, size, kind):
    y = operands(size, kind)[3]
    x = measure(benchmark, lambda op: op.solve(y), setup=woodbury_setup(size, kind),
                group=f"solve[{kind}_{size}]", case="woodbury (FactoredAddedDiag.solve)")
    err = benchmark.extra_info["rel_err"] = residual(size, kind, x)
    assert err <= MAX_REL_ERR


@dense_params
def test_solve_dense(benchmark, size, kind):
    A, B, d, y = operands(size, kind)
    x = measure(benchmark, lambda: torch.linalg.solve(A @ B + torch.diag(d), y), group=f"solve[{kind}_{size}]",
                case="dense torch.linalg.solve(A @ B + D)", baseline="dense", slow=True)
    benchmark.extra_info["rel_err"] = residual(size, kind, x)


@pytest.mark.parametrize("size, kind", generic_params())
def test_solve_linear_operator_generic(benchmark, size, kind):
    y = operands(size, kind)[3]

    def solve(op):
        with linear_operator.settings.max_cholesky_size(0), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # CG's non-convergence warnings on nonsym
            return op.solve(y)

    x = measure(benchmark, solve, setup=generic_setup(size, kind), group=f"solve[{kind}_{size}]",
                case="linear_operator AddedDiag: CG (default)", baseline="linop", slow=kind == "nonsym")
    benchmark.extra_info["rel_err"] = residual(size, kind, x)


# --- logdet ---------------------------------------------------------------------------------------
@all_params
def test_logdet_woodbury(benchmark, size, kind):
    value = measure(benchmark, lambda op: op.logdet(), setup=woodbury_setup(size, kind),
                    group=f"logdet[{kind}_{size}]", case="woodbury (FactoredAddedDiag.logdet)")
    if size in DENSE_SIZES:
        A, B, d, _ = operands(size, kind)
        sign, ref = torch.linalg.slogdet(A @ B + torch.diag(d))
        assert float(sign) == 1.0, "the bench operators have positive determinants"
        err = benchmark.extra_info["rel_err"] = abs(float(value) - float(ref)) / abs(float(ref))
        assert err <= MAX_REL_ERR


@dense_params
def test_logdet_dense(benchmark, size, kind):
    A, B, d, _ = operands(size, kind)
    _, value = measure(benchmark, lambda: torch.linalg.slogdet(A @ B + torch.diag(d)), group=f"logdet[{kind}_{size}]",
                       case="dense torch.linalg.slogdet(A @ B + D)", baseline="dense", slow=True)
    benchmark.extra_info["rel_err"] = abs(float(value) - exact_logdet(size, kind)) / abs(exact_logdet(size, kind))


@pytest.mark.parametrize("size, kind", generic_params())
def test_logdet_linear_operator_generic(benchmark, size, kind):
    def logdet(op):
        with linear_operator.settings.max_cholesky_size(0), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return op.logdet()

    value = measure(benchmark, logdet, setup=generic_setup(size, kind), group=f"logdet[{kind}_{size}]",
                    case="linear_operator AddedDiag: CG + SLQ (default)", baseline="linop",
                    slow=kind == "nonsym")
    benchmark.extra_info["rel_err"] = abs(float(value) - exact_logdet(size, kind)) / abs(exact_logdet(size, kind))
