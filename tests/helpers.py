"""Shared factories, dense float64 references, tolerances and comparisons for the numerical tests.

Every numerical result is compared with a dense reference in float64 (complex128 for complex
inputs) formed from the *exact* factor values the library received, so the only error measured is
the library's. Errors are bounded relative to ``scale = |A|_F |B|_F`` (per leading index), the size
of the data, which bounds ``|A @ B|`` and every backward-stable error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from lowrank_op import FactoredMatrix

REAL_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
COMPLEX_DTYPES = (torch.complex64, torch.complex128)
ALL_DTYPES = REAL_DTYPES + COMPLEX_DTYPES
SVD_METHODS = ("auto", "householder", "cholqr2")
NORM_METHODS = ("auto", "gram", "qr")

#: Tolerances relative to ``|A|_F |B|_F`` (``"value"``), absolute for orthonormality (``"ortho"``),
#: and relative to ``|A|_F |B|_F`` for eigenvalues, which also carry the eigenvalue condition number
#: (``"eig"``). 16-bit inputs are decomposed in float32 from their exact values, so their bounds are
#: float32's, loosened tenfold; results held in the 16-bit dtype itself (``AB``, ``trace``, scalar
#: multiples) are rounded to it, hence ``"stored"``.
TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"value": 1e-11, "ortho": 1e-11, "eig": 1e-9, "stored": 1e-11},
    torch.complex128: {"value": 1e-11, "ortho": 1e-11, "eig": 1e-9, "stored": 1e-11},
    torch.float32: {"value": 2e-5, "ortho": 2e-5, "eig": 5e-4, "stored": 2e-5},
    torch.complex64: {"value": 2e-5, "ortho": 2e-5, "eig": 5e-4, "stored": 2e-5},
    torch.bfloat16: {"value": 2e-4, "ortho": 2e-4, "eig": 5e-3, "stored": 1e-2},
    torch.float16: {"value": 2e-4, "ortho": 2e-4, "eig": 5e-3, "stored": 2e-3},
}


def tol(dtype: torch.dtype, kind: str = "value") -> float:
    return TOL[dtype][kind]


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the dense reference: complex128 for complex inputs, else float64."""
    return torch.complex128 if dtype.is_complex else torch.float64


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype decompositions come back in: float32 for 16-bit inputs, else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return out_dtype(dtype).to_real()


# --- factories ------------------------------------------------------------------------------------
def randn(*shape: int, dtype: torch.dtype = torch.float64, gen: torch.Generator | None = None) -> Tensor:
    """Standard normal entries drawn in float64 (complex128) and cast to ``dtype``."""
    x = torch.randn(*shape, dtype=ref_dtype(dtype), generator=gen)
    return x.to(dtype)


