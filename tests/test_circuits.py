"""lowrank_op.circuits and the ``circuits`` command: every number against dense float64 circuits.

The tiny checkpoints (tests/tiny_checkpoints.py) are written in GPT-2 and BERT layouts from weights
in TransformerLens's shapes; the references form ``W_E W_V W_O W_U`` and ``W_E W_Q W_K^T W_E^T``
densely in float64 from those weights, independently of the reader.
"""

import csv
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lowrank_op import FactoredMatrix
from lowrank_op.circuits import cli
from lowrank_op.circuits import report as circuit_report
from lowrank_op.circuits.checkpoints import load_safetensors, random_weights
from lowrank_op.circuits.analysis import analyze, effective_rank, eigenvalue_positivity, ov_circuit, qk_circuit
from tiny_checkpoints import SHAPE, dense_reference, tiny_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: (rtol, atol) per computation dtype; atol is relative to the largest norm for norms and singular
#: values, absolute for effective ranks, and 10 x absolute for the O(1) scores. Errors seen: 5e-7
#: (float32) and 4e-14 (float64) relative.
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14)}
LAYOUTS = [("gpt2", "transformer.", False), ("gpt2", "", True), ("bert", "", False), ("bert", "bert.", True)]
LAYOUT_IDS = ["gpt2-tied", "gpt2-untied", "bert-tied", "bert-untied"]


