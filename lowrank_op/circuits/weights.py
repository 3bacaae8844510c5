"""The weights the circuits are made of, in TransformerLens's shapes, and the built-in random models.

A model is :class:`AttentionWeights`: the embedding ``W_E`` and unembedding ``W_U`` in memory, and
the attention weights behind a :class:`LayerSource`, which hands out a range of layers at a time,
so that a checkpoint's layers can be read (memory-mapped) one batch at a time while the analysis
runs. :class:`StackedLayers` is the source for weights already in memory.

TransformerLens's convention: activations are row vectors multiplied on the right, so per layer

- ``W_Q`` (n_heads, d_model, d_head), ``W_K`` and ``W_V`` (n_kv_heads, d_model, d_head),
- ``W_O`` (n_heads, d_head, d_model).

With grouped-query attention (GQA; ``n_kv_heads < n_heads``, Llama 2 70B, Llama 3, Mistral,
Qwen2, SmolLM2) query head ``h`` reads key/value head ``h // group``, ``group = n_heads /
n_kv_heads``: query heads ``kv * group ... (kv + 1) * group - 1`` share key/value head ``kv``. The
key/value weights are kept once per key/value head (never copied per query head), and the
analysis pairs them by broadcasting (:func:`grouped`), so each shared head's factorisations are
computed once too. Multi-head attention is the case ``n_kv_heads == n_heads``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

#: Standard deviation of the random models' weights (GPT-2's ``initializer_range``).
RANDOM_INIT_STD = 0.02

#: Named shapes of the built-in random model (``--random-shape NAME``).
RANDOM_PRESETS = {
    "gpt2-small": {"n_layers": 12, "n_heads": 12, "d_model": 768, "d_vocab": 50257},
    "gpt2-xl": {"n_layers": 48, "n_heads": 25, "d_model": 1600, "d_vocab": 50257},
    "llama3-8b": {"n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "d_model": 4096, "d_head": 128,
                  "d_vocab": 128256, "untied": True},
}
#: The built-in random model's shape when none is given: GPT-2 small.
GPT2_SMALL_SHAPE = RANDOM_PRESETS["gpt2-small"]


@dataclass(frozen=True)
class LayerWeights:
    """The attention weights of a range of layers (leading dim: the layers of that range).

    Attributes
    ----------
    W_Q : Tensor, shape (n, n_heads, d_model, d_head)
    W_K, W_V : Tensor, shape (n, n_kv_heads, d_model, d_head)
    W_O : Tensor, shape (n, n_heads, d_head, d_model)
    """

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor

    def __iter__(self):
        return iter((self.W_Q, self.W_K, self.W_V, self.W_O))


class LayerSource(Protocol):
    """Where a model's attention weights come from: ``read(start, stop)`` gives layers
    ``start..stop-1`` as :class:`LayerWeights` in the model's dtype."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    dtype: torch.dtype

    def read(self, start: int, stop: int) -> LayerWeights: ...


@dataclass(frozen=True)
class StackedLayers:
    """A :class:`LayerSource` over weights in memory: ``read`` returns views, copying nothing."""

    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor

    def __post_init__(self) -> None:
        L, H, d_model, d_head = self.W_Q.shape
        H_kv = self.W_K.shape[1] if self.W_K.dim() == 4 else 0
        expected = {"W_K": (L, H_kv, d_model, d_head), "W_V": (L, H_kv, d_model, d_head),
                    "W_O": (L, H, d_head, d_model)}
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"`{name}` must have shape {shape} to match W_Q {tuple(self.W_Q.shape)} "
                                 f"and W_K's {H_kv} key/value heads; got {got}.")
        if H_kv == 0 or H % H_kv:
            raise ValueError(f"the {H} query heads must split evenly over the key/value heads; W_K has {H_kv}.")

    n_layers = property(lambda self: self.W_Q.shape[0])
    n_heads = property(lambda self: self.W_Q.shape[1])
    n_kv_heads = property(lambda self: self.W_K.shape[1])
    d_model = property(lambda self: self.W_Q.shape[2])
    d_head = property(lambda self: self.W_Q.shape[3])
    dtype = property(lambda self: self.W_Q.dtype)

    def read(self, start: int, stop: int) -> LayerWeights:
        return LayerWeights(self.W_Q[start:stop], self.W_K[start:stop], self.W_V[start:stop], self.W_O[start:stop])


