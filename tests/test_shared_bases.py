"""lowrank_op.shared_bases: one QR per outer factor, its ``"auto"`` rule, and the shared cache of bases.

The cache (:class:`lowrank_op._cache.TensorCache`, ``_cache.shared``) follows the package's rule:
an entry is handed back only while the tensor is the same object with the same version and
contents; views of the same memory read the same way share an entry; entries go with the tensor.
Reuse is observed through :mod:`lowrank_op.choices` (an ``"orthogonalize"`` record of "a shared
outer factor" is made only when a factorisation is computed) and through the cache's entries.
Results are compared with the dense float64 product; the hypothesis test draws random chains.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from helpers import (
    Chain,
    assert_orthonormal,
    assert_scaled_close,
    chain_scale,
    check_svd_of,
    dense_chain,
    dense_eigenvalues_padded,
    make_chain,
    match_multiset,
    out_dtype,
    tol,
)
from hypothesis import given
from hypothesis import strategies as st

from lowrank_op import FactoredMatrix, _cache, choices, shared_bases
from lowrank_op.outer_factored import OuterFactoredMatrix

f64 = torch.float64


def entries_of(X: torch.Tensor) -> list:
    """The shared cache's keys that involve the memory of ``X`` (its root tensor)."""
    root = _cache._root(X)
    return [key for key in _cache.shared._entries if any(part[0] == id(root) for part in key[1])]


def factorisations(log) -> list:
    """The records of factorisations of shared outer factors (computed, not taken from the cache)."""
    return [c for c in log if c.operation == "orthogonalize" and "shared outer factor" in c.reason]


def model(vocab=30, d_model=6, d_head=2, heads=3, layers=3, seed=0):
    """A small model's embedding, unembedding and per-layer OV and QK factors (heads share W_E)."""
    gen = torch.Generator().manual_seed(seed)
    W_E = torch.randn(vocab, d_model, dtype=f64, generator=gen)
    W_U = torch.randn(d_model, vocab, dtype=f64, generator=gen)
    blocks = [
        tuple(torch.randn(heads, *shape, dtype=f64, generator=gen) for shape in ((d_model, d_head), (d_head, d_model)) * 2)
        for _ in range(layers)
    ]
    return W_E, W_U, blocks


def svdvals_ref(M, k):
    return torch.linalg.svdvals(M)[..., :k]


# --- the cache of bases ---------------------------------------------------------------------------
def test_one_factorisation_per_outer_factor_across_circuits_and_layers():
    W_E, W_U, blocks = model()
    ovs = [W_E @ FactoredMatrix(W_V, W_O) @ W_U for W_V, W_O, _, _ in blocks]
    qks = [W_E @ FactoredMatrix(W_Q, W_K) @ W_E.mT for _, _, W_Q, W_K in blocks]
    assert all(isinstance(c, OuterFactoredMatrix) for c in ovs + qks)
    with choices.recorded() as log:
        first = ovs[0].S
    assert len(factorisations(log)) == 2  # W_E and W_U^H, once each
    assert len(entries_of(W_E)) == 1 and len(entries_of(W_U)) == 1
    with choices.recorded() as log:
        results = [(c, c.S, c.norm()) for c in ovs[1:] + qks] + [(c, c.eigenvalues, None) for c in qks]
    # Every other circuit, OV or QK (whose right factor is the view W_E.mT), reuses the bases.
    assert factorisations(log) == [], [str(c) for c in factorisations(log)]
    assert len(entries_of(W_E)) == 1 and len(entries_of(W_U)) == 1, "the view W_E.mT shares W_E's entry"
    decisions = [c for c in log if c.operation == "outer_factor"]
    assert decisions and all(c.method == "basis+basis" for c in decisions)
    for circuit, values, norm in [(ovs[0], first, None)] + results:
        M, scale = dense_chain(*circuit._chain()), chain_scale(*circuit._chain())
        if values.is_complex():
            L, A, B, R = circuit._chain()
            ref = torch.linalg.eigvals(B @ R @ L @ A)
            assert_scaled_close(match_multiset(values, ref), ref, scale, tol(f64, "eig"), "eigenvalues")
        else:
            assert_scaled_close(values, svdvals_ref(M, circuit.mdim), scale, tol(f64), "S")
        if norm is not None:
            assert_scaled_close(norm, torch.linalg.matrix_norm(M), scale, tol(f64), "norm")
    # Singular vectors need Q: one more factorisation of each (kept), then reused.
    with choices.recorded() as log:
        ovs[0].svd()
        ovs[1].svd()
    assert len(factorisations(log)) == 2
    with choices.recorded() as log:
        (W_E @ FactoredMatrix(*blocks[2][:2]) @ W_U).S  # a new object, served from the cache
    assert factorisations(log) == []


