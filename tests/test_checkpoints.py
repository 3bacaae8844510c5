"""lowrank_op.checkpoints: reading GPT-2 and BERT layouts, the number of heads, the random model, errors."""

import json
import sys

import pytest
import torch

from lowrank_op import checkpoints
from lowrank_op.checkpoints import AttentionWeights, CheckpointError, load_safetensors, random_weights, resolve_n_heads
from tiny_checkpoints import SHAPE, WRITERS, canonical_weights, tiny_checkpoint, write_checkpoint

LAYOUT_CASES = [
    ("gpt2", ""), ("gpt2", "transformer."), ("bert", ""), ("bert", "bert."),
]


@pytest.mark.parametrize("untied", [False, True], ids=["tied", "untied"])
@pytest.mark.parametrize("layout,prefix", LAYOUT_CASES)
def test_load_gives_transformer_lens_shapes_and_values(tmp_path, layout, prefix, untied):
    path, w = tiny_checkpoint(tmp_path, layout, prefix, untied=untied)
    got = load_safetensors(path, dtype=torch.float64)
    assert got.layout == layout and got.tied == (not untied)
    assert (got.n_layers, got.n_heads, got.d_model, got.d_vocab) == tuple(SHAPE.values())
    assert got.d_head == SHAPE["d_model"] // SHAPE["n_heads"]
    for name in ("W_E", "W_Q", "W_K", "W_V", "W_O", "W_U"):
        torch.testing.assert_close(getattr(got, name), w[name], rtol=0, atol=0, msg=name)
    weight_tensors = [got.W_E, got.W_Q, got.W_K, got.W_V, got.W_O] + ([got.W_U] if untied else [])
    assert got.nbytes == sum(t.numel() * 8 for t in weight_tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_load_casts_to_dtype_and_accepts_a_directory(tmp_path, dtype):
    tiny_checkpoint(tmp_path, "gpt2")
    got = load_safetensors(tmp_path, dtype=dtype)
    assert {t.dtype for t in (got.W_E, got.W_Q, got.W_O, got.W_U)} == {dtype}


def test_load_widens_16_bit_checkpoints(tmp_path):
    w = canonical_weights(**SHAPE)
    tensors = {k: v.to(torch.bfloat16) for k, v in WRITERS["bert"](w).items() if v.is_floating_point()}
    path = write_checkpoint(tmp_path, tensors, {"num_attention_heads": 2})
    got = load_safetensors(path)
    assert got.W_Q.dtype == torch.float32
    torch.testing.assert_close(got.W_E, w["W_E"].to(torch.bfloat16).float())


# --- The number of heads ----------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["n_head", "num_attention_heads"])
def test_n_heads_comes_from_config_json(tmp_path, key):
    w = canonical_weights(**{**SHAPE, "n_heads": 4})
    path = write_checkpoint(tmp_path, WRITERS["gpt2"](w), {key: 4})
    got = load_safetensors(path)
    assert got.n_heads == 4 and got.d_head == 4 and "config.json" in got.n_heads_source


def test_n_heads_flag_is_used_without_config(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "bert", config=False)
    got = load_safetensors(path, n_heads=2)
    assert got.n_heads == 2 and got.n_heads_source == "--n-heads"


def test_n_heads_default_is_d_model_over_64(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "gpt2", config=False, n_heads=2, d_model=128, d_vocab=20, n_layers=1)
    got = load_safetensors(path)
    assert (got.n_heads, got.d_head) == (2, 64) and "default" in got.n_heads_source


@pytest.mark.parametrize(
    "d_model,n_heads,config,match",
    [
        (16, None, None, r"cannot infer the number of heads: d_model 16 .* pass `--n-heads`"),
        (16, 3, None, r"`n_heads` = 3 \(from --n-heads\) does not divide d_model 16"),
        (16, 4, {"n_head": 2}, r"`n_heads` \(--n-heads\) is 4 but .*config.json says 2"),
        (16, None, {"n_head": 5}, r"`n_heads` = 5 \(from .*config.json\) does not divide d_model 16"),
        (16, 0, None, r"`n_heads` \(--n-heads\) must be a positive integer, got 0"),
        (16, None, {"num_attention_heads": "12"}, r"`num_attention_heads` must be a positive integer, got '12'"),
    ],
)
def test_n_heads_errors(tmp_path, d_model, n_heads, config, match):
    weights_path = tmp_path / "model.safetensors"
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=match):
        resolve_n_heads(d_model, n_heads, weights_path)


def test_unreadable_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config.json could not be read as JSON"):
        resolve_n_heads(16, None, tmp_path / "model.safetensors")


