"""The command line: ``python -m lowrank_op circuits`` (also installed as the ``lowrank_op`` script).

``circuits`` measures the full OV and QK circuits of every attention head of a transformer, layer
by layer, and writes a table (stdout), CSV, JSON and PNG plots; it ends with the wall time and the
peak memory. Run ``python -m lowrank_op circuits --help`` for the options.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from lowrank_op.circuits import analysis, checkpoints, composition, directions, memory, report
from lowrank_op.errors import NonFiniteResultError

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: Singular values reported per circuit unless --top-k says otherwise (fewer if d_head is smaller).
DEFAULT_TOP_K = 5
#: The memory line gives the analysis' peak increase as a multiple of the embedding ``W_E`` (the
#: analysis' largest buffers are its QR's) and of the weights only when that size is at least this many bytes: a resident-set reading
#: moves by a few MiB for reasons of its own (allocator, lazily loaded libraries), which would
#: swamp the ratio to anything smaller.
MEMORY_RATIO_MIN_BYTES = 16 * 2**20
#: Seed of the random model when --seed is not given.
DEFAULT_SEED = 0
#: Exit status of a command that fails on its input (bad checkpoint, overflow, unwritable output);
#: argparse's usage errors exit with 2.
EXIT_FAILURE = 1


def _integer(text: str, minimum: int, kind: str) -> int:
    """``int(text)``, at least ``minimum``; else an argparse error saying it must be a ``kind`` integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a {kind} integer, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be a {kind} integer, got {value}")
    return value


def _positive_int(text: str) -> int:
    return _integer(text, 1, "positive")


RANDOM_SHAPE_FIELDS = ("n_layers", "n_heads", "d_model", "d_vocab")


