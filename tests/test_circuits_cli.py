"""The ``circuits`` command on bad input and its output lines: one ``error:`` line, nothing half-written.

Every failure is run twice: with ``--out`` absent (it must still be absent afterwards) and with
``--out`` an existing folder holding a file (it must be exactly as it was). No staging folder may
be left beside it either way.
"""

import json
import re
from pathlib import Path

import pytest
import torch

from lowrank_op.circuits import cli
from lowrank_op.circuits import report as circuit_report
from tiny_checkpoints import SHAPE, WRITERS, canonical_weights, join_safetensors, split_safetensors, write_checkpoint

BASE = ["circuits", "--no-progress", "--no-plots"]


def _run(argv, capsys) -> tuple[int, str, str]:
    """Exit status (from the return value or SystemExit), stdout, stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _snapshot(root: Path) -> dict:
    """Every path under ``root``'s parent, with file contents: shows what a run created or changed."""
    return {str(p.relative_to(root.parent)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.parent.rglob("*"))}


@pytest.fixture(params=["absent", "existing"])
def out_dir(request, tmp_path):
    """``--out``: absent, or an existing folder with a file in it; inside a folder of its own."""
    out = tmp_path / "place" / "out"
    out.parent.mkdir()
    if request.param == "existing":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    return out


def _gpt2_tensors(**changes) -> dict:
    tensors = WRITERS["gpt2"](canonical_weights(**SHAPE))
    tensors.update(changes)
    return tensors


def _nan_tensors():
    tensors = _gpt2_tensors()
    tensors["h.0.attn.c_proj.weight"][1, 2] = float("nan")
    return tensors


def _overflowing_tensors():
    tensors = _gpt2_tensors()
    tensors["wte.weight"] = tensors["wte.weight"] * 1e20
    return tensors


def _raw(change):
    """A writer of a malformed file: the valid tiny checkpoint's header and data, changed by ``change``."""

    def write(directory: Path) -> Path:
        valid = write_checkpoint(directory, _gpt2_tensors(), {"n_head": 2}, name="valid.safetensors")
        header, data = split_safetensors(valid)
        path = directory / "model.safetensors"
        path.write_bytes(change(header, data))
        return path

    return write


def _tensors(make):
    return lambda directory: write_checkpoint(directory, make(), {"n_head": 2})


INPUT_FAILURES = {
    "empty": (_raw(lambda h, d: b""), r"the file is empty"),
    "length-past-end": (_raw(lambda h, d: join_safetensors(h, d, length=2**40)), r"header length .* only \d+ bytes follow"),
    "not-json": (_raw(lambda h, d: join_safetensors(b"{nope", d)), r"its 5-byte header is not JSON"),
    "truncated-data": (_raw(lambda h, d: join_safetensors(h, d[:100])), r"runs past the end of the file"),
    "unknown-dtype": (_raw(lambda h, d: join_safetensors({**h, "wte.weight": {**h["wte.weight"], "dtype": "Q7"}}, d)),
                      r"`wte.weight` has dtype 'Q7', which is not a safetensors dtype"),
    "nan-weight": (_tensors(_nan_tensors), r"tensor `h.0.attn.c_proj.weight` holds 1 non-finite values"),
    "overflow": (_tensors(_overflowing_tensors), r"layer 0's OV circuits .*overflowed float32.*--dtype float64"),
    "stray-layer": (_tensors(lambda: _gpt2_tensors(**{"h.10000000.attn.c_attn.weight": torch.zeros(16, 48)})),
                    r"numbered 0-1, 10000000 \(e.g. `h.10000000.attn.c_attn.weight`\)"),
    "d_vocab-0": (_tensors(lambda: _gpt2_tensors(**{"wte.weight": torch.zeros(0, 16)})),
                  r"`wte.weight` has shape \(0, 16\); expected \(d_vocab, d_model\), both positive"),
    "d_model-0": (_tensors(lambda: _gpt2_tensors(**{"wte.weight": torch.zeros(40, 0)})), r"has shape \(40, 0\)"),
    "n-heads-mismatch": (_tensors(_gpt2_tensors), r"`n_heads` \(--n-heads\) is 4 but .*config.json says 2"),
}