def test_views_share_an_entry_and_copies_do_not():
    W_E = torch.randn(40, 6, dtype=f64)
    first = shared_bases.basis(W_E)
    assert shared_bases.basis(W_E.mT.mH) is first  # the QK circuit's R^H
    assert shared_bases.basis(W_E[:]) is first
    with choices.recorded() as log:
        copy = shared_bases.basis(W_E.clone())  # equal contents, another tensor: not the same entry
        other_view = shared_bases.basis(W_E[1:])  # another view of the memory
    assert len(factorisations(log)) == 2
    assert_scaled_close(copy.R.mH @ copy.R, first.R.mH @ first.R, float(W_E.norm()) ** 2, tol(f64), "R^H R")
    assert other_view.R.shape == (6, 6)
    # A factorisation with Q serves a later request without it.
    X = torch.randn(30, 5, dtype=f64)
    with_q = shared_bases.basis(X, want_q=True)
    with choices.recorded() as log:
        assert shared_bases.basis(X) is with_q
    assert factorisations(log) == []


def _edit_in_place(W):
    with torch.no_grad():
        W[0].add_(0.5)


def _edit_data(W):
    W.data[1].mul_(3.0)


def _edit_numpy(W):
    W.detach().numpy()[2] += 0.75


EDITS = {"in place": _edit_in_place, ".data": _edit_data, "numpy view": _edit_numpy}


@pytest.mark.parametrize("edit", EDITS.values(), ids=EDITS.keys())
def test_an_edit_of_the_shared_factor_invalidates_its_basis(edit):
    W_E, W_U, blocks = model(layers=1)
    W_V, W_O, W_Q, W_K = blocks[0]
    ov = W_E @ FactoredMatrix(W_V, W_O) @ W_U
    qk = W_E @ FactoredMatrix(W_Q, W_K) @ W_E.mT
    before = (ov.S.clone(), qk.S.clone(), qk.eigenvalues.clone(), qk.norm().clone())
    edit(W_E)
    with choices.recorded() as log:
        after = (ov.S, qk.S, qk.eigenvalues, qk.norm())
    assert len(factorisations(log)) == 1, "W_E is factorised again (W_U's basis still serves)"
    for circuit, values, old in ((ov, after[0], before[0]), (qk, after[1], before[1])):
        M, scale = dense_chain(*circuit._chain()), chain_scale(*circuit._chain())
        assert_scaled_close(values, svdvals_ref(M, 2), scale, tol(f64), "S follows the edit")
        assert not torch.allclose(values, old)
    M, scale = dense_chain(*qk._chain()), chain_scale(*qk._chain())
    ref = torch.linalg.eigvals(W_K @ W_E.mT @ W_E @ W_Q)
    assert_scaled_close(match_multiset(after[2], ref), ref, scale, tol(f64, "eig"), "eigenvalues follow the edit")
    assert_scaled_close(after[3], torch.linalg.matrix_norm(M), scale, tol(f64), "norm follows the edit")


def test_entries_go_with_the_tensor():
    W_E, W_U, blocks = model(layers=1)
    qk = W_E @ FactoredMatrix(*blocks[0][2:]) @ W_E.mT
    qk.S, qk.svd(), qk.eigenvalues
    root_id = id(W_E)
    assert len(entries_of(W_E)) == 2  # the factorisation without Q and with it
    alive = weakref.ref(W_E)
    circuit = weakref.ref(qk)
    del W_E, qk
    gc.collect()
    assert alive() is None and circuit() is None, "the cache keeps neither the tensor nor the circuit alive"
    assert not any(part[0] == root_id for key in _cache.shared._entries for part in key[1])
    assert root_id not in _cache.shared._watched


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_bases_cached_without_gradients_give_correct_gradients(context):
    W_E, W_U, blocks = model(layers=1)
    W_V, W_O, W_Q, W_K = blocks[0]
    W_E.requires_grad_(True)
    W_V.requires_grad_(True)
    ov = W_E @ FactoredMatrix(W_V, W_O) @ W_U
    qk = W_E @ FactoredMatrix(W_Q, W_K) @ W_E.mT
    with context():
        ov.S, qk.eigenvalues, ov.norm()  # fill the shared cache (and the instances') without a graph

    def losses(ov, qk):
        return (ov.S * torch.tensor([2.0, 1.0], dtype=f64)).sum() + ov.norm().sum() + (qk.eigenvalues**2).real.sum()

    for _ in range(2):  # each call has a graph of its own: a second backward works
        losses(ov, qk).backward()
    E, V = W_E.detach().clone().requires_grad_(True), W_V.detach().clone().requires_grad_(True)
    M_ov = E @ V @ W_O @ W_U
    M_qk = E @ W_Q @ W_K @ E.mT
    ref = ((torch.linalg.svdvals(M_ov)[..., :2] * torch.tensor([2.0, 1.0], dtype=f64)).sum()
           + torch.linalg.matrix_norm(M_ov).sum() + torch.diagonal(M_qk @ M_qk, dim1=-2, dim2=-1).sum())
    (2 * ref).backward()
    for got, want, which in ((W_E.grad, E.grad, "W_E"), (W_V.grad, V.grad, "W_V")):
        assert_scaled_close(got, want, float(want.abs().max()), 1e-9, f"d/d{which}")


