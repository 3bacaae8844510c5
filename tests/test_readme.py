"""README's quickstart runs as written, and its claims about shapes hold."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _block_after(marker: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {marker} -->\s*```\w*\n(.*?)```", text, flags=re.S)
    if match is None:
        raise LookupError(f"README.md has no code block after <!-- {marker} -->")
    return match.group(1)


def test_quickstart_runs_and_shapes_match_its_comments(capsys):
    namespace: dict = {}
    exec(compile(_block_after("quickstart"), "README quickstart", "exec"), namespace)
    OV, U, S, Vh, eig = (namespace[name] for name in ("OV", "U", "S", "Vh", "eig"))
    assert tuple(OV.shape) == (12, 50257, 50257) and OV.mdim == 64
    assert U.shape == Vh.shape == (12, 50257, 64) and S.shape == (12, 64)
    assert eig.shape == (12, 64) and eig.dtype == torch.complex64
    # The product is never formed: the factors are the only d_vocab-sized tensors.
    assert OV.A.shape == (12, 50257, 64) and OV.B.shape == (12, 64, 50257)
    assert "FactoredMatrix(shape=(12, 50257, 50257), mdim=64" in capsys.readouterr().out


def test_ci_runs_the_readme_test_command():
    command = _block_after("test-command").strip()
    assert command.startswith("pip install torch==2.13.0 && ")
    ci = (README.parent / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'eval "$test_command"' in ci
