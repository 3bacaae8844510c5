"""Attention and embedding weights of a llama.cpp GGUF file (architecture ``llama``).

GGUF is the single-file format of llama.cpp: a header of typed key/value metadata and tensor
descriptions, then the tensor data, each tensor stored as floats (F32, F16, BF16, F64) or in
one of ggml's block-quantized types (Q8_0, Q4_1, Q4_K, ...). This module reads files of
architecture ``llama`` (Llama 1-3, Mistral 7B, TinyLlama and the other models llama.cpp's
converter writes as ``llama``), GGUF versions 2 and 3, through the ``gguf`` package, which is an
optional dependency (``pip install gguf``) imported only when a file is opened.

Tensors are returned in the orientation of the Hugging Face PyTorch checkpoint they were converted
from (nn.Linear's (out, in)):

=================================  =============================================================
tensor                             shape returned by :meth:`GGUFCheckpoint.get`
=================================  =============================================================
``token_embd.weight``              (d_vocab, d_model)
``blk.{i}.attn_q.weight``          (n_heads d_head, d_model)
``blk.{i}.attn_k.weight``,         (n_kv_heads d_head, d_model)
``blk.{i}.attn_v.weight``
``blk.{i}.attn_output.weight``     (d_model, n_heads d_head)
``output.weight``                  (d_vocab, d_model); absent when the unembedding is tied
=================================  =============================================================

Any other tensor (``blk.{i}.ffn_up.weight``, ``blk.{i}.attn_norm.weight``, ...) is listed in
:attr:`GGUFCheckpoint.tensors` and can be read with :meth:`~GGUFCheckpoint.get`, but nothing
checks its shape.

Orientation
-----------
GGUF records a tensor's dims in ggml's order ``ne``, fastest-varying first: a (rows, cols) matrix
is stored as ``ne = [cols, rows]``. ``gguf.GGUFReader`` reports ``tensor.shape`` in that order
and gives ``tensor.data`` as a memory-mapped numpy array in row-major order, of shape
``reversed(ne)`` for F32, F16 and F64, and of shape ``(rows, bytes per row)`` in ``uint8`` for
BF16 and the quantized types, which ``gguf.quants.dequantize`` turns into float32 of shape
``reversed(ne)``. llama.cpp's converter writes each Hugging Face tensor's numpy array as it is, so
``reversed(ne)`` is the Hugging Face shape, and that is what :class:`GGUFTensorInfo` reports.

Q and K rows are permuted
-------------------------
For ``llama`` models llama.cpp's converter permutes the rows of ``q_proj.weight`` and
``k_proj.weight`` within each head, from Hugging Face's rotary layout (first half of a head's
dims paired with the second half) to the interleaved pairs llama.cpp's rope uses::

    W.reshape(n, 2, d_head // 2, d_model).swapaxes(1, 2).reshape(n * d_head, d_model)

with ``n = n_heads`` for Q and ``n = n_kv_heads`` for K. This reader returns Q and K as stored,
permuted. That leaves the position-free QK circuit ``W_E W_Q W_K^T W_E^T`` unchanged: in
TransformerLens's convention ``W_Q[h] = q_h^T`` of shape (d_model, d_head), where ``q_h`` holds
head ``h``'s ``d_head`` rows of ``q_proj.weight``, and the converter replaces ``q_h`` by ``P q_h``
and ``k_g`` by ``P k_g`` with one permutation matrix ``P`` of size ``d_head`` (it depends only on
``d_head``), so ``W_Q[h] W_K[g]^T = q_h^T P^T P k_g = q_h^T k_g``. Under grouped-query attention
(``n_kv_heads < n_heads``) query head ``h`` reads kv head ``g = h // (n_heads // n_kv_heads)``;
the K permutation runs over ``n_kv_heads`` heads, but it is the same ``P`` within each, so every
paired product is unchanged too. V and the output projection are not permuted, so neither is the
OV circuit. What the permutation does change is which pairs of a head's dims rotary embedding
rotates together: rotating these Q and K with Hugging Face's ``rotate_half`` would be wrong.

Reading costs
-------------
:func:`open_gguf` parses the header (all metadata, including the token list, decoded in Python:
``O(header bytes)``) and memory-maps the file; no tensor data is read. :meth:`GGUFCheckpoint.get`
reads one tensor's bytes and dequantizes them: ``O(numel)`` time, one float copy of the tensor
plus the ``gguf`` package's temporaries.

Errors
------
A malformed file raises :class:`~lowrank_op.errors.CheckpointError` with one sentence saying what
is wrong and what to do; like :mod:`lowrank_op.checkpoints`, messages do not repeat the file's
path, which the caller puts in front. Errors of the ``gguf`` package on a malformed file are
caught and re-raised as CheckpointError. A file whose header claims more bytes than the file has
is reported as truncated before ``gguf``'s reader walks past its end (that reader alone would loop
over a corrupt array length of up to 2**64 elements).
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lowrank_op.errors import CheckpointError

#: The architectures (``general.architecture``) this module reads.
ARCHITECTURES = ("llama",)
#: The four bytes every GGUF file starts with.
GGUF_MAGIC = b"GGUF"
#: The GGUF versions read when the ``gguf`` package does not say (it reads 2 and 3 as of 0.19).
DEFAULT_GGUF_VERSIONS = (2, 3)
#: Dtypes :meth:`GGUFCheckpoint.get` returns.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Metadata keys a ``llama`` file must have, by the name :meth:`GGUFCheckpoint.hparams` gives them.
LLAMA_REQUIRED_KEYS = {
    "n_layers": "llama.block_count",
    "n_heads": "llama.attention.head_count",
    "d_model": "llama.embedding_length",
}
#: The tensors read for the circuits of layer ``i``, in the order (Q, K, V, O).
LLAMA_LAYER_TENSORS = (
    "blk.{i}.attn_q.weight",
    "blk.{i}.attn_k.weight",
    "blk.{i}.attn_v.weight",
    "blk.{i}.attn_output.weight",
)
LLAMA_EMBED = "token_embd.weight"
LLAMA_UNEMBED = "output.weight"
TOKENS_KEY = "tokenizer.ggml.tokens"

_IMPORT_MESSAGE = 'reading GGUF files needs the `gguf` package: pip install gguf (or pip install "lowrank_op[gguf]").'
_READER_FIELDS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")  # the reader's own, not the file's
_FLOAT_TYPES = ("F32", "F16", "F64")  # the reader gives these as float arrays, the rest as bytes
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")
_LAYER = re.compile(r"blk\.(\d+)\.")
# What gguf's reader and dequantization raise on malformed input (ValueError for a bad view,
# reshape or enum value, KeyError for a duplicate key or an unknown type's block size).
_PARSE_ERRORS = (ValueError, KeyError, IndexError, TypeError, OverflowError)


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise ImportError(_IMPORT_MESSAGE) from None
    return gguf


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return version("gguf")
    except Exception:  # metadata missing (a source checkout): the number is only for messages
        return "unknown version"


class _Truncated(Exception):
    """A read past the end of the file: ``part`` ("header" or "tensor data") needs byte ``end``."""

    def __init__(self, part: str, end: int, size: int):
        super().__init__(part, end, size)
        self.part, self.end, self.size = part, end, size


@functools.cache
def _bounded_reader():
    """``gguf.GGUFReader`` with every read checked against the file's length.

    The reader slices its memory map without checking: past the end a slice is silently short,
    and a scalar array of corrupt length loops over empty reads up to 2**64 times. Here each read
    (``_get``) and each array's declared length (at its smallest element size) is checked first
    and raises :class:`_Truncated`. The overrides pass unknown arguments through; if a later
    ``gguf`` renames these internals the checks lapse and its own errors (caught by
    :func:`open_gguf`) remain.
    """
    gguf = _import_gguf()
    array_type = int(gguf.GGUFValueType.ARRAY)
    string_type = int(gguf.GGUFValueType.STRING)
    item_bytes = {int(t): np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}
    item_bytes[string_type] = 8  # a length, then the bytes
    item_bytes[array_type] = 12  # a type, a length, then the items

    class BoundedReader(gguf.GGUFReader):
        _part = "header"

        def _need(self, end: int) -> None:
            size = int(self.data.shape[0])
            if end > size:
                raise _Truncated(self._part, end, size)

        def _get(self, offset, dtype, count=1, *args, **kwargs):
            self._need(int(offset) + np.dtype(dtype).itemsize * int(count))
            return super()._get(offset, dtype, count, *args, **kwargs)

        def _get_field_parts(self, orig_offs, raw_type, *args, **kwargs):
            if int(raw_type) == array_type:
                item_type = int(self._get(orig_offs, np.uint32)[0])
                count = int(self._get(int(orig_offs) + 4, np.uint64)[0])
                self._need(int(orig_offs) + 12 + count * item_bytes.get(item_type, 1))
            return super()._get_field_parts(orig_offs, raw_type, *args, **kwargs)

        def _build_tensors(self, *args, **kwargs):
            self._part = "tensor data"
            return super()._build_tensors(*args, **kwargs)

    return BoundedReader


@functools.cache
def _type_problem(type_name: str) -> str | None:
    """Why tensors of ggml type ``type_name`` cannot be read as floats here, or None if they can.

    Quantized types are probed once each by dequantizing one block of zeros with ``gguf.quants``.
    """
    if type_name in _FLOAT_TYPES:
        return None
    if type_name in _INTEGER_TYPES:
        return f"{type_name} holds integers, not weights"
    gguf = _import_gguf()
    qtype = gguf.GGMLQuantizationType[type_name]
    try:
        _, type_size = gguf.GGML_QUANT_SIZES[qtype]
        gguf.quants.dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
    except Exception:  # NotImplementedError as of gguf 0.19; any failure means it cannot be read
        return (
            f"the installed gguf package ({_gguf_version()}) cannot dequantize {type_name}; quantize the "
            "model to a type it reads (F16, Q8_0, Q4_K, ...) or upgrade gguf (pip install -U gguf)"
        )
    return None


def _read_problem(type_name: str, byte_swapped: bool) -> str | None:
    """Why a tensor of ``type_name`` cannot be read from this file, with what to do; or None."""
    problem = _type_problem(type_name)
    if problem is None and byte_swapped and type_name not in _FLOAT_TYPES:
        return (
            f"{type_name} blocks in a file of the other byte order cannot be dequantized; convert the "
            "file with gguf's gguf_convert_endian.py first"
        )
    return problem


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor of a GGUF file, as its header describes it (no data is read).

    Attributes
    ----------
    name : str
        The tensor's name in the file, e.g. ``"blk.0.attn_q.weight"``.
    shape : tuple of int
        The shape :meth:`GGUFCheckpoint.get` returns: the Hugging Face / PyTorch orientation, which
        is the file's ggml dims ``ne`` reversed.
    type_name : str
        The ggml type it is stored in: ``"F32"``, ``"F16"``, ``"BF16"``, ``"Q8_0"``, ``"Q4_1"``, ...
    n_bytes : int
        Bytes of tensor data in the file.
    """

    name: str
    shape: tuple[int, ...]
    type_name: str
    n_bytes: int

    @property
    def n_elements(self) -> int:
        """The number of values, ``prod(shape)``."""
        return math.prod(self.shape)