def _random_shape(text: str) -> dict:
    names = ", ".join(checkpoints.RANDOM_PRESETS)
    rule = (f"must be a preset ({names}) or N_LAYERS,N_HEADS,D_MODEL,D_VOCAB: four positive integers, N_HEADS "
            "dividing D_MODEL (each head is D_MODEL / N_HEADS wide), e.g. 2,4,64,1000 or GPT-2 small's 12,12,768,50257")
    if text in checkpoints.RANDOM_PRESETS:
        return dict(checkpoints.RANDOM_PRESETS[text])
    try:
        values = [int(p) for p in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{rule}; got {text!r}")
    shape = dict(zip(RANDOM_SHAPE_FIELDS, values))
    if shape["d_model"] % shape["n_heads"]:
        raise argparse.ArgumentTypeError(
            f"{rule}; got {text!r}, whose N_HEADS {shape['n_heads']} does not divide D_MODEL {shape['d_model']}"
        )
    return shape


def _count(text: str) -> int:
    return _integer(text, 0, "non-negative")


def _preset_text(shape: dict) -> str:
    text = f"{shape['n_layers']} layers x {shape['n_heads']} heads"
    if "n_kv_heads" in shape:
        text += f" ({shape['n_kv_heads']} key/value)"
    text += f", d_model {shape['d_model']}"
    if "d_head" in shape:
        text += f", d_head {shape['d_head']}"
    text += f", vocab {shape['d_vocab']}" + (", untied" if shape.get("untied") else "")
    return text


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
            "model with GPT-2 small's shapes is used. Under torchrun (torchrun --nproc-per-node N -m "
            "lowrank_op circuits ...) the ranks share the work and rank 0 writes the report."
        ),
    )
    c.add_argument("--weights", type=Path, metavar="FILE",
                   help="a checkpoint: a .safetensors file, a sharded model.safetensors.index.json, a directory "
                        "holding either, or a llama.cpp .gguf file (llama architecture; needs the gguf package). "
                        "Layouts: GPT-2 (h.{i}.attn.c_attn.weight, wte.weight), BERT (encoder.layer.{i}.attention."
                        "self.query.weight, ...), Llama/Mistral/Qwen2 (layers.{i}.self_attn.q_proj.weight, "
                        "embed_tokens.weight; GQA from config.json), GPT-NeoX/Pythia (layers.{i}.attention."
                        "query_key_value.weight, embed_in.weight), each under any prefix")
    c.add_argument("--out", type=Path, default=Path("circuits_out"), metavar="DIR",
                   help=f"directory for {report.CSV_NAME}, {report.JSON_NAME} and the PNG plots "
                        "(created if missing, only once everything has been computed and written beside it; "
                        "default: %(default)s)")
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
    c.add_argument("--seed", type=int, help=f"seed of the random model (default: {DEFAULT_SEED}); not with --weights")
    c.add_argument("--random-shape", type=_random_shape, metavar="PRESET|L,H,D_MODEL,D_VOCAB",
                   help="shape of the random model instead of GPT-2 small's: a preset ("
                        + "; ".join(f"{name}: {_preset_text(shape)}" for name, shape in checkpoints.RANDOM_PRESETS.items())
                        + ") or four numbers, tied embeddings; not with --weights")
    c.add_argument("--directions", type=_count, default=directions.DEFAULT_DIRECTIONS, metavar="N",
                   help=f"per head, the top N singular directions of the OV circuit and the tokens each reads "
                        f"and writes, in {report.TOKENS_NAME} (default: %(default)s; 0: none)")
    c.add_argument("--tokens", type=_positive_int, default=directions.DEFAULT_TOKENS, metavar="K",
                   help="tokens listed per side of each direction (default: %(default)s)")
    c.add_argument("--composition", action="store_true",
                   help=f"also Q-, K- and V-composition scores of every pair of heads in different layers, in "
                        f"{report.COMPOSITION_NAME} and composition_{{q,k,v}}.png")
    c.add_argument("--no-plots", action="store_true", help="do not write the PNG plots")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(run=run_circuits, command_parser=c)  # errors then show the subcommand's usage
    c.epilog = ("Exit status: 0 on success; 2 for a misused option, with the usage (an --out that cannot be "
                "written is found so, before loading); 1 when the input or the output fails (a malformed or "
                "non-finite checkpoint, an overflow, a failure to write the outputs), with one 'error:' line. "
                "--out is created or updated only when every output has been written.")
    return parser


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _unwritable(out: Path, why: str) -> ValueError:
    return ValueError(
        f"`--out` {str(out)!r} is not a writable directory ({why}); pass a directory you can write to, "
        "e.g. --out ./circuits_out."
    )


def check_out_dir(out: Path) -> None:
    """ValueError unless ``out`` is a writable directory or could be created as one; creates nothing.

    ``out`` must be an existing directory, or absent with its nearest existing ancestor a
    directory; in either case a (nameless, ``O_TMPFILE`` where available) file must be creatable
    there.
    """
    target = out if out.exists() else _nearest_existing(out)
    if not target.is_dir():
        raise _unwritable(out, f"{target} is a file")
    try:
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise _unwritable(out, err.strerror or str(err)) from None


def _staging_dir(out: Path) -> Path:
    """A fresh hidden directory beside ``out`` (in its nearest existing ancestor) for the outputs.

    Beside ``out`` rather than in it, so that ``out`` is untouched until :func:`_move_into_place`;
    inside ``out`` only when it exists and its parent cannot be written.
    """
    out = out.absolute()
    anchor = out.parent if out.exists() else _nearest_existing(out)
    prefix = f".{out.name or 'out'}.partial-"
    try:
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=anchor))
    except OSError:
        if not out.is_dir():
            raise
        staging = Path(tempfile.mkdtemp(prefix=prefix, dir=out))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would otherwise become --out's mode
    return staging


def _move_into_place(staging: Path, out: Path) -> list[Path]:
    """Move the files written in ``staging`` into ``out`` (renaming ``staging`` when ``out`` is
    absent); returns their paths in ``out``."""
    names = sorted(p.name for p in staging.iterdir())
    if not out.exists():
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging, out)
    else:
        for name in names:
            shutil.move(staging / name, out / name)  # replaces a file of that name; copies across devices
        staging.rmdir()
    return [out / name for name in names]


