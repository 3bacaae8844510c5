"""Scores computed from FactoredMatrix objects, as interpretability work uses them."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lowrank_op import choices, kernels, pairwise_norms, settings
from lowrank_op._checks import check_broadcast, check_choice
from lowrank_op.factored import FactoredMatrix
from lowrank_op.outer_factored import OuterFactoredMatrix

COMPOSITION_METHODS = ("auto", "gram", "product")


def composition_scores(
    left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True, method: str = "auto"
) -> Tensor:
    """TransformerLens's composition score ``|L R|_F / (|L|_F |R|_F)`` of ``left @ right``.

    Parameters
    ----------
    left : FactoredMatrix, shape (*left_leading, ldim, k)
    right : FactoredMatrix, shape (*right_leading, k, rdim)
    broadcast_dims : bool
        If true (the default, as in TransformerLens), every leading index of ``left`` is paired with
        every leading index of ``right``: the result has shape ``(*left_leading, *right_leading)``.
        If false, the leading dims broadcast against each other as in ``left @ right``.
    method : {"auto", "gram", "product"}
        ``"product"``: the norm of each pair's product ``left.A (left.B right.A) right.B``, kept
        factored (below). ``"gram"``: every pair's norm from the ``k x k`` Gram matrices of the
        two sides, in float64, each pair certified against its own rounding bound and recomputed
        directly where the bound is not met (:mod:`lowrank_op.pairwise_norms`); it needs
        ``broadcast_dims=True``. ``"auto"`` takes ``"gram"`` when ``broadcast_dims`` is true, the
        result is not float64 (a float64 Gram sum cannot certify float64 accuracy), no factor
        requires grad, neither side is an :class:`~lowrank_op.outer_factored.OuterFactoredMatrix`
        (whose outer factors ``"gram"`` would form), and its multiply-adds, counted twice for
        float64, are fewer than ``"product"``'s; else ``"product"``. The choice and both counts
        are recorded in :mod:`lowrank_op.choices` (operation ``"composition"``).

    Returns
    -------
    Tensor, shape (*left_leading, *right_leading) or the broadcast leading shape
        Real; float32 for 16-bit and 32-bit factors, as :meth:`FactoredMatrix.norm`.

    Raises
    ------
    TypeError
        When ``left`` or ``right`` is not a FactoredMatrix.
    ValueError
        When ``left.rdim != right.ldim``, when ``method`` is not one of the above or is
        ``"gram"`` with ``broadcast_dims=False``, or, with ``broadcast_dims=False``, when the
        leading dims do not broadcast.

    Notes
    -----
    TransformerLens removes the orthogonal factors first (``collapse_l``/``collapse_r``), which
    leaves every norm unchanged, so the scores agree.

    Costs for ``N_l`` left and ``N_r`` right matrices with inner dims ``m1`` and ``m2``:

    - ``"product"``: ``left @ right`` is an :class:`~lowrank_op.outer_factored.OuterFactoredMatrix`
      whose small cores ``left.B right.A`` (``m1 x m2``) for all pairs come from one
      ``(N_l m1) x k x (N_r m2)`` GEMM (:func:`lowrank_op._products.fold_matmul`), and its norm is
      ``|R_A C R_B^H|_F`` per pair, with ``R_A`` and ``R_B`` from one QR of ``left.A`` and of
      ``right.B^H`` per head (:func:`lowrank_op.shared_bases.frobenius_norm`). The pairs' cores
      are the only ``N_l N_r``-sized memory.
    - ``"gram"``: about ``(1 + block / k) / 2 * k^2 (N_l m1 + N_r m2 + N_l N_r)`` float64
      multiply-adds, ``block = settings.pairwise_gram_block``. At GPT-2 small's shapes
      (144 x 144 heads, ``k = 768``, ``m = 64``) that is ``1.3e10`` float64 against ``6.5e10``
      float32 for ``"product"``; bench/bench_composition.py times both against TransformerLens.

    Accuracy: ``"product"`` rounds in the factors' precision (float32 for 32-bit and 16-bit
    inputs), so a score is within a few ``eps`` times ``|L| |R| / |L R|`` of exact; ``"gram"``
    works in float64 and keeps a pair's Gram sum only where its rounding bound certifies the
    score to half the result's ``eps``, so near-zero scores are computed directly.

    Examples
    --------
    >>> import torch, lowrank_op
    >>> W_V, W_O = torch.randn(2, 3, 16, 4), torch.randn(2, 3, 4, 16)
    >>> OV = lowrank_op.FactoredMatrix(W_V, W_O)
    >>> lowrank_op.composition_scores(OV, OV).shape
    torch.Size([2, 3, 2, 3])
    """
    if not isinstance(left, FactoredMatrix) or not isinstance(right, FactoredMatrix):
        raise TypeError(
            f"`left` and `right` must be FactoredMatrix objects, got {type(left).__name__} and "
            f"{type(right).__name__}; wrap a dense matrix W as FactoredMatrix(W, torch.eye(W.shape[-1]))."
        )
    check_choice("method", method, COMPOSITION_METHODS)
    if left.rdim != right.ldim:
        raise ValueError(
            f"composition scores need left.rdim == right.ldim; got `left` of shape {tuple(left.shape)} "
            f"and `right` of shape {tuple(right.shape)}."
        )
    if method == "gram" and not broadcast_dims:
        raise ValueError(
            "`method='gram'` pairs every leading index of `left` with every one of `right` and needs "
            "`broadcast_dims=True`; with `broadcast_dims=False` use `method='product'` or 'auto'."
        )
    if _choose(left, right, broadcast_dims, method) == "gram":
        return _gram_scores(left, right)
    compute = kernels.compute_dtype(torch.promote_types(left.dtype, right.dtype))
    if compute != left.dtype or compute != right.dtype:  # 16-bit: the pairs' cores are formed in float32, not rounded to 16 bits
        left, right = left.to(compute), right.to(compute)
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


def _result_dtype(left: FactoredMatrix, right: FactoredMatrix) -> torch.dtype:
    """The real dtype of the scores: that of the factors' promoted compute dtype."""
    return kernels._real_dtype(kernels.compute_dtype(torch.promote_types(left.dtype, right.dtype)))


