"""Indexing a FactoredMatrix, compared with the dense float64 product indexed the same way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from helpers import dense, make_fm
from hypothesis import given
from hypothesis import strategies as st

from lowrank_op import FactoredMatrix

t = torch.tensor
FM, TENSOR = "fm", "tensor"

#: (index, reference) on a FactoredMatrix of shape (3, 2, 5, 6), A (3, 1, 5, 4), B (2, 4, 6). The
#: result is a FactoredMatrix equal to ``reference(D)`` for the dense product ``D``; a reference of
#: None means ``D[index]`` (torch's meaning, which TransformerLens's agrees with there).
BATCHED_CASES = [
    # leading dims only
    (0, None),
    (-1, None),
    (-3, None),
    ((1,), None),
    ((slice(None), 1), None),
    ((slice(None), -2), None),
    ((0, 1), None),
    ((-3, -2), None),
    ((t(2), t(1)), None),
    ((np.int64(2), np.int32(-1)), None),
    (slice(1, 3), None),
    (slice(None, None, 2), None),
    ([0, 2], None),
    ([-1, 0], None),
    ([], None),
    (range(2), None),
    (t([0, 2]), None),
    (t([0, 2], dtype=torch.int32), None),
    (np.array([2, 0]), None),
    (np.array([2, 0], dtype=np.int8), None),
    (t([[0, 1], [2, 0]]), None),
    ((t([0, 2]), t([1, 0])), None),
    ((slice(None), [1, 0, 1]), None),
    (t([True, False, True]), None),
    (np.array([True, False, True]), None),
    ([True, False, True], None),
    (torch.ones(3, 2, dtype=torch.bool), None),
    (..., None),
    ((0, ...), None),
    ((), None),
    # None, True and False add leading dims; a 0-dim bool or uint8 tensor is a mask, not an integer
    (None, None),
    ((None, 0), None),
    ((0, None), None),
    ((None, None, ...), None),
    ((slice(None), None, 0), None),
    ((slice(None), slice(None), None), None),
    ((..., None, slice(None), slice(None)), None),
    (True, None),
    (False, None),
    (t(True), None),
    (t(False), None),
    (t(1, dtype=torch.uint8), None),
    ((0, t(True)), None),
    ((t(True), [0, 2]), None),
    ((t(1, dtype=torch.int8), 1), None),
    # rows and columns with slices, or picks on one of them
    ((..., slice(1, 4), slice(None)), None),
    ((..., slice(None, None, 2), slice(1, None)), None),
    ((..., [0, 2], slice(1, 4)), None),
    ((..., [-1, 0], slice(None)), None),
    ((..., [], slice(None)), None),
    ((..., slice(None), t([5, 0, 5])), None),
    ((..., t([True, False, True, False, True]), slice(None)), None),
    ((..., slice(None), np.array([5, 1])), None),
    ((0, slice(None), t([4, 1])), None),
    # an int on the row or column dim keeps it (size 1)
    ((..., 2), lambda D: D[..., 2:3]),
    ((..., -1), lambda D: D[..., -1:]),
    ((..., 2, 3), lambda D: D[..., 2:3, 3:4]),
    ((..., -1, -1), lambda D: D[..., -1:, -1:]),
    ((..., 1, slice(None)), lambda D: D[..., 1:2, :]),
    ((..., -2, slice(1, 3)), lambda D: D[..., -2:-1, 1:3]),
    ((..., slice(None), -6), lambda D: D[..., 0:1]),
    ((0, 0, 0), lambda D: D[0, 0, 0:1]),
    ((0, 0, 0, 0), lambda D: D[0, 0, 0:1, 0:1]),
    ((-1, -1, -1, -1), lambda D: D[-1, -1, -1:, -1:]),
    ((None, ..., 1, [0, 5]), lambda D: D[None, ..., 1:2, [0, 5]]),
    ((..., t(3), np.int64(2)), lambda D: D[..., 3:4, 2:3]),
    # picks on both matrix dims select a sub-matrix (outer), also with picks on leading dims
    ((..., [0, 1], [2, 3]), lambda D: D[..., [0, 1], :][..., [2, 3]]),
    ((..., t([-1, 0]), t([-1, 2])), lambda D: D[..., [-1, 0], :][..., [-1, 2]]),
    ((0, 0, [1, 2], [3, 4, 0]), lambda D: D[0, 0, [1, 2], :][:, [3, 4, 0]]),
    ((t([0, 2]), t([1, 0]), t([1, 2]), slice(None)), lambda D: D[[0, 2], [1, 0]][:, [1, 2]]),
    ((t([0, 2]), slice(None), t([1, 2]), t([0, 5])), lambda D: D[[0, 2]][..., [1, 2], :][..., [0, 5]]),
    (([0, 1], slice(None), 3, [2, 3]), lambda D: D[[0, 1], :, 3:4][..., [2, 3]]),
    ((t([0, 2]), 1, slice(None), t([4, 0])), lambda D: D[[0, 2], 1][..., [4, 0]]),
    ((..., t([True, False, True, False, True]), [1]), lambda D: D[..., [0, 2, 4], :][..., [1]]),
    # 1-D picks on the matrix dims stay apart from picks on the leading dims (which broadcast together)
    ((t([0, 2]), t([1, 0]), t([1, 2]), t([0, 5])), lambda D: D[[0, 2], [1, 0]][:, [1, 2]][..., [0, 5]]),
    ((t([[0], [2]]), t([0, 1]), t([1, 3]), t([0, 0])), lambda D: D[[[0], [2]], [0, 1]][..., [1, 3], :][..., [0, 0]]),
]

#: (index, reference) on a 2-D FactoredMatrix of shape (5, 6).
MATRIX_CASES = [
    (0, lambda D: D[0:1]),
    (-1, lambda D: D[-1:]),
    ((2, 3), lambda D: D[2:3, 3:4]),
    ((-5, -6), lambda D: D[0:1, 0:1]),
    ((slice(None), 0), lambda D: D[:, 0:1]),
    ((..., -1), lambda D: D[:, -1:]),
    (slice(1, 4), None),
    ((slice(None), slice(2, None)), None),
    ([4, 0, 4], None),
    (t([1, 3]), None),
    ((slice(None), [5, 1]), None),
    ((slice(0, 5, 2), slice(None)), None),
    (None, None),
    ((None, None), None),
    ((None, 2), lambda D: D[None, 2:3]),
    ((None, slice(1, 3), [0, 2]), None),
    (([0, 1], [2, 3]), lambda D: D[[0, 1]][:, [2, 3]]),
    (True, None),
    ((t(False), 1), lambda D: D[None][:0, 1:2]),
    (..., None),
]

#: (index) on the (3, 2, 5, 6) FactoredMatrix whose result is a dense Tensor equal to ``D[index]``:
#: index grids and 2-D masks over the matrix dims pick entries; None after the row dim adds a dim
#: to the dense block.
TENSOR_CASES = [
    (..., t([[0, 1], [2, 4]]), t([3, 5])),
    (..., t([0, 1, 2])[:, None], t([3, 5])[None, :]),
    (0, slice(None), t([[0, 1], [1, 2]]), t([[1, 2]])),
    (t([0, 1, 0]).view(-1, 1, 1), slice(None), t([0, 1]).view(-1, 1), t([1, 2, 0, 1]).view(1, -1)),
    (t([2, 1]), slice(None), slice(None), t([[4], [0]])),
    (0, 1, torch.arange(30).reshape(5, 6) % 3 == 0),
    (slice(None), None, 1, torch.arange(30).reshape(5, 6) % 4 == 1),
    (0, torch.arange(60).reshape(2, 5, 6) % 7 == 0),
    (..., None),
    (..., None, slice(None)),
    (0, ..., slice(1, 3), None, slice(None), None),
]


def _dense_of(fm: FactoredMatrix) -> torch.Tensor:
    return dense(fm.A, fm.B)


def _check(fm: FactoredMatrix, index, reference) -> None:
    D = _dense_of(fm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's deprecation of uint8 masks
        expected = D[index] if reference is None else reference(D)
    out = fm[index]
    assert isinstance(out, FactoredMatrix), type(out)
    got = _dense_of(out)
    assert got.shape == expected.shape, (tuple(got.shape), tuple(expected.shape))
    torch.testing.assert_close(got.to(expected.dtype), expected)


def _id(case):
    index = case[0] if isinstance(case, tuple) and len(case) == 2 and (case[1] is None or callable(case[1])) else case
    items = index if isinstance(index, tuple) else (index,)
    return ",".join(
        f"T{list(i.shape)}{str(i.dtype)[6:]}" if isinstance(i, (torch.Tensor, np.ndarray)) else str(i) for i in items
    ) or "()"


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("case", BATCHED_CASES, ids=[_id(c) for c in BATCHED_CASES])
def test_index_batched(case, dtype):
    _check(make_fm((3, 1, 5, 4), (2, 4, 6), dtype), *case)


@pytest.mark.parametrize("case", MATRIX_CASES, ids=[_id(c) for c in MATRIX_CASES])
def test_index_matrix(case):
    _check(make_fm((5, 4), (4, 6)), *case)


@pytest.mark.parametrize("index", TENSOR_CASES, ids=[_id(c) for c in TENSOR_CASES])
def test_index_to_tensor(index):
    fm = make_fm((3, 1, 5, 4), (2, 4, 6))
    D = _dense_of(fm)
    out = fm[index]
    assert type(out) is torch.Tensor, type(out)
    expected = D[index]
    assert out.shape == expected.shape, (tuple(out.shape), tuple(expected.shape))
    torch.testing.assert_close(out, expected)


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


def test_shared_factor_is_not_copied_along_leading_dims():
    # A (50, 4) shared by 8 heads of B: picking heads keeps A as given (size 1 on the head dim).
    A = torch.randn(50, 4, dtype=torch.float64)
    fm = FactoredMatrix(A, torch.randn(8, 4, 60, dtype=torch.float64))
    for index in ([0, 3, 5], torch.tensor([[1, 2], [3, 4]]), slice(2, 6), 3):
        out = fm[index]
        assert out._A.shape[-2:] == (50, 4) and out._A.numel() == A.numel(), index
        torch.testing.assert_close(_dense_of(out), _dense_of(fm)[index])


def test_wide_index_dtypes_do_not_overflow():
    # Bounds are checked after conversion to int64: int32 values and dims of 128 or more are fine.
    fm = make_fm((300, 3), (3, 4))
    D = _dense_of(fm)
    for index in (t([200, -150], dtype=torch.int32), np.array([299, 130], dtype=np.int16), t(250, dtype=torch.int16)):
        torch.testing.assert_close(_dense_of(fm[index]), D[torch.as_tensor(index).long().reshape(-1)])
    mask = torch.zeros(300, dtype=torch.uint8)
    mask[[5, 200]] = 1
    torch.testing.assert_close(_dense_of(fm[mask]), D[[5, 200]])


# --- hypothesis over index kinds ------------------------------------------------------------------
SHAPE = (3, 2, 5, 6)


@st.composite
def lead_items(draw, size: int):
    kind = draw(st.sampled_from(["int", "neg", "np_int", "tensor0", "slice", "list", "empty", "int32", "np_int8", "mask", "np_mask", "uint8"]))
    i = draw(st.integers(0, size - 1))
    if kind == "int":
        return i
    if kind == "neg":
        return i - size
    if kind == "np_int":
        return np.int64(i)
    if kind == "tensor0":
        return t(i)
    if kind == "slice":
        return slice(draw(st.integers(0, size)), draw(st.integers(0, size)), draw(st.integers(1, 2)))
    picks = draw(st.lists(st.integers(-size, size - 1), min_size=1, max_size=3))
    if kind == "list":
        return picks
    if kind == "empty":
        return []
    if kind == "int32":
        return t(picks, dtype=torch.int32)
    if kind == "np_int8":
        return np.array(picks, dtype=np.int8)
    mask = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    if kind == "mask":
        return t(mask)
    if kind == "uint8":
        return t(mask, dtype=torch.uint8)
    return np.array(mask)


def _as_kept(item):
    """The torch index that picks ``item``'s rows while keeping the dim (ints as one-element lists)."""
    if isinstance(item, (int, np.integer)) or (isinstance(item, torch.Tensor) and item.dim() == 0):
        return [int(item)]
    return item


