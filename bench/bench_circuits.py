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

A last group times the whole ``circuits.analyze`` of the random GPT-2-small model: building the
OV and QK circuits from the weights (the matrix products dominate) and measuring them.

One round each (a case takes seconds to minutes), after an untimed warm-up of every case on small
slices. Peak memory: the RSS high-water mark during the case minus the RSS before it
(``/proc/self/clear_refs`` resets the mark; Linux only), in ``extra_info["peak_extra_GiB"]`` and
printed at the end of the module. Accuracy: the singular
values of layer 0 against a float64 factored reference (``S_max_rel_err``).
"""

from __future__ import annotations

import contextlib
import functools
import gc

import pytest
import torch

from bench import baselines
from lowrank_op import FactoredMatrix, _memory, checkpoints, circuits, kernels

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
    circuits.analyze(checkpoints.random_weights(n_layers=1, n_heads=2, d_model=128, d_vocab=512))


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


def test_circuits_analyze_end_to_end(benchmark, memory_log):
    """``circuits.analyze`` on the random GPT-2-small weights: OV and QK, built and measured."""
    torch.set_num_threads(2)
    weights = checkpoints.random_weights()
    warm_up()
    benchmark.group = "gpt2_small_circuits_analyze_ov_and_qk"
    benchmark.extra_info["case"] = "circuits.analyze (build + measure OV and QK)"
    report, extra = _timed_with_memory(benchmark, circuits.analyze, weights)
    layer_bytes = 2 * N_HEADS * D_VOCAB * D_HEAD * 4
    if extra is not None:
        benchmark.extra_info["peak_extra_GiB"] = extra / GIB
        benchmark.extra_info["peak_extra_over_one_layer_factors"] = extra / layer_bytes
    memory_log.append(f"  {'circuits.analyze, GPT-2 small, OV + QK':<52} "
                      f"{'n/a' if extra is None else f'{extra / GIB:.2f} GiB'} (one layer's circuit factors: "
                      f"{layer_bytes / GIB:.2f} GiB; weights {weights.nbytes / GIB:.2f} GiB, held throughout)")
    assert report.ov.norm.shape == (N_LAYERS, N_HEADS)
