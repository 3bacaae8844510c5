"""The OV and QK circuits of a transformer's attention heads, and what is measured on them.

With TransformerLens's row-vector convention, head ``h`` of layer ``l`` has

- the OV circuit ``W_E W_V W_O W_U``, shape (d_vocab, d_vocab): how attending to a token changes
  the logits, and
- the QK circuit ``W_E W_Q W_K^T W_E^T``, shape (d_vocab, d_vocab): the attention score between a
  query token and a key token (Elhage et al., 2021, "A Mathematical Framework for Transformer
  Circuits").

Both have rank at most ``d_head``. They are built here only with FactoredMatrix's operators
(``W_E @ FactoredMatrix(W_V, W_O) @ W_U``), which keep the ``d_head``-wide inner dim, so nothing of
size ``d_vocab x d_vocab`` is ever formed, and measured with its factored kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_op import kernels
from lowrank_op.checkpoints import AttentionWeights
from lowrank_op.errors import NonFiniteResultError
from lowrank_op.factored import FactoredMatrix


# --- Building the circuits ------------------------------------------------------------------------
def _at(W: Tensor, layer: int | None) -> Tensor:
    return W if layer is None else W[layer]


def ov_circuit(weights: AttentionWeights, layer: int | None = None) -> FactoredMatrix:
    """The OV circuits ``W_E W_V W_O W_U`` of every head, as one FactoredMatrix.

    Parameters
    ----------
    weights : AttentionWeights
    layer : int, optional
        One layer; all layers when None.

    Returns
    -------
    FactoredMatrix, shape (n_heads, d_vocab, d_vocab), or (n_layers, n_heads, d_vocab, d_vocab)
        Factors ``W_E W_V`` (..., d_vocab, d_head) and ``W_O W_U`` (..., d_head, d_vocab).

    Notes
    -----
    Cost ``O(d_vocab d_model d_head)`` time and ``2 d_vocab d_head`` memory per head: 1.85 GB per
    factor in float32 for all 144 heads of GPT-2 small, 154 MB per factor for one layer. Build
    one layer at a time when memory matters.
    """
    return weights.W_E @ FactoredMatrix(_at(weights.W_V, layer), _at(weights.W_O, layer)) @ weights.W_U


def qk_circuit(weights: AttentionWeights, layer: int | None = None) -> FactoredMatrix:
    """The QK circuits ``W_E W_Q W_K^T W_E^T`` of every head, as one FactoredMatrix.

    Rows are query tokens, columns key tokens. Shapes and costs as :func:`ov_circuit`.
    """
    W_K = _at(weights.W_K, layer)
    return weights.W_E @ FactoredMatrix(_at(weights.W_Q, layer), W_K.mT) @ weights.W_E.mT


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


def circuit_metrics(circuit: FactoredMatrix, what: str = "the circuit",
                    factor_names: tuple[str, str] = ("left factor", "right factor")) -> CircuitMetrics:
    """Norm, singular values, effective rank and eigenvalue positivity of square FactoredMatrix objects.

    Parameters
    ----------
    circuit : FactoredMatrix, shape (..., n, n), with mdim ``m``
    what : str
        Names the circuit in error messages.
    factor_names : (str, str)
        Name ``A`` and ``B`` in error messages (``"W_E W_V"``, ...).

    Raises
    ------
    NonFiniteResultError
        When a factor, the singular values or the eigenvalues hold NaN or infinity (an overflow of
        the working precision), naming ``what``.

    Notes
    -----
    Everything comes from the factors (``A`` (..., n, m), ``B`` (..., m, n)): singular values from
    QR of both factors and a values-only SVD of the ``m x m`` core
    (:func:`lowrank_op.kernels.svdvals`), the Frobenius norm as their 2-norm (no second
    factorisation), eigenvalues from the ``m x m`` ``B A`` (:func:`lowrank_op.kernels.eigvals`;
    the positivity is a sum, so their order does not matter). Cost ``O(n m^2 + m^3)`` per matrix.
    """
    A, B = circuit.A, circuit.B
    _require_finite(A, f"{what}: the factor {factor_names[0]}")
    _require_finite(B, f"{what}: the factor {factor_names[1]}")
    try:
        S = kernels.svdvals(A, B)
        eigenvalues = kernels.eigvals(A, B)
    except torch.linalg.LinAlgError as err:  # finite factors whose core overflows can fail to converge
        raise NonFiniteResultError(
            f"{what}: the decomposition failed ({err}); the factors are finite, so their product "
            f"overflowed {str(A.dtype).removeprefix('torch.')}: compute in float64 (--dtype float64), or "
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


@dataclass(frozen=True)
class CircuitReport:
    """Measurements of every head's OV and QK circuits; leading shape (n_layers, n_heads)."""

    ov: CircuitMetrics
    qk: CircuitMetrics


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


def require_finite_weights(weights: AttentionWeights) -> None:
    """ValueError naming the first weight (and layer) that holds NaN or infinity."""
    for symbol in ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_U"):
        W = getattr(weights, symbol)
        finite = torch.isfinite(W).flatten(1).all(-1) if W.ndim == 4 else torch.isfinite(W).all().reshape(1)
        if not bool(finite.all()):
            layer = int((~finite).nonzero()[0]) if W.ndim == 4 else None
            raise ValueError(
                f"`{symbol}` ({_tensor_name(weights, symbol, layer)}) holds NaN or infinity"
                + (f" in layer {layer}" if layer is not None else "")
                + "; the circuits of such weights are undefined."
            )


def analyze(weights: AttentionWeights, on_layer: Callable[[int], None] | None = None) -> CircuitReport:
    """Measure the OV and QK circuits of every head, one layer and one circuit at a time.

    Parameters
    ----------
    weights : AttentionWeights
    on_layer : callable, optional
        Called with the layer's index after each layer (for progress reports).

    Returns
    -------
    CircuitReport

    Raises
    ------
    ValueError
        When a weight holds NaN or infinity (:func:`require_finite_weights`).
    NonFiniteResultError
        When finite weights give a circuit factor, singular value or eigenvalue that is not finite
        (an overflow of the working precision); the message names the layer, the circuit, the
        factor or result, and the checkpoint's tensors it comes from.

    Notes
    -----
    Per layer, the OV circuits of all heads are built (:func:`ov_circuit`), measured
    (:func:`circuit_metrics`) and freed, then the QK circuits. The extra memory is one circuit's
    factors for one layer, ``2 n_heads d_vocab d_head`` numbers (0.29 GiB in float32 at GPT-2
    small's shapes), plus the decompositions' workspace of about one more factor; building all
    layers at once would take ``n_layers`` times as much and is no faster on CPU.
    Time: ``4 n_layers n_heads d_vocab d_model d_head`` multiply-adds to form the factors,
    which dominate, plus ``O(d_vocab d_head^2)`` per head to measure them.
    """
    require_finite_weights(weights)
    builders = {"ov": ov_circuit, "qk": qk_circuit}
    results: dict[str, list[CircuitMetrics]] = {"ov": [], "qk": []}
    for layer in range(weights.n_layers):
        for name, build in builders.items():
            title, factor_names, symbols = CIRCUIT_PARTS[name]
            sources = ", ".join(dict.fromkeys(f"`{_tensor_name(weights, s, layer)}`" for s in symbols))
            circuit = build(weights, layer)
            results[name].append(circuit_metrics(circuit, f"layer {layer}'s {title} (from {sources})", factor_names))
            del circuit
        if on_layer is not None:
            on_layer(layer)
    return CircuitReport(ov=CircuitMetrics.stack(results["ov"]), qk=CircuitMetrics.stack(results["qk"]))
