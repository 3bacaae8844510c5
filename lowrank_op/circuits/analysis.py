"""The OV and QK circuits of a transformer's attention heads, and what is measured on them.

With TransformerLens's row-vector convention, head ``h`` of layer ``l`` has

- the OV circuit ``W_E W_V W_O W_U``, shape (d_vocab, d_vocab): how attending to a token changes
  the logits, and
- the QK circuit ``W_E W_Q W_K^T W_E^T``, shape (d_vocab, d_vocab): the attention score between a
  query token and a key token (Elhage et al., 2021, "A Mathematical Framework for Transformer
  Circuits").

Both have rank at most ``d_head``. They are built here as
:class:`~lowrank_op.outer_factored.OuterFactoredMatrix` objects (what ``W_E @ FactoredMatrix(W_V,
W_O) @ W_U`` gives), which keep ``W_E`` and ``W_U`` as outer factors, so nothing of size
``d_vocab x d_vocab`` (or ``d_vocab x d_head`` per head) is formed. :func:`analyze` measures them
through one QR of ``W_E`` (and of ``W_U^H`` when it is not ``W_E^T``) shared by every head of
every layer (:func:`lowrank_op.shared_bases.reduce_outer`), so that per layer only
``d_model``-sized products remain.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_op import kernels, shared_bases
from lowrank_op.circuits.directions import DEFAULT_TOKENS, Directions, top_directions
from lowrank_op.circuits.weights import AttentionWeights, LayerWeights, grouped, ungrouped
from lowrank_op.errors import NonFiniteResultError
from lowrank_op.factored import FactoredMatrix
from lowrank_op.outer_factored import OuterFactoredMatrix


# --- Building the circuits ------------------------------------------------------------------------
def _layers(weights: AttentionWeights, layer: int | None) -> LayerWeights:
    return weights.read(0, weights.n_layers) if layer is None else weights.read(layer, layer + 1)


def _inner_factors(weights: AttentionWeights, name: str, layer: int | None) -> tuple[Tensor, Tensor]:
    """The inner factors of ``name``'s circuits: one layer's (leading dim dropped) or all layers';
    with GQA grouped by key/value head (:func:`lowrank_op.circuits.weights.grouped`)."""
    part = _layers(weights, layer)
    if weights.group == 1:
        A, B = (part.W_V, part.W_O) if name == "ov" else (part.W_Q, part.W_K.mT)
    else:
        A, B = grouped(part, weights.group)[name]
    return (A[0], B[0]) if layer is not None else (A, B)


def ov_circuit(weights: AttentionWeights, layer: int | None = None) -> OuterFactoredMatrix:
    """The OV circuits ``W_E W_V W_O W_U`` of every head, as one OuterFactoredMatrix (a FactoredMatrix).

    Parameters
    ----------
    weights : AttentionWeights
    layer : int, optional
        One layer; all layers when None (which reads every layer of a checkpoint).

    Returns
    -------
    OuterFactoredMatrix, shape (n_heads, d_vocab, d_vocab), or (n_layers, n_heads, d_vocab, d_vocab)
        Inner factors ``W_V`` (..., d_model, d_head) and ``W_O`` (..., d_head, d_model) between the
        outer factors ``W_E`` and ``W_U``; ``.A`` (``W_E W_V``) and ``.B`` (``W_O W_U``) are formed
        only when read. With GQA (``n_kv_heads < n_heads``) the leading dims are ``(n_kv_heads,
        group)`` in place of ``n_heads`` (query head ``kv * group + g`` at ``[kv, g]``), ``W_V``
        broadcast over its group rather than copied.

    Notes
    -----
    Building costs nothing (no product is formed). Reading ``.A`` or ``.B`` costs
    ``O(d_vocab d_model d_head)`` time and ``d_vocab d_head`` memory per head and factor: 1.85 GB
    per factor in float32 for all 144 heads of GPT-2 small, 154 MB for one layer.
    :func:`circuit_metrics` and :func:`analyze` never read them.
    """
    # The same object as ``W_E @ FactoredMatrix(W_V, W_O) @ W_U``, built in one step.
    return OuterFactoredMatrix(*_inner_factors(weights, "ov", layer), left=weights.W_E, right=weights.W_U)


def qk_circuit(weights: AttentionWeights, layer: int | None = None) -> OuterFactoredMatrix:
    """The QK circuits ``W_E W_Q W_K^T W_E^T`` of every head, as one OuterFactoredMatrix (a FactoredMatrix).

    Rows are query tokens, columns key tokens; inner factors ``W_Q`` and ``W_K^T`` between the
    outer factors ``W_E`` and ``W_E^T``. Shapes and costs as :func:`ov_circuit`. For a rotary model
    (Llama, GPT-NeoX) this is the position-free circuit, without the rotation that depends on the
    distance between query and key, as TransformerLens computes it.
    """
    return OuterFactoredMatrix(*_inner_factors(weights, "qk", layer), left=weights.W_E, right=weights.W_E.mT)


# --- Measurements (pure functions) ----------------------------------------------------------------
def effective_rank(S: Tensor) -> Tensor:
    """Entropy effective rank ``exp(H(p))``, ``p = S / sum(S)``, of singular values ``S``.

    Parameters
    ----------
    S : Tensor, shape (..., k)
        Non-negative singular values (all of a matrix's non-zero ones; zeros do not matter).

    Returns
    -------
    Tensor, shape (...)
        Between 1 (one non-zero singular value) and the number of non-zero ones (all equal);
        0 for an all-zero ``S``.

    References
    ----------
    O. Roy and M. Vetterli, "The effective rank: a measure of effective dimensionality",
    EUSIPCO 2007.

    Examples
    --------
    >>> import torch
    >>> effective_rank(torch.tensor([1.0, 1.0, 0.0]))
    tensor(2.)
    """
    total = S.sum(-1, keepdim=True)
    p = S / torch.where(total > 0, total, torch.ones_like(total))
    terms = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    rank = torch.exp(-terms.sum(-1))
    return torch.where(total.squeeze(-1) > 0, rank, torch.zeros_like(rank))


def eigenvalue_positivity(eigenvalues: Tensor) -> Tensor:
    """``sum(eig).real / sum(|eig|)``: the share of eigenvalue mass that is positive, in [-1, 1].

    On an OV circuit this is the copying score (Elhage et al., 2021): near 1 when a head's output
    raises the logit of the token attended to. On a QK circuit it is near 1 when tokens attend to
    tokens like themselves.

    Parameters
    ----------
    eigenvalues : Tensor, shape (..., m)
        Complex or real.

    Returns
    -------
    Tensor, shape (...)
        Real; NaN where every eigenvalue is zero.
    """
    return eigenvalues.sum(-1).real / eigenvalues.abs().sum(-1)


copying_score = eigenvalue_positivity


@dataclass(frozen=True)
class CircuitMetrics:
    """Measurements of a batch of circuits, leading shape ``(...)`` (heads, or layers and heads).

    Attributes
    ----------
    norm : Tensor, shape (...)
        Frobenius norm.
    singular_values : Tensor, shape (..., k)
        All ``k = min(d_vocab, d_head)`` singular values that can be non-zero, descending.
    effective_rank : Tensor, shape (...)
        :func:`effective_rank` of ``singular_values``.
    eigenvalue_positivity : Tensor, shape (...)
        :func:`eigenvalue_positivity`; the copying score for OV circuits.
    """

    norm: Tensor
    singular_values: Tensor
    effective_rank: Tensor
    eigenvalue_positivity: Tensor

    @staticmethod
    def stack(parts: list[CircuitMetrics]) -> CircuitMetrics:
        """Stack per-layer metrics along a new leading dim."""
        return CircuitMetrics(*(torch.stack([getattr(p, f) for p in parts]) for f in CircuitMetrics.__dataclass_fields__))


def frobenius_norm_from_singular_values(S: Tensor) -> Tensor:
    """``sqrt(sum(S**2))`` over the last dim, scaled by ``max(S)`` so that it cannot overflow.

    The Frobenius norm of a matrix is the 2-norm of its singular values. ``S`` (..., k) must hold
    all of them that can be non-zero, non-negative; the result has shape (...).
    """
    largest = S.amax(-1, keepdim=True) if S.shape[-1] else S.new_zeros((*S.shape[:-1], 1))
    scale = torch.where(largest > 0, largest, torch.ones_like(largest))
    return torch.linalg.vector_norm(S / scale, dim=-1) * scale.squeeze(-1)


def _require_finite(values: Tensor, what: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise NonFiniteResultError(
            f"{what} overflowed {str(values.dtype).removeprefix('torch.')} (it holds NaN or infinity although "
            "the weights are finite); compute in float64 (--dtype float64), or check the weights' scale."
        )


def _measure(X: Tensor, Y: Tensor, cycle: tuple[Tensor, Tensor] | None, what: str,
             factor_names: tuple[str, str]) -> CircuitMetrics:
    """Metrics of ``X @ Y`` (singular values and norm) with eigenvalues from ``kernels.eigvals(*cycle)``
    (``cycle`` None: ``(X, Y)``); errors name ``what`` and ``factor_names``."""
    _require_finite(X, f"{what}: the factor {factor_names[0]}")
    _require_finite(Y, f"{what}: the factor {factor_names[1]}")
    try:
        S = kernels.svdvals(X, Y)
        eigenvalues = kernels.eigvals(*((X, Y) if cycle is None else cycle))
    except torch.linalg.LinAlgError as err:  # finite factors whose core overflows can fail to converge
        raise NonFiniteResultError(
            f"{what}: the decomposition failed ({err}); the factors are finite, so their product "
            f"overflowed {str(X.dtype).removeprefix('torch.')}: compute in float64 (--dtype float64), or "
            "check the weights' scale."
        ) from None
    _require_finite(S, f"{what}: the singular values")
    _require_finite(eigenvalues, f"{what}: the eigenvalues")
    return CircuitMetrics(
        norm=frobenius_norm_from_singular_values(S),
        singular_values=S,
        effective_rank=effective_rank(S),
        eigenvalue_positivity=eigenvalue_positivity(eigenvalues),
    )


def _reduce(L: Tensor, R: Tensor, what: str, names: tuple[str, str]) -> shared_bases.OuterReduction:
    """:func:`lowrank_op.shared_bases.reduce_outer` of ``L`` and ``R``, checked finite; ``names``
    are those of ``L`` and ``R`` in error messages."""
    reduction = shared_bases.reduce_outer(L, R)
    _require_finite(reduction.left, f"{what}: the triangular factor of {names[0]}'s QR")
    if not reduction.mirrored:
        _require_finite(reduction.right, f"{what}: the triangular factor of {names[1]}^H's QR")
        _require_finite(reduction.closing, f"{what}: the product {names[1]} {names[0]}")
    return reduction


def _measure_reduced(reduction: shared_bases.OuterReduction, A: Tensor, B: Tensor, what: str,
                     factor_names: tuple[str, str]) -> CircuitMetrics:
    """Metrics of ``L A B R`` from its outer factors' reduction: the core for the singular values,
    the cycle for the eigenvalues."""
    X, Y = reduction.core(A, B)
    return _measure(X, Y, reduction.cycle(A, B, core=(X, Y)), what, factor_names)


def circuit_metrics(circuit: FactoredMatrix, what: str = "the circuit",
                    factor_names: tuple[str, str] = ("left factor", "right factor")) -> CircuitMetrics:
    """Norm, singular values, effective rank and eigenvalue positivity of square FactoredMatrix objects.

    Parameters
    ----------
    circuit : FactoredMatrix, shape (..., n, n), with mdim ``m``
        An :class:`~lowrank_op.outer_factored.OuterFactoredMatrix` ``L A B R`` with both outer
        factors (what :func:`ov_circuit` and :func:`qk_circuit` return) whose inner factors are at
        least ``m`` wide (``A`` (..., p, m), ``B`` (..., m, q), ``p, q >= m``) is measured through
        its outer factors' bases; any other FactoredMatrix through its factors ``A``, ``B``.
    what : str
        Names the circuit in error messages.
    factor_names : (str, str)
        Name the left and right factors in error messages (``"W_E W_V"``, ...).

    Raises
    ------
    NonFiniteResultError
        When a factor, the singular values or the eigenvalues hold NaN or infinity (an overflow of
        the working precision), naming ``what``.

    Notes
    -----
    From factors ``A`` (..., n, m), ``B`` (..., m, n): singular values from QR of both factors and
    a values-only SVD of the ``m x m`` core (:func:`lowrank_op.kernels.svdvals`), the Frobenius
    norm as their 2-norm (no second factorisation), eigenvalues from the ``m x m`` ``B A``
    (:func:`lowrank_op.kernels.eigvals`; the positivity is a sum, so their order does not matter).
    Cost ``O(n m^2 + m^3)`` per matrix.

    Through the outer factors (:func:`lowrank_op.shared_bases.reduce_outer`): the same kernels on
    the core ``(R_L A)(B R_R^H)`` (``p x m`` and ``m x q``) and, for the eigenvalues, the cycle
    ``(R L A, B)`` (the core itself when ``R`` is ``L^H``). Cost: one fingerprint of each outer
    factor, a QR of each (``O(n p^2)``) and ``R L`` (``O(n p q)``) unless cached (the shared
    cache keeps them while the tensors live), then ``O(m (p^2 + q^2))`` per matrix. The ``.A`` and
    ``.B`` of an OuterFactoredMatrix (``n x m`` per matrix) are never formed. Loops over many
    circuits with the same outer factors are better served by :func:`analyze`, which reduces them
    once.
    """
    if isinstance(circuit, OuterFactoredMatrix) and circuit.left is not None and circuit.right is not None:
        A, B = circuit.inner.A, circuit.inner.B
        if min(A.shape[-2], B.shape[-1]) >= A.shape[-1]:
            reduction = _reduce(circuit.left, circuit.right, what, ("L", "R"))
            return _measure_reduced(reduction, A, B, what, factor_names)
    return _measure(circuit.A, circuit.B, None, what, factor_names)


@dataclass(frozen=True)
class CircuitReport:
    """Measurements of every head's OV and QK circuits; leading shape (n_layers, n_heads).

    ``directions``: the OV circuits' top singular directions and their tokens
    (:mod:`lowrank_op.circuits.directions`), when asked for. ``layers_by_rank``: which layers each
    rank of a process group measured (``{0: every layer}`` without one).
    """

    ov: CircuitMetrics
    qk: CircuitMetrics
    directions: Directions | None = None
    layers_by_rank: dict[int, list[int]] | None = None


#: What each circuit is made of: its title, its factors' names, and the weights that go into it.
CIRCUIT_PARTS = {
    "ov": ("OV circuits W_E W_V W_O W_U", ("W_E W_V", "W_O W_U"), ("W_E", "W_V", "W_O", "W_U")),
    "qk": ("QK circuits W_E W_Q W_K^T W_E^T", ("W_E W_Q", "W_K^T W_E^T"), ("W_E", "W_Q", "W_K")),
}


def _tensor_name(weights: AttentionWeights, symbol: str, layer: int | None = None) -> str:
    name = weights.tensor_names.get(symbol)
    if name is None:
        return symbol if layer is None or symbol in ("W_E", "W_U") else f"{symbol}[{layer}]"
    return name.format(i=layer)


#: Elements checked at a time by :func:`require_finite_weights`: ``torch.isfinite`` makes temporaries
#: the size of its input (a float ``abs`` and two masks), which over a whole (n_layers, n_heads,
#: d_model, d_head) weight would be 0.7 GiB at GPT-2 XL's shapes.
FINITE_CHECK_CHUNK = 1 << 22


def _all_finite(W: Tensor) -> bool:
    """Whether ``W`` (at least 2-D) holds no NaN or infinity, checked in slices of about
    ``FINITE_CHECK_CHUNK`` elements along its first dim (of ``W^T`` for a transposed matrix, so
    that each slice is read contiguously)."""
    if W.dim() == 2 and not W.is_contiguous() and W.mT.is_contiguous():
        W = W.mT
    rows = max(1, FINITE_CHECK_CHUNK // max(1, W[0].numel())) if W.shape[0] else 1
    return all(bool(torch.isfinite(part).all()) for part in W.split(rows))


def require_finite_weights(weights: AttentionWeights, part: LayerWeights | None = None, start: int = 0) -> None:
    """ValueError naming the first weight (and layer) that holds NaN or infinity: ``W_E`` and ``W_U``
    (``part`` None), or a batch of layers read from ``weights`` starting at layer ``start``.

    Cost: one read of the weights checked (``W_U`` is skipped when it is a view of ``W_E^T``);
    extra memory a few ``FINITE_CHECK_CHUNK``-sized temporaries.
    """
    if part is None:
        checks = [("W_E", weights.W_E, None)]
        if not shared_bases._same_view(weights.W_U.mH, weights.W_E):  # else the same memory as W_E
            checks.append(("W_U", weights.W_U, None))
    else:
        checks = [(symbol, W[j], start + j) for symbol, W in zip(("W_Q", "W_K", "W_V", "W_O"), part)
                  for j in range(W.shape[0])]
    for symbol, W, layer in checks:
        if not _all_finite(W):
            raise ValueError(
                f"`{symbol}` ({_tensor_name(weights, symbol, layer)}) holds NaN or infinity"
                + (f" in layer {layer}" if layer is not None else "")
                + "; the circuits of such weights are undefined."
            )


def _batch_factors(part: LayerWeights, name: str, group: int, layer: int | None = None) -> tuple[Tensor, Tensor]:
    """The inner factors of a batch's circuits, grouped by key/value head (leading dims (n, n_kv,
    group)), or of one layer of the batch (``layer``, its index within the batch; leading (1, ...))."""
    A, B = grouped(part, group)[name]
    return (A, B) if layer is None else (A[layer:layer + 1], B[layer:layer + 1])


def _outer(weights: AttentionWeights, name: str) -> tuple[Tensor, Tensor]:
    """The outer factors of the circuits: ``(W_E, W_U)`` for OV, ``(W_E, W_E^T)`` for QK."""
    return (weights.W_E, weights.W_U) if name == "ov" else (weights.W_E, weights.W_E.mT)


def _sources(weights: AttentionWeights, name: str, layer: int | None) -> str:
    symbols = CIRCUIT_PARTS[name][2]
    if layer is None:
        symbols = tuple(s for s in symbols if s in ("W_E", "W_U"))
    return ", ".join(dict.fromkeys(f"`{_tensor_name(weights, s, layer)}`" for s in symbols))


def _measure_batch(weights: AttentionWeights, reductions: dict, layers: slice, directions: int,
                   tokens: int) -> tuple[CircuitMetrics, CircuitMetrics, list[Directions]]:
    """One batch of layers: its OV and QK metrics and, with ``directions``, each layer's directions."""
    part = weights.read(layers.start, layers.stop)
    if not weights.finite_checked:
        require_finite_weights(weights, part, layers.start)
    ov, qk = (_measure_layers(weights, name, reductions[name], layers, part) for name in ("ov", "qk"))
    found = []
    if directions:  # a layer at a time: the lifted vectors are d_vocab x (n_heads directions) per call
        for j in range(layers.stop - layers.start):
            W_V, W_O = _batch_factors(part, "ov", weights.group, j)
            found.append(top_directions(weights.W_E, weights.W_U, reductions["ov"], W_V, W_O, directions,
                                        tokens).flat_heads())
    return ov, qk, found


