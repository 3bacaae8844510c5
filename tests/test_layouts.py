"""Checkpoint layouts beyond GPT-2 and BERT: Llama (with GQA), GPT-NeoX, sharded safetensors and
16-bit weights; every reported number against the dense float64 circuit, the layers read a batch
at a time, key/value heads never copied per query head, and malformed files."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_checkpoints import dense_reference, tiny_checkpoint

from lowrank_op.circuits import checkpoints, layouts
from lowrank_op.circuits.analysis import analyze, ov_circuit, qk_circuit
from lowrank_op.circuits.checkpoints import load
from lowrank_op.circuits.weights import grouped, random_weights
from lowrank_op.errors import CheckpointError

#: (rtol, atol) per computation dtype, as in test_circuits.py.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}

CASES = {
    # id: (layout, options for tiny_checkpoint)
    "llama-gqa-tied": ("llama", {"n_heads": 4, "n_kv_heads": 2}),
    "llama-gqa-untied": ("llama", {"n_heads": 4, "n_kv_heads": 1, "untied": True}),
    "llama-mha-prefixless": ("llama", {"prefix": "", "untied": True}),
    "llama-head-dim": ("llama", {"n_heads": 4, "n_kv_heads": 2, "d_head": 6, "untied": True}),
    "neox-untied": ("neox", {"n_heads": 4}),
    "neox-tied": ("neox", {"untied": False}),
    "llama-gqa-sharded": ("llama", {"n_heads": 4, "n_kv_heads": 2, "untied": True, "sharded": True}),
    "gpt2-sharded": ("gpt2", {"sharded": True, "untied": True}),
    "llama-bfloat16": ("llama", {"n_heads": 4, "n_kv_heads": 2, "dtype": torch.bfloat16}),
    "neox-float16": ("neox", {"dtype": torch.float16}),
}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    out = {}
    for case, (layout, options) in CASES.items():
        options = dict(options)
        if layout == "neox" and "untied" not in options:
            options["untied"] = True
        out[case] = tiny_checkpoint(root / case, layout, **options)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES)
def test_every_number_matches_the_dense_float64_circuit(written, case, dtype):
    path, w = written[case]
    rtol, atol = TOLERANCES[dtype]
    weights = load(path, dtype=dtype)
    assert weights.layout == CASES[case][0] and weights.n_kv_heads == w["W_K"].shape[1]
    assert weights.tied == (not CASES[case][1].get("untied", CASES[case][0] == "neox"))
    assert weights.rotary == (CASES[case][0] in ("llama", "neox"))
    report = analyze(weights)
    ref = dense_reference(w)
    d_head = w["W_Q"].shape[-1]
    for name in ("ov", "qk"):
        got, want = getattr(report, name), ref[name]
        scale = want["norm"].max()
        assert got.norm.shape == want["norm"].shape
        torch.testing.assert_close(got.norm.double(), want["norm"], rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(got.singular_values.double(), want["singular_values"][..., :d_head],
                                   rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(got.effective_rank.double(), want["effective_rank"], rtol=rtol, atol=atol)
        torch.testing.assert_close(got.eigenvalue_positivity.double(), want["positivity"], rtol=rtol, atol=10 * atol)


@pytest.mark.parametrize("which", ["ov", "qk"])
def test_gqa_circuits_are_grouped_by_key_value_head(written, which):
    # Query head kv * group + g sits at [kv, g]; each key/value head's factor is broadcast over
    # its group (stride 0), never copied per query head.
    path, w = written["llama-gqa-tied"]
    weights = load(path, dtype=torch.float64)
    circuit = (ov_circuit if which == "ov" else qk_circuit)(weights)
    L, H_kv, group, V = weights.n_layers, weights.n_kv_heads, weights.group, weights.d_vocab
    assert circuit.shape == (L, H_kv, group, V, V)
    dense = circuit.to_dense()
    for layer in range(L):
        for h in range(weights.n_heads):
            kv, g = divmod(h, group)
            if which == "ov":
                M = w["W_E"] @ w["W_V"][layer, kv] @ w["W_O"][layer, h] @ w["W_U"]
            else:
                M = w["W_E"] @ w["W_Q"][layer, h] @ w["W_K"][layer, kv].T @ w["W_E"].T
            torch.testing.assert_close(dense[layer, kv, g], M)
    part = weights.read(0, L)
    shared = grouped(part, group)["ov" if which == "ov" else "qk"][0 if which == "ov" else 1]
    assert shared.shape[2] == 1  # one per key/value head: broadcast against the group, not copied
    assert part.W_K.shape[1] == H_kv and part.W_V.shape[1] == H_kv


def test_layers_are_read_a_batch_at_a_time(written, monkeypatch):
    # Loading reads only W_E and W_U; the analysis reads each layer's attention tensors once.
    path, _ = written["llama-gqa-untied"]
    reads = []
    original = checkpoints.SafetensorsCheckpoint.get

    def counting(self, name, dtype):
        reads.append(name)
        return original(self, name, dtype)

    monkeypatch.setattr(checkpoints.SafetensorsCheckpoint, "get", counting)
    weights = load(path)
    assert reads == ["model.embed_tokens.weight", "lm_head.weight"]
    from lowrank_op.circuits import analysis

    monkeypatch.setattr(analysis, "BATCH_MIN_ELEMENTS", 0)
    monkeypatch.setattr(analysis, "BATCH_SHARE_OF_W_E", 1e-9)  # one layer per batch
    analyze(weights)
    attention = reads[2:]
    assert len(attention) == len(set(attention)) == 4 * weights.n_layers
    assert attention[:4] == [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"]


def test_random_gqa_model_equals_its_dense_circuits():
    weights = random_weights(n_layers=2, n_heads=6, n_kv_heads=2, d_model=12, d_head=3, d_vocab=25, untied=True,
                             dtype=torch.float64, seed=4)
    w = {k: getattr(weights, k) for k in ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_U")}
    report, ref = analyze(weights), dense_reference(w)
    for name in ("ov", "qk"):
        torch.testing.assert_close(getattr(report, name).norm, ref[name]["norm"], rtol=1e-12, atol=0)
        torch.testing.assert_close(getattr(report, name).eigenvalue_positivity, ref[name]["positivity"],
                                   rtol=1e-10, atol=1e-12)


def test_neox_interleaving_is_per_head():
    # Rows of query_key_value are (head, [q | k | v], d_head): a tensor whose entries encode their
    # own (part, head, row) comes apart into W_Q, W_K, W_V of the right heads.
    H, d_head, d_model = 3, 2, 4
    qkv = torch.zeros(3 * H * d_head, d_model)
    for h in range(H):
        for part in range(3):
            for r in range(d_head):
                qkv[(h * 3 + part) * d_head + r] = 100 * part + 10 * h + r
    dense = torch.zeros(d_model, H * d_head)
    W_Q, W_K, W_V, _ = layouts.split_heads(layouts.NEOX, [qkv, dense], H, H)
    for part, W in enumerate((W_Q, W_K, W_V)):
        assert W.shape == (H, d_model, d_head)
        for h in range(H):
            for r in range(d_head):
                assert bool((W[h, :, r] == 100 * part + 10 * h + r).all())


# --- Malformed files -----------------------------------------------------------------------------
def test_kv_heads_that_do_not_split_the_heads(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "llama", n_heads=4, n_kv_heads=2)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match=r"4 query heads do not split evenly over 3 key/value heads"):
        load(path)


def test_kv_projection_of_the_wrong_size_is_named(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "llama", n_heads=4, n_kv_heads=2)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 4}))
    with pytest.raises(CheckpointError, match=r"tensor `model.layers.0.self_attn.k_proj.weight` has shape \(8, 16\); "
                                              r"expected \(16, 16\) \(\(n_kv_heads d_head, d_model\), nn.Linear \(out, in\)\)"):
        load(path)


def test_sharded_index_problems_are_named(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "a", "llama", sharded=True)
    index = json.loads(path.read_text())
    victim = next(iter(index["weight_map"].values()))
    (path.parent / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"to the shard {victim}, which is missing"):
        load(path)
    path, _ = tiny_checkpoint(tmp_path / "b", "llama", sharded=True)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match=r"index file could not be read as JSON"):
        load(path.parent)  # the directory finds its index
    path.write_text(json.dumps({"weight_map": {}}))
    with pytest.raises(CheckpointError, match=r"no `weight_map`"):
        load(path)
    path, _ = tiny_checkpoint(tmp_path / "c", "llama", sharded=True)
    index = json.loads(path.read_text())
    name, file = next(iter(index["weight_map"].items()))
    other = next(f for f in index["weight_map"].values() if f != file)
    index["weight_map"][name] = other
    path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"maps `{name}` to {other}, which does not hold it"):
        load(path)


def test_non_finite_attention_weight_is_named_when_read(tmp_path):
    path, w = tiny_checkpoint(tmp_path, "neox", untied=True)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    tensors["gpt_neox.layers.1.attention.dense.weight"][2, 3] = float("nan")
    save_file(tensors, str(path))
    weights = load(path)  # loading reads the embeddings only
    with pytest.raises(CheckpointError, match=r"tensor `gpt_neox.layers.1.attention.dense.weight` holds 1 non-finite"):
        analyze(weights)


def test_an_empty_config_value_falls_back(tmp_path):
    # num_key_value_heads: null (as some configs write it) means multi-head attention.
    path, w = tiny_checkpoint(tmp_path, "llama", untied=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_key_value_heads": None}))
    assert load(path).n_kv_heads == w["W_Q"].shape[1]


def test_layouts_table_covers_every_layout():
    assert set(layouts.LAYOUTS) == {"gpt2", "bert", "llama", "neox"}
    assert set(layouts.LAYOUT_NAMES) == {"gpt2", "bert", "llama", "neox", "gguf", "random"}
    with pytest.raises(CheckpointError, match="more than one embedding"):
        layouts.detect_layout({"wte.weight", "model.embed_tokens.weight"})


def test_head_dim_config_needs_the_number_of_heads(tmp_path):
    # head_dim x num_attention_heads != d_model (Gemma-like): the count comes from the config only.
    path, _ = tiny_checkpoint(tmp_path, "llama", n_heads=4, n_kv_heads=2, d_head=6)
    config = json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(ValueError, match=r"`n_heads` \(--n-heads\) is 2 but .*config.json says 4; drop the flag"):
        load(path, n_heads=2)
    del config["num_attention_heads"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"config.json gives `head_dim` but no `num_attention_heads`; add it"):
        load(path)
