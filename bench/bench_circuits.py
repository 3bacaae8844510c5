"""All 144 heads of GPT-2 small: singular values, norms and eigenvalues of the full OV circuits.

The factors are random float32 ``A = W_E W_V`` (12, 12, 50257, 64) and ``B = W_O W_U``
(12, 12, 64, 50257), 1.85 GB each, i.i.d. standard normal, drawn once (untimed). Each case computes, for every head, the
singular values, the Frobenius norm and the eigenvalues of ``A @ B`` (a 50257 x 50257 matrix
that is never formed):

- ``per layer``: lowrank_op, one layer's 12 heads at a time (as ``lowrank_op circuits`` does):
  ``S``, ``norm()``, ``eigenvalues`` of ``FactoredMatrix(A[l], B[l])``;
- ``all at once``: the same on the whole (12, 12, ...) FactoredMatrix;
- ``tl``: TransformerLens's method on the same factors, layer by layer: SVDs of A, of B and of the
  64 x 64 middle (:func:`bench.baselines.tl_svd`), the norm from those singular values, and
  ``eig(B @ A)``.

The group ``gpt2_small_circuits_analyze_ov_and_qk`` times the default command's analysis,
``circuits.analyze(checkpoints.random_weights())`` (GPT-2 small's shapes, tied ``W_U``, float32):
one QR of ``W_E`` shared by all 144 heads' OV and QK circuits, then ``d_model``-sized kernels per
layer (:func:`lowrank_op.shared_bases.reduce_outer`). Beside it, the baseline ``formed``: the
path it replaced, which forms every layer's circuit factors ``W_E W_V``, ``W_O W_U``, ``W_E W_Q``
and ``W_K^T W_E^T`` (n_heads x d_vocab x d_head each) and measures them with ``circuit_metrics``.
Both record the largest relative difference between their singular values and norms; the
analysis also records its error against a float64 analysis of layer 0 (the weights widened).

``gpt2_xl_circuits_analyze_ov_and_qk``: ``circuits.analyze`` at GPT-2 XL's shapes (48 layers, 25
heads, d_model 1600, d_head 64, vocab 50,257; seeded random weights, 2.2 GiB in float32), with
its extra peak memory as a multiple of the weights' bytes.

One round each (a case takes seconds to minutes), after an untimed warm-up of every case on small
slices. Peak memory: the RSS high-water mark during the case minus the RSS before it
(``/proc/self/clear_refs`` resets the mark; Linux only), in ``extra_info["peak_extra_GiB"]`` and
printed at the end of the module. Accuracy: the singular
values of layer 0 against a float64 factored reference (``S_max_rel_err``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc

import pytest
import torch

from bench import baselines
from lowrank_op import FactoredMatrix, _cache, kernels
from lowrank_op.circuits import analysis as circuits
from lowrank_op.circuits import checkpoints, memory as _memory

N_LAYERS, N_HEADS, D_VOCAB, D_HEAD = 12, 12, 50257, 64
GROUP = "gpt2_small_ov_circuits_144_heads"
GIB = 2**30


@functools.cache
def gpt2_ov_factors() -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded float32 factors of the 144 OV circuits, scaled like GPT-2's (std 0.02 weights)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(N_LAYERS, N_HEADS, D_VOCAB, D_HEAD, generator=gen)
    B = torch.randn(N_LAYERS, N_HEADS, D_HEAD, D_VOCAB, generator=gen)
    return A, B


@functools.cache
def layer0_reference() -> torch.Tensor:
    A, B = gpt2_ov_factors()
    return kernels.svdvals(A[0].double(), B[0].double(), method="householder")


def s_error(S0: torch.Tensor) -> float:
    ref = layer0_reference()
    return float(((S0.double() - ref).abs() / ref).max())


# --- The computations timed -----------------------------------------------------------------------
def lowrank_per_layer(A, B):
    out = []
    for layer in range(A.shape[0]):
        fm = FactoredMatrix(A[layer], B[layer])
        out.append((fm.S, fm.norm(), fm.eigenvalues))
    return out


def lowrank_all_at_once(A, B):
    fm = FactoredMatrix(A, B)
    return [(fm.S[layer], fm.norm()[layer], fm.eigenvalues[layer]) for layer in range(A.shape[0])]


def tl_per_layer(A, B):
    out = []
    for layer in range(A.shape[0]):
        S = baselines.tl_svd(A[layer], B[layer])[1]
        out.append((S, S.pow(2).sum(-1).sqrt(), baselines.tl_eigenvalues(A[layer], B[layer])))
    return out


CASES = {
    "per_layer": ("lowrank_op: S, norm, eigenvalues, per layer", lowrank_per_layer, None),
    "all_at_once": ("lowrank_op: the same, 144 heads at once", lowrank_all_at_once, None),
    "tl": ("TransformerLens: 3 SVDs, norm from S, eig(B@A)", tl_per_layer, "tl"),
}


@functools.cache
def warm_up() -> None:
    """Run every case once on small slices, untimed, so no case pays first-call costs."""
    A, B = gpt2_ov_factors()
    A, B = A[:2, :2, :512].contiguous(), B[:2, :2, :, :512].contiguous()
    for _, fn, _ in CASES.values():
        fn(A, B)
    small = checkpoints.random_weights(n_layers=1, n_heads=2, d_model=128, d_vocab=512)
    circuits.analyze(small)
    formed_analysis(small)


@pytest.fixture(scope="module")
def memory_log(request):
    """Collects ``(case, extra peak)`` lines and prints them when the module's cases are done."""
    lines: list[str] = []
    yield lines
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or not lines:
        return
    with capture.global_and_fixture_disabled() if capture is not None else contextlib.nullcontext():
        reporter.write_line("")
        reporter.write_sep("-", "bench_circuits: extra peak RSS during each case")
        for line in lines:
            reporter.write_line(line)