class _CommandFailure(Exception):
    """The command cannot go on; its message is printed as one ``error:`` line (exit status 1)."""


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


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", " ", str(text)).strip()


def _load(args) -> checkpoints.AttentionWeights:
    """The weights; _CommandFailure naming the file and the problem when they cannot be had."""
    dtype = DTYPES[args.dtype]
    if args.weights is None:
        shape = args.random_shape or checkpoints.GPT2_SMALL_SHAPE
        seed = DEFAULT_SEED if args.seed is None else args.seed
        return checkpoints.random_weights(**shape, seed=seed, dtype=dtype)
    path = checkpoints.checkpoint_file(args.weights)  # FileNotFoundError: a usage error, handled by the caller
    try:
        return checkpoints.load_safetensors(path, n_heads=args.n_heads, dtype=dtype)
    except (ValueError, ImportError) as err:  # CheckpointError is a ValueError
        raise _CommandFailure(f"{path}: {err}") from None
    except OSError as err:
        raise _CommandFailure(f"{path}: cannot be read ({err.strerror or err}).") from None


def _size(n: int | None) -> str:
    """A byte count with three significant digits in B, KiB, MiB or GiB: "512 B", "4.06 KiB", "1.23 GiB"."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if value < 1000 else f"{value:.0f} {unit}"
    return f"{n} B"


def _split_time(parts: list[tuple[str, float]], total: float) -> str:
    """``"53.9 s: loading 1.0 s, circuits 50.6 s, ..., other 0.1 s"``: the parts and ``other`` (the
    rest of ``total``), rounded so that the printed parts add up to the printed total exactly."""
    shown, cumulative, printed = [], 0.0, 0.0
    for label, seconds in parts + [("other", total - sum(s for _, s in parts))]:
        cumulative += seconds
        upto = round(cumulative, 1)
        shown.append(f"{label} {upto - printed:.1f} s")
        printed = upto
    return f"{round(total, 1):.1f} s = " + " + ".join(shown)


def _memory_line(increase: int, peak_reset: bool, weights: checkpoints.AttentionWeights) -> str:
    """The analysis' peak increase, and its ratio to the embedding ``W_E`` (whose QR workspace is
    the analysis' largest buffer) and to the weights where those are at least
    ``MEMORY_RATIO_MIN_BYTES`` (a plain statement where they are not)."""
    note = "" if peak_reset else " (peak counter could not be reset: includes loading)"
    line = f"increase during analysis: {_size(increase)}{note}"
    embedding_bytes = weights.W_E.numel() * weights.W_E.element_size()
    embedding = f"W_E ({_size(embedding_bytes)}, factorised once for every head)"
    used = f"the weights used ({_size(weights.nbytes)})"
    small = []
    for size, what in ((embedding_bytes, embedding), (weights.nbytes, used)):
        if size >= MEMORY_RATIO_MIN_BYTES:
            line += f" = {increase / size:.2f} x {what}"
        else:
            small.append(what)
    if small:
        line += (f"; {' and '.join(small)} {'is' if len(small) == 1 else 'are'} below "
                 f"{_size(MEMORY_RATIO_MIN_BYTES)}, too small for a ratio to mean anything (a resident-memory "
                 "reading moves by a few MiB of its own)")
    return line


def run_circuits(args, parser) -> int:
    """The ``circuits`` command, from parsed arguments; returns the exit status.

    Misused options end in ``parser.error`` (usage and one error line, exit status 2), before
    anything is loaded. A failure on the input or the output prints one ``error:`` line naming the
    file and the problem and returns ``EXIT_FAILURE``; ``--out`` is then as it was (outputs are
    written to a hidden directory beside it and moved into place only when all are written).
    """
    start = time.perf_counter()
    if args.weights is not None:
        for flag, value in (("--random-shape", args.random_shape), ("--seed", args.seed)):
            if value is not None:
                parser.error(f"`{flag}` applies to the built-in random model only; drop it or drop `--weights`.")
    if args.weights is None and args.n_heads is not None:
        parser.error("`--n-heads` applies to --weights only; set the random model's heads with --random-shape.")
    try:
        check_out_dir(args.out)
        if args.weights is not None:
            checkpoints.checkpoint_file(args.weights)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    group = _process_group()
    try:
        return _circuits(args, parser, start, group)
    except _CommandFailure as err:
        if group is None or torch.distributed.get_rank(group) == 0:  # every rank fails alike: one line
            print(f"{parser.prog}: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        if group is not None:
            torch.distributed.destroy_process_group()


#: Seconds any collective of the command may wait under torchrun before it fails.
DISTRIBUTED_TIMEOUT_S = 1800


def _process_group():
    """The default process group when the command runs under ``torchrun`` with more than one
    process (``WORLD_SIZE`` > 1), initialised from torchrun's environment (gloo on CPU, nccl where
    CUDA is available), every collective bounded by ``DISTRIBUTED_TIMEOUT_S``; else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    import datetime

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=DISTRIBUTED_TIMEOUT_S))
    return torch.distributed.group.WORLD


