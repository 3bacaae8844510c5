"""The command line: ``python -m lowrank_op circuits`` (also installed as the ``lowrank_op`` script).

``circuits`` measures the full OV and QK circuits of every attention head of a transformer, layer
by layer, and writes a table (stdout), CSV, JSON and PNG plots; it ends with the wall time and the
peak memory. Run ``python -m lowrank_op circuits --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowrank_op import _memory, checkpoints, circuit_report, circuits

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Singular values reported per circuit unless --top-k says otherwise (fewer if d_head is smaller).
DEFAULT_TOP_K = 5
GIB = 2**30


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _random_shape(text: str) -> dict:
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"must be four positive integers N_LAYERS,N_HEADS,D_MODEL,D_VOCAB (e.g. 2,4,64,1000), got {text!r}"
        )
    return dict(zip(("n_layers", "n_heads", "d_model", "d_vocab"), values))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowrank_op", description="Tools built on lowrank_op.FactoredMatrix.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = commands.add_parser(
        "circuits",
        help="OV and QK circuit analysis of a transformer's attention heads, in bounded memory.",
        description=(
            "For every layer and head, build the full OV circuit W_E W_V W_O W_U and QK circuit "
            "W_E W_Q W_K^T W_E^T (d_vocab x d_vocab, kept factored: nothing that size is formed) and "
            "report their Frobenius norm, top singular values, entropy effective rank, and the share of "
            "eigenvalue mass that is positive (the OV copying score). Without --weights, a seeded random "
            "model with GPT-2 small's shapes is used."
        ),
    )
    c.add_argument("--weights", type=Path, metavar="FILE",
                   help="a .safetensors checkpoint (or its directory) in GPT-2 layout (h.{i}.attn.c_attn.weight, "
                        "wte.weight, optional prefix such as transformer.) or BERT layout "
                        "(encoder.layer.{i}.attention.self.query.weight, ..., optional prefix such as bert.)")
    c.add_argument("--out", type=Path, default=Path("circuits_out"), metavar="DIR",
                   help=f"directory for {circuit_report.CSV_NAME}, {circuit_report.JSON_NAME} and the PNG plots "
                        "(created if missing; default: %(default)s)")
    c.add_argument("--n-heads", type=_positive_int, metavar="N",
                   help="number of attention heads. Default: from a config.json beside the weights "
                        f"(n_head / num_attention_heads), else d_model / {checkpoints.DEFAULT_D_HEAD}")
    c.add_argument("--top-k", type=_positive_int, metavar="K",
                   help=f"how many of the largest singular values to report (at most d_head; default: "
                        f"{DEFAULT_TOP_K}, or d_head if smaller)")
    c.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="precision of the computation (default: %(default)s)")
    c.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch threads (torch.set_num_threads); default: torch's default, here "
                        f"{torch.get_num_threads()}")
    c.add_argument("--seed", type=int, default=0, help="seed of the random model (default: %(default)s)")
    c.add_argument("--random-shape", type=_random_shape, metavar="L,H,D_MODEL,D_VOCAB",
                   help="shape of the random model instead of GPT-2 small's 12,12,768,50257")
    c.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(run=run_circuits, command_parser=c)  # errors then show the subcommand's usage
    return parser


def check_out_dir(out: Path) -> None:
    """Create ``out`` if needed and make sure a file can be written in it; ValueError otherwise."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".lowrank_op_write_test_"):
            pass
    except OSError as err:
        raise ValueError(
            f"`--out` {str(out)!r} is not a writable directory ({err.strerror or err}); pass a directory "
            "you can write to, e.g. --out ./circuits_out."
        ) from None


