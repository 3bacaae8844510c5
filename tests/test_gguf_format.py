"""lowrank_op.circuits.gguf_format: llama GGUF files read back in Hugging Face orientation; errors."""

import ast
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lowrank_op.circuits import gguf_format as gf
from lowrank_op.errors import CheckpointError


try:
    import gguf
    from gguf import GGMLQuantizationType as Q
except ImportError:  # an optional dependency: the tests that need it skip
    gguf = Q = None
needs_gguf = pytest.mark.skipif(gguf is None, reason="the gguf package is not installed")

SHAPE = {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_head": 16, "d_model": 64, "d_vocab": 40}
D_FF = 96
TOKENS = ["<unk>", "<s>", "</s>", "▁the", "▁a", "é", "日本", "\n"] + [f"▁tok{i}" for i in range(32)]


def llama_permute(w, n_head):
    """llama.cpp's converter's row order for Q and K: each head's two rotary halves interleaved."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_parts(n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_model=64, d_vocab=40, untied=False, seed=0):
    """(metadata, stored, hf): what llama.cpp's converter writes for a tiny llama, and the HF weights.

    ``stored`` maps tensor names to float32 arrays in HF orientation as written (Q, K permuted);
    ``hf`` maps the same names to the unpermuted Hugging Face weights.
    """
    rng = np.random.default_rng(seed)
    metadata = {
        "general.name": "tiny llama",
        "llama.context_length": 128,
        "llama.embedding_length": d_model,
        "llama.block_count": n_layers,
        "llama.feed_forward_length": D_FF,
        "llama.attention.head_count": n_heads,
        "llama.attention.head_count_kv": n_kv_heads,
        "llama.rope.dimension_count": d_head,
        "llama.rope.freq_base": 10000.0,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": (TOKENS * (d_vocab // len(TOKENS) + 1))[:d_vocab],
        "tokenizer.ggml.scores": [float(-i) for i in range(d_vocab)],
        "tokenizer.ggml.bos_token_id": 1,
    }

    def w(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    hf = {"token_embd.weight": w(d_vocab, d_model), "output_norm.weight": 1 + w(d_model)}
    for i in range(n_layers):
        hf |= {
            f"blk.{i}.attn_norm.weight": 1 + w(d_model),
            f"blk.{i}.attn_q.weight": w(n_heads * d_head, d_model),
            f"blk.{i}.attn_k.weight": w(n_kv_heads * d_head, d_model),
            f"blk.{i}.attn_v.weight": w(n_kv_heads * d_head, d_model),
            f"blk.{i}.attn_output.weight": w(d_model, n_heads * d_head),
            f"blk.{i}.ffn_norm.weight": 1 + w(d_model),
            f"blk.{i}.ffn_gate.weight": w(D_FF, d_model),
            f"blk.{i}.ffn_up.weight": w(D_FF, d_model),
            f"blk.{i}.ffn_down.weight": w(d_model, D_FF),
        }
    if untied:
        hf["output.weight"] = w(d_vocab, d_model)
    stored = dict(hf)
    for i in range(n_layers):
        stored[f"blk.{i}.attn_q.weight"] = llama_permute(hf[f"blk.{i}.attn_q.weight"], n_heads)
        stored[f"blk.{i}.attn_k.weight"] = llama_permute(hf[f"blk.{i}.attn_k.weight"], n_kv_heads)
    return metadata, stored, hf


def write_gguf(path, metadata, tensors, arch="llama", qtypes=None, big_endian=False):
    """Write a GGUF file with gguf.GGUFWriter; tensors are arrays in HF orientation, quantized per ``qtypes``."""
    endianess = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), arch, endianess=endianess)
    for key, value in metadata.items():
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        else:
            writer.add_array(key, value)
    for name, array in tensors.items():
        qtype = (qtypes or {}).get(name)
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny_gguf(tmp_path, name="tiny.gguf", **kwargs):
    metadata, stored, _ = llama_parts(**kwargs)
    return write_gguf(tmp_path / name, metadata, stored), stored


# --- Reading back ---------------------------------------------------------------------------------
@needs_gguf
@pytest.mark.parametrize("stored_dtype", [np.float32, np.float16], ids=["F32", "F16"])
def test_float_tensors_read_back_exactly_in_hf_orientation(tmp_path, stored_dtype):
    metadata, stored, _ = llama_parts(untied=True)
    stored = {name: a.astype(stored_dtype) for name, a in stored.items()}
    ckpt = gf.open_gguf(write_gguf(tmp_path / "m.gguf", metadata, stored))
    assert list(ckpt.tensors) == list(stored)
    type_name = "F32" if stored_dtype == np.float32 else "F16"
    for name, array in stored.items():
        info = ckpt.tensors[name]
        assert (info.name, info.shape, info.type_name, info.n_bytes) == (name, array.shape, type_name, array.nbytes)
        assert info.n_elements == array.size
        got = ckpt.get(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == array.shape
        assert torch.equal(got, torch.from_numpy(array.astype(np.float32)))
        assert torch.equal(ckpt.get(name, torch.float64), torch.from_numpy(array.astype(np.float64)))


@needs_gguf
def test_get_gives_a_fresh_tensor_in_the_stored_precision(tmp_path):
    metadata, stored, _ = llama_parts()
    stored = {name: a.astype(np.float16) for name, a in stored.items()}
    ckpt = gf.open_gguf(write_gguf(tmp_path / "m.gguf", metadata, stored))
    a = ckpt.get("token_embd.weight", torch.float16)
    assert a.dtype == torch.float16 and torch.equal(a, torch.from_numpy(stored["token_embd.weight"]))
    a.zero_()  # writable, and not the file's memory
    assert torch.equal(ckpt.get("token_embd.weight", torch.float16), torch.from_numpy(stored["token_embd.weight"]))
    assert ckpt.get("token_embd.weight", torch.bfloat16).dtype == torch.bfloat16


def _block_steps(array, qtype):
    """Per value, the quantization step of its 32-value block: amax/127 (Q8_0) or (max-min)/15 (Q4_1)."""
    blocks = array.reshape(-1, 32).astype(np.float64)
    if qtype == Q.Q8_0:
        step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    else:
        step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / 15
    return np.broadcast_to(step, blocks.shape).reshape(array.shape)


@needs_gguf
@pytest.mark.parametrize("qtype_name", ["Q8_0", "Q4_1"])
def test_quantized_tensors_read_back_dequantized(tmp_path, qtype_name):
    qtype = Q[qtype_name]
    metadata, stored, _ = llama_parts(untied=True)
    quantized = [name for name, a in stored.items() if a.ndim == 2]
    path = write_gguf(tmp_path / "q.gguf", metadata, stored, qtypes=dict.fromkeys(quantized, qtype))
    ckpt = gf.open_gguf(path)
    fp16_eps = float(np.finfo(np.float16).eps)
    for name in quantized:
        info, array = ckpt.tensors[name], stored[name]
        blocks = gguf.quants.quantize(array, qtype)
        assert (info.shape, info.type_name, info.n_bytes) == (array.shape, qtype_name, blocks.nbytes)
        got = ckpt.get(name, torch.float64)
        expected = gguf.quants.dequantize(blocks, qtype)
        assert expected.shape == array.shape
        assert torch.equal(got, torch.from_numpy(expected.astype(np.float64)))
        # Within one quantization step of the original (half a step of rounding, plus the block's
        # float16 scale and offset rounded to half an ulp each).
        error = np.abs(got.numpy() - array)
        bound = _block_steps(array, qtype) * (1 + 16 * fp16_eps) + np.abs(array).max() * fp16_eps
        assert (error <= bound).all()
    assert torch.equal(ckpt.get("output_norm.weight"), torch.from_numpy(stored["output_norm.weight"]))


@needs_gguf
def test_bf16_and_f64_tensors(tmp_path):
    metadata, stored, _ = llama_parts()
    stored["blk.0.ffn_up.weight"] = stored["blk.0.ffn_up.weight"].astype(np.float64) / 3
    path = write_gguf(tmp_path / "m.gguf", metadata, stored, qtypes={"blk.1.attn_q.weight": Q.BF16})
    ckpt = gf.open_gguf(path)
    assert ckpt.tensors["blk.1.attn_q.weight"].type_name == "BF16"
    assert ckpt.tensors["blk.0.ffn_up.weight"].type_name == "F64"
    got = ckpt.get("blk.1.attn_q.weight")
    expected = torch.from_numpy(stored["blk.1.attn_q.weight"]).to(torch.bfloat16).float()  # round to nearest even
    assert torch.equal(got, expected)
    assert torch.equal(ckpt.get("blk.1.attn_q.weight", torch.bfloat16), expected.bfloat16())
    assert torch.equal(ckpt.get("blk.0.ffn_up.weight", torch.float64), torch.from_numpy(stored["blk.0.ffn_up.weight"]))
    assert torch.equal(ckpt.get("blk.0.ffn_up.weight"), torch.from_numpy(stored["blk.0.ffn_up.weight"]).float())


@needs_gguf
@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_hparams_tokens_and_metadata(tmp_path, n_heads, n_kv_heads):
    path, stored = tiny_gguf(tmp_path, n_heads=n_heads, n_kv_heads=n_kv_heads)
    ckpt = gf.open_gguf(path)
    assert ckpt.architecture == "llama" and ckpt.version == 3
    assert ckpt.hparams() == {
        "n_layers": 2, "n_heads": n_heads, "n_kv_heads": n_kv_heads, "d_model": 64, "d_head": 16,
        "d_vocab": 40, "tied": True, "rope": {"dimension_count": 16, "freq_base": 10000.0},
    }
    tokens = ckpt.tokens
    assert tokens == (TOKENS * 2)[:40] and tokens[5] == "é" and tokens[6] == "日本"
    tokens.append("x")  # a new list each time
    assert len(ckpt.tokens) == 40
    md = ckpt.metadata
    assert md["general.architecture"] == "llama" and md["general.name"] == "tiny llama"
    assert md["llama.block_count"] == 2 and type(md["llama.block_count"]) is int
    assert md["llama.attention.layer_norm_rms_epsilon"] == float(np.float32(1e-5))
    assert md["tokenizer.ggml.scores"] == [float(-i) for i in range(40)]
    assert not any(key.startswith("GGUF.") for key in md)
    assert ckpt.tensors["blk.1.attn_k.weight"].shape == (n_kv_heads * 16, 64)
    assert tuple(ckpt.get("blk.1.attn_v.weight").shape) == (n_kv_heads * 16, 64)
    assert tuple(ckpt.get("blk.1.attn_q.weight").shape) == (n_heads * 16, 64)
    assert tuple(ckpt.get("blk.1.attn_output.weight").shape) == (64, n_heads * 16)


@needs_gguf
def test_hparams_defaults_and_key_length(tmp_path):
    metadata, stored, _ = llama_parts(n_heads=4, n_kv_heads=4, untied=True)
    del metadata["llama.attention.head_count_kv"], metadata["tokenizer.ggml.tokens"]
    for key in [k for k in metadata if k.startswith("llama.rope.")]:
        del metadata[key]
    ckpt = gf.open_gguf(write_gguf(tmp_path / "a.gguf", metadata, stored))
    h = ckpt.hparams()
    assert (h["n_kv_heads"], h["d_head"], h["d_vocab"], h["tied"], h["rope"]) == (4, 16, 40, False, {})
    assert ckpt.tokens is None
    # Heads narrower than d_model / n_heads: the width comes from key_length.
    metadata, stored, _ = llama_parts(n_heads=4, n_kv_heads=2, d_head=8)
    metadata["llama.attention.key_length"] = metadata["llama.attention.value_length"] = 8
    ckpt = gf.open_gguf(write_gguf(tmp_path / "b.gguf", metadata, stored))
    assert ckpt.hparams()["d_head"] == 8 and ckpt.tensors["blk.0.attn_q.weight"].shape == (32, 64)


@needs_gguf
def test_big_endian_float_file_reads_back_and_quantized_blocks_are_refused(tmp_path):
    metadata, stored, _ = llama_parts()
    path = write_gguf(tmp_path / "be.gguf", metadata, stored, big_endian=True, qtypes={"blk.0.ffn_up.weight": Q.Q8_0})
    ckpt = gf.open_gguf(path)
    assert ckpt.hparams()["n_layers"] == 2 and ckpt.tokens[6] == "日本"
    assert torch.equal(ckpt.get("blk.1.attn_q.weight"), torch.from_numpy(stored["blk.1.attn_q.weight"]))
    with pytest.raises(CheckpointError, match=r"`blk.0.ffn_up.weight` cannot be read: Q8_0 blocks .* byte order"):
        ckpt.get("blk.0.ffn_up.weight")


# --- The Q/K row permutation of llama.cpp's converter ---------------------------------------------
def _qk_per_head(q, k, n_heads, n_kv_heads, d_head):
    """W_Q[h] W_K[g]^T for each query head h and its kv head g, TransformerLens orientation."""
    W_Q = q.T.reshape(q.shape[1], n_heads, d_head).transpose(1, 0, 2)  # (n_heads, d_model, d_head)
    W_K = k.T.reshape(k.shape[1], n_kv_heads, d_head).transpose(1, 0, 2)
    group = n_heads // n_kv_heads
    return np.stack([W_Q[h] @ W_K[h // group].T for h in range(n_heads)])


@pytest.mark.parametrize("n_heads,n_kv_heads,d_head,d_model", [(4, 4, 8, 12), (4, 2, 6, 10), (4, 2, 8, 12), (6, 1, 4, 7), (8, 2, 16, 16)])
def test_llama_permutation_leaves_each_heads_qk_product_unchanged(n_heads, n_kv_heads, d_head, d_model):
    rng = np.random.default_rng(n_heads * 100 + n_kv_heads)
    q = rng.standard_normal((n_heads * d_head, d_model))
    k = rng.standard_normal((n_kv_heads * d_head, d_model))
    q_stored, k_stored = llama_permute(q, n_heads), llama_permute(k, n_kv_heads)
    assert not np.array_equal(q_stored, q) and not np.array_equal(k_stored, k)  # rows did move
    assert np.array_equal(np.sort(q_stored, axis=0), np.sort(q, axis=0))  # ... and only moved
    before = _qk_per_head(q, k, n_heads, n_kv_heads, d_head)
    after = _qk_per_head(q_stored, k_stored, n_heads, n_kv_heads, d_head)
    # Same terms summed in another order: within d_head * eps of the sum of |terms|.
    scale = _qk_per_head(np.abs(q), np.abs(k), n_heads, n_kv_heads, d_head)
    assert (np.abs(after - before) <= 2 * d_head * np.finfo(np.float64).eps * scale).all()
    # Permuting K by n_heads instead of n_kv_heads (a converter bug) would break the pairing.
    if n_kv_heads < n_heads and n_kv_heads * d_head % (2 * n_heads) == 0:
        wrong = _qk_per_head(q_stored, llama_permute(k, n_heads), n_heads, n_kv_heads, d_head)
        assert not np.allclose(wrong, before)


@needs_gguf
def test_qk_circuit_from_gguf_equals_the_hugging_face_one(tmp_path):
    metadata, stored, hf = llama_parts(n_heads=4, n_kv_heads=2)
    ckpt = gf.open_gguf(write_gguf(tmp_path / "m.gguf", metadata, stored))
    W_E = ckpt.get("token_embd.weight", torch.float64).numpy()
    eps = np.finfo(np.float64).eps
    for i in range(2):
        q, k = (ckpt.get(f"blk.{i}.attn_{x}.weight", torch.float64).numpy() for x in "qk")
        got = W_E @ _qk_per_head(q, k, 4, 2, 16) @ W_E.T
        q_hf, k_hf = (hf[f"blk.{i}.attn_{x}.weight"].astype(np.float64) for x in "qk")
        want = W_E @ _qk_per_head(q_hf, k_hf, 4, 2, 16) @ W_E.T
        scale = np.abs(W_E) @ _qk_per_head(np.abs(q_hf), np.abs(k_hf), 4, 2, 16) @ np.abs(W_E).T
        assert (np.abs(got - want) <= 512 * eps * scale).all()  # two orders of 16 + 64 + 64 terms


# --- Malformed files ------------------------------------------------------------------------------
def test_missing_gguf_package_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(20))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(ImportError, match=r"needs the `gguf` package: pip install gguf"):
        gf.open_gguf(path)


@needs_gguf
def test_not_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        gf.open_gguf(tmp_path / "absent.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        gf.open_gguf(tmp_path)


@needs_gguf
@pytest.mark.parametrize(
    "content,match",
    [
        (b"", r"the file is empty \(0 bytes\)"),
        (b"GG", r"2 bytes long, too short .* truncated"),
        (b"GGUF\x03\x00", r"6 bytes long, too short .* truncated"),
        (b"GGML" + bytes(40), r"starts with b'GGML', not the magic bytes b'GGUF'"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}       ", r"not a GGUF file\. It looks like a safetensors file"),
        (b"GGUF" + struct.pack("<I", 1) + bytes(16), r"GGUF version 1, .* reads versions 2, 3; re-convert"),
        (b"GGUF" + struct.pack("<I", 9) + bytes(16), r"GGUF version 9, .* upgrade the gguf package"),
    ],
    ids=["empty", "short-magic", "short-version", "bad-magic", "safetensors", "version-1", "version-9"],
)
def test_preamble_errors(tmp_path, content, match):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        gf.open_gguf(path)


@needs_gguf
@pytest.mark.parametrize("keep,part", [(24, "header"), (60, "header"), (-100, "tensor data"), (-1, "tensor data")])
def test_truncated_files(tmp_path, keep, part):
    path, _ = tiny_gguf(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[:keep])
    size = len(raw[:keep])
    with pytest.raises(CheckpointError, match=rf"truncated: it is {size} bytes long, but its {part} runs to byte"):
        gf.open_gguf(path)


@needs_gguf
def test_corrupt_array_length_is_reported_not_looped_over(tmp_path):
    # One metadata key holding an array of 2**40 uint8s, in a 100-byte file: gguf's reader alone
    # would loop over 2**40 empty reads.
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    field = struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 0, 2**40)
    path = tmp_path / "a.gguf"
    path.write_bytes(header + field + bytes(60))
    with pytest.raises(CheckpointError, match=r"truncated: .* its header runs to byte \d+ at least"):
        gf.open_gguf(path)


@needs_gguf
def test_unparsable_header_is_a_checkpoint_error(tmp_path):
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1)
    field = struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77) + bytes(8)  # value type 77 does not exist
    path = tmp_path / "a.gguf"
    path.write_bytes(header + field + bytes(32))
    with pytest.raises(CheckpointError, match=r"the gguf package cannot parse the file's header \(ValueError"):
        gf.open_gguf(path)


@needs_gguf
def test_unknown_tensor_type_says_to_upgrade(tmp_path):
    header = b"GGUF" + struct.pack("<IQQ", 3, 1, 0)
    info = struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 200, 0)  # one tensor of type id 200
    path = tmp_path / "a.gguf"
    path.write_bytes(header + info + bytes(-(len(header) + len(info)) % 32) + bytes(256))
    with pytest.raises(CheckpointError, match=r"has a type the installed gguf package .* does not know .*200.*upgrade gguf"):
        gf.open_gguf(path)


def _corrupt(metadata, stored, case):
    """Apply one malformation to a tiny llama's metadata and tensors; the pattern its error must match."""
    if case == "missing-keys":
        del metadata["llama.attention.head_count"], metadata["llama.embedding_length"]
        return r"lacks the metadata keys `llama.attention.head_count`, `llama.embedding_length`"
    if case == "zero-heads":
        metadata["llama.attention.head_count"] = 0
        return r"`llama.attention.head_count` must be a positive integer; got 0"
    if case == "per-layer-heads":
        metadata["llama.attention.head_count"] = [4, 4]
        return r"`llama.attention.head_count` must be a positive integer \(per-layer values are not read\)"
    if case == "kv-not-dividing":
        metadata["llama.attention.head_count_kv"] = 3
        return r"`llama.attention.head_count_kv` is 3, which does not divide .* = 4"
    if case == "d-model-not-divisible":
        metadata["llama.attention.head_count"] = 5
        metadata["llama.attention.head_count_kv"] = 5
        return r"`llama.embedding_length` = 64 is not a multiple of .* = 5"
    if case == "value-length":
        metadata["llama.attention.value_length"] = 8
        return r"`llama.attention.value_length` = 8 differs from the key width 16"
    if case == "missing-tensors":
        del stored["blk.1.attn_k.weight"], stored["token_embd.weight"]
        return r"lacks tensors `token_embd.weight`, `blk.1.attn_k.weight`; a llama model of 2 layers"
    if case == "q-shape":
        stored["blk.1.attn_q.weight"] = stored["blk.1.attn_q.weight"][:48]
        return r"`blk.1.attn_q.weight` has shape \(48, 64\), but the metadata make it \(64, 64\) \(n_heads \* d_head = 4 \* 16"
    if case == "k-shape":
        stored["blk.0.attn_k.weight"] = stored["blk.0.attn_q.weight"]
        return r"`blk.0.attn_k.weight` has shape \(64, 64\), but the metadata make it \(32, 64\) \(n_kv_heads"
    if case == "o-transposed":
        stored["blk.0.attn_output.weight"] = np.ascontiguousarray(stored["blk.0.attn_output.weight"][:, :32].T)
        return r"`blk.0.attn_output.weight` has shape \(32, 64\), but the metadata make it \(64, 64\)"
    if case == "embed-shape":
        stored["token_embd.weight"] = stored["token_embd.weight"][:, :32].copy()
        return r"`token_embd.weight` has shape \(40, 32\), but the metadata make it \(d_vocab, 64\)"
    if case == "unembed-shape":
        stored["output.weight"] = stored["token_embd.weight"][:39]
        return r"`output.weight` has shape \(39, 64\), but the metadata make it \(40, 64\)"
    if case == "token-count":
        metadata["tokenizer.ggml.tokens"] = metadata["tokenizer.ggml.tokens"][:39]
        return r"`tokenizer.ggml.tokens` lists 39 tokens, but `token_embd.weight` has 40 rows"
    if case == "vocab-size":
        metadata["llama.vocab_size"] = 41
        return r"`llama.vocab_size` is 41, but `token_embd.weight` has 40 rows"
    if case == "tokens-not-strings":
        metadata["tokenizer.ggml.tokens"] = list(range(40))
        return r"`tokenizer.ggml.tokens` must be an array of strings"
    if case == "extra-layer":
        stored["blk.2.attn_norm.weight"] = stored["blk.1.attn_norm.weight"]
        return r"`blk.2.attn_norm.weight` belongs to layer 2, but `llama.block_count` is 2"
    raise AssertionError(case)


MALFORMED = [
    "missing-keys", "zero-heads", "per-layer-heads", "kv-not-dividing", "d-model-not-divisible",
    "value-length", "missing-tensors", "q-shape", "k-shape", "o-transposed", "embed-shape",
    "unembed-shape", "token-count", "vocab-size", "tokens-not-strings", "extra-layer",
]


@needs_gguf
@pytest.mark.parametrize("case", MALFORMED)
def test_metadata_and_tensors_that_disagree(tmp_path, case):
    metadata, stored, _ = llama_parts()
    match = _corrupt(metadata, stored, case)
    path = write_gguf(tmp_path / f"{case}.gguf", metadata, stored)
    with pytest.raises(CheckpointError, match=match):
        gf.open_gguf(path)


@needs_gguf
def test_wrong_architecture(tmp_path):
    metadata, stored, _ = llama_parts()
    metadata = {key.replace("llama.", "gpt2."): value for key, value in metadata.items()}
    path = write_gguf(tmp_path / "g.gguf", metadata, stored, arch="gpt2")
    with pytest.raises(CheckpointError, match=r"is of architecture 'gpt2'; this reader reads GGUF architectures 'llama' only"):
        gf.open_gguf(path)


@needs_gguf
def test_string_that_is_not_utf8(tmp_path):
    metadata, stored, _ = llama_parts()
    path = tmp_path / "s.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_key_value("general.name", b"caf\xe9", gguf.GGUFValueType.STRING)
    for key, value in metadata.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
    for name, array in stored.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"`general.name` holds a string that is not UTF-8 \(.* at byte 3\)"):
        gf.open_gguf(path)


