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


# --- TransformerLens-compatible errors ------------------------------------------------------------
# Each is the clear class (ValueError / TypeError) and the class TransformerLens's FactoredMatrix
# raised in the same situation, so `except AssertionError:` (or RuntimeError) written for
# TransformerLens keeps working. They are raised, never asserted: `python -O` changes nothing.
class ShapeMismatchError(ValueError, AssertionError):
    """Shapes that do not fit: factors or product operands whose inner dims differ, or a non-scalar
    where ``*`` needs a scalar (TransformerLens asserted these)."""


class NotSquareError(ShapeMismatchError):
    """An operation that needs a square product (``ldim == rdim``: ``BA``, ``eigenvalues``, ``trace``,
    solves) was asked of a rectangular one (TransformerLens asserted ``ldim == rdim``)."""


class BroadcastError(ValueError, RuntimeError):
    """Leading (batch) dims that do not broadcast (TransformerLens raised RuntimeError)."""


class DtypeMismatchError(TypeError, RuntimeError):
    """Factors or product operands of different dtypes (torch, and so TransformerLens, raised
    RuntimeError when multiplying them)."""


class DeviceMismatchError(ValueError, RuntimeError):
    """Factors or product operands on different devices (torch, and so TransformerLens, raised
    RuntimeError when multiplying them)."""


# --- The circuits command's inputs ----------------------------------------------------------------
class CheckpointError(ValueError):
    """A checkpoint cannot be read as a model: a malformed safetensors file, a layout this package
    does not read, a missing, misshapen or non-finite tensor, or misnumbered layers."""


class NonFiniteResultError(RuntimeError):
    """A computation on finite inputs gave NaN or infinity: it overflowed its working precision."""