@pytest.mark.parametrize("case", list(INPUT_FAILURES))
def test_input_failures_are_one_error_line_and_leave_out_as_it_was(tmp_path, capsys, out_dir, case):
    write, match = INPUT_FAILURES[case]
    path = write(tmp_path / "ckpt")
    before = _snapshot(out_dir)
    extra = ["--n-heads", "4"] if case == "n-heads-mismatch" else []
    code, out, err = _run(BASE + ["--weights", str(path), "--out", str(out_dir)] + extra, capsys)
    assert code == cli.EXIT_FAILURE == 1
    line = _error_line(err)
    assert line.startswith("lowrank_op circuits: error: ") and f"{path}: " in line
    assert re.search(match, line), line
    assert _snapshot(out_dir) == before


USAGE_ERRORS = {
    "seed-with-weights": (["--weights", "WEIGHTS", "--seed", "3"],
                          r"`--seed` applies to the built-in random model only; drop it or drop `--weights`"),
    "shape-with-weights": (["--weights", "WEIGHTS", "--random-shape", "1,2,8,20"],
                           r"`--random-shape` applies to the built-in random model only"),
    "heads-do-not-divide": (["--random-shape", "1,3,16,50"],
                            r"--random-shape: must be a preset \(gpt2-small, gpt2-xl, llama3-8b\) or "
                            r"N_LAYERS,N_HEADS,D_MODEL,D_VOCAB: four positive integers, N_HEADS "
                            r"dividing D_MODEL .*got '1,3,16,50', whose N_HEADS 3 does not divide D_MODEL 16"),
    "three-fields": (["--random-shape", "1,2,8"], r"--random-shape: must be a preset .*N_LAYERS,N_HEADS,D_MODEL,D_VOCAB.*got '1,2,8'$"),
    "unknown-preset": (["--random-shape", "llama3-70b"], r"--random-shape: must be a preset .*got 'llama3-70b'$"),
    "zero-field": (["--random-shape", "1,2,8,0"], r"--random-shape: must be .*got '1,2,8,0'$"),
    "missing-weights": (["--weights", "MISSING"], r"no checkpoint at .*missing.safetensors"),
    "top-k-too-big": (["--random-shape", "1,2,8,20", "--top-k", "5"],
                      r"`--top-k` 5 exceeds the circuits' rank bound min\(d_head, d_vocab\) = 4"),
    "n-heads-without-weights": (["--n-heads", "4"], r"`--n-heads` applies to --weights only"),
    "negative-directions": (["--directions", "-1"], r"argument --directions: must be a non-negative integer, got -1$"),
    "text-directions": (["--directions", "three"], r"argument --directions: must be a non-negative integer, got 'three'$"),
    "zero-tokens": (["--tokens", "0"], r"argument --tokens: must be a positive integer, got 0$"),
}


@pytest.mark.parametrize("case", list(USAGE_ERRORS))
def test_usage_errors_exit_2_and_create_nothing(tmp_path, capsys, out_dir, case):
    extra, match = USAGE_ERRORS[case]
    weights = write_checkpoint(tmp_path / "ckpt", _gpt2_tensors(), {"n_head": 2})
    paths = {"WEIGHTS": str(weights), "MISSING": str(tmp_path / "missing.safetensors")}
    before = _snapshot(out_dir)
    code, _, err = _run(BASE + ["--out", str(out_dir)] + [paths.get(a, a) for a in extra], capsys)
    assert code == 2
    assert re.search(match, _error_line(err), flags=re.M)
    assert _snapshot(out_dir) == before


