"""``FactoredMatrix.norm()`` (Frobenius) beside dense, TransformerLens's norm-from-SVD and floors.

The norm is checked against the float64 reference ``sqrt(sum(S^2))`` of the float64 factored
singular values. Dense float32 ``matrix_norm`` is not a trustworthy reference at large sizes, so
its error is only recorded.
"""

import pytest

from bench import baselines
from bench.common import (
    NORM_MAX_REL_ERROR, SHAPES, baseline_params, factors, fresh, measure, measure_baseline,
    norm_rel_error,
)

BASELINES = {
    "dense": ("dense matrix_norm(A @ B)", baselines.dense_norm),
    "tl": ("TransformerLens: norm from its SVD", baselines.tl_norm),
    "two_qrs": ("two QRs alone: A, B^T", baselines.two_qrs),
    "two_grams": ("two Grams alone: A^T A, B B^T", baselines.two_grams),
}


@pytest.mark.parametrize("method", ["auto", "qr"])
@pytest.mark.parametrize("shape", SHAPES)
def test_norm(benchmark, shape, method):
    A, B = factors(shape)
    case = "norm()" if method == "auto" else f"norm(method={method!r})"
    norm = measure(benchmark, lambda fm: fm.norm(method=method), setup=fresh(A, B),
                   group=f"norm[{shape}]", case=case)
    err = benchmark.extra_info["norm_rel_err"] = norm_rel_error(norm, shape)
    assert err <= NORM_MAX_REL_ERROR


@pytest.mark.parametrize("shape, name", baseline_params(list(BASELINES)))
def test_norm_baseline(benchmark, shape, name):
    A, B = factors(shape)
    result = measure_baseline(benchmark, name, *BASELINES[name], A, B, group=f"norm[{shape}]")
    if name in ("dense", "tl"):
        benchmark.extra_info["norm_rel_err"] = norm_rel_error(result, shape)
