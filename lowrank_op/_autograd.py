"""The autograd functions behind :mod:`lowrank_op.kernels`: first-order gradients of the factored
singular values, norm and SVD that never differentiate a QR factorisation.

Both are exact to first order and refuse a second derivative with a RuntimeError that says so
(:class:`_FirstOrderOnly`), rather than return a Hessian that holds the factors' bases constant.
Pure tensor code, no imports from the package, so :mod:`lowrank_op.kernels` can import it.
"""

from __future__ import annotations

import torch
from torch import Tensor


# --- Second derivatives are refused -------------------------------------------------------------------
_SECOND_ORDER_MESSAGE = (
    "second derivatives through the factored {what} are not supported: its backward holds the "
    "orthonormal bases of the factors constant, which is exact to first order only. For a Hessian "
    "use the dense reference, e.g. torch.linalg.svdvals(fm.AB) or torch.linalg.matrix_norm(fm.AB)."
)


class _FirstOrderOnly(torch.autograd.Function):
    """The identity, whose own backward raises: marks a gradient that must not be differentiated."""

    @staticmethod
    def forward(ctx, x: Tensor, anchor: Tensor, what: str) -> Tensor:
        # ``anchor`` (the factor the gradient belongs to) makes the result part of the graph even
        # when ``x`` was computed from detached tensors only.
        ctx.what = what
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        raise RuntimeError(_SECOND_ORDER_MESSAGE.format(what=ctx.what))


def _first_order(grads: tuple, anchors: tuple, what: str) -> tuple:
    """Gradients as computed, wrapped so that differentiating them again raises (create_graph)."""
    if not torch.is_grad_enabled():
        return grads
    return tuple(None if g is None else _FirstOrderOnly.apply(g, a, what) for g, a in zip(grads, anchors))


def _apply_basis(basis: tuple[Tensor | None, Tensor | None], Y: Tensor) -> Tensor:
    """``Q @ Y`` for ``Q = W @ T`` given as ``(W, T)``; ``W`` None stands for the identity."""
    W, T = basis
    if W is None:
        return Y
    return W @ (Y if T is None else T @ Y)


def _apply_basis_h(basis: tuple[Tensor | None, Tensor | None], Y: Tensor) -> Tensor:
    """``Y @ Q^H`` for ``Q = W @ T`` given as ``(W, T)``; ``W`` None stands for the identity."""
    W, T = basis
    if W is None:
        return Y
    return (Y if T is None else Y @ T.mH) @ W.mH


class _ProjectedCore(torch.autograd.Function):
    """``C = R_A R_B^H`` with the gradient of ``(Q_A^H A)(B Q_B)``, bases held constant.

    With ``A = Q_A R_A`` and ``B^H = Q_B R_B`` the core is ``Q_A^H (A B) Q_B``, and
    ``A B = Q_A C Q_B^H``. Any function of ``A B`` that is invariant under these projections
    (singular values, the Frobenius norm) has at ``(A, B)`` the same first derivative as the same
    function of the projected core with ``Q_A``, ``Q_B`` constant: ``range(A B)`` lies in
    ``range(Q_A)`` and its row space in ``range(Q_B)``. The backward,
    ``dA = Q_A gC R_B`` and ``dB = R_A^H gC Q_B^H``, costs ``O((ldim + rdim) mdim^2)`` and never
    differentiates a QR factorisation, so it stays finite on rank-deficient factors.
    """

    @staticmethod
    def forward(ctx, A, B, R_A, R_B, W_A, T_A, W_B, T_B, what):
        ctx.save_for_backward(A, B, R_A, R_B, W_A, T_A, W_B, T_B)
        ctx.what = what
        ctx.shapes = (A.shape, B.shape)
        return R_A @ R_B.mH

    @staticmethod
    def backward(ctx, gC):
        A, B, R_A, R_B, W_A, T_A, W_B, T_B = ctx.saved_tensors
        a_shape, b_shape = ctx.shapes
        dA = dB = None
        if ctx.needs_input_grad[0]:
            dA = sum_to_shape(_apply_basis((W_A, T_A), gC @ R_B), a_shape)
        if ctx.needs_input_grad[1]:
            dB = sum_to_shape(_apply_basis_h((W_B, T_B), R_A.mH @ gC), b_shape)
        dA, dB = _first_order((dA, dB), (A, B), ctx.what)
        return dA, dB, None, None, None, None, None, None, None


