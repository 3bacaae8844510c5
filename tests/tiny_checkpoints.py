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


def canonical_weights(n_layers=2, n_heads=2, d_model=16, d_vocab=40, untied=False, seed=0, n_kv_heads=None,
                      d_head=None) -> dict:
    """float64 weights (rounded to float32 values, as the checkpoint stores them); ``W_K`` and
    ``W_V`` have ``n_kv_heads`` heads (GQA) when given."""
    gen = torch.Generator().manual_seed(seed)
    d_head = d_model // n_heads if d_head is None else d_head
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads

    def draw(*shape, std=d_model**-0.5):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).float().double()

    w = {
        "W_E": draw(d_vocab, d_model, std=1.0),
        "W_Q": draw(n_layers, n_heads, d_model, d_head),
        "W_K": draw(n_layers, n_kv_heads, d_model, d_head),
        "W_V": draw(n_layers, n_kv_heads, d_model, d_head),
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


def llama_tensors(w: dict, prefix: str = "model.", untied: bool = False) -> dict:
    """Llama / Mistral / Qwen2 names: nn.Linear (out, in) q/k/v/o projections, K and V with their
    own (fewer) heads, ``lm_head.weight`` outside the prefix when untied."""
    L = w["W_Q"].shape[0]
    d_model = w["W_E"].shape[1]
    t = {f"{prefix}embed_tokens.weight": w["W_E"], f"{prefix}norm.weight": torch.ones(d_model)}
    for i in range(L):
        root = f"{prefix}layers.{i}."
        for name, key in (("q", "W_Q"), ("k", "W_K"), ("v", "W_V")):
            t[f"{root}self_attn.{name}_proj.weight"] = _in_out(w[key][i]).T
        H, d_head = w["W_O"].shape[1:3]
        t[f"{root}self_attn.o_proj.weight"] = w["W_O"][i].reshape(H * d_head, d_model).T
        t[f"{root}mlp.gate_proj.weight"] = torch.randn(3 * d_model, d_model)
        t[f"{root}input_layernorm.weight"] = torch.ones(d_model)
    t[f"{prefix}rotary_emb.inv_freq"] = torch.rand(4)
    if untied:
        t["lm_head.weight"] = w["W_U"].T
    return {k: v.float().contiguous() for k, v in t.items()}


def neox_tensors(w: dict, prefix: str = "gpt_neox.", untied: bool = True) -> dict:
    """GPT-NeoX / Pythia names: one ``query_key_value`` (3 d_model, d_model) per layer whose rows
    are, per head, that head's q, k and v rows (``view(n_heads, 3 d_head)``), nn.Linear (out, in);
    ``embed_out.weight`` outside the prefix (Pythia never ties it; absent means tied here)."""
    L, H, d_model, d_head = w["W_Q"].shape
    t = {f"{prefix}embed_in.weight": w["W_E"], f"{prefix}final_layer_norm.weight": torch.ones(d_model)}
    for i in range(L):
        root = f"{prefix}layers.{i}."
        per_head = torch.stack([w[k][i].mT for k in ("W_Q", "W_K", "W_V")], dim=1)  # (H, 3, d_head, d_model)
        t[f"{root}attention.query_key_value.weight"] = per_head.reshape(3 * H * d_head, d_model)
        t[f"{root}attention.query_key_value.bias"] = torch.randn(3 * H * d_head)
        t[f"{root}attention.dense.weight"] = w["W_O"][i].reshape(H * d_head, d_model).T
        t[f"{root}attention.rotary_emb.inv_freq"] = torch.rand(2)
        t[f"{root}mlp.dense_h_to_4h.weight"] = torch.randn(4 * d_model, d_model)
    if untied:
        t["embed_out.weight"] = w["W_U"].T
    return {k: v.float().contiguous() for k, v in t.items()}


WRITERS = {"gpt2": gpt2_tensors, "bert": bert_tensors, "llama": llama_tensors, "neox": neox_tensors}
CONFIG_KEYS = {"gpt2": "n_head", "bert": "num_attention_heads", "llama": "num_attention_heads",
               "neox": "num_attention_heads"}


def write_sharded(directory: Path, tensors: dict, config: dict | None = None, n_shards: int = 3) -> Path:
    """Save ``tensors`` over ``n_shards`` files as ``save_pretrained`` does, with
    ``model.safetensors.index.json``; returns the index's path."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for k in range(n_shards):
        file = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k::n_shards]}
        save_file(part, str(directory / file))
        weight_map.update(dict.fromkeys(part, file))
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return index


def write_checkpoint(directory: Path, tensors: dict, config: dict | None = None, name: str = "model.safetensors") -> Path:
    """Save ``tensors`` as ``directory/name``, with a config.json beside it when ``config`` is given."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    save_file(tensors, str(path))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    return path


def tiny_checkpoint(directory: Path, layout: str, prefix: str | None = None, untied: bool = False,
                    config: bool = True, dtype: torch.dtype = torch.float32, sharded: bool = False,
                    **shape) -> tuple[Path, dict]:
    """Write a tiny checkpoint; returns its path and the float64 canonical weights (rounded to
    ``dtype``'s values, as the file stores them). ``n_kv_heads`` in ``shape`` makes a GQA model
    (Llama layout)."""
    shape = {**SHAPE, **shape}
    w = canonical_weights(**shape, untied=untied)
    w = {k: v.to(dtype).double() for k, v in w.items()}
    if not untied:
        w["W_U"] = w["W_E"].T
    kwargs = {} if prefix is None else {"prefix": prefix}
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in WRITERS[layout](w, untied=untied, **kwargs).items()}
    settings = None
    if config:
        settings = {CONFIG_KEYS[layout]: shape["n_heads"]}
        if shape.get("n_kv_heads") is not None:
            settings["num_key_value_heads"] = shape["n_kv_heads"]
        if shape.get("d_head") is not None:
            settings["head_dim"] = shape["d_head"]
    if sharded:
        return write_sharded(directory, tensors, settings), w
    return write_checkpoint(directory, tensors, settings), w


# --- Dense float64 references --------------------------------------------------------------------
def dense_reference(w: dict) -> dict:
    """Every head's circuits formed densely in float64. Per circuit: norm (L, H), all singular values (L, H, d_vocab), effective rank, eigenvalue positivity."""
    L, H = w["W_Q"].shape[:2]
    group = H // w["W_K"].shape[1]  # query head h reads key/value head h // group (GQA)
    out = {}
    for name in ("ov", "qk"):
        norms, spectra, ranks, scores = (torch.zeros(L, H, dtype=torch.float64) for _ in range(4))
        spectra = torch.zeros(L, H, w["W_E"].shape[0], dtype=torch.float64)
        for layer in range(L):
            for head in range(H):
                if name == "ov":
                    M = w["W_E"] @ w["W_V"][layer, head // group] @ w["W_O"][layer, head] @ w["W_U"]
                else:
                    M = w["W_E"] @ w["W_Q"][layer, head] @ w["W_K"][layer, head // group].T @ w["W_E"].T
                s = torch.linalg.svdvals(M)
                p = s / s.sum()
                eig = torch.linalg.eigvals(M)
                norms[layer, head] = torch.linalg.norm(M)
                spectra[layer, head] = s
                ranks[layer, head] = torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum())
                scores[layer, head] = eig.sum().real / eig.abs().sum()
        out[name] = {"norm": norms, "singular_values": spectra, "effective_rank": ranks, "positivity": scores}
    return out


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
