"""The ``circuits`` command end to end, as a user runs it: Llama-3-8B's shapes, and GPT-2 small's
with composition between heads.

- ``llama3-8b``: ``python -m lowrank_op circuits --random-shape llama3-8b --threads 2`` (32 layers,
  32 query heads sharing 8 key/value heads, d_model 4096, d_head 128, vocabulary 128,256, untied
  ``W_U``; seeded random float32 weights, 9.4 GB): every head's OV and QK metrics, the token
  read-out (3 directions, 10 tokens a side), the plots; no composition. One round (minutes).
- ``gpt2-small --composition``: GPT-2 small's shapes with ``--composition``: Q-, K- and
  V-composition of all 144 x 144 pairs of heads besides everything else. Three rounds.

Each case runs the command in a subprocess (so its peak resident memory is its own) and reads its
``circuits.json``: ``extra_info`` holds the command's own split of the wall time, its peak resident
memory, the weights' bytes and their ratio (``peak_over_weights``). There is no baseline to divide
by in the same run: forming the circuit factors at Llama-3-8B's shapes is about 2.7e14
multiply-adds (hours on 2 cores), and TransformerLens's composition scores at GPT-2 small's shapes
are timed against lowrank_op's in bench_composition.py. Asserted: the command exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CASES = {
    "llama3-8b": (["--random-shape", "llama3-8b"], 1),
    "gpt2-small --composition": (["--random-shape", "gpt2-small", "--composition"], 3),
}
GIB = 2**30


def _run(args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "lowrank_op", "circuits", *args, "--threads", "2", "--no-progress",
                   "--out", str(Path(out) / "circuits_out")]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {done.stderr[-2000:]}")
        return json.loads((Path(out) / "circuits_out" / "circuits.json").read_text())


@pytest.mark.parametrize("case", CASES)
def test_circuits_command(benchmark, case):
    args, rounds = CASES[case]
    documents = []
    benchmark.group = f"circuits command end to end [{case}], 2 threads"
    benchmark.pedantic(lambda: documents.append(_run(args)), rounds=rounds, iterations=1, warmup_rounds=0)
    document = documents[-1]
    memory, timing = document["memory"], document["timing_s"]
    benchmark.extra_info.update({key: timing[key] for key in timing if key.endswith("_s")})
    benchmark.extra_info["peak_rss_GiB"] = memory["peak_rss_bytes"] / GIB
    benchmark.extra_info["weights_GiB"] = memory["weight_bytes"] / GIB
    benchmark.extra_info["peak_over_weights"] = memory["peak_rss_bytes"] / memory["weight_bytes"]
