"""Indexing a FactoredMatrix, compared with the dense float64 product indexed the same way."""

from __future__ import annotations

import pytest
import torch
from helpers import dense, make_fm

from lowrank_op import FactoredMatrix

t = torch.tensor
FM, TENSOR = "fm", "tensor"

#: (index, kind of result) on a FactoredMatrix of shape (3, 2, 5, 6), A (3, 1, 5, 4), B (2, 4, 6).
BATCHED_CASES = [
    # leading dims only: a FactoredMatrix
    (0, FM),
    (-1, FM),
    (-3, FM),
    ((1,), FM),
    ((slice(None), 1), FM),
    ((slice(None), -2), FM),
    ((0, 1), FM),
    ((-3, -2), FM),
    ((t(2), t(1)), FM),
    (slice(1, 3), FM),
    (slice(None, None, 2), FM),
    ([0, 2], FM),
    ([-1, 0], FM),
    (range(2), FM),
    (t([0, 2]), FM),
    (t([[0, 1], [2, 0]]), FM),
    ((t([0, 2]), t([1, 0])), FM),
    ((slice(None), [1, 0, 1]), FM),
    (..., FM),
    ((0, ...), FM),
    # None adds leading dims
    (None, FM),
    ((None, 0), FM),
    ((0, None), FM),
    ((None, None, ...), FM),
    ((slice(None), None, 0), FM),
    ((slice(None), slice(None), None), FM),
    ((..., None, slice(None), slice(None)), FM),
    # rows and columns with slices, lists and 1-D tensors: a FactoredMatrix
    ((..., slice(1, 4), slice(None)), FM),
    ((..., slice(None, None, 2), slice(1, None)), FM),
    ((..., [0, 2], slice(1, 4)), FM),
    ((..., [-1, 0], slice(None)), FM),
    ((..., slice(None), t([5, 0, 5])), FM),
    ((0, slice(None), t([4, 1])), FM),
    ((None, 0, 1, slice(0, 2), [3, 1]), FM),
    # an int on the row or column dim drops it: a Tensor
    ((..., 2), TENSOR),
    ((..., -1), TENSOR),
    ((..., 2, 3), TENSOR),
    ((..., -1, -1), TENSOR),
    ((..., 1, slice(None)), TENSOR),
    ((..., -2, slice(1, 3)), TENSOR),
    ((..., slice(None), 1), TENSOR),
    ((..., slice(None), -6), TENSOR),
    ((0, 0, 0), TENSOR),
    ((0, 0, 0, 0), TENSOR),
    ((-1, -1, -1, -1), TENSOR),
    ((slice(None), slice(None), 2), TENSOR),
    ((None, ..., 1, [0, 5]), TENSOR),
    ((None, None, ..., 1, slice(None)), TENSOR),
    ((..., None, 1, 2), TENSOR),
    # tensor indices on both matrix dims, or with batch tensor indices: elements
    ((..., [0, 1], [2, 3]), TENSOR),
    ((..., t([0, 1]), t([2, 3])), TENSOR),
    ((..., t([-1, 0]), t([-1, 2])), TENSOR),
    ((..., t([[0, 1], [2, 4]]), t([3, 5])), TENSOR),
    ((0, 0, [1, 2], [3, 4]), TENSOR),
    ((t([0, 2]), t([1, 0]), t([1, 2]), slice(None)), TENSOR),
    ((t([0, 2]), slice(None), t([1, 2]), t([0, 5])), TENSOR),
    ((t([0, 2]), slice(None), t([1, 2]), slice(None)), TENSOR),
    (([0, 1], slice(None), slice(None), [2, 3]), TENSOR),
    ((t([0, 2]), 1, slice(None), t([4, 0])), TENSOR),
    ((0, slice(None), [0, 1], [1, 2]), TENSOR),
    ((t([[0], [2]]), t([0, 1]), t([1, 3]), t([0, 0])), TENSOR),
]

#: (index, kind) on a 2-D FactoredMatrix of shape (5, 6).
MATRIX_CASES = [
    (0, TENSOR),
    (-1, TENSOR),
    ((2, 3), TENSOR),
    ((-5, -6), TENSOR),
    ((slice(None), 0), TENSOR),
    ((..., -1), TENSOR),
    (slice(1, 4), FM),
    ((slice(None), slice(2, None)), FM),
    ([4, 0, 4], FM),
    (t([1, 3]), FM),
    ((slice(None), [5, 1]), FM),
    ((slice(0, 5, 2), slice(None)), FM),
    (None, FM),
    ((None, None), FM),
    ((None, 2), TENSOR),
    ((None, slice(1, 3), [0, 2]), FM),
    (([0, 1], [2, 3]), TENSOR),
    ((t([[0, 1], [2, 4]]), t([[3], [5]])), TENSOR),
    (..., FM),
]


def _dense_of(fm: FactoredMatrix) -> torch.Tensor:
    return dense(fm.A, fm.B)