def test_closing_product_is_shared_and_tied_pairs_use_the_basis():
    W_E, W_U, blocks = model(layers=2)
    # Tied (the QK circuit): R L = R_L^H R_L from W_E's basis, no product of its own.
    with choices.recorded() as log:
        tied = shared_bases.closing_product(W_E.mT, W_E)
    assert len(factorisations(log)) == 1 and len(entries_of(W_E)) == 1
    assert_scaled_close(tied, W_E.mT @ W_E, float(W_E.norm()) ** 2, tol(f64), "W_E^T W_E")
    # Untied (an OV circuit W_E ... W_U): W_U W_E once per pair, reused by every circuit.
    product = shared_bases.closing_product(W_U, W_E)
    assert_scaled_close(product, W_U @ W_E, float(W_E.norm() * W_U.norm()), tol(f64), "W_U W_E")
    assert shared_bases.closing_product(W_U, W_E) is product
    assert len([k for k in entries_of(W_U) if k[0] == ("closing_product",)]) == 1
    ovs = [W_E @ FactoredMatrix(W_V, W_O) @ W_U for W_V, W_O, _, _ in blocks]
    with choices.recorded() as log:
        for ov in ovs:
            ov.eigenvalues, ov.trace()
    closing = [c for c in log if c.operation == "closing_product"]
    assert closing and all(c.method == "shared" for c in closing), [str(c) for c in closing]
    for ov in ovs:
        L, A, B, R = ov._chain()
        ref = torch.linalg.eigvals(B @ (R @ L) @ A)
        scale = chain_scale(L, A, B, R)
        assert_scaled_close(match_multiset(ov.eigenvalues, ref), ref, scale, tol(f64, "eig"), "eigenvalues")
        trace_ref = torch.diagonal(dense_chain(L, A, B, R), dim1=-2, dim2=-1).sum(-1)
        assert_scaled_close(ov.trace(), trace_ref, scale, tol(f64), "trace")
    W_U.data.mul_(2.0)  # unseen by the version counter, seen by the fingerprint
    after = shared_bases.closing_product(W_U, W_E)
    assert_scaled_close(after, W_U @ W_E, float(W_E.norm() * W_U.norm()), tol(f64), "after an edit")


# --- the "auto" rule ---------------------------------------------------------------------------------
PLAN_CASES = {
    # name: (L shape, A shape, B shape, R shape, (left, right), reason fragments)
    "shared enough": ((40, 6), (3, 6, 2), (3, 2, 6), (6, 30), (True, True), ["6 columns >= its 6"]),
    "too few matrices": ((40, 6), (2, 6, 2), (2, 2, 6), (6, 30), (False, False), ["4 columns < its 6", "not cached"]),
    "not tall": ((5, 6), (3, 6, 2), (3, 2, 6), (6, 4), (False, False), ["is not tall"]),
    "narrower than the inner dim": ((40, 3), (3, 7), (7, 3), (3, 30), (False, False), ["narrower than the inner dim 7"]),
    "batched outer factor": ((2, 1, 40, 6), (3, 6, 2), (3, 2, 6), None, (True, False), ["shared by 3 matrices"]),
    "left only": ((40, 6), (3, 6, 2), (3, 2, 5), None, (True, False), ["L: basis"]),
    "right only": (None, (3, 5, 2), (3, 2, 6), (6, 30), (False, True), ["R^H: basis"]),
}


@pytest.mark.parametrize("case", list(PLAN_CASES))
def test_auto_rule(case):
    l_shape, a_shape, b_shape, r_shape, expected, fragments = PLAN_CASES[case]
    L, A, B, R = make_chain(Chain(l_shape, a_shape, b_shape, r_shape))
    with choices.recorded() as log:
        sides = shared_bases.plan(L, A, B, R)
    assert sides == expected
    (decision,) = [c for c in log if c.operation == "outer_factor"]
    present = [side for side, X in zip(expected, (L, R)) if X is not None]
    assert decision.method == "+".join("basis" if side else "formed" for side in present)
    for fragment in fragments:
        assert fragment in decision.reason, decision.reason


