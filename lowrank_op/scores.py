"""Scores computed from FactoredMatrix objects, as interpretability work uses them."""

from __future__ import annotations

from torch import Tensor

from lowrank_op._checks import check_broadcast
from lowrank_op.factored import FactoredMatrix


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> Tensor:
    """TransformerLens's composition score ``|L R|_F / (|L|_F |R|_F)`` of ``left @ right``.

    Parameters
    ----------
    left : FactoredMatrix, shape (*left_leading, ldim, k)
    right : FactoredMatrix, shape (*right_leading, k, rdim)
    broadcast_dims : bool
        If true (the default, as in TransformerLens), every leading index of ``left`` is paired with
        every leading index of ``right``: the result has shape ``(*left_leading, *right_leading)``.
        If false, the leading dims broadcast against each other as in ``left @ right``.

    Returns
    -------
    Tensor, shape (*left_leading, *right_leading) or the broadcast leading shape

    Raises
    ------
    TypeError
        When ``left`` or ``right`` is not a FactoredMatrix.
    ValueError
        When ``left.rdim != right.ldim``, or, with ``broadcast_dims=False``, when the leading dims
        do not broadcast.

    Notes
    -----
    All three norms are factored (:meth:`FactoredMatrix.norm`); nothing of size ``ldim x rdim`` is
    formed. TransformerLens removes the orthogonal factors first (``collapse_l``/``collapse_r``),
    which leaves every norm unchanged, so the scores agree.

    For every pair of heads (``left = OV``, ``right = QK`` with leading dims ``(L, H)`` each),
    ``left @ right`` is an :class:`~lowrank_op.outer_factored.OuterFactoredMatrix`
    ``left.A (left.B right.A) right.B`` whose small cores ``left.B right.A`` (``m1 x m2``) for all
    pairs come from one ``(L H m1) x k x (L H m2)`` GEMM (:func:`lowrank_op._products.fold_matmul`),
    and its norm is ``|R_A C R_B^H|_F`` per pair, with ``R_A`` and ``R_B`` from one QR of
    ``left.A`` and of ``right.B^H`` per head (:func:`lowrank_op.shared_bases.frobenius_norm`):
    ``O(m1 m2 (m1 + m2))`` per pair after the GEMM's ``O(m1 k m2)``, and the pairs' cores are the
    only ``(L H)^2``-sized memory. TransformerLens multiplies the collapsed ``m1 x k`` and
    ``k x m2`` factors by ``torch.matmul``'s broadcasting, which copies each of them once per
    pair; bench/bench_composition.py times both at GPT-2 small's shapes.
    """
    if not isinstance(left, FactoredMatrix) or not isinstance(right, FactoredMatrix):
        raise TypeError(
            f"`left` and `right` must be FactoredMatrix objects, got {type(left).__name__} and "
            f"{type(right).__name__}; wrap a dense matrix W as FactoredMatrix(W, torch.eye(W.shape[-1]))."
        )
    if left.rdim != right.ldim:
        raise ValueError(
            f"composition scores need left.rdim == right.ldim; got `left` of shape {tuple(left.shape)} "
            f"and `right` of shape {tuple(right.shape)}."
        )
    if broadcast_dims:
        n_left, n_right = left.dim() - 2, right.dim() - 2
        for i in range(n_left):
            right = right.unsqueeze(i)
        for i in range(n_right):
            left = left.unsqueeze(n_left + i)
    else:
        check_broadcast(
            "`left`", left.shape, "`right`", right.shape,
            hint="pass `broadcast_dims=True` to pair every leading index of `left` with every one of `right`.",
        )
    return (left @ right).norm() / (left.norm() * right.norm())
