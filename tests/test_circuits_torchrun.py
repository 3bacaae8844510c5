"""The circuits command under torchrun: 2 and 3 gloo processes on 127.0.0.1 write the same numbers
as one process, and say which layers each rank measured."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import sys

import pytest
from tiny_checkpoints import tiny_checkpoint

#: Seconds a whole run (every process) may take before the test kills it.
RUN_TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    if nproc == 1:
        command = [sys.executable, "-m", "lowrank_op", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
                   "--rdzv-backend", "static", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                   "-m", "lowrank_op", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path, _ = tiny_checkpoint(tmp_path_factory.mktemp("tr"), "llama", n_heads=4, n_kv_heads=2, untied=True,
                              n_layers=5, d_vocab=60)
    return path


def outputs(checkpoint, out, nproc, dtype):
    args = ["circuits", "--weights", str(checkpoint), "--out", str(out), "--threads", "1", "--no-progress",
            "--no-plots", "--composition", "--dtype", dtype]
    done = run(args, nproc)
    document = json.loads((out / "circuits.json").read_text())
    with open(out / "tokens.csv", newline="") as f:
        tokens = list(csv.DictReader(f))
    with open(out / "composition.csv", newline="") as f:
        scores = list(csv.DictReader(f))
    return document, tokens, scores, done


def numbers(record: dict):
    for circuit in ("ov", "qk"):
        for key, value in record[circuit].items():
            yield from (value if isinstance(value, list) else [value])


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory):
    return {dtype: outputs(checkpoint, tmp_path_factory.mktemp(f"one-{dtype}"), 1, dtype)
            for dtype in ("float64", "float32")}


@pytest.mark.parametrize("nproc, dtype, rtol", [(2, "float64", 1e-6), (3, "float64", 1e-6), (2, "float32", 1e-4)])
def test_torchrun_writes_the_numbers_of_one_process(checkpoint, single, tmp_path, nproc, dtype, rtol):
    document, tokens, scores, done = outputs(checkpoint, tmp_path / "out", nproc, dtype)
    ref_document, ref_tokens, ref_scores, _ = single[dtype]
    settings = document["settings"]
    assert settings["world_size"] == nproc
    by_rank = settings["layers_by_rank"]
    assert sorted(by_rank) == [str(r) for r in range(nproc)]
    assert sorted(layer for layers in by_rank.values() for layer in layers) == list(range(5))
    assert all(by_rank[str(r)] for r in range(nproc))  # every rank measured some layers
    assert ref_document["settings"]["world_size"] == 1
    for got, want in zip(document["heads"], ref_document["heads"], strict=True):
        for x, y in zip(numbers(got), numbers(want), strict=True):
            assert x == pytest.approx(y, rel=rtol, abs=rtol * 1e-3)
    assert len(tokens) == len(ref_tokens) and len(scores) == len(ref_scores)
    for got, want in zip(tokens, ref_tokens):
        assert float(got["weight"]) == pytest.approx(float(want["weight"]), rel=rtol, abs=10 * rtol * 1e-2)
        if dtype == "float64":
            assert got["token_id"] == want["token_id"]
    for got, want in zip(scores, ref_scores):
        assert got["mode"] == want["mode"] and float(got["score"]) == pytest.approx(float(want["score"]), rel=rtol)
    assert done.stdout.count("wrote ") == 1  # one report, from rank 0
    assert f"x {nproc} processes (torchrun)" in done.stderr