# --- Errors ------------------------------------------------------------------------------------------
def test_unknown_layout_lists_the_names_looked_for(tmp_path):
    path = write_checkpoint(tmp_path, {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match=r"no layout lowrank_op reads") as info:
        load_safetensors(path)
    message = str(info.value)
    for name in ("`wte.weight`", "`h.{i}.attn.c_attn.weight`", "`h.{i}.attn.c_proj.weight`",
                 "`embeddings.word_embeddings.weight`", "`encoder.layer.{i}.attention.self.query.weight`",
                 "`encoder.layer.{i}.attention.output.dense.weight`", "model.embed_tokens.weight"):
        assert name in message


@pytest.mark.parametrize(
    "layout,prefix,drop",
    [
        ("gpt2", "", "h.1.attn.c_proj.weight"),
        ("gpt2", "transformer.", "transformer.h.0.attn.c_attn.weight"),
        ("bert", "", "encoder.layer.1.attention.self.key.weight"),
        ("bert", "bert.", "bert.encoder.layer.0.attention.output.dense.weight"),
    ],
)
def test_missing_tensor_is_named(tmp_path, layout, prefix, drop):
    tensors = WRITERS[layout](canonical_weights(**SHAPE), prefix)
    del tensors[drop]
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=rf"lacks `{drop.replace('.', '[.]')}`"):
        load_safetensors(path)


@pytest.mark.parametrize(
    "layout,name,shape,match",
    [
        ("gpt2", "h.1.attn.c_attn.weight", (16, 32), r"`h.1.attn.c_attn.weight` has shape \(16, 32\); expected \(16, 48\)"),
        ("gpt2", "h.0.attn.c_proj.weight", (8, 16), r"`h.0.attn.c_proj.weight` has shape \(8, 16\); expected \(16, 16\)"),
        ("gpt2", "lm_head.weight", (40, 8), r"`lm_head.weight` has shape \(40, 8\); expected \(40, 16\)"),
        ("bert", "encoder.layer.0.attention.self.value.weight", (16, 8), r"value.weight` has shape \(16, 8\); expected \(16, 16\)"),
        ("bert", "embeddings.word_embeddings.weight", (640,), r"word_embeddings.weight` has shape \(640,\); expected \(d_vocab, d_model\)"),
    ],
)
def test_misshapen_tensor_is_named_with_the_shape_expected(tmp_path, layout, name, shape, match):
    tensors = WRITERS[layout](canonical_weights(**SHAPE), "", untied=True)
    tensors[name] = torch.zeros(shape)
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=match):
        load_safetensors(path)


def test_non_float_tensor_is_refused(tmp_path):
    tensors = WRITERS["gpt2"](canonical_weights(**SHAPE))
    tensors["h.0.attn.c_proj.weight"] = torch.zeros(16, 16, dtype=torch.int32)
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=r"`h.0.attn.c_proj.weight` has dtype torch.int32"):
        load_safetensors(path)


def test_two_models_in_one_file_are_refused(tmp_path):
    tensors = {**WRITERS["gpt2"](canonical_weights(**SHAPE)), **WRITERS["bert"](canonical_weights(**SHAPE))}
    with pytest.raises(CheckpointError, match=r"more than one embedding matrix: `wte.weight`, `embeddings"):
        load_safetensors(write_checkpoint(tmp_path, tensors))


def test_embeddings_without_layers_are_refused(tmp_path):
    path = write_checkpoint(tmp_path, {"wte.weight": torch.zeros(40, 16)})
    with pytest.raises(CheckpointError, match=r"no layers: no tensor named like `h.0.attn.c_attn.weight`"):
        load_safetensors(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no checkpoint at .*nope.safetensors"):
        load_safetensors(tmp_path / "nope.safetensors")


def test_missing_safetensors_says_how_to_install(tmp_path, monkeypatch):
    path, _ = tiny_checkpoint(tmp_path, "gpt2")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install safetensors .*lowrank_op\[weights\]"):
        load_safetensors(path)


def test_attention_weights_checks_shapes():
    w = canonical_weights(**SHAPE)
    with pytest.raises(ValueError, match=r"`W_O` must have shape \(2, 2, 8, 16\) .* got \(2, 2, 16, 8\)"):
        AttentionWeights(**{**w, "W_O": w["W_O"].mT}, layout="gpt2", source="x", tied=True)


# --- The random model -------------------------------------------------------------------------------
def test_random_model_defaults_to_gpt2_small_shapes():
    assert checkpoints.GPT2_SMALL_SHAPE == {"n_layers": 12, "n_heads": 12, "d_model": 768, "d_vocab": 50257}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_model_is_seeded_and_tied(dtype):
    a = random_weights(n_layers=2, n_heads=3, d_model=12, d_vocab=30, seed=1, dtype=dtype)
    b = random_weights(n_layers=2, n_heads=3, d_model=12, d_vocab=30, seed=1, dtype=dtype)
    c = random_weights(n_layers=2, n_heads=3, d_model=12, d_vocab=30, seed=2, dtype=dtype)
    assert (a.n_layers, a.n_heads, a.d_model, a.d_head, a.d_vocab) == (2, 3, 12, 4, 30)
    assert a.tied and a.W_U.data_ptr() == a.W_E.data_ptr() and a.W_E.dtype == dtype
    assert torch.equal(a.W_Q, b.W_Q) and not torch.equal(a.W_Q, c.W_Q)
    assert abs(float(a.W_E.std()) - checkpoints.RANDOM_INIT_STD) < 0.005


@pytest.mark.parametrize(
    "kwargs,match",
    [({"n_heads": 5}, r"`n_heads` \(5\) must divide `d_model` \(12\)"),
     ({"d_vocab": 0}, r"`d_vocab` must be a positive integer, got 0")],
)
def test_random_model_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        random_weights(**{"n_layers": 1, "n_heads": 3, "d_model": 12, "d_vocab": 10, **kwargs})