def _circuits(args, parser, start: float, group=None) -> int:
    rank = 0 if group is None else torch.distributed.get_rank(group)
    world = 1 if group is None else torch.distributed.get_world_size(group)
    if rank != 0:  # every rank measures its share of the layers; rank 0 alone prints and writes
        sys.stdout = open(os.devnull, "w")
        args.no_progress = True
    weights = _load(args)
    rank_bound = min(weights.d_head, weights.d_vocab)
    if args.top_k is None:
        args.top_k = min(DEFAULT_TOP_K, rank_bound)
    elif args.top_k > rank_bound:
        parser.error(f"`--top-k` {args.top_k} exceeds the circuits' rank bound min(d_head, d_vocab) = "
                     f"{rank_bound}; pass --top-k {rank_bound} or less.")
    loaded = time.perf_counter()
    peak_load, rss_loaded = memory.peak_rss(), memory.current_rss()
    peak_reset = rss_loaded is not None and memory.reset_peak()
    if rank == 0:
        _describe(weights, args, world)

    progress = _Progress(weights.n_layers, enabled=not args.no_progress)
    where = f"{weights.source}: " if weights.layout != "random" else ""
    scores = None
    try:
        measured = analysis.analyze(weights, on_layer=progress, directions=args.directions, tokens=args.tokens,
                                    group=group)
        progress.close()
        analysed = time.perf_counter()
        if args.composition and rank == 0:
            scores = composition.composition(weights)
    except (ValueError, NonFiniteResultError) as err:
        raise _CommandFailure(f"{where}{err}") from None
    except OSError as err:  # the attention weights are read from the file as the analysis goes
        raise _CommandFailure(f"{where}cannot be read ({err.strerror or err}).") from None
    finally:
        progress.close()
    if rank != 0:
        return 0
    return _write(args, weights, measured, scores, start, loaded, analysed, peak_load, rss_loaded, peak_reset, world)


def _describe(weights, args, world: int) -> None:
    print(f"model: {weights.source}", file=sys.stderr)
    kv = f" sharing {weights.n_kv_heads} key/value heads" if weights.group > 1 else ""
    print(f"  {checkpoints.LAYOUT_NAMES[weights.layout]} layout, {weights.n_layers} layers x {weights.n_heads} "
          f"heads{kv} (from {weights.n_heads_source}), d_model {weights.d_model}, d_head {weights.d_head}, "
          f"d_vocab {weights.d_vocab}, {'tied' if weights.tied else 'separate'} unembedding, {args.dtype}, "
          f"{torch.get_num_threads()} threads" + (f" x {world} processes (torchrun)" if world > 1 else ""),
          file=sys.stderr)