def _sharded_reductions(weights: AttentionWeights, group) -> dict[str, shared_bases.OuterReduction]:
    """The OV and QK circuits' outer reductions by TSQR over this rank's rows of ``W_E`` (and
    columns of ``W_U``): :func:`lowrank_op.distributed.sharded_outer_reduction`, the same bits on
    every rank. A ``W_E`` that is not tall (fewer tokens than ``d_model``) is reduced locally, as
    without a group."""
    from lowrank_op import distributed

    if weights.d_vocab <= weights.d_model:
        return {name: shared_bases.reduce_outer(*_outer(weights, name)) for name in ("ov", "qk")}
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    W_E = torch.tensor_split(weights.W_E, world)[rank]  # this rank's rows (views)
    W_U = W_E.mT if weights.tied else torch.tensor_split(weights.W_U, world, dim=1)[rank]  # the same split
    with torch.no_grad():
        return {"ov": distributed.sharded_outer_reduction(W_E, W_U, group),
                "qk": distributed.sharded_outer_reduction(W_E, W_E.mT, group)}


def _gather_batches(measured: dict, failure: Exception | None, group) -> tuple[dict, Exception | None]:
    """Every rank's batches (and the first failure, if any rank had one), on every rank."""
    everyone: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(everyone, (measured, failure), group=group)
    merged, first = {}, None
    for part, err in everyone:
        merged.update(part)
        first = first or err
    return merged, first


