"""linear_operator's shipped conformance suites, run on FactoredMatrix.

Overrides of shipped tests, each because of a documented TransformerLens meaning:

- ``_test_rmatmul`` (used by ``test_rmatmul_vec``, ``test_rmatmul_matrix``,
  ``test_rmatmul_matrix_broadcast``): the ``@`` operator with a matrix on the left returns a lazy
  FactoredMatrix, as TransformerLens's does, where the shipped test expects a Tensor. The override
  densifies that one result and keeps every other check (``torch.matmul`` still returns a Tensor,
  gradients are compared as shipped).

- ``_test_solve`` (used by every ``test_solve_*``) on the square classes: ``FactoredMatrix.solve``
  is a direct LU solve through the factors (it refuses singular products instead of running CG on
  them), so the shipped test runs in its ``cholesky`` mode, which asserts that CG is *not* called.
  Its reference gradient is symmetrised by ``_ensure_symmetric_grad``, which assumes one symmetric
  parameter; ``A`` and ``B`` are independent tensors here, so the override compares the exact
  partial derivatives instead. Values and every gradient are still compared.

- ``_test_inv_quad_logdet`` (used by the ``test_inv_quad_logdet*`` tests) on the square classes:
  ``FactoredMatrix.inv_quad_logdet`` is exact (a direct solve and an LU log-determinant, never CG
  or stochastic Lanczos quadrature, which assume a symmetric positive definite operator), so the
  shipped test runs in its ``cholesky`` mode, which asserts that CG is not called. Values are
  compared as shipped.

- ``test_getitem`` and ``test_getitem_tensor_index``: the ``fm[...]`` syntax follows TransformerLens
  (an int on a row or column dim keeps that dim; lists or 1-D tensors on both pick a sub-matrix),
  where the shipped tests expect torch's meaning (the dim dropped; entries picked). linear_operator's
  meaning is its ``LinearOperator.__getitem__`` over this class's ``_getitem`` / ``_get_indices``
  hooks, which is what linear_operator and GPyTorch use internally; the overrides run the shipped
  tests unchanged with ``fm[...]`` routed to it, and then check the TransformerLens meaning of the
  same indices against the dense product. (``test_getitem_broadcasted_tensor_index`` is not
  overridden: index grids mean the same under both, see :mod:`lowrank_op._indexing`.)

Nothing else is overridden.

The same suites run on :class:`~lowrank_op.outer_factored.OuterFactoredMatrix` (``L @ (A @ B) @ R``,
a FactoredMatrix subclass with four tensors in its representation), rectangular and square, with
batches that broadcast between the outer and the inner factors, and with one outer factor only,
through the same override mixins: the TransformerLens meanings above are the subclass's too (its
``__getitem__`` is routed to linear_operator's as FactoredMatrix's is), and its square class, like
FactoredMatrix's, is a symmetric positive definite ``L A A^T L^T`` whose solves are direct.
"""

from __future__ import annotations

import contextlib
import unittest
from unittest.mock import patch

import torch
from linear_operator.operators import LinearOperator, to_dense
from linear_operator.test.linear_operator_test_case import (
    LinearOperatorTestCase,
    RectangularLinearOperatorTestCase,
)

from lowrank_op import FactoredMatrix
from lowrank_op.outer_factored import OuterFactoredMatrix


class _TransformerLensMatmul:
    """``lhs @ fm`` is a FactoredMatrix (TransformerLens); ``torch.matmul(lhs, fm)`` is a Tensor."""

    def _test_rmatmul(self, lhs):
        linear_op = self.create_linear_op().detach().requires_grad_(True)
        linear_op_copy = torch.clone(linear_op).detach().requires_grad_(True)
        evaluated = self.evaluate_linear_op(linear_op_copy)

        res = lhs @ linear_op
        if lhs.dim() >= 2:
            self.assertTrue(isinstance(res, FactoredMatrix))
        self.assertAllClose(to_dense(res), lhs @ evaluated)

        res = torch.matmul(lhs, linear_op)
        self.assertTrue(torch.is_tensor(res))
        actual = torch.matmul(lhs, evaluated)
        self.assertAllClose(res, actual)

        grad = torch.randn_like(res)
        res.backward(gradient=grad)
        actual.backward(gradient=grad)
        for arg, arg_copy in zip(linear_op.representation(), linear_op_copy.representation()):
            if arg_copy.requires_grad and arg_copy.is_leaf and arg_copy.grad is not None:
                self.assertAllClose(arg.grad, arg_copy.grad, **self.tolerances["matmul"])


