"""Benchmarks of lowrank_op: each operation timed beside its baselines in the same run.

Run from the repository root, on an otherwise idle machine (other processes on the 2 cores
inflate the times; the summary warns when the load average shows them)::

    python -m pytest bench/ --benchmark-only                    # every bench_*.py
    python -m pytest bench/bench_svd.py --benchmark-only        # one operation

The decomposition benches (bench_svd, bench_svdvals, bench_norm, bench_eigenvalues,
bench_orthogonalize) take about two minutes on 2 cores, a third of it the dense cases at n = 4096.
Cases are grouped by operation and shape (``svd[gpt2_ov_head]``, ...). After pytest-benchmark's
own tables, a summary prints each case's median and min and its speedup over the baselines of
its group (dense torch on ``A @ B``, TransformerLens's SVD-of-both-factors method, the two QRs
alone, linear_operator's generic path on the same operator, the formed circuit factors that
``circuits.analyze`` no longer forms), with the numbers each case left in ``extra_info``
(accuracy against float64). Files are ``bench_<operation>.py``, collected by the hook below. Add
``--benchmark-json=out.json`` to keep the raw data.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(2)

#: Baselines the summary divides by, in column order, with their column headers.
RATIO_BASELINES = {"dense": "vs dense", "tl": "vs TL", "two_qrs": "vs 2 QRs", "linop": "vs linop",
                   "formed": "vs formed"}
#: Row order of the baselines after the lowrank_op cases of a group (unknown names go last).
BASELINE_ORDER = ("dense", "tl", "tl_tall", "two_qrs", "two_qrs_r_only", "two_grams", "linop", "formed")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` here (pytest's own pattern is ``test_*.py``)."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        if not parent.session.isinitpath(file_path):  # an explicit path is collected by pytest
            return pytest.Module.from_parent(parent, path=file_path)
    return None


def _rows(benchmarks):
    """Lowrank_op cases first (in run order), then baselines in BASELINE_ORDER."""
    def key(bench):
        name = bench.extra_info.get("baseline")
        if name is None:
            return (0, 0)
        return (1, BASELINE_ORDER.index(name) if name in BASELINE_ORDER else len(BASELINE_ORDER))
    return sorted(benchmarks, key=key)


def _extra(bench) -> str:
    """The numbers a case left in ``extra_info`` (accuracy, memory): ``S_max_rel_err 1.1e-06``."""
    return ", ".join(f"{key} {value:.2g}" for key, value in bench.extra_info.items()
                     if isinstance(value, (int, float)) and not isinstance(value, bool))


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in (session.benchmarks if session else []) if b and not b.has_error]
    if not benchmarks:
        return
    groups: dict[str, list] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group, []).append(bench)

    write = terminalreporter.write_line
    threads = torch.get_num_threads()
    terminalreporter.write_sep("-", f"lowrank_op: medians and speedups ({threads} threads)")
    write("speedup = baseline median / case median (> 1: the case is faster than that baseline)")
    load = os.getloadavg()[0]
    if load > threads + 0.5:
        write(f"WARNING: 1-minute load average {load:.1f} > {threads} threads: other processes "
              "shared the CPUs and the times may be inflated; rerun on a quiet machine.")
    for group, members in groups.items():
        medians = {b.extra_info.get("baseline"): b.stats.median for b in members}
        columns = [name for name in RATIO_BASELINES if name in medians]
        write("")
        write(f"{group:<48}{'median ms':>11}{'min ms':>10}"
              f"{''.join(f'{RATIO_BASELINES[c]:>11}' for c in columns)}"
              "   extra_info (errors are relative, vs float64)")
        for bench in _rows(members):
            median = bench.stats.median
            ratios = "".join(f"{medians[c] / median:>10.2f}x" for c in columns)
            case = bench.extra_info.get("case", bench.name)
            times = f"{median * 1e3:>11.2f}{bench.stats.min * 1e3:>10.2f}"
            write(f"  {case:<46}{times}{ratios}   {_extra(bench)}")
