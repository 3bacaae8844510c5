"""Tunable thresholds, each changeable for a ``with`` block (as ``linear_operator.settings``).

Every threshold that selects an algorithm lives here, with its default and the reason for it, and
is read at run time through ``<setting>.value()``; nothing in the package overwrites a module
global. A setting is changed for a block and restored after it, nested blocks included::

    >>> import lowrank_op
    >>> with lowrank_op.settings.cholqr2_min_aspect(8):
    ...     lowrank_op.settings.cholqr2_min_aspect.value()
    8
    >>> lowrank_op.settings.cholqr2_min_aspect.value()
    4

The stacks are per process and not thread-local, as linear_operator's are.
"""

from __future__ import annotations

import numbers
from typing import Any, ClassVar


class _Setting:
    """One named value with a default; ``with setting(v):`` overrides it for the block."""

    default: ClassVar[Any]
    _stack: ClassVar[list]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._stack = []

    def __init__(self, value: Any):
        self._value = self._validate(value)

    @classmethod
    def _validate(cls, value: Any) -> Any:
        return value

    @classmethod
    def value(cls) -> Any:
        """The value in force: the innermost ``with`` block's, else the default."""
        return cls._stack[-1] if cls._stack else cls.default

    def __enter__(self):
        type(self)._stack.append(self._value)
        return self

    def __exit__(self, *exc) -> bool:
        type(self)._stack.pop()
        return False


class _PositiveReal(_Setting):
    @classmethod
    def _validate(cls, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < float("inf"):
            raise ValueError(f"`{cls.__name__}` must be a positive finite number; got {value!r}.")
        return float(value)


class _PositiveInt(_Setting):
    @classmethod
    def _validate(cls, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
            raise ValueError(f"`{cls.__name__}` must be a positive integer; got {value!r}.")
        return int(value)


# --- Orthogonal-triangular factorisations (lowrank_op.kernels) ------------------------------------
class cholqr2_min_aspect(_PositiveReal):
    """``method="auto"`` orthogonalises a factor with CholeskyQR2 when it has at least this many
    rows per column; shorter factors use Householder QR, which is as fast there
    (bench/bench_svd.py). Default 4."""

    default = 4


class cholqr2_max_defect(_PositiveReal):
    """CholeskyQR2 is abandoned (and Householder QR used instead) when the Gram matrix of the first
    pass's Q deviates from the identity by more than this in Frobenius norm. Below it, the second
    pass gives a Q orthogonal to working precision (Yamamoto et al., 2015). Default 0.1."""

    default = 0.1


# --- Norms (lowrank_op.kernels) --------------------------------------------------------------------
class gram_norm_max_rel_error(_PositiveReal):
    """``norm(method="auto")`` uses the Gram-matrix formula unless its estimated relative error,
    ``eps / cancellation`` with ``cancellation = |sum(t)| / sum(|t|)`` over its terms ``t``,
    exceeds this; then it takes the norm of the QR core. Default 1e-6."""

    default = 1e-6


# --- Solves and determinants (lowrank_op.conditioning, lowrank_op.woodbury, lowrank_op.solves) ----
class ill_conditioned_rcond(_PositiveReal):
    """A factorisation is reported ill-conditioned (:class:`~lowrank_op.errors.IllConditionedWarning`)
    when its estimated 1-norm condition number exceeds ``1 / (ill_conditioned_rcond * eps)``: the
    result may then have no correct digits. SciPy's ``solve`` warns by the same rule with factor 1.
    In :mod:`lowrank_op.woodbury`, a 32-bit capacitance matrix past this limit is factorised again
    in 64 bits. Default 1."""

    default = 1.0


class condest_iterations(_PositiveInt):
    """Iterations of Hager's 1-norm estimator of ``|C^{-1}|_1``
    (:func:`lowrank_op.conditioning.inverse_norm1_estimate`), each one pair of triangular solves
    with one vector. LAPACK's ``xLACN2`` stops after at most 5. Default 5."""

    default = 5
