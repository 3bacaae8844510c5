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
