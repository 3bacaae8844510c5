"""The package's one cache of results computed from tensors, and its one rule.

A result is handed back from the cache only when recomputing it now would give the same values
and the same autograd graph:

* **Same values.** The entry remembers, for each tensor it was computed from, the tensor object
  itself, its in-place version counter and a fingerprint of its contents (:func:`fingerprint`).
  A later lookup must match all three. The version counter alone misses edits made through
  ``.data``, through a NumPy array sharing the memory, or through another tensor object sharing
  the storage; the fingerprint sees them.
* **Same graph.** A result is cached only when it carries no autograd graph: when gradients are
  not being recorded (``torch.no_grad()``, ``inference_mode``) or no input requires them. When a
  graph is wanted, the result is recomputed on every call, so each call has a graph of its own
  (a second ``backward`` works, as it does for the dense computation) and a result first computed
  under ``no_grad`` is never handed to code that wants gradients. The grad mode and inference mode
  are part of the key.

The fingerprint costs one pass over each input (``O(numel)``, about the time of reading it once),
against the ``O(n mdim^2)`` of the decompositions that are cached, so a hit still saves a factor
of about ``mdim``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _unbroadcast(X: Tensor) -> Tensor:
    """``X`` without its stride-0 (expanded) dims: the same data, each element once."""
    index = tuple(0 if stride == 0 and size > 1 else slice(None) for size, stride in zip(X.shape, X.stride()))
    return X[index] if any(i == 0 for i in index) else X


def fingerprint(X: Tensor) -> tuple[int, ...]:
    """A fingerprint of the contents of ``X``, bit for bit, in one pass over it.

    The elements' bit patterns, read as integers, are summed along the last dim and along all the
    others in 64-bit arithmetic; the fingerprint is the total and the two sums weighted by odd
    position weights. A change of any one element always changes the total (its bit pattern
    changes by a non-zero amount below ``2**64``); several changes go unseen only if they cancel in
    every row and column sum at once. NaN payloads and ``-0.0`` count as changes, as they should.

    Returns
    -------
    tuple of int
        Four Python ints (three sums and the shape's hash), comparable with ``==``.
    """
    X = _unbroadcast(X.detach())
    flags = (X.is_conj(), X.is_neg())  # lazy conjugate / negative views: the same storage, read otherwise
    if X.is_conj():
        X = X.conj()  # the un-conjugated view of the same memory, no copy
    if X.is_neg():
        X = X._neg_view()
    if X.is_complex():
        X = torch.view_as_real(X)
    if X.dim() == 0:
        X = X.reshape(1, 1)
    elif X.dim() == 1:
        X = X.unsqueeze(0)
    if X.dtype == torch.bool:
        X = X.to(torch.uint8)
    bits = X.view(_INT_VIEW[X.element_size()])
    with torch.no_grad():
        cols = bits.sum(dim=tuple(range(bits.dim() - 1)), dtype=torch.int64)  # (last,)
        rows = bits.sum(dim=-1, dtype=torch.int64).reshape(-1)  # (prod(leading),)
        col_w = torch.arange(1, 2 * cols.numel() + 1, 2, dtype=torch.int64, device=cols.device)
        row_w = torch.arange(1, 2 * rows.numel() + 1, 2, dtype=torch.int64, device=rows.device)
        sums = torch.stack([cols.sum(), (cols * col_w).sum(), (rows * row_w).sum()])
    return (*sums.tolist(), hash((tuple(X.shape), flags)))


def _context() -> tuple[bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled()


def wants_graph(tensors: Sequence[Tensor]) -> bool:
    """Whether a result computed from ``tensors`` now would carry an autograd graph."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class ResultCache:
    """Results computed from a fixed list of tensors, each kept under a key (``"svd:auto"``, ...).

    One instance belongs to one object (a :class:`~lowrank_op.FactoredMatrix`, a
    :class:`~lowrank_op.FactoredAddedDiag`) and is freed with it; nothing is global. See the module
    docstring for when an entry is reused.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple, Any]] = {}

    @staticmethod
    def _state(tensors: Sequence[Tensor]) -> tuple:
        return (_context(), tuple((t, t._version, fingerprint(t)) for t in tensors))

    @staticmethod
    def _same(a: tuple, b: tuple) -> bool:
        if a[0] != b[0] or len(a[1]) != len(b[1]):
            return False
        return all(x[0] is y[0] and x[1:] == y[1:] for x, y in zip(a[1], b[1]))

    def get(self, key: Hashable, tensors: Sequence[Tensor]) -> Any | None:
        """The entry under ``key`` if recomputing it from ``tensors`` now would give it; else None."""
        if key not in self._entries or wants_graph(tensors):
            return None
        return self._match(key, self._state(tensors))

    def _match(self, key: Hashable, state: tuple) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self._same(entry[0], state):
            del self._entries[key]
            return None
        return entry[1]

    def get_or_compute(self, key: Hashable, tensors: Sequence[Tensor], compute: Callable[[], Any]) -> Any:
        """``compute()``, or its cached result under the module's rule."""
        if wants_graph(tensors):
            return compute()
        state = self._state(tensors)
        hit = self._match(key, state)
        if hit is not None:
            return hit
        value = compute()
        self._entries[key] = (state, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
