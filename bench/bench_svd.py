"""``FactoredMatrix.svd()``, each orthogonalisation method, beside dense, TransformerLens, floors.

The singular values are checked against the float64 factored reference (asserted for lowrank_op,
recorded for the baselines that return singular values).
"""

import pytest

from bench import baselines
from bench.common import (
    MDIM, S_MAX_REL_ERROR, SHAPES, baseline_params, factors, fresh, max_rel_error, measure,
    measure_baseline,
)

BASELINES = {
    "dense": ("dense svd(A @ B)", baselines.dense_svd),
    "tl": ("TransformerLens: SVDs of A, B, middle", baselines.tl_svd),
    "tl_tall": ("same, SVD of B^T not B (not in TL)", baselines.tl_svd_tall),
    "two_qrs": ("two QRs alone: A, B^T", baselines.two_qrs),
    "two_grams": ("two Grams alone: A^T A, B B^T", baselines.two_grams),
}


@pytest.mark.parametrize("method", ["auto", "householder", "cholqr2"])
@pytest.mark.parametrize("shape", SHAPES)
def test_svd(benchmark, shape, method):
    A, B = factors(shape)
    case = "svd()" if method == "auto" else f"svd(method={method!r})"
    _, S, _ = measure(benchmark, lambda fm: fm.svd(method=method), setup=fresh(A, B),
                      group=f"svd[{shape}]", case=case)
    err = benchmark.extra_info["S_max_rel_err"] = max_rel_error(S, shape)
    assert err <= S_MAX_REL_ERROR


@pytest.mark.parametrize("shape, name", baseline_params(list(BASELINES)))
def test_svd_baseline(benchmark, shape, name):
    A, B = factors(shape)
    result = measure_baseline(benchmark, name, *BASELINES[name], A, B, group=f"svd[{shape}]")
    if name in ("dense", "tl", "tl_tall"):
        benchmark.extra_info["S_max_rel_err"] = max_rel_error(result[1][:MDIM], shape)