@pytest.fixture(scope="module")
def checkpoints_dir(tmp_path_factory):
    """The four tiny checkpoints, written once: {layout id: (path, canonical weights)}."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {i: tiny_checkpoint(root / i, layout, prefix, untied=untied)
            for i, (layout, prefix, untied) in zip(LAYOUT_IDS, LAYOUTS)}


# --- Building the circuits ----------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["ov", "qk"])
def test_circuits_are_factored_and_equal_the_dense_product(checkpoints_dir, which):
    path, w = checkpoints_dir["gpt2-untied"]
    weights = load_safetensors(path, dtype=torch.float64)
    build = ov_circuit if which == "ov" else qk_circuit
    every = build(weights)
    L, H, d_head, V = weights.n_layers, weights.n_heads, weights.d_head, weights.d_vocab
    assert isinstance(every, FactoredMatrix) and every.shape == (L, H, V, V) and every.mdim == d_head
    for layer in range(L):
        one = build(weights, layer)
        assert one.shape == (H, V, V) and one.mdim == d_head
        torch.testing.assert_close(one.to_dense(), every.to_dense()[layer])
        for head in range(H):
            if which == "ov":
                M = w["W_E"] @ w["W_V"][layer, head] @ w["W_O"][layer, head] @ w["W_U"]
            else:
                M = w["W_E"] @ w["W_Q"][layer, head] @ w["W_K"][layer, head].T @ w["W_E"].T
            torch.testing.assert_close(one.to_dense()[head], M)


def test_analysis_never_forms_a_vocab_by_vocab_matrix(checkpoints_dir, monkeypatch):
    path, _ = checkpoints_dir["bert-tied"]
    weights = load_safetensors(path)

    def refuse(self):
        raise AssertionError(f"to_dense() called on a FactoredMatrix of shape {tuple(self.shape)}")

    monkeypatch.setattr(FactoredMatrix, "to_dense", refuse)
    analyze(weights)


# --- Every reported number against dense float64 --------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", LAYOUT_IDS)
def test_every_number_matches_the_dense_float64_circuit(checkpoints_dir, case, dtype):
    path, w = checkpoints_dir[case]
    rtol, atol = TOLERANCES[dtype]
    report = analyze(load_safetensors(path, dtype=dtype))
    ref = dense_reference(w)
    d_head = SHAPE["d_model"] // SHAPE["n_heads"]
    for name in ("ov", "qk"):
        got, want = getattr(report, name), ref[name]
        scale = want["norm"].max()
        torch.testing.assert_close(got.norm.double(), want["norm"], rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(got.singular_values.double(), want["singular_values"][..., :d_head],
                                   rtol=rtol, atol=atol * scale)
        torch.testing.assert_close(got.effective_rank.double(), want["effective_rank"], rtol=rtol, atol=atol)
        torch.testing.assert_close(got.eigenvalue_positivity.double(), want["positivity"], rtol=rtol, atol=10 * atol)


# --- The measures themselves ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "S,expected",
    [([3.0], 1.0), ([2.0, 2.0, 2.0, 2.0], 4.0), ([1.0, 1.0, 0.0, 0.0], 2.0), ([0.0, 0.0], 0.0),
     ([1.0, 0.5], math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))))],
)
def test_effective_rank_values(S, expected):
    assert float(effective_rank(torch.tensor(S, dtype=torch.float64))) == pytest.approx(expected, rel=1e-12)


@given(st.lists(st.floats(0.0, 1e3), min_size=1, max_size=20), st.floats(1e-3, 1e3))
def test_effective_rank_is_scale_invariant_and_bounded(values, c):
    S = torch.tensor(values, dtype=torch.float64)
    rank = float(effective_rank(S))
    nonzero = int((S > 0).sum())
    if nonzero == 0:
        assert rank == 0.0
    else:
        assert 1.0 - 1e-9 <= rank <= nonzero + 1e-9
        assert float(effective_rank(c * S)) == pytest.approx(rank, rel=1e-9)


@pytest.mark.parametrize(
    "matrix,expected",
    [(torch.eye(3), 1.0), (-torch.eye(3), -1.0), (torch.tensor([[0.0, -1.0], [1.0, 0.0]]), 0.0),
     (torch.diag(torch.tensor([3.0, -1.0])), 0.5)],
    ids=["identity", "minus-identity", "rotation", "mixed"],
)
def test_eigenvalue_positivity_values(matrix, expected):
    assert float(eigenvalue_positivity(torch.linalg.eigvals(matrix.double()))) == pytest.approx(expected, abs=1e-12)


def test_eigenvalue_positivity_of_zero_is_nan():
    assert math.isnan(float(eigenvalue_positivity(torch.zeros(3, dtype=torch.complex128))))


# --- The command, end to end ---------------------------------------------------------------------------
def _run(argv, capsys) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", ["gpt2-tied", "bert-untied"])
def test_cli_writes_csv_and_json_equal_to_the_dense_reference(checkpoints_dir, tmp_path, capsys, case):
    path, w = checkpoints_dir[case]
    code, out, err = _run(["circuits", "--weights", str(path), "--out", str(tmp_path), "--top-k", "3",
                           "--dtype", "float64", "--no-plots", "--no-progress"], capsys)
    assert code == 0
    ref = dense_reference(w)
    L, H = SHAPE["n_layers"], SHAPE["n_heads"]

    with open(tmp_path / circuit_report.CSV_NAME, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["layer"]), int(r["head"])) for r in rows] == [(l, h) for l in range(L) for h in range(H)]
    assert list(rows[0]) == ["layer", "head", "ov_norm", "ov_effective_rank", "ov_copying_score", "ov_s1", "ov_s2",
                             "ov_s3", "qk_norm", "qk_effective_rank", "qk_eigenvalue_positivity", "qk_s1", "qk_s2",
                             "qk_s3"]
    document = json.loads((tmp_path / circuit_report.JSON_NAME).read_text())
    assert document["model"]["n_layers"] == L and document["model"]["n_heads"] == H
    assert document["model"]["tied_unembedding"] == (case == "gpt2-tied")
    assert document["settings"]["top_k"] == 3 and "Roy & Vetterli" in document["definitions"]["effective_rank"]
    assert set(document["memory"]) >= {"peak_rss_bytes", "rss_after_loading_bytes", "analysis_peak_increase_bytes",
                                       "one_layer_circuit_factor_bytes", "weight_bytes"}
    for row, record in zip(rows, document["heads"]):
        layer, head = int(row["layer"]), int(row["head"])
        assert (record["layer"], record["head"]) == (layer, head)
        for name, score in (("ov", "copying_score"), ("qk", "eigenvalue_positivity")):
            want = {key: ref[name][key][layer, head] for key in ref[name]}
            expected = [float(want["norm"]), float(want["effective_rank"]), float(want["positivity"])]
            from_csv = [float(row[f"{name}_norm"]), float(row[f"{name}_effective_rank"]), float(row[f"{name}_{score}"])]
            from_json = [record[name]["norm"], record[name]["effective_rank"], record[name][score]]
            assert from_csv == pytest.approx(expected, rel=1e-9, abs=1e-12)
            assert from_json == from_csv
            top = [float(row[f"{name}_s{i}"]) for i in (1, 2, 3)]
            assert top == pytest.approx(want["singular_values"][:3].tolist(), rel=1e-9)
            assert record[name]["top_singular_values"] == top
    assert out.count("\n    1    1 ") == 2  # a line for layer 1, head 1 in each of the two tables
    assert "highest OV copying scores" in out and "wall time" in out and "peak memory" in out
    assert "increase during analysis" in out


def test_cli_random_model_at_tiny_shape_is_seeded(tmp_path, capsys):
    argv = ["circuits", "--random-shape", "2,3,12,30", "--no-plots", "--no-progress", "--seed", "3"]
    assert _run(argv + ["--out", str(tmp_path / "a")], capsys)[0] == 0
    assert _run(argv + ["--out", str(tmp_path / "b")], capsys)[0] == 0
    a = (tmp_path / "a" / circuit_report.CSV_NAME).read_text()
    assert a == (tmp_path / "b" / circuit_report.CSV_NAME).read_text()
    assert len(a.splitlines()) == 1 + 2 * 3
    report = analyze(random_weights(n_layers=2, n_heads=3, d_model=12, d_vocab=30, seed=3))
    first = next(csv.DictReader(a.splitlines()))
    assert float(first["ov_norm"]) == float(report.ov.norm[0, 0])


def test_cli_plots_are_png_files(checkpoints_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path, _ = checkpoints_dir["bert-tied"]
    code, out, _ = _run(["circuits", "--weights", str(path), "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    names = [circuit_report.HEATMAP_NAME, *circuit_report.SPECTRA_NAMES.values()]
    from matplotlib.image import imread

    for name in names:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        assert imread(tmp_path / name).shape[2] in (3, 4), name
        assert name in out


def test_cli_without_matplotlib_says_how_to_install_and_continues(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert circuit_report.import_matplotlib() is None
    code, _, err = _run(["circuits", "--random-shape", "1,2,8,20", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    assert "pip install matplotlib" in err and "lowrank_op[plots]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([circuit_report.CSV_NAME, circuit_report.JSON_NAME, circuit_report.TOKENS_NAME])


def test_cli_no_plots_writes_no_png(tmp_path, capsys):
    assert _run(["circuits", "--random-shape", "1,2,8,20", "--out", str(tmp_path), "--no-plots", "--no-progress"],
                capsys)[0] == 0
    assert not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize("tqdm_installed", [True, False])
def test_cli_progress_with_and_without_tqdm(tmp_path, capsys, monkeypatch, tqdm_installed):
    if tqdm_installed:
        pytest.importorskip("tqdm")
    else:
        monkeypatch.setitem(sys.modules, "tqdm", None)
    code, _, err = _run(["circuits", "--random-shape", "2,2,8,20", "--out", str(tmp_path), "--no-plots"], capsys)
    assert code == 0
    if tqdm_installed:
        assert "2/2" in err
    else:
        assert "layer 1/2 done" in err and "layer 2/2 done" in err and "pip install tqdm" in err


# --- Errors before any work ---------------------------------------------------------------------------
@pytest.fixture
def no_loading(monkeypatch):
    """Make loading (or drawing) weights fail loudly, to show an error came before any work."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(cli.checkpoints, "load_safetensors", refuse)
    monkeypatch.setattr(cli.checkpoints, "random_weights", refuse)
    monkeypatch.setattr(cli.analysis, "analyze", refuse)