def test_a_failure_while_writing_leaves_nothing(tmp_path, capsys, out_dir, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(circuit_report, "write_json", full_disk)
    before = _snapshot(out_dir)
    code, out, err = _run(BASE + ["--random-shape", "1,2,8,20", "--out", str(out_dir)], capsys)
    assert code == 1
    assert re.search(r"error: cannot write the outputs to `--out` '.*out': No space left on device", _error_line(err))
    assert _snapshot(out_dir) == before and "wrote" not in out


def test_an_unreadable_checkpoint_is_one_error_line(tmp_path, capsys, monkeypatch):
    from lowrank_op.circuits import safetensors_format

    path = write_checkpoint(tmp_path / "ckpt", _gpt2_tensors(), {"n_head": 2})

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(safetensors_format, "read_safetensors_header", denied)
    code, _, err = _run(BASE + ["--weights", str(path), "--out", str(tmp_path / "out")], capsys)
    assert code == 1 and not (tmp_path / "out").exists()
    assert _error_line(err).endswith(f"error: {path}: cannot be read (Permission denied).")


def test_outputs_are_moved_into_place_on_success(tmp_path, capsys, out_dir):
    existed = out_dir.exists()
    code, out, _ = _run(BASE + ["--random-shape", "1,2,8,20", "--out", str(out_dir)], capsys)
    assert code == 0
    names = {circuit_report.CSV_NAME, circuit_report.JSON_NAME, circuit_report.TOKENS_NAME} | ({"keep.txt"} if existed else set())
    assert {p.name for p in out_dir.iterdir()} == names
    assert [p.name for p in out_dir.parent.iterdir()] == ["out"]  # no staging folder left beside it
    if existed:
        assert (out_dir / "keep.txt").read_text() == "mine"
    assert f"wrote {out_dir / circuit_report.CSV_NAME}" in out


def test_out_with_missing_parents_is_created_on_success_only(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "c"
    assert _run(BASE + ["--random-shape", "1,2,8,0", "--out", str(out)], capsys)[0] == 2
    assert not (tmp_path / "a").exists()
    assert _run(BASE + ["--random-shape", "1,2,8,20", "--out", str(out)], capsys)[0] == 0
    assert (out / circuit_report.CSV_NAME).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["a"]


# --- The closing lines ----------------------------------------------------------------------------------
WALL = re.compile(r"^wall time (\d+\.\d) s = loading (\d+\.\d) s \+ circuits (\d+\.\d) s (?:\+ composition (\d+\.\d) s )?"
                  r"\+ table and CSV (\d+\.\d) s \+ plots (\d+\.\d) s \+ other (\d+\.\d) s \(other: .*\) on \d+ threads$",
                  flags=re.M)


@pytest.mark.parametrize("composition", [False, True])
def test_wall_time_parts_add_up_and_json_timing_too(tmp_path, capsys, composition):
    code, out, _ = _run(BASE + ["--random-shape", "2,2,8,20", "--out", str(tmp_path)] + ["--composition"] * composition,
                        capsys)
    assert code == 0
    tenths = [round(float(x) * 10) for x in WALL.search(out).groups() if x is not None]
    assert tenths[0] == sum(tenths[1:])
    document = json.loads((tmp_path / circuit_report.JSON_NAME).read_text())
    timing = document["timing_s"]
    assert "add up to total_s" in document["timing_note"]
    parts = ["load_s", "analysis_s", "composition_s", "table_and_csv_s", "plots_s", "other_s"]
    assert ("composition" in WALL.search(out).group(0)) == composition
    assert all(timing[p] >= 0 for p in parts)
    assert sum(timing[p] for p in parts) == pytest.approx(timing["total_s"], rel=1e-12)


@pytest.mark.parametrize(
    "parts,total,expected",
    [
        ([("a", 0.04), ("b", 0.04), ("c", 0.04)], 0.13, "0.1 s = a 0.0 s + b 0.1 s + c 0.0 s + other 0.0 s"),
        ([("a", 1.0), ("b", 50.6)], 53.9, "53.9 s = a 1.0 s + b 50.6 s + other 2.3 s"),
    ],
)
def test_split_time_rounds_so_the_printed_parts_add_up(parts, total, expected):
    assert cli._split_time(parts, total) == expected


@pytest.mark.parametrize(
    "n,text",
    [(0, "0 B"), (512, "512 B"), (4160, "4.06 KiB"), (7552 * 2**10, "7.38 MiB"), (int(1.5 * 2**30), "1.5 GiB"),
     (999 * 2**20, "999 MiB"), (1023 * 2**20, "1023 MiB"), (None, "n/a")],
)
def test_sizes_keep_three_significant_digits(n, text):
    assert cli._size(n) == text


def test_memory_line_on_a_tiny_model_gives_no_ratio(tmp_path, capsys):
    code, out, _ = _run(BASE + ["--random-shape", "1,2,8,20", "--out", str(tmp_path)], capsys)
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("increase during analysis"))
    assert " x " not in line and "0.0 MiB" not in line
    # W_E: 20 x 8 float32 = 640 B; weights: (20 x 8 + 4 x 2 x 8 x 4) float32 = 1664 B
    assert re.search(r"W_E \(640 B, factorised once for every head\) and the weights used \(1.62 KiB\) are below "
                     r"16 MiB, too small for a ratio", line), line


def test_memory_line_gives_the_ratios_it_can():
    from lowrank_op.circuits.checkpoints import random_weights

    weights = random_weights(n_layers=1, n_heads=2, d_model=8, d_vocab=20)
    line = cli._memory_line(3 * 2**30, True, weights)
    assert line.startswith("increase during analysis: 3 GiB; W_E (640 B, factorised once for every head) and the weights")
    big = random_weights(n_layers=1, n_heads=1, d_model=64, d_vocab=2**16)  # W_E: 16 MiB; 16.06 MiB of weights
    line = cli._memory_line(2**25, False, big)
    assert line == ("increase during analysis: 32 MiB (peak counter could not be reset: includes loading) = 2.00 x "
                    "W_E (16 MiB, factorised once for every head) = 1.99 x the weights used (16.1 MiB)")


# --- The plots --------------------------------------------------------------------------------------
def test_head_styles_differ_for_forty_heads():
    styles = [tuple(circuit_report.head_style(h).values()) for h in range(40)]
    assert len(set(styles)) == 40


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib Figures ``write_plots`` saves, by file name."""
    mpl = pytest.importorskip("matplotlib")
    import matplotlib.figure

    figures = {}
    original = matplotlib.figure.Figure.savefig

    def keep(self, path, *args, **kwargs):
        figures[Path(path).name] = self
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(mpl.figure.Figure, "savefig", keep)
    return figures


def _spectra_axes(figure):
    return [ax for ax in figure.axes if ax.get_visible()]


@pytest.mark.parametrize("zero", [False, True], ids=["random", "all-zero"])
def test_spectra_plots_use_one_stated_scale_and_distinct_lines(tmp_path, saved_figures, zero):
    import dataclasses

    from lowrank_op.circuits.checkpoints import random_weights
    from lowrank_op.circuits.analysis import analyze

    n_layers, n_heads = (1, 2) if zero else (2, 12)
    weights = random_weights(n_layers=n_layers, n_heads=n_heads, d_model=2 * n_heads, d_vocab=30)
    if zero:
        weights = weights.replace(W_E=torch.zeros_like(weights.W_E), W_U=torch.zeros(2 * n_heads, 30))
    circuit_report.write_plots(tmp_path, analyze(weights), weights)
    for name in circuit_report.SPECTRA_NAMES.values():
        axes = _spectra_axes(saved_figures[name])
        assert len(axes) == n_layers
        assert {ax.get_yscale() for ax in axes} == {"linear" if zero else "log"}
        assert axes[0].get_ylabel() == ("singular value s_i (linear: all are 0)" if zero else
                                        "singular value s_i (log scale)")
        looks = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in axes[0].get_lines()}
        assert len(looks) == n_heads
        legend = saved_figures[name].legends[0]
        assert [t.get_text() for t in legend.get_texts()] == [f"head {h}" for h in range(n_heads)]


def test_the_library_never_imports_the_application():
    # lowrank_op.circuits (the command, its readers and their optional extras) is imported only
    # by whoever asks for it: `import lowrank_op` and every library module leave it out.
    import subprocess
    import sys

    code = ("import sys, lowrank_op, lowrank_op.scipy_bridge, lowrank_op.gpytorch_kernels, lowrank_op.solves; "
            "print(sorted(m for m in sys.modules if m.startswith('lowrank_op.circuits')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
