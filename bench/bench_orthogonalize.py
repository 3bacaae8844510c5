"""``kernels.orthogonalize`` of one factor ``A (n, 64)``: Householder vs CholeskyQR2 vs auto, with
and without forming Q. Where the time of ``svd()`` and ``S`` goes."""

import pytest

from bench.common import SHAPES, factors, measure
from lowrank_op import kernels


@pytest.mark.parametrize("want_q", [True, False], ids=["Q_and_R", "R_only"])
@pytest.mark.parametrize("method", ["householder", "cholqr2", "auto"])
@pytest.mark.parametrize("shape", SHAPES)
def test_orthogonalize(benchmark, shape, method, want_q):
    A, _ = factors(shape)
    measure(benchmark, lambda: kernels.orthogonalize(A, method, want_q),
            group=f"orthogonalize[{shape}]",
            case=f"orthogonalize(A, {method!r}, want_q={want_q})")