def _out_dirs(tmp_path: Path) -> dict:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    return {"under-a-file": blocker / "out", "is-a-file": blocker}


@pytest.mark.parametrize("which", ["under-a-file", "is-a-file"])
@pytest.mark.parametrize("with_weights", [False, True])
def test_unwritable_out_fails_before_loading(checkpoints_dir, tmp_path, capsys, no_loading, which, with_weights):
    out = _out_dirs(tmp_path)[which]
    argv = ["circuits", "--out", str(out)] + (["--weights", str(checkpoints_dir["gpt2-tied"][0])] if with_weights else [])
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"`--out` '{out}' is not a writable directory" in err and "pass a directory you can write to" in err


def test_read_only_out_fails_before_loading(tmp_path, capsys, no_loading):
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only directories")
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    with pytest.raises(SystemExit):
        cli.main(["circuits", "--out", str(out)])
    assert "is not a writable directory" in capsys.readouterr().err


def test_python_dash_m_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "lowrank_op", "circuits", "--random-shape", "1,2,8,20", "--out", str(tmp_path),
         "--no-plots", "--no-progress", "--threads", "1"],
        capture_output=True, text=True, cwd=tmp_path, env={"PYTHONPATH": str(root), "PATH": ""}, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "wall time" in result.stdout and (tmp_path / circuit_report.CSV_NAME).is_file()


