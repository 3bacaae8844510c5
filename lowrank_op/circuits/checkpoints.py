"""Reading a transformer checkpoint into :class:`~lowrank_op.circuits.weights.AttentionWeights`.

Formats: safetensors (one file, or shards with ``model.safetensors.index.json``;
:mod:`lowrank_op.circuits.safetensors_format`) and GGUF (llama.cpp's, ``llama`` architecture;
:mod:`lowrank_op.circuits.gguf_format`). Layouts (GPT-2, BERT, Llama and its relatives, GPT-NeoX)
are data in :mod:`lowrank_op.circuits.layouts`. Every name, shape and dtype is checked from the
file's header before any tensor is read.

Only the embedding and unembedding are read at load time; the attention weights stay in the file
and are read (memory-mapped, widened to the computation dtype, checked finite) a batch of layers at
a time, when the analysis asks for them (:class:`CheckpointLayers`). Biases and LayerNorm
parameters are not read (nothing is folded in, as TransformerLens with ``fold_ln=False``).
16-bit and 8-bit float weights are computed in float32 (or ``--dtype``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from lowrank_op.circuits import layouts
from lowrank_op.circuits.layouts import LAYOUT_NAMES, Layout  # noqa: F401  (LAYOUT_NAMES: for the report)
from lowrank_op.circuits.safetensors_format import (  # noqa: F401  (re-exported for the command and tests)
    MAX_HEADER_BYTES,
    WEIGHT_DTYPES,
    SafetensorsCheckpoint,
    checkpoint_file as _safetensors_file,
    read_safetensors_header,
)
from lowrank_op.circuits.weights import (  # noqa: F401  (re-exported)
    GPT2_SMALL_SHAPE,
    RANDOM_INIT_STD,
    RANDOM_PRESETS,
    AttentionWeights,
    LayerWeights,
    StackedLayers,
    random_weights,
)
from lowrank_op.errors import CheckpointError

#: Heads are assumed to have this width when neither ``n_heads`` nor a config.json says otherwise
#: (GPT-2 small/medium/large/XL and BERT-base/large all use 64).
DEFAULT_D_HEAD = 64
#: Keys of config.json that hold the number of heads (GPT-2's, then the others').
CONFIG_N_HEADS_KEYS = ("n_head", "num_attention_heads")
#: Keys of config.json that hold the number of key/value heads (GQA).
CONFIG_N_KV_HEADS_KEYS = ("num_key_value_heads",)
#: Key of config.json that holds the head width where it is not d_model / n_heads.
CONFIG_HEAD_DIM_KEY = "head_dim"


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


def read_config(weights_path: str | Path) -> tuple[dict, Path | None]:
    """config.json beside ``weights_path`` as a dict (``{}`` and None when there is none)."""
    config = Path(weights_path).parent / "config.json"
    if not config.is_file():
        return {}, None
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config} could not be read as JSON ({err}); fix or remove it.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{config} holds a JSON {type(data).__name__}, not an object of settings; fix or remove it.")
    return data, config


def _config_int(config: dict, path: Path | None, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        if key in config and config[key] is not None:
            value = config[key]
            if not _is_positive_int(value):
                raise CheckpointError(f"{path}: `{key}` must be a positive integer, got {value!r}.")
            return value
    return None


def _check_shape(name: str, got: tuple, want: tuple, meaning: str) -> None:
    if tuple(got) != tuple(want):
        raise CheckpointError(f"tensor `{name}` has shape {tuple(got)}; expected {tuple(want)} ({meaning}).")


# --- Layers read on demand -----------------------------------------------------------------------
class CheckpointLayers:
    """A :class:`~lowrank_op.circuits.weights.LayerSource` reading a checkpoint's attention weights
    a range of layers at a time.

    ``read(start, stop)`` reads each of those layers' tensors (memory-mapped, one at a time),
    checks them finite, widens them to ``dtype``, splits them into heads
    (:func:`lowrank_op.circuits.layouts.split_heads`) and stacks them: memory is that range's
    weights in ``dtype`` (plus one stored tensor at a time), not the checkpoint's.
    """

    def __init__(self, container, layout: Layout, names: list[list[str]], n_heads: int, n_kv_heads: int,
                 d_model: int, d_head: int, dtype: torch.dtype):
        self.container, self.layout, self.names = container, layout, names
        self.n_layers, self.n_heads, self.n_kv_heads = len(names), n_heads, n_kv_heads
        self.d_model, self.d_head, self.dtype = d_model, d_head, dtype

    def read(self, start: int, stop: int) -> LayerWeights:
        parts: list[tuple[Tensor, ...]] = []
        for i in range(start, min(stop, self.n_layers)):
            tensors = [self.container.get(name, self.dtype) for name in self.names[i]]
            parts.append(layouts.split_heads(self.layout, tensors, self.n_heads, self.n_kv_heads))
        if not parts:
            empty = StackedLayers(*(torch.empty(0, *shape, dtype=self.dtype) for shape in self._shapes())).read(0, 0)
            return empty
        return LayerWeights(*(torch.stack([p[j] for p in parts]).contiguous() for j in range(4)))

    def _shapes(self):
        H, H_kv, d, k = self.n_heads, self.n_kv_heads, self.d_model, self.d_head
        return [(H, d, k), (H_kv, d, k), (H_kv, d, k), (H, k, d)]


# --- Reading a checkpoint -------------------------------------------------------------------------
def checkpoint_file(path: str | Path) -> Path:
    """The checkpoint file ``path`` names: a ``.gguf`` file, or a safetensors checkpoint as
    :func:`lowrank_op.circuits.safetensors_format.checkpoint_file` resolves it.

    Raises FileNotFoundError when there is no such file.
    """
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    return _safetensors_file(path)


def _is_gguf(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load(path: str | Path, n_heads: int | None = None, dtype: torch.dtype = torch.float32) -> AttentionWeights:
    """Open a checkpoint: its embeddings read, its attention weights ready to be read by layer.

    Parameters
    ----------
    path : path
        A ``.safetensors`` file, a sharded checkpoint's ``model.safetensors.index.json``, a
        ``.gguf`` file, or a directory holding ``model.safetensors`` or the index.
    n_heads : int, optional
        See :func:`resolve_n_heads`: a config.json beside the file (or the GGUF metadata) comes first.
    dtype : torch.dtype
        The dtype the weights are computed in (16-bit and 8-bit checkpoints are widened).

    Returns
    -------
    AttentionWeights
        ``W_E`` and ``W_U`` in memory; ``layers`` a :class:`CheckpointLayers`; ``vocab`` from a
        ``tokenizer.json`` or ``vocab.txt`` beside the file (GGUF: its own token list) when there is one.

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    CheckpointError
        Before any tensor is read, from the file's header: a malformed file; a layout not
        recognised (the message lists the names looked for); layers not numbered ``0..n-1``; a
        tensor missing, of the wrong shape (the message names it and the shape expected), empty
        (``d_model`` or ``d_vocab`` zero) or not of a floating dtype; head counts that do not
        split the tensors. While reading: a tensor holding NaN or infinity, or values that
        overflow ``dtype``.
    ImportError
        When safetensors (or, for GGUF, the gguf package) is not installed.
    """
    path = checkpoint_file(path)
    if _is_gguf(path):
        from lowrank_op.circuits import gguf_format

        container = _GGUFTensors(gguf_format.open_gguf(path))
        hp = container.gguf.hparams()
        if n_heads is not None and n_heads != hp["n_heads"]:
            raise ValueError(f"`n_heads` (--n-heads) is {n_heads} but the GGUF metadata says {hp['n_heads']}; "
                             "drop the flag.")
        heads = (hp["n_heads"], hp["n_kv_heads"], hp["d_head"], f"{path.name}'s metadata")
        tokens = container.gguf.tokens
        if tokens is not None:  # llama.cpp names byte-level BPE vocabularies (GPT-2's, Llama 3's, SmolLM2's) "gpt2"
            tokens = _displayed(tokens, byte_level=container.gguf.metadata.get("tokenizer.ggml.model") == "gpt2")
        return _assemble(container, layouts.GGUF_LLAMA, "", path, heads, dtype, vocab=tokens, displayed=True)
    container = SafetensorsCheckpoint(path)
    layout, prefix = layouts.detect_layout(container.names)
    return _assemble(container, layout, prefix, container.path, None, dtype, vocab=None, n_heads=n_heads)


class _GGUFTensors:
    """A :class:`~lowrank_op.circuits.gguf_format.GGUFCheckpoint` seen as the loader sees a
    safetensors checkpoint: names, shapes, a dtype name per tensor, ``get`` dequantized and
    checked finite (by the GGUF reader itself)."""

    def __init__(self, gguf):
        self.gguf = gguf
        self.names = set(gguf.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.gguf.tensors[name].shape

    def dtype_name(self, name: str) -> str:
        return self.gguf.tensors[name].type_name

    def dequantizes(self, name: str) -> bool:
        return True  # open_gguf refuses circuit tensors of a type it cannot dequantize

    def get(self, name: str, dtype: torch.dtype) -> Tensor:
        return self.gguf.get(name, dtype)


#: The name the command and the tests have used for :func:`load`.
load_safetensors = load


def _assemble(container, layout: Layout, prefix: str, path: Path, heads, dtype: torch.dtype,
              vocab: list[str] | None, n_heads: int | None = None, displayed: bool = False) -> AttentionWeights:
    names = container.names
    n_layers = layouts.count_layers(names, prefix, layout)
    embed = prefix + layout.embed
    shape = container.shape(embed)
    if len(shape) != 2 or 0 in shape:
        raise CheckpointError(f"tensor `{embed}` has shape {shape}; expected (d_vocab, d_model), both positive.")
    d_vocab, d_model = shape
    layer_names = [[prefix + t.format(i=i) for t in layout.attention] for i in range(n_layers)]
    missing = [n for names_i in layer_names for n in names_i if n not in names]
    if missing:
        listed = ", ".join(f"`{m}`" for m in missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"the checkpoint ({layout.name} layout, {n_layers} layers) lacks {listed}.")
    if heads is None:
        heads = _heads_from_config(layout, d_model, path, n_heads)
    H, H_kv, d_head, n_heads_source = heads
    if H % H_kv:
        raise CheckpointError(f"{n_heads_source}: {H} query heads do not split evenly over {H_kv} key/value heads.")
    for names_i in layer_names:
        for name, (want, meaning) in zip(names_i, layouts.expected_shapes(layout, d_model, H, H_kv, d_head)):
            _check_shape(name, container.shape(name), want, meaning)
    unembed = next((n for n in (prefix + layout.unembed, layout.unembed) if n in names), None)
    if unembed is not None:
        _check_shape(unembed, container.shape(unembed), (d_vocab, d_model), "(d_vocab, d_model), nn.Linear (out, in)")
    for name in [embed, *(n for names_i in layer_names for n in names_i)] + ([unembed] if unembed else []):
        kind = container.dtype_name(name)
        if kind not in WEIGHT_DTYPES and not getattr(container, "dequantizes", lambda n: False)(name):
            raise CheckpointError(f"tensor `{name}` has dtype {kind}; expected a real floating dtype "
                                  f"({', '.join(WEIGHT_DTYPES)}).")
    W_E = container.get(embed, dtype)
    W_U = container.get(unembed, dtype).T.contiguous() if unembed is not None else W_E.T
    source = CheckpointLayers(container, layout, layer_names, H, H_kv, d_model, d_head, dtype)
    templates = [prefix + t for t in layout.attention]
    tensor_names = {"W_E": embed, "W_U": unembed or embed}
    if len(templates) == 2:  # fused Q, K, V
        tensor_names.update(W_Q=templates[0], W_K=templates[0], W_V=templates[0], W_O=templates[1])
    else:
        tensor_names.update(zip(("W_Q", "W_K", "W_V", "W_O"), templates))
    if vocab is None:
        vocab = _vocab_beside(path)
    if vocab is not None:
        vocab = _fit_vocab(vocab if displayed else _displayed(vocab), d_vocab)
    return AttentionWeights(
        W_E=W_E, W_U=W_U, layers=source, layout=layout.key, source=str(path), tied=unembed is None,
        n_heads_source=n_heads_source, tensor_names=tensor_names, vocab=vocab, rotary=layout.rotary,
        finite_checked=True,  # every tensor is checked finite as the container reads it
    )


def _heads_from_config(layout: Layout, d_model: int, path: Path, n_heads: int | None) -> tuple[int, int, int, str]:
    """``(n_heads, n_kv_heads, d_head, source)`` of a safetensors checkpoint: the heads as
    :func:`resolve_n_heads` finds them (config.json, else ``--n-heads``, else ``d_model / 64``);
    for layouts with GQA, ``num_key_value_heads`` and ``head_dim`` from config.json where present."""
    config, config_path = read_config(path)
    head_dim = _config_int(config, config_path, (CONFIG_HEAD_DIM_KEY,)) if layout.gqa else None
    if head_dim is not None and head_dim * (_config_int(config, config_path, CONFIG_N_HEADS_KEYS) or 0) != d_model:
        # heads narrower or wider than d_model / n_heads (Gemma): the count must come from the config
        H = _config_int(config, config_path, CONFIG_N_HEADS_KEYS)
        if H is None:
            raise CheckpointError(f"{config_path} gives `head_dim` but no `num_attention_heads`; add it.")
        if n_heads is not None and n_heads != H:
            raise ValueError(f"`n_heads` (--n-heads) is {n_heads} but {config_path} says {H}; drop the flag "
                             "to use the config, or fix the config.")
        H, source, d_head = H, str(config_path), head_dim
    else:
        H, source = resolve_n_heads(d_model, n_heads, path)
        d_head = d_model // H
    n_kv = _config_int(config, config_path, CONFIG_N_KV_HEADS_KEYS) if layout.gqa else None
    return H, n_kv or H, d_head, source


def _vocab_beside(path: Path) -> list[str] | None:
    from lowrank_op.circuits import vocab

    return vocab.read_vocab(path)


def _displayed(tokens: list[str], byte_level: bool | None = None) -> list[str]:
    """The tokens' one-line printable forms (:func:`lowrank_op.circuits.vocab.display_token`),
    byte-level BPE decoded when the vocabulary is byte-level (``byte_level``; None: judged from the
    tokens, :func:`lowrank_op.circuits.vocab.is_byte_level_vocab`)."""
    from lowrank_op.circuits import vocab

    if byte_level is None:
        byte_level = vocab.is_byte_level_vocab(tokens)
    return [vocab.display_token(t, byte_level=byte_level) for t in tokens]


def _fit_vocab(tokens: list[str], d_vocab: int) -> list[str]:
    """A vocabulary of ``d_vocab`` strings: padded with ``<id N>`` for the embedding's rows a
    tokenizer does not name (models pad their vocabulary to a round size), cut to ``d_vocab``."""
    return [*tokens[:d_vocab], *(f"<id {i}>" for i in range(len(tokens), d_vocab))]
