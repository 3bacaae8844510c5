"""The one cache rule (lowrank_op._cache): a cached result is handed back only when recomputing it
now would give the same values and the same autograd graph.

Two classes of defect are tested, each over every cached operation:
- stale values: the factors changed in a way their version counters do not see (``.data``, a NumPy
  array or another tensor object sharing the memory) or do see (in-place ops);
- dropped or shared graphs: a result first computed under ``no_grad`` / ``inference_mode`` or
  before ``requires_grad_()`` must not be handed to code that wants gradients, and each call that
  records gradients gets its own graph (a second ``backward`` works, as it does densely).
"""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
from linear_operator.operators import DiagLinearOperator

from lowrank_op import FactoredMatrix
from lowrank_op._cache import ResultCache, fingerprint

DT = torch.float64


def _factors(n=9, m=3, batch=()):
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(*batch, n, m, dtype=DT, generator=gen)
    B = torch.randn(*batch, m, n, dtype=DT, generator=gen)
    return A, B


# Each cached operation, with its dense float64 reference (computed from the dense product) and a
# scalar loss whose gradient is unique (no dependence on the arbitrary choice of singular vectors).
def _sv_sq(M):
    return torch.linalg.svdvals(M).pow(2).sum()


OPERATIONS = {
    "S": (lambda fm: fm.S, lambda M: torch.linalg.svdvals(M)[..., :3], lambda fm: fm.S.pow(2).sum(), _sv_sq),
    "svd().S": (
        lambda fm: fm.svd()[1],
        lambda M: torch.linalg.svdvals(M)[..., :3],
        lambda fm: fm.svd()[1].pow(2).sum(),
        _sv_sq,
    ),
    "svd().U": (
        lambda fm: fm.svd()[0].abs(),  # columns up to sign
        lambda M: torch.linalg.svd(M)[0][..., :3].abs(),
        lambda fm: (fm.svd()[0] * fm.svd()[1][..., None, :]).pow(2).sum(),  # |U S|^2 = |M|^2
        lambda M: M.pow(2).sum(),
    ),
    "eigenvalues": (
        lambda fm: torch.sort(fm.eigenvalues.real).values[..., -3:],
        lambda M: torch.sort(torch.linalg.eigvals(M).real).values[..., -3:],
        lambda fm: fm.eigenvalues.real.sum(),  # the trace
        lambda M: torch.diagonal(M, dim1=-2, dim2=-1).sum(),
    ),
}


def _well_separated_factors():
    """Square factors whose product has well-separated singular values and real, distinct
    eigenvalues (A B = Q diag Q^T restricted to rank 3), so every reference is unambiguous."""
    gen = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(9, 3, dtype=DT, generator=gen))[0]
    A = (Q * torch.tensor([5.0, 3.0, 1.0], dtype=DT)).contiguous()
    B = Q.mT.contiguous()
    return A, B


# Each edit adds to one entry of a factor, which changes the product's singular values, singular
# vectors and eigenvalues.
def _edit_in_place(A):
    with torch.no_grad():
        A[0, 0].add_(0.75)


def _edit_data(A):
    A.data[0, 0].add_(0.75)


def _edit_numpy(A):
    A.detach().numpy()[0, 0] += 0.75


def _edit_alias(A):
    alias = torch.from_numpy(A.detach().numpy())  # shares memory, has its own version counter
    alias[0, 0].add_(0.75)


EDITS = {"in place": _edit_in_place, ".data": _edit_data, "numpy view": _edit_numpy, "from_numpy alias": _edit_alias}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
@pytest.mark.parametrize("op", OPERATIONS.values(), ids=OPERATIONS.keys())
@pytest.mark.parametrize("which", ["A", "B"])
def test_no_stale_result_after_an_edit(op, edit, which):
    get, ref, _, _ = op
    A, B = _well_separated_factors()
    fm = FactoredMatrix(A, B)
    before = get(fm)
    torch.testing.assert_close(before, ref(A @ B))
    edit(A if which == "A" else B)
    after = get(fm)
    torch.testing.assert_close(after, ref(A @ B))
    assert not torch.allclose(after, before), "the edit changed the product; the result must change"


def test_unchanged_factors_reuse_the_cached_result():
    A, B = _well_separated_factors()
    fm = FactoredMatrix(A, B)
    assert fm.svd()[1] is fm.S  # S is taken from a cached svd()
    assert fm.S is fm.S
    assert fm.svd()[0] is fm.svd()[0]
    assert fm.eigenvalues is fm.eigenvalues


def _dense_grads(loss, A, B):
    A2, B2 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    loss(A2 @ B2).backward()
    return A2.grad, B2.grad


def _check_grads(op, A, B, fm):
    _, _, loss, dense_loss = op
    loss(fm).backward()
    want_A, want_B = _dense_grads(dense_loss, A, B)
    torch.testing.assert_close(A.grad, want_A)
    torch.testing.assert_close(B.grad, want_B)