def sum_to_shape(grad: Tensor, shape: torch.Size) -> Tensor:
    """Reduce a broadcast gradient to the shape of the tensor it belongs to."""
    extra = grad.dim() - len(shape)
    if extra:
        grad = grad.sum(tuple(range(extra)))
    dims = tuple(i for i, size in enumerate(shape) if size == 1 and grad.shape[i] != 1)
    return grad.sum(dims, keepdim=True) if dims else grad


class _SVDBackward(torch.autograd.Function):
    """``(U, S, V)`` of ``M = A @ B`` with the analytic SVD backward pulled back to the factors.

    The forward takes the core's ``U_c``, ``S``, ``V_c`` and the bases (all computed without
    gradients) and forms ``U = Q_A U_c``, ``V = Q_B V_c``. With ``J = U^H gU``, ``K = V^H gV`` and
    ``F_ij = 1 / (s_j^2 - s_i^2)`` off the diagonal, the backward is
    ``dM = U [(F o (J - J^H)) S + S (F o (K - K^H)) + diag(gS) + i diag(Im J) S^+] V^H
    + (gU - U J) S^+ V^H + U S^+ (gV - V K)^H``, where ``S^+`` inverts the singular values above
    ``max(ldim, rdim) * eps * s_1`` and zeroes the rest (as does ``F`` between two of those);
    then ``dA = dM B^H`` and ``dB = A^H dM``, formed as four products of ``U``, ``V`` and the
    factors, ``O((ldim + rdim) mdim k)``, without differentiating a QR factorisation.
    """

    @staticmethod
    def forward(ctx, A, B, W_A, T_A, U_c, S, W_B, T_B, V_c):
        U = _apply_basis((W_A, T_A), U_c)
        V = _apply_basis((W_B, T_B), V_c)
        U, V = (U.clone() if U is U_c else U), (V.clone() if V is V_c else V)
        ctx.save_for_backward(A, B, U, S, V)
        ctx.set_materialize_grads(False)  # unused outputs' gradients arrive as None: skip their terms
        return U, S.clone(), V

    @staticmethod
    def backward(ctx, gU, gS, gV):
        A, B, U, S, V = ctx.saved_tensors
        if gU is None and gS is None and gV is None:
            return (None,) * 9
        k = S.shape[-1]
        cdt = U.dtype
        eps = torch.finfo(S.dtype).eps
        nonzero = S > max(U.shape[-2], V.shape[-2], 1) * eps * S[..., :1]
        S_pinv = torch.where(nonzero, 1 / torch.where(nonzero, S, 1), 0)
        eye = torch.eye(k, dtype=torch.bool, device=S.device)
        s2 = S * S
        gap = s2[..., None, :] - s2[..., :, None]  # s_j^2 - s_i^2
        skip = eye | (~nonzero[..., :, None] & ~nonzero[..., None, :])
        F = torch.where(skip, 0, 1 / torch.where(skip, 1, gap)).to(cdt)
        inner = torch.zeros((*S.shape, k), dtype=cdt, device=S.device)
        if gS is not None:
            inner = inner + torch.diag_embed(gS.to(cdt))
        X = None
        if gU is not None:
            J = U.mH @ gU
            inner = inner + (F * (J - J.mH)) * S[..., None, :].to(cdt)
            if cdt.is_complex:
                inner = inner + torch.diag_embed(1j * J.diagonal(dim1=-2, dim2=-1).imag * S_pinv)
            X = (gU - U @ J) * S_pinv[..., None, :].to(cdt)
        Z, Vy = U @ inner, V  # dM = Z Vy^H
        if X is not None:
            Z = Z + X
        if gV is not None:
            K = V.mH @ gV
            Z = Z + U @ (S[..., :, None].to(cdt) * (F * (K - K.mH)))
            Z = torch.cat([Z, U * S_pinv[..., None, :].to(cdt)], -1)
            Vy = torch.cat([V, gV - V @ K], -1)
        dA = dB = None
        if ctx.needs_input_grad[0]:
            dA = sum_to_shape(Z @ (B @ Vy).mH, A.shape)
        if ctx.needs_input_grad[1]:
            dB = sum_to_shape((A.mH @ Z) @ Vy.mH, B.shape)
        dA, dB = _first_order((dA, dB), (A, B), "SVD")
        return dA, dB, None, None, None, None, None, None, None