#: :func:`analyze` measures layers in batches whose core factors (``n_heads x d_model x d_head``
#: numbers per layer and factor) hold at most ``max(BATCH_SHARE_OF_W_E * W_E.numel(),
#: BATCH_MIN_ELEMENTS)`` numbers each: a quarter of ``W_E``, whose QR's workspace (about two
#: ``W_E``-sized buffers) stays the analysis' peak, but no fewer than 2^20 (4 MiB in float32), so
#: small models go in one batch. Batching cuts the number of small LAPACK calls (a few dozen per
#: batch), whose fixed costs dominate per-layer work on 2 threads: all 12 layers of GPT-2 small
#: go in one batch, GPT-2 XL's 48 in batches of 7.
BATCH_SHARE_OF_W_E = 0.25
BATCH_MIN_ELEMENTS = 1 << 20


def _layer_batches(weights: AttentionWeights, at_least: int = 1) -> list[slice]:
    """Consecutive slices of layers, each within the budget above (at least one layer each), and
    at least ``at_least`` of them where there are that many layers (one per rank)."""
    per_layer = weights.n_heads * weights.d_model * weights.d_head
    budget = max(BATCH_SHARE_OF_W_E * weights.W_E.numel(), BATCH_MIN_ELEMENTS)
    size = max(1, min(weights.n_layers, int(budget // max(per_layer, 1)), -(-weights.n_layers // at_least)))
    return [slice(start, min(start + size, weights.n_layers)) for start in range(0, weights.n_layers, size)]


def _concat(parts: list[CircuitMetrics]) -> CircuitMetrics:
    """Join metrics along their leading (layer) dim."""
    return CircuitMetrics(*(torch.cat([getattr(p, f) for p in parts]) for f in CircuitMetrics.__dataclass_fields__))


def _heads(metrics: CircuitMetrics) -> CircuitMetrics:
    """Metrics of leading shape (n, n_kv, group) as (n, n_heads) (:func:`~lowrank_op.circuits.weights.ungrouped`)."""
    return CircuitMetrics(*(ungrouped(getattr(metrics, f)) for f in CircuitMetrics.__dataclass_fields__))


def _measure_layers(weights: AttentionWeights, name: str, reduction: shared_bases.OuterReduction,
                    layers: slice, part: LayerWeights) -> CircuitMetrics:
    """One circuit's metrics for a batch of layers (``part``, read from ``layers``), leading shape
    (layers, n_heads). Should anything come out non-finite, the batch is measured again layer by
    layer, so that the error names the first layer at fault (and a failure of the batched
    decomposition alone costs only the redo)."""
    title, factor_names, _ = CIRCUIT_PARTS[name]
    try:
        return _heads(_measure_reduced(reduction, *_batch_factors(part, name, weights.group), title, factor_names))
    except NonFiniteResultError:
        pass
    parts = []
    for j, layer in enumerate(range(layers.start, layers.stop)):
        what = f"layer {layer}'s {title} (from {_sources(weights, name, layer)})"
        parts.append(_heads(_measure_reduced(reduction, *_batch_factors(part, name, weights.group, j), what,
                                             factor_names)))
    return _concat(parts)


def analyze(weights: AttentionWeights, on_layer: Callable[[int], None] | None = None, directions: int = 0,
            tokens: int = DEFAULT_TOKENS, group: object = None) -> CircuitReport:
    """Measure the OV and QK circuits of every head, through one QR of ``W_E`` shared by all of them.

    Parameters
    ----------
    weights : AttentionWeights
    on_layer : callable, optional
        Called with each layer's index once that layer is measured (for progress reports; layers
        are measured in batches, see ``BATCH_SHARE_OF_W_E``, and reported in order after each).
    directions : int
        Also find each head's top ``directions`` OV singular directions and the ``tokens`` tokens
        each reads and writes (:func:`lowrank_op.circuits.directions.top_directions`); 0: not.
    tokens : int
    group : torch.distributed ProcessGroup, optional
        Run as one of the group's ranks (``torchrun``; :func:`_sharded_reductions`): ``W_E`` and
        ``W_U`` are factorised by TSQR over row (column) shards, one per rank
        (:func:`lowrank_op.distributed.sharded_outer_reduction`: only ``d_model x d_model``
        blocks cross ranks), the batches of layers are dealt out to the ranks in turn, and every
        rank gets the whole report. Every rank must hold the same weights. The layers each rank
        measured are in the report's ``layers_by_rank``.

    Returns
    -------
    CircuitReport

    Raises
    ------
    ValueError
        When a weight holds NaN or infinity (:func:`require_finite_weights`; a checkpoint's
        loader raises CheckpointError, a ValueError, as it reads the tensor instead).
    NonFiniteResultError
        When finite weights give a reduced factor, singular value or eigenvalue that is not finite
        (an overflow of the working precision); the message names the layer (where there is one),
        the circuit, the factor or result, and the checkpoint's tensors it comes from.

    Notes
    -----
    The circuits ``W_E (A B) W_U`` (OV: ``A = W_V``, ``B = W_O``, ``W_U``; QK: ``A = W_Q``,
    ``B = W_K^T``, ``W_E^T`` for ``W_U``) share their outer factors, which are reduced once
    (:func:`lowrank_op.shared_bases.reduce_outer`): ``W_E = Q_E R_E`` by one QR, ``W_U^H = Q_U R_U``
    by a second only when ``W_U`` is not ``W_E^T`` (tied embeddings and the QK circuits use
    ``R_E``), and, for an untied OV circuit's eigenvalues, ``G = W_U W_E`` (d_model x d_model).
    Then, for every head of a batch of layers at once, only ``d_model``-sized kernels: the core
    factors ``X = R_E A`` and ``Y = B R_U^H`` (d_model x d_head and d_head x d_model per head),
    whose product has the circuit's singular values (``S = kernels.svdvals(X, Y)``; the norm is
    their 2-norm), and eigenvalues from the d_head x d_head ``Y X`` (``W_U = W_E^T`` and QK:
    ``B R_E^H R_E A = B W_E^T W_E A``) or ``B (G A)`` (untied OV).

    Time: the QR of ``W_E`` (``O(d_vocab d_model^2)``; in float32 on 2 idle threads about 1 s of
    the analysis' 1.7 s at GPT-2 small's shapes, a third of its 18 s at GPT-2 XL's; twice that,
    plus ``G``, untied), then per layer about ``4 n_heads d_model^2 d_head`` multiply-adds (``6``
    untied) and ``O(n_heads d_model d_head^2)`` for the cores' QRs: ``d_vocab / d_model`` (65 at GPT-2 small) times fewer than forming the
    factors ``W_E W_V`` and ``W_O W_U`` (``4 n_heads d_vocab d_model d_head`` per layer), which is
    never done. Memory beyond the weights: the factorisation's workspace while ``W_E`` (and
    ``W_U^H``) is factorised, about two ``d_vocab x d_model`` buffers (0.29 GiB in float32 at
    GPT-2 small), freed after; then, per batch of layers, the core factors and their QRs'
    workspace, a few buffers of at most a quarter of ``W_E`` each. Nothing
    ``n_heads x d_vocab x d_head`` is allocated. ``R_E``, ``R_U`` and ``G`` stay in the shared
    cache (:mod:`lowrank_op._cache`) while the weights live.
    """
    if not weights.finite_checked:  # a checkpoint's tensors were checked as they were read
        require_finite_weights(weights)
    if group is not None:
        reductions = _sharded_reductions(weights, group)
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    else:
        reductions = {}
        for name in ("ov", "qk"):
            title = CIRCUIT_PARTS[name][0]
            U_name = "W_U" if name == "ov" else "W_E^T"
            reductions[name] = _reduce(*_outer(weights, name), f"the {title} (from {_sources(weights, name, None)})",
                                       ("W_E", U_name))
        rank, world = 0, 1
    batches = _layer_batches(weights, at_least=world)
    measured: dict[int, tuple] = {}
    failure = None
    for index in range(rank, len(batches), world):
        layers = batches[index]
        try:
            measured[index] = _measure_batch(weights, reductions, layers, directions, tokens)
        except (ValueError, NonFiniteResultError) as err:
            if group is None:
                raise
            failure = err  # every rank raises it below, rather than leaving the others waiting
            break
        if on_layer is not None:
            for layer in range(layers.start, layers.stop):
                on_layer(layer)
    if group is not None:
        measured, failure = _gather_batches(measured, failure, group)
        if failure is not None:
            raise failure
    by_rank = {r: [layer for i in range(r, len(batches), world) for layer in range(batches[i].start, batches[i].stop)]
               for r in range(world)}
    parts = [measured[i] for i in range(len(batches))]
    results = {"ov": [p[0] for p in parts], "qk": [p[1] for p in parts]}
    found = [d for p in parts for d in p[2]]
    return CircuitReport(ov=_concat(results["ov"]), qk=_concat(results["qk"]),
                         directions=Directions.cat(found) if found else None, layers_by_rank=by_rank)
