"""What each head reads and writes: the tokens of its OV circuit's top singular directions.

The OV circuit ``M = W_E W_V W_O W_U`` (d_vocab x d_vocab) maps an attended token (a row) to the
logits the head adds (a row vector over the vocabulary). Its SVD ``M = sum_i s_i u_i v_i^T`` pairs
a direction ``u_i`` over attended tokens ("reads") with a direction ``v_i`` over output tokens
("writes"): attending to token ``t`` adds ``s_i (u_i)_t v_i`` to the logits. The top tokens of
``u_i`` and ``v_i`` say what the direction does (Millidge and Black, 2022, "The Singular Value
Decompositions of Transformer Weight Matrices are Highly Interpretable").

A singular pair is defined up to a common sign; it is fixed here so that the entry of largest
magnitude of ``v_i`` is positive. Then the top tokens of each side are its largest entries: the
tokens whose attention most raises ``v_i``'s top logits, and those logits.

Computation, never forming ``M`` or anything vocabulary-sized per head
-----------------------------------------------------------------------
With the shared reductions of :func:`lowrank_op.shared_bases.reduce_outer` (``W_E = Q_E R_E``,
``W_U^H = Q_U R_U``), ``M = Q_E (X Y) Q_U^H`` with the core ``X = R_E W_V``, ``Y = W_O R_U^H``
(d_model-sized). The core's SVD (:func:`lowrank_op.kernels.svd`) gives ``U_c``, ``S``, ``V_c``;
the circuit's vectors are ``u = Q_E U_c = W_E (R_E^{-1} U_c)`` and ``v = W_U^H (R_U^{-1} V_c)``,
for the top ``n_directions`` columns only: one ``(d_vocab x d_model) @ (d_model x columns)`` GEMM
per side for a whole batch of layers, then a top-k over the vocabulary. ``Q_E`` is never formed
unless ``R_E`` is too ill-conditioned for the triangular solve to give orthonormal vectors (checked
per head: ``|u^H u - I|`` above ``sqrt(eps)``); then the cached basis' ``Q`` is used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lowrank_op import kernels, shared_bases
from lowrank_op._products import fold_matmul
from lowrank_op.circuits.weights import ungrouped
from lowrank_op.shared_bases import OuterReduction

#: Directions reported per head unless ``--directions`` says otherwise.
DEFAULT_DIRECTIONS = 3
#: Tokens listed per side of each direction unless ``--tokens`` says otherwise.
DEFAULT_TOKENS = 10


@dataclass(frozen=True)
class Directions:
    """The top singular directions of every head's OV circuit; leading shape (n_layers, n_heads).

    Attributes
    ----------
    singular_values : Tensor, shape (..., n)
    reads_ids, writes_ids : Tensor (int64), shape (..., n, k)
        Token ids of the ``k`` largest entries of ``u_i`` (reads) and ``v_i`` (writes), descending.
    reads_weights, writes_weights : Tensor, shape (..., n, k)
        Those entries (of unit vectors, with the sign fixed as the module says).
    """

    singular_values: Tensor
    reads_ids: Tensor
    reads_weights: Tensor
    writes_ids: Tensor
    writes_weights: Tensor

    @staticmethod
    def cat(parts: list[Directions]) -> Directions:
        return Directions(*(torch.cat([getattr(p, f) for p in parts]) for f in Directions.__dataclass_fields__))

    def flat_heads(self) -> Directions:
        """Leading dims (n, n_kv, group) as (n, n_heads) (:func:`~lowrank_op.circuits.weights.ungrouped`)."""
        return Directions(*(ungrouped(getattr(self, f)) for f in Directions.__dataclass_fields__))


def _lift(outer: Tensor, triangular: Tensor, Z: Tensor, upper: bool) -> Tensor:
    """``outer @ inv(triangular) @ Z`` for every column of ``Z`` (..., p, c) at once: (..., n, c),
    one GEMM for all of them (:func:`lowrank_op._products.fold_matmul`).

    ``outer`` (n, p) is tall and ``triangular`` (p, p) its R (``upper``) or R^H; with a non-tall
    outer factor (no basis) ``Z`` is returned as it is, being already ``n``-dimensional."""
    if outer.shape[-2] <= outer.shape[-1]:
        return Z
    return fold_matmul(outer, torch.linalg.solve_triangular(triangular, Z, upper=upper))


def _orthonormal(V: Tensor) -> Tensor:
    """Per matrix (..., n, c): whether its columns are orthonormal to ``sqrt(eps)``."""
    gram = V.mH @ V
    eye = torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    return ((gram - eye).abs().amax((-2, -1)) <= math.sqrt(torch.finfo(V.dtype).eps)) & torch.isfinite(gram).all(-1).all(-1)


def _lift_side(outer: Tensor, triangular: Tensor, upper: bool, Z: Tensor) -> Tensor:
    """:func:`_lift`, through the cached basis' ``Q`` where the triangular solve lost orthonormality."""
    V = _lift(outer, triangular, Z, upper)
    if outer.shape[-2] > outer.shape[-1] and not bool(_orthonormal(V).all()):
        V = fold_matmul(shared_bases.basis(outer, want_q=True).Q, Z)  # outer = Q R: the well-conditioned route
    return V


