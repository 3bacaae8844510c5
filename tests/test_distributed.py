"""lowrank_op.distributed on real process groups: gloo workers spawned inside the tests.

One spawn per world size (2 and 3 ranks) runs every check inside the workers (spawning costs
seconds; a check costs milliseconds); each test below then asserts on its own group of checks.
Checks never raise inside a worker (a rank that stops while the others wait in a collective would
hang the group): failures are recorded and written to a result file per rank, and an unexpected
exception is written to an error file before the worker exits (gloo then fails the others fast).
The spawning test polls with a deadline and kills stragglers.

Every result is compared with one process's :class:`lowrank_op.FactoredMatrix` of the full factors
and with the dense product in float64, to within ``TOL_EPS`` units of the dtype's eps relative to
``|A|_F |B|_F`` (the size of every backward-stable error).
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import dense, match_multiset, scale_of
from lowrank_op import FactoredMatrix, choices, kernels, shared_bases
from lowrank_op import distributed as D

#: Tolerances in units of eps, relative to |A|_F |B|_F: QR, SVD and products are backward stable
#: with constants of order the dims (at most 16 here); eigenvalues carry their condition number too.
TOL_EPS = 200
EIG_TOL_EPS = 500
#: Overall limit for one spawned group, start-up included; collectives time out after 60 s.
DEADLINE_S = 150
M = 4  # mdim of the general cases
#: Row / column partitions per world size: a rank with fewer rows than mdim and one with none.
PARTS = {2: {"rows": [3, 6], "cols": [0, 7], "square": [2, 7]},
         3: {"rows": [0, 2, 7], "cols": [5, 0, 2], "square": [4, 0, 5]}}


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(kernels.compute_dtype(dtype)).eps


# --- Comparisons (local; they raise AssertionError, which the worker records) -------------------
def _close(actual: torch.Tensor, expected: torch.Tensor, scale, dtype: torch.dtype, what: str, units: int = TOL_EPS):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ref = torch.complex128 if (actual.is_complex() or expected.is_complex()) else torch.float64
    err = (actual.to(ref) - expected.to(ref)).abs()
    scale = torch.as_tensor(scale, dtype=torch.float64)
    bound = units * _eps(dtype) * scale.reshape(scale.shape + (1,) * (err.dim() - scale.dim()))
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1, f"{what}: error {worst:.3g} times the tolerance ({units} eps * scale, {dtype})"


def _ref(X: torch.Tensor) -> torch.Tensor:
    """``X`` in the reference dtype: complex128 for complex tensors, else float64."""
    return X.cpu().to(torch.complex128 if X.is_complex() else torch.float64)


def _orthonormal(X: torch.Tensor, dtype: torch.dtype, what: str):
    X = _ref(X)
    eye = torch.eye(X.shape[-1], dtype=X.dtype).expand(*X.shape[:-2], -1, -1)
    _close(X.mH @ X, eye, 1.0, dtype, f"{what} orthonormality")


def _multiset(actual: torch.Tensor, expected: torch.Tensor, scale, dtype, what):
    _close(match_multiset(actual.cpu(), expected.cpu()), expected.cpu().to(torch.complex128), scale, dtype, what,
           EIG_TOL_EPS)


class _Checker:
    """Records failures by group instead of raising, so every rank runs the same collectives."""

    def __init__(self):
        self.failures: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}
        self.data: dict[str, object] = {}

    @contextlib.contextmanager
    def expect(self, group: str, what: str):
        """A block of local assertions (no collectives inside: a failure skips the rest)."""
        self.counts[group] = self.counts.get(group, 0) + 1
        try:
            yield
        except Exception as exc:  # noqa: BLE001  (recorded, reported by the test)
            self.failures.setdefault(group, []).append(f"{what}: {type(exc).__name__}: {exc}\n"
                                                       f"{traceback.format_exc(limit=4)}")

    def raises(self, group: str, what: str, exc: type, pattern: str, fn):
        """``fn()`` (collectives allowed) must raise ``exc`` matching ``pattern`` on this rank."""
        self.counts[group] = self.counts.get(group, 0) + 1
        try:
            fn()
        except exc as err:
            if not re.search(pattern, str(err)):
                self.failures.setdefault(group, []).append(f"{what}: message {str(err)!r} lacks {pattern!r}")
            return str(err)
        except Exception as err:  # noqa: BLE001
            self.failures.setdefault(group, []).append(
                f"{what}: raised {type(err).__name__}: {err}, not {exc.__name__}")
            return None
        self.failures.setdefault(group, []).append(f"{what}: did not raise {exc.__name__}")
        return None


class _Ctx:
    def __init__(self, rank: int, n: int, device: torch.device, checker: _Checker):
        self.rank, self.n, self.device, self.ck = rank, n, device, checker

    def gathered(self, X: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``X`` (test-side only: not through the library)."""
        out = [None] * self.n
        dist.all_gather_object(out, X.detach().cpu())
        return out

    def rows(self, X: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        start = sum(sizes[:self.rank])
        return X[..., start:start + sizes[self.rank], :].to(self.device)

    def cols(self, X: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        start = sum(sizes[:self.rank])
        return X[..., start:start + sizes[self.rank]].to(self.device)


def _randn(*shape, dtype=torch.float64, seed=0, rank=None):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_complex:
        real = kernels._real_dtype(dtype)
        return torch.complex(_randn(*shape, dtype=real, seed=seed, rank=rank),
                             _randn(*shape, dtype=real, seed=seed + 99))
    if rank is None:
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    *lead, n, m = shape
    return (torch.randn(*lead, n, rank, generator=g, dtype=torch.float64)
            @ torch.randn(*lead, rank, m, generator=g, dtype=torch.float64)).to(dtype)


# --- The checks, run inside every worker ---------------------------------------------------------
def _check_product(ctx: _Ctx, A_full, B_full, rows, cols, dtype, label, square=False):
    """Every result of a ShardedFactoredMatrix of these shards against FactoredMatrix and dense float64."""
    ck = ctx.ck
    fm = D.ShardedFactoredMatrix(ctx.rows(A_full, rows), ctx.cols(B_full, cols))
    ref = FactoredMatrix(A_full, B_full)
    M64, scale = dense(A_full, B_full), scale_of(A_full, B_full)
    S, norm = fm.S, fm.norm()
    U_local, S2, V_local = fm.svd()
    x = _randn(*B_full.shape[:-2], B_full.shape[-1], 3, dtype=dtype, seed=7)
    y = _randn(*A_full.shape[:-2], A_full.shape[-2], 2, dtype=dtype, seed=8)
    Mx, yM = fm @ ctx.rows(x, cols), fm.rmatmul(ctx.rows(y, rows))
    v = _randn(B_full.shape[-1], dtype=dtype, seed=9)
    Mv = fm.matmul(ctx.cols(v[None], cols)[0])
    Us, Vs, Ss = ctx.gathered(U_local), ctx.gathered(V_local), ctx.gathered(S)
    Mxs, yMs = ctx.gathered(Mx), ctx.gathered(yM)
    if square:
        eig, tr = fm.eigenvalues, fm.trace()
        eigs = ctx.gathered(eig)
    k = min(M64.shape[-2], A_full.shape[-1], M64.shape[-1])
    with ck.expect("product", f"{label}: shape and dtype"):
        assert fm.shape == M64.shape and fm.mdim == A_full.shape[-1] and fm.dtype == dtype, (fm.shape, fm.mdim)
        assert S.dtype == kernels._real_dtype(dtype) and S.shape == (*M64.shape[:-2], k), (S.dtype, S.shape)
        assert fm.row_sizes == rows and fm.col_sizes == cols
    with ck.expect("product", f"{label}: S, norm"):
        _close(S, ref.S, scale[..., None], dtype, "S vs FactoredMatrix")
        _close(S, torch.linalg.svdvals(M64)[..., :k], scale[..., None], dtype, "S vs dense")
        _close(norm, ref.norm(), scale, dtype, "norm vs FactoredMatrix")
        _close(norm, torch.linalg.matrix_norm(M64), scale, dtype, "norm vs dense")
        assert all(torch.equal(s, Ss[0]) for s in Ss), "S differs across ranks"
        assert torch.equal(S, S2), "svd()'s S differs from svdvals()"
    with ck.expect("product", f"{label}: svd"):
        U, V = torch.cat(Us, -2), torch.cat(Vs, -2)
        assert U.shape == (*M64.shape[:-2], M64.shape[-2], k) and V.shape == (*M64.shape[:-2], M64.shape[-1], k)
        recon = (_ref(U) * S.cpu().to(torch.float64).to(M64.dtype)[..., None, :]) @ _ref(V).mH
        _close(recon, M64, scale[..., None, None], dtype, "U diag(S) V^H")
        _orthonormal(U, dtype, "U")
        _orthonormal(V, dtype, "V")
    with ck.expect("product", f"{label}: matmul, rmatmul"):
        _close(torch.cat(Mxs, -2), M64 @ _ref(x), scale[..., None, None] * x.norm(), dtype, "M @ x")
        _close(Mv, ctx.rows((M64 @ _ref(v))[..., None], rows)[..., 0], scale * v.norm(), dtype, "M @ v")
        _close(torch.cat(yMs, -1), _ref(y).mH @ M64, scale[..., None, None] * y.norm(), dtype, "y^H M")
    if square:
        with ck.expect("square", f"{label}: eigenvalues, trace"):
            _multiset(eig, ref.eigenvalues, scale[..., None], dtype, "eigenvalues vs FactoredMatrix")
            BA = _ref(B_full) @ _ref(A_full)
            _multiset(eig, torch.linalg.eigvals(BA), scale[..., None], dtype, "eigenvalues vs dense B A")
            _close(tr, ref.trace(), scale, dtype, "trace vs FactoredMatrix")
            _close(tr, torch.diagonal(M64, dim1=-2, dim2=-1).sum(-1), scale, dtype, "trace vs dense")
            assert all(torch.equal(e, eigs[0]) for e in eigs), "eigenvalues differ across ranks"


def _products(ctx: _Ctx):
    part = PARTS[ctx.n]
    for dtype in (torch.float64, torch.float32):
        A, B = _randn(9, M, dtype=dtype, seed=1), _randn(M, 7, dtype=dtype, seed=2)
        _check_product(ctx, A, B, part["rows"], part["cols"], dtype, f"plain {dtype}")
        A = _randn(2, 9, M, dtype=dtype, seed=3, rank=2)  # batch (2,), rank-deficient
        _check_product(ctx, A, B, part["rows"], part["cols"], dtype, f"batch, rank-deficient A, {dtype}")
        sq = part["square"]
        A, B = _randn(2, 9, M, dtype=dtype, seed=4), _randn(2, M, 9, dtype=dtype, seed=5)
        _check_product(ctx, A, B, sq, sq, dtype, f"square batch {dtype}", square=True)
        A = _randn(9, M, dtype=dtype, seed=6, rank=3)
        _check_product(ctx, A, B[0], sq, sq, dtype, f"square rank-deficient {dtype}", square=True)


def _product_variants(ctx: _Ctx):
    part = PARTS[ctx.n]
    A, B = _randn(9, M, dtype=torch.complex128, seed=13), _randn(M, 7, dtype=torch.complex128, seed=14)
    _check_product(ctx, A, B, part["rows"], part["cols"], torch.complex128, "complex128")
    A, B = _randn(9, M, dtype=torch.complex128, seed=15), _randn(M, 9, dtype=torch.complex128, seed=16)
    _check_product(ctx, A, B, part["square"], part["square"], torch.complex128, "complex128 square", square=True)
    # CholeskyQR2 through the product (its final Q is lifted, not a block of Q_2), and 16-bit factors.
    A, B = _randn(40, M, seed=17), _randn(M, 30, seed=18)
    sizes_A = [10, 30] if ctx.n == 2 else [0, 25, 15]
    sizes_B = [30, 0] if ctx.n == 2 else [10, 10, 10]
    fm = D.ShardedFactoredMatrix(ctx.rows(A, sizes_A), ctx.cols(B, sizes_B))
    with choices.recorded() as log:
        S_c, (U_c, _, V_c), S_t = fm.svdvals(method="cholqr2"), fm.svd(method="cholqr2"), fm.svdvals(method="tsqr")
    U, V = torch.cat(ctx.gathered(U_c), -2), torch.cat(ctx.gathered(V_c), -2)
    half = D.ShardedFactoredMatrix(ctx.rows(A, sizes_A).bfloat16(), ctx.cols(B, sizes_B).bfloat16())
    S_h, norm_h = half.S, half.norm()
    with ctx.ck.expect("product", "cholqr2 through the product; bfloat16"):
        assert not any("fell back" in c.reason for c in log), [str(c) for c in log]
        sc = scale_of(A, B)
        _close(S_c, S_t, sc, torch.float64, "cholqr2 S vs tsqr S")
        _close((U * S_c) @ V.mH, dense(A, B), sc, torch.float64, "cholqr2 U diag(S) V^H")
        _orthonormal(U, torch.float64, "cholqr2 U")
        Ah, Bh = A.bfloat16(), B.bfloat16()
        assert S_h.dtype == torch.float32, S_h.dtype
        _close(S_h, FactoredMatrix(Ah, Bh).S, scale_of(Ah, Bh), torch.float32, "bfloat16 S (computed in float32)")
        _close(norm_h, torch.linalg.matrix_norm(dense(Ah, Bh)), scale_of(Ah, Bh), torch.float32, "bfloat16 norm")
    # One factor replicated: it is factorised locally, the other by TSQR.
    A, B = _randn(9, M, seed=10), _randn(M, 7, seed=11)
    fm = D.ShardedFactoredMatrix(A.to(ctx.device), ctx.cols(B, part["cols"]), layouts=("replicate", "shard"))
    with D.count_bytes() as sent:
        S = fm.S
    x = _randn(7, 2, seed=12)
    Mx = fm @ ctx.rows(x, part["cols"])
    with ctx.ck.expect("product", "replicated A"):
        _close(S, FactoredMatrix(A, B).S, scale_of(A, B), torch.float64, "S")
        _close(Mx, dense(A, B) @ x, scale_of(A, B) * x.norm(), torch.float64, "M @ x")
        assert "tsqr:A" not in sent.by_part and sent.by_part["tsqr:B^H"] == M * M * 8, sent.by_part
    # Square with B replicated: each rank takes the columns of B that meet its rows of A.
    B = _randn(M, 9, seed=19)
    sq = part["square"]
    fm = D.ShardedFactoredMatrix(ctx.rows(A, sq), B.to(ctx.device), layouts=("shard", "replicate"))
    eig, tr = fm.eigenvalues, fm.trace()
    with ctx.ck.expect("square", "replicated B"):
        ref = FactoredMatrix(A, B)
        _multiset(eig, ref.eigenvalues, scale_of(A, B), torch.float64, "eigenvalues")
        _close(tr, ref.trace(), scale_of(A, B), torch.float64, "trace")


def _tsqr_checks(ctx: _Ctx):
    ck, part = ctx.ck, PARTS[ctx.n]
    for dtype in (torch.float64, torch.float32):
        for rank_def in (None, 2):
            X = _randn(2, 9, M, dtype=dtype, seed=20, rank=rank_def)
            Q_local, R = D.tsqr(ctx.rows(X, part["rows"]))
            _, R_only = D.tsqr(ctx.rows(X, part["rows"]), want_q=False)
            Qs, Rs = ctx.gathered(Q_local), ctx.gathered(R)
            with ck.expect("tsqr", f"TSQR {dtype}, rank {rank_def}"):
                Q, scale = torch.cat(Qs, -2), torch.linalg.matrix_norm(X.to(torch.float64))[..., None, None]
                _close(Q.to(torch.float64) @ R.cpu().to(torch.float64), X, scale, dtype, "Q R")
                _orthonormal(Q, dtype, "Q")  # also when X is rank-deficient: the padding is not in the stacked matrix
                assert torch.equal(torch.triu(R), R), "R is not upper triangular"
                assert all(torch.equal(r, Rs[0]) for r in Rs), "R differs across ranks"
                assert torch.equal(R_only, R), "R without Q differs from R with Q"
    # Fewer global rows than columns: Q square, R trapezoidal.
    X = _randn(3, 5, seed=21)
    sizes = [1, 2] if ctx.n == 2 else [0, 1, 2]
    Q_local, R = D.tsqr(ctx.rows(X, sizes))
    Q = torch.cat(ctx.gathered(Q_local), -2)
    with ck.expect("tsqr", "wide X"):
        assert R.shape == (3, 5) and Q.shape == (3, 3)
        _close(Q @ R, X, X.norm(), torch.float64, "Q R")
    # CholeskyQR2: accurate when well-conditioned, falls back to TSQR (recorded) when not.
    X = _randn(40, M, seed=22)
    sizes = [10, 30] if ctx.n == 2 else [0, 25, 15]
    with choices.recorded() as log, D.count_bytes() as sent:
        Q_local, R = D.tsqr(ctx.rows(X, sizes), method="cholqr2")
    Q, Rs = torch.cat(ctx.gathered(Q_local), -2), ctx.gathered(R)
    with ck.expect("cholqr2", "well-conditioned"):
        assert not any("fell back" in c.reason for c in log), [str(c) for c in log]
        _close(Q @ R, X, X.norm(), torch.float64, "Q R")
        _orthonormal(Q, torch.float64, "Q")
        assert all(torch.equal(r, Rs[0]) for r in Rs)
        # two Gram matrices gathered; rank 0 broadcasts two R factors and their verdicts
        assert sent.by_part["cholqr2:X"] == 2 * M * M * 8 + (2 * (M * M + 2) * 8 if ctx.rank == 0 else 0), sent.by_part
    X = _randn(40, M, seed=23, rank=2)
    with choices.recorded() as log:
        Q_local, R = D.tsqr(ctx.rows(X, sizes), method="cholqr2")
    Q = torch.cat(ctx.gathered(Q_local), -2)
    with ck.expect("cholqr2", "rank-deficient falls back"):
        assert [c.method for c in log if "fell back" in c.reason] == ["tsqr"], [str(c) for c in log]
        _close(Q @ R, X, X.norm(), torch.float64, "Q R")
        _orthonormal(Q, torch.float64, "Q")
    with choices.recorded() as log:
        D.tsqr(ctx.rows(X, sizes), want_q=False)
    with ck.expect("cholqr2", "auto records TSQR"):
        assert [(c.operation, c.method) for c in log] == [("distributed_qr", "tsqr")], [str(c) for c in log]


def _byte_checks(ctx: _Ctx):
    """TSQR's bytes grow with mdim^2 and the ranks, not with the rows."""
    figures = {}
    for rows, m in ((100, 8), (10000, 8), (10000, 16)):
        X = _randn(rows, m, seed=30)
        sizes = [rows // ctx.n] * ctx.n
        sizes[-1] += rows - sum(sizes)
        with D.count_bytes() as sent:
            D.tsqr(ctx.rows(X, sizes))
        figures[f"{rows}x{m}"] = {"total": sent.total, "by_part": dict(sent.by_part), "by_op": dict(sent.by_op)}
    ctx.ck.data["bytes"] = figures
    with ctx.ck.expect("bytes", "tsqr bytes"):
        payload = {k: f["total"] - f["by_part"]["check"] for k, f in figures.items()}
        assert payload["100x8"] == payload["10000x8"], payload
        assert payload["10000x16"] == 4 * payload["10000x8"], payload
        for key, m in (("10000x8", 8), ("10000x16", 16)):
            f = figures[key]
            assert f["by_op"]["gather"] == m * m * 8, f
            K, p = ctx.n * m, m
            assert f["by_op"].get("broadcast", 0) == ((K * p + p * m) * 8 if ctx.rank == 0 else 0), f
            assert f["by_part"]["check"] == (3 + D.MAX_DIMS) * 8, f
    # The product: two pieces gathered, k singular values broadcast.
    A, B = _randn(1000, 8, seed=31), _randn(8, 1000, seed=32)
    sizes = [1000 // ctx.n] * ctx.n
    sizes[-1] += 1000 - sum(sizes)
    fm = D.ShardedFactoredMatrix(ctx.rows(A, sizes), ctx.cols(B, sizes))
    with D.count_bytes() as outer, D.count_bytes() as sent:
        fm.svdvals()
    with D.count_bytes() as sent_mm:
        fm @ ctx.rows(_randn(1000, 3, seed=33), sizes)
    with ctx.ck.expect("bytes", "product bytes"):
        assert outer.total == sent.total, "nested counters differ"
        assert sent.by_part == {"tsqr:A": 512, "tsqr:B^H": 512, **({"core": 64} if ctx.rank == 0 else {})}, sent.by_part
        assert sent_mm.by_part == {"check": (3 + D.MAX_DIMS) * 8, "matmul": 8 * 3 * 8}, sent_mm.by_part


def _dtensor_checks(ctx: _Ctx):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh(ctx.device.type, (ctx.n,))
    ck = ctx.ck
    A, B = _randn(2, 9, M, seed=40), _randn(M, 9, seed=41)
    dA, dB = distribute_tensor(A, mesh, [Shard(1)]), distribute_tensor(B, mesh, [Shard(1)])
    fm_d = D.ShardedFactoredMatrix(dA, dB)
    fm_p = D.ShardedFactoredMatrix(dA.to_local(), dB.to_local())
    got = [fm_d.S, fm_d.norm(), *fm_d.svd(), fm_d.eigenvalues, fm_d.trace()]
    want = [fm_p.S, fm_p.norm(), *fm_p.svd(), fm_p.eigenvalues, fm_p.trace()]
    _, R_d = D.tsqr(dA)
    _, R_p = D.tsqr(dA.to_local())
    with ck.expect("dtensor", "DTensor shards give the plain shards' results"):
        assert fm_d.layouts == ("shard", "shard") and fm_d.group is dist.group.WORLD
        for g, w in zip(got, want):
            assert torch.equal(g, w), "DTensor and plain results differ"
        assert torch.equal(R_d, R_p)
        _close(got[0], FactoredMatrix(A, B).S, scale_of(A, B)[..., None], torch.float64, "S vs FactoredMatrix")
    # Heads-sharded (a leading dim) and replicated factors are factorised locally: no traffic.
    H = ctx.n + 1
    A_h, B_h = _randn(H, 9, M, seed=42), _randn(H, M, 7, seed=43)
    hA, hB = distribute_tensor(A_h, mesh, [Shard(0)]), distribute_tensor(B_h, mesh, [Shard(0)])
    with D.count_bytes() as sent, choices.recorded() as log:
        fm_h = D.ShardedFactoredMatrix(hA, hB)
        S_h, (Q_h, R_h) = fm_h.S, D.tsqr(hA)
        _, R_rep = D.tsqr(distribute_tensor(A, mesh, [Replicate()]))
    local = FactoredMatrix(hA.to_local(), hB.to_local())
    with ck.expect("dtensor", "heads-sharded: local, no collective"):
        assert fm_h.layouts == ("batch", "batch"), fm_h.layouts
        assert sent.total == 0 and sent.calls == 0, (sent.total, sent.calls)
        assert any(c.method == "local" for c in log), [str(c) for c in log]
        _close(S_h, local.S, scale_of(hA.to_local(), hB.to_local())[..., None], torch.float64, "S of local heads")
        _close(Q_h @ R_h, hA.to_local(), 1.0 * A_h.norm(), torch.float64, "local Q R")
        _close(R_rep.mH @ R_rep, A.mH @ A, A.norm() ** 2, torch.float64, "replicated R")
    # A shared row-sharded A and heads-sharded B: TSQR traffic for A only.
    heads = [len(c) for c in torch.arange(H).chunk(ctx.n)] + [0] * ctx.n
    start = sum(heads[:ctx.rank])
    B_mine = B_h[start:start + heads[ctx.rank]]
    fm_m = D.ShardedFactoredMatrix(ctx.rows(A[0], PARTS[ctx.n]["rows"]), B_mine, layouts=("shard", "batch"))
    with D.count_bytes() as sent:
        S_m, norm_m = fm_m.S, fm_m.norm()
        U_m, S_m2, V_m = fm_m.svd()
    Us = ctx.gathered(U_m)
    ref = FactoredMatrix(A[0], B_mine)
    with ck.expect("dtensor", "row-sharded A with heads-sharded B"):
        assert "tsqr:B^H" not in sent.by_part and sent.by_op["gather"] == 3 * M * M * 8, sent.by_part
        sc = scale_of(A[0], B_mine)
        _close(S_m, ref.S, sc[..., None], torch.float64, "S")
        _close(norm_m, ref.norm(), sc, torch.float64, "norm")
        _close(S_m2, ref.S, sc[..., None], torch.float64, "svd S")
        if heads[ctx.rank]:
            _orthonormal(V_m, torch.float64, "V of local heads")
    with ck.expect("dtensor", "row-sharded A with heads-sharded B: U"):
        # every rank holds U's rows for its own heads; the rows of rank r's heads are on every rank
        assert U_m.shape == (heads[ctx.rank], PARTS[ctx.n]["rows"][ctx.rank], min(M, 7))
    # Placements that are not read.
    ck.raises("dtensor", "inner-dim shard", ValueError, r"inner dim mdim.*redistribute",
              lambda: D.ShardedFactoredMatrix(distribute_tensor(A[0], mesh, [Shard(1)]), dB))
    ck.raises("dtensor", "layout conflict", ValueError, r"`layouts` says 'replicate'",
              lambda: D.ShardedFactoredMatrix(dA, dB, layouts=("replicate", "shard")))


def _nan_checks(ctx: _Ctx):
    part = PARTS[ctx.n]["square"]
    A, B = _randn(9, M, seed=50), _randn(M, 9, seed=51)
    A[sum(part[:-1])] = float("nan")  # a row on the last rank
    fm = D.ShardedFactoredMatrix(ctx.rows(A, part), ctx.cols(B, part))
    S, norm, (U, S2, V), eig, tr = fm.S, fm.norm(), fm.svd(), fm.eigenvalues, fm.trace()
    Q, R = D.tsqr(ctx.rows(A, part))
    with choices.recorded():
        _, R_c = D.tsqr(ctx.rows(A, part), method="cholqr2", want_q=False)
    with ctx.ck.expect("nan", "NaN input gives NaN results on every rank"):
        for name, X in (("S", S), ("norm", norm), ("svd S", S2), ("V", V), ("eigenvalues", eig), ("trace", tr),
                        ("R", R), ("cholqr2 R", R_c)):
            assert bool(torch.isnan(X).all()), f"{name} is not NaN: {X}"


def _error_checks(ctx: _Ctx):
    ck, n, last = ctx.ck, ctx.n, ctx.n - 1
    part = PARTS[n]
    A, B = _randn(9, M, seed=60), _randn(M, 7, seed=61)
    A_r, B_r = ctx.rows(A, part["rows"]), ctx.cols(B, part["cols"])
    # A bad factor on one rank: every rank raises, the others naming that rank.
    bad_B = _randn(M + 1, B_r.shape[-1], seed=62) if ctx.rank == last else B_r
    pattern = r"must share the inner dim" if ctx.rank == last else rf"rank {last} of {n} rejected its input"
    ck.raises("errors", "inner dims on one rank", ValueError, pattern, lambda: D.ShardedFactoredMatrix(A_r, bad_B))
    bad_A = A_r.tolist() if ctx.rank == 0 else A_r
    pattern = r"must be a torch.Tensor.*got list" if ctx.rank == 0 else r"rank 0 of .* rejected"
    ck.raises("errors", "not a tensor on rank 0", TypeError, pattern, lambda: D.ShardedFactoredMatrix(bad_A, B_r))
    # Factors that fit on each rank but not across ranks.
    m = M + (ctx.rank == last)
    ck.raises("errors", "mdim across ranks", ValueError, r"`A_local` \('shard'\) must agree across ranks",
              lambda: D.ShardedFactoredMatrix(_randn(3, m), _randn(m, 2)))
    ck.raises("errors", "dtype across ranks", TypeError, r"one dtype on every rank",
              lambda: D.tsqr(A_r.float() if ctx.rank == 0 else A_r))
    ck.raises("errors", "1-D X on one rank", ValueError, r"rank|2 to 8 dims",
              lambda: D.tsqr(A_r[0] if ctx.rank == last else A_r))
    # Eigenvalues and traces need B's column partition to be A's row partition.
    sq = part["square"]
    Bsq = _randn(M, 9, seed=63)
    fm = D.ShardedFactoredMatrix(ctx.rows(A, sq), ctx.cols(Bsq, sq[::-1]))
    sizes = re.escape(f"A rows {sq}, B columns {sq[::-1]}")
    ck.raises("errors", "eigenvalues partition", ValueError, sizes, lambda: fm.eigenvalues)
    ck.raises("errors", "trace partition", ValueError, sizes, lambda: fm.trace())
    fm_rect = D.ShardedFactoredMatrix(A_r, B_r)
    ck.raises("errors", "not square", ValueError, r"square product", lambda: fm_rect.eigenvalues)
    # Operands: checked on every rank together.
    x = _randn(B_r.shape[-1] + (ctx.rank == last), 2, seed=64)
    pattern = r"must have shape \(\.\.\., \d+, k\)" if ctx.rank == last else rf"rank {last} of {n} rejected"
    ck.raises("errors", "matmul rows", ValueError, pattern, lambda: fm_rect @ x)
    ck.raises("errors", "matmul dtype", TypeError, r"dtype", lambda: fm_rect @ _randn(B_r.shape[-1], 2).float())
    ck.raises("errors", "matmul k across ranks", ValueError, r"same dims on every rank",
              lambda: fm_rect @ _randn(B_r.shape[-1], 2 + ctx.rank))
    ck.raises("errors", "method", ValueError, r"`method` must be one of 'auto', 'tsqr', 'cholqr2'",
              lambda: fm_rect.svdvals(method="householder"))
    ck.raises("errors", "layouts", ValueError, r"`layouts` must be one of",
              lambda: D.ShardedFactoredMatrix(A_r, B_r, layouts=("rows", "shard")))
    # The group still works after all of that.
    with ck.expect("errors", "group usable after errors"):
        _close(fm_rect.S, FactoredMatrix(A, B).S, scale_of(A, B), torch.float64, "S")


def _outer_checks(ctx: _Ctx):
    ck, sq = ctx.ck, PARTS[ctx.n]["square"]
    L, R = _randn(9, 5, seed=70), _randn(5, 9, seed=71)  # W_E (d_vocab x d_model), W_U (d_model x d_vocab)
    A, B = _randn(3, 5, 2, seed=72), _randn(3, 2, 5, seed=73)  # three heads' W_V, W_O
    red = D.sharded_outer_reduction(ctx.rows(L, sq), ctx.cols(R, sq))
    ref = shared_bases.reduce_outer(L, R)
    L_local = ctx.rows(L, sq)
    red_m = D.sharded_outer_reduction(L_local, L_local.mH)
    red_open = D.sharded_outer_reduction(ctx.rows(L, sq), ctx.cols(R, sq[::-1]), closing=False)
    lefts = ctx.gathered(red.left)
    full = dense(L, A) @ dense(B, R)  # L A B R, float64
    scale = torch.linalg.matrix_norm(full)
    with ck.expect("outer", "sharded_outer_reduction"):
        assert isinstance(red, shared_bases.OuterReduction) and not red.mirrored
        _close(red.left.mH @ red.left, L.mH @ L, L.norm() ** 2, torch.float64, "R_L^H R_L")
        _close(red.right @ red.right.mH, R @ R.mH, R.norm() ** 2, torch.float64, "R_R^H R_R")
        _close(red.closing, ref.closing, L.norm() * R.norm(), torch.float64, "closing R L")
        assert all(torch.equal(x, lefts[0]) for x in lefts)
        X, Y = red.core(A, B)
        _close(kernels.svdvals(X, Y), torch.linalg.svdvals(full)[..., :2], scale[..., None], torch.float64, "core S")
        _multiset(kernels.eigvals(*red.cycle(A, B)), kernels.eigvals(*ref.cycle(A, B)), scale[..., None],
                  torch.float64, "cycle eigenvalues")
        assert red_m.mirrored and red_m.closing is None and torch.equal(red_m.right, red_m.left.mH)
        assert red_open.closing is None and torch.equal(red_open.left, red.left)
    ck.raises("outer", "closing partition", ValueError, re.escape(f"L rows {sq}, R columns {sq[::-1]}"),
              lambda: D.sharded_outer_reduction(ctx.rows(L, sq), ctx.cols(R, sq[::-1])))


#: The checks by name; the NCCL run takes those whose tensors all live on the device.
_CHECKS = {"products": _products, "variants": _product_variants, "tsqr": _tsqr_checks, "bytes": _byte_checks,
           "nan": _nan_checks, "errors": _error_checks, "outer": _outer_checks, "dtensor": _dtensor_checks}
_NCCL_CHECKS = ("products", "bytes", "nan")
_NCCL_GROUPS = ("product", "square", "bytes", "nan")


def _worker(rank: int, n: int, port: int, out_dir: str, backend: str):
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=n,
                                timeout=timedelta(seconds=60))
        checker = _Checker()
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        ctx = _Ctx(rank, n, device, checker)
        for name in (_CHECKS if backend == "gloo" else _NCCL_CHECKS):
            _CHECKS[name](ctx)
        dist.barrier()
        result = {"failures": checker.failures, "counts": checker.counts, "data": checker.data}
        (out / f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --- Spawning ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(n: int, out_dir: Path, backend: str = "gloo") -> list[dict]:
    """Run ``_worker`` on ``n`` ranks; every rank's result, or an assertion naming the failures."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_worker, args=(n, _free_port(), str(out_dir), backend), nprocs=n, join=False,
                             start_method="spawn")
    deadline, problem = time.monotonic() + DEADLINE_S, None
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                problem = f"the {n} workers did not finish within {DEADLINE_S} s"
                break
    except Exception as exc:  # noqa: BLE001  (ProcessRaisedException, ProcessExitedException)
        problem = f"a worker failed: {type(exc).__name__}"
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    errors = {p.name: p.read_text() for p in sorted(out_dir.glob("rank*.err"))}
    if problem or errors:
        details = "\n".join(f"--- {name}\n{text}" for name, text in errors.items())
        raise AssertionError(f"{problem or 'worker errors'}\n{details}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(n)]


_GROUPS = ("product", "square", "tsqr", "cholqr2", "bytes", "nan", "errors", "outer", "dtensor")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def world(request, tmp_path_factory):
    started = time.monotonic()
    results = _spawn(request.param, tmp_path_factory.mktemp(f"dist{request.param}"))
    return {"n": request.param, "results": results, "seconds": time.monotonic() - started}


def _assert_group(world: dict, group: str):
    for rank, result in enumerate(world["results"]):
        assert result["counts"].get(group, 0) > 0, f"rank {rank} ran no {group!r} checks"
        failures = result["failures"].get(group, [])
        assert not failures, f"rank {rank} of {world['n']}, {len(failures)} failure(s):\n" + "\n".join(failures)


@pytest.mark.parametrize("group", _GROUPS)
def test_distributed_checks(world, group):
    """Each group of checks passed on every rank (see the ``_..._checks`` functions above)."""
    _assert_group(world, group)


def test_tsqr_bytes_do_not_grow_with_rows(world):
    n = world["n"]
    for rank, result in enumerate(world["results"]):
        figures = result["data"]["bytes"]
        payload = {k: f["total"] - f["by_part"]["check"] for k, f in figures.items()}
        assert payload["100x8"] == payload["10000x8"]
        root = (n * 8 * 8 + 8 * 8) * 8 if rank == 0 else 0
        assert payload["10000x8"] == 8 * 8 * 8 + root, (rank, payload)
    print(f"{n} ranks, TSQR bytes sent per rank:", [r["data"]["bytes"] for r in world["results"]],
          f"({world['seconds']:.1f} s)")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices for an NCCL group")
def test_nccl(tmp_path):
    results = _spawn(2, tmp_path, backend="nccl")
    for group in _NCCL_GROUPS:
        _assert_group({"n": 2, "results": results}, group)


def test_not_initialised_and_lazy_import():
    """Without a process group the module says what to call; ``import lowrank_op`` does not load it."""
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    with pytest.raises(RuntimeError, match=r"init_process_group"):
        D.tsqr(torch.randn(4, 2))
    with pytest.raises(RuntimeError, match=r"init_process_group"):
        D.ShardedFactoredMatrix(torch.randn(4, 2), torch.randn(2, 3))
    code = "import sys, lowrank_op; print('lowrank_op.distributed' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
