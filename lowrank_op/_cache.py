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

Two caches follow the rule:

* :class:`ResultCache` belongs to one object (a FactoredMatrix) and is freed with it.
* :class:`TensorCache` holds results of one or two tensors that many objects share (the QR of an
  embedding used by every head's circuit, see :mod:`lowrank_op.shared_bases`). An entry is keyed on
  the tensor a view was taken of (its ``_base``) and the view's layout, so ``W_E``, ``W_E.mT.mT``
  and ``W_E[:]`` share one entry, and it is dropped when that tensor is freed. Its results are
  computed without gradients (callers build what needs a graph from them, per call), so the same
  rule holds: a hit returns what recomputing now would return.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

_INT_VIEW = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: The fingerprint reads memory as rows of this many 64-bit words.
_WORDS_PER_ROW = 64


def _unbroadcast(X: Tensor) -> Tensor:
    """``X`` without its stride-0 (expanded) dims: the same data, each element once."""
    expanded = [stride == 0 and size > 1 for size, stride in zip(X.shape, X.stride())]
    if not any(expanded):
        return X
    return X[tuple(slice(0, 1) if e else slice(None) for e in expanded)]


def _as_block(X: Tensor) -> Tensor:
    """``X`` with its dims ordered by stride, so that a dense view (a transpose, say) is contiguous
    without a copy; a view with gaps is copied."""
    order = sorted(range(X.dim()), key=lambda d: X.stride(d), reverse=True)
    Y = X.permute(order)
    return Y if Y.is_contiguous() else Y.contiguous()


def _words(X: Tensor) -> Tensor:
    """The bits of ``X`` (contiguous, real) as a 1-D int64 tensor: a view when the memory allows
    it (the common case, no copy), else the elements' bit patterns widened to int64."""
    bits = X.reshape(-1).view(_INT_VIEW[X.element_size()])
    per_word = 8 // X.element_size()
    if per_word == 1:
        return bits
    if bits.numel() % per_word == 0 and bits.storage_offset() % per_word == 0:
        return bits.view(torch.int64)
    return bits.to(torch.int64)


def fingerprint(X: Tensor) -> tuple[int, ...]:
    """A fingerprint of the contents of ``X``, bit for bit, from one read of its memory.

    The memory is read as 64-bit integer words laid out in rows of ``_WORDS_PER_ROW``; the row sums
    and the column sums, in wrapping 64-bit arithmetic, are combined with odd position weights,
    and the fingerprint is the total and the two weighted sums. A change of any one element always
    changes the total (its word changes by a non-zero amount below ``2**64``); a swap of two
    words changes a weighted sum; several changes go unseen only if they cancel in every row and
    every column sum at once. NaN payloads and ``-0.0`` count as changes, as they should. Cost:
    two reductions over ``numel`` elements, no copy unless ``X`` is a view with gaps.

    Returns
    -------
    tuple of int
        Four Python ints (three sums and a hash of the shape and layout), comparable with ``==``.
    """
    X = _unbroadcast(X.detach())
    flags = (X.is_conj(), X.is_neg())  # lazy conjugate / negative views: the same storage, read otherwise
    if X.is_conj():
        X = X.conj()  # the un-conjugated view of the same memory, no copy
    if X.is_neg():
        X = X._neg_view()
    if X.is_complex():
        X = torch.view_as_real(X)
    if X.dtype == torch.bool:
        X = X.view(torch.uint8)
    layout = (tuple(X.shape), tuple(st if n > 1 else 0 for n, st in zip(X.shape, X.stride())), flags)
    words = _words(_as_block(X))
    n_rows = words.numel() // _WORDS_PER_ROW
    with torch.no_grad():
        block = words[: n_rows * _WORDS_PER_ROW].view(n_rows, _WORDS_PER_ROW)
        tail = words[n_rows * _WORDS_PER_ROW :]
        cols = block.sum(0)
        cols[: tail.numel()] += tail
        rows = torch.cat([block.sum(1), tail.sum().reshape(1)])
        col_w = torch.arange(cols.numel(), dtype=torch.int64, device=cols.device) * 2 + 1
        row_w = torch.arange(rows.numel(), dtype=torch.int64, device=rows.device) * 2 + 1
        sums = torch.stack([cols.sum(), (cols * col_w).sum(), (rows * row_w).sum()])
    return (*sums.tolist(), hash(layout))


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

    def _match(self, key: Hashable, state: tuple) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not self._same(entry[0], state):
            del self._entries[key]
            return None
        return entry[1]

    def get_or_compute(
        self,
        key: Hashable,
        tensors: Sequence[Tensor],
        compute: Callable[[], Any],
        reuse: Mapping[Hashable, Callable[[Any], Any]] | None = None,
    ) -> Any:
        """``compute()``, or its cached result under the module's rule.

        ``reuse`` maps other keys to a function that derives this result from theirs (the
        singular values from a cached SVD, say); a valid entry under one of them is used instead
        of computing. The tensors are fingerprinted once for all the keys looked at.
        """
        if wants_graph(tensors):
            return compute()
        state = self._state(tensors)
        hit = self._match(key, state)
        if hit is not None:
            return hit
        for other, derive in (reuse or {}).items():
            found = self._match(other, state)
            if found is not None:
                return derive(found)
        value = compute()
        self._entries[key] = (state, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


def _root(X: Tensor) -> Tensor:
    """The tensor whose memory ``X`` views (``X`` itself unless ``X`` is a view)."""
    return X if X._base is None else X._base


def _layout(X: Tensor) -> tuple:
    """What, beside its root, tells a view apart: where it starts, its shape and strides, and how
    its memory is read."""
    return (X.storage_offset(), tuple(X.shape), tuple(X.stride()), X.dtype, X.device, X.is_conj(), X.is_neg())


class TensorCache:
    """Detached results of one or two tensors, shared by every object that holds those tensors.

    Keys are ``(name, (id(root), layout) per tensor, inference mode)``. An entry holds
    weak references to the roots and, for each tensor, its version counter and
    :func:`fingerprint`; a lookup matches only when the roots are the same live objects and both
    figures match. A root's entries are dropped when it is garbage-collected (``weakref.finalize``).
    ``compute`` runs under ``torch.no_grad()``; its results must not carry a graph.
    """

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple, tuple, Any]] = {}
        self._watched: set[int] = set()

    def _key(self, name: Hashable, tensors: Sequence[Tensor]) -> Hashable:
        # Entries are detached, so the grad mode does not matter; inference tensors cannot join a
        # graph later, so the inference mode does.
        return (name, tuple((id(_root(t)), _layout(t)) for t in tensors), torch.is_inference_mode_enabled())

    @staticmethod
    def _state(tensors: Sequence[Tensor]) -> tuple:
        return tuple((t._version, fingerprint(t)) for t in tensors)

    def _watch(self, root: Tensor) -> None:
        if id(root) not in self._watched:
            self._watched.add(id(root))
            weakref.finalize(root, self._drop, id(root))

    def _drop(self, root_id: int) -> None:
        self._watched.discard(root_id)
        for key in [k for k in self._entries if any(part[0] == root_id for part in k[1])]:
            del self._entries[key]

    def _match(self, key: Hashable, tensors: Sequence[Tensor], state: tuple) -> Any | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        refs, old_state, value = entry
        if any(ref() is not _root(t) for ref, t in zip(refs, tensors)) or old_state != state:
            del self._entries[key]
            return None
        return value

    def peek(self, name: Hashable, tensors: Sequence[Tensor]) -> Any | None:
        """The cached result for ``name`` and these tensors, or None (nothing is computed; the
        tensors are fingerprinted only when an entry exists)."""
        key = self._key(name, tensors)
        if key not in self._entries:
            return None
        return self._match(key, tensors, self._state(tensors))

    def get_or_compute(
        self,
        name: Hashable,
        tensors: Sequence[Tensor],
        compute: Callable[[], Any],
        reuse: Mapping[Hashable, Callable[[Any], Any]] | None = None,
    ) -> Any:
        """``compute()`` (run without gradients), or its result cached for these tensors.

        ``reuse`` maps other names to a function deriving this result from theirs (an R factor
        from a cached QR that also holds Q); the tensors are fingerprinted once for all of them.
        """
        state = self._state(tensors)
        hit = self._match(self._key(name, tensors), tensors, state)
        if hit is not None:
            return hit
        for other, derive in (reuse or {}).items():
            found = self._match(self._key(other, tensors), tensors, state)
            if found is not None:
                return derive(found)
        with torch.no_grad():
            value = compute()
        roots = [_root(t) for t in tensors]
        for root in roots:
            self._watch(root)
        self._entries[self._key(name, tensors)] = (tuple(weakref.ref(r) for r in roots), state, value)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


#: The package's one cache of results shared across objects (bases of shared outer factors).
shared = TensorCache()
