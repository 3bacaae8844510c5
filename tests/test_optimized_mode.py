"""Validation survives ``python -O``: the package holds no ``assert`` statement, and its errors are
raised the same way in an optimised interpreter."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys
import textwrap

import lowrank_op

PACKAGE = pathlib.Path(lowrank_op.__file__).parent


def test_package_has_no_assert_statements():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Assert):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not found, f"`assert` is stripped by python -O; raise an exception instead: {found}"


# Each line: an expression that must raise, and the exception class it must raise.
_SCRIPT = textwrap.dedent(
    """
    import torch
    from lowrank_op import FactoredMatrix
    fm = FactoredMatrix(torch.randn(6, 2), torch.randn(2, 6))
    cases = [
        (lambda: FactoredMatrix(torch.randn(3, 2), torch.randn(3, 4)), ValueError),
        (lambda: FactoredMatrix([[1.0]], torch.randn(1, 1)), TypeError),
        (lambda: FactoredMatrix(torch.randn(3, 2), torch.randn(2, 3, dtype=torch.float64)), TypeError),
        (lambda: fm.svd(method="nope"), ValueError),
        (lambda: fm.norm(method="nope"), ValueError),
        (lambda: fm.svds(k=0), ValueError),
        (lambda: fm @ torch.randn(5), ValueError),
        (lambda: fm * torch.randn(6, 6), ValueError),
        (lambda: fm[0, 0, 0], IndexError),
    ]
    for i, (call, expected) in enumerate(cases):
        try:
            call()
        except expected:
            continue
        except BaseException as exc:
            raise SystemExit(f"case {i}: {type(exc).__name__} instead of {expected.__name__}: {exc}")
        raise SystemExit(f"case {i}: no {expected.__name__} raised")
    print("ok", len(cases))
    """
)


def test_errors_are_raised_under_python_O():
    result = subprocess.run([sys.executable, "-O", "-c", _SCRIPT], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("ok"), result.stdout