@needs_gguf
def test_tensor_types_that_cannot_be_dequantized(tmp_path):
    metadata, stored, _ = llama_parts()
    # Q8_1 (ggml's activation type) has a block size but no dequantization in gguf.quants.
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
    rows, cols = stored["blk.0.attn_v.weight"].shape
    raw = np.zeros((rows, cols // block_size * type_size), dtype=np.uint8)
    path = tmp_path / "q81.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in metadata.items():
        if isinstance(value, int):
            writer.add_uint32(key, value)
    for name, array in stored.items():
        if name == "blk.0.attn_v.weight":
            writer.add_tensor(name, raw, raw_dtype=Q.Q8_1)
        else:
            writer.add_tensor(name, array)
    writer.add_tensor("rope_ids", np.arange(8, dtype=np.int32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=r"tensor `blk.0.attn_v.weight` cannot be read: the installed gguf package .* cannot dequantize Q8_1"):
        gf.open_gguf(path)
    # Not needed for the circuits, an unreadable tensor fails only when read.
    stored["blk.0.attn_v.weight"] = stored["blk.0.attn_k.weight"]
    path = write_gguf(tmp_path / "i32.gguf", metadata, stored | {"rope_ids": np.arange(8, dtype=np.int32)})
    ckpt = gf.open_gguf(path)
    assert ckpt.tensors["rope_ids"].type_name == "I32"
    with pytest.raises(CheckpointError, match=r"`rope_ids` cannot be read: I32 holds integers, not weights"):
        ckpt.get("rope_ids")


@needs_gguf
def test_non_finite_values_and_overflow_are_named(tmp_path):
    metadata, stored, _ = llama_parts()
    stored["blk.1.attn_v.weight"] = stored["blk.1.attn_v.weight"].copy()
    stored["blk.1.attn_v.weight"][3, 5] = np.nan
    stored["blk.1.attn_v.weight"][4, 0] = np.inf
    stored["blk.0.attn_v.weight"] = stored["blk.0.attn_v.weight"] * 1e6
    ckpt = gf.open_gguf(write_gguf(tmp_path / "nan.gguf", metadata, stored))  # the header is fine
    with pytest.raises(CheckpointError, match=r"`blk.1.attn_v.weight` holds 2 non-finite values \(1 NaN, 1 infinite; the first at index \(3, 5\)\)"):
        ckpt.get("blk.1.attn_v.weight")
    assert torch.isfinite(ckpt.get("blk.0.attn_v.weight")).all()
    with pytest.raises(CheckpointError, match=r"`blk.0.attn_v.weight` holds values up to .* which overflow float16"):
        ckpt.get("blk.0.attn_v.weight", torch.float16)


@needs_gguf
def test_get_argument_errors(tmp_path):
    ckpt = gf.open_gguf(tiny_gguf(tmp_path)[0])
    with pytest.raises(CheckpointError, match=r"the file has no tensor `blk.0.attn_qkv.weight`; its 20 tensors include `token_embd.weight`"):
        ckpt.get("blk.0.attn_qkv.weight")
    for dtype in (torch.int32, torch.complex64, np.float32, "float32"):
        with pytest.raises(TypeError, match=r"`dtype` must be torch.float16, torch.bfloat16, torch.float32 or torch.float64"):
            ckpt.get("token_embd.weight", dtype)


def test_module_imports_nothing_of_lowrank_op_but_its_errors():
    tree = ast.parse(Path(gf.__file__).read_text(encoding="utf-8"))
    imported = [(node.module, tuple(a.name for a in node.names)) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [(a.name, ()) for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names]
    ours = [entry for entry in imported if (entry[0] or "").split(".")[0] == "lowrank_op"]
    assert ours == [("lowrank_op.errors", ("CheckpointError",))]
