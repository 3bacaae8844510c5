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

import math
import numbers
from dataclasses import dataclass, fields, replace
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


# --- Norms of every pairwise product (lowrank_op.pairwise_norms) ----------------------------------
class pairwise_gram_block(_PositiveInt):
    """Edge of the Gram-matrix blocks :func:`lowrank_op.pairwise_norms.gram_pair_sq_norms` forms
    for every matrix at once (``block x block`` each). The blocks on and above the diagonal cover
    the fraction ``(1 + block / k) / 2`` of each ``k x k`` Gram matrix, so smaller blocks form less
    of it, in smaller (slower per multiply-add) matrix products; 96 was fastest at GPT-2 small's shapes on 2 cores (bench/bench_composition.py).
    Default 96."""

    default = 96


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

# --- Top k: the cost model of svds/eigs(method="auto") and the check of Krylov results -------------
# (imports kept in this block so that it merges as one piece)


@dataclass(frozen=True)
class TopkCostModel:
    """The constants of :func:`lowrank_op.topk.plan`, in seconds per unit of work.

    Fitted to timings on the project's machine kind (2 cores, float32, 2 threads) of the exact
    paths and of single applications at ldim = rdim = 20000, mdim 256 to 4000. Only their ratios
    matter: they turn the exact path's cost into a number of operator applications, the budget
    ARPACK is given. bench/bench_topk.py prints each plan and budget beside the measured times and
    applications, to re-check them on other hardware.

    Attributes
    ----------
    exact_svd_seconds_per_unit : float
        Exact SVD with vectors, per unit of ``(ldim + rdim) mdim^2 + mdim^3``.
    exact_svdvals_seconds_per_unit : float
        Exact singular values only (no Q, U or V formed), per the same unit.
    exact_eig_seconds_per_unit : float
        Exact eigenvalues, per unit of ``ldim mdim n + eig_cubic_weight n^3``, ``n = min(ldim,
        mdim)`` (forming the ``n x n`` matrix, then its non-symmetric eigenvalue problem).
    eig_cubic_weight : float
    application_seconds_per_unit : float
        One application of the operator to a vector inside ARPACK (its own work included), per
        unit of ``(ldim + rdim) mdim``: ARPACK's time over its applications, flat spectra.
    application_overhead_seconds : float
        The fixed cost of one application: conversions and ARPACK's Python-level loop. Positive.
    auto_min_krylov_runs : float
        ``"auto"`` runs ARPACK only when the exact path's cost buys at least this many of ARPACK's
        cheapest possible runs (one Krylov basis of ``ncv = max(2k + 1, 20)`` vectors). At k = 10,
        ARPACK's SVD converged within 1.6 of them (66 applications) on decaying spectra and took 6
        to 14 (250 to 566) on flat ones; Arnoldi took 2.2 to 2.6 on decaying, 12 to 142 on flat
        ones. With 2, "auto" switched at mdim 512 (ldim = rdim = 20000), gaining 1.24x on a
        decaying spectrum and losing 2.7x on a flat one (budget spent, then exact); 4 moves the
        switch to about 800.
    """

    exact_svd_seconds_per_unit: float = 8e-11
    exact_svdvals_seconds_per_unit: float = 5.5e-11
    exact_eig_seconds_per_unit: float = 3.5e-11
    eig_cubic_weight: float = 1.0
    application_seconds_per_unit: float = 1.9e-10
    application_overhead_seconds: float = 2.3e-3
    auto_min_krylov_runs: float = 4.0


class topk_cost_model(_Setting):
    """The :class:`TopkCostModel` that ``svds``/``eigs(method="auto")`` plan with.

    Change some constants for a block, the others keeping the values in force when the setting
    is made::

        with lowrank_op.settings.topk_cost_model(application_overhead_seconds=1e-3):
            lowrank_op.topk.plan("svdvals", 20000, 1000, 20000, 10)

    or pass a whole :class:`TopkCostModel` as the one positional argument. Every constant must
    be a non-negative finite number, ``application_overhead_seconds`` a positive one.
    """

    default = TopkCostModel()

    def __init__(self, model: TopkCostModel | None = None, /, **overrides: float):
        if model is None:
            model = type(self).value()
        elif not isinstance(model, TopkCostModel):
            raise TypeError(f"`model` must be a TopkCostModel; got {type(model).__name__}.")
        names = {f.name for f in fields(TopkCostModel)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(
                f"unknown cost-model constant(s) {', '.join(unknown)}; the constants are "
                f"{', '.join(sorted(names))}."
            )
        super().__init__(replace(model, **overrides))

    @classmethod
    def _validate(cls, value: TopkCostModel) -> TopkCostModel:
        for f in fields(value):
            x = getattr(value, f.name)
            positive = f.name == "application_overhead_seconds"
            number = not isinstance(x, bool) and isinstance(x, numbers.Real)
            if not (number and math.isfinite(x) and (x > 0 if positive else x >= 0)):
                rule = "a positive" if positive else "a non-negative"
                raise ValueError(f"`{f.name}` of `topk_cost_model` must be {rule} finite number; got {x!r}.")
        return value


class krylov_residual_factor(_PositiveReal):
    """ARPACK's eigenpairs are accepted when every residual ``|M x - lambda x|`` (computed in
    float64 from the factors, ``|x| = 1``) is at most ``(tol + factor * eps * sqrt(p)) * s``:
    ``tol`` the caller's, ``eps`` the operator's precision, ``p`` the inner dim of the product
    Arnoldi ran on (the length of the dot products in one application, whose rounding the
    residual carries) and ``s = max_i |M x_i|`` (a lower bound of ``|M|_2``, at least
    ``|lambda_1|``). ARPACK's own test uses estimated residuals, which rounding can make too
    optimistic. Default 30: converged pairs of seeded Gaussian products (float32 and float64,
    p = 400 to 3000, flat and decaying spectra) had residuals of 0.3 to 4 times
    ``eps * sqrt(p) * s``."""

    default = 30.0