class _Progress:
    """A tqdm bar over layers when tqdm is installed and wanted; else one line per layer (stderr)."""

    def __init__(self, n_layers: int, enabled: bool):
        self.n_layers, self.enabled, self.start = n_layers, enabled, time.perf_counter()
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print("(tqdm is not installed: plain progress lines; pip install tqdm for a bar)", file=sys.stderr)
            else:
                self.bar = tqdm(total=n_layers, unit="layer", desc="circuits", file=sys.stderr)

    def __call__(self, layer: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.enabled:
            print(f"layer {layer + 1}/{self.n_layers} done ({time.perf_counter() - self.start:.1f} s)",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _load(args, parser) -> checkpoints.AttentionWeights:
    dtype = DTYPES[args.dtype]
    if args.weights is None:
        shape = args.random_shape or checkpoints.GPT2_SMALL_SHAPE
        return checkpoints.random_weights(**shape, seed=args.seed, dtype=dtype)
    try:
        return checkpoints.load_safetensors(args.weights, n_heads=args.n_heads, dtype=dtype)
    except (ValueError, FileNotFoundError, ImportError) as err:  # CheckpointError is a ValueError
        parser.error(f"{args.weights}: {err}" if isinstance(err, checkpoints.CheckpointError) else str(err))


def _size(n: int | None) -> str:
    """A byte count in GiB, or MiB below 0.1 GiB."""
    if n is None:
        return "n/a"
    return f"{n / GIB:.3f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def run_circuits(args, parser) -> int:
    """The ``circuits`` command, from parsed arguments."""
    start = time.perf_counter()
    if args.weights is not None and args.random_shape is not None:
        parser.error("`--random-shape` applies to the built-in random model only; drop it or drop --weights.")
    if args.weights is None and args.n_heads is not None:
        parser.error("`--n-heads` applies to --weights only; set the random model's heads with --random-shape.")
    try:
        check_out_dir(args.out)
    except ValueError as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    weights = _load(args, parser)
    rank_bound = min(weights.d_head, weights.d_vocab)
    if args.top_k is None:
        args.top_k = min(DEFAULT_TOP_K, rank_bound)
    elif args.top_k > rank_bound:
        parser.error(f"`--top-k` {args.top_k} exceeds the circuits' rank bound min(d_head, d_vocab) = "
                     f"{rank_bound}; pass --top-k {rank_bound} or less.")
    loaded = time.perf_counter()
    peak_load, rss_loaded = _memory.peak_rss(), _memory.current_rss()
    peak_reset = rss_loaded is not None and _memory.reset_peak()
    print(f"model: {weights.source}", file=sys.stderr)
    print(f"  {checkpoints.LAYOUT_NAMES[weights.layout]} layout, {weights.n_layers} layers x {weights.n_heads} "
          f"heads (from {weights.n_heads_source}), d_model {weights.d_model}, d_head {weights.d_head}, "
          f"d_vocab {weights.d_vocab}, {'tied' if weights.tied else 'separate'} unembedding, {args.dtype}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)

    progress = _Progress(weights.n_layers, enabled=not args.no_progress)
    try:
        report = circuits.analyze(weights, on_layer=progress)
    finally:
        progress.close()
    analysed = time.perf_counter()
    peak_analysis = _memory.peak_rss()

    print(circuit_report.format_table(report, args.top_k))
    best = ", ".join(f"L{layer}H{head} {score:+.3f}" for layer, head, score in circuit_report.top_copying_heads(report))
    print(f"highest OV copying scores: {best}")

    itemsize = weights.W_E.element_size()
    layer_factor_bytes = 2 * weights.n_heads * weights.d_vocab * weights.d_head * itemsize
    increase = None if rss_loaded is None else max(0, peak_analysis - rss_loaded)
    memory = {
        "peak_rss_bytes": max(peak_load, peak_analysis),
        "rss_after_loading_bytes": rss_loaded,
        "analysis_peak_increase_bytes": increase,
        "analysis_peak_increase_includes_loading": not peak_reset,
        "one_layer_circuit_factor_bytes": layer_factor_bytes,
        "all_layers_circuit_factor_bytes": layer_factor_bytes * weights.n_layers,
        "weight_bytes": weights.nbytes,
    }
    timing = {"load_s": loaded - start, "analysis_s": analysed - loaded}
    settings = {"top_k": args.top_k, "dtype": args.dtype, "threads": torch.get_num_threads()}
    out_files = [args.out / circuit_report.CSV_NAME, args.out / circuit_report.JSON_NAME]
    circuit_report.write_csv(out_files[0], report, args.top_k)
    circuit_report.write_json(out_files[1], report, weights, args.top_k,
                              {"settings": settings, "timing_s": timing, "memory": memory})
    if not args.no_plots:
        written = circuit_report.write_plots(args.out, report, weights)
        if not written:
            print('matplotlib is not installed: no plots written. Install it with `pip install matplotlib` '
                  '(or `pip install "lowrank_op[plots]"`), or pass --no-plots.', file=sys.stderr)
        out_files += written
    print(f"wrote {', '.join(str(p) for p in out_files)}")

    wall = time.perf_counter() - start
    print(f"wall time: {wall:.1f} s (loading {timing['load_s']:.1f} s, circuits {timing['analysis_s']:.1f} s) "
          f"on {torch.get_num_threads()} threads")
    peak_total = max(peak_load, _memory.peak_rss())
    print(f"peak memory (ru_maxrss): {_size(peak_total)}; after loading: {_size(rss_loaded)}")
    if increase is not None:
        note = "" if peak_reset else " (peak counter could not be reset: includes loading)"
        print(f"increase during analysis: {_size(increase)}{note} = {increase / layer_factor_bytes:.2f} x one layer's "
              f"circuit factors ({_size(layer_factor_bytes)}: A and B of one circuit, {weights.n_heads} heads) = "
              f"{increase / weights.nbytes:.2f} x the weights used ({_size(weights.nbytes)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lowrank_op`` and the ``lowrank_op`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.command_parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