def test_a_cached_factorisation_makes_the_basis_pay():
    L, A, B, R = make_chain(Chain((40, 6), (2, 6, 2), (2, 2, 6), None))
    assert shared_bases.plan(L, A, B, R) == (False, False)  # 4 columns < 6, not cached
    shared_bases.basis(L)
    with choices.recorded() as log:
        assert shared_bases.plan(L, A, B, R) == (True, False)
    assert "is cached" in log[-1].reason


def test_forcing_the_outer_path():
    L, A, B, R = make_chain(Chain((40, 6), (2, 6, 2), (2, 2, 6), (6, 4)))
    with choices.recorded() as log:
        assert shared_bases.plan(L, A, B, R, outer="shared") == (True, False)  # R^H (4 x 6) is not tall
        assert shared_bases.plan(L, A, B, R, outer="formed") == (False, False)
    assert "cannot be" in log[0].reason and "outer='formed'" in log[1].reason
    with pytest.raises(ValueError, match=r"`outer` must be one of 'auto', 'shared', 'formed'; got 'both'"):
        shared_bases.plan(L, A, B, R, outer="both")
    with pytest.raises(ValueError, match=r"`outer` must be one of"):
        OuterFactoredMatrix(A, B, left=L, right=R).svdvals(outer="basis")


# --- the factorisation itself -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.complex128, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method", ["auto", "householder", "cholqr2"])
@pytest.mark.parametrize("shape", [(30, 5), (2, 30, 5), (6, 6), (4, 6)], ids=["tall", "batched", "square", "wide"])
def test_basis(shape, method, dtype):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(*shape, dtype=f64 if not dtype.is_complex else torch.complex128, generator=gen).to(dtype)
    X.requires_grad_(True)
    b = shared_bases.basis(X, method, want_q=True)
    exact = X.to(torch.complex128 if dtype.is_complex else f64)
    if shape[-2] <= shape[-1]:  # not tall: nothing factorised, Q is the identity
        assert b.identity and b.Q is None and torch.equal(b.R.detach(), X.detach().to(out_dtype(dtype)))
        return
    assert not b.identity and b.R.dtype == b.Q.dtype == out_dtype(dtype)
    assert not b.R.requires_grad and not b.Q.requires_grad, "computed without gradients"
    p = shape[-1]
    assert b.Q.shape == (*shape[:-1], p) and b.R.shape == (*shape[:-2], p, p)
    assert_orthonormal(b.Q, tol(dtype, "ortho"), "Q")
    scale = torch.linalg.matrix_norm(exact)
    assert_scaled_close(b.Q.to(exact.dtype) @ b.R.to(exact.dtype), exact, scale, tol(dtype), "Q R")
    assert bool((b.R.tril(-1) == 0).all()), "R is upper triangular"


def test_a_rank_deficient_embedding_falls_back_to_householder():
    L = make_chain(Chain((40, 6), (6, 2), (2, 6), None, distinct_rows=3))[0]  # rank 3
    with choices.recorded() as log:
        b = shared_bases.basis(L)
    assert [c.method for c in factorisations(log)] == ["cholqr2", "householder"]
    assert "fell back" in factorisations(log)[1].reason
    assert_scaled_close(b.R.mT @ b.R, L.mT @ L, float(L.norm()) ** 2, tol(f64), "R^T R = L^T L")
    with pytest.raises(RuntimeError, match=r"CholeskyQR2 failed"):
        shared_bases.basis(L.clone(), "cholqr2")


#: square chains for the kernels, by which outer factors are present (tied: the QK circuit's view)
KERNEL_CHAINS = {
    "both": Chain((30, 6), (4, 6, 2), (4, 2, 6), (6, 30)),
    "tied": Chain((30, 6), (4, 6, 2), (4, 2, 6), (6, 30), tie="R=L^T"),
    "left": Chain((30, 6), (4, 6, 2), (4, 2, 30), None),
    "right": Chain(None, (4, 30, 2), (4, 2, 6), (6, 30)),
    "neither": Chain(None, (4, 30, 2), (4, 2, 30), None),
    "mdim_gt_ldim": Chain((5, 8), (8, 7), (7, 8), (8, 5)),
}


