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

from lowrank_op.checkpoints import AttentionWeights
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


def circuit_metrics(circuit: FactoredMatrix) -> CircuitMetrics:
    """Norm, singular values, effective rank and eigenvalue positivity of square FactoredMatrix objects.

    Notes
    -----
    Everything comes from the factors (``A`` (..., n, m), ``B`` (..., m, n)): the norm from two
    ``m x m`` Gram matrices, singular values from QR of both factors and a values-only SVD of the
    ``m x m`` core, eigenvalues from the ``m x m`` ``B A``. Cost ``O(n m^2 + m^3)`` per matrix.
    """
    S = circuit.S
    return CircuitMetrics(
        norm=circuit.norm(),
        singular_values=S,
        effective_rank=effective_rank(S),
        eigenvalue_positivity=eigenvalue_positivity(circuit.eigenvalues),
    )


@dataclass(frozen=True)
class CircuitReport:
    """Measurements of every head's OV and QK circuits; leading shape (n_layers, n_heads)."""

    ov: CircuitMetrics
    qk: CircuitMetrics


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
    ov, qk = [], []
    for layer in range(weights.n_layers):
        circuit = ov_circuit(weights, layer)
        ov.append(circuit_metrics(circuit))
        del circuit
        circuit = qk_circuit(weights, layer)
        qk.append(circuit_metrics(circuit))
        del circuit
        if on_layer is not None:
            on_layer(layer)
    return CircuitReport(ov=CircuitMetrics.stack(ov), qk=CircuitMetrics.stack(qk))
