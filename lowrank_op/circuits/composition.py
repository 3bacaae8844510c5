"""How heads compose across layers: Q-, K- and V-composition scores of every pair of heads.

Elhage et al. (2021, "A Mathematical Framework for Transformer Circuits") measure how much a head
in a later layer reads what a head in an earlier layer writes by the composition score
``|W_A W_B|_F / (|W_A|_F |W_B|_F)`` of the earlier head's OV matrix ``W_A = W_V W_O`` (d_model x
d_model) with the later head's

- **Q-composition**: QK matrix ``W_Q W_K^T`` (the earlier head's output feeds the query),
- **K-composition**: ``(W_Q W_K^T)^T = W_K W_Q^T`` (it feeds the key),
- **V-composition**: OV matrix ``W_V W_O`` (it feeds the value),

exactly as TransformerLens's ``HookedTransformer.all_composition_scores`` and ``composition_scores``
define them (``left = OV``, ``right = QK``, ``QK.T`` or ``OV``, every head with every head).

Here they come from :func:`lowrank_op.composition_scores` on FactoredMatrix objects of all heads
at once: its Gram route (:mod:`lowrank_op.pairwise_norms`) at these shapes, ``d_head``-sized row
reductions per head and one float64 pass over ``d_model x d_model`` Gram blocks for all pairs,
never a ``d_model x d_model`` product per pair. With GQA the key/value factors broadcast over their
group, as in :mod:`lowrank_op.circuits.weights`. Only pairs with the source in an earlier layer
than the destination are reported (TransformerLens masks the rest).
"""

from __future__ import annotations

import torch
from torch import Tensor

from lowrank_op.factored import FactoredMatrix
from lowrank_op.scores import composition_scores
from lowrank_op.circuits.weights import AttentionWeights, grouped

MODES = ("q", "k", "v")


def composition(weights: AttentionWeights) -> dict[str, Tensor]:
    """Q-, K- and V-composition scores of every head against every head.

    Parameters
    ----------
    weights : AttentionWeights

    Returns
    -------
    dict
        ``{"q" | "k" | "v": Tensor (n_layers, n_heads, n_layers, n_heads)}``: ``[l1, h1, l2, h2]``
        is the score of source head ``(l1, h1)`` (its OV matrix) into destination ``(l2, h2)``;
        meaningful (and reported) where ``l1 < l2``.

    Notes
    -----
    Reads every layer's attention weights (``(2 n_heads + 2 n_kv_heads) d_model d_head`` numbers
    per layer). Cost per mode: about ``0.56 d_model^2 (N (2 d_head) + N^2)`` float64 multiply-adds
    for ``N`` heads (:func:`lowrank_op.composition_scores`, ``method="auto"``).
    """
    part = weights.read(0, weights.n_layers)
    factors = grouped(part, weights.group)
    ov = FactoredMatrix(*factors["ov"])
    W_Q, W_K_T = factors["qk"]
    rights = {"q": FactoredMatrix(W_Q, W_K_T), "k": FactoredMatrix(W_K_T.mT, W_Q.mT), "v": ov}
    L, H = weights.n_layers, weights.n_heads
    return {mode: composition_scores(ov, right).reshape(L, H, L, H) for mode, right in rights.items()}


def pairs(scores: Tensor) -> list[tuple[int, int, int, int, float]]:
    """``(src_layer, src_head, dst_layer, dst_head, score)`` for every pair with ``src_layer < dst_layer``,
    in that order (source-major)."""
    L, H = scores.shape[:2]
    rows = []
    values = scores.double().tolist()
    for l1 in range(L):
        for h1 in range(H):
            for l2 in range(l1 + 1, L):
                for h2 in range(H):
                    rows.append((l1, h1, l2, h2, values[l1][h1][l2][h2]))
    return rows