@contextlib.contextmanager
def _linear_operators_getitem():
    """``fm[...]`` as linear_operator's ``LinearOperator.__getitem__`` (over the class's hooks), for
    FactoredMatrix and for its subclass, which has a ``__getitem__`` of its own."""
    with patch.object(FactoredMatrix, "__getitem__", LinearOperator.__getitem__), patch.object(
        OuterFactoredMatrix, "__getitem__", LinearOperator.__getitem__
    ):
        yield


class _TransformerLensIndexing:
    """The shipped getitem tests through linear_operator's ``__getitem__`` (the hooks), then
    ``fm[...]``'s TransformerLens meaning on the same kinds of index."""

    def _tl_meaning(self):
        linear_op = self.create_linear_op()
        evaluated = self.evaluate_linear_op(linear_op)
        lead = (0,) * (linear_op.dim() - 2)
        rows, cols = torch.tensor([0, 1, 0, 2]), torch.tensor([1, 2, 0, 1])
        for index, expected in [
            ((*lead, 1, slice(0, 2)), evaluated[(*lead, slice(1, 2), slice(0, 2))]),
            ((..., slice(1, None), 2), evaluated[..., 1:, 2:3]),
            ((..., -1, -1), evaluated[..., -1:, -1:]),
            ((..., rows, cols), evaluated[..., rows, :][..., cols]),
            ((..., rows, slice(None)), evaluated[..., rows, :]),
        ]:
            res = linear_op[index]
            self.assertIsInstance(res, FactoredMatrix)
            self.assertAllClose(res.to_dense(), expected)

    def test_getitem(self):
        with _linear_operators_getitem():
            super().test_getitem()
        self._tl_meaning()

    def test_getitem_tensor_index(self):
        with _linear_operators_getitem():
            super().test_getitem_tensor_index()
        self._tl_meaning()


class _Rectangular(_TransformerLensIndexing, _TransformerLensMatmul, RectangularLinearOperatorTestCase):
    seed = 0
    a_shape: tuple[int, ...] = ()
    b_shape: tuple[int, ...] = ()

    def create_linear_op(self):
        return FactoredMatrix(torch.randn(*self.a_shape), torch.randn(*self.b_shape))

    def evaluate_linear_op(self, linear_op):
        return linear_op.A @ linear_op.B


class TestRectangular(_Rectangular, unittest.TestCase):
    a_shape, b_shape = (5, 3), (3, 6)


class TestRectangularWideInner(_Rectangular, unittest.TestCase):
    # mdim > ldim and mdim > rdim
    a_shape, b_shape = (4, 7), (7, 5)


class TestRectangularBatch(_Rectangular, unittest.TestCase):
    a_shape, b_shape = (2, 5, 3), (2, 3, 6)


class TestRectangularBroadcastFactors(_Rectangular, unittest.TestCase):
    # leading dims broadcast: (2, 1) with (3,) -> (2, 3)
    a_shape, b_shape = (2, 1, 5, 3), (3, 3, 6)


class _ExactSolves:
    """Solves and log-determinants are direct (never CG): the shipped tests in ``cholesky`` mode,
    and the exact partial derivatives of independent factors (see the module docstring)."""

    def _test_solve(self, rhs, lhs=None, cholesky=False):
        self._ensure_symmetric_grad = lambda grad: grad
        super()._test_solve(rhs, lhs=lhs, cholesky=True)

    def _test_inv_quad_logdet(self, reduce_inv_quad=True, cholesky=False, linear_op=None):
        super()._test_inv_quad_logdet(reduce_inv_quad=reduce_inv_quad, cholesky=True, linear_op=linear_op)


class _SymmetricPositiveDefinite(_ExactSolves, _TransformerLensIndexing, _TransformerLensMatmul, LinearOperatorTestCase):
    """``L @ L^T`` with a wide ``L`` (mdim > n): square, symmetric, positive definite."""

    seed = 0
    root_shape: tuple[int, ...] = ()

    def create_linear_op(self):
        root = torch.randn(*self.root_shape)
        root = root + 2.0 * torch.eye(*self.root_shape[-2:])  # keeps it well conditioned
        return FactoredMatrix(root, root.mT.clone())

    def evaluate_linear_op(self, linear_op):
        return linear_op.A @ linear_op.B


class TestSymmetricPositiveDefinite(_SymmetricPositiveDefinite, unittest.TestCase):
    root_shape = (5, 7)


class TestSymmetricPositiveDefiniteBatch(_SymmetricPositiveDefinite, unittest.TestCase):
    root_shape = (3, 5, 7)


