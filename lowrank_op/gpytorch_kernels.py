"""GPyTorch exact GPs on a feature map: :class:`FeatureKernel` and :class:`FactoredPredictionStrategy`.

A kernel ``k(x, x') = phi(x) phi(x')^T`` (random features, a deep kernel's last layer, any finite
basis) of rank ``m`` makes the train covariance ``K = Phi Phi^T + D`` low rank plus noise. Training
is exact already: GPyTorch's marginal log-likelihood evaluates the kernel and reaches
:class:`~lowrank_op.FactoredAddedDiag`, whose solves and log-determinant are exact (Woodbury). This
module makes *predictions* exact as well, under GPyTorch's default settings.

Where GPyTorch's default loses the structure
--------------------------------------------
GPyTorch chooses the prediction strategy from ``kernel.prediction_strategy``; a plain
``gpytorch.kernels.Kernel`` gives ``DefaultPredictionStrategy``. Its predictive mean solves on the
evaluated kernel (exact here), but its predictive covariance (``fast_pred_var`` off) calls
``train_train_covar.solve(...)`` on the *unevaluated* ``AddedDiagLinearOperator(
LazyEvaluatedKernelTensor, noise)``. linear_operator rebuilds that operator from its
representation as a plain ``AddedDiagLinearOperator(FactoredMatrix, noise)`` (its own class, not
``FactoredAddedDiag``) and, above ``max_cholesky_size`` (800), solves by preconditioned CG to
``eval_cg_tolerance`` (0.01): variances wrong by percent. With ``fast_pred_var`` on it takes a
Lanczos root of the same operator (about 1e-6 relative). And the predictive covariance it returns
is a dense-times-dense sum, so ``likelihood(pred).log_prob(y)`` at more than 800 test points runs CG
and stochastic Lanczos quadrature. There is no linear_operator or GPyTorch hook that turns that
rebuilt operator back into a ``FactoredAddedDiag``, so the fix sits one level up: the kernel names
its own prediction strategy, as GPyTorch's ``LinearKernel`` and ``RFFKernel`` do.

Why :class:`FactoredPredictionStrategy` is exact
------------------------------------------------
For a kernel of the form ``k(x, x') = a(x) b(x')^T`` (``FeatureKernel``: ``a = b = phi``; wrapped in
``ScaleKernel``: ``a = c phi``, ``b = phi``), with ``M = a_X b_X^T + D`` the train covariance with
noise and ``C = I + b_X^T D^{-1} a_X`` its ``m x m`` Woodbury capacitance matrix, the push-through
identity ``I - b_X^T M^{-1} a_X = C^{-1}`` gives the posterior covariance at test points as::

    K** - K*X M^{-1} KX* = a* b*^T - a* b_X^T M^{-1} a_X b*^T = a* C^{-1} b*^T,

a FactoredMatrix of rank ``m``, and the mean as ``mu* + K*X M^{-1} (y - mu)``. Both come from one
factorisation of ``C`` (the one ``FactoredAddedDiag`` makes; Cholesky when ``K`` is ``phi phi^T``
plus positive noise, then the covariance is ``U U^T`` with ``U = a* L^{-T}``, positive
semi-definite by construction). Nothing is subtracted, so there is no cancellation and no negative
variance in float32; no CG, Lanczos or stochastic estimate is involved, whatever ``fast_pred_var``,
``max_cholesky_size`` or ``max_eager_kernel_size`` say. ``likelihood(pred)`` is again a
``FactoredAddedDiag``, so the predictive ``log_prob`` is exact too.

Cost, ``N`` train points, ``n`` test points, ``m`` features: ``O(N m^2 + m^3)`` once per trained
model (the caches), then ``O((N + n) m + n m^2)`` per prediction; nothing ``N x N`` or ``n x N``
is formed.

Your own kernel
---------------
A ``gpytorch.kernels.Kernel`` subclass whose ``forward`` returns ``FactoredMatrix(f(x1),
f(x2).mT)`` (README's form) trains exactly but predicts through ``DefaultPredictionStrategy``.
Give it this module's strategy with one line, ``prediction_strategy = FactoredPredictionStrategy``
in the class body, or derive it from :class:`FeatureKernel`. The strategy needs the structure
above: ``forward(x1, x2)`` returns ``FactoredMatrix(a(x1), b(x2)^T)`` for fixed functions ``a``,
``b`` of one point each. When the operators it receives are not of that form (no FactoredMatrix,
no diagonal noise, ``observation_nan_policy`` other than ``"ignore"``) it warns
(:class:`~lowrank_op.errors.StructureWarning`) and runs GPyTorch's default instead.

*Not covered:* with ``gpytorch.settings.lazily_evaluate_kernels(False)`` GPyTorch never asks the
kernel for its strategy (it picks ``DefaultPredictionStrategy`` for every evaluated train
covariance). Solves then still reach ``FactoredAddedDiag`` (exact), but ``fast_pred_var`` takes a
Lanczos root and the predictive covariance is a dense-times-dense sum: keep the default.

Importing :mod:`lowrank_op` does not import gpytorch; importing this module does (the ``gpytorch``
extra).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable

import gpytorch
import torch
from gpytorch import settings as gpsettings
from gpytorch.models.exact_prediction_strategies import DefaultPredictionStrategy
from gpytorch.utils.memoize import cached, clear_cache_hook
from linear_operator.operators import LinearOperator, ZeroLinearOperator
from torch import Tensor

from lowrank_op import woodbury
from lowrank_op.added_diag import FactoredAddedDiag
from lowrank_op.errors import StructureWarning
from lowrank_op.factored import FactoredMatrix
from lowrank_op.woodbury import _is_adjoint_view, _root  # the structural test FactoredAddedDiag uses

__all__ = ["FeatureKernel", "FactoredPredictionStrategy"]


# --- tensor helpers -------------------------------------------------------------------------------
def _same_input(x1: Tensor, x2: Tensor) -> bool:
    """Whether ``x1`` and ``x2`` are the same points with the same autograd history.

    True for the same object, for two views of the same memory (GPyTorch slices the test block of
    the joint inputs twice), and, when neither records a gradient, for equal values. Two distinct
    tensors that require gradients are never merged: each must get its own gradient.
    """
    if x1 is x2:
        return True
    if x1.shape != x2.shape or x1.dtype != x2.dtype or x1.device != x2.device:
        return False
    if x1.requires_grad or x2.requires_grad:
        return (
            x1.stride() == x2.stride()
            and x1.storage_offset() == x2.storage_offset()
            and x1.untyped_storage().data_ptr() == x2.untyped_storage().data_ptr()
            and _root(x1) is _root(x2)
        )
    return torch.equal(x1, x2)


def capacitance_solve(factor: woodbury.WoodburyFactor, rhs: Tensor) -> Tensor:
    """``C^{-1} rhs`` for the capacitance matrix ``C`` of a :func:`lowrank_op.woodbury.factorize` result.

    Parameters
    ----------
    factor : WoodburyFactor
        Of ``A @ B + D`` with inner dim ``m``; not singular.
    rhs : Tensor, shape (..., m, k)

    Returns
    -------
    Tensor, shape (..., m, k)
        Leading dims broadcast. Cost ``O(m^2 k)``.
    """
    if factor.hermitian:
        return torch.cholesky_solve(rhs, factor.factor)
    return torch.linalg.lu_solve(factor.factor, factor.pivots, rhs)


def posterior_factors(factor: woodbury.WoodburyFactor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of the posterior covariance ``a C^{-1} b`` at test points (module docstring).

    Parameters
    ----------
    factor : WoodburyFactor
        Of the train covariance ``a_X b_X^T + D``, inner dim ``m``.
    a : Tensor, shape (..., n, m)
        The test points' left features (the left factor of ``K**``).
    b : Tensor, shape (..., m, n)
        The right factor of ``K**``.

    Returns
    -------
    left : Tensor, shape (..., n, m)
    right : Tensor, shape (..., m, n)
        ``left @ right`` is the posterior covariance. When ``C`` was Cholesky-factorised
        (``C = L L^H``) and ``b`` is the view ``a.mH``, ``right = L^{-1} a^H`` and ``left`` is the
        view ``right.mH``: positive semi-definite by construction, and ``left @ right + noise`` takes
        the Cholesky path again. Otherwise ``left = a`` and ``right = C^{-1} b``. Cost ``O(n m^2)``.
    """
    if factor.hermitian and _is_adjoint_view(a, b):
        right = torch.linalg.solve_triangular(factor.factor, a.mH, upper=False)
        return right.mH, right
    return a, capacitance_solve(factor, b)