@given(data=st.data())
def test_hypothesis_index_kinds(data):
    fm = make_fm((3, 1, 5, 4), (2, 4, 6))
    D = _dense_of(fm)
    lead = [data.draw(lead_items(size), label=f"lead{d}") for d, size in enumerate(SHAPE[:2])]
    extra = data.draw(st.sampled_from([(), (None,), (True,), (t(False),)]), label="extra")
    where = data.draw(st.integers(0, 2), label="where")
    lead[where:where] = list(extra)
    # Two advanced indices on leading dims must broadcast against each other, as in torch.
    row = data.draw(lead_items(SHAPE[2]), label="row")
    col = data.draw(lead_items(SHAPE[3]), label="col")
    index = (*lead, row, col)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's deprecation of uint8 masks
        try:
            D_lead = D[(*lead, slice(None), slice(None))]
        except IndexError:
            with pytest.raises(IndexError):
                fm[index]
            return
        expected = D_lead[..., _as_kept(row), :][..., _as_kept(col)]
    out = fm[index]
    assert isinstance(out, FactoredMatrix)
    got = _dense_of(out)
    assert got.shape == expected.shape, (index, tuple(got.shape), tuple(expected.shape))
    torch.testing.assert_close(got, expected)


# --- errors ---------------------------------------------------------------------------------------
#: (index, message) on the (3, 2, 5, 6) FactoredMatrix; torch raises IndexError on the dense product
#: for the first TORCH_TOO of them as well.
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
    ((np.int64(3),), "out of range for dim 0 of size 3"),
    ((t(-4, dtype=torch.int8),), "out of range for dim 0 of size 3"),
    ((0, 0, 0, 0, 0), "too many indices"),
    ((0, 0, 0, 0, None, 0), "too many indices"),
    ((torch.ones(3, 2, 5, 6, 1, dtype=torch.bool),), "too many indices"),
    ((t([0.0, 1.0]),), r"tensor indices must be integers or booleans, got torch\.float32\."),
    ((t(1.0),), r"tensor indices must be integers or booleans, got a 0-dim torch\.float32 tensor"),
    ((t([0, 1], dtype=torch.int8),), r"index tensors must be int64, int32, uint8 or bool \(as in torch\), got torch\.int8; convert"),
    ((t([0, 1], dtype=torch.int16),), r"got torch\.int16; convert the index with `idx\.long\(\)`"),
    ((t([True, False]),), r"the shape of the mask \(2,\) does not match the shape \(3,\) of dims 0 to 0"),
    ((slice(None), torch.ones(3, 5, dtype=torch.bool)), r"the shape of the mask \(3, 5\) does not match"),
    (([0, 1], [0, 1, 1]), r"index tensors on the leading dims must broadcast together \(as in torch\); got shapes \(2,\), \(3,\)"),
    (("a",), "unsupported index type str; use ints, slices, lists"),
    ((1.5,), "unsupported index type float"),
    ((np.array([0.0, 1.0]),), r"array indices must be integers or booleans, got dtype float64"),
    (([0.5, 1],), r"tensor indices must be integers or booleans, got torch\.float32"),
    (([[0, 1], [2]],), r"a list index must hold only integers or only booleans"),
    ((..., slice(None), t([[0, 1], [2, 3]])), "column dim of a FactoredMatrix must be 1-D"),
    ((..., t([[0, 1], [2, 3]]), slice(None)), "row dim of a FactoredMatrix must be 1-D"),
    ((..., [[0, 1], [2, 3]], 1), "row dim of a FactoredMatrix must be 1-D"),
    ((..., ...), "single ellipsis"),
    ((0, torch.ones(2, 5, dtype=torch.bool), slice(None)), "a boolean mask over leading dims and the row dim"),
    ((..., 1, True, 2), r"a boolean scalar index \(`True`/`False`\) can only stand among the leading dims"),
    ((..., 1, 2, t(False)), r"can only stand among the leading dims"),
    ((0, 0, torch.ones(5, 6, dtype=torch.bool), None), r"`None` cannot follow a mask over the row and column dims"),
    ((True, 0, 0, torch.ones(5, 6, dtype=torch.bool)), r"a boolean scalar index cannot be combined with a mask over"),
]
TORCH_TOO = 21