def _timed_with_memory(benchmark, fn, *args):
    """One round of ``fn(*args)``; returns its result and the extra peak RSS in bytes (or None)."""
    gc.collect()
    before = _memory.current_rss()
    reset = before is not None and _memory.reset_peak()
    result = benchmark.pedantic(fn, args=args, rounds=1, iterations=1, warmup_rounds=0)
    extra = _memory.peak_rss() - before if reset else None
    return result, extra


@pytest.mark.parametrize("case", list(CASES))
def test_ov_circuits(benchmark, memory_log, case):
    torch.set_num_threads(2)
    label, fn, baseline = CASES[case]
    A, B = gpt2_ov_factors()
    layer0_reference()  # computed untimed, before the case
    warm_up()
    benchmark.group = GROUP
    benchmark.extra_info["case"] = label
    if baseline is not None:
        benchmark.extra_info["baseline"] = baseline
    result, extra = _timed_with_memory(benchmark, fn, A, B)
    factor_bytes = A.numel() * A.element_size() + B.numel() * B.element_size()
    benchmark.extra_info["S_max_rel_err"] = s_error(result[0][0])
    benchmark.extra_info["factor_GiB"] = factor_bytes / GIB
    if extra is not None:
        benchmark.extra_info["peak_extra_GiB"] = extra / GIB
    memory_log.append(f"  {label:<52} {'n/a' if extra is None else f'{extra / GIB:.2f} GiB'} "
                      f"(factors of all 144 heads: {factor_bytes / GIB:.2f} GiB, held throughout)")
    assert all(len(S) == N_HEADS for S, _, _ in result)
    del result
    gc.collect()


# --- circuits.analyze: shared bases against the formed factors, GPT-2 small; GPT-2 XL ------------------
ANALYZE_GROUP = "gpt2_small_circuits_analyze_ov_and_qk"
XL_SHAPE = {"n_layers": 48, "n_heads": 25, "d_model": 1600, "d_vocab": 50257}
#: The reports of the two GPT-2-small cases, and the extra_info of each, to compare them by.
_analyze_runs: dict[str, tuple[circuits.CircuitReport, dict]] = {}