# --- the kernel -----------------------------------------------------------------------------------
class FeatureKernel(gpytorch.kernels.Kernel):
    r"""``k(x1, x2) = phi(x1) phi(x2)^T`` as a :class:`~lowrank_op.FactoredMatrix`, exact in GPyTorch.

    Parameters
    ----------
    feature_map : callable, optional
        Maps inputs of shape ``(..., n, d)`` to features of shape ``(..., n, m)``; a
        ``torch.nn.Module`` is registered as a submodule, so its parameters train with the model
        (random Fourier features, a deep kernel's network). Leave it out and override
        :meth:`features` in a subclass instead.
    **kwargs
        Passed to ``gpytorch.kernels.Kernel`` (``batch_shape``, ``active_dims``, ...).

    Notes
    -----
    ``forward(x1, x2)`` returns ``FactoredMatrix(phi(x1), phi(x2).mT)`` (with ``B`` the view
    ``phi(x1).mT`` when ``x1`` and ``x2`` are the same points), so with a ``GaussianLikelihood`` the
    train covariance is a :class:`~lowrank_op.FactoredAddedDiag`: the marginal log-likelihood and its
    gradients are exact at ``O(N m^2 + m^3)``. :meth:`prediction_strategy` returns
    :class:`FactoredPredictionStrategy`, which makes the predictive mean, covariance, variances and
    ``log_prob`` exact under GPyTorch's default lazily evaluated kernels, whatever ``fast_pred_var``
    and ``max_cholesky_size`` say (module docstring: why, the cost, and the one setting not covered).
    ``ScaleKernel(FeatureKernel(...))`` keeps all of it. ``diag=True`` costs ``O(n m)``.
    ``last_dim_is_batch=True`` is not supported.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from lowrank_op.gpytorch_kernels import FeatureKernel
    >>> omega = torch.randn(2, 64, dtype=torch.float64)
    >>> kernel = FeatureKernel(lambda x: torch.cos(x @ omega) / 8)
    >>> x = torch.rand(1000, 2, dtype=torch.float64)
    >>> type(kernel(x).evaluate_kernel()).__name__
    'FactoredMatrix'
    """

    is_stationary = False

    def __init__(self, feature_map: Callable[[Tensor], Tensor] | None = None, **kwargs):
        if feature_map is not None and not callable(feature_map):
            raise TypeError(
                "`feature_map` must be a callable (e.g. a torch.nn.Module) mapping inputs of shape "
                f"(..., n, d) to features of shape (..., n, m); got {type(feature_map).__name__}."
            )
        super().__init__(**kwargs)
        self.feature_map = feature_map

    def features(self, x: Tensor) -> Tensor:
        """``phi(x)``, shape ``(..., n, m)``, for inputs ``x`` of shape ``(..., n, d)``.

        Calls ``feature_map``; override it in a subclass that has no ``feature_map``.
        """
        if self.feature_map is None:
            raise NotImplementedError(
                f"{type(self).__name__} has no `feature_map`: pass one, FeatureKernel(feature_map), or "
                "override `features(x)` in your subclass."
            )
        return self.feature_map(x)

    def _checked_features(self, name: str, x: Tensor) -> Tensor:
        phi = self.features(x)
        if not isinstance(phi, Tensor):
            raise TypeError(f"`features({name})` must return a torch.Tensor, got {type(phi).__name__}.")
        if phi.dim() < 2 or phi.shape[-2] != x.shape[-2]:
            raise ValueError(
                f"`features({name})` must return shape (..., {x.shape[-2]}, m) for `{name}` of shape "
                f"{tuple(x.shape)} (one row of features per point); got shape {tuple(phi.shape)}."
            )
        return phi

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, last_dim_is_batch: bool = False, **params):
        """``FactoredMatrix(phi(x1), phi(x2).mT)``, shape ``(..., n1, n2)``; the diagonal, ``(..., n)``, if ``diag``."""
        if last_dim_is_batch:
            raise ValueError(
                "`last_dim_is_batch=True` is not supported by FeatureKernel; give the inputs a batch "
                "dim instead (x.mT.unsqueeze(-1)) or apply the feature map per dimension in `features`."
            )
        same = _same_input(x1, x2)
        f1 = self._checked_features("x1", x1)
        f2 = f1 if same else self._checked_features("x2", x2)
        # Broadcast to the kernel's batch shape (views), so that ScaleKernel's batch of output
        # scales multiplies the factor (``_mul_constant``) instead of forming an elementwise product.
        batch = torch.broadcast_shapes(f1.shape[:-2], f2.shape[:-2], self.batch_shape)
        if diag:
            d = (f1 * f2).sum(-1)
            return d.expand(*batch, d.shape[-1])
        f1 = f1.expand(*batch, *f1.shape[-2:])
        f2 = f1 if same else f2.expand(*batch, *f2.shape[-2:])
        return FactoredMatrix(f1, f2.mT)

    def prediction_strategy(self, train_inputs, train_prior_dist, train_labels, likelihood):
        """:class:`FactoredPredictionStrategy`: exact predictions (GPyTorch calls this in eval mode)."""
        return FactoredPredictionStrategy(train_inputs, train_prior_dist, train_labels, likelihood)


