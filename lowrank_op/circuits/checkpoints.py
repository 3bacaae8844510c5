"""Attention and embedding weights of a transformer, read from a safetensors checkpoint.

Two layouts are read, each with or without a prefix before its tensor names:

========  ==========================================  ============================================
layout    per layer ``i``                             embeddings, unembedding
========  ==========================================  ============================================
GPT-2     ``h.{i}.attn.c_attn.weight`` (d_model,      ``wte.weight`` (d_vocab, d_model);
          3 d_model): fused Q, K, V in Conv1D         ``lm_head.weight`` (d_vocab, d_model) if
          orientation (in, out);                      present, else tied (``W_U = W_E^T``).
          ``h.{i}.attn.c_proj.weight`` (in, out)      Prefix e.g. ``transformer.``.
BERT      ``encoder.layer.{i}.attention.self.         ``embeddings.word_embeddings.weight``;
          {query,key,value}.weight`` and              ``cls.predictions.decoder.weight`` if
          ``encoder.layer.{i}.attention.output.       present, else tied. Prefix e.g. ``bert.``
          dense.weight``, nn.Linear orientation       (sentence-transformers' MiniLM has none).
          (out, in)
========  ==========================================  ============================================

Everything is returned in TransformerLens's convention, where activations are row vectors
multiplied on the right: ``W_Q, W_K, W_V`` of shape (n_layers, n_heads, d_model, d_head) and
``W_O`` of shape (n_layers, n_heads, d_head, d_model). Biases and LayerNorm parameters are not
read (nothing is folded in, as TransformerLens with ``fold_ln=False``).

safetensors is an optional dependency (``pip install "lowrank_op[weights]"``), imported only when
a checkpoint is read. :func:`random_weights` needs nothing beyond torch.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from lowrank_op.errors import CheckpointError

#: Heads are assumed to have this width when neither ``n_heads`` nor a config.json says otherwise
#: (GPT-2 small/medium/large/XL and BERT-base/large all use 64).
DEFAULT_D_HEAD = 64
#: Keys of config.json that hold the number of heads (GPT-2's, then BERT's).
CONFIG_N_HEADS_KEYS = ("n_head", "num_attention_heads")
#: The built-in random model's shape: GPT-2 small.
GPT2_SMALL_SHAPE = {"n_layers": 12, "n_heads": 12, "d_model": 768, "d_vocab": 50257}
#: Standard deviation of the random model's weights (GPT-2's ``initializer_range``).
RANDOM_INIT_STD = 0.02

_GPT2 = {
    "embed": "wte.weight",
    "unembed": "lm_head.weight",
    "layer_root": "h.{i}.",
    "layer": ("h.{i}.attn.c_attn.weight", "h.{i}.attn.c_proj.weight"),
}
_BERT = {
    "embed": "embeddings.word_embeddings.weight",
    "unembed": "cls.predictions.decoder.weight",
    "layer_root": "encoder.layer.{i}.",
    "layer": (
        "encoder.layer.{i}.attention.self.query.weight",
        "encoder.layer.{i}.attention.self.key.weight",
        "encoder.layer.{i}.attention.self.value.weight",
        "encoder.layer.{i}.attention.output.dense.weight",
    ),
}
LAYOUTS = {"gpt2": _GPT2, "bert": _BERT}
LAYOUT_NAMES = {"gpt2": "GPT-2", "bert": "BERT", "random": "random"}

#: safetensors' dtypes and their bits per element (the format's own list, as of safetensors 0.8).
SAFETENSORS_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "U16": 16, "I16": 16, "U32": 32, "I32": 32, "U64": 64, "I64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "F8_E8M0": 8, "F16": 16, "BF16": 16, "F32": 32, "F64": 64, "C64": 64,
}
#: The dtypes a weight may have here: real floating types that torch widens exactly.
WEIGHT_DTYPES = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")
#: safetensors refuses headers longer than this (its ``MAX_HEADER_SIZE``), and so does this reader.
MAX_HEADER_BYTES = 100_000_000
#: A layer index with more digits than this cannot be a layer (and is not converted to an int).
_MAX_INDEX_DIGITS = 18


@dataclass(frozen=True)
class AttentionWeights:
    """The weights the OV and QK circuits are made of, in TransformerLens's shapes.

    Attributes
    ----------
    W_E : Tensor, shape (d_vocab, d_model)
    W_Q, W_K, W_V : Tensor, shape (n_layers, n_heads, d_model, d_head)
    W_O : Tensor, shape (n_layers, n_heads, d_head, d_model)
    W_U : Tensor, shape (d_model, d_vocab)
        ``W_E.T`` (a view) when the checkpoint ties its embeddings.
    layout : str
        ``"gpt2"``, ``"bert"`` or ``"random"``.
    source : str
        The file read, or a description of the random model.
    tied : bool
        Whether ``W_U`` is ``W_E^T``.
    n_heads_source : str
        Where the number of heads came from.
    tensor_names : dict
        For messages: the checkpoint's name of each of ``W_E, W_Q, W_K, W_V, W_O, W_U``, with
        ``{i}`` for the layer (``"h.{i}.attn.c_attn.weight"``); ``W_U`` is named as ``W_E`` when
        tied. Empty for the random model.
    """

    W_E: Tensor
    W_Q: Tensor
    W_K: Tensor
    W_V: Tensor
    W_O: Tensor
    W_U: Tensor
    layout: str
    source: str
    tied: bool
    n_heads_source: str = ""
    tensor_names: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d_vocab, d_model = self.W_E.shape
        L, H, _, d_head = self.W_Q.shape
        expected = {
            "W_Q": (L, H, d_model, d_head),
            "W_K": (L, H, d_model, d_head),
            "W_V": (L, H, d_model, d_head),
            "W_O": (L, H, d_head, d_model),
            "W_U": (d_model, d_vocab),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"`{name}` must have shape {shape} to match W_E and W_Q; got {got}.")

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1]

    @property
    def d_head(self) -> int:
        return self.W_Q.shape[3]

    @property
    def d_vocab(self) -> int:
        return self.W_E.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.W_E.dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the weights (``W_U`` counted only when it is not tied to ``W_E``)."""
        tensors = [self.W_E, self.W_Q, self.W_K, self.W_V, self.W_O] + ([] if self.tied else [self.W_U])
        return sum(t.numel() * t.element_size() for t in tensors)


