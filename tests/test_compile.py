"""The explicit methods of lowrank_op.kernels capture whole under torch.compile(fullgraph=True).

``backend="eager"`` keeps the test fast: graph capture (Dynamo) is what a data-dependent branch
breaks, and it runs in full; only code generation is skipped.
"""

from __future__ import annotations

import pytest
import torch
from helpers import make_factors

from lowrank_op import kernels


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="eager")


CASES = {
    "svd_householder": lambda A, B: kernels.svd(A, B, "householder"),
    "svd_flagged_cholqr2": lambda A, B: kernels.svd_flagged(A, B, "cholqr2"),
    "svdvals_householder": lambda A, B: kernels.svdvals(A, B, "householder"),
    "svdvals_flagged_cholqr2": lambda A, B: kernels.svdvals_flagged(A, B, "cholqr2"),
    "norm_gram": lambda A, B: kernels.frobenius_norm(A, B, "gram"),
    "norm_qr": lambda A, B: kernels.frobenius_norm(A, B, "qr"),
    "eigvals": lambda A, B: kernels.eigvals(A, B),
}


@pytest.mark.parametrize(
    "name, dtype",
    [(name, torch.float32) for name in CASES]
    + [("svd_householder", torch.complex128), ("svdvals_flagged_cholqr2", torch.complex128)],
)
def test_explicit_kernels_compile_fullgraph_and_match_eager(name, dtype):
    # Tall factors (CholeskyQR2 runs on both), a batch, and a NaN member for the guards.
    A, B = make_factors((2, 24, 3), (3, 24), dtype)
    A[1, 0, 0] = float("nan")
    fn = CASES[name]
    eager = fn(A, B)
    graph = compiled(fn)(A, B)
    eager, graph = (eager, graph) if isinstance(eager, tuple) else ((eager,), (graph,))
    for e, g in zip(eager, graph):
        if e is None:
            assert g is None
            continue
        torch.testing.assert_close(g, e, equal_nan=True)
    assert bool(torch.isnan(graph[0][1]).all()) and bool(torch.isfinite(graph[0][0]).all())


def test_flagged_kernel_reports_cholqr2_failure_as_a_tensor_inside_a_graph():
    gen = torch.Generator().manual_seed(1)
    good = torch.randn(40, 5, dtype=torch.float64, generator=gen)
    low_rank = torch.randn(40, 2, dtype=torch.float64, generator=gen) @ torch.randn(2, 5, dtype=torch.float64, generator=gen)
    A = torch.stack([good, low_rank])
    B = torch.randn(5, 30, dtype=torch.float64, generator=gen)
    S, ok = compiled(lambda a, b: kernels.svdvals_flagged(a, b, "cholqr2"))(A, B)
    assert ok.tolist() == [True, False]
    assert bool(torch.isfinite(S[0]).all()) and bool(torch.isnan(S[1]).all())
    torch.testing.assert_close(S[0], torch.linalg.svdvals(good @ B)[:5])


def test_flagged_kernels_take_explicit_methods_only():
    A, B = make_factors((8, 2), (2, 8), torch.float64)
    with pytest.raises(ValueError, match=r"`method` must be one of 'householder', 'cholqr2'; got 'auto'"):
        kernels.svd_flagged(A, B, "auto")
    with pytest.raises(ValueError, match=r"`method` must be one of 'householder', 'cholqr2'; got 'auto'"):
        kernels.svdvals_flagged(A, B, "auto")


def test_flagged_kernels_broadcast_flags_over_unequal_batch_ranks():
    # A's flags have A's batch shape (3,); the results have the broadcast shape (2, 3).
    A, B = make_factors((3, 24, 2), (2, 3, 2, 2), torch.float64)  # B is not tall: only A is factorised
    A[1, 0, 0] = float("nan")
    S, ok = kernels.svdvals_flagged(A, B, "cholqr2")
    U, S2, V, ok2 = kernels.svd_flagged(A, B, "cholqr2")
    assert S.shape == S2.shape == (2, 3, 2) and ok.shape == ok2.shape == (3,) and bool(ok.all())
    assert torch.isnan(S).all(-1).tolist() == [[False, True, False]] * 2
    assert torch.isnan(U).all(-1).all(-1).tolist() == [[False, True, False]] * 2
    ref = torch.linalg.svdvals(torch.nan_to_num(A) @ B)[..., :2]
    ref[:, 1] = float("nan")
    torch.testing.assert_close(S, ref, equal_nan=True)
    torch.testing.assert_close(S2, ref, equal_nan=True)


@pytest.mark.parametrize(
    "name, loss",
    [
        ("svdvals", lambda a, b: kernels.svdvals(a, b, "householder").pow(2).sum()),
        ("svd", lambda a, b: kernels.svd(a, b, "householder")[1].sum()),
        ("norm_qr", lambda a, b: kernels.frobenius_norm(a, b, "qr")),
        ("norm_gram", lambda a, b: kernels.frobenius_norm(a, b, "gram")),
    ],
)
def test_kernels_with_custom_gradients_compile_and_match_eager_gradients(name, loss):
    A, B = make_factors((24, 3), (3, 20), torch.float64, rank=2)  # rank-deficient: no QR backward
    A.requires_grad_(True)
    (g_graph,) = torch.autograd.grad(compiled(loss)(A, B), A)
    (g_eager,) = torch.autograd.grad(loss(A, B), A)
    assert bool(torch.isfinite(g_graph).all())
    torch.testing.assert_close(g_graph, g_eager)