def test_zero_circuits_give_null_scores_in_json_and_empty_cells_in_csv(tmp_path):
    w = random_weights(n_layers=1, n_heads=2, d_model=8, d_vocab=20)
    W_V = w.W_V.clone()
    W_V[0, 1] = 0.0  # head 1's OV circuit is the zero matrix
    weights = w.replace(W_V=W_V)
    report = analyze(weights)
    assert float(report.ov.norm[0, 1]) == 0.0 and float(report.ov.effective_rank[0, 1]) == 0.0
    circuit_report.write_json(tmp_path / "c.json", report, weights, 2, {})
    circuit_report.write_csv(tmp_path / "c.csv", report, 2)
    record = json.loads((tmp_path / "c.json").read_text())["heads"][1]
    assert record["ov"]["copying_score"] is None and record["ov"]["norm"] == 0.0
    assert record["qk"]["eigenvalue_positivity"] is not None
    with open(tmp_path / "c.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["ov_copying_score"] == "" and rows[0]["ov_copying_score"] != ""


def test_top_copying_heads_orders_scores_and_puts_undefined_ones_last():
    from lowrank_op.circuits.report import top_copying_heads
    from lowrank_op.circuits.analysis import CircuitMetrics, CircuitReport

    scores = torch.tensor([[0.2, float("nan")], [0.9, -0.5]])
    metrics = CircuitMetrics(torch.ones(2, 2), torch.ones(2, 2, 3), torch.ones(2, 2), scores)
    top = top_copying_heads(CircuitReport(ov=metrics, qk=metrics), n=4)
    assert [(layer, head) for layer, head, _ in top] == [(1, 0), (0, 0), (1, 1), (0, 1)]
    assert [score for _, _, score in top[:3]] == pytest.approx([0.9, 0.2, -0.5])
    assert math.isnan(top[3][2])


# --- The norm comes from the singular values ------------------------------------------------------------
def test_norm_is_taken_from_the_singular_values_without_another_factorisation(checkpoints_dir, monkeypatch):
    from lowrank_op import kernels

    path, w = checkpoints_dir["gpt2-untied"]
    weights = load_safetensors(path, dtype=torch.float64)

    def refuse(*args, **kwargs):
        raise AssertionError("the norm was computed by a second factorisation")

    monkeypatch.setattr(kernels, "frobenius_norm", refuse)
    monkeypatch.setattr(FactoredMatrix, "norm", refuse)
    report = analyze(weights)
    ref = dense_reference(w)
    eps = torch.finfo(torch.float64).eps
    for name in ("ov", "qk"):
        want = ref[name]["norm"]
        torch.testing.assert_close(getattr(report, name).norm, want, rtol=100 * eps, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_norm_from_singular_values_is_scaled_against_overflow(dtype):
    from lowrank_op.circuits.analysis import frobenius_norm_from_singular_values as norm_of

    big = torch.finfo(dtype).max / 4
    S = torch.tensor([[big, big, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, 0.0]], dtype=dtype)
    got = norm_of(S)
    expected = torch.tensor([float(big) * math.sqrt(2), 5.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert norm_of(torch.zeros(2, 0, dtype=dtype)).shape == (2,)


# --- Non-finite weights and overflow ----------------------------------------------------------------------
def test_analyze_names_non_finite_weights():
    w = random_weights(n_layers=2, n_heads=2, d_model=8, d_vocab=20)
    W_V = w.W_V.clone()
    W_V[1, 0, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"`W_V` \(W_V\[1\]\) holds NaN or infinity in layer 1"):
        analyze(w.replace(W_V=W_V))
    with pytest.raises(ValueError, match=r"`W_E` \(W_E\) holds NaN or infinity; the circuits"):
        analyze(w.replace(W_E=torch.full_like(w.W_E, float("inf")), W_U=w.W_U))


def _scaled_checkpoint(directory, embed_scale, attn_scale=1.0):
    """The tiny GPT-2 checkpoint with its embedding and attention weights scaled (float32)."""
    from tiny_checkpoints import WRITERS, canonical_weights, write_checkpoint

    tensors = WRITERS["gpt2"](canonical_weights(**SHAPE))
    tensors["wte.weight"] = tensors["wte.weight"] * embed_scale
    for i in range(SHAPE["n_layers"]):
        tensors[f"h.{i}.attn.c_attn.weight"] = tensors[f"h.{i}.attn.c_attn.weight"] * attn_scale
    return write_checkpoint(directory, tensors, {"n_head": SHAPE["n_heads"]})


@pytest.mark.parametrize(
    "embed_scale,attn_scale,match",
    [
        # factors of about 1e20 are finite in float32, their 8 x 8 core (about 1e40) is not
        (1e20, 1.0, r"layer 0's OV circuits W_E W_V W_O W_U \(from `wte.weight`, `h.0.attn.c_attn.weight`, "
                    r"`h.0.attn.c_proj.weight`\): the (singular values|eigenvalues) overflowed float32|"
                    r"layer 0's OV circuits .*: the decomposition failed .*the factors are finite, so their product overflowed "
                    r"float32"),
        # a factor of about 1e40 is not
        (1e20, 1e20, r"layer 0's OV circuits .*: the factor W_E W_V overflowed float32 \(it holds NaN or infinity "
                     r"although the weights are finite\); compute in float64 \(--dtype float64\)"),
    ],
    ids=["core", "factor"],
)
def test_overflow_is_named_and_float64_avoids_it(tmp_path, embed_scale, attn_scale, match):
    from lowrank_op.errors import NonFiniteResultError

    path = _scaled_checkpoint(tmp_path, embed_scale, attn_scale)
    with pytest.raises(NonFiniteResultError, match=match):
        analyze(load_safetensors(path))
    report = analyze(load_safetensors(path, dtype=torch.float64))
    assert bool(torch.isfinite(report.ov.singular_values).all()) and bool(torch.isfinite(report.qk.norm).all())


# --- The shared bases: one QR of W_E, d_model-sized work per layer --------------------------------------
RANDOM_SHAPE = {"n_layers": 2, "n_heads": 3, "d_model": 24, "d_vocab": 97}  # d_head 8; distinct sizes


def _random_model(tied: bool, dtype=torch.float32, seed=0):
    """A seeded random model; untied: with its own random W_U (d_model, d_vocab)."""
    w = random_weights(**RANDOM_SHAPE, seed=seed, dtype=dtype)
    if tied:
        return w
    gen = torch.Generator().manual_seed(seed + 1)
    W_U = (torch.randn(w.d_model, w.d_vocab, generator=gen, dtype=torch.float64) * 0.02).to(dtype)
    return w.replace(W_U=W_U, tied=False)


def _as_float64(w):
    W_E = w.W_E.double()
    return w.replace(W_E=W_E, W_Q=w.W_Q.double(), W_K=w.W_K.double(), W_V=w.W_V.double(),
                               W_O=w.W_O.double(), W_U=W_E.T if w.tied else w.W_U.double())


def _dense_float64(w) -> dict:
    """Per circuit: the top d_head singular values (L, H, d_head) and the norms (L, H) of the dense circuits."""
    w = _as_float64(w)
    out = {}
    for name in ("ov", "qk"):
        M = (w.W_E @ w.W_V @ w.W_O @ w.W_U) if name == "ov" else (w.W_E @ w.W_Q @ w.W_K.mT @ w.W_E.T)
        out[name] = (torch.linalg.svdvals(M)[..., :w.d_head], torch.linalg.matrix_norm(M))
    return out


def _value_tolerance(dtype, S_max):
    """Absolute tolerance for singular values (and norms) of one head, from the dtype's eps and the
    problem's scale: the rounding errors of the products and QRs, summed over ``d_model`` terms,
    grow like ``sqrt(d_model) eps`` relative to the head's largest singular value ``S_max``."""
    return 8 * torch.finfo(dtype).eps * math.sqrt(RANDOM_SHAPE["d_model"]) * S_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_shared_bases_analysis_matches_dense_float64(tied, dtype):
    w = _random_model(tied, dtype)
    report = analyze(w)
    ref = _dense_float64(w)
    for name in ("ov", "qk"):
        got, (S, norm) = getattr(report, name), ref[name]
        tol = _value_tolerance(dtype, S[..., :1])
        assert ((got.singular_values.double() - S).abs() <= tol).all(), name
        assert ((got.norm.double() - norm).abs() <= tol[..., 0]).all(), name
        if dtype == torch.float32:  # the requirement on float32: within 1e-5 relative of float64
            assert float(((got.singular_values.double() - S) / S).abs().max()) < 1e-5, name
            assert float(((got.norm.double() - norm) / norm).abs().max()) < 1e-5, name


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_shared_bases_analysis_equals_the_formed_path(tied):
    """analyze against circuit_metrics on the formed factors (W_E W_V, W_O W_U), both in float32."""
    from lowrank_op.circuits.analysis import circuit_metrics

    w = _random_model(tied)
    report = analyze(w)
    for name in ("ov", "qk"):
        for layer in range(w.n_layers):
            if name == "ov":
                formed = FactoredMatrix(w.W_E @ w.W_V[layer], w.W_O[layer] @ w.W_U)
            else:
                formed = FactoredMatrix(w.W_E @ w.W_Q[layer], w.W_K[layer].mT @ w.W_E.T)
            want, got = circuit_metrics(formed), getattr(report, name)
            tol = 2 * _value_tolerance(torch.float32, want.singular_values[..., :1])  # two float32 paths
            assert ((got.singular_values[layer] - want.singular_values).abs() <= tol).all()
            assert ((got.norm[layer] - want.norm).abs() <= tol[..., 0]).all()
            assert ((got.effective_rank[layer] - want.effective_rank).abs()
                    <= 2 * _value_tolerance(torch.float32, want.effective_rank)).all()
            assert ((got.eigenvalue_positivity[layer] - want.eigenvalue_positivity).abs()
                    <= 2 * _value_tolerance(torch.float32, torch.ones(()))).all()


def test_circuit_metrics_of_the_lazy_circuits_use_the_bases_and_match_analyze(monkeypatch):
    from lowrank_op.circuits.analysis import circuit_metrics
    from lowrank_op.outer_factored import OuterFactoredMatrix

    w = _random_model(tied=False, dtype=torch.float64)
    report = analyze(w)

    def refuse(self):
        raise AssertionError("a formed factor was read")

    monkeypatch.setattr(OuterFactoredMatrix, "_A", property(refuse))
    monkeypatch.setattr(OuterFactoredMatrix, "_B", property(refuse))
    eps = torch.finfo(torch.float64).eps
    for name, build in (("ov", ov_circuit), ("qk", qk_circuit)):
        got = circuit_metrics(build(w, 1))
        want = getattr(report, name)
        torch.testing.assert_close(got.singular_values, want.singular_values[1], rtol=100 * eps, atol=0)
        torch.testing.assert_close(got.eigenvalue_positivity, want.eigenvalue_positivity[1], rtol=0, atol=100 * eps)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_w_e_is_factorised_once_and_w_u_only_when_untied(tied, monkeypatch):
    from lowrank_op import shared_bases

    factorised = []
    original = shared_bases._factorise

    def counting(X, method, want_q):
        factorised.append(tuple(X.shape))
        return original(X, method, want_q)

    monkeypatch.setattr(shared_bases, "_factorise", counting)
    w = _random_model(tied)  # fresh tensors: nothing of them is cached yet
    analyze(w)
    V, D = w.d_vocab, w.d_model
    assert factorised == [(V, D)] * (1 if tied else 2)


class _TensorsSeen(TorchDispatchMode):
    """Records the shape and storage size (bytes) of every tensor an aten op produces; a view's
    storage is its base's, so the sizes are those of real allocations."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.seen.append((func, tuple(leaf.shape), leaf.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("batch", ["all-layers", "one-layer"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_analysis_never_allocates_a_vocab_by_head_tensor(tied, batch, monkeypatch):
    """Nothing (n_heads, d_vocab, d_head)-like: no tensor has both a d_vocab-sized and a d_head-sized
    dim, and no allocation is larger than W_E (the QR's workspace)."""
    from lowrank_op.circuits import analysis as circuits

    if batch == "one-layer":
        monkeypatch.setattr(circuits, "BATCH_MIN_ELEMENTS", 0)
    w = _random_model(tied)
    V, d_head = w.d_vocab, w.d_head
    W_E_bytes = w.W_E.numel() * w.W_E.element_size()
    with _TensorsSeen() as mode:
        analyze(w)
    offending = [(func, shape) for func, shape, nbytes in mode.seen
                 if (V in shape and d_head in shape) or nbytes > W_E_bytes]
    assert not offending, offending[:5]
    assert any(V in shape for _, shape, _ in mode.seen)  # the QR of W_E was seen


def test_overflowing_closing_product_is_named():
    from lowrank_op.errors import NonFiniteResultError

    w = _random_model(tied=False)
    big = w.replace(W_E=w.W_E * 1e21, W_U=w.W_U * 1e21)  # W_U W_E is about 1e39
    with pytest.raises(NonFiniteResultError, match=r"the OV circuits W_E W_V W_O W_U \(from `W_E`, `W_U`\): "
                                                    r"the product W_U W_E overflowed float32"):
        analyze(big)


def test_layer_batches_give_the_numbers_of_one_layer_at_a_time(monkeypatch):
    from lowrank_op.circuits import analysis as circuits

    w = _random_model(tied=False)
    assert len(circuits._layer_batches(w)) == 1  # a small model goes in one batch
    batched = analyze(w)
    monkeypatch.setattr(circuits, "BATCH_MIN_ELEMENTS", 0)
    assert [(b.start, b.stop) for b in circuits._layer_batches(w)] == [(0, 1), (1, 2)]
    seen = []
    one_by_one = analyze(w, on_layer=seen.append)
    assert seen == [0, 1]
    for name in ("ov", "qk"):
        got, want = getattr(batched, name), getattr(one_by_one, name)
        tol = _value_tolerance(torch.float32, want.singular_values[..., :1])
        assert ((got.singular_values - want.singular_values).abs() <= tol).all()
        assert ((got.norm - want.norm).abs() <= tol[..., 0]).all()
        assert ((got.eigenvalue_positivity - want.eigenvalue_positivity).abs()
                <= _value_tolerance(torch.float32, torch.ones(()))).all()


def test_overflow_in_one_layer_of_a_batch_names_that_layer():
    from lowrank_op.errors import NonFiniteResultError

    w = _random_model(tied=True)
    W_V, W_O = w.W_V.clone(), w.W_O.clone()
    W_V[1] *= 1e37  # finite factors (about 1e35), whose core (about 1e70) is not
    W_O[1] *= 1e37
    with pytest.raises(NonFiniteResultError, match=r"^layer 1's OV circuits W_E W_V W_O W_U \(from `W_E`, `W_V\[1\]`, "
                                                    r"`W_O\[1\]`, `W_U`\): the "):
        analyze(w.replace(W_V=W_V, W_O=W_O))
