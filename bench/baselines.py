"""The baselines every lowrank_op case is timed beside, as plain functions of the factors.

- ``tl_*``: the method of TransformerLens's ``FactoredMatrix``: an SVD of each factor, an SVD of
  the ``mdim x mdim`` middle ``diag(Sa) Va^T Ub diag(Sb)``, composed. Its singular values are that
  SVD's (TransformerLens has no values-only path), its norm is ``sqrt(sum(S^2))`` of them, its
  eigenvalues ``torch.linalg.eig(B @ A)``. Written here with ``torch.linalg.svd(...,
  full_matrices=False)``, which is what the deprecated ``torch.svd`` calls. ``tl_svd_tall`` is
  the same method with the SVD of ``B^T`` in place of ``B`` (not TransformerLens's code).
  ``tl_composition_scores`` is ``transformer_lens.utilities.composition_scores``:
  ``collapse_l``/``collapse_r`` from that SVD, then the dense broadcast product of the collapsed
  factors and three dense norms.
- ``dense_*``: torch.linalg on the formed ``A @ B`` (forming it is part of the timed cost, since a
  caller holding factors has to pay it).
- ``two_qrs``: the two reduced Householder QRs (of ``A`` and of ``B^T``) alone, the floor of a
  QR-based factored SVD. ``two_grams``: ``A^T A`` and ``B B^T`` alone, the floor of Gram methods.
"""

from __future__ import annotations

import torch
from torch import Tensor


# --- TransformerLens's SVD-of-both-factors method -------------------------------------------------
def tl_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, S, V)`` of ``A @ B`` by three SVDs; ``V`` holds right singular vectors as columns."""
    U_a, S_a, Vh_a = torch.linalg.svd(A, full_matrices=False)
    U_b, S_b, Vh_b = torch.linalg.svd(B, full_matrices=False)
    middle = (S_a[..., :, None] * Vh_a) @ U_b * S_b[..., None, :]
    U_m, S_m, Vh_m = torch.linalg.svd(middle)
    return U_a @ U_m, S_m, Vh_b.mH @ Vh_m.mH


def tl_svd_tall(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`tl_svd` with the SVD of the tall ``B^T`` instead of the wide ``B`` (same maths).

    Not TransformerLens's code: a fairer both-factors baseline, since torch's SVD of a wide
    ``(64, n)`` matrix is several times slower than of its transpose on this machine.
    """
    U_a, S_a, Vh_a = torch.linalg.svd(A, full_matrices=False)
    V_b, S_b, Uh_b = torch.linalg.svd(B.mT, full_matrices=False)  # B = Uh_b^T diag(S_b) V_b^T
    middle = (S_a[..., :, None] * Vh_a) @ Uh_b.mT * S_b[..., None, :]
    U_m, S_m, Vh_m = torch.linalg.svd(middle)
    return U_a @ U_m, S_m, V_b @ Vh_m.mH


def tl_svdvals(A: Tensor, B: Tensor) -> Tensor:
    """TransformerLens's ``S``: the singular values of :func:`tl_svd`, vectors computed too."""
    return tl_svd(A, B)[1]


def tl_norm(A: Tensor, B: Tensor) -> Tensor:
    """TransformerLens's ``norm()``: ``sqrt(sum(S^2))`` from :func:`tl_svd`."""
    return tl_svd(A, B)[1].pow(2).sum(-1).sqrt()


def tl_eigenvalues(A: Tensor, B: Tensor) -> Tensor:
    """TransformerLens's ``eigenvalues``: ``torch.linalg.eig(B @ A).eigenvalues``, unsorted."""
    return torch.linalg.eig(B @ A).eigenvalues


def tl_composition_scores(left_A: Tensor, left_B: Tensor, right_A: Tensor, right_B: Tensor) -> Tensor:
    """TransformerLens's ``composition_scores(left, right, broadcast_dims=True)`` for
    ``left = FactoredMatrix(left_A, left_B)`` and ``right = FactoredMatrix(right_A, right_B)``.

    Its algorithm, step by step: every leading dim of ``left`` is paired with every one of
    ``right`` by unsqueezing both factors (``right`` at the front, ``left`` after its own dims);
    ``right.collapse_r() = U diag(S)`` (ldim x mdim) and ``left.collapse_l() = diag(S) V^T``
    (mdim x rdim) from :func:`tl_svd` of the unsqueezed factors; the score is
    ``|collapse_l @ collapse_r|_F / |collapse_r|_F / |collapse_l|_F``, the product formed densely
    by ``torch.matmul`` with its broadcasting (one ``mdim x k x mdim`` product per pair, each
    operand expanded to every pair). Real factors (TransformerLens transposes without conjugating).

    Shapes: ``left_A`` (*lead_l, n, m1), ``left_B`` (*lead_l, m1, k), ``right_A`` (*lead_r, k, m2),
    ``right_B`` (*lead_r, m2, r), each pair of factors with the same number of leading dims;
    returns (*lead_l, *lead_r).
    """
    l_leading = len(torch.broadcast_shapes(left_A.shape[:-2], left_B.shape[:-2]))
    r_leading = len(torch.broadcast_shapes(right_A.shape[:-2], right_B.shape[:-2]))
    for i in range(l_leading):
        right_A, right_B = right_A.unsqueeze(i), right_B.unsqueeze(i)
    for i in range(r_leading):
        left_A, left_B = left_A.unsqueeze(i + l_leading), left_B.unsqueeze(i + l_leading)
    U_r, S_r, _ = tl_svd(right_A, right_B)
    new_right = U_r * S_r[..., None, :]  # collapse_r
    _, S_l, V_l = tl_svd(left_A, left_B)
    new_left = S_l[..., :, None] * V_l.mT  # collapse_l
    r_norms = new_right.norm(dim=[-2, -1])
    l_norms = new_left.norm(dim=[-2, -1])
    comp_norms = (new_left @ new_right).norm(dim=[-2, -1])
    return comp_norms / r_norms / l_norms


# --- Dense torch on the formed product ------------------------------------------------------------
def dense_svd(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(A @ B, full_matrices=False)


def dense_svdvals(A: Tensor, B: Tensor) -> Tensor:
    return torch.linalg.svdvals(A @ B)


def dense_norm(A: Tensor, B: Tensor) -> Tensor:
    return torch.linalg.matrix_norm(A @ B)


def dense_eigvals(A: Tensor, B: Tensor) -> Tensor:
    return torch.linalg.eigvals(A @ B)


# --- Floors: the factorisations alone -------------------------------------------------------------
def two_qrs(A: Tensor, B: Tensor) -> tuple:
    """Reduced Householder QR of ``A`` and of ``B^T``, Q formed (what ``svd()`` needs)."""
    return torch.linalg.qr(A), torch.linalg.qr(B.mT)


def two_qrs_r_only(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """R factors only (``mode="r"``) of ``A`` and ``B^T`` (what a values-only path needs)."""
    return torch.linalg.qr(A, mode="r")[1], torch.linalg.qr(B.mT, mode="r")[1]


def two_grams(A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """``A^T A`` and ``B B^T``, each ``mdim x mdim``."""
    return A.mT @ A, B @ B.mT