def _write(args, weights, measured, scores, start, loaded, analysed, peak_load, rss_loaded, peak_reset,
           world: int) -> int:
    """Rank 0's part: the outputs, moved into place, and the closing lines."""
    composed = time.perf_counter()
    peak_analysis = memory.peak_rss()

    itemsize = weights.W_E.element_size()
    layer_factor_bytes = 2 * weights.n_heads * weights.d_vocab * weights.d_head * itemsize
    increase = None if rss_loaded is None else max(0, peak_analysis - rss_loaded)
    memory_figures = {
        "peak_rss_bytes": max(peak_load, peak_analysis),
        "rss_after_loading_bytes": rss_loaded,
        "analysis_peak_increase_bytes": increase,
        "analysis_peak_increase_includes_loading": not peak_reset,
        "embedding_bytes": weights.W_E.numel() * itemsize,
        # What forming the circuit factors would hold (the analysis does not form them).
        "one_layer_circuit_factor_bytes": layer_factor_bytes,
        "all_layers_circuit_factor_bytes": layer_factor_bytes * weights.n_layers,
        "weight_bytes": weights.nbytes,
    }
    settings = {"top_k": args.top_k, "dtype": args.dtype, "threads": torch.get_num_threads(),
                "directions": args.directions, "tokens": args.tokens, "composition": args.composition,
                "world_size": world,
                "layers_by_rank": {str(r): layers for r, layers in measured.layers_by_rank.items()}}

    staging = None
    try:
        staging = _staging_dir(args.out)
        report.write_csv(staging / report.CSV_NAME, measured, args.top_k)
        if measured.directions is not None:
            report.write_tokens_csv(staging / report.TOKENS_NAME, measured, weights.vocab)
        if scores is not None:
            report.write_composition_csv(staging / report.COMPOSITION_NAME, scores)
        table = report.format_table(measured, args.top_k, weights.vocab)
        reported = time.perf_counter()
        plotted, plots_written = reported, True
        if not args.no_plots:
            plots_written = bool(report.write_plots(staging, measured, weights))
            if scores is not None and plots_written:
                report.write_composition_plots(staging, scores, weights)
            plotted = time.perf_counter()
        timing = {"load_s": loaded - start, "analysis_s": analysed - loaded, "composition_s": composed - analysed,
                  "table_and_csv_s": reported - composed, "plots_s": plotted - reported}
        timing["other_s"] = time.perf_counter() - start - sum(timing.values())
        timing["total_s"] = sum(timing.values())
        report.write_json(staging / report.JSON_NAME, measured, weights, args.top_k,
                                  {"settings": settings, "timing_s": timing, "memory": memory_figures,
                                   "timing_note": "seconds, up to writing this file; the parts add up to total_s"})
        written = _move_into_place(staging, args.out)
        staging = None
    except OSError as err:
        raise _CommandFailure(f"cannot write the outputs to `--out` {str(args.out)!r}: "
                             f"{err.strerror or err} ({getattr(err, 'filename', None) or 'no file name'}).") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    print(table)
    best = ", ".join(f"L{layer}H{head} {score:+.3f}" for layer, head, score in report.top_copying_heads(measured))
    print(f"highest OV copying scores: {best}")
    if not plots_written:
        print('matplotlib is not installed: no plots written. Install it with `pip install matplotlib` '
              '(or `pip install "lowrank_op[plots]"`), or pass --no-plots.', file=sys.stderr)
    print(f"wrote {', '.join(str(p) for p in written)}")
    peak_total = max(peak_load, memory.peak_rss())
    parts = [("loading", timing["load_s"]), ("circuits", timing["analysis_s"])]
    if args.composition:
        parts.append(("composition", timing["composition_s"]))
    parts += [("table and CSV", timing["table_and_csv_s"]), ("plots", timing["plots_s"])]
    print(f"wall time {_split_time(parts, time.perf_counter() - start)} (other: JSON, moving the files into "
          f"place, printing) on {torch.get_num_threads()} threads")
    print(f"peak memory (ru_maxrss): {_size(peak_total)}; after loading: {_size(rss_loaded)}")
    if increase is not None:
        print(_memory_line(increase, peak_reset, weights))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m lowrank_op`` and the ``lowrank_op`` script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.command_parser)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
