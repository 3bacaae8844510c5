"""The baselines every lowrank_op case is timed beside, as plain functions of the factors.

- ``tl_*``: the method of TransformerLens's ``FactoredMatrix``: an SVD of each factor, an SVD of
  the ``mdim x mdim`` middle ``diag(Sa) Va^T Ub diag(Sb)``, composed. Its singular values are that
  SVD's (TransformerLens has no values-only path), its norm is ``sqrt(sum(S^2))`` of them, its
  eigenvalues ``torch.linalg.eig(B @ A)``. Written here with ``torch.linalg.svd(...,
  full_matrices=False)``, which is what the deprecated ``torch.svd`` calls. ``tl_svd_tall`` is
  the same method with the SVD of ``B^T`` in place of ``B`` (not TransformerLens's code).
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
