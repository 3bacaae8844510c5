"""``FactoredMatrix.S`` (singular values only) beside dense, TransformerLens and floors.

TransformerLens has no values-only path: its ``S`` is its full SVD's. The R-only QRs are the floor
of lowrank_op's values-only path, which never forms Q.
"""

import pytest

from bench import baselines
from bench.common import (
    MDIM, S_MAX_REL_ERROR, SHAPES, baseline_params, factors, fresh, max_rel_error, measure,
    measure_baseline,
)

BASELINES = {
    "dense": ("dense svdvals(A @ B)", baselines.dense_svdvals),
    "tl": ("TransformerLens: S of its 3-SVD method", baselines.tl_svdvals),
    "two_qrs": ("two QRs alone: A, B^T", baselines.two_qrs),
    "two_qrs_r_only": ("two QRs alone, R only", baselines.two_qrs_r_only),
    "two_grams": ("two Grams alone: A^T A, B B^T", baselines.two_grams),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_S(benchmark, shape):
    A, B = factors(shape)
    S = measure(benchmark, lambda fm: fm.S, setup=fresh(A, B), group=f"S[{shape}]", case="S")
    err = benchmark.extra_info["S_max_rel_err"] = max_rel_error(S, shape)
    assert err <= S_MAX_REL_ERROR


@pytest.mark.parametrize("shape, name", baseline_params(list(BASELINES)))
def test_S_baseline(benchmark, shape, name):
    A, B = factors(shape)
    result = measure_baseline(benchmark, name, *BASELINES[name], A, B, group=f"S[{shape}]")
    if name in ("dense", "tl"):
        benchmark.extra_info["S_max_rel_err"] = max_rel_error(result[:MDIM], shape)
