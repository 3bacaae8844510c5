"""GGUF checkpoints through the loader, the analysis and the command: every number against the dense
float64 circuits of the Hugging Face (unpermuted) weights, float32 and quantised files, errors."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from test_gguf_format import llama_parts, needs_gguf, write_gguf
from tiny_checkpoints import dense_reference

from lowrank_op.circuits import cli
from lowrank_op.circuits import report as circuit_report
from lowrank_op.circuits.analysis import analyze
from lowrank_op.circuits.checkpoints import load
from lowrank_op.circuits.vocab import display_token, is_byte_level_vocab

pytestmark = needs_gguf
SHAPE = {"n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_head": 16, "d_model": 64, "d_vocab": 40}


def canonical(tensors: dict, n_heads: int, n_kv_heads: int, untied: bool) -> dict:
    """TransformerLens-shaped float64 weights from Hugging Face-orientation arrays."""
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in tensors.items()}
    L = sum(1 for k in t if k.endswith("attn_q.weight"))

    def heads(W, H):  # (H d_head, d_model) (out, in) -> (H, d_model, d_head)
        return W.T.reshape(W.shape[1], H, -1).permute(1, 0, 2)

    w = {"W_E": t["token_embd.weight"],
         "W_Q": torch.stack([heads(t[f"blk.{i}.attn_q.weight"], n_heads) for i in range(L)]),
         "W_K": torch.stack([heads(t[f"blk.{i}.attn_k.weight"], n_kv_heads) for i in range(L)]),
         "W_V": torch.stack([heads(t[f"blk.{i}.attn_v.weight"], n_kv_heads) for i in range(L)]),
         "W_O": torch.stack([t[f"blk.{i}.attn_output.weight"].T.reshape(n_heads, -1, t["token_embd.weight"].shape[1])
                             for i in range(L)])}
    w["W_U"] = t["output.weight"].T if untied else w["W_E"].T
    return w


def assert_matches(report, w, rtol=1e-5, atol=1e-6):
    ref = dense_reference(w)
    d_head = w["W_Q"].shape[-1]
    for name in ("ov", "qk"):
        got, want = getattr(report, name), ref[name]
        scale = want["norm"].max()
        torch.testing.assert_close(got.norm.double(), want["norm"], rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(got.singular_values.double(), want["singular_values"][..., :d_head], rtol=rtol,
                                   atol=atol * scale)
        torch.testing.assert_close(got.eigenvalue_positivity.double(), want["positivity"], rtol=rtol, atol=10 * atol)


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
def test_float32_gguf_equals_the_hugging_face_circuits(tmp_path, untied):
    # The file holds Q and K in llama.cpp's permuted row order; the reference uses the Hugging
    # Face weights before that permutation: the QK circuits agree because it cancels in W_Q W_K^T.
    metadata, stored, hf = llama_parts(**SHAPE, untied=untied)
    path = write_gguf(tmp_path / "tiny.gguf", metadata, stored)
    weights = load(path, dtype=torch.float64)
    assert (weights.layout, weights.n_heads, weights.n_kv_heads, weights.tied, weights.rotary) == ("gguf", 4, 2, not untied, True)
    tokens = metadata["tokenizer.ggml.tokens"]
    assert weights.vocab == [display_token(t, byte_level=is_byte_level_vocab(tokens)) for t in tokens]
    assert_matches(analyze(weights), canonical(hf, 4, 2, untied), rtol=1e-11, atol=1e-13)


def test_quantised_gguf_reads_to_its_dequantised_weights(tmp_path):
    import gguf

    metadata, stored, hf = llama_parts(**SHAPE, untied=True)
    qtypes = {name: gguf.GGMLQuantizationType.Q8_0 for name in stored if name.endswith(".weight") and "norm" not in name}
    path = write_gguf(tmp_path / "q8.gguf", metadata, stored, qtypes=qtypes)
    dequantised = {name: gguf.quants.dequantize(gguf.quants.quantize(array, qtypes[name]), qtypes[name])
                   if name in qtypes else array for name, array in stored.items()}
    weights = load(path)
    w = canonical(dequantised, 4, 2, untied=True)  # permuted Q, K: the circuits are the same
    for key in ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_U"):
        torch.testing.assert_close(getattr(weights, key).double(), w[key], rtol=0, atol=0)
    assert_matches(analyze(weights), w)


def test_command_on_a_gguf_file(tmp_path, capsys):
    metadata, stored, _ = llama_parts(**SHAPE)
    path = write_gguf(tmp_path / "tiny.gguf", metadata, stored)
    out = tmp_path / "out"
    code = cli.main(["circuits", "--weights", str(path), "--out", str(out), "--composition", "--no-progress",
                     "--no-plots", "--tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "GGUF (llama) layout, 2 layers x 4 heads sharing 2 key/value heads" in captured.err
    with open(out / circuit_report.TOKENS_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    tokens = metadata["tokenizer.ggml.tokens"]
    shown = [display_token(t, byte_level=is_byte_level_vocab(tokens)) for t in tokens]
    assert rows and all(r["token"] == shown[int(r["token_id"])] for r in rows)
    assert (out / circuit_report.COMPOSITION_NAME).is_file()


def test_malformed_gguf_is_one_error_line(tmp_path, capsys):
    metadata, stored, _ = llama_parts(**SHAPE)
    path = write_gguf(tmp_path / "tiny.gguf", metadata, stored)
    path.write_bytes(path.read_bytes()[:200])  # truncated inside the header
    code = cli.main(["circuits", "--weights", str(path), "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and err[0].startswith(f"lowrank_op circuits: error: {path}: ")
    assert "truncated" in err[0] and not (tmp_path / "out").exists()


def test_byte_level_vocabulary_is_decoded_by_the_files_own_word(tmp_path):
    # llama.cpp calls byte-level BPE vocabularies "gpt2" (GPT-2's, Llama 3's, SmolLM2's), whether
    # or not all 256 byte tokens are in them: their tokens are shown decoded.
    metadata, stored, _ = llama_parts(**SHAPE)
    tokens = ["Ġthe", "Ċ", "hello", "<s>"] + [f"Ġt{i}" for i in range(36)]
    metadata = {**metadata, "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens}
    weights = load(write_gguf(tmp_path / "bpe.gguf", metadata, stored))
    assert weights.vocab[:4] == [display_token(t, byte_level=True) for t in tokens[:4]]
    assert weights.vocab[0] == " the" and weights.vocab[2] == "hello"


def test_n_heads_flag_must_agree_with_the_gguf_metadata(tmp_path):
    metadata, stored, _ = llama_parts(**SHAPE)
    path = write_gguf(tmp_path / "tiny.gguf", metadata, stored)
    with pytest.raises(ValueError, match=r"`n_heads` \(--n-heads\) is 3 but the GGUF metadata says 4; drop the flag"):
        load(path, n_heads=3)
    assert load(path, n_heads=4).n_heads == 4