class GGUFCheckpoint:
    """A GGUF file of architecture ``llama`` opened by :func:`open_gguf`, its header checked.

    Attributes
    ----------
    path : Path
        The file.
    version : int
        Its GGUF version (2 or 3).
    metadata : dict
        Every key/value field of the file, in its order: numbers and booleans as Python
        ``int``/``float``/``bool``, strings as ``str`` (UTF-8), arrays as lists (an array of arrays
        comes back flattened, as ``gguf``'s reader gives it).
    tensors : dict
        ``{name: GGUFTensorInfo}`` for every tensor of the file, in its order.

    Notes
    -----
    The file stays memory-mapped while the object lives; :meth:`get` reads one tensor's bytes.
    """

    def __init__(self, path: Path, version: int, metadata: dict[str, Any], reader: Any, byte_swapped: bool):
        self.path = path
        self.version = version
        self.metadata = metadata
        self._reader_tensors = {t.name: t for t in reader.tensors}
        self.tensors = {
            t.name: GGUFTensorInfo(
                name=t.name,
                shape=tuple(int(d) for d in reversed(t.shape.tolist())),
                type_name=t.tensor_type.name,
                n_bytes=int(t.n_bytes),
            )
            for t in reader.tensors
        }
        self._byte_swapped = byte_swapped
        self._hparams = _llama_hparams(self)

    def __repr__(self) -> str:
        h = self._hparams
        return (
            f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r}, n_layers={h['n_layers']}, "
            f"n_heads={h['n_heads']}, n_kv_heads={h['n_kv_heads']}, d_model={h['d_model']}, d_vocab={h['d_vocab']})"
        )

    @property
    def architecture(self) -> str:
        """``metadata["general.architecture"]``: ``"llama"``, since nothing else is opened."""
        return self.metadata["general.architecture"]

    @property
    def tokens(self) -> list[str] | None:
        """The token strings by id (``tokenizer.ggml.tokens``, a new list), or None if absent.

        They are as the tokenizer stores them: byte-level BPE's ``"Ġthe"``, SentencePiece's
        ``"▁the"``; see :func:`lowrank_op.circuits.vocab.display_token` for a printable form.
        """
        tokens = self.metadata.get(TOKENS_KEY)
        return None if tokens is None else list(tokens)

    def hparams(self) -> dict[str, Any]:
        """The model's shape, from the metadata (checked against the tensors when opened).

        Returns
        -------
        dict
            ``n_layers`` (``llama.block_count``), ``n_heads`` (``llama.attention.head_count``),
            ``n_kv_heads`` (``llama.attention.head_count_kv``, else ``n_heads``), ``d_model``
            (``llama.embedding_length``), ``d_head`` (``llama.attention.key_length``, else
            ``d_model // n_heads``), ``d_vocab`` (the length of ``tokenizer.ggml.tokens``, else
            the rows of ``token_embd.weight``; the two agree when both are there), ``tied``
            (True when there is no ``output.weight``) and ``rope``: every ``llama.rope.*`` key
            without its prefix (``{"dimension_count": 128, "freq_base": 10000.0}``; empty if
            none). A new dict each call; cost O(1).
        """
        return {**self._hparams, "rope": dict(self._hparams["rope"])}

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> Tensor:
        """One tensor, dequantized, in Hugging Face orientation.

        Parameters
        ----------
        name : str
            A key of :attr:`tensors`, e.g. ``"blk.0.attn_q.weight"``.
        dtype : torch.dtype
            The dtype returned: float16, bfloat16, float32 or float64. Values are dequantized in
            float32 (F16, F32, F64 are taken as stored), then cast.

        Returns
        -------
        Tensor, shape ``tensors[name].shape``
            A new tensor (not a view of the memory map), e.g. (n_heads d_head, d_model) for
            ``attn_q``; Q and K rows are permuted within each head as llama.cpp stores them (see
            the module's notes).

        Raises
        ------
        TypeError
            When ``dtype`` is not one of the four floating dtypes.
        CheckpointError
            When the file has no tensor ``name``; when its type cannot be dequantized (integer
            types, types the installed ``gguf`` does not dequantize, quantized data in a file of
            the other byte order than this machine's); when its data do not give its shape; when
            it holds NaN or infinity (checked here, so callers need not); when its values
            overflow ``dtype``.

        Notes
        -----
        Only this tensor's bytes are read from the memory map. Cost ``O(numel)`` time; memory one
        float32 copy (the stored dtype for F16/F64) and one in ``dtype`` if that differs, plus
        ``gguf.quants``' temporaries for quantized types.
        """
        if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
            raise TypeError(
                "`dtype` must be torch.float16, torch.bfloat16, torch.float32 or torch.float64; "
                f"got {dtype!r}."
            )
        if name not in self._reader_tensors:
            sample = ", ".join(f"`{n}`" for n in list(self.tensors)[:6])
            raise CheckpointError(
                f"the file has no tensor `{name}`; its {len(self.tensors)} tensors include {sample}."
            )
        stored = torch.from_numpy(self._stored_values(name))
        _require_finite(name, stored)
        tensor = stored.to(dtype)
        if torch.finfo(dtype).max < torch.finfo(stored.dtype).max:  # a narrowing cast may overflow
            _require_finite(name, tensor, source=stored)
        return tensor

    def _stored_values(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a new native-order numpy array of its HF shape (float16/32/64)."""
        info = self.tensors[name]
        raw = self._reader_tensors[name]
        problem = _read_problem(info.type_name, self._byte_swapped)
        if problem is not None:
            raise CheckpointError(f"tensor `{name}` cannot be read: {problem}.")
        try:
            if info.type_name in _FLOAT_TYPES:
                values = np.array(raw.data, dtype=raw.data.dtype.newbyteorder("="))  # copies the mapped bytes
            else:
                values = _import_gguf().quants.dequantize(raw.data, raw.tensor_type)
        except _PARSE_ERRORS as err:
            raise CheckpointError(
                f"tensor `{name}` ({info.type_name}) cannot be dequantized ({err}); the file is corrupt. "
                "Convert the model again."
            ) from None
        if tuple(values.shape) != info.shape:
            raise CheckpointError(
                f"tensor `{name}` ({info.type_name}) dequantizes to shape {tuple(values.shape)}, not its "
                f"declared {info.shape}; the file is corrupt. Convert the model again."
            )
        return values


def _require_finite(name: str, tensor: Tensor, source: Tensor | None = None) -> None:
    """CheckpointError naming ``name`` unless every value of ``tensor`` is finite.

    ``source`` is the tensor before a cast to ``tensor.dtype``: then a value finite in the file but
    not after the cast is reported as an overflow. Cost ``O(numel)``.
    """
    if bool(torch.isfinite(tensor).all()):
        return
    if source is not None:
        raise CheckpointError(
            f"tensor `{name}` holds values up to {float(source.abs().max()):.3g} in magnitude, which "
            f"overflow {str(tensor.dtype).removeprefix('torch.')} (largest "
            f"{torch.finfo(tensor.dtype).max:.3g}); read it in float32 or float64."
        )
    bad = ~torch.isfinite(tensor)
    first = tuple(int(i) for i in bad.nonzero()[0])
    nan = int(tensor.isnan().sum())
    raise CheckpointError(
        f"tensor `{name}` holds {int(bad.sum())} non-finite values ({nan} NaN, {int(bad.sum()) - nan} "
        f"infinite; the first at index {first}); the circuits of such weights are undefined. Convert "
        "the model again."
    )


# --- Opening: the preamble, the header, the metadata ----------------------------------------------
def _read_version(path: Path, supported: tuple[int, ...]) -> int:
    """The GGUF version from the first 8 bytes; CheckpointError for an empty or non-GGUF file."""
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError("the file is empty (0 bytes); expected a GGUF file. Download or convert it again.")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:4] != GGUF_MAGIC and not (len(head) < 4 and GGUF_MAGIC.startswith(head)):
        hint = " It looks like a safetensors file: read it as one." if head[8:9] == b"{" else ""
        raise CheckpointError(
            f"the file starts with {head[:4]!r}, not the magic bytes b'GGUF' of a GGUF file; it is not a "
            f"GGUF file.{hint}"
        )
    if len(head) < 8:
        raise CheckpointError(
            f"the file is {size} bytes long, too short for the 24-byte GGUF header; it is truncated. "
            "Download or convert it again."
        )
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:  # as gguf's reader decides: the version of a big-endian file
        version = int.from_bytes(head[4:8], "big")
    if version not in supported:
        advice = (
            "re-convert the model with a current llama.cpp"
            if version < min(supported)
            else "upgrade the gguf package (pip install -U gguf)"
        )
        raise CheckpointError(
            f"the file is GGUF version {version}, but the installed gguf package reads versions "
            f"{', '.join(map(str, supported))}; {advice}."
        )
    return version


def _field_value(field: Any) -> Any:
    """A reader field as Python values; UnicodeDecodeError for a string that is not UTF-8."""
    from gguf import GGUFValueType

    def text(part) -> str:
        return bytes(part).decode("utf-8")

    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        if len(types) > 2:  # an array of arrays: gguf's reader flattens it; so do we
            return field.contents()
        if types[-1] == GGUFValueType.STRING:
            return [text(field.parts[i]) for i in field.data]
        return [v for i in field.data for v in field.parts[i].tolist()]
    if types[0] == GGUFValueType.STRING:
        return text(field.parts[-1])
    return field.parts[-1].tolist()[0]


def _metadata(reader: Any) -> dict[str, Any]:
    metadata = {}
    for key, field in reader.fields.items():
        if key in _READER_FIELDS:
            continue
        try:
            metadata[key] = _field_value(field)
        except UnicodeDecodeError as err:
            raise CheckpointError(
                f"metadata key `{key}` holds a string that is not UTF-8 ({err.reason} at byte {err.start}); "
                "the file is corrupt. Convert the model again."
            ) from None
        except (ValueError, IndexError, TypeError) as err:
            raise CheckpointError(
                f"metadata key `{key}` cannot be decoded ({err}); the file is corrupt. Convert the model again."
            ) from None
    return metadata


def open_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file of architecture ``llama`` and check its header; no tensor is read.

    Parameters
    ----------
    path : path
        The ``.gguf`` file (one file: split ``-00001-of-0000N.gguf`` shards are not joined).

    Returns
    -------
    GGUFCheckpoint
        Its metadata, tensor list and hparams; tensors are read by :meth:`GGUFCheckpoint.get`.

    Raises
    ------
    FileNotFoundError
        When ``path`` is not a file.
    ImportError
        When the ``gguf`` package is not installed.
    CheckpointError
        An empty file; not a GGUF file (bad magic); a GGUF version the ``gguf`` package does not
        read; a file shorter than its header or tensor data say (truncated); a header ``gguf``
        cannot parse; a string that is not UTF-8; an architecture other than ``llama``; missing
        metadata keys or values that are not positive integers (the message names them);
        ``n_heads`` not a multiple of ``n_kv_heads``; missing attention or embedding tensors
        (named); tensors whose shapes disagree with the metadata (named, with the shape expected);
        layers numbered at or beyond ``llama.block_count``; a token list whose length is not the
        embedding's rows; attention or embedding tensors of a type that cannot be dequantized.

    Notes
    -----
    Cost ``O(header bytes)`` in Python, element by element (the header holds the token list and
    merges: hundreds of thousands of strings for a 128k-token vocabulary, which take seconds); the
    data are memory-mapped, not read.

    Examples
    --------
    >>> ckpt = open_gguf("tinyllama-1.1b-chat.Q8_0.gguf")  # doctest: +SKIP
    >>> ckpt.hparams()["n_kv_heads"], ckpt.get("blk.0.attn_k.weight").shape  # doctest: +SKIP
    (4, torch.Size([256, 2048]))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no GGUF file at {path}; pass the path of a .gguf file.")
    gguf = _import_gguf()
    supported = tuple(getattr(gguf.gguf_reader, "READER_SUPPORTED_VERSIONS", DEFAULT_GGUF_VERSIONS))
    version = _read_version(path, supported)
    try:
        reader = _bounded_reader()(path, "r")
    except _Truncated as err:
        raise CheckpointError(
            f"the file is truncated: it is {err.size} bytes long, but its {err.part} runs to byte "
            f"{err.end} at least (or a length in its header is corrupt); download or convert it again."
        ) from None
    except _PARSE_ERRORS as err:
        if "GGMLQuantizationType" in str(err):  # a type id this gguf does not know: maybe a newer one
            raise CheckpointError(
                f"a tensor of the file has a type the installed gguf package ({_gguf_version()}) does not "
                f"know ({err}); upgrade gguf (pip install -U gguf), or quantize the model to another type."
            ) from None
        raise CheckpointError(
            f"the gguf package cannot parse the file's header ({type(err).__name__}: {err}); the file is "
            "corrupt or was not written by llama.cpp. Convert the model again."
        ) from None
    byte_swapped = getattr(reader, "byte_order", "I") == "S"  # the file's byte order is not the host's
    return GGUFCheckpoint(path, version, _metadata(reader), reader, byte_swapped)


# --- The llama architecture: metadata and tensors checked against each other -----------------------
def _positive_int(metadata: dict[str, Any], key: str) -> int:
    value = metadata[key]
    if type(value) is not int or value <= 0:
        extra = " (per-layer values are not read)" if isinstance(value, list) else ""
        raise CheckpointError(f"metadata key `{key}` must be a positive integer{extra}; got {value!r}.")
    return value


def _names(names: list[str], limit: int = 6) -> str:
    listed = ", ".join(f"`{n}`" for n in names[:limit])
    return listed + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _check_shape(ckpt: GGUFCheckpoint, name: str, expected: tuple[int, int], meaning: str) -> None:
    shape = ckpt.tensors[name].shape
    if shape != expected:
        raise CheckpointError(
            f"tensor `{name}` has shape {shape}, but the metadata make it {expected} ({meaning}); the "
            "file's metadata disagree with its weights. Convert the model again."
        )


def _llama_hparams(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    """The hparams of :meth:`GGUFCheckpoint.hparams`, every check of :func:`open_gguf` on the way."""
    metadata, tensors = ckpt.metadata, ckpt.tensors
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        said = "has no `general.architecture` key" if arch is None else f"is of architecture {arch!r}"
        raise CheckpointError(
            f"the file {said}; this reader reads GGUF architectures {', '.join(map(repr, ARCHITECTURES))} "
            "only (Llama, Mistral and the other models llama.cpp converts as 'llama')."
        )
    missing = [key for key in LLAMA_REQUIRED_KEYS.values() if key not in metadata]
    if missing:
        raise CheckpointError(
            f"the file lacks the metadata {'key' if len(missing) == 1 else 'keys'} {_names(missing)} that a "
            "llama model needs; convert the model again with llama.cpp's convert_hf_to_gguf.py."
        )
    h = {name: _positive_int(metadata, key) for name, key in LLAMA_REQUIRED_KEYS.items()}
    n_layers, n_heads, d_model = h["n_layers"], h["n_heads"], h["d_model"]
    kv_key = "llama.attention.head_count_kv"
    n_kv_heads = _positive_int(metadata, kv_key) if kv_key in metadata else n_heads
    if n_heads % n_kv_heads:
        raise CheckpointError(
            f"`{kv_key}` is {n_kv_heads}, which does not divide `llama.attention.head_count` = {n_heads}; "
            "grouped-query attention shares each kv head among a whole number of query heads. Convert "
            "the model again."
        )
    if "llama.attention.key_length" in metadata:
        d_head = _positive_int(metadata, "llama.attention.key_length")
    elif d_model % n_heads:
        raise CheckpointError(
            f"`llama.embedding_length` = {d_model} is not a multiple of `llama.attention.head_count` = "
            f"{n_heads}, and there is no `llama.attention.key_length` to give the head width; convert the "
            "model again."
        )
    else:
        d_head = d_model // n_heads
    if "llama.attention.value_length" in metadata:
        d_head_v = _positive_int(metadata, "llama.attention.value_length")
        if d_head_v != d_head:
            raise CheckpointError(
                f"`llama.attention.value_length` = {d_head_v} differs from the key width {d_head}; "
                "llama models have one head width. Convert the model again."
            )
    layer_names = [t.format(i=i) for i in range(n_layers) for t in LLAMA_LAYER_TENSORS]
    absent = [n for n in [LLAMA_EMBED, *layer_names] if n not in tensors]
    if absent:
        raise CheckpointError(
            f"the file lacks {'tensor' if len(absent) == 1 else 'tensors'} {_names(absent)}; a llama "
            f"model of {n_layers} layers (`llama.block_count`) needs `{LLAMA_EMBED}` and "
            "`blk.{i}.attn_{q,k,v,output}.weight` for each layer."
        )
    beyond = sorted({int(m.group(1)) for n in tensors if (m := _LAYER.match(n))} - set(range(n_layers)))
    if beyond:
        example = next(n for n in tensors if (m := _LAYER.match(n)) and int(m.group(1)) == beyond[0])
        raise CheckpointError(
            f"tensor `{example}` belongs to layer {beyond[0]}, but `llama.block_count` is {n_layers}; the "
            "file's metadata disagree with its weights. Convert the model again."
        )
    embed_shape = tensors[LLAMA_EMBED].shape
    if len(embed_shape) != 2 or embed_shape[1] != d_model or embed_shape[0] == 0:
        raise CheckpointError(
            f"tensor `{LLAMA_EMBED}` has shape {embed_shape}, but the metadata make it (d_vocab, {d_model}) "
            f"with `llama.embedding_length` = {d_model}; the file's metadata disagree with its weights. "
            "Convert the model again."
        )
    d_vocab = embed_shape[0]
    tokens = metadata.get(TOKENS_KEY)
    if tokens is not None:
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(
                f"metadata key `{TOKENS_KEY}` must be an array of strings; it is not. Convert the model again."
            )
        if len(tokens) != d_vocab:
            raise CheckpointError(
                f"`{TOKENS_KEY}` lists {len(tokens)} tokens, but `{LLAMA_EMBED}` has {d_vocab} rows; the "
                "file's tokenizer disagrees with its weights. Convert the model again."
            )
    if "llama.vocab_size" in metadata and _positive_int(metadata, "llama.vocab_size") != d_vocab:
        raise CheckpointError(
            f"`llama.vocab_size` is {metadata['llama.vocab_size']}, but `{LLAMA_EMBED}` has {d_vocab} rows; "
            "the file's metadata disagree with its weights. Convert the model again."
        )
    q_rows, kv_rows = n_heads * d_head, n_kv_heads * d_head
    for i in range(n_layers):
        q, k, v, o = (t.format(i=i) for t in LLAMA_LAYER_TENSORS)
        _check_shape(ckpt, q, (q_rows, d_model), f"n_heads * d_head = {n_heads} * {d_head} by d_model")
        _check_shape(ckpt, k, (kv_rows, d_model), f"n_kv_heads * d_head = {n_kv_heads} * {d_head} by d_model")
        _check_shape(ckpt, v, (kv_rows, d_model), f"n_kv_heads * d_head = {n_kv_heads} * {d_head} by d_model")
        _check_shape(ckpt, o, (d_model, q_rows), f"d_model by n_heads * d_head = {n_heads} * {d_head}")
    tied = LLAMA_UNEMBED not in tensors
    if not tied:
        _check_shape(ckpt, LLAMA_UNEMBED, (d_vocab, d_model), "d_vocab by d_model")
    read = [LLAMA_EMBED, *layer_names] + ([] if tied else [LLAMA_UNEMBED])
    unreadable = {}
    for name in read:
        problem = _read_problem(tensors[name].type_name, ckpt._byte_swapped)
        if problem is not None:
            unreadable.setdefault(problem, []).append(name)
    if unreadable:
        problem, names = next(iter(unreadable.items()))
        raise CheckpointError(
            f"{'tensor' if len(names) == 1 else 'tensors'} {_names(names)} cannot be read: {problem}."
        )
    rope_prefix = "llama.rope."
    rope = {key.removeprefix(rope_prefix): value for key, value in metadata.items() if key.startswith(rope_prefix)}
    return {
        "n_layers": n_layers, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "d_model": d_model,
        "d_head": d_head, "d_vocab": d_vocab, "tied": tied, "rope": rope,
    }
