"""lowrank_op.circuits.checkpoints: reading GPT-2 and BERT layouts, the number of heads, the random model, errors."""

import json
import sys

import pytest
import torch

from lowrank_op.circuits import checkpoints, safetensors_format
from lowrank_op.circuits.checkpoints import (
    AttentionWeights,
    CheckpointError,
    load_safetensors,
    random_weights,
    read_safetensors_header,
    resolve_n_heads,
)
from tiny_checkpoints import (
    SHAPE,
    WRITERS,
    canonical_weights,
    join_safetensors,
    split_safetensors,
    tiny_checkpoint,
    write_checkpoint,
)

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
    path = write_checkpoint(tmp_path, {"model.tok_embeddings.weight": torch.zeros(4, 2), "output.weight": torch.zeros(4, 2)})
    with pytest.raises(CheckpointError, match=r"no layout lowrank_op reads") as info:
        load_safetensors(path)
    message = str(info.value)
    for name in ("`wte.weight`", "`h.{i}.attn.c_attn.weight`", "`h.{i}.attn.c_proj.weight`",
                 "`embeddings.word_embeddings.weight`", "`encoder.layer.{i}.attention.self.query.weight`",
                 "`encoder.layer.{i}.attention.output.dense.weight`", "`embed_tokens.weight`",
                 "`layers.{i}.self_attn.q_proj.weight`", "`embed_in.weight`",
                 "`layers.{i}.attention.query_key_value.weight`", "model.tok_embeddings.weight"):
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
    with pytest.raises(CheckpointError, match=r"`h.0.attn.c_proj.weight` has dtype I32; expected a real floating "
                                              r"dtype \(F16, BF16, F32, F64"):
        load_safetensors(path)


def test_checkpoint_error_lives_in_errors_and_is_a_value_error():
    from lowrank_op import errors

    assert CheckpointError is errors.CheckpointError and issubclass(CheckpointError, ValueError)


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
        AttentionWeights.from_tensors(**{**w, "W_O": w["W_O"].mT}, layout="gpt2", source="x", tied=True)


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


# --- Malformed files: each named, from the header, before safetensors sees the file -------------------
def _valid_file(tmp_path):
    path, _ = tiny_checkpoint(tmp_path / "valid", "gpt2")
    return path


def _entry(header: dict, name: str = "wte.weight") -> dict:
    return header[name]


MALFORMED = {
    "empty": (lambda h, d: b"", r"the file is empty \(0 bytes\)"),
    "truncated-length": (lambda h, d: b"\x10\x00\x00", r"the file is 3 bytes long, too short for the 8-byte header length"),
    "length-past-end": (lambda h, d: join_safetensors(h, d, length=10**12),
                        r"header length in the first 8 bytes is 1000000000000 bytes, but only \d+ bytes follow"),
    "not-json": (lambda h, d: join_safetensors(b"{not json" + b" " * 40, d), r"its 49-byte header is not JSON"),
    "not-utf8": (lambda h, d: join_safetensors(b"\xff\xfe{}", d), r"its 4-byte header is not JSON"),
    "json-list": (lambda h, d: join_safetensors(b"[1, 2]", d), r"its header is JSON but a list, not an object"),
    "entry-not-tensor": (lambda h, d: join_safetensors({**h, "wte.weight": [1]}, d),
                         r"the header's entry `wte.weight` is not a tensor description"),
    "unknown-dtype": (lambda h, d: join_safetensors({**h, "wte.weight": {**_entry(h), "dtype": "F128"}}, d),
                      r"tensor `wte.weight` has dtype 'F128', which is not a safetensors dtype \(BOOL, U8"),
    "bad-shape": (lambda h, d: join_safetensors({**h, "wte.weight": {**_entry(h), "shape": [40, -16]}}, d),
                  r"tensor `wte.weight` has shape \[40, -16\] in the header; expected a list of non-negative"),
    "bad-offsets": (lambda h, d: join_safetensors({**h, "wte.weight": {**_entry(h), "data_offsets": [9, 3]}}, d),
                    r"tensor `wte.weight` has data_offsets \[9, 3\] in the header; expected \[begin, end\]"),
    "truncated-data": (lambda h, d: join_safetensors(h, d[: len(d) // 2]),
                       r"data \(bytes \d+ to \d+ after the header\) runs past the end of the file, which holds "
                       r"\d+ bytes of data; the file is truncated"),
    "size-mismatch": (lambda h, d: join_safetensors({**h, "wte.weight": {**_entry(h), "shape": [40, 15]}}, d),
                      r"tensor `wte.weight` of shape \(40, 15\) and dtype F32 takes 2400 bytes, but its "
                      r"data_offsets span 2560"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_safetensors_files_are_named(tmp_path, case):
    header, data = split_safetensors(_valid_file(tmp_path))
    make, match = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(header, data))
    with pytest.raises(CheckpointError, match=match):
        read_safetensors_header(path)
    with pytest.raises(CheckpointError, match=match):
        load_safetensors(path)


def test_header_above_the_size_limit_is_refused(tmp_path, monkeypatch):
    header, data = split_safetensors(_valid_file(tmp_path))
    path = tmp_path / "big.safetensors"
    path.write_bytes(join_safetensors(header, data))
    monkeypatch.setattr(safetensors_format, "MAX_HEADER_BYTES", 64)
    with pytest.raises(CheckpointError, match=r"bytes, above safetensors' limit of 64"):
        read_safetensors_header(path)


def test_what_only_safetensors_refuses_is_translated(tmp_path):
    valid = _valid_file(tmp_path)
    header, data = split_safetensors(valid)
    first, second = sorted((e for k, e in header.items() if k != "__metadata__"), key=lambda e: e["data_offsets"])[:2]
    second["data_offsets"] = first["data_offsets"][:]  # overlaps: sizes agree, so only safetensors notices
    second["shape"], second["dtype"] = first["shape"], first["dtype"]
    path = valid.parent / "overlap.safetensors"  # beside config.json
    path.write_bytes(join_safetensors(header, data))
    with pytest.raises(CheckpointError, match=r"safetensors cannot read the file: .*invalid offset"):
        load_safetensors(path)


def test_header_entries_and_metadata(tmp_path):
    header, data = split_safetensors(_valid_file(tmp_path))
    path = tmp_path / "valid" / "with_metadata.safetensors"
    path.write_bytes(join_safetensors({"__metadata__": {"format": "pt"}, **header}, data))
    got = read_safetensors_header(path)
    assert "__metadata__" not in got and set(got) == set(header)
    assert got["wte.weight"].dtype == "F32" and got["wte.weight"].shape == (40, 16)
    assert load_safetensors(path).d_vocab == 40


# --- Layer numbering ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stray,match",
    [
        ("h.10000000.attn.c_attn.weight", r"numbered 0-1, 10000000 \(e.g. `h.10000000.attn.c_attn.weight`\), so these "
                                          r"are missing: 2-9999999"),
        # an index this large proves nothing is allocated or looped over up to it
        ("h.1000000000000000000000000000000.ln_1.weight", r"numbered 0-1, 1000000000000000000 \(e.g. `h.10{30}.ln_1"),
        ("h.3.attn.c_proj.weight", r"numbered 0-1, 3 .* missing: 2\. Remove or renumber"),
    ],
)
def test_layers_must_be_numbered_from_zero_without_gaps(tmp_path, stray, match):
    tensors = WRITERS["gpt2"](canonical_weights(**SHAPE))
    tensors[stray] = torch.zeros(16, 16)
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=match):
        load_safetensors(path)


def test_layers_missing_at_the_start_are_listed(tmp_path):
    tensors = {k.replace("h.0.", "h.5.").replace("h.1.", "h.9."): v for k, v in WRITERS["gpt2"](canonical_weights(**SHAPE)).items()}
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=r"2 layers are numbered 5, 9 .* missing: 0-4, 6-8\."):
        load_safetensors(path)


