"""The outputs of ``lowrank_op circuits``: a text table, CSV, JSON and PNG plots of a CircuitReport.

matplotlib is an optional dependency (``pip install "lowrank_op[plots]"``), imported only by
:func:`write_plots`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from lowrank_op.circuits.checkpoints import LAYOUT_NAMES, AttentionWeights
from lowrank_op.circuits.analysis import CircuitReport

CSV_NAME = "circuits.csv"
JSON_NAME = "circuits.json"
HEATMAP_NAME = "copying_scores.png"
SPECTRA_NAMES = {"ov": "ov_spectra.png", "qk": "qk_spectra.png"}
EFFECTIVE_RANK_DEFINITION = (
    "entropy effective rank exp(H(p)), p = s / sum(s) over the circuit's d_head singular values "
    "(Roy & Vetterli 2007); between 1 and d_head"
)
POSITIVITY_DEFINITION = "sum(eig).real / sum(|eig|) over the circuit's non-zero eigenvalues; between -1 and 1"
#: Score names per circuit: the OV one is the copying score.
SCORE_NAMES = {"ov": "copying_score", "qk": "eigenvalue_positivity"}
#: The spectra's y axis: always a log scale (singular values span orders of magnitude, and one rule
#: for every model makes plots comparable); zeros cannot be drawn on it and are left out. Only
#: when no singular value is positive at all is the axis linear.
SPECTRA_Y_LABEL = {True: "singular value s_i (log scale)", False: "singular value s_i (linear: all are 0)"}
#: Heads are told apart by colour (matplotlib's qualitative "tab10" palette), then by line style
#: and marker when there are more than 10 heads.
HEAD_LINE_STYLES = ("-", "--", ":", "-.")
HEAD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
CIRCUIT_TITLES = {"ov": "OV circuits W_E W_V W_O W_U", "qk": "QK circuits W_E W_Q W_K^T W_E^T"}


def _number(x: float) -> float | None:
    """A float for JSON: NaN and infinities become None (JSON's null)."""
    x = float(x)
    return x if math.isfinite(x) else None


def head_records(report: CircuitReport, top_k: int) -> list[dict]:
    """One record per head (layer-major), as written to JSON.

    ``{"layer", "head", "ov": {...}, "qk": {...}}``, each circuit with ``norm``,
    ``top_singular_values`` (``top_k`` of them), ``effective_rank`` and its score
    (``copying_score`` for OV, ``eigenvalue_positivity`` for QK); NaN becomes None.
    """
    n_layers, n_heads = report.ov.norm.shape
    records = []
    for layer in range(n_layers):
        for head in range(n_heads):
            record: dict = {"layer": layer, "head": head}
            for name in ("ov", "qk"):
                m = getattr(report, name)
                record[name] = {
                    "norm": _number(m.norm[layer, head]),
                    "top_singular_values": [_number(s) for s in m.singular_values[layer, head, :top_k]],
                    "effective_rank": _number(m.effective_rank[layer, head]),
                    SCORE_NAMES[name]: _number(m.eigenvalue_positivity[layer, head]),
                }
            records.append(record)
    return records


def head_rows(report: CircuitReport, top_k: int) -> list[dict]:
    """:func:`head_records` flattened, the rows of the CSV file.

    Keys: ``layer, head``, then for ``c`` in ``ov, qk``: ``c_norm, c_effective_rank``, the
    score (``ov_copying_score`` / ``qk_eigenvalue_positivity``) and ``c_s1 ... c_s{top_k}``.
    """
    rows = []
    for record in head_records(report, top_k):
        row = {"layer": record["layer"], "head": record["head"]}
        for name in ("ov", "qk"):
            values = dict(record[name])
            top = values.pop("top_singular_values")
            row.update({f"{name}_{key}": value for key, value in values.items()})
            row.update({f"{name}_s{i + 1}": value for i, value in enumerate(top)})
        rows.append(row)
    return rows


def model_summary(weights: AttentionWeights) -> dict:
    """The model's description, as written to JSON."""
    return {
        "source": weights.source,
        "layout": weights.layout,
        "n_layers": weights.n_layers,
        "n_heads": weights.n_heads,
        "n_heads_from": weights.n_heads_source,
        "d_model": weights.d_model,
        "d_head": weights.d_head,
        "d_vocab": weights.d_vocab,
        "tied_unembedding": weights.tied,
        "dtype": str(weights.dtype).removeprefix("torch."),
        "weight_bytes": weights.nbytes,
    }


def format_table(report: CircuitReport, top_k: int) -> str:
    """Two fixed-width tables (OV, then QK), one line per head."""
    n_layers, n_heads = report.ov.norm.shape
    lines = []
    for name in ("ov", "qk"):
        m = getattr(report, name)
        score = "copying" if name == "ov" else "eig.pos."
        lines.append(f"{CIRCUIT_TITLES[name]}")
        header = f"{'layer':>5} {'head':>4}  {'norm':>10}  {'eff.rank':>8}  {score:>8}  top-{top_k} singular values"
        lines.append(header)
        lines.append("-" * max(len(header), 38 + 10 * top_k))
        for layer in range(n_layers):
            for head in range(n_heads):
                top = " ".join(f"{s:9.3e}" for s in m.singular_values[layer, head, :top_k].tolist())
                lines.append(
                    f"{layer:>5} {head:>4}  {float(m.norm[layer, head]):>10.4e}  "
                    f"{float(m.effective_rank[layer, head]):>8.2f}  "
                    f"{float(m.eigenvalue_positivity[layer, head]):>+8.3f}  {top}"
                )
        lines.append("")
    return "\n".join(lines)


def top_copying_heads(report: CircuitReport, n: int = 5) -> list[tuple[int, int, float]]:
    """The ``n`` heads with the highest OV copying score, as ``(layer, head, score)``; heads whose
    score is undefined (NaN: an all-zero circuit) come last and keep their NaN."""
    scores = report.ov.eigenvalue_positivity.flatten()
    n_heads = report.ov.eigenvalue_positivity.shape[1]
    order = scores.nan_to_num(nan=-math.inf).argsort(descending=True, stable=True)[:n].tolist()
    return [(i // n_heads, i % n_heads, float(scores[i])) for i in order]


def write_csv(path: Path, report: CircuitReport, top_k: int) -> None:
    """One row per head, columns as :func:`head_rows`; floats at full precision, NaN as an empty cell."""
    rows = head_rows(report, top_k)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_json(path: Path, report: CircuitReport, weights: AttentionWeights, top_k: int, extra: dict) -> None:
    """The model, the definitions, ``extra`` (timing, memory, settings) and :func:`head_records`."""
    document = {
        "model": model_summary(weights),
        "definitions": {
            "ov_circuit": "W_E W_V W_O W_U",
            "qk_circuit": "W_E W_Q W_K^T W_E^T",
            "norm": "Frobenius norm",
            "effective_rank": EFFECTIVE_RANK_DEFINITION,
            "copying_score": "OV circuit: " + POSITIVITY_DEFINITION,
            "eigenvalue_positivity": "QK circuit: " + POSITIVITY_DEFINITION,
        },
        **extra,
        "heads": head_records(report, top_k),
    }
    path.write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")


# --- Plots ----------------------------------------------------------------------------------------
def import_matplotlib():
    """The ``matplotlib`` module (with ``matplotlib.figure`` and ``.ticker`` loaded), or None when it is not installed."""
    try:
        import matplotlib
        import matplotlib.figure
        import matplotlib.ticker
    except ImportError:
        return None
    return matplotlib


def write_plots(out: Path, report: CircuitReport, weights: AttentionWeights) -> list[Path]:
    """The copying-score heat map and the OV and QK singular-value spectra, as PNG files.

    Returns the paths written, or an empty list when matplotlib is not installed.
    """
    mpl = import_matplotlib()
    if mpl is None:
        return []
    Figure = mpl.figure.Figure
    label = f"{LAYOUT_NAMES[weights.layout]} model ({weights.n_layers} layers x {weights.n_heads} heads, d_vocab {weights.d_vocab})"
    return [_heatmap(Figure, out / HEATMAP_NAME, report, label)] + [
        _spectra(mpl, out / SPECTRA_NAMES[name], getattr(report, name).singular_values, name, label)
        for name in ("ov", "qk")
    ]


def head_style(head: int, n_colors: int = 10) -> dict:
    """Line style of head ``head`` in the spectra: colour index, line style and marker.

    Heads 0-9 get the 10 colours with solid lines and the first marker; heads 10-19 the same
    colours, dashed, with the second marker; and so on, so no two of the first 40 heads look alike.
    """
    group = head // n_colors
    return {"color": head % n_colors, "linestyle": HEAD_LINE_STYLES[group % len(HEAD_LINE_STYLES)],
            "marker": HEAD_MARKERS[group % len(HEAD_MARKERS)]}


def _heatmap(Figure, path: Path, report: CircuitReport, label: str) -> Path:
    scores = report.ov.eigenvalue_positivity.double().numpy()
    n_layers, n_heads = scores.shape
    fig = Figure(figsize=(max(5.0, 0.6 * n_heads + 2.5), max(3.5, 0.45 * n_layers + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(scores, cmap="RdBu_r", vmin=-1.0, vmax=1.0, aspect="auto")
    if n_layers * n_heads <= 400:
        for layer in range(n_layers):
            for head in range(n_heads):
                value = scores[layer, head]
                ax.text(head, layer, "nan" if math.isnan(value) else f"{value:.2f}", ha="center", va="center",
                        fontsize=7, color="white" if abs(value) > 0.6 else "black")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"OV copying score, sum(eig) / sum(|eig|)\n{label}", fontsize=10)
    fig.colorbar(image, ax=ax, label="copying score")
    fig.savefig(path, dpi=110)
    return path


def _spectra(mpl, path: Path, singular_values, name: str, label: str) -> Path:
    Figure, cmap = mpl.figure.Figure, mpl.colormaps["tab10"]
    values = singular_values.double().numpy()
    n_layers, n_heads, k = values.shape
    ncols = min(4, n_layers)
    nrows = math.ceil(n_layers / ncols)
    fig = Figure(figsize=(3.4 * ncols + 1.8, 2.6 * nrows + 1.0), layout="constrained")
    axes = fig.subplots(nrows, ncols, sharex=True, sharey=True, squeeze=False)
    log_scale = bool((values > 0).any())
    shown = values.copy()
    if log_scale:
        shown[shown <= 0] = math.nan  # zeros have no place on a log axis: left out
        positive = values[values > 0]
        narrow = positive.max() < 10 * positive.min()  # within a decade: label the minor ticks too
        plain = mpl.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    marks = max(1, k // 8)  # about 8 markers per line, enough to tell the styles apart
    for layer, ax in enumerate(axes.flat):
        if layer >= n_layers:
            ax.set_visible(False)
            continue
        for head in range(n_heads):
            style = head_style(head)
            ax.plot(range(1, k + 1), shown[layer, head], color=cmap(style["color"]), linestyle=style["linestyle"],
                    marker=style["marker"], markevery=(head % marks, marks), markersize=3.5, lw=1.1,
                    label=f"head {head}")
        if log_scale:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            if narrow:
                ax.yaxis.set_minor_formatter(plain)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    for col in range(ncols):  # x labels under the lowest visible panel of each column
        lowest = axes[max(row for row in range(nrows) if row * ncols + col < n_layers), col]
        lowest.xaxis.set_tick_params(labelbottom=True)
        lowest.set_xlabel("index i")
    for ax in axes[:, 0]:
        ax.set_ylabel(SPECTRA_Y_LABEL[log_scale])
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", fontsize=7)
    fig.suptitle(f"Singular values of the {CIRCUIT_TITLES[name]}\n{label}", fontsize=10)
    fig.savefig(path, dpi=100)
    return path