def top_directions(W_E: Tensor, W_U: Tensor, reduction: OuterReduction, W_V: Tensor, W_O: Tensor,
                   n_directions: int, n_tokens: int) -> Directions:
    """The top singular directions of the OV circuits ``W_E W_V W_O W_U`` of a batch of heads.

    Parameters
    ----------
    W_E : Tensor, shape (d_vocab, d_model)
    W_U : Tensor, shape (d_model, d_vocab)
    reduction : OuterReduction
        ``reduce_outer(W_E, W_U)``.
    W_V : Tensor, shape (..., d_model, d_head)
    W_O : Tensor, shape (..., d_head, d_model)
        Leading dims broadcast (GQA: a key/value head's ``W_V`` against its group's ``W_O``).
    n_directions, n_tokens : int
        Directions per head (at most the circuit's rank bound), tokens per side (at most d_vocab).

    Returns
    -------
    Directions
        Leading shape: the broadcast leading dims.

    Notes
    -----
    Cost: the core SVD, ``O(d_model d_head^2)`` per head; two ``d_vocab x d_model x c`` GEMMs for
    ``c = heads x n_directions`` columns; two top-k over ``d_vocab x c``. Memory: the two lifted
    ``d_vocab x c`` blocks (the caller batches layers to bound them).
    """
    X, Y = reduction.core(W_V, W_O)
    U_c, S, V_c = kernels.svd(X, Y)
    n = min(n_directions, S.shape[-1])
    U_c, S, V_c = U_c[..., :n], S[..., :n], V_c[..., :n]
    work = U_c.dtype
    W_E_, W_U_ = kernels.promote(W_E, W_U)
    u = _lift_side(W_E_, reduction.left.to(work), True, U_c)  # (..., d_vocab, n)
    # W_U^H = Q_U R_U, reduction.right = R_U^H: solve with R_U (upper)
    v = _lift_side(W_U_.mH, reduction.right.mH.to(work), True, V_c)
    if u.is_complex() or v.is_complex():  # circuits of real weights are real; keep the real parts' order
        u, v = u.real, v.real
    largest = v.abs().argmax(-2, keepdim=True)
    sign = torch.sign(torch.gather(v, -2, largest))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u, v = u * sign, v * sign
    k = min(n_tokens, u.shape[-2])
    reads = torch.topk(u.movedim(-1, -2), k, dim=-1)
    writes = torch.topk(v.movedim(-1, -2), k, dim=-1)
    return Directions(S, reads.indices, reads.values, writes.indices, writes.values)
