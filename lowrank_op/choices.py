"""What every ``method="auto"`` chose, and why: a record users and tests can read.

Each decision an ``"auto"`` rule takes at run time (the QR in :meth:`FactoredMatrix.svd`, the
branch of :meth:`FactoredMatrix.norm`, the plan of :meth:`FactoredMatrix.svds` and any fallback) is
reported to :func:`record`. Inside a :func:`recorded` block the reports are collected::

    >>> import torch, lowrank_op
    >>> fm = lowrank_op.FactoredMatrix(torch.randn(400, 8), torch.randn(8, 400))
    >>> with lowrank_op.choices.recorded() as log:
    ...     _ = fm.svd()
    >>> [(c.operation, c.method) for c in log]  # doctest: +SKIP
    [('orthogonalize', 'cholqr2'), ('orthogonalize', 'cholqr2')]

Outside a block :func:`record` costs one list check. This plays the part of lineax's
``AutoLinearSolver.select_solver`` and CoLA's info records: nobody needs to monkeypatch a kernel
to learn which one ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Choice:
    """One decision of an ``"auto"`` rule.

    Attributes
    ----------
    operation : str
        What was being computed: ``"orthogonalize"``, ``"norm"``, ``"svds"``, ``"eigs"``, ...
    method : str
        What ran: ``"cholqr2"``, ``"householder"``, ``"gram"``, ``"qr"``, ``"arpack"``, ``"exact"``, ...
    reason : str
        One sentence: the rule and the figures it compared.
    """

    operation: str
    method: str
    reason: str

    def __str__(self) -> str:
        return f"{self.operation}: {self.method} ({self.reason})"


_active: list[list[Choice]] = []


def record(operation: str, method: str, reason: str) -> None:
    """Report a decision to every open :func:`recorded` block (nothing happens outside one)."""
    if _active:
        choice = Choice(operation, method, reason)
        for log in _active:
            log.append(choice)


@contextlib.contextmanager
def recorded() -> Iterator[list[Choice]]:
    """Collect the :class:`Choice` records made inside the block into the list it yields."""
    log: list[Choice] = []
    _active.append(log)
    try:
        yield log
    finally:
        _active.remove(log)
