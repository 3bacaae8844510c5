"""Composition scores of every pair of GPT-2 small's 144 heads: Q-, K- and V-composition.

The weights are seeded random float32 tensors with GPT-2 small's shapes and scale (std 0.02):
``W_Q``, ``W_K``, ``W_V`` (12, 12, 768, 64) and ``W_O`` (12, 12, 64, 768). As in TransformerLens's
``HookedTransformer.all_composition_scores``, ``left = OV = FactoredMatrix(W_V, W_O)`` and
``right`` is ``QK = FactoredMatrix(W_Q, W_K^T)`` (mode Q), ``QK.T`` (mode K) or ``OV`` (mode V);
the result is ``(12, 12, 12, 12)``, every left head against every right head (20736 pairs; the
mask TransformerLens applies afterwards is left out, it costs nothing). Each mode is a group:

- ``lowrank_op (bases cold)``: :func:`lowrank_op.composition_scores` on the two FactoredMatrix
  objects (``method="auto"``, which takes ``"gram"`` here: :mod:`lowrank_op.pairwise_norms`),
  with the shared cache of outer-factor QRs cleared before every round (the QRs of ``W_V`` and of
  the right's ``B`` are in the time);
- ``lowrank_op (bases cached)``: the same with the QRs left cached from the previous round, as
  for the second and third mode of a model;
- ``lowrank_op method='product' (bases cold)``: the other route, every pair's ``64 x 64`` core
  from one GEMM, for comparison;
- ``tl``: TransformerLens's ``composition_scores`` on the same factors
  (:func:`bench.baselines.tl_composition_scores`, which follows TL's code step by step: the SVD
  method's ``collapse_l``/``collapse_r``, the dense broadcast product of every pair, three norms).

Objects are built untimed; every case runs once on a small slice first (untimed), so no case pays
first-call costs. Accuracy (``extra_info``): the largest relative difference of each pair's score
from a float64 reference (``max_rel_err_vs_f64``), computed independently: Householder QRs of
``W_V`` and of the right's ``B^T`` in float64, so that ``|W_V W_O A_r B_r|_F = |(R_V W_O)(A_r
R_B^T)|_F``, one float64 GEMM for all pairs; and from TransformerLens's own scores
(``max_rel_diff_vs_tl``). Asserted: both within :data:`MAX_REL_ERROR`. Peak memory: the RSS
high-water mark during the case minus the RSS before it (Linux), ``peak_extra_GiB``.

About 100 s on a quiet 2-core machine, most of it TransformerLens: about 5 s a call, 3.8 s of it
the broadcast matmul, which copies both collapsed operands once per pair (4 GB each, 8 GiB of
extra peak memory). ``"gram"`` spends about 0.3 s in its float64 Gram blocks and pair sums;
``"product"`` about 1 s, 0.67 s of it the one GEMM that forms every pair's 64 x 64 core. With
other processes on the cores TransformerLens's copies slow down far more
(12 to 90 s a call were seen), so the ratios are meaningful only without the summary's warning.
"""

from __future__ import annotations

import functools
import gc

import pytest
import torch

from bench import baselines
from lowrank_op import FactoredMatrix, _cache, composition_scores
from lowrank_op.circuits import memory as _memory

N_LAYERS, N_HEADS, D_MODEL, D_HEAD = 12, 12, 768, 64
MODES = ("Q", "K", "V")
GIB = 2**30
#: Rounds per case: lowrank_op's take 0.4 to 1 s each, TransformerLens's about 5 s.
ROUNDS = {"cold": 5, "warm": 5, "product": 3, "tl": 3}
#: Largest relative error of a score allowed, against float64 and against TransformerLens, in
#: float32 eps: each score is a ratio of three norms, each off by a few eps times
#: ``|A| |B| / |A B|`` of its factors (about 1 for these heads) and by the rounding of the core's
#: 768-term sums. Measured: lowrank_op 4 eps from float64, TransformerLens 13 eps, the two 13 eps
#: apart.
MAX_REL_ERROR = 64 * torch.finfo(torch.float32).eps


@functools.cache
def weights() -> dict[str, torch.Tensor]:
    """Seeded float32 attention weights with GPT-2 small's shapes, std 0.02 like GPT-2's."""
    gen = torch.Generator().manual_seed(0)
    shape = (N_LAYERS, N_HEADS, D_MODEL, D_HEAD)
    W = {name: 0.02 * torch.randn(shape, generator=gen) for name in ("Q", "K", "V")}
    W["O"] = 0.02 * torch.randn(N_LAYERS, N_HEADS, D_HEAD, D_MODEL, generator=gen)
    return W


