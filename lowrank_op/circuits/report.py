"""The outputs of ``lowrank_op circuits``: a text table, CSV, JSON and PNG plots of a CircuitReport.

matplotlib is an optional dependency (``pip install "lowrank_op[plots]"``), imported only by
:func:`write_plots`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import torch

from lowrank_op.circuits.analysis import CircuitReport
from lowrank_op.circuits.composition import MODES, pairs
from lowrank_op.circuits.layouts import LAYOUT_NAMES
from lowrank_op.circuits.weights import AttentionWeights

CSV_NAME = "circuits.csv"
JSON_NAME = "circuits.json"
TOKENS_NAME = "tokens.csv"
COMPOSITION_NAME = "composition.csv"
COMPOSITION_PLOT_NAMES = {mode: f"composition_{mode}.png" for mode in MODES}
TOKENS_COLUMNS = ("layer", "head", "direction", "singular_value", "side", "rank", "token_id", "token", "weight")
COMPOSITION_COLUMNS = ("mode", "src_layer", "src_head", "dst_layer", "dst_head", "score")
#: Tokens per side shown in the table's one-line summary of a head's top direction.
SUMMARY_TOKENS = 3
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
        "n_kv_heads": weights.n_kv_heads,
        "rotary": weights.rotary,
        "vocabulary": weights.vocab is not None,
        "dtype": str(weights.dtype).removeprefix("torch."),
        "weight_bytes": weights.nbytes,
    }


def _token_text(token_id: int, vocab: list[str] | None) -> str:
    return vocab[token_id] if vocab is not None else f"#{token_id}"


def direction_summary(report: CircuitReport, layer: int, head: int, vocab: list[str] | None) -> str:
    """``reads 'a' 'b' 'c' -> writes 'x' 'y' 'z'``: the top direction's first tokens per side."""
    d = report.directions
    reads = " ".join(repr(_token_text(int(t), vocab)) for t in d.reads_ids[layer, head, 0, :SUMMARY_TOKENS])
    writes = " ".join(repr(_token_text(int(t), vocab)) for t in d.writes_ids[layer, head, 0, :SUMMARY_TOKENS])
    return f"reads {reads} -> writes {writes}"


def format_table(report: CircuitReport, top_k: int, vocab: list[str] | None = None) -> str:
    """Two fixed-width tables (OV, then QK), one line per head; the OV table ends each line with
    its top direction's tokens (:func:`direction_summary`) when the report has directions."""
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
                line = (
                    f"{layer:>5} {head:>4}  {float(m.norm[layer, head]):>10.4e}  "
                    f"{float(m.effective_rank[layer, head]):>8.2f}  "
                    f"{float(m.eigenvalue_positivity[layer, head]):>+8.3f}  {top}"
                )
                if name == "ov" and report.directions is not None:
                    line += f"  | {direction_summary(report, layer, head, vocab)}"
                lines.append(line)
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


def token_rows(report: CircuitReport, vocab: list[str] | None) -> list[tuple]:
    """The rows of tokens.csv (:data:`TOKENS_COLUMNS`): per head, direction (1 = the largest
    singular value), side (``reads``, then ``writes``) and rank (1 = the largest entry)."""
    d = report.directions
    n_layers, n_heads, n_directions, n_tokens = d.reads_ids.shape
    rows = []
    for layer in range(n_layers):
        for head in range(n_heads):
            for i in range(n_directions):
                s = float(d.singular_values[layer, head, i])
                for side, ids, weights in (("reads", d.reads_ids, d.reads_weights), ("writes", d.writes_ids, d.writes_weights)):
                    for rank in range(n_tokens):
                        t = int(ids[layer, head, i, rank])
                        token = vocab[t] if vocab is not None else ""
                        rows.append((layer, head, i + 1, s, side, rank + 1, t, token, float(weights[layer, head, i, rank])))
    return rows


def write_tokens_csv(path: Path, report: CircuitReport, vocab: list[str] | None) -> None:
    """tokens.csv: :func:`token_rows` under a header of :data:`TOKENS_COLUMNS`; the ``token`` column
    holds the vocabulary's display form of each token
    (:func:`lowrank_op.circuits.vocab.display_token`, as the loader stores them), empty without one."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(TOKENS_COLUMNS)
        writer.writerows(token_rows(report, vocab))


def write_composition_csv(path: Path, scores: dict) -> None:
    """composition.csv: every pair of heads with ``src_layer < dst_layer``, per mode (``q``, ``k``, ``v``)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COMPOSITION_COLUMNS)
        for mode in MODES:
            writer.writerows((mode, *row[:4], "" if math.isnan(row[4]) else row[4]) for row in pairs(scores[mode]))


