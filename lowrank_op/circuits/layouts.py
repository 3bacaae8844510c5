"""Checkpoint layouts as data: where each model family keeps its embedding, unembedding and
attention weights, and how those split into heads.

=========  ===================================================  ======================================
layout     per layer ``i`` (after the prefix)                   embedding; unembedding
=========  ===================================================  ======================================
GPT-2      ``h.{i}.attn.c_attn.weight`` (d_model, 3 d_model):   ``wte.weight``; ``lm_head.weight``
           fused Q, K, V, Conv1D (in, out);                     or tied. Prefix e.g. ``transformer.``
           ``h.{i}.attn.c_proj.weight`` (in, out)
BERT       ``encoder.layer.{i}.attention.self.{query,key,       ``embeddings.word_embeddings.weight``;
           value}.weight``, ``...attention.output.dense.        ``cls.predictions.decoder.weight`` or
           weight``, nn.Linear (out, in)                        tied. Prefix e.g. ``bert.``
Llama      ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``,      ``embed_tokens.weight``;
           nn.Linear (out, in); K and V have                    ``lm_head.weight`` or tied. Prefix
           ``num_key_value_heads`` heads (GQA)                  ``model.``. Also Mistral, Qwen2,
                                                                SmolLM2 and Gemma checkpoints.
GPT-NeoX   ``layers.{i}.attention.query_key_value.weight``      ``embed_in.weight``;
           (3 d_model, d_model), (out, in), per head            ``embed_out.weight``. Prefix
           ``[q | k | v]`` interleaved; ``layers.{i}.           ``gpt_neox.`` (Pythia).
           attention.dense.weight`` (out, in)
GGUF       ``blk.{i}.attn_{q,k,v,output}.weight`` (out, in)     ``token_embd.weight``;
           as the Llama layout (llama.cpp's names)              ``output.weight`` or tied
=========  ===================================================  ======================================

A layout is a :class:`Layout`: the names (templates with ``{i}`` for the layer), how the attention
tensors split into TransformerLens's per-head shapes (``split``), and whether the model is rotary.
The unembedding is looked up both after the prefix and without it (``lm_head.weight`` stands
outside ``model.``). Adding a family is adding an entry to :data:`LAYOUTS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import Tensor

from lowrank_op.errors import CheckpointError

#: A layer index with more digits than this cannot be a layer (and is not converted to an int).
_MAX_INDEX_DIGITS = 18


@dataclass(frozen=True)
class Layout:
    """Where a model family keeps its circuit weights.

    Attributes
    ----------
    key, name : str
        ``"llama"``, ``"Llama"``.
    embed : str
        The embedding's name after the prefix, (d_vocab, d_model).
    unembed : str
        The unembedding's name (after the prefix or without one), (d_vocab, d_model); absent means tied.
    layer_root : str
        What every tensor of layer ``i`` starts with after the prefix (``"h.{i}."``).
    attention : tuple of str
        The attention tensors of layer ``i``, in the order :func:`split_heads` takes them.
    split : str
        ``"fused_conv1d"`` (GPT-2: one (d_model, 3 d_model) tensor, then W_O, (in, out)),
        ``"linear"`` (Q, K, V, O as nn.Linear (out, in)) or ``"neox"`` (one (3 d_model, d_model)
        tensor with each head's ``[q | k | v]`` rows together, then O, (out, in)).
    rotary : bool
        Queries and keys are rotated by position (the QK circuit reported is position-free).
    gqa : bool
        K and V may have fewer heads than Q (read from the config's ``num_key_value_heads``).
    """

    key: str
    name: str
    embed: str
    unembed: str
    layer_root: str
    attention: tuple[str, ...]
    split: str
    rotary: bool = False
    gqa: bool = False


GPT2 = Layout("gpt2", "GPT-2", "wte.weight", "lm_head.weight", "h.{i}.",
              ("h.{i}.attn.c_attn.weight", "h.{i}.attn.c_proj.weight"), "fused_conv1d")
BERT = Layout("bert", "BERT", "embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "encoder.layer.{i}.",
              tuple(f"encoder.layer.{{i}}.attention.{part}.weight"
                    for part in ("self.query", "self.key", "self.value", "output.dense")), "linear")
LLAMA = Layout("llama", "Llama", "embed_tokens.weight", "lm_head.weight", "layers.{i}.",
               tuple(f"layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkvo"), "linear", rotary=True, gqa=True)
NEOX = Layout("neox", "GPT-NeoX", "embed_in.weight", "embed_out.weight", "layers.{i}.",
              ("layers.{i}.attention.query_key_value.weight", "layers.{i}.attention.dense.weight"), "neox", rotary=True)
GGUF_LLAMA = Layout("gguf", "GGUF (llama)", "token_embd.weight", "output.weight", "blk.{i}.",
                    tuple(f"blk.{{i}}.attn_{p}.weight" for p in ("q", "k", "v", "output")), "linear",
                    rotary=True, gqa=True)

#: The layouts of safetensors checkpoints, detected from the embedding's name.
LAYOUTS = {layout.key: layout for layout in (GPT2, BERT, LLAMA, NEOX)}
#: Every layout's display name, the random model's and GGUF's included.
LAYOUT_NAMES = {**{k: v.name for k, v in LAYOUTS.items()}, "gguf": GGUF_LLAMA.name, "random": "random"}


def detect_layout(names: set[str] | list[str], layouts: dict[str, Layout] = LAYOUTS) -> tuple[Layout, str]:
    """``(layout, prefix)`` of a checkpoint from its tensor names.

    The prefix is whatever stands before the embedding's name (``""``, ``"transformer."``,
    ``"model."``, ...). Raises :class:`CheckpointError` listing the names looked for when no
    layout's embedding is found, or when several are.
    """
    found = []
    for layout in layouts.values():
        for name in names:
            if name == layout.embed or name.endswith("." + layout.embed):
                found.append((layout, name[: len(name) - len(layout.embed)]))
    if len(found) == 1:
        return found[0]
    looked_for = "; ".join(f"{layout.name}: `{layout.embed}` with " + ", ".join(f"`{n}`" for n in layout.attention)
                           for layout in layouts.values())
    if not found:
        sample = ", ".join(sorted(names)[:8]) or "(none)"
        raise CheckpointError(
            f"the checkpoint is in no layout lowrank_op reads. It looked for ({looked_for}), each "
            f"optionally prefixed (e.g. `transformer.`, `bert.`, `model.`, `gpt_neox.`). The file has "
            f"{len(names)} tensors, e.g. {sample}."
        )
    raise CheckpointError(
        "the checkpoint holds more than one embedding matrix: "
        + ", ".join(f"`{prefix}{layout.embed}`" for layout, prefix in found)
        + "; lowrank_op reads one model per file."
    )


def _spans_text(spans: list[tuple[int, int]], limit: int = 6) -> str:
    """Inclusive ranges as ``"0-3, 7, 10-12"``; at most ``limit`` of them, then a count of the rest."""
    text = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans[:limit])
    return text + (f" and {len(spans) - limit} more ranges" if len(spans) > limit else "")


def _ranges(indices: list[int]) -> str:
    """Sorted distinct integers as ``"0-3, 7, 10-12"`` (:func:`_spans_text`)."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return _spans_text([(a, b) for a, b in spans])


def count_layers(names, prefix: str, layout: Layout) -> int:
    """The number of layers, from the names under ``layout.layer_root``; they must be ``0..n-1``.

    Only the indices present are collected and sorted (nothing proportional to the largest index
    is allocated), so a stray ``h.10000000.`` is reported by name, with the gap it leaves.
    """
    root = re.escape(prefix + layout.layer_root).replace(r"\{i\}", r"(\d+)")
    first_name: dict[int, str] = {}
    for name in sorted(names):
        if m := re.match(root, name):
            digits = m.group(1)
            index = int(digits) if len(digits) <= _MAX_INDEX_DIGITS else 10**_MAX_INDEX_DIGITS
            first_name.setdefault(index, name)
    if not first_name:
        raise CheckpointError(
            f"the checkpoint has `{prefix}{layout.embed}` but no layers: no tensor named like "
            f"`{prefix}{layout.attention[0].format(i=0)}`."
        )
    present = sorted(first_name)
    n = len(present)
    if present[-1] != n - 1:  # n distinct indices >= 0 are 0..n-1 exactly when the largest is n - 1
        gaps, expected = [], 0
        for i in present:
            if i > expected:
                gaps.append((expected, i - 1))
            expected = i + 1
        stray = next(i for i in present if i >= n)
        raise CheckpointError(
            f"the layers must be numbered 0 to n-1 without gaps, but the checkpoint's {n} layers are numbered "
            f"{_ranges(present)} (e.g. `{first_name[stray]}`), so these are missing: {_spans_text(gaps)}. Remove or "
            "renumber the stray tensors."
        )
    return n


def expected_shapes(layout: Layout, d_model: int, n_heads: int, n_kv_heads: int, d_head: int) -> list[tuple[tuple, str]]:
    """The shape each of ``layout.attention`` must have, with a phrase saying why."""
    q, kv = n_heads * d_head, n_kv_heads * d_head
    if layout.split == "fused_conv1d":
        return [((d_model, 3 * q), "(d_model, 3 d_model): fused Q, K, V, Conv1D (in, out)"),
                ((q, d_model), "(d_model, d_model), Conv1D (in, out)")]
    if layout.split == "neox":
        return [((3 * q, d_model), "(3 d_model, d_model): each head's q, k, v rows together, nn.Linear (out, in)"),
                ((d_model, q), "(d_model, d_model), nn.Linear (out, in)")]
    return [((q, d_model), "(n_heads d_head, d_model), nn.Linear (out, in)"),
            ((kv, d_model), "(n_kv_heads d_head, d_model), nn.Linear (out, in)"),
            ((kv, d_model), "(n_kv_heads d_head, d_model), nn.Linear (out, in)"),
            ((d_model, q), "(d_model, n_heads d_head), nn.Linear (out, in)")]


def _columns_to_heads(W: Tensor, n_heads: int) -> Tensor:
    """(d_model, n_heads d_head) in (in, out) orientation -> (n_heads, d_model, d_head)."""
    return W.reshape(W.shape[0], n_heads, -1).permute(1, 0, 2)


def _rows_to_heads(W: Tensor, n_heads: int) -> Tensor:
    """(n_heads d_head, d_model) in (in, out) orientation -> (n_heads, d_head, d_model)."""
    return W.reshape(n_heads, -1, W.shape[-1])


def split_heads(layout: Layout, tensors: list[Tensor], n_heads: int, n_kv_heads: int) -> tuple[Tensor, ...]:
    """One layer's ``(W_Q, W_K, W_V, W_O)`` in TransformerLens's shapes from its stored tensors.

    Hugging Face's attention splits features head-major (``view(..., n_heads, d_head)``): head ``h``
    is features ``h d_head : (h + 1) d_head``, except GPT-NeoX's fused tensor, which holds each
    head's ``3 d_head`` rows together (``view(..., n_heads, 3 d_head)``, then ``q, k, v`` in that
    order). Returns views where the layout allows (a copy is made by the caller's ``contiguous``).
    """
    if layout.split == "fused_conv1d":
        qkv, o = tensors  # (in, out): x @ qkv = [q | k | v]
        q, k, v = qkv.split(qkv.shape[1] // 3, dim=1)
        return (_columns_to_heads(q, n_heads), _columns_to_heads(k, n_heads), _columns_to_heads(v, n_heads),
                _rows_to_heads(o, n_heads))
    if layout.split == "neox":
        qkv, o = tensors  # (out, in), rows (head, [q | k | v], d_head)
        per_head = qkv.reshape(n_heads, 3, -1, qkv.shape[-1])  # (H, 3, d_head, d_model)
        q, k, v = (per_head[:, j].mT for j in range(3))  # (H, d_model, d_head)
        return q, k, v, _rows_to_heads(o.T, n_heads)
    q, k, v, o = (t.T for t in tensors)  # nn.Linear (out, in) -> (in, out)
    return (_columns_to_heads(q, n_heads), _columns_to_heads(k, n_kv_heads), _columns_to_heads(v, n_kv_heads),
            _rows_to_heads(o, n_heads))
