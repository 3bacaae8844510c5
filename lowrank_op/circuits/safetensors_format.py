"""safetensors checkpoints, one file or sharded: the header checked against the file, tensors read
memory-mapped one at a time.

A safetensors file is an 8-byte little-endian header length ``n``, ``n`` bytes of JSON
(``{name: {"dtype", "shape", "data_offsets"}, "__metadata__": {...}}``), then the data. A sharded
checkpoint (what ``save_pretrained`` writes above its shard size) is several such files and a
``model.safetensors.index.json`` whose ``weight_map`` names the file of each tensor.

safetensors is an optional dependency (``pip install "lowrank_op[weights]"``), imported only when
a tensor is read; every header is checked by this module first, so a malformed file gets a
:class:`~lowrank_op.errors.CheckpointError` that names the problem rather than the library's own.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lowrank_op.errors import CheckpointError

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
#: The index file of a sharded checkpoint.
INDEX_NAME = "model.safetensors.index.json"
#: The file of an unsharded checkpoint in a directory.
SINGLE_NAME = "model.safetensors"


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
    """The safetensors checkpoint ``path`` names: a ``.safetensors`` file, an index
    (``*.safetensors.index.json``), or a directory holding ``model.safetensors`` or
    ``model.safetensors.index.json``.

    Raises FileNotFoundError when there is no such file.
    """
    path = Path(path)
    if path.is_dir():
        for name in (SINGLE_NAME, INDEX_NAME):
            if (path / name).is_file():
                return path / name
        path = path / SINGLE_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; pass a .safetensors or .gguf file, a model.safetensors.index.json, "
            "or a directory holding one, as --weights."
        )
    return path


def _read_index(path: Path) -> dict[str, Path]:
    """``{tensor name: shard path}`` from a sharded checkpoint's index file."""
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"the index file could not be read as JSON ({err}); the checkpoint is corrupt.") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(
            "the index file has no `weight_map` object naming each tensor's shard file; the checkpoint is corrupt."
        )
    shards = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file:
            raise CheckpointError(
                f"the index maps tensor `{name}` to {file!r}, which is not a file name in the index's directory."
            )
        shard = path.parent / file
        if not shard.is_file():
            raise CheckpointError(f"the index maps tensor `{name}` to the shard {file}, which is missing from {path.parent}.")
        shards[name] = shard
    return shards


class SafetensorsCheckpoint:
    """The tensors of a safetensors checkpoint (one file or shards), read one at a time.

    Parameters
    ----------
    path : path
        As :func:`checkpoint_file` resolves it.

    Notes
    -----
    Opening reads and checks every shard's header (:func:`read_safetensors_header`) and nothing
    else. :meth:`get` maps the tensor's shard (``safe_open``, kept open) and copies out that one
    tensor, converted: memory is the tensor read, not the checkpoint.
    """

    def __init__(self, path: str | Path):
        self.path = checkpoint_file(path)
        if self.path.name.endswith(".index.json"):
            shard_of = _read_index(self.path)
        else:
            shard_of = None
        headers: dict[Path, dict[str, TensorEntry]] = {}
        self.entries: dict[str, TensorEntry] = {}
        self._shard: dict[str, Path] = {}
        for shard in dict.fromkeys(shard_of.values()) if shard_of else [self.path]:
            try:
                headers[shard] = read_safetensors_header(shard)
            except CheckpointError as err:
                raise CheckpointError(f"{shard.name}: {err}" if shard_of else str(err)) from None
        for shard, header in headers.items():
            for name, entry in header.items():
                if shard_of is not None and shard_of.get(name) != shard:
                    continue  # the index places it elsewhere (or not at all)
                self.entries[name] = entry
                self._shard[name] = shard
        if shard_of:
            lost = [n for n in shard_of if n not in self.entries]
            if lost:
                raise CheckpointError(
                    f"the index maps `{lost[0]}` to {shard_of[lost[0]].name}, which does not hold it"
                    + (f" ({len(lost) - 1} more such tensors)" if len(lost) > 1 else "") + "."
                )
        self._open: dict[Path, object] = {}

    @property
    def names(self) -> set[str]:
        return set(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name].shape

    def dtype_name(self, name: str) -> str:
        return self.entries[name].dtype

    def get(self, name: str, dtype: torch.dtype) -> Tensor:
        """The tensor cast to ``dtype``, checked finite as stored and after the cast
        (:func:`_require_finite`)."""
        shard = self._shard[name]
        safe_open, SafetensorError = _import_safetensors()
        try:
            if shard not in self._open:
                self._open[shard] = safe_open(str(shard), framework="pt", device="cpu").__enter__()
            stored = self._open[shard].get_tensor(name)
        except SafetensorError as err:  # a header this module accepts but safetensors does not (e.g. overlaps)
            where = f" {shard.name}" if shard != self.path else ""
            raise CheckpointError(f"safetensors cannot read the file{where}: {err}.") from None
        _require_finite(name, stored)
        tensor = stored.to(dtype)
        if tensor is not stored:
            _require_finite(name, tensor, source=stored)
        return tensor

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()