@pytest.mark.parametrize("index, match", ERROR_CASES, ids=[_id(c[0]) for c in ERROR_CASES])
def test_index_errors(index, match):
    fm = make_fm((3, 1, 5, 4), (2, 4, 6))
    with pytest.raises(IndexError, match=match):
        fm[index]


@pytest.mark.parametrize("index", [c[0] for c in ERROR_CASES[:TORCH_TOO]], ids=[_id(c[0]) for c in ERROR_CASES[:TORCH_TOO]])
def test_index_errors_match_torch(index):
    # Where FactoredMatrix raises IndexError for these, torch raises it too on the dense product.
    D = _dense_of(make_fm((3, 1, 5, 4), (2, 4, 6)))
    with pytest.raises(IndexError):
        D[index]


@pytest.mark.parametrize("step", [0, -1])
def test_slice_steps_must_be_positive(step):
    with pytest.raises(ValueError, match=rf"slice steps must be positive \(as in torch\), got {step}; use `\.flip\(\)`"):
        make_fm((3, 1, 5, 4), (2, 4, 6))[::step]


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


def test_meta_factors_index_without_data():
    # Index tensors stay on the host and join the factors' device where needed; nothing reads data.
    A, B = torch.empty(3, 1, 5, 4, device="meta"), torch.empty(2, 4, 6, device="meta")
    fm, cpu = FactoredMatrix(A, B), FactoredMatrix(torch.zeros(3, 1, 5, 4), torch.zeros(2, 4, 6))
    mask = t([True, False, True, False, True])
    for index in ([0, 2], (..., mask, 1), (0, 1, t([[0], [2]]), t([[1, 3]])), (t(True), ..., 0, [1, 2])):
        out = fm[index]
        assert out.device.type == "meta" and out.shape == cpu[index].shape, index