@functools.cache
def gpt2_small_weights() -> checkpoints.AttentionWeights:
    """The default command's random model (seed 0, GPT-2 small's shapes, float32)."""
    return checkpoints.random_weights()


def formed_analysis(weights: checkpoints.AttentionWeights) -> circuits.CircuitReport:
    """The path ``analyze`` replaced: per layer, form each circuit's factors (W_E W_V, W_O W_U; W_E W_Q,
    W_K^T W_E^T: n_heads x d_vocab x d_head each) and measure them with ``circuit_metrics``."""
    W_E, W_U = weights.W_E, weights.W_U
    parts = {"ov": [], "qk": []}
    for layer in range(weights.n_layers):
        ov = FactoredMatrix(W_E @ weights.W_V[layer], weights.W_O[layer] @ W_U)
        parts["ov"].append(circuits.circuit_metrics(ov))
        del ov
        qk = FactoredMatrix(W_E @ weights.W_Q[layer], weights.W_K[layer].mT @ W_E.mT)
        parts["qk"].append(circuits.circuit_metrics(qk))
        del qk
    return circuits.CircuitReport(ov=circuits.CircuitMetrics.stack(parts["ov"]),
                                  qk=circuits.CircuitMetrics.stack(parts["qk"]))


def _max_rel_diff(got: circuits.CircuitReport, want: circuits.CircuitReport) -> tuple[float, float]:
    """Largest relative difference of the singular values and of the norms, over both circuits."""
    S = max(float(((getattr(got, c).singular_values.double() - getattr(want, c).singular_values.double()).abs()
                   / getattr(want, c).singular_values.double()).max()) for c in ("ov", "qk"))
    norm = max(float(((getattr(got, c).norm.double() - getattr(want, c).norm.double()).abs()
                      / getattr(want, c).norm.double()).max()) for c in ("ov", "qk"))
    return S, norm


def _compare_runs() -> None:
    """Once both GPT-2-small cases ran: their largest relative differences, in both extra_infos."""
    if len(_analyze_runs) < 2:
        return
    S, norm = _max_rel_diff(_analyze_runs["shared"][0], _analyze_runs["formed"][0])
    for _, info in _analyze_runs.values():
        info["S_max_rel_diff_shared_vs_formed"] = S
        info["norm_max_rel_diff_shared_vs_formed"] = norm
    # The same numbers, up to float32 rounding: both paths are within 1e-5 of float64 (84 eps).
    assert S <= 2 * 84 * torch.finfo(torch.float32).eps and norm <= 2 * 84 * torch.finfo(torch.float32).eps


def _layer0_float64_error(weights: checkpoints.AttentionWeights, report: circuits.CircuitReport) -> tuple[float, float]:
    """Relative error of layer 0's singular values and norms against a float64 analysis of the same
    (widened) weights, through the same shared bases in float64."""
    W_E = weights.W_E.double()
    one = weights.replace(W_E=W_E, W_U=W_E.mT if weights.tied else weights.W_U.double(),
                              **{k: getattr(weights, k)[:1].double() for k in ("W_Q", "W_K", "W_V", "W_O")})
    ref = circuits.analyze(one)
    first = circuits.CircuitReport(*(circuits.CircuitMetrics(*(getattr(getattr(report, c), f)[:1] for f in
                                                               circuits.CircuitMetrics.__dataclass_fields__))
                                     for c in ("ov", "qk")))
    return _max_rel_diff(first, ref)