CONTEXTS = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("context", CONTEXTS.values(), ids=CONTEXTS.keys())
@pytest.mark.parametrize("op", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_result_first_computed_without_grad_is_not_reused_with_grad(op, context):
    get = op[0]
    A, B = _well_separated_factors()
    A.requires_grad_(True)
    B.requires_grad_(True)
    fm = FactoredMatrix(A, B)
    with context():
        get(fm)
    _check_grads(op, A, B, fm)


@pytest.mark.parametrize("op", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_result_computed_before_requires_grad_is_not_reused(op):
    A, B = _well_separated_factors()
    fm = FactoredMatrix(A, B)
    op[0](fm)
    A.requires_grad_(True)
    B.requires_grad_(True)
    _check_grads(op, A, B, fm)


@pytest.mark.parametrize("op", OPERATIONS.values(), ids=OPERATIONS.keys())
def test_second_backward_works_as_densely(op):
    _, _, loss, dense_loss = op
    A, B = _well_separated_factors()
    A.requires_grad_(True)
    B.requires_grad_(True)
    fm = FactoredMatrix(A, B)
    loss(fm).backward()
    loss(fm).backward()  # a fresh graph: no "backward through the graph a second time"
    want_A, _ = _dense_grads(dense_loss, A, B)
    torch.testing.assert_close(A.grad, 2 * want_A)


def test_inference_mode_results_stay_in_inference_mode():
    A, B = _well_separated_factors()
    fm = FactoredMatrix(A, B)
    with torch.inference_mode():
        inner = fm.S
    outer = fm.S
    assert inner.is_inference() and not outer.is_inference()


def test_woodbury_factorisation_follows_the_same_rule():
    A, B = _well_separated_factors()
    d = torch.full((9,), 2.0, dtype=DT)
    op = FactoredMatrix(A, B) + DiagLinearOperator(d)
    dense = lambda: A @ B + torch.diag(d)  # noqa: E731
    torch.testing.assert_close(op.logdet(), torch.logdet(dense()))
    A.data.mul_(1.5)  # unseen by the version counter
    torch.testing.assert_close(op.logdet(), torch.logdet(dense()))
    d.numpy()[0] = 7.0
    torch.testing.assert_close(op.logdet(), torch.logdet(dense()))
    A.requires_grad_(True)
    with torch.no_grad():
        op.logdet()
    op.logdet().backward()
    A2 = A.detach().clone().requires_grad_(True)
    torch.logdet(A2 @ B + torch.diag(d)).backward()
    torch.testing.assert_close(A.grad, A2.grad)


def test_cache_frees_with_its_instance():
    A, B = _well_separated_factors()
    fm = FactoredMatrix(A, B)
    fm.svd()
    ref = weakref.ref(fm)
    del fm
    gc.collect()
    assert ref() is None


# --- the fingerprint ------------------------------------------------------------------------------
FINGERPRINT_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128]


@pytest.mark.parametrize("dtype", FINGERPRINT_DTYPES)
def test_fingerprint_sees_every_single_element_change(dtype):
    X = torch.randn(6, 5, dtype=dtype)
    base = fingerprint(X)
    for i in range(6):
        for j in range(5):
            Y = X.clone()
            Y[i, j] = Y[i, j] * 2 + 1
            assert fingerprint(Y) != base
    assert fingerprint(X.clone()) == base


def test_fingerprint_sees_swaps_signs_and_nan_payloads():
    X = torch.randn(4, 4, dtype=torch.float64)
    base = fingerprint(X)
    assert fingerprint(X[[1, 0, 2, 3]]) != base  # two rows swapped
    assert fingerprint(X[:, [1, 0, 2, 3]]) != base  # two columns swapped
    Z = X.clone()
    Z[0, 0] = -0.0 if X[0, 0] == 0 else -X[0, 0]
    assert fingerprint(Z) != base
    N1, N2 = torch.full((2, 2), float("nan")), torch.full((2, 2), float("nan"))
    N2.view(torch.int32)[0, 0] += 1  # another NaN payload
    assert fingerprint(N1) != fingerprint(N2)


def test_fingerprint_of_views():
    X = torch.randn(3, 1, 4, 5, dtype=torch.complex64)
    expanded = X.expand(3, 7, 4, 5)
    assert fingerprint(expanded) == fingerprint(X)  # each element read once, not once per copy
    assert fingerprint(expanded) != fingerprint(X.expand(3, 7, 4, 5).clone())
    assert fingerprint(X.mT) != fingerprint(X)
    assert fingerprint(X.conj()) != fingerprint(X)  # a lazy conjugate view reads other values
    assert fingerprint(torch.randn(0, 3)) == fingerprint(torch.randn(0, 3))


def test_result_cache_rejects_another_tensor_object_with_equal_contents():
    cache = ResultCache()
    X = torch.randn(3, 3)
    calls = []
    cache.get_or_compute("k", (X,), lambda: calls.append(1) or 1)
    cache.get_or_compute("k", (X,), lambda: calls.append(1) or 1)
    cache.get_or_compute("k", (X.clone(),), lambda: calls.append(1) or 1)
    assert len(calls) == 2


def test_numpy_edit_through_a_broadcast_factor_is_seen():
    A, B = _factors(batch=(1,))
    fm = FactoredMatrix(A, B.expand(4, 3, 9))  # B is an expanded view
    before = fm.S.clone()
    B.numpy()[0, 0, 0] += 3.0
    ref = torch.linalg.svdvals(A @ B)[..., :3].expand(4, 3)
    torch.testing.assert_close(fm.S, ref)
    assert not torch.allclose(fm.S, before)
    assert np.shares_memory(B.numpy(), fm._B.numpy())