@pytest.mark.parametrize("sides", list(KERNEL_CHAINS))
@pytest.mark.parametrize("outer", ["auto", "shared", "formed"])
def test_kernels(sides, outer):
    factors = make_chain(KERNEL_CHAINS[sides])
    L, A, B, R = factors
    M, scale = dense_chain(*factors), chain_scale(*factors)
    k, m = min(M.shape[-1], A.shape[-1]), A.shape[-1]
    eig_tol = tol(f64, "eig")
    assert_scaled_close(shared_bases.svdvals(*factors, outer=outer), svdvals_ref(M, k), scale, tol(f64), "svdvals")
    norm = shared_bases.frobenius_norm(*factors, outer=outer)
    assert_scaled_close(norm, torch.linalg.matrix_norm(M), scale, tol(f64), "norm")
    check_svd_of(*shared_bases.svd(*factors, outer=outer), M, scale, f64, k)
    padded = dense_eigenvalues_padded(M, m)
    values = shared_bases.eigvals(*factors, outer=outer)
    assert_scaled_close(match_multiset(values, padded), padded, scale, eig_tol, "eigvals")
    eye = torch.eye(M.shape[-1], dtype=f64)
    ref = torch.linalg.eigvals(B @ (eye if R is None else R) @ (eye if L is None else L) @ A)
    reverse = shared_bases.reverse_product_eigvals(*factors, outer=outer)
    assert_scaled_close(match_multiset(reverse, ref), ref, scale, eig_tol, "reverse_product_eigvals")
    trace = shared_bases.trace(*factors, outer=outer)
    assert_scaled_close(trace, torch.diagonal(M, dim1=-2, dim2=-1).sum(-1), scale, tol(f64), "trace")


# --- hypothesis: random chains --------------------------------------------------------------------
@st.composite
def chains(draw, max_dim: int = 6):
    """A random :class:`helpers.Chain`: inner dims 1..max_dim, outer dims up to 3 max_dim (tall
    outer factors), up to two leading dims that broadcast between all four factors (each may hold a
    dim as 1 or lack it), either outer factor absent, square products and tied ``R = L^T`` often."""
    n = draw(st.integers(1, 3 * max_dim))  # often taller than wide: the basis path
    p, m, q = (draw(st.integers(1, max_dim)) for _ in range(3))
    has_left = draw(st.sampled_from([True, True, True, False]))
    has_right = draw(st.sampled_from([True, True, True, False]))
    square = draw(st.booleans())
    ldim = n if has_left else p
    r = ldim if square else draw(st.integers(1, 3 * max_dim))
    q = q if has_right else r
    tied = square and has_left and has_right and draw(st.booleans())
    if tied:
        q = p
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))

    def lead():
        dims = [draw(st.sampled_from([b, 1])) for b in batch]
        return tuple(dims[draw(st.integers(0, len(dims))):])

    l_lead = lead()
    left = (*l_lead, n, p) if has_left else None
    right = None if not has_right else ((*l_lead, q, r) if tied else (*lead(), q, r))
    return Chain(left, (*lead(), p, m), (*lead(), m, q), right, tie="R=L^T" if tied else "")


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
@given(chain=chains(), outer=st.sampled_from(["shared", "auto", "formed"]), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_S_norm_eigenvalues(dtype, chain, outer, seed):
    L, A, B, R = make_chain(chain, dtype, seed)
    fm = OuterFactoredMatrix(A, B, left=L, right=R)
    M, scale = dense_chain(L, A, B, R), chain_scale(L, A, B, R)
    assert fm.shape == M.shape
    k = min(fm.ldim, fm.mdim, fm.rdim)
    S = fm.svdvals(outer=outer)
    assert_scaled_close(S, svdvals_ref(M, k), scale, tol(dtype), "S")
    assert_scaled_close(fm.norm(outer=outer), torch.linalg.matrix_norm(M), scale, tol(dtype), "norm")
    if not chain.square:
        return
    r = M.dtype
    BRLA = B.to(r) @ (torch.eye(fm.rdim, dtype=r) if R is None else R.to(r)) @ (
        torch.eye(fm.ldim, dtype=r) if L is None else L.to(r)) @ A.to(r)
    ref = torch.linalg.eigvals(BRLA)
    assert_scaled_close(match_multiset(fm.eigenvalues, ref), ref, scale, tol(dtype, "eig"), "eigenvalues")
    padded = dense_eigenvalues_padded(M, fm.mdim)
    assert_scaled_close(match_multiset(fm.eigvals(), padded), padded, scale, tol(dtype, "eig"), "eigvals")
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)
    assert_scaled_close(fm.trace(), trace, scale, tol(dtype), "trace")
