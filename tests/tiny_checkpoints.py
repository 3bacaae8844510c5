"""Tiny transformer checkpoints for the tests, written the way Hugging Face models store them.

``canonical_weights`` draws weights in TransformerLens's shapes; ``gpt2_tensors`` and
``bert_tensors`` lay them out as GPT-2 (fused Conv1D ``c_attn``, (in, out)) and BERT (separate
nn.Linear query/key/value/dense, (out, in)) checkpoints, head ``h`` occupying features
``h * d_head : (h + 1) * d_head`` as Hugging Face's ``view(..., n_heads, d_head)`` splits them.
Unrelated tensors (biases, LayerNorms, MLPs, buffers) are added so readers must ignore them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = {"n_layers": 2, "n_heads": 2, "d_model": 16, "d_vocab": 40}


def canonical_weights(n_layers=2, n_heads=2, d_model=16, d_vocab=40, untied=False, seed=0) -> dict:
    """float64 weights (rounded to float32 values, as the checkpoint stores them)."""
    gen = torch.Generator().manual_seed(seed)
    d_head = d_model // n_heads

    def draw(*shape, std=d_model**-0.5):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).float().double()

    w = {
        "W_E": draw(d_vocab, d_model, std=1.0),
        "W_Q": draw(n_layers, n_heads, d_model, d_head),
        "W_K": draw(n_layers, n_heads, d_model, d_head),
        "W_V": draw(n_layers, n_heads, d_model, d_head),
        "W_O": draw(n_layers, n_heads, d_head, d_model),
    }
    w["W_U"] = draw(d_model, d_vocab) if untied else w["W_E"].T
    return w


def _in_out(W_heads):
    """(H, d_model, d_head) -> (d_model, H d_head), head-major columns."""
    H, d_model, d_head = W_heads.shape
    return W_heads.permute(1, 0, 2).reshape(d_model, H * d_head)


def gpt2_tensors(w: dict, prefix: str = "", untied: bool = False) -> dict:
    L, H, d_model, d_head = w["W_Q"].shape
    t = {f"{prefix}wte.weight": w["W_E"], f"{prefix}wpe.weight": torch.randn(8, d_model),
         f"{prefix}ln_f.weight": torch.ones(d_model)}
    for i in range(L):
        t[f"{prefix}h.{i}.attn.c_attn.weight"] = torch.cat([_in_out(w[k][i]) for k in ("W_Q", "W_K", "W_V")], dim=1)
        t[f"{prefix}h.{i}.attn.c_attn.bias"] = torch.randn(3 * d_model)
        t[f"{prefix}h.{i}.attn.c_proj.weight"] = w["W_O"][i].reshape(H * d_head, d_model)
        t[f"{prefix}h.{i}.attn.bias"] = torch.ones(1, 1, 8, 8)
        t[f"{prefix}h.{i}.mlp.c_fc.weight"] = torch.randn(d_model, 4 * d_model)
        t[f"{prefix}h.{i}.ln_1.weight"] = torch.ones(d_model)
    if untied:
        t["lm_head.weight"] = w["W_U"].T
    return {k: v.float().contiguous() for k, v in t.items()}


def bert_tensors(w: dict, prefix: str = "", untied: bool = False) -> dict:
    L, H, d_model, d_head = w["W_Q"].shape
    t = {f"{prefix}embeddings.word_embeddings.weight": w["W_E"],
         f"{prefix}embeddings.position_embeddings.weight": torch.randn(8, d_model),
         f"{prefix}embeddings.LayerNorm.weight": torch.ones(d_model)}
    for i in range(L):
        root = f"{prefix}encoder.layer.{i}."
        for name, key in (("query", "W_Q"), ("key", "W_K"), ("value", "W_V")):
            t[f"{root}attention.self.{name}.weight"] = _in_out(w[key][i]).T  # nn.Linear: (out, in)
            t[f"{root}attention.self.{name}.bias"] = torch.randn(d_model)
        t[f"{root}attention.output.dense.weight"] = w["W_O"][i].reshape(H * d_head, d_model).T
        t[f"{root}attention.output.LayerNorm.weight"] = torch.ones(d_model)
        t[f"{root}intermediate.dense.weight"] = torch.randn(4 * d_model, d_model)
        t[f"{root}output.dense.weight"] = torch.randn(d_model, 4 * d_model)
    if untied:
        t["cls.predictions.decoder.weight"] = w["W_U"].T
    t[f"{prefix}embeddings.position_ids"] = torch.arange(8)[None]
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in t.items()}


WRITERS = {"gpt2": gpt2_tensors, "bert": bert_tensors}


def write_checkpoint(directory: Path, tensors: dict, config: dict | None = None, name: str = "model.safetensors") -> Path:
    """Save ``tensors`` as ``directory/name``, with a config.json beside it when ``config`` is given."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    save_file(tensors, str(path))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return path


def tiny_checkpoint(directory: Path, layout: str, prefix: str = "", untied: bool = False,
                    config: bool = True, **shape) -> tuple[Path, dict]:
    """Write a tiny checkpoint; returns its path and the float64 canonical weights."""
    shape = {**SHAPE, **shape}
    w = canonical_weights(**shape, untied=untied)
    key = "n_head" if layout == "gpt2" else "num_attention_heads"
    path = write_checkpoint(directory, WRITERS[layout](w, prefix, untied), {key: shape["n_heads"]} if config else None)
    return path, w


# --- Raw files, for malformed checkpoints ----------------------------------------------------------
def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """A safetensors file's parsed JSON header and its data section."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join_safetensors(header: dict | bytes, data: bytes, length: int | None = None) -> bytes:
    """The bytes of a safetensors file: 8-byte little-endian header length (``length`` overrides
    it), the header (a dict is JSON-encoded), the data."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (len(encoded) if length is None else length).to_bytes(8, "little") + encoded + data