def _check(fm: FactoredMatrix, index, kind) -> None:
    D = _dense_of(fm)
    expected = D[index]
    out = fm[index]
    if kind == FM:
        assert isinstance(out, FactoredMatrix), type(out)
        got = _dense_of(out)
    else:
        assert type(out) is torch.Tensor, type(out)
        got = out
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    torch.testing.assert_close(got.to(expected.dtype), expected)


def _id(case):
    index = case[0]
    items = index if isinstance(index, tuple) else (index,)
    return ",".join("T" + str(list(i.shape)) if isinstance(i, torch.Tensor) else str(i) for i in items)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("case", BATCHED_CASES, ids=[_id(c) for c in BATCHED_CASES])
def test_index_batched(case, dtype):
    _check(make_fm((3, 1, 5, 4), (2, 4, 6), dtype), *case)


@pytest.mark.parametrize("case", MATRIX_CASES, ids=[_id(c) for c in MATRIX_CASES])
def test_index_matrix(case):
    _check(make_fm((5, 4), (4, 6)), *case)


def test_index_float32_keeps_dtype():
    fm = make_fm((3, 5, 4), (4, 6), torch.float32)
    out = fm[1:, [0, 2]]
    assert isinstance(out, FactoredMatrix) and out.dtype == torch.float32
    torch.testing.assert_close(out.to_dense().double(), _dense_of(fm)[1:, [0, 2]], rtol=1e-5, atol=1e-5)


def test_indexed_result_is_still_factored():
    fm = make_fm((3, 1, 50, 4), (2, 4, 60))
    out = fm[1, :, 10:20, [0, 7, 59]]
    assert isinstance(out, FactoredMatrix)
    assert out.mdim == 4 and out.shape == (2, 10, 3)
    torch.testing.assert_close(_dense_of(out), _dense_of(fm)[1, :, 10:20, [0, 7, 59]])


# --- errors ---------------------------------------------------------------------------------------
ERROR_CASES = [
    (3, "out of range for dim 0 of size 3"),
    (-4, "out of range for dim 0 of size 3"),
    ((0, 2), "out of range for dim 1 of size 2"),
    ((..., 5, 0), "out of range for dim 2 of size 5"),
    ((..., -7), "out of range for dim 3 of size 6"),
    ((..., 6), "out of range for dim 3 of size 6"),
    ((t([0, 3]),), r"index \[0, 3\] is out of range for dim 0"),
    (([0, -4],), r"out of range for dim 0"),
    ((..., t([1, 5]), slice(None)), r"out of range for dim 2 of size 5"),
    ((..., [0, 1], [2, 6]), r"out of range for dim 3 of size 6"),
    ((None, 0, 7), r"out of range for dim 1 of size 2"),
    ((0, 0, 0, 0, 0), "too many indices"),
    ((0, 0, 0, 0, None, 0), "too many indices"),
    ((..., None), "`None` can only add leading"),
    ((slice(None), slice(None), slice(None), None, slice(None)), "`None` can only add leading"),
    ((0, ..., None), "`None` can only add leading"),
    ((..., 0, None), "`None` can only add leading"),
    ((..., ...), "single ellipsis"),
    ((True,), "boolean"),
    ((t([True, False, True]),), "boolean masks"),
    ((t([0.0, 1.0]),), "must be integers"),
    (("a",), "unsupported index type str"),
    ((1.5,), "unsupported index type float"),
    ((..., slice(None), t([[0, 1], [2, 3]])), "column dim of a FactoredMatrix must be 1-D"),
    ((..., t([[0, 1], [2, 3]]), slice(None)), "row dim of a FactoredMatrix must be 1-D"),
    ((..., [[0, 1], [2, 3]], 1), "row dim of a FactoredMatrix must be 1-D"),
]


@pytest.mark.parametrize("index, match", ERROR_CASES, ids=[_id(c) for c in ERROR_CASES])
def test_index_errors(index, match):
    fm = make_fm((3, 1, 5, 4), (2, 4, 6))
    with pytest.raises(IndexError, match=match):
        fm[index]


def test_index_errors_match_torch():
    # Where torch raises IndexError on the dense product, FactoredMatrix raises it too.
    fm = make_fm((3, 1, 5, 4), (2, 4, 6))
    D = _dense_of(fm)
    for index, _ in ERROR_CASES[:13]:
        with pytest.raises(IndexError):
            D[index]


# --- iteration ------------------------------------------------------------------------------------
def test_iter_2d_raises():
    fm = make_fm((5, 4), (4, 6))
    with pytest.raises(TypeError, match="iteration over a 2-D FactoredMatrix"):
        iter(fm)
    with pytest.raises(TypeError, match="iteration over a 2-D FactoredMatrix"):
        list(fm)


@pytest.mark.parametrize("a_shape, b_shape", [((3, 1, 5, 4), (2, 4, 6)), ((5, 4), (2, 4, 6)), ((1, 5, 4), (4, 6))])
def test_iter_batched_yields_leading_slices(a_shape, b_shape):
    fm = make_fm(a_shape, b_shape)
    D = _dense_of(fm)
    items = list(fm)
    assert len(items) == D.shape[0]
    for item, expected in zip(items, D):
        assert isinstance(item, FactoredMatrix)
        torch.testing.assert_close(_dense_of(item), expected)
