"""Shapes, factors, float64 references and the timing helper shared by the bench modules."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lowrank_op import FactoredMatrix, kernels

MDIM = 64
#: Shapes named for what they stand for: ``A`` is (n, 64), ``B`` is (64, n).
SHAPES = {
    # One 64-dim head's OV matrix W_V W_O in a 4096-wide residual stream (a 7B-class width).
    "resid4096_ov_head": 4096,
    # One GPT-2 head's full OV circuit W_E W_V W_O W_U over its 50257-token vocabulary.
    "gpt2_ov_head": 50257,
}
#: Dense torch on the formed ``A @ B`` is timed only at these shapes (at n = 50257 the product is
#: 10 GB in float32 and a dense SVD would take hours).
DENSE_SHAPES = ("resid4096_ov_head",)

#: Rounds: sized so each case runs for about TARGET_SECONDS, within [MIN_ROUNDS, MAX_ROUNDS].
#: Cases marked slow (dense at n = 4096: 20-30 s a call on 2 threads) run once, unwarmed.
TARGET_SECONDS = 1.0
MIN_ROUNDS = 10
MAX_ROUNDS = 100

#: Accuracy asserted in the bench (float32 factors against the float64 factored reference), in
#: units of float32's eps: singular values about 84 eps (1e-5), norms 32 eps (3.8e-6; the
#: Householder QR core of ``norm(method="qr")`` measured 10 eps at gpt2_ov_head).
_EPS32 = torch.finfo(torch.float32).eps
S_MAX_REL_ERROR = 84 * _EPS32
NORM_MAX_REL_ERROR = 32 * _EPS32


@functools.cache
def factors(shape: str) -> tuple[Tensor, Tensor]:
    """float32 ``A (n, 64)`` and ``B (64, n)``, seeded.

    Gaussian, with the inner directions scaled by ``logspace(0, -1, 64)`` on each side, so the
    product's singular values span two decades (cond about 100) rather than the flat spectrum
    (cond about 1.1) of iid factors.
    """
    n = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    scale = torch.logspace(0, -1, MDIM)
    A = torch.randn(n, MDIM, generator=gen) * scale
    B = scale[:, None] * torch.randn(MDIM, n, generator=gen)
    return A, B


@functools.cache
def reference(shape: str) -> tuple[Tensor, Tensor]:
    """float64 singular values (factored, Householder) of the float32 factors, and their norm."""
    A, B = factors(shape)
    S = kernels.svdvals(A.double(), B.double(), method="householder")
    return S, S.pow(2).sum().sqrt()


def max_rel_error(S: Tensor, shape: str) -> float:
    ref, _ = reference(shape)
    return float(((S.double() - ref).abs() / ref).max())


def norm_rel_error(norm: Tensor, shape: str) -> float:
    _, ref = reference(shape)
    return float((norm.double() - ref).abs() / ref)


def baseline_params(names: list[str]) -> list:
    """``(shape, baseline)`` pairs; ``dense`` only at DENSE_SHAPES."""
    return [
        pytest.param(shape, name, id=f"{shape}-{name}")
        for shape in SHAPES
        for name in names
        if name != "dense" or shape in DENSE_SHAPES
    ]


def fresh(A: Tensor, B: Tensor) -> Callable[[], tuple]:
    """A pedantic ``setup`` giving each round a new FactoredMatrix, so its cache cannot help."""
    return lambda: ((FactoredMatrix(A, B),), {})


def measure(benchmark, fn: Callable, *, group: str, case: str, setup: Callable | None = None,
            baseline: str | None = None, slow: bool = False):
    """Time ``fn`` (called on ``setup()``'s arguments, untimed, if given) and return its result.

    ``group`` is the pytest-benchmark group, ``case`` the label in the ratio summary, ``baseline``
    the key under which the summary divides by this case. One untimed call warms up and sizes the
    rounds, unless ``slow``.
    """
    benchmark.group = group
    benchmark.extra_info["case"] = case
    if baseline is not None:
        benchmark.extra_info["baseline"] = baseline
    if slow:
        return benchmark.pedantic(fn, setup=setup, rounds=1, warmup_rounds=0)
    args = setup()[0] if setup is not None else ()
    start = time.perf_counter()
    fn(*args)
    elapsed = max(time.perf_counter() - start, 1e-9)
    rounds = min(MAX_ROUNDS, max(MIN_ROUNDS, math.ceil(TARGET_SECONDS / elapsed)))
    return benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=0)


def measure_baseline(benchmark, name: str, label: str, fn: Callable, A: Tensor, B: Tensor, *,
                     group: str):
    """Time a baseline function of ``(A, B)`` from :mod:`bench.baselines` (``dense``: once)."""
    return measure(benchmark, lambda: fn(A, B), group=group, case=label, baseline=name,
                   slow=name == "dense")