def write_json(path: Path, report: CircuitReport, weights: AttentionWeights, top_k: int, extra: dict) -> None:
    """The model, the definitions, ``extra`` (timing, memory, settings) and :func:`head_records`."""
    document = {
        "model": model_summary(weights),
        "definitions": {
            "ov_circuit": "W_E W_V W_O W_U",
            "qk_circuit": "W_E W_Q W_K^T W_E^T" + (
                ", position-free: the rotary embedding this model applies to queries and keys is left out, "
                "as TransformerLens computes it" if weights.rotary else ""),
            "norm": "Frobenius norm",
            "effective_rank": EFFECTIVE_RANK_DEFINITION,
            "copying_score": "OV circuit: " + POSITIVITY_DEFINITION,
            "eigenvalue_positivity": "QK circuit: " + POSITIVITY_DEFINITION,
            "grouped_query_attention": (f"{weights.n_heads} query heads share {weights.n_kv_heads} key/value heads: "
                                        f"query head h reads key/value head h // {weights.group}"),
            "directions": ("tokens.csv: each head's top OV singular directions u_i (reads: attended tokens) and "
                           "v_i (writes: logits raised), sign fixed so that v_i's entry of largest magnitude is "
                           "positive; the listed tokens are each vector's largest entries"),
            "composition": ("composition.csv: |W_OV^src W^dst|_F / (|W_OV^src|_F |W^dst|_F) with W^dst = W_Q W_K^T (q), "
                            "W_K W_Q^T (k) or W_V W_O (v), for src_layer < dst_layer (TransformerLens's composition_scores)"),
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


def write_composition_plots(out: Path, scores: dict, weights: AttentionWeights) -> list[Path]:
    """One heat map per mode (``composition_{q,k,v}.png``): source heads down, destination heads
    across, both ordered by layer then head, layer boundaries drawn; pairs not in an earlier
    layer (``src_layer >= dst_layer``) are blank. Empty list without matplotlib."""
    mpl = import_matplotlib()
    if mpl is None:
        return []
    Figure = mpl.figure.Figure
    L, H = weights.n_layers, weights.n_heads
    label = f"{LAYOUT_NAMES[weights.layout]} model ({L} layers x {H} heads)"
    titles = {"q": "Q-composition (into W_Q W_K^T)", "k": "K-composition (into W_K W_Q^T)", "v": "V-composition (into W_V W_O)"}
    written = []
    for mode in MODES:
        values = scores[mode].double().reshape(L * H, L * H).clone()
        layer = torch.arange(L).repeat_interleave(H)
        values[layer[:, None] >= layer[None, :]] = float("nan")  # only earlier -> later
        fig = Figure(figsize=(8.0, 7.0), layout="constrained")
        ax = fig.add_subplot()
        cmap = mpl.colormaps["viridis"].with_extremes(bad="white")
        finite = values[torch.isfinite(values)]
        vmax = float(finite.max()) if finite.numel() else 1.0
        image = ax.imshow(values.numpy(), cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        for boundary in range(1, L):
            ax.axhline(boundary * H - 0.5, color="0.3", lw=0.6)
            ax.axvline(boundary * H - 0.5, color="0.3", lw=0.6)
        step = max(1, L // 12)
        ticks = [l * H + (H - 1) / 2 for l in range(0, L, step)]
        ax.set_xticks(ticks, [str(l) for l in range(0, L, step)])
        ax.set_yticks(ticks, [str(l) for l in range(0, L, step)])
        ax.set_xlabel(f"destination head (by layer; {H} heads per layer)")
        ax.set_ylabel(f"source head (by layer; {H} heads per layer)")
        ax.set_title(f"{titles[mode]}\n{label}", fontsize=10)
        fig.colorbar(image, ax=ax, label="composition score", shrink=0.8)
        path = out / COMPOSITION_PLOT_NAMES[mode]
        fig.savefig(path, dpi=110)
        written.append(path)
    return written
