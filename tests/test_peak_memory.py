"""Peak memory of the values-only paths stays near one factor's size.

``tests/test_memory.py`` bounds the size of every single allocation; this bounds how many
factor-sized buffers are alive at once. ``S``, ``norm()``, ``eigenvalues`` and ``eigvals()`` need
at most one factor-sized buffer (CholeskyQR2's ``W`` of one factor, freed before the other factor
is factorised, or a contiguous copy of ``B^H``). Each case runs in a fresh process, which reads its
peak resident set (``VmHWM``) before and after the call; large allocations are ``mmap``-ed and
returned to the system when freed, so the reading counts buffers alive at the same time.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from lowrank_op import FactoredMatrix

    def peak_bytes():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024

    gen = torch.Generator().manual_seed(0)
    A = torch.randn(4, 100_000, 16, generator=gen)
    B = torch.randn(4, 16, 100_000, generator=gen)
    fm = FactoredMatrix(A, B)
    FactoredMatrix(A[:, :64], B[..., :64]).S  # load the kernels' code paths before measuring
    what = sys.argv[1]
    before = peak_bytes()
    {"S": lambda: fm.S, "norm": lambda: fm.norm(), "eigenvalues": lambda: fm.eigenvalues,
     "eigvals": lambda: fm.eigvals()}[what]()
    print(json.dumps({"extra": peak_bytes() - before, "factor": A.numel() * A.element_size()}))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("what", ["S", "norm", "eigenvalues", "eigvals"])
def test_values_only_paths_hold_at_most_one_factor_sized_buffer(what):
    result = subprocess.run([sys.executable, "-c", _SCRIPT, what], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    # One factor-sized buffer (25.6 MB here) plus small ones; two alive at once would be 2x.
    assert figures["extra"] <= 1.5 * figures["factor"], figures