# --- The number of heads --------------------------------------------------------------------------
def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def read_config_n_heads(weights_path: str | Path) -> tuple[int | None, Path | None]:
    """The number of heads in a config.json beside ``weights_path``, or ``(None, None)``.

    Looks for the keys in ``CONFIG_N_HEADS_KEYS`` (``n_head``, ``num_attention_heads``).
    """
    config = Path(weights_path).parent / "config.json"
    if not config.is_file():
        return None, None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config} could not be read as JSON ({err}); fix or remove it.") from None
    for key in CONFIG_N_HEADS_KEYS:
        if isinstance(data, dict) and key in data:
            value = data[key]
            if not _is_positive_int(value):
                raise CheckpointError(f"{config}: `{key}` must be a positive integer, got {value!r}.")
            return value, config
    return None, config


def resolve_n_heads(d_model: int, n_heads: int | None = None, weights_path: str | Path | None = None) -> tuple[int, str]:
    """The number of heads, and a line saying where it came from.

    Parameters
    ----------
    d_model : int
    n_heads : int, optional
        Given explicitly (``--n-heads``). It must agree with a config.json beside the weights.
    weights_path : path, optional
        A config.json beside it (``n_head`` or ``num_attention_heads``) is used first.

    Returns
    -------
    n_heads : int
        From config.json, else ``n_heads``, else ``d_model // DEFAULT_D_HEAD``.
    source : str

    Raises
    ------
    ValueError
        When the value does not divide ``d_model``, the flag disagrees with config.json, or no
        value is given and ``d_model`` is not a multiple of ``DEFAULT_D_HEAD``.
    """
    if not _is_positive_int(d_model):
        raise ValueError(f"`d_model` must be a positive integer, got {d_model!r}: a model of width 0 has no heads.")
    if n_heads is not None and not _is_positive_int(n_heads):
        raise ValueError(f"`n_heads` (--n-heads) must be a positive integer, got {n_heads!r}.")
    from_config, config = read_config_n_heads(weights_path) if weights_path is not None else (None, None)
    if from_config is not None:
        if n_heads is not None and n_heads != from_config:
            raise ValueError(
                f"`n_heads` (--n-heads) is {n_heads} but {config} says {from_config}; drop the flag "
                "to use the config, or fix the config."
            )
        value, source = from_config, f"{config}"
    elif n_heads is not None:
        value, source = n_heads, "--n-heads"
    else:
        if d_model % DEFAULT_D_HEAD:
            raise ValueError(
                f"cannot infer the number of heads: d_model {d_model} is not a multiple of the default "
                f"head width {DEFAULT_D_HEAD}, and no config.json with `n_head` or `num_attention_heads` "
                "lies beside the weights; pass `--n-heads`."
            )
        value, source = d_model // DEFAULT_D_HEAD, f"default (d_head {DEFAULT_D_HEAD}; pass --n-heads to change)"
    if d_model % value:
        raise ValueError(
            f"`n_heads` = {value} (from {source}) does not divide d_model {d_model}; the heads must "
            "split the model width evenly. Pass the model's true number of heads with `--n-heads`."
        )
    return value, source


