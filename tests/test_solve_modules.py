"""Where the solves live: pure-tensor modules that do not reach back into the operator classes, and
``factored.py`` importing them at the top; the ``diag + fm`` hook installed by ``import lowrank_op``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from linear_operator.operators import AddedDiagLinearOperator, DiagLinearOperator

from lowrank_op import FactoredAddedDiag, FactoredMatrix, diag_routing

PACKAGE = Path(__file__).resolve().parents[1] / "lowrank_op"
PURE = ("solves", "woodbury", "conditioning", "sums")
CLASSES = {"lowrank_op.factored", "lowrank_op.added_diag", "lowrank_op.diag_routing"}


def _imports(node: ast.AST) -> set[str]:
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.ImportFrom) and sub.module:
            names.add(sub.module)
            names.update(f"{sub.module}.{alias.name}" for alias in sub.names)
        elif isinstance(sub, ast.Import):
            names.update(alias.name for alias in sub.names)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_not_import_the_operator_classes(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    assert not (_imports(tree) & CLASSES), f"lowrank_op.{module} imports {_imports(tree) & CLASSES}"


def test_factored_imports_the_solve_modules_at_the_top():
    tree = ast.parse((PACKAGE / "factored.py").read_text())
    top = _imports(ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[]))
    assert {"lowrank_op.solves", "lowrank_op.sums"} <= top
    mine = {f"lowrank_op.{m}" for m in (*PURE, "added_diag", "diag_routing")}
    deferred = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            found = {name for name in _imports(node) if name.rsplit(".", 1)[0] in mine or name in mine}
            if found:
                deferred[node.name] = found
    # The one deferred import: __add__ builds a FactoredAddedDiag, which imports factored.py.
    assert deferred == {"__add__": {"lowrank_op.added_diag", "lowrank_op.added_diag.FactoredAddedDiag"}}


@pytest.mark.parametrize("module", ["lowrank_op.solves", "lowrank_op.sums", "lowrank_op.woodbury", "lowrank_op.added_diag"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch}, raise_on_error=False)
    assert result.attempted > 0 and result.failed == 0


def test_diag_hook_is_installed_by_the_package():
    fm = FactoredMatrix(torch.randn(4, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    D = DiagLinearOperator(torch.ones(4, dtype=torch.float64))
    assert diag_routing.installed() and isinstance(D + fm, FactoredAddedDiag)
    try:
        diag_routing.uninstall()
        assert not diag_routing.installed() and type(D + fm) is AddedDiagLinearOperator
    finally:
        diag_routing.install()
    assert diag_routing.installed()
