"""Top-k singular values and eigenvalues of ``A @ B`` (:mod:`lowrank_op.topk`): each method beside
the exact factored path (issue #3).

Factors are float32, ``ldim = rdim = 20000``, ``k = 10``, 2 threads. Two spectra, both seeded:

- ``decaying``: ``A = randn(ldim, mdim) / sqrt(ldim)`` with column ``j`` scaled by ``1 / (j + 1)``,
  ``B = randn(mdim, rdim) / sqrt(rdim)``: singular values fall off like ``1 / j``, the easy case
  for a Krylov solver;
- ``flat``: plain Gaussian ``A``, ``B`` as above: a Marchenko-Pastur-like spectrum whose top values
  are close together, the hard case.

Groups (every case returns the top 10 only):

- ``topk_svdvals[<spectrum>_l20000_m<mdim>]``, ``mdim`` in 256, 512, 768, 1024, 2048, 4000:
  ``topk.svds(..., return_singular_vectors=False)`` with ``method="exact"`` (the baseline: the
  factored ``kernels.svdvals``, truncated), ``"arpack"`` and ``"auto"``; at the largest ``mdim``
  (4000) also ``"propack"``. Read across ``mdim`` this is the sweep that shows where ``auto``
  switches from exact to ARPACK and where ARPACK beats the exact path.
- ``topk_svd[<spectrum>_l20000_m4000]``: the same with vectors, ``exact`` and ``auto`` only.
- ``topk_eigvals[<spectrum>_l20000_m<mdim>]``, ``mdim`` in 256, 1024, 2048: ``topk.eigs`` with
  ``exact`` (baseline: ``kernels.eigvals``, truncated), ``arpack`` and ``auto``.
- ``topk_batched[b2000_l40_m8_k6]``: 2000 small products, all on the exact path: ``loop`` (one
  ``topk.svds`` per matrix, the baseline) against one ``svds`` (with and without vectors) and
  one ``eigs`` on the whole batch.

Cases at ``mdim >= 1024`` run once, unwarmed (an exact case at ``mdim = 4000`` takes 30-60 s);
smaller ones are sized by :func:`bench.common.measure`. A Krylov run that raises
:class:`lowrank_op.scipy_bridge.KrylovFailure` (PROPACK on the flat spectrum, say) is not an error
of the bench: the case records the time to the failure, ``FAILED`` in its label and the message in
``extra_info["failed"]``, and no accuracy.

``extra_info`` of every case (the numbers also show in the summary bench/conftest.py prints):

- ``case``: the summary label; for ``auto`` what it planned and what it ran, e.g.
  ``auto: arpack (budget 2166) -> arpack``; ``baseline: "exact"`` marks the exact case;
- ``kind`` (svds | eigs), ``spectrum``, ``method``, ``vectors``, ``shape`` (``l..._m..._r..._k...``);
- ``top10_max_rel_err``: max relative error of the 10 values against a float64 reference
  computed once per spectrum and shape (``kernels.svdvals(A.double(), B.double())[:10]``; for
  eigenvalues the sorted moduli of ``kernels.eigvals(A.double(), B.double())[:10]`` against the
  sorted moduli of the result); ``UV_max_rel_residual`` (vector cases):
  ``max_i |A B v_i - s_i u_i| / s_i``;
- ``speedup_vs_exact``: median of this group's exact case / this case's median (> 1: faster
  than exact), when the exact case of the group ran earlier in the session (it is the first
  case of each group, so not under a ``-k`` that deselects it);
- ``plan``, ``plan_budget``: what ``topk.plan`` decides for this shape (``"exact"``/None or
  ``"arpack"`` and the application budget), on the Krylov and auto cases;
- Krylov and auto cases: ``applications`` (vectors the solver multiplied by ``A @ B`` or its
  adjoint in the timed call, counted by ``FactoredScipyOperator.applications``; for ``auto`` 0
  when it took the exact path) and ``krylov_outcome`` (``"converged"``, ``"budget exceeded"``,
  ``"failed"`` or None when no Krylov solver ran); ``auto``: ``auto_ran`` (``"exact"``,
  ``"arpack"``, ``"arpack over budget, then exact"``, ``"arpack failed, then exact"``);
  ``arpack``: ``within_auto_budget`` (its applications <= the plan's budget; None when the plan
  is exact).

The counts come from the timed call itself: while a case runs, ``scipy_bridge.FactoredScipyOperator``
is replaced by a subclass that records its instances and ``scipy_bridge.svds``/``eigs`` by wrappers
that record how each Krylov call ended (microseconds per call).

Run from the repository root (on an idle machine; the full run takes about 15-20 minutes on 2
cores, most of it the exact cases and float64 references at ``mdim >= 2048``)::

    python -m pytest bench/bench_topk.py --benchmark-only -p no:cacheprovider \\
        --benchmark-json=topk.json
    python -m bench.bench_topk topk.json      # the sweep as one table per kind and spectrum
    LOWRANK_BENCH_TOPK_SMALL=1 python -m pytest bench/bench_topk.py --benchmark-only  # smoke test

``LOWRANK_BENCH_TOPK_SMALL=1`` shrinks ``ldim = rdim`` to 2000 and ``mdim`` to 64..400 and runs
every case once (a smoke test of the bench, not a measurement: at these shapes ``auto`` always
plans the exact path). ``-k m4000`` runs the main comparison only, ``-k "not svd_vectors"``
skips the (slow) vector cases.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import sys

import pytest
import torch
from torch import Tensor

from bench.common import measure
from lowrank_op import kernels, scipy_bridge, topk

torch.set_num_threads(2)

SMALL = os.environ.get("LOWRANK_BENCH_TOPK_SMALL", "").strip() not in ("", "0")
K = 10
#: ``ldim = rdim`` (square, so the same factors serve the eigenvalue cases).
LDIM = 2000 if SMALL else 20000
SVD_MDIMS = (64, 128, 256, 400) if SMALL else (256, 512, 768, 1024, 2048, 4000)
EIG_MDIMS = (64, 256, 400) if SMALL else (256, 1024, 2048)
#: The shape of the full comparison (PROPACK, vectors): the largest of the sweep.
MAIN_MDIM = SVD_MDIMS[-1]
#: Cases at this ``mdim`` and above run once, unwarmed (all of them with SMALL).
SLOW_MDIM = 1024
SPECTRA = ("decaying", "flat")
SEEDS = {"decaying": 0, "flat": 1}


# --- Factors and float64 references ---------------------------------------------------------------
@functools.lru_cache(maxsize=2)  # at mdim = 4000 a pair is 640 MB
def factors(spectrum: str, mdim: int) -> tuple[Tensor, Tensor]:
    """float32 ``A (LDIM, mdim)`` and ``B (mdim, LDIM)`` of the named spectrum, seeded."""
    gen = torch.Generator().manual_seed(SEEDS[spectrum])
    A = torch.randn(LDIM, mdim, generator=gen)
    if spectrum == "decaying":
        A = A / math.sqrt(LDIM) / torch.arange(1, mdim + 1, dtype=A.dtype)
    B = torch.randn(mdim, LDIM, generator=gen) / math.sqrt(LDIM)
    return A, B


@functools.cache
def reference(kind: str, spectrum: str, mdim: int) -> Tensor:
    """float64 top-K singular values, or top-K eigenvalue moduli (descending), computed once."""
    A, B = factors(spectrum, mdim)
    if kind == "svds":
        return kernels.svdvals(A.double(), B.double())[:K]
    return kernels.eigvals(A.double(), B.double())[:K].abs().sort(descending=True).values


def top_rel_error(kind: str, spectrum: str, mdim: int, values: Tensor) -> float:
    ref = reference(kind, spectrum, mdim)
    values = values.double() if kind == "svds" else values.abs().double().sort(descending=True).values
    return float(((values - ref).abs() / ref).max())


def vector_residual(A: Tensor, B: Tensor, U: Tensor, S: Tensor, V: Tensor) -> float:
    """``max_i |A B v_i - s_i u_i| / s_i``."""
    return float(((A @ (B @ V) - U * S).norm(dim=0) / S).max())


# --- What the Krylov solvers did in the timed call ------------------------------------------------
@dataclasses.dataclass
class KrylovLog:
    """The operators ``scipy_bridge`` built and how each of its Krylov calls ended (None: solved)."""

    operators: list = dataclasses.field(default_factory=list)
    endings: list = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        self.operators.clear()
        self.endings.clear()

    @property
    def applications(self) -> int:
        return sum(op.applications for op in self.operators)

    @property
    def outcome(self) -> str | None:
        if not self.endings:
            return None
        last = self.endings[-1]
        if last is None:
            return "converged"
        return "budget exceeded" if isinstance(last, scipy_bridge.BudgetExceeded) else "failed"


@contextlib.contextmanager
def recording_krylov():
    """Patch ``scipy_bridge`` so that a :class:`KrylovLog` sees its operators and calls."""
    log = KrylovLog()

    class RecordedOperator(scipy_bridge.FactoredScipyOperator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            log.operators.append(self)

    def recorded(solve):
        @functools.wraps(solve)
        def wrapper(*args, **kwargs):
            try:
                result = solve(*args, **kwargs)
            except scipy_bridge.KrylovFailure as error:
                log.endings.append(error)
                raise
            log.endings.append(None)
            return result
        return wrapper

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scipy_bridge, "FactoredScipyOperator", RecordedOperator)
        patch.setattr(scipy_bridge, "svds", recorded(scipy_bridge.svds))
        patch.setattr(scipy_bridge, "eigs", recorded(scipy_bridge.eigs))
        yield log


# --- One case -------------------------------------------------------------------------------------
#: The exact case's median per group, for ``speedup_vs_exact`` of the cases after it.
_EXACT_MEDIANS: dict[str, float] = {}

_EXACT_LABELS = {
    ("svds", False): "exact (factored svdvals, top 10)",
    ("svds", True): "exact (factored svd, top 10)",
    ("eigs", False): "exact (factored eigvals, top 10)",
}


def _auto_ran(outcome: str | None) -> str:
    return {None: "exact", "converged": "arpack", "budget exceeded": "arpack over budget, then exact",
            "failed": "arpack failed, then exact"}[outcome]


def run_case(benchmark, kind: str, spectrum: str, mdim: int, method: str, *, vectors: bool = False):
    """Time ``topk.svds``/``topk.eigs`` on one shape and spectrum and fill ``extra_info``."""
    A, B = factors(spectrum, mdim)
    group = f"topk_{'svd' if vectors else 'svdvals' if kind == 'svds' else 'eigvals'}[{spectrum}_l{LDIM}_m{mdim}]"
    planned, budget = topk.plan("eigs" if kind == "eigs" else "svd" if vectors else "svdvals", LDIM, mdim, LDIM, K)

    with recording_krylov() as log:
        def call():
            log.reset()
            try:
                if kind == "svds":
                    return topk.svds(A, B, K, method, return_singular_vectors=vectors)
                return topk.eigs(A, B, K, method)
            except scipy_bridge.KrylovFailure as error:  # a failed case, not a bench error
                return error

        result = measure(benchmark, call, group=group, case=method,
                         baseline="exact" if method == "exact" else None,
                         slow=SMALL or mdim >= SLOW_MDIM)

    info = benchmark.extra_info
    failed = isinstance(result, scipy_bridge.KrylovFailure)
    if failed:
        info["failed"] = str(result)
    else:
        S = result[1] if vectors else result
        info["top10_max_rel_err"] = top_rel_error(kind, spectrum, mdim, S)
        if vectors:
            info["UV_max_rel_residual"] = vector_residual(A, B, *result)

    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats else None
    if method == "exact" and median is not None:
        _EXACT_MEDIANS[group] = median
    elif not failed and median and group in _EXACT_MEDIANS:
        info["speedup_vs_exact"] = _EXACT_MEDIANS[group] / median

    label = _EXACT_LABELS[kind, vectors] if method == "exact" else method
    if method != "exact":
        info["applications"] = log.applications
        info["plan"], info["plan_budget"] = planned, budget
        info["krylov_outcome"] = log.outcome
    if method == "auto":
        info["auto_ran"] = _auto_ran(log.outcome)
        label = f"auto: {planned}" + (f" (budget {budget})" if budget is not None else "")
        label += f" -> {info['auto_ran']}" if planned != "exact" else ""
    if method == "arpack":
        info["within_auto_budget"] = None if budget is None else log.applications <= budget
    if failed:
        label += f": FAILED ({type(result.__cause__ or result).__name__})"
    info.update(kind=kind, spectrum=spectrum, method=method, vectors=vectors,
                shape=f"l{LDIM}_m{mdim}_r{LDIM}_k{K}", case=label)
    return result


# --- The cases ------------------------------------------------------------------------------------
def _svdvals_params():
    return [
        pytest.param(spectrum, mdim, method, id=f"{spectrum}-m{mdim}-{method}")
        for spectrum in SPECTRA
        for mdim in SVD_MDIMS
        for method in ("exact", "arpack", "propack", "auto")
        if method != "propack" or mdim == MAIN_MDIM
    ]


def _eigvals_params():
    return [
        pytest.param(spectrum, mdim, method, id=f"{spectrum}-m{mdim}-{method}")
        for spectrum in SPECTRA
        for mdim in EIG_MDIMS
        for method in ("exact", "arpack", "auto")
    ]


@pytest.mark.parametrize("spectrum, mdim, method", _svdvals_params())
def test_svdvals(benchmark, spectrum, mdim, method):
    run_case(benchmark, "svds", spectrum, mdim, method)


@pytest.mark.parametrize("spectrum, method", [
    pytest.param(spectrum, method, id=f"{spectrum}-m{MAIN_MDIM}-{method}")
    for spectrum in SPECTRA for method in ("exact", "auto")
])
def test_svd_vectors(benchmark, spectrum, method):
    run_case(benchmark, "svds", spectrum, MAIN_MDIM, method, vectors=True)


@pytest.mark.parametrize("spectrum, mdim, method", _eigvals_params())
def test_eigvals(benchmark, spectrum, mdim, method):
    run_case(benchmark, "eigs", spectrum, mdim, method)


# --- A batch of many small products: the exact path runs on the whole batch -------------------------
#: 2000 products of 40 x 8 by 8 x 40 (many small heads): every matrix takes the exact path.
BATCH_SHAPE = (2000, 40, 8)


@functools.cache
def batch_factors() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    n, ldim, mdim = BATCH_SHAPE
    return torch.randn(n, ldim, mdim, generator=gen), torch.randn(n, mdim, ldim, generator=gen)


@pytest.mark.parametrize("case", ["loop", "svds", "svds_values", "eigs"])
def test_batched_exact(benchmark, case):
    """``loop``: one ``topk.svds`` call per matrix (what svds did for a batch before it batched the
    exact path), the baseline; the others: one call on the whole batch."""
    A, B = batch_factors()
    calls = {
        "loop": lambda: [topk.svds(A[i], B[i], 6) for i in range(A.shape[0])],
        "svds": lambda: topk.svds(A, B, 6),
        "svds_values": lambda: topk.svds(A, B, 6, return_singular_vectors=False),
        "eigs": lambda: topk.eigs(A, B, 6),
    }
    n, ldim, mdim = BATCH_SHAPE
    measure(benchmark, calls[case], group=f"topk_batched[b{n}_l{ldim}_m{mdim}_k6]", case=case,
            baseline="loop" if case == "loop" else None, slow=case == "loop")


# --- The sweep as a table, from --benchmark-json --------------------------------------------------
def main(path: str) -> None:
    """Print, per kind and spectrum, one row per shape: each method's median, speedup over exact,
    applications and (auto) what it planned and ran."""
    with open(path) as file:
        benches = [b for b in json.load(file)["benchmarks"] if b["extra_info"].get("kind")]
    rows: dict[tuple, dict[str, dict]] = {}
    for bench in benches:
        info = bench["extra_info"]
        table = (info["kind"] + (" with vectors" if info["vectors"] else ""), info["spectrum"])
        rows.setdefault(table, {}).setdefault(info["shape"], {})[info["method"]] = bench
    for (kind, spectrum), shapes in rows.items():
        print(f"\n{kind}, {spectrum} spectrum: median s (speedup vs exact, applications), error")
        for shape, methods in shapes.items():
            cells = []
            for method, bench in methods.items():
                info = bench["extra_info"]
                cell = f"{method} {bench['stats']['median']:.3g}s"
                if "failed" in info:
                    cell += " FAILED"
                if "speedup_vs_exact" in info:
                    cell += f" ({info['speedup_vs_exact']:.2f}x, {info['applications']} app)"
                if "top10_max_rel_err" in info:
                    cell += f" err {info['top10_max_rel_err']:.1e}"
                if method == "auto":
                    cell += f" [plan {info['plan']}, budget {info['plan_budget']}: ran {info['auto_ran']}]"
                cells.append(cell)
            print(f"  {shape}: " + " | ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "topk.json")