# --- the prediction strategy ----------------------------------------------------------------------
def _nan_policy() -> str:
    """GPyTorch's ``observation_nan_policy`` ("ignore" where the GPyTorch release predates it)."""
    setting = getattr(gpsettings, "observation_nan_policy", None)
    return "ignore" if setting is None else setting.value()


def _fallback(what: str) -> None:
    warnings.warn(
        f"FactoredPredictionStrategy: {what}, so GPyTorch's DefaultPredictionStrategy runs instead; above "
        "`max_cholesky_size` it solves by CG and its results are approximate. Make the kernel's forward "
        "return FactoredMatrix(a(x1), b(x2).mT) and use a Gaussian likelihood with diagonal noise.",
        StructureWarning,
        stacklevel=4,
    )


class FactoredPredictionStrategy(DefaultPredictionStrategy):
    """GPyTorch's exact-GP prediction strategy for kernels ``a(x1) b(x2)^T`` given as FactoredMatrix.

    GPyTorch builds it (through ``kernel.prediction_strategy``) the first time an ``ExactGP`` in eval
    mode is called, with the train inputs, the train prior, the train targets and the likelihood.
    Its caches are the Woodbury factorisation of the train covariance and ``alpha = M^{-1} (y - mu)``;
    :meth:`exact_prediction` returns the posterior mean ``mu* + K*X alpha`` and the posterior
    covariance as the rank-``m`` :class:`~lowrank_op.FactoredMatrix` ``a* C^{-1} b*^T``.

    Notes
    -----
    Exact for the mean, the covariance, the variances and (through the likelihood) the predictive
    ``log_prob``, with ``fast_pred_var`` on or off, for batched models and with ``ScaleKernel``
    around the kernel; the module docstring gives the identity and the cost (``O(N m^2 + m^3)``
    once, ``O((N + n) m + n m^2)`` per prediction). With ``detach_test_caches`` on (GPyTorch's
    default) the caches carry no autograd graph; predictions stay differentiable in the test
    inputs. Fantasy updates recompute the caches, ``O((N + n_f) m^2 + m^3)``.
    """

    def __init__(self, train_inputs, train_prior_dist, train_labels, likelihood, root=None, inv_root=None):
        covar = train_prior_dist.lazy_covariance_matrix
        if hasattr(covar, "evaluate_kernel"):  # the unevaluated kernel loses the structure in solves
            covar = covar.evaluate_kernel()
        train_prior_dist = train_prior_dist.__class__(train_prior_dist.mean, covar)
        super().__init__(train_inputs, train_prior_dist, train_labels, likelihood, root=root, inv_root=inv_root)

    # --- caches -----------------------------------------------------------------------------------
    @property
    @cached(name="factored_cache")
    def factored_cache(self) -> tuple[woodbury.WoodburyFactor, Tensor] | None:
        """``(factor, alpha)``: the Woodbury factorisation of ``M = K_XX + D`` and ``M^{-1} (y - mu)``,
        shape ``(..., N)``; None when ``M`` is not a :class:`~lowrank_op.FactoredAddedDiag`."""
        M = self.lik_train_train_covar
        if not isinstance(M, FactoredAddedDiag):
            return None
        offset = self.train_labels - self.train_prior_dist.mean
        if gpsettings.detach_test_caches.on():
            M, offset = M.detach(), offset.detach()
        factor = M._checked_factorization(stacklevel=3, need_nonsingular=True)
        alpha = woodbury.solve(factor, offset.unsqueeze(-1)).squeeze(-1)
        if alpha.grad_fn is not None:  # the caches belong to one graph: drop them after backward
            wrapper = functools.partial(clear_cache_hook, self)
            functools.update_wrapper(wrapper, clear_cache_hook)
            alpha.grad_fn.register_hook(wrapper)
        return factor, alpha

    def _mean_cache(self, nan_policy: str) -> Tensor:
        cache = self.factored_cache if nan_policy == "ignore" else None
        return super()._mean_cache(nan_policy) if cache is None else cache[1]

    # --- predictions ------------------------------------------------------------------------------
    def exact_prediction(self, test_mean: Tensor, test_test_covar, test_train_covar):
        """Posterior mean, shape ``(..., n)``, and covariance, shape ``(..., n, n)`` (a FactoredMatrix).

        Parameters
        ----------
        test_mean : Tensor, shape (..., n)
        test_test_covar : FactoredMatrix, shape (..., n, n)
            ``K**``, whose factors ``a*`` and ``b*^T`` give the covariance ``a* C^{-1} b*^T``.
        test_train_covar : LinearOperator or Tensor, shape (..., n, N)
            ``K*X``, for the mean.

        Unlike GPyTorch's default, the test covariances are never made dense (not even below
        ``max_eager_kernel_size``).
        """
        return (
            self.exact_predictive_mean(test_mean, test_train_covar),
            self.exact_predictive_covar(test_test_covar, test_train_covar),
        )

    def exact_predictive_mean(self, test_mean: Tensor, test_train_covar) -> Tensor:
        """``mu* + K*X M^{-1} (y - mu)``, shape ``(..., n)``; ``O((N + n) m)`` given the caches."""
        if _nan_policy() != "ignore":
            _fallback("`observation_nan_policy` is not 'ignore'")
            return super().exact_predictive_mean(test_mean, test_train_covar)
        if self.factored_cache is None:
            _fallback(f"the train covariance with noise is a {type(self.lik_train_train_covar).__name__}")
            return super().exact_predictive_mean(test_mean, test_train_covar)
        alpha = self.factored_cache[1]
        return test_mean + test_train_covar.matmul(alpha.unsqueeze(-1)).squeeze(-1)

    def exact_predictive_covar(self, test_test_covar, test_train_covar) -> LinearOperator:
        """``K** - K*X M^{-1} KX*`` as the FactoredMatrix ``a* C^{-1} b*^T``, shape ``(..., n, n)``; ``O(n m^2)``."""
        if gpsettings.skip_posterior_variances.on():
            return ZeroLinearOperator(*test_test_covar.size(), dtype=test_test_covar.dtype, device=test_test_covar.device)
        if hasattr(test_test_covar, "evaluate_kernel"):
            test_test_covar = test_test_covar.evaluate_kernel()
        cache = self.factored_cache
        if cache is None or not isinstance(test_test_covar, FactoredMatrix):
            what = (
                f"the train covariance with noise is a {type(self.lik_train_train_covar).__name__}"
                if cache is None
                else f"the test covariance is a {type(test_test_covar).__name__}"
            )
            _fallback(what + ", not a FactoredAddedDiag and a FactoredMatrix")
            return super().exact_predictive_covar(test_test_covar, test_train_covar)
        factor = cache[0]
        m = factor.factor.shape[-1]
        if test_test_covar.mdim != m:
            raise ValueError(
                f"the test covariance has inner dim {test_test_covar.mdim} but the train covariance {m}: "
                "the kernel must use the same features for every input, forward(x1, x2) = "
                "FactoredMatrix(a(x1), b(x2).mT)."
            )
        return FactoredMatrix(*posterior_factors(factor, test_test_covar._A, test_test_covar._B))

    def get_fantasy_strategy(self, inputs, targets, full_inputs, full_targets, full_output, **kwargs):
        """A new strategy on the train data plus the fantasy points, its caches recomputed."""
        prior = full_output.__class__(full_output.mean, full_output.lazy_covariance_matrix)
        fantasy_likelihood = self.likelihood.get_fantasy_likelihood(**kwargs)
        return self.__class__(full_inputs, prior, full_targets, fantasy_likelihood)