@dataclass(frozen=True)
class AttentionWeights:
    """A model's embedding, unembedding and attention weights, in TransformerLens's shapes.

    Attributes
    ----------
    W_E : Tensor, shape (d_vocab, d_model)
    W_U : Tensor, shape (d_model, d_vocab)
        ``W_E.T`` (a view) when the checkpoint ties its embeddings.
    layers : LayerSource
        The attention weights; :attr:`W_Q` and the like read all layers at once.
    layout : str
        ``"gpt2"``, ``"bert"``, ``"llama"``, ``"neox"`` or ``"random"``.
    source : str
        The file read, or a description of the random model.
    tied : bool
        Whether ``W_U`` is ``W_E^T``.
    n_heads_source : str
        Where the number of heads came from.
    tensor_names : dict
        For messages: the checkpoint's name of each of ``W_E, W_Q, W_K, W_V, W_O, W_U``, with
        ``{i}`` for the layer; ``W_U`` is named as ``W_E`` when tied. Empty for the random model.
    vocab : list of str, optional
        Token strings by id, from the vocabulary shipped with the checkpoint; None without one.
    rotary : bool
        Whether the model applies rotary position embeddings to queries and keys (the QK circuit
        reported is then the position-free ``W_E W_Q W_K^T W_E^T``, as TransformerLens's).
    finite_checked : bool
        Every tensor is checked for NaN and infinity as it is read (a checkpoint's loader does so),
        so :func:`lowrank_op.circuits.analysis.analyze` does not check them again.
    """

    W_E: Tensor
    W_U: Tensor
    layers: LayerSource
    layout: str
    source: str
    tied: bool
    n_heads_source: str = ""
    tensor_names: dict = field(default_factory=dict)
    vocab: list[str] | None = None
    rotary: bool = False
    finite_checked: bool = False

    def __post_init__(self) -> None:
        d_vocab, d_model = self.W_E.shape
        if tuple(self.W_U.shape) != (d_model, d_vocab):
            raise ValueError(f"`W_U` must have shape {(d_model, d_vocab)} to match W_E; got {tuple(self.W_U.shape)}.")
        if self.layers.d_model != d_model:
            raise ValueError(f"the layers' d_model {self.layers.d_model} does not match W_E's {d_model}.")
        if self.vocab is not None and len(self.vocab) != d_vocab:
            raise ValueError(f"the vocabulary lists {len(self.vocab)} tokens but W_E has {d_vocab} rows.")

    n_layers = property(lambda self: self.layers.n_layers)
    n_heads = property(lambda self: self.layers.n_heads)
    n_kv_heads = property(lambda self: self.layers.n_kv_heads)
    d_head = property(lambda self: self.layers.d_head)
    d_model = property(lambda self: self.W_E.shape[1])
    d_vocab = property(lambda self: self.W_E.shape[0])
    dtype = property(lambda self: self.W_E.dtype)

    @classmethod
    def from_tensors(cls, W_E: Tensor, W_Q: Tensor, W_K: Tensor, W_V: Tensor, W_O: Tensor, W_U: Tensor,
                     **fields) -> AttentionWeights:
        """A model from stacked tensors in memory (:class:`StackedLayers`); ``fields`` as the class's."""
        return cls(W_E=W_E, W_U=W_U, layers=StackedLayers(W_Q, W_K, W_V, W_O), **fields)

    def replace(self, **changes) -> AttentionWeights:
        """A copy with fields changed (``dataclasses.replace``); ``W_Q``, ``W_K``, ``W_V`` and ``W_O``
        replace those of the layers, which are then held in memory (every layer read). New tensors
        are not known to be finite: ``finite_checked`` becomes False unless given."""
        if {"W_E", "W_U", "layers", "W_Q", "W_K", "W_V", "W_O"} & set(changes):
            changes.setdefault("finite_checked", False)
        stacked = {k: changes.pop(k) for k in ("W_Q", "W_K", "W_V", "W_O") if k in changes}
        if stacked:
            current = self._all()
            changes["layers"] = StackedLayers(**{k: stacked.get(k, getattr(current, k)) for k in ("W_Q", "W_K", "W_V", "W_O")})
        return dataclasses.replace(self, **changes)

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 without GQA)."""
        return self.n_heads // self.n_kv_heads

    def read(self, start: int, stop: int) -> LayerWeights:
        """Layers ``start..stop-1`` (:meth:`LayerSource.read`)."""
        return self.layers.read(start, stop)

    def _all(self) -> LayerWeights:
        return self.layers.read(0, self.n_layers)

    W_Q = property(lambda self: self._all().W_Q, doc="(n_layers, n_heads, d_model, d_head); reads every layer.")
    W_K = property(lambda self: self._all().W_K, doc="(n_layers, n_kv_heads, d_model, d_head); reads every layer.")
    W_V = property(lambda self: self._all().W_V, doc="(n_layers, n_kv_heads, d_model, d_head); reads every layer.")
    W_O = property(lambda self: self._all().W_O, doc="(n_layers, n_heads, d_head, d_model); reads every layer.")

    @property
    def layer_nbytes(self) -> int:
        """Bytes of one layer's attention weights in the model's dtype."""
        per_layer = (2 * self.n_heads + 2 * self.n_kv_heads) * self.d_model * self.d_head
        return per_layer * self.W_E.element_size()

    @property
    def nbytes(self) -> int:
        """Bytes of the weights the circuits use, all layers counted (``W_U`` only when it is not
        tied to ``W_E``), whether or not they are all in memory at once."""
        embed = self.W_E.numel() * self.W_E.element_size() * (1 if self.tied else 2)
        return embed + self.n_layers * self.layer_nbytes


def grouped(layer: LayerWeights, group: int) -> dict[str, tuple[Tensor, Tensor]]:
    """The inner factors of a range of layers' circuits, paired by broadcasting, copying nothing.

    Returns
    -------
    dict
        ``"ov"``: ``(W_V, W_O)`` as shapes (n, n_kv, 1, d_model, d_head) and (n, n_kv, group,
        d_head, d_model); ``"qk"``: ``(W_Q, W_K^T)`` as (n, n_kv, group, d_model, d_head) and
        (n, n_kv, 1, d_head, d_model). Query head ``h = kv * group + g`` sits at ``[:, kv, g]``, so
        results of shape (n, n_kv, group, ...) reshape to (n, n_heads, ...) in head order. A key
        or value factor appears once per key/value head, so anything computed from it alone (its
        QR in :func:`lowrank_op.kernels.svdvals`) is computed once for its group.
    """
    n, H, d_model, d_head = layer.W_Q.shape
    n_kv = H // group
    W_Q = layer.W_Q.reshape(n, n_kv, group, d_model, d_head)
    W_O = layer.W_O.reshape(n, n_kv, group, d_head, d_model)
    return {"ov": (layer.W_V[:, :, None], W_O), "qk": (W_Q, layer.W_K[:, :, None].mT)}


def ungrouped(t: Tensor) -> Tensor:
    """A result of leading shape (n, n_kv, group, ...) as (n, n_heads, ...), in query-head order
    (query head ``kv * group + g`` from ``[:, kv, g]``): the inverse of :func:`grouped`'s pairing."""
    return t.reshape(t.shape[0], t.shape[1] * t.shape[2], *t.shape[3:])


