"""tokens.csv (what each head reads and writes) and composition.csv (how heads compose), through the
command, against dense float64 on tiny checkpoints; the --random-shape presets."""

from __future__ import annotations

import csv
import itertools

import pytest
import torch
from tiny_checkpoints import tiny_checkpoint

from lowrank_op.circuits import cli, composition
from lowrank_op.circuits import report as circuit_report
from lowrank_op.circuits.checkpoints import RANDOM_PRESETS
from lowrank_op.circuits.weights import random_weights

VOCAB = [f"tok{i}" for i in range(40)]


def run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """A tiny Llama-layout checkpoint with GQA (4 query heads, 2 key/value heads), untied, and a vocab.txt."""
    root = tmp_path_factory.mktemp("gqa")
    path, w = tiny_checkpoint(root, "llama", n_heads=4, n_kv_heads=2, untied=True, n_layers=3)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return path, w


def dense_ov(w, layer, head):
    group = w["W_Q"].shape[1] // w["W_K"].shape[1]
    return w["W_E"] @ w["W_V"][layer, head // group] @ w["W_O"][layer, head] @ w["W_U"]


def test_tokens_csv_matches_dense_float64(gqa_checkpoint, tmp_path, capsys):
    path, w = gqa_checkpoint
    code, out, _ = run(["circuits", "--weights", str(path), "--out", str(tmp_path), "--directions", "2", "--tokens", "4",
                        "--no-progress", "--no-plots"], capsys)
    assert code == 0
    with open(tmp_path / circuit_report.TOKENS_NAME, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == circuit_report.TOKENS_COLUMNS
        rows = list(reader)
    L, H = w["W_Q"].shape[:2]
    assert len(rows) == L * H * 2 * 2 * 4
    table = {(int(r["layer"]), int(r["head"]), int(r["direction"]), r["side"], int(r["rank"])): r for r in rows}
    for layer, head in itertools.product(range(L), range(H)):
        U, S, Vh = torch.linalg.svd(dense_ov(w, layer, head))
        for i in range(2):
            u, v = U[:, i], Vh[i]
            sign = torch.sign(v[v.abs().argmax()])
            for side, vector in (("reads", u * sign), ("writes", v * sign)):
                top = torch.topk(vector, 4)
                for rank in range(4):
                    row = table[(layer, head, i + 1, side, rank + 1)]
                    token_id = int(top.indices[rank])
                    assert int(row["token_id"]) == token_id, (layer, head, i, side, rank)
                    assert row["token"] == VOCAB[token_id]
                    assert float(row["weight"]) == pytest.approx(float(top.values[rank]), abs=1e-5)
                    assert float(row["singular_value"]) == pytest.approx(float(S[i]), rel=1e-5)
    # the table summarises each head's top direction with its first tokens
    first = table[(0, 0, 1, "reads", 1)]["token"]
    assert f"| reads '{first}'" in out


def test_tokens_without_a_vocabulary_are_ids(tmp_path, capsys):
    code, out, _ = run(["circuits", "--random-shape", "1,2,8,20", "--out", str(tmp_path), "--tokens", "3", "--no-progress",
                        "--no-plots"], capsys)
    assert code == 0
    with open(tmp_path / circuit_report.TOKENS_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["token"] == "" for r in rows) and {r["side"] for r in rows} == {"reads", "writes"}
    assert "| reads '#" in out


def test_no_directions_writes_no_tokens_csv(tmp_path, capsys):
    code, _, _ = run(["circuits", "--random-shape", "1,2,8,20", "--out", str(tmp_path), "--directions", "0",
                      "--no-progress", "--no-plots"], capsys)
    assert code == 0 and not (tmp_path / circuit_report.TOKENS_NAME).exists()


def dense_composition(w, mode, src, dst):
    """TransformerLens's composition score of source head src = (l1, h1) into dst = (l2, h2), dense float64."""
    group = w["W_Q"].shape[1] // w["W_K"].shape[1]
    (l1, h1), (l2, h2) = src, dst
    OV = w["W_V"][l1, h1 // group] @ w["W_O"][l1, h1]
    QK = w["W_Q"][l2, h2] @ w["W_K"][l2, h2 // group].T
    right = {"q": QK, "k": QK.T, "v": w["W_V"][l2, h2 // group] @ w["W_O"][l2, h2]}[mode]
    norm = torch.linalg.matrix_norm
    return float(norm(OV @ right) / (norm(OV) * norm(right)))


def test_composition_csv_matches_dense_float64(gqa_checkpoint, tmp_path, capsys):
    path, w = gqa_checkpoint
    code, out, _ = run(["circuits", "--weights", str(path), "--out", str(tmp_path), "--composition", "--no-progress"],
                       capsys)
    assert code == 0
    with open(tmp_path / circuit_report.COMPOSITION_NAME, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == circuit_report.COMPOSITION_COLUMNS
        rows = list(reader)
    L, H = w["W_Q"].shape[:2]
    n_pairs = sum(H * H for l1 in range(L) for l2 in range(l1 + 1, L))
    assert len(rows) == 3 * n_pairs
    for row in rows:
        src, dst = (int(row["src_layer"]), int(row["src_head"])), (int(row["dst_layer"]), int(row["dst_head"]))
        assert src[0] < dst[0]
        assert float(row["score"]) == pytest.approx(dense_composition(w, row["mode"], src, dst), rel=1e-5)
    for mode in composition.MODES:
        assert (tmp_path / circuit_report.COMPOSITION_PLOT_NAMES[mode]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_composition_equals_transformer_lens_on_the_same_factors():
    # lowrank_op.circuits.composition against the TransformerLens algorithm (bench.baselines) on
    # a random multi-head model: OV against QK, QK^T and OV, every head with every head.
    from bench.baselines import tl_composition_scores

    weights = random_weights(n_layers=3, n_heads=2, d_model=16, d_vocab=30, seed=5)
    scores = composition.composition(weights)
    W_Q, W_K, W_V, W_O = (getattr(weights, k) for k in ("W_Q", "W_K", "W_V", "W_O"))
    rights = {"q": (W_Q, W_K.mT), "k": (W_K, W_Q.mT), "v": (W_V, W_O)}
    for mode, (A, B) in rights.items():
        expected = tl_composition_scores(W_V, W_O, A, B)
        torch.testing.assert_close(scores[mode], expected, rtol=1e-5, atol=1e-6)


def test_presets_parse_to_their_shapes():
    assert cli._random_shape("llama3-8b") == {"n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "d_model": 4096,
                                              "d_head": 128, "d_vocab": 128256, "untied": True}
    assert cli._random_shape("gpt2-xl") == RANDOM_PRESETS["gpt2-xl"]
    assert cli._random_shape("2,2,8,20") == {"n_layers": 2, "n_heads": 2, "d_model": 8, "d_vocab": 20}
    # a preset with GQA builds a GQA model (here at a tiny shape with the same options)
    tiny = {**RANDOM_PRESETS["llama3-8b"], "n_layers": 1, "d_model": 32, "d_head": 4, "d_vocab": 50}
    weights = random_weights(**tiny)
    assert (weights.n_heads, weights.n_kv_heads, weights.d_head, weights.tied) == (32, 8, 4, False)