def _choose(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool, method: str) -> str:
    """The method ``"auto"`` resolves to (recorded), or ``method`` itself."""
    if method != "auto":
        return method
    N_l, N_r = math.prod(left.shape[:-2]), math.prod(right.shape[:-2])
    k, m1, m2 = left.rdim, left.mdim, right.mdim
    p, q = min(left.ldim, m1), min(right.rdim, m2)
    block = min(settings.pairwise_gram_block.value(), max(k, 1))
    gram_cost = 2 * (1 + block / max(k, 1)) / 2 * k * k * (N_l * p + N_r * q + N_l * N_r)
    product_cost = N_l * N_r * m1 * k * m2
    if not broadcast_dims:
        chosen, why = "product", "broadcast_dims=False pairs the leading dims one to one"
    elif _result_dtype(left, right) == torch.float64:
        chosen, why = "product", "a float64 result, which a float64 Gram sum cannot certify"
    elif torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in (*left._args, *right._args)):
        chosen, why = "product", "a factor requires grad"
    elif isinstance(left, OuterFactoredMatrix) or isinstance(right, OuterFactoredMatrix):
        chosen, why = "product", "an OuterFactoredMatrix operand, whose outer factors 'gram' would form"
    else:
        chosen = "gram" if gram_cost < product_cost else "product"
        why = "fewer" if chosen == "gram" else "not fewer"
        why = f"'gram' needs {gram_cost:.3g} multiply-adds (float64 counted twice), {why} than 'product''s {product_cost:.3g}"
    choices.record("composition", chosen, f"{why}.")
    return chosen


def _gram_scores(left: FactoredMatrix, right: FactoredMatrix) -> Tensor:
    """Scores of every left matrix against every right one by :mod:`lowrank_op.pairwise_norms`."""
    lead_l, lead_r = left.shape[:-2], right.shape[:-2]
    k = left.rdim
    P = pairwise_norms.row_reduction(left.A, left.B)
    Qt = pairwise_norms.row_reduction(right.B.mH, right.A.mH)
    P = P.expand(*lead_l, *P.shape[-2:]).reshape(math.prod(lead_l), P.shape[-2], k)
    Qt = Qt.expand(*lead_r, *Qt.shape[-2:]).reshape(math.prod(lead_r), Qt.shape[-2], k)
    dtype = _result_dtype(left, right)
    norms, n_direct = pairwise_norms.pairwise_product_norms(P, Qt, tol=torch.finfo(dtype).eps)
    choices.record(
        "composition_pairs", "direct" if n_direct else "gram",
        f"{n_direct} of {norms.numel()} pair(s) not certified by the Gram sum's rounding bound, computed directly.",
    )
    left_norms = torch.linalg.matrix_norm(P)
    right_norms = torch.linalg.matrix_norm(Qt)
    scores = norms / (left_norms[:, None] * right_norms[None, :])
    return scores.reshape((*lead_l, *lead_r)).to(dtype)
