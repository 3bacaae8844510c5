"""Shared test configuration: a deterministic hypothesis profile and dtype tolerances."""

import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("lowrank_op", derandomize=True, database=None, deadline=None, max_examples=25)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lowrank_op"))

# The number of intra-op threads: LOWRANK_OP_TEST_THREADS if set (.ci/run runs the suite with 1 and
# with 2, since BLAS kernels may split and order their sums differently by thread count), else 2,
# as on the CI machine.
_THREADS = os.environ.get("LOWRANK_OP_TEST_THREADS", "2")
if not _THREADS.isdigit() or int(_THREADS) < 1:
    raise ValueError(f"LOWRANK_OP_TEST_THREADS must be a positive integer; got {_THREADS!r}.")
torch.set_num_threads(int(_THREADS))


def pytest_report_header(config):
    return f"lowrank_op tests: torch {torch.__version__}, {torch.get_num_threads()} intra-op thread(s)"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"lowrank_op tests ran with {torch.get_num_threads()} intra-op thread(s)")