# --- Reading a checkpoint -------------------------------------------------------------------------
def _import_safetensors():
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise ImportError(
            "reading checkpoints needs the `safetensors` package: pip install safetensors "
            '(or pip install "lowrank_op[weights]").'
        ) from None
    return safe_open, SafetensorError


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's entry in a safetensors header: dtype name (``"F32"``), shape, byte range."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry(name: str, entry: object, data_bytes: int) -> TensorEntry:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
        raise CheckpointError(
            f"the header's entry `{name}` is not a tensor description (an object with `dtype`, `shape` "
            "and `data_offsets`); the file is corrupt or not a safetensors file."
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise CheckpointError(
            f"tensor `{name}` has dtype {dtype!r}, which is not a safetensors dtype "
            f"({', '.join(SAFETENSORS_DTYPE_BITS)}); the file is corrupt or was written by a newer format."
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise CheckpointError(f"tensor `{name}` has shape {shape!r} in the header; expected a list of non-negative integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise CheckpointError(
            f"tensor `{name}` has data_offsets {offsets!r} in the header; expected [begin, end] with "
            "0 <= begin <= end."
        )
    begin, end = offsets
    if end > data_bytes:
        raise CheckpointError(
            f"tensor `{name}`'s data (bytes {begin} to {end} after the header) runs past the end of the "
            f"file, which holds {data_bytes} bytes of data; the file is truncated."
        )
    bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
    if end - begin != (bits + 7) // 8:
        raise CheckpointError(
            f"tensor `{name}` of shape {tuple(shape)} and dtype {dtype} takes {(bits + 7) // 8} bytes, "
            f"but its data_offsets span {end - begin}; the file is corrupt."
        )
    return TensorEntry(dtype, tuple(shape), begin, end)


def read_safetensors_header(path: str | Path) -> dict[str, TensorEntry]:
    """The tensors a safetensors file declares, checked against the file; no tensor is read.

    A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
    (``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``), then the data.

    Returns
    -------
    dict
        ``{name: TensorEntry}`` in the header's order, without ``__metadata__``.

    Raises
    ------
    CheckpointError
        Naming what is wrong: an empty or truncated file, a header length past the end of the file
        or above ``MAX_HEADER_BYTES``, a header that is not JSON or not an object, an entry that is
        not a tensor, an unknown dtype, a shape that is not a list of counts, or data offsets
        that run past the end of the file or disagree with the shape and dtype.
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError("the file is empty (0 bytes); expected a safetensors file.")
    with open(path, "rb") as f:
        if size < 8:
            raise CheckpointError(
                f"the file is {size} bytes long, too short for the 8-byte header length a safetensors "
                "file starts with; it is truncated or not a safetensors file."
            )
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8:
            raise CheckpointError(
                f"the header length in the first 8 bytes is {n} bytes, but only {size - 8} bytes follow; "
                "the file is truncated or not a safetensors file."
            )
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"the header length in the first 8 bytes is {n} bytes, above safetensors' limit of "
                f"{MAX_HEADER_BYTES}; the file is corrupt or not a safetensors file."
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as err:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(
            f"its {n}-byte header is not JSON ({err}); the file is corrupt or not a safetensors file."
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"its header is JSON but a {type(header).__name__}, not an object of tensor entries; the file "
            "is corrupt or not a safetensors file."
        )
    data_bytes = size - 8 - n
    return {name: _header_entry(name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"}


def detect_layout(names: list[str] | set[str]) -> tuple[str, str]:
    """``(layout, prefix)`` of a checkpoint from its tensor names.

    The prefix is whatever stands before the embedding's name (``""``, ``"transformer."``,
    ``"bert."``, ...). Raises :class:`CheckpointError` listing the names looked for when neither
    layout's embedding is found, or when several are.
    """
    found = []
    for layout, spec in LAYOUTS.items():
        for name in names:
            if name == spec["embed"] or name.endswith("." + spec["embed"]):
                found.append((layout, name[: len(name) - len(spec["embed"])]))
    if len(found) == 1:
        return found[0]
    looked_for = "; ".join(
        f"{LAYOUT_NAMES[layout]}: `{spec['embed']}` with "
        + ", ".join(f"`{n}`" for n in spec["layer"])
        for layout, spec in LAYOUTS.items()
    )
    if not found:
        sample = ", ".join(sorted(names)[:8]) or "(none)"
        raise CheckpointError(
            f"the checkpoint is in no layout lowrank_op reads. It looked for ({looked_for}), each "
            f"optionally prefixed (e.g. `transformer.`, `bert.`). The file has {len(names)} tensors, "
            f"e.g. {sample}."
        )
    raise CheckpointError(
        "the checkpoint holds more than one embedding matrix: "
        + ", ".join(f"`{prefix}{LAYOUTS[layout]['embed']}`" for layout, prefix in found)
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


def count_layers(names, prefix: str, spec: dict) -> int:
    """The number of layers, from the names under ``spec["layer_root"]``; they must be ``0..n-1``.

    Only the indices present are collected and sorted (nothing proportional to the largest index
    is allocated), so a stray ``h.10000000.`` is reported by name, with the gap it leaves.
    """
    root = re.escape(prefix + spec["layer_root"]).replace(r"\{i\}", r"(\d+)")
    first_name: dict[int, str] = {}
    for name in sorted(names):
        if m := re.match(root, name):
            digits = m.group(1)
            index = int(digits) if len(digits) <= _MAX_INDEX_DIGITS else 10**_MAX_INDEX_DIGITS
            first_name.setdefault(index, name)
    if not first_name:
        raise CheckpointError(
            f"the checkpoint has `{prefix}{spec['embed']}` but no layers: no tensor named like "
            f"`{prefix}{spec['layer'][0].format(i=0)}`."
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
        missing = _spans_text(gaps)
        raise CheckpointError(
            f"the layers must be numbered 0 to n-1 without gaps, but the checkpoint's {n} layers are numbered "
            f"{_ranges(present)} (e.g. `{first_name[stray]}`), so these are missing: {missing}. Remove or "
            "renumber the stray tensors."
        )
    return n


def _check_shape(name: str, got: tuple, want: tuple, meaning: str) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor `{name}` has shape {tuple(got)}; expected {tuple(want)} ({meaning}).")


def _split_columns(W: Tensor, n_heads: int) -> Tensor:
    """(d_model, n_heads d_head) in (in, out) orientation -> (n_heads, d_model, d_head)."""
    d_in = W.shape[0]
    return W.reshape(d_in, n_heads, -1).permute(1, 0, 2)


def _split_rows(W: Tensor, n_heads: int) -> Tensor:
    """(n_heads d_head, d_model) in (in, out) orientation -> (n_heads, d_head, d_model)."""
    return W.reshape(n_heads, -1, W.shape[-1])


def _require_finite(name: str, tensor: Tensor, source: Tensor | None = None) -> None:
    """CheckpointError naming ``name`` unless every value of ``tensor`` is finite.

    ``source`` is the tensor as stored, when ``tensor`` is its cast: then a value finite in the file
    but not after the cast is reported as an overflow of the computation dtype.
    """
    if bool(torch.isfinite(tensor).all()):
        return
    if source is not None:
        largest = float(source.abs().max())
        raise CheckpointError(
            f"tensor `{name}` ({str(source.dtype).removeprefix('torch.')}) holds values up to {largest:.3g} "
            f"in magnitude, which overflow {str(tensor.dtype).removeprefix('torch.')} (largest "
            f"{torch.finfo(tensor.dtype).max:.3g}); compute in float64 (--dtype float64)."
        )
    bad = ~torch.isfinite(tensor)
    first = tuple(int(i) for i in bad.nonzero()[0])
    nan = int(tensor.isnan().sum())
    raise CheckpointError(
        f"tensor `{name}` holds {int(bad.sum())} non-finite values ({nan} NaN, {int(bad.sum()) - nan} "
        f"infinite; the first at index {first}); the circuits of such weights are undefined. Fix or "
        "re-export the checkpoint."
    )


def checkpoint_file(path: str | Path) -> Path:
    """The safetensors file ``path`` names: itself, or ``path/model.safetensors`` for a directory.

    Raises FileNotFoundError when there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; pass a .safetensors file (or its directory) as --weights.")
    return path


def load_safetensors(
    path: str | Path, n_heads: int | None = None, dtype: torch.dtype = torch.float32
) -> AttentionWeights:
    """Read the attention and embedding weights of a GPT-2- or BERT-layout checkpoint.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file, or a directory holding ``model.safetensors``.
    n_heads : int, optional
        See :func:`resolve_n_heads`: a config.json beside the file comes first.
    dtype : torch.dtype
        The dtype the weights are returned in (16-bit checkpoints are widened).

    Returns
    -------
    AttentionWeights

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    CheckpointError
        Before any tensor is read, from the file's header (:func:`read_safetensors_header`): a
        malformed file; a layout not recognised (the message lists the names looked for); layers
        not numbered ``0..n-1``; a tensor missing, of the wrong shape (the message names it and
        the shape expected), empty (``d_model`` or ``d_vocab`` zero) or not of a floating dtype.
        While reading: a tensor holding NaN or infinity, or values that overflow ``dtype``.
    ImportError
        When safetensors is not installed.
    """
    path = checkpoint_file(path)
    safe_open, SafetensorError = _import_safetensors()
    header = read_safetensors_header(path)
    names = set(header)
    layout, prefix = detect_layout(names)
    spec = LAYOUTS[layout]
    n_layers = count_layers(names, prefix, spec)

    def shape(name: str) -> tuple:
        return header[name].shape

    embed = prefix + spec["embed"]
    if len(shape(embed)) != 2 or 0 in shape(embed):
        raise CheckpointError(
            f"tensor `{embed}` has shape {shape(embed)}; expected (d_vocab, d_model), both positive."
        )
    d_vocab, d_model = shape(embed)
    layer_names = [[prefix + template.format(i=i) for template in spec["layer"]] for i in range(n_layers)]
    missing = [name for names_i in layer_names for name in names_i if name not in names]
    if missing:
        listed = ", ".join(f"`{m}`" for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"the checkpoint ({LAYOUT_NAMES[layout]} layout, {n_layers} layers) lacks {listed}.")
    for names_i in layer_names:
        if layout == "gpt2":
            attn, proj = names_i
            _check_shape(attn, shape(attn), (d_model, 3 * d_model), "(d_model, 3 d_model): fused Q, K, V, Conv1D (in, out)")
            _check_shape(proj, shape(proj), (d_model, d_model), "(d_model, d_model), Conv1D (in, out)")
        else:
            for name in names_i:
                _check_shape(name, shape(name), (d_model, d_model), "(d_model, d_model), nn.Linear (out, in)")
    unembed = next((n for n in (spec["unembed"], prefix + spec["unembed"]) if n in names), None)
    if unembed is not None:
        _check_shape(unembed, shape(unembed), (d_vocab, d_model), "(d_vocab, d_model), nn.Linear (out, in)")
    for name in [embed, *(n for names_i in layer_names for n in names_i)] + ([unembed] if unembed else []):
        if header[name].dtype not in WEIGHT_DTYPES:
            raise CheckpointError(
                f"tensor `{name}` has dtype {header[name].dtype}; expected a real floating dtype "
                f"({', '.join(WEIGHT_DTYPES)})."
            )
    H, n_heads_source = resolve_n_heads(d_model, n_heads, path)

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:

            def get(name: str) -> Tensor:
                stored = f.get_tensor(name)
                _require_finite(name, stored)
                tensor = stored.to(dtype)
                _require_finite(name, tensor, source=stored)
                return tensor

            W_E = get(embed)
            per_layer = {"W_Q": [], "W_K": [], "W_V": [], "W_O": []}
            for names_i in layer_names:
                if layout == "gpt2":
                    qkv = get(names_i[0])  # (in, out): x @ qkv = [q | k | v]
                    q, k, v = qkv.split(d_model, dim=1)
                    o = get(names_i[1])
                else:
                    q, k, v, o = (get(n).T for n in names_i)  # nn.Linear (out, in) -> (in, out)
                per_layer["W_Q"].append(_split_columns(q, H))
                per_layer["W_K"].append(_split_columns(k, H))
                per_layer["W_V"].append(_split_columns(v, H))
                per_layer["W_O"].append(_split_rows(o, H))
            stacked = {key: torch.stack(parts).contiguous() for key, parts in per_layer.items()}
            W_U = get(unembed).T.contiguous() if unembed is not None else W_E.T
    except SafetensorError as err:  # a header this module accepts but safetensors does not (e.g. overlaps)
        raise CheckpointError(f"safetensors cannot read the file: {err}.") from None
    templates = [prefix + t for t in spec["layer"]]
    tensor_names = {"W_E": embed, "W_U": unembed or embed}
    if layout == "gpt2":
        tensor_names.update(W_Q=templates[0], W_K=templates[0], W_V=templates[0], W_O=templates[1])
    else:
        tensor_names.update(zip(("W_Q", "W_K", "W_V", "W_O"), templates))
    return AttentionWeights(
        W_E=W_E, W_U=W_U, **stacked, layout=layout, source=str(path), tied=unembed is None,
        n_heads_source=n_heads_source, tensor_names=tensor_names,
    )


# --- The built-in random model --------------------------------------------------------------------
def random_weights(
    n_layers: int = GPT2_SMALL_SHAPE["n_layers"],
    n_heads: int = GPT2_SMALL_SHAPE["n_heads"],
    d_model: int = GPT2_SMALL_SHAPE["d_model"],
    d_vocab: int = GPT2_SMALL_SHAPE["d_vocab"],
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> AttentionWeights:
    """A seeded random model with tied embeddings; GPT-2 small's shapes by default.

    Every weight is drawn i.i.d. from ``N(0, RANDOM_INIT_STD^2)`` (GPT-2's initialisation) by a
    ``torch.Generator`` seeded with ``seed``, in the order W_E, W_Q, W_K, W_V, W_O, so the model
    is the same on every machine for a given seed and shape. Memory: ``(d_vocab + 4 n_layers
    d_model) d_model`` numbers (268 MB in float32 at GPT-2 small's shapes).
    """
    for name, value in (("n_layers", n_layers), ("n_heads", n_heads), ("d_model", d_model), ("d_vocab", d_vocab)):
        if not _is_positive_int(value):
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if d_model % n_heads:
        raise ValueError(f"`n_heads` ({n_heads}) must divide `d_model` ({d_model}).")
    d_head = d_model // n_heads
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                .mul_(RANDOM_INIT_STD).to(dtype))

    W_E = draw(d_vocab, d_model)
    W_Q, W_K, W_V = (draw(n_layers, n_heads, d_model, d_head) for _ in range(3))
    W_O = draw(n_layers, n_heads, d_head, d_model)
    shape = f"n_layers={n_layers}, n_heads={n_heads}, d_model={d_model}, d_vocab={d_vocab}"
    return AttentionWeights(
        W_E=W_E, W_Q=W_Q, W_K=W_K, W_V=W_V, W_O=W_O, W_U=W_E.T, layout="random",
        source=f"built-in random model (seed {seed}; {shape})", tied=True, n_heads_source="model shape",
    )