def test_circuits_analyze_shared_bases(benchmark, memory_log):
    """(a) ``circuits.analyze`` of the default command's random GPT-2-small model, through shared bases."""
    torch.set_num_threads(2)
    weights = gpt2_small_weights()
    warm_up()
    _cache.shared.clear()  # nothing of these weights is cached: the QR of W_E is timed
    benchmark.group = ANALYZE_GROUP
    benchmark.extra_info["case"] = "circuits.analyze (shared bases)"
    report, extra = _timed_with_memory(benchmark, circuits.analyze, weights)
    if extra is not None:
        benchmark.extra_info["peak_extra_GiB"] = extra / GIB
        benchmark.extra_info["peak_extra_over_W_E"] = extra / (weights.W_E.numel() * weights.W_E.element_size())
    S_err, norm_err = _layer0_float64_error(weights, report)
    benchmark.extra_info["S_max_rel_err_layer0"] = S_err
    benchmark.extra_info["norm_max_rel_err_layer0"] = norm_err
    memory_log.append(f"  {'circuits.analyze, GPT-2 small (shared bases)':<52} "
                      f"{'n/a' if extra is None else f'{extra / GIB:.2f} GiB'} (W_E: "
                      f"{weights.W_E.numel() * 4 / GIB:.2f} GiB; weights {weights.nbytes / GIB:.2f} GiB, "
                      "held throughout)")
    assert report.ov.norm.shape == (N_LAYERS, N_HEADS)
    assert S_err < 1e-5 and norm_err < 1e-5
    _analyze_runs["shared"] = (report, benchmark.extra_info)
    _compare_runs()


def test_circuits_analyze_formed_baseline(benchmark, memory_log):
    """(b) The old path, forming every layer's circuit factors (one round: about 40 s on 2 threads)."""
    torch.set_num_threads(2)
    weights = gpt2_small_weights()
    warm_up()
    benchmark.group = ANALYZE_GROUP
    benchmark.extra_info["case"] = "formed W_E W_V, W_O W_U, ...; circuit_metrics"
    benchmark.extra_info["baseline"] = "formed"
    report, extra = _timed_with_memory(benchmark, formed_analysis, weights)
    layer_bytes = 2 * N_HEADS * D_VOCAB * D_HEAD * 4
    if extra is not None:
        benchmark.extra_info["peak_extra_GiB"] = extra / GIB
    memory_log.append(f"  {'formed circuit factors, GPT-2 small (baseline)':<52} "
                      f"{'n/a' if extra is None else f'{extra / GIB:.2f} GiB'} (one layer's circuit factors: "
                      f"{layer_bytes / GIB:.2f} GiB)")
    _analyze_runs["formed"] = (report, benchmark.extra_info)
    _compare_runs()


def test_circuits_analyze_gpt2_xl(benchmark, memory_log):
    """(c) ``circuits.analyze`` at GPT-2 XL's shapes: time, and extra peak RSS over the weights held."""
    torch.set_num_threads(2)
    warm_up()
    weights = checkpoints.random_weights(**XL_SHAPE, seed=0)  # untimed; 2.2 GiB
    benchmark.group = "gpt2_xl_circuits_analyze_ov_and_qk"
    benchmark.extra_info["case"] = "circuits.analyze, 48 x 25 heads, d_model 1600"
    report, extra = _timed_with_memory(benchmark, circuits.analyze, weights)
    benchmark.extra_info["weights_GiB"] = weights.nbytes / GIB
    if extra is not None:
        benchmark.extra_info["peak_extra_GiB"] = extra / GIB
        benchmark.extra_info["peak_extra_over_weights"] = extra / weights.nbytes
        benchmark.extra_info["peak_over_weights"] = (weights.nbytes + extra) / weights.nbytes
    peak = "" if extra is None else f"; peak = {(weights.nbytes + extra) / weights.nbytes:.2f} x the weights"
    memory_log.append(f"  {'circuits.analyze, GPT-2 XL shapes':<52} "
                      f"{'n/a' if extra is None else f'{extra / GIB:.2f} GiB'} "
                      f"(weights {weights.nbytes / GIB:.2f} GiB, held throughout{peak})")
    assert report.ov.norm.shape == (XL_SHAPE["n_layers"], XL_SHAPE["n_heads"])
    del report, weights
    gc.collect()