def make_factors(
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float64,
    rank: int | None = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Random ``A`` (``a_shape``) and ``B`` (``b_shape``); with ``rank``, ``A = X @ Y`` has that rank."""
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        A = randn(*a_shape, dtype=dtype, gen=gen)
    else:
        *lead, ldim, mdim = a_shape
        X = torch.randn(*lead, ldim, rank, dtype=ref_dtype(dtype), generator=gen)
        Y = torch.randn(rank, mdim, dtype=ref_dtype(dtype), generator=gen)
        A = (X @ Y).to(dtype)
    B = randn(*b_shape, dtype=dtype, gen=gen)
    return A, B


def make_fm(a_shape, b_shape, dtype=torch.float64, rank=None, seed=0) -> FactoredMatrix:
    return FactoredMatrix(*make_factors(a_shape, b_shape, dtype, rank, seed))


def with_condition(rows: int, cols: int, cond: float, dtype: torch.dtype, seed: int = 0) -> Tensor:
    """A ``rows x cols`` matrix (rows >= cols) with singular values log-spaced from 1 to ``1/cond``."""
    gen = torch.Generator().manual_seed(seed)
    P, _ = torch.linalg.qr(torch.randn(rows, cols, dtype=torch.float64, generator=gen))
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -np.log10(cond), cols, dtype=torch.float64)
    return ((P * s) @ Q.mT).to(dtype)


#: Shape pairs that every numerical test runs on: broadcast leading dims, mdim above ldim and rdim,
#: tall factors (the CholeskyQR2 path), single rows, columns and inner dims, unequal batch ranks.
SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "broadcast": ((3, 1, 5, 4), (4, 4, 6)),
    "mdim_gt_ldim_rdim": ((2, 3, 7), (7, 4)),
    "tall_factors": ((24, 3), (3, 20)),
    "tall_batched": ((2, 16, 4), (2, 4, 17)),
    "ldim_1": ((1, 5), (5, 4)),
    "rdim_1": ((4, 5), (5, 1)),
    "mdim_1": ((6, 1), (1, 5)),
    "all_1": ((1, 1), (1, 1)),
    "square_broadcast": ((2, 1, 5, 3), (3, 3, 5)),
}
#: Square shape pairs (ldim == rdim) for eigenvalues and traces.
SQUARE_SHAPES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    "mdim_lt_n": ((6, 3), (3, 6)),
    "mdim_gt_n": ((2, 4, 7), (7, 4)),
    "broadcast": ((3, 1, 5, 5), (4, 5, 5)),
    "all_1": ((1, 1), (1, 1)),
    "n_1": ((1, 4), (4, 1)),
    "mdim_1": ((5, 1), (1, 5)),
}


# --- references -----------------------------------------------------------------------------------
def dense(A: Tensor, B: Tensor) -> Tensor:
    """``A @ B`` in float64 (complex128) from the exact factor values."""
    r = ref_dtype(A.dtype)
    return A.to(r) @ B.to(r)


def scale_of(A: Tensor, B: Tensor) -> Tensor:
    """``|A|_F |B|_F`` per leading index, float64, broadcast to the product's leading shape."""
    r = ref_dtype(A.dtype)
    s = torch.linalg.matrix_norm(A.to(r)) * torch.linalg.matrix_norm(B.to(r))
    return s.clamp_min(1e-300)


def _expand_scale(scale: Tensor, ndim: int) -> Tensor:
    return scale.reshape(scale.shape + (1,) * (ndim - scale.dim()))


def assert_scaled_close(actual: Tensor, expected: Tensor, scale: Tensor | float, rtol: float, what: str = "") -> None:
    """``|actual - expected| <= rtol * scale`` entrywise, ``scale`` per leading index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.to(expected.dtype)
    err = (actual - expected).abs()
    if not torch.is_tensor(scale):
        scale = torch.tensor(float(scale), dtype=torch.float64)
    bound = rtol * _expand_scale(scale.to(torch.float64), err.dim())
    ok = err.to(torch.float64) <= bound
    if not bool(ok.all()):
        worst = float((err.to(torch.float64) / bound.expand_as(err)).max())
        raise AssertionError(f"{what}: error exceeds tolerance by a factor {worst:.3g} (rtol {rtol:g})")


def assert_orthonormal(X: Tensor, atol: float, what: str = "") -> None:
    """The columns of ``X`` (..., n, k) are orthonormal."""
    r = ref_dtype(X.dtype)
    X = X.to(r)
    k = X.shape[-1]
    gram = X.mH @ X
    eye = torch.eye(k, dtype=r).expand_as(gram)
    assert_scaled_close(gram, eye, 1.0, atol, f"{what} orthonormality")


def check_svd(U: Tensor, S: Tensor, V: Tensor, A: Tensor, B: Tensor) -> int:
    """``(U, S, V)`` is a thin SVD of ``A @ B``: shapes, dtypes, values, vectors (sign-invariantly).
    Returns how many singular pairs were separated enough to have their projectors compared."""
    k = min(A.shape[-2], A.shape[-1], B.shape[-1])
    return check_svd_of(U, S, V, dense(A, B), scale_of(A, B), A.dtype, k)


def check_svd_of(U: Tensor, S: Tensor, V: Tensor, M: Tensor, scale: Tensor, dtype: torch.dtype, k: int) -> int:
    """:func:`check_svd` against the dense reference ``M`` (float64 / complex128) of a product of
    factors in ``dtype`` whose errors are bounded by ``scale``; ``k`` singular triplets."""
    lead = M.shape[:-2]
    ldim, rdim = M.shape[-2:]
    assert U.shape == (*lead, ldim, k), U.shape
    assert S.shape == (*lead, k), S.shape
    assert V.shape == (*lead, rdim, k), V.shape
    assert U.dtype == V.dtype == out_dtype(dtype), (U.dtype, V.dtype)
    assert S.dtype == real_dtype(dtype), S.dtype
    assert bool((S >= 0).all()), "singular values must be non-negative"
    assert bool((S[..., :-1] >= S[..., 1:]).all()), "singular values must be descending"

    rt = tol(dtype)
    S_ref = torch.linalg.svdvals(M)
    assert_scaled_close(S, S_ref[..., :k], scale, rt, "S")
    recon = (U.to(M.dtype) * S.to(torch.float64)[..., None, :]) @ V.to(M.dtype).mH
    assert_scaled_close(recon, M, scale, rt, "U diag(S) V^H")
    assert_orthonormal(U, tol(dtype, "ortho"), "U")
    assert_orthonormal(V, tol(dtype, "ortho"), "V")
    return check_singular_projectors(U, V, M, scale, rt)


def check_singular_projectors(U: Tensor, V: Tensor, M: Tensor, scale: Tensor, rtol: float) -> int:
    """For each singular value that is non-zero and separated from its neighbours (the implied
    zeros included), ``u u^H`` and ``v v^H`` match the dense SVD's (error ~ ``eps |M| / gap``)."""
    U_ref, S_ref, Vh_ref = torch.linalg.svd(M, full_matrices=False)
    k = U.shape[-1]
    lead = M.shape[:-2]
    flat = lambda X: X.reshape(int(np.prod(lead)), *X.shape[len(lead):])  # noqa: E731  (empty dims allowed)
    U, V, U_ref, S_ref, Vh_ref = flat(U.to(M.dtype)), flat(V.to(M.dtype)), flat(U_ref), flat(S_ref), flat(Vh_ref)
    scales = scale.expand(lead).reshape(-1)
    checked = 0
    for b in range(U.shape[0]):
        s = torch.cat([S_ref[b], S_ref.new_zeros(1)])
        sc = float(scales[b])
        for i in range(k):
            gap = float(s[i] - s[i + 1]) if i == 0 else float(min(s[i - 1] - s[i], s[i] - s[i + 1]))
            if gap < 1e-2 * sc:
                continue
            for X, Xr in ((U[b, :, i], U_ref[b, :, i]), (V[b, :, i], Vh_ref[b, i].conj())):
                P = torch.outer(X, X.conj())
                P_ref = torch.outer(Xr, Xr.conj())
                assert_scaled_close(P, P_ref, sc / gap, rtol, f"singular projector {i}")
            checked += 1
    return checked


def match_multiset(actual: Tensor, expected: Tensor) -> Tensor:
    """Reorder ``actual`` (..., n) to best match ``expected`` (..., n) (min-cost assignment on |a - e|),
    so that two multisets of complex numbers can be compared entrywise."""
    a = actual.to(torch.complex128).reshape(-1, actual.shape[-1])
    e = expected.to(torch.complex128).reshape(-1, expected.shape[-1])
    out = torch.empty_like(e)
    for b in range(a.shape[0]):
        cost = (a[b][:, None] - e[b][None, :]).abs().numpy()
        rows, cols = linear_sum_assignment(cost)
        out[b, torch.as_tensor(cols)] = a[b, torch.as_tensor(rows)]
    return out.reshape(expected.shape)


def dense_eigenvalues_padded(M: Tensor, n_out: int) -> Tensor:
    """The eigenvalues of the dense square ``M`` (..., n, n) as a multiset of size ``n_out``:
    the ``n_out`` of largest modulus when ``n_out < n`` (the rest are zeros of ``A @ B``), padded
    with zeros when ``n_out > n``."""
    ev = torch.linalg.eigvals(M)
    n = ev.shape[-1]
    if n_out > n:
        ev = torch.cat([ev, ev.new_zeros((*ev.shape[:-1], n_out - n))], -1)
    else:
        order = ev.abs().argsort(-1, descending=True)
        ev = torch.gather(ev, -1, order)[..., :n_out]
    return ev


# --- hypothesis strategies ------------------------------------------------------------------------
@st.composite
def factor_specs(draw, square: bool = False, max_dim: int = 8, rank_deficient: bool = True):
    """``(a_shape, b_shape, rank, seed)``: dims 1..max_dim, 0..2 leading dims that broadcast
    (each factor may hold a dim as 1 or lack leading dims altogether), optionally a rank-deficient A."""
    ldim = draw(st.integers(1, max_dim))
    mdim = draw(st.integers(1, max_dim))
    rdim = ldim if square else draw(st.integers(1, max_dim))
    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    a_lead = [draw(st.sampled_from([b, 1])) for b in batch]
    b_lead = [draw(st.sampled_from([b, 1])) for b in batch]
    a_lead = a_lead[draw(st.integers(0, len(a_lead))):]
    b_lead = b_lead[draw(st.integers(0, len(b_lead))):]
    rank = None
    if rank_deficient and mdim > 1 and draw(st.booleans()):
        rank = draw(st.integers(1, mdim - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    return (*a_lead, ldim, mdim), (*b_lead, mdim, rdim), rank, seed


# --- chains L @ A @ B @ R (OuterFactoredMatrix) -------------------------------------------------
@dataclass(frozen=True)
class Chain:
    """The factors of ``L @ A @ B @ R``: shapes (None: no outer factor on that side), ``tie``
    ``"R=L^T"`` (``R`` is the view ``L.mT``: the QK circuit's ``W_E ... W_E^T``) or ``"L=R^T"`` (``L``
    is ``R.mT``: a tied unembedding), and ``distinct_rows``: ``L`` repeats that many distinct rows
    (an embedding with repeated rows, so a rank-deficient tall factor)."""

    left: tuple[int, ...] | None
    a: tuple[int, ...]
    b: tuple[int, ...]
    right: tuple[int, ...] | None
    tie: str = ""
    distinct_rows: int | None = None

    @property
    def square(self) -> bool:
        n = (self.a if self.left is None else self.left)[-2]
        r = (self.b if self.right is None else self.right)[-1]
        return n == r


def make_chain(chain: Chain, dtype: torch.dtype = torch.float64, seed: int = 0):
    """``(L, A, B, R)`` for ``chain`` (None where absent), drawn in float64 (complex128) and cast."""
    gen = torch.Generator().manual_seed(seed)
    A = randn(*chain.a, dtype=dtype, gen=gen)
    B = randn(*chain.b, dtype=dtype, gen=gen)
    L = R = None
    if chain.left is not None and chain.tie != "L=R^T":
        if chain.distinct_rows is None:
            L = randn(*chain.left, dtype=dtype, gen=gen)
        else:
            *lead, n, p = chain.left
            rows = randn(*lead, chain.distinct_rows, p, dtype=dtype, gen=gen)
            L = rows[..., torch.arange(n) % chain.distinct_rows, :].contiguous()
    if chain.right is not None and chain.tie != "R=L^T":
        R = randn(*chain.right, dtype=dtype, gen=gen)
    if chain.tie == "R=L^T":
        R = L.mT
    elif chain.tie == "L=R^T":
        L = R.mT
    return L, A, B, R


def dense_chain(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None) -> Tensor:
    """``L @ A @ B @ R`` in float64 (complex128) from the exact factor values."""
    r = ref_dtype(A.dtype)
    M = A.to(r) @ B.to(r)
    if L is not None:
        M = L.to(r) @ M
    if R is not None:
        M = M @ R.to(r)
    return M


def chain_scale(L: Tensor | None, A: Tensor, B: Tensor, R: Tensor | None) -> Tensor:
    """``|L|_F |A|_F |B|_F |R|_F`` per leading index, float64: bounds ``|L A B R|`` and every
    backward-stable error of a computation through the four factors."""
    r = ref_dtype(A.dtype)
    norms = [torch.linalg.matrix_norm(X.to(r)) for X in (L, A, B, R) if X is not None]
    scale = norms[0]
    for n in norms[1:]:
        scale = scale * n
    return scale.clamp_min(1e-300)