# --- The built-in random models -------------------------------------------------------------------
def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def random_weights(
    n_layers: int = GPT2_SMALL_SHAPE["n_layers"],
    n_heads: int = GPT2_SMALL_SHAPE["n_heads"],
    d_model: int = GPT2_SMALL_SHAPE["d_model"],
    d_vocab: int = GPT2_SMALL_SHAPE["d_vocab"],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    n_kv_heads: int | None = None,
    d_head: int | None = None,
    untied: bool = False,
) -> AttentionWeights:
    """A seeded random model; GPT-2 small's shapes and tied embeddings by default.

    Parameters
    ----------
    n_layers, n_heads, d_model, d_vocab : int
    seed : int
    dtype : torch.dtype
    n_kv_heads : int, optional
        Key/value heads (GQA); ``n_heads`` by default. Must divide ``n_heads``.
    d_head : int, optional
        Head width; ``d_model // n_heads`` by default (then ``n_heads`` must divide ``d_model``).
    untied : bool
        Draw a separate ``W_U`` (as Llama 3 has) instead of ``W_E^T``.

    Notes
    -----
    Every weight is drawn i.i.d. from ``N(0, RANDOM_INIT_STD^2)`` (GPT-2's initialisation) by a
    ``torch.Generator`` seeded with ``seed``, in the order W_E, W_Q, W_K, W_V, W_O, then W_U when
    untied, so the model is the same on every machine for a given seed and shape (and GPT-2
    small's is the same model as before these options existed). Memory: every weight, ``(d_vocab
    (1 or 2) + n_layers (2 n_heads + 2 n_kv_heads) d_head) d_model`` numbers: 268 MB in float32
    at GPT-2 small's shapes, 9.4 GB at Llama-3-8B's.
    """
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads), ("d_model", d_model), ("d_vocab", d_vocab),
                        ("n_kv_heads", n_kv_heads)):
        if not _is_positive_int(value):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if n_heads % n_kv_heads:
        raise ValueError(f"`n_kv_heads` ({n_kv_heads}) must divide `n_heads` ({n_heads}).")
    if d_head is None:
        if d_model % n_heads:
            raise ValueError(f"`n_heads` ({n_heads}) must divide `d_model` ({d_model}), or pass `d_head`.")
        d_head = d_model // n_heads
    elif not _is_positive_int(d_head):
        raise ValueError(f"`d_head` must be a positive integer, got {d_head!r}.")
    gen = torch.Generator().manual_seed(seed)
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def draw(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=draw_dtype).mul_(RANDOM_INIT_STD).to(dtype)

    W_E = draw(d_vocab, d_model)
    W_Q = draw(n_layers, n_heads, d_model, d_head)
    W_K, W_V = (draw(n_layers, n_kv_heads, d_model, d_head) for _ in range(2))
    W_O = draw(n_layers, n_heads, d_head, d_model)
    W_U = draw(d_model, d_vocab) if untied else W_E.T
    shape = f"n_layers={n_layers}, n_heads={n_heads}, d_model={d_model}, d_vocab={d_vocab}"
    if n_kv_heads != n_heads:
        shape += f", n_kv_heads={n_kv_heads}"
    if d_head * n_heads != d_model:
        shape += f", d_head={d_head}"
    if untied:
        shape += ", untied W_U"
    return AttentionWeights(
        W_E=W_E, W_U=W_U, layers=StackedLayers(W_Q, W_K, W_V, W_O), layout="random",
        source=f"built-in random model (seed {seed}; {shape})", tied=not untied, n_heads_source="model shape",
    )