def factors(mode: str, W: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``(left_A, left_B, right_A, right_B)`` as ``all_composition_scores(mode)`` pairs them."""
    right = {"Q": (W["Q"], W["K"].mT), "K": (W["K"], W["Q"].mT), "V": (W["V"], W["O"])}[mode]
    return W["V"], W["O"], *right


def sliced(W: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two layers of two heads, for the untimed warm-up."""
    return {name: X[:2, :2].contiguous() for name, X in W.items()}


# --- The computations timed -----------------------------------------------------------------------
def lowrank(mode: str, W: dict[str, torch.Tensor], method: str = "auto"):
    left_A, left_B, right_A, right_B = factors(mode, W)
    left, right = FactoredMatrix(left_A, left_B), FactoredMatrix(right_A, right_B)
    return lambda: composition_scores(left, right, method=method)


def tl(mode: str, W: dict[str, torch.Tensor]):
    operands = factors(mode, W)
    return lambda: baselines.tl_composition_scores(*operands)


CASES = {
    "tl": ("TransformerLens composition_scores", tl, "tl"),
    "cold": ("lowrank_op (bases cold)", lowrank, None),
    "warm": ("lowrank_op (bases cached)", lowrank, None),
    "product": ("lowrank_op method='product' (bases cold)", functools.partial(lowrank, method="product"), None),
}


# --- References -----------------------------------------------------------------------------------
@functools.cache
def reference(mode: str) -> torch.Tensor:
    """float64 scores, (12, 12, 12, 12), through float64 Householder QRs of the outer factors."""
    left_A, left_B, right_A, right_B = (X.double() for X in factors(mode, weights()))
    R_left = torch.linalg.qr(left_A, mode="r")[1]  # left_A = Q R: |left_A X| = |R X|
    R_right = torch.linalg.qr(right_B.mT, mode="r")[1]  # right_B = R^T Q^T: |X right_B| = |X R^T|
    P = R_left @ left_B  # (L, H, 64, 768)
    Q = right_A @ R_right.mT  # (L, H, 768, 64)
    core = P.reshape(-1, D_MODEL) @ Q.transpose(-2, -1).reshape(-1, D_MODEL).mT  # (L H 64, L H 64)
    blocks = core.reshape(N_LAYERS, N_HEADS, D_HEAD, N_LAYERS, N_HEADS, D_HEAD)
    numerator = torch.linalg.vector_norm(blocks, dim=(2, 5))
    left_norm = torch.linalg.matrix_norm(P)[:, :, None, None]
    right_norm = torch.linalg.matrix_norm(Q)[None, None]
    return numerator / (left_norm * right_norm)


_tl_scores: dict[str, torch.Tensor] = {}


def tl_scores(mode: str) -> torch.Tensor:
    """TransformerLens's scores: those its case computed, else computed now (untimed)."""
    if mode not in _tl_scores:
        _tl_scores[mode] = tl(mode, weights())()
    return _tl_scores[mode]


def max_rel(scores: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float(((scores.double() - expected).abs() / expected).max())


@functools.cache
def warm_up() -> None:
    small = sliced(weights())
    for mode in MODES:
        for _, make, _ in CASES.values():
            make(mode, small)()


def _clear_bases():
    _cache.shared.clear()


@pytest.mark.parametrize("mode, case", [(mode, case) for mode in MODES for case in CASES])
def test_composition_scores(benchmark, mode, case):
    torch.set_num_threads(2)
    label, make, baseline = CASES[case]
    expected = reference(mode)  # untimed, before the case
    warm_up()
    fn = make(mode, weights())
    benchmark.group = f"composition_scores[{mode}] gpt2_small 144x144 heads"
    benchmark.extra_info["case"] = label
    if baseline is not None:
        benchmark.extra_info["baseline"] = baseline
    if case == "warm":
        fn()  # the bases the rounds reuse
    gc.collect()
    before = _memory.current_rss()
    reset = before is not None and _memory.reset_peak()
    scores = benchmark.pedantic(fn, setup=None if case == "warm" else _clear_bases, rounds=ROUNDS[case],
                                iterations=1, warmup_rounds=0)
    if reset:
        benchmark.extra_info["peak_extra_GiB"] = (_memory.peak_rss() - before) / GIB
    assert scores.shape == (N_LAYERS, N_HEADS, N_LAYERS, N_HEADS)
    benchmark.extra_info["max_rel_err_vs_f64"] = max_rel(scores, expected)
    if case == "tl":
        _tl_scores[mode] = scores
    else:
        benchmark.extra_info["max_rel_diff_vs_tl"] = max_rel(scores, tl_scores(mode))
        assert benchmark.extra_info["max_rel_diff_vs_tl"] <= MAX_REL_ERROR
    assert benchmark.extra_info["max_rel_err_vs_f64"] <= MAX_REL_ERROR