# --- Empty dims -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(0, 16), (40, 0)], ids=["d_vocab-0", "d_model-0"])
def test_empty_embedding_is_refused(tmp_path, shape):
    tensors = WRITERS["gpt2"](canonical_weights(**SHAPE))
    tensors["wte.weight"] = torch.zeros(shape)
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=rf"`wte.weight` has shape \({shape[0]}, {shape[1]}\); expected "
                                              r"\(d_vocab, d_model\), both positive"):
        load_safetensors(path)


def test_resolve_n_heads_refuses_zero_width():
    with pytest.raises(ValueError, match=r"`d_model` must be a positive integer, got 0"):
        resolve_n_heads(0)


# --- Non-finite weights -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_weights_are_named(tmp_path, dtype, bad):
    tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in WRITERS["gpt2"](canonical_weights(**SHAPE)).items()}
    tensors["h.1.attn.c_attn.weight"][3, 5] = bad
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    nan = int(bad != bad)
    with pytest.raises(CheckpointError, match=rf"tensor `h.1.attn.c_attn.weight` holds 1 non-finite values \({nan} NaN, "
                                              rf"{1 - nan} infinite; the first at index \(3, 5\)\)"):
        load_safetensors(path).read(1, 2)  # attention weights are read, and checked, by layer


def test_values_overflowing_the_computation_dtype_are_named(tmp_path):
    tensors = {k: v.double() for k, v in WRITERS["gpt2"](canonical_weights(**SHAPE)).items()}
    tensors["wte.weight"][0, 0] = 1e300
    path = write_checkpoint(tmp_path, tensors, {"n_head": 2})
    with pytest.raises(CheckpointError, match=r"tensor `wte.weight` \(float64\) holds values up to 1e\+300 in magnitude, "
                                              r"which overflow float32 \(largest 3.4e\+38\); compute in float64"):
        load_safetensors(path, dtype=torch.float32)
    assert float(load_safetensors(path, dtype=torch.float64).W_E[0, 0]) == 1e300


@pytest.mark.parametrize("layout,prefix", [("gpt2", "transformer."), ("bert", "")])
def test_tensor_names_are_kept_for_messages(tmp_path, layout, prefix):
    path, _ = tiny_checkpoint(tmp_path, layout, prefix)
    names = load_safetensors(path).tensor_names
    assert set(names) == {"W_E", "W_Q", "W_K", "W_V", "W_O", "W_U"}
    assert names["W_V"].format(i=1) in read_safetensors_header(path)
    assert names["W_U"] == names["W_E"]  # tied
