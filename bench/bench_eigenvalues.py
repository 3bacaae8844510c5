"""``FactoredMatrix.eigenvalues`` beside dense ``eigvals(A @ B)`` (n = 4096 only), TransformerLens's
``eig(B @ A)`` and the floors."""

import pytest

from bench import baselines
from bench.common import SHAPES, baseline_params, factors, fresh, measure, measure_baseline

BASELINES = {
    "dense": ("dense eigvals(A @ B)", baselines.dense_eigvals),
    "tl": ("TransformerLens: eig(B @ A)", baselines.tl_eigenvalues),
    "two_qrs": ("two QRs alone: A, B^T", baselines.two_qrs),
    "two_grams": ("two Grams alone: A^T A, B B^T", baselines.two_grams),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_eigenvalues(benchmark, shape):
    A, B = factors(shape)
    measure(benchmark, lambda fm: fm.eigenvalues, setup=fresh(A, B), group=f"eigenvalues[{shape}]",
            case="eigenvalues")


@pytest.mark.parametrize("shape, name", baseline_params(list(BASELINES)))
def test_eigenvalues_baseline(benchmark, shape, name):
    A, B = factors(shape)
    measure_baseline(benchmark, name, *BASELINES[name], A, B, group=f"eigenvalues[{shape}]")