# --- OuterFactoredMatrix: the same suites, the same overrides --------------------------------------
class _OuterRectangular(_TransformerLensIndexing, _TransformerLensMatmul, RectangularLinearOperatorTestCase):
    seed = 0
    #: shapes of L, A, B, R (None: no outer factor on that side)
    shapes: tuple = ()

    def create_linear_op(self):
        L, A, B, R = (None if shape is None else torch.randn(*shape) for shape in self.shapes)
        return OuterFactoredMatrix(A, B, left=L, right=R)

    def evaluate_linear_op(self, linear_op):
        return linear_op.A @ linear_op.B


class TestOuterRectangular(_OuterRectangular, unittest.TestCase):
    # a tall left and a wide right outer factor around a rank-2 inner product
    shapes = ((7, 3), (3, 2), (2, 4), (4, 9))


class TestOuterRectangularBatch(_OuterRectangular, unittest.TestCase):
    # batched outer factors broadcasting with batched inner ones: (2, 1) with (3,) -> (2, 3)
    shapes = ((2, 1, 7, 3), (3, 3, 2), (3, 2, 4), (4, 9))


class TestOuterRectangularLeftOnly(_OuterRectangular, unittest.TestCase):
    shapes = ((7, 3), (2, 3, 2), (2, 2, 4), None)


class TestOuterRectangularRightOnly(_OuterRectangular, unittest.TestCase):
    shapes = (None, (5, 2), (2, 4), (2, 4, 9))


class _OuterSymmetricPositiveDefinite(_ExactSolves, _TransformerLensIndexing, _TransformerLensMatmul, LinearOperatorTestCase):
    """``L A A^T L^T`` with wide ``L`` and ``A`` (n <= p <= m): square, symmetric, positive definite."""

    seed = 0
    l_shape: tuple[int, ...] = ()
    a_shape: tuple[int, ...] = ()

    def create_linear_op(self):
        L = torch.randn(*self.l_shape) + 2.0 * torch.eye(*self.l_shape[-2:])  # keeps it well conditioned
        A = torch.randn(*self.a_shape) + 2.0 * torch.eye(*self.a_shape[-2:])
        return OuterFactoredMatrix(A, A.mT.clone(), left=L, right=L.mT.clone())

    def evaluate_linear_op(self, linear_op):
        return linear_op.A @ linear_op.B


class TestOuterSymmetricPositiveDefinite(_OuterSymmetricPositiveDefinite, unittest.TestCase):
    l_shape, a_shape = (5, 6), (6, 8)


class TestOuterSymmetricPositiveDefiniteBatch(_OuterSymmetricPositiveDefinite, unittest.TestCase):
    # 2-D outer factors shared by a batch of inner ones
    l_shape, a_shape = (5, 6), (3, 6, 8)


class TestOuterSymmetricPositiveDefiniteBatchOuter(_OuterSymmetricPositiveDefinite, unittest.TestCase):
    # batched outer factors around a 2-D inner product
    l_shape, a_shape = (3, 5, 6), (6, 8)


# --- linear_operator's internal uses of indexing and squeeze keep its meaning ----------------------
def test_apply_permutation_gets_linear_operators_meaning():
    # Pivoted Cholesky (GPyTorch's preconditioner) indexes operators with broadcast index grids.
    from linear_operator.utils.permutation import apply_permutation

    fm = FactoredMatrix(torch.randn(2, 6, 3, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64))
    left = torch.stack([torch.randperm(6), torch.randperm(6)])
    right = torch.randperm(6).expand(2, 6)
    dense = fm.to_dense()
    expected = torch.stack([dense[b][left[b]][:, right[b]] for b in range(2)])
    torch.testing.assert_close(apply_permutation(fm, left, right), expected)
    row = apply_permutation(fm, left[:, :1], right_permutation=None)
    torch.testing.assert_close(row, torch.stack([dense[b][left[b, :1]] for b in range(2)]))


def test_squeeze_keeps_linear_operators_meaning():
    fm = FactoredMatrix(torch.randn(1, 5, 3, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64))
    dense = fm.to_dense()
    batch = fm.squeeze(0)
    assert isinstance(batch, FactoredMatrix) and batch.shape == (5, 1)
    column = fm.squeeze(-1)
    assert type(column) is torch.Tensor
    torch.testing.assert_close(column, dense.squeeze(-1))
    assert fm.squeeze(-2) is fm  # size 5: nothing to squeeze
    torch.testing.assert_close(torch.squeeze(fm, -1), dense.squeeze(-1))
    # fm[...] keeps the column dim (TransformerLens's meaning); squeeze drops it.
    assert fm[..., 0].shape == (1, 5, 1)
