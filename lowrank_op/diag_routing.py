"""The ``diag + fm`` hook: make ``DiagLinearOperator(d) + fm`` the Woodbury operator, as ``fm + diag`` is.

Python evaluates ``diag + fm`` as ``DiagLinearOperator.__add__(diag, fm)``, which linear_operator
implements as ``AddedDiagLinearOperator(fm, diag)`` without consulting ``fm`` (it returns no
``NotImplemented`` that would reach ``FactoredMatrix.__radd__``, and has no registration hook).
That generic operator's ``solve`` and ``logdet`` assume a symmetric positive definite operator.

:func:`install` wraps, once and idempotently, the ``__add__`` that ``DiagLinearOperator`` and
``ConstantDiagLinearOperator`` each define: the wrapper sends a ``FactoredMatrix`` operand to
:class:`~lowrank_op.added_diag.FactoredAddedDiag` and passes every other operand to the original
method unchanged (so ``diag + dense``, ``diag + tensor`` and ``diag + diag`` behave exactly as
before). ``diag - fm``, ``diag.add(fm)`` and ``torch.add(diag, fm)`` reach the same wrapper.
:func:`uninstall` restores the originals. ``import lowrank_op`` calls :func:`install`; nothing
else in the package patches another library.
"""

from __future__ import annotations

import functools

from linear_operator.operators import ConstantDiagLinearOperator, DiagLinearOperator

from lowrank_op.added_diag import FactoredAddedDiag
from lowrank_op.factored import FactoredMatrix

_HOOKED_CLASSES = (DiagLinearOperator, ConstantDiagLinearOperator)


def _route_factored(original):
    @functools.wraps(original)
    def __add__(self, other):
        if isinstance(other, FactoredMatrix):
            return FactoredAddedDiag(other, self)
        return original(self, other)

    __add__._lowrank_op_original = original
    return __add__


def install() -> None:
    """Make ``diag + fm`` a :class:`~lowrank_op.added_diag.FactoredAddedDiag` (module docstring); idempotent."""
    for cls in _HOOKED_CLASSES:
        current = cls.__dict__["__add__"]
        if not hasattr(current, "_lowrank_op_original"):
            cls.__add__ = _route_factored(current)


def uninstall() -> None:
    """Restore linear_operator's own ``DiagLinearOperator.__add__`` and ``ConstantDiagLinearOperator.__add__``."""
    for cls in _HOOKED_CLASSES:
        current = cls.__dict__["__add__"]
        if hasattr(current, "_lowrank_op_original"):
            cls.__add__ = current._lowrank_op_original


def installed() -> bool:
    """Whether the hook is in place on both classes."""
    return all(hasattr(cls.__dict__["__add__"], "_lowrank_op_original") for cls in _HOOKED_CLASSES)
