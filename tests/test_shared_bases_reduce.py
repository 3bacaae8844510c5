"""lowrank_op.shared_bases.reduce_outer: outer factors reduced once, against dense float64 products."""

import pytest
import torch

from lowrank_op import _cache, kernels, shared_bases

EPS = torch.finfo(torch.float64).eps


def _factors(n=60, p=10, m=3, heads=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    return draw(n, p), draw(heads, p, m), draw(heads, m, p), draw(p, n)


@pytest.mark.parametrize("mirrored", [True, False], ids=["R-is-L^H", "separate-R"])
def test_core_and_cycle_give_the_products_values(mirrored):
    L, A, B, R = _factors()
    if mirrored:
        R = L.mT
    reduction = shared_bases.reduce_outer(L, R)
    assert reduction.mirrored == mirrored and (reduction.closing is None) == mirrored
    M = L @ A @ B @ R
    X, Y = reduction.core(A, B)
    assert X.shape == (4, 10, 3) and Y.shape == (4, 3, 10)  # nothing n-sized
    S = kernels.svdvals(X, Y)
    scale = torch.linalg.matrix_norm(M, ord=2)[:, None]
    torch.testing.assert_close(S, torch.linalg.svdvals(M)[:, :3], rtol=0, atol=(100 * EPS * scale).max().item())
    eig = kernels.eigvals(*reduction.cycle(A, B, core=(X, Y)))
    want = kernels._sort_by_magnitude(torch.linalg.eigvals(M))[:, :3]  # the rest are zero up to rounding
    atol = (1000 * EPS * scale).max().item()
    for part in (torch.abs, torch.real, torch.imag):  # the same multiset, whatever the order of equal moduli
        torch.testing.assert_close(part(eig).sort(-1).values, part(want).sort(-1).values, rtol=0, atol=atol)


def test_one_factorisation_when_R_is_L_transposed(monkeypatch):
    calls = []
    original = shared_bases._factorise
    monkeypatch.setattr(shared_bases, "_factorise", lambda X, m, q: calls.append(X.shape) or original(X, m, q))
    L, _, _, R = _factors(seed=1)
    shared_bases.reduce_outer(L, L.mT)
    assert len(calls) == 1
    shared_bases.reduce_outer(L, R)  # L's factorisation is cached; R^H's is new
    assert len(calls) == 2
    _cache.shared.clear()


def test_errors_name_the_argument():
    L, A, B, R = _factors()
    with pytest.raises(TypeError, match="`R` must be a torch.Tensor"):
        shared_bases.reduce_outer(L, R.numpy())
    with pytest.raises(ValueError, match="`L` must have at least 2 dims"):
        shared_bases.reduce_outer(L[0], R)
    with pytest.raises(ValueError, match="`R` of shape .* closing product"):
        shared_bases.reduce_outer(L, R[:, :5])
    reduction = shared_bases.reduce_outer(L, R[:, :5], closing=False)  # singular values only
    assert reduction.closing is None
    with pytest.raises(ValueError, match="closing=False"):
        reduction.cycle(A, B)
