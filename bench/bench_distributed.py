"""Bytes between ranks, and time, of the sharded decompositions (lowrank_op.distributed).

For a row-sharded tall factor ``X`` of shape ``(n, m)``, ``(50257, 64)`` (one head's ``W_E W_V``
at GPT-2's vocabulary) and ``(50257, 768)`` (GPT-2 small's ``W_E``), float32, split evenly over
``P`` gloo processes on 127.0.0.1:

- ``tsqr``: :func:`lowrank_op.distributed.tsqr` with ``want_q=False`` (``R`` only);
- ``svdvals``: ``ShardedFactoredMatrix(X, X^T)`` singular values (``A`` row- and ``B``
  column-sharded: two TSQRs and the core's SVD on rank 0, one gather and one broadcast);
- ``outer reduction``: :func:`lowrank_op.distributed.sharded_outer_reduction` of ``(X, X^T)``
  untied (two TSQRs and the closing product ``X^T X``), what the circuits command does to
  ``W_E`` and ``W_U`` under torchrun.

Bytes are *counted* by :func:`lowrank_op.distributed.count_bytes` (the payload each rank
contributes to every collective, summed over ranks), beside the bytes that gathering ``X`` onto
every rank would move (``(P - 1) n m 4``: DTensor's own ``torch.linalg.qr`` of a ``Shard(0)``
DTensor returns ``Replicate()`` ``Q`` and ``R`` (torch 2.13, 2 gloo processes), having replicated
its input; computed from the shape, not counted). With one process the collectives run on a group of one: their counted
payload crosses nothing.
Time: each rank's wall time of the call (after a barrier; median of 3 calls, the slowest rank),
with 1, 2 and 4 processes on this machine's 2 cores. Several processes on 2 cores share them, so
the times show the overhead of the collectives and of oversubscription, not a speed-up.

The pytest-benchmark figure of each case is the whole run of its processes (start-up included);
the numbers to read are in ``extra_info``. About 2 minutes.
"""

from __future__ import annotations

import json
import socket
import statistics
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SHAPES = {"one_head_50257x64": (50257, 64), "W_E_50257x768": (50257, 768)}
WORLDS = (1, 2, 4)
OPERATIONS = ("tsqr", "svdvals", "outer reduction")
CALLS = 3
DEADLINE_S = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, shape: tuple[int, int], out: str) -> None:
    from lowrank_op import distributed

    torch.set_num_threads(max(1, 2 // world))
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
        n, m = shape
        X = torch.randn(n, m, generator=torch.Generator().manual_seed(0)) * 0.02
        X_local = torch.tensor_split(X, world)[rank].contiguous()
        runs = {
            "tsqr": lambda: distributed.tsqr(X_local, want_q=False),
            "svdvals": lambda: distributed.ShardedFactoredMatrix(X_local, X_local.mT.contiguous()).svdvals(),
            "outer reduction": lambda: distributed.sharded_outer_reduction(X_local, X_local.mT.contiguous() * 1.0),
        }
        result = {}
        for name, fn in runs.items():
            fn()  # first call: warm
            times = []
            with distributed.count_bytes() as counter:
                for _ in range(CALLS):
                    dist.barrier()
                    start = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - start)
            result[name] = {"bytes_per_call": counter.total / CALLS, "seconds": statistics.median(times)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _spawn(world: int, shape: tuple[int, int]) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.start_processes(_worker, args=(world, _free_port(), shape, out), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{world} workers did not finish within {DEADLINE_S} s")
        finally:
            for process in ctx.processes:
                if process.is_alive():
                    process.kill()
        errors = [p.read_text() for p in Path(out).glob("rank*.err")]
        if errors:
            raise RuntimeError("\n".join(errors))
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("shape_name", SHAPES)
def test_sharded_decompositions(benchmark, shape_name, world):
    shape = SHAPES[shape_name]
    results = []
    benchmark.group = f"distributed decompositions [{shape_name}], float32, 2 cores"
    benchmark.extra_info["case"] = f"{world} process(es)"
    benchmark.pedantic(lambda: results.append(_spawn(world, shape)), rounds=1, iterations=1, warmup_rounds=0)
    ranks = results[-1]
    n, m = shape
    benchmark.extra_info["dtensor_gather_bytes"] = (world - 1) * n * m * 4
    for name in OPERATIONS:
        key = name.replace(" ", "_")
        benchmark.extra_info[f"{key}_bytes"] = sum(r[name]["bytes_per_call"] for r in ranks)
        benchmark.extra_info[f"{key}_s"] = max(r[name]["seconds"] for r in ranks)
