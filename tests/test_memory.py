"""The factored paths never allocate anything the size of ``A @ B``.

A TorchDispatchMode sees every tensor each aten op produces; the largest one must stay within a
small multiple of the factors' size. Deterministic, unlike a reading of the process's memory.

For an OuterFactoredMatrix ``W_E @ ov @ W_U`` the bound is tighter: nothing the size of the formed
factor ``W_E @ W_V`` (heads x vocab x d_head), only buffers the size of an outer factor.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowrank_op import FactoredMatrix
from lowrank_op.outer_factored import OuterFactoredMatrix


class _LargestAllocation(TorchDispatchMode):
    """The largest tensor an op produced, in elements; with ``storage``, the size of the memory it
    holds instead, so that a stride-0 expansion (a view that torch's batched matmul takes of a 2-D
    factor, and hands to bmm uncopied) counts as the factor it views."""

    def __init__(self, storage: bool = False):
        super().__init__()
        self.largest = 0
        self.op = None
        self.storage = storage

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                size = leaf.untyped_storage().nbytes() // leaf.element_size() if self.storage else leaf.numel()
                if size > self.largest:
                    self.largest, self.op = size, func
        return out


LDIM, MDIM, RDIM = 1500, 6, 1200

OPERATIONS = {
    "svd": lambda fm: fm.svd(),
    "svd_householder": lambda fm: fm.svd(method="householder"),
    "S": lambda fm: fm.S,
    "norm_gram": lambda fm: fm.norm(method="gram"),
    "norm_qr": lambda fm: fm.norm(method="qr"),
    "make_even": lambda fm: fm.make_even(),
    "collapse_l": lambda fm: fm.collapse_l(),
    "matvec": lambda fm: fm @ torch.randn(RDIM, dtype=fm.dtype),
    "matmul_tensor": lambda fm: fm.matmul(torch.randn(RDIM, 3, dtype=fm.dtype)),
    "lazy_matmul": lambda fm: fm @ torch.randn(RDIM, 50, dtype=fm.dtype),
    "rows": lambda fm: fm[10:20],
    "elements": lambda fm: fm[torch.arange(5), torch.arange(5)],
    "transpose": lambda fm: fm.T,
    "get_corner": lambda fm: fm.get_corner(3),
    "pinv": lambda fm: fm.pinv(),
    "lstsq": lambda fm: fm.lstsq(torch.randn(LDIM, 2, dtype=fm.dtype)),
    "svds_exact": lambda fm: fm.svds(3, method="exact"),
    "svds_arpack": lambda fm: fm.svds(3, method="arpack"),
    "svds_propack": lambda fm: fm.svds(3, method="propack"),
    "to_scipy_matmat": lambda fm: fm.to_scipy().matmat(torch.randn(RDIM, 3, dtype=fm.dtype).numpy()),
    "to_scipy_rmatvec": lambda fm: fm.to_scipy().rmatvec(torch.randn(LDIM, dtype=fm.dtype).numpy()),
}

SQUARE_OPERATIONS = {
    "eigenvalues": lambda fm: fm.eigenvalues,
    "trace": lambda fm: fm.trace(),
    "diagonal": lambda fm: fm.diagonal(),
    "eigvalsh": lambda fm: torch.linalg.eigvalsh(FactoredMatrix(fm.A, fm.A.mT)),
    "logdet": lambda fm: fm.logdet(),
    "eigs_exact": lambda fm: fm.eigs(3, method="exact"),
    "eigs_arpack": lambda fm: fm.eigs(3, method="arpack"),
    "woodbury_solve": lambda fm: fm.add_jitter(1.0).solve(torch.randn(LDIM, 2, dtype=fm.dtype)),
    "woodbury_logdet": lambda fm: fm.add_jitter(1.0).logdet(),
    "woodbury_inv_quad_logdet": lambda fm: fm.add_jitter(1.0).inv_quad_logdet(
        torch.randn(LDIM, 2, dtype=fm.dtype), logdet=True
    ),
}


def _largest(fm: FactoredMatrix, operation, storage: bool = False) -> tuple[int, object]:
    with _LargestAllocation(storage) as mode:
        operation(fm)
    return mode.largest, mode.op


@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_rectangular_paths_stay_factor_sized(name):
    fm = FactoredMatrix(torch.randn(LDIM, MDIM, dtype=torch.float64), torch.randn(MDIM, RDIM, dtype=torch.float64))
    largest, op = _largest(fm, OPERATIONS[name])
    assert largest <= 2 * max(LDIM, RDIM) * max(MDIM, 50), f"{name}: {op} made {largest} elements"


@pytest.mark.parametrize("name", sorted(SQUARE_OPERATIONS))
def test_square_paths_stay_factor_sized(name):
    fm = FactoredMatrix(torch.randn(LDIM, MDIM, dtype=torch.float64), torch.randn(MDIM, LDIM, dtype=torch.float64))
    largest, op = _largest(fm, SQUARE_OPERATIONS[name])
    assert largest <= 2 * LDIM * MDIM, f"{name}: {op} made {largest} elements"


def test_the_check_catches_a_densifying_path():
    fm = FactoredMatrix(torch.randn(LDIM, MDIM), torch.randn(MDIM, RDIM))
    largest, _ = _largest(fm, lambda fm: fm.AB)
    assert largest == LDIM * RDIM


# --- OuterFactoredMatrix: nothing the size of a formed factor L @ A --------------------------------
HEADS, VOCAB, D_MODEL, D_HEAD = 8, 3000, 8, 4

OUTER_OPERATIONS = {
    "S": lambda fm: fm.S,
    "norm": lambda fm: fm.norm(),
    "norm_qr": lambda fm: fm.norm("qr"),
    "eigenvalues": lambda fm: fm.eigenvalues,
    "eigvals": lambda fm: fm.eigvals(),
    "trace": lambda fm: fm.trace(),
    "svds_values": lambda fm: fm.svds(2, "exact", return_singular_vectors=False),
    "eigs": lambda fm: fm.eigs(2, "exact"),
    "matvec": lambda fm: fm @ torch.randn(VOCAB, dtype=fm.dtype),
    "vecmat": lambda fm: torch.randn(VOCAB, dtype=fm.dtype) @ fm,
    "matmul": lambda fm: fm.matmul(torch.randn(VOCAB, 2, dtype=fm.dtype)),  # the output: heads x vocab x 2
    "rows": lambda fm: fm[:, 10:20],
    "transpose": lambda fm: fm.T,
}


def _circuit(tied: bool) -> OuterFactoredMatrix:
    # Fresh outer factors each time, so that their factorisations are computed (not cached).
    W_E = torch.randn(VOCAB, D_MODEL, dtype=torch.float64)
    W_U = W_E.mT if tied else torch.randn(D_MODEL, VOCAB, dtype=torch.float64)
    ov = FactoredMatrix(torch.randn(HEADS, D_MODEL, D_HEAD, dtype=torch.float64), torch.randn(HEADS, D_HEAD, D_MODEL, dtype=torch.float64))
    circuit = W_E @ ov @ W_U
    assert isinstance(circuit, OuterFactoredMatrix)
    return circuit


@pytest.mark.parametrize("tied", [False, True], ids=["ov", "qk_tied"])
@pytest.mark.parametrize("name", sorted(OUTER_OPERATIONS))
def test_shared_outer_factor_paths_stay_outer_factor_sized(name, tied):
    largest, op = _largest(_circuit(tied), OUTER_OPERATIONS[name], storage=True)
    formed = HEADS * VOCAB * D_HEAD  # W_E @ W_V, 4x an outer factor here
    assert largest <= 2 * VOCAB * D_MODEL < formed, f"{name}: {op} made {largest} elements"


def test_the_check_catches_a_formed_outer_factor():
    largest, _ = _largest(_circuit(False), lambda fm: fm.svdvals(outer="formed"), storage=True)
    assert largest >= HEADS * VOCAB * D_HEAD
