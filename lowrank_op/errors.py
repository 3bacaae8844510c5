"""Every exception and warning class of the package, in one place.

Errors that TransformerLens raised as ``AssertionError`` or ``RuntimeError`` subclass both the
clear class (``ValueError``) and TransformerLens's, as numpy's ``AxisError`` is both a
``ValueError`` and an ``IndexError``: old ``except AssertionError:`` clauses keep working while new
code reads a precise message.
"""

from __future__ import annotations


# --- Warnings -------------------------------------------------------------------------------------
class PerformanceWarning(RuntimeWarning):
    """An operation will run much slower than its factored cost suggests (a host round-trip, say)."""


class UndefinedGradientWarning(RuntimeWarning):
    """A result is fine but its gradient is undefined (singular vectors of repeated singular values)."""


class IllConditionedWarning(RuntimeWarning):
    """A solve or log-determinant went through a numerically singular (ill-conditioned) matrix."""


class StructureWarning(RuntimeWarning):
    """The factored structure an exact path needs was not there, so a generic path of GPyTorch or
    linear_operator ran instead (iterative, hence approximate, on large operators)."""


# --- Numerical failures ---------------------------------------------------------------------------
class KrylovFailure(RuntimeError):
    """ARPACK or PROPACK did not deliver the wanted values (not converged, out of budget, or failed
    the check of its residuals)."""


class BudgetExceeded(KrylovFailure):
    """A Krylov solver applied the operator more often than its budget allowed."""
