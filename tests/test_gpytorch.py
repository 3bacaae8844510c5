"""An exact GPyTorch GP whose covariance is a low-rank FactoredMatrix kernel plus Gaussian noise.

The kernel returns ``FactoredMatrix(phi(x1), phi(x2).mT)`` with ``phi`` random Fourier features of
an RBF kernel (learned lengthscale and outputscale); GaussianLikelihood adds its noise, and the
marginal covariance becomes a :class:`~lowrank_op.FactoredAddedDiag`, whose ``inv_quad_logdet`` is
exact (Woodbury, determinant lemma) at ``n`` above linear_operator's ``max_cholesky_size``, where
GPyTorch would otherwise run CG and stochastic Lanczos quadrature. gpytorch is a test-only extra.
"""

from __future__ import annotations

import ast
import contextlib
import math
from pathlib import Path
from unittest.mock import MagicMock, patch

import gpytorch  # in the `test` extra: a missing install fails here rather than skipping
import linear_operator
import pytest
import torch

from lowrank_op import FactoredAddedDiag, FactoredMatrix
from lowrank_op.errors import StructureWarning
from lowrank_op.gpytorch_kernels import FactoredPredictionStrategy, FeatureKernel

N, D_IN, RANK = 1000, 2, 24  # N above max_cholesky_size (800): GPyTorch's default would be CG


class RandomFeatureKernel(gpytorch.kernels.Kernel):
    """``k(x1, x2) = phi(x1) phi(x2)^T``, ``phi(x) = sqrt(2 s / R) cos(x Omega / l + b)``: rank ``R``."""

    is_stationary = False

    def __init__(self, d_in: int, rank: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", torch.randn(d_in, rank, generator=gen, dtype=torch.float64))
        self.register_buffer("phase", 2 * math.pi * torch.rand(rank, generator=gen, dtype=torch.float64))
        self.register_parameter("raw_lengthscale", torch.nn.Parameter(torch.zeros((), dtype=torch.float64)))
        self.register_parameter("raw_outputscale", torch.nn.Parameter(torch.zeros((), dtype=torch.float64)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        lengthscale = torch.nn.functional.softplus(self.raw_lengthscale)
        outputscale = torch.nn.functional.softplus(self.raw_outputscale)
        rank = self.omega.shape[-1]
        return torch.sqrt(2 * outputscale / rank) * torch.cos(x @ self.omega / lengthscale + self.phase)

    def forward(self, x1, x2, diag=False, **params):
        f1 = self.features(x1)
        # Same inputs: reuse the features, so B is the view f1.mT and the solve takes Cholesky.
        f2 = f1 if (x1 is x2 or torch.equal(x1, x2)) else self.features(x2)
        if diag:
            return (f1 * f2).sum(-1)
        return FactoredMatrix(f1, f2.mT)


class LowRankGP(gpytorch.models.ExactGP):
    def __init__(self, train_x, train_y, likelihood):
        super().__init__(train_x, train_y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = RandomFeatureKernel(D_IN, RANK)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(N, D_IN, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(2 * x[:, 0]) * torch.cos(x[:, 1]) + 0.1 * torch.randn(N, generator=gen, dtype=torch.float64)
    return x, y


def make_model():
    x, y = data()
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = LowRankGP(x, y, likelihood).double()
    model.train()
    likelihood.train()
    return model, likelihood, x, y


def dense_marginal_log_likelihood(model, likelihood, x, y):
    """The same model computed densely: MultivariateNormal on K + sigma^2 I, divided by n."""
    phi = model.covar_module.features(x)
    K = phi @ phi.mT + likelihood.noise * torch.eye(N, dtype=torch.float64)
    mean = model.mean_module(x)
    return torch.distributions.MultivariateNormal(mean, covariance_matrix=K).log_prob(y) / N


def test_marginal_log_likelihood_and_gradients_match_dense_without_iterative_methods():
    model, likelihood, x, y = make_model()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    assert len(params) == 4  # mean constant, noise, lengthscale, outputscale

    cg = MagicMock(wraps=linear_operator.utils.linear_cg)
    lanczos = MagicMock(wraps=linear_operator.utils.lanczos.lanczos_tridiag)
    with patch("linear_operator.utils.linear_cg", new=cg), patch(
        "linear_operator.utils.lanczos.lanczos_tridiag", new=lanczos
    ):
        output = model(x)
        marginal = likelihood(output)
        covar = marginal.lazy_covariance_matrix.evaluate_kernel()
        assert isinstance(covar, FactoredAddedDiag)
        assert covar._factorization().hermitian  # B is the view phi.mT, noise > 0: Cholesky
        log_prob = marginal.log_prob(y)
        value = mll(output, y)
        grads = torch.autograd.grad(value, params)
    assert not cg.called and not lanczos.called

    reference = dense_marginal_log_likelihood(model, likelihood, x, y)
    torch.testing.assert_close(log_prob / N, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(reference, params)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_short_training_loop_lowers_the_loss():
    model, likelihood, x, y = make_model()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach().item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.3, losses
    # The trained model's loss still agrees with the dense computation.
    with torch.no_grad():
        final = -mll(model(x), y)
        reference = -dense_marginal_log_likelihood(model, likelihood, x, y)
        torch.testing.assert_close(final, reference, rtol=1e-10, atol=1e-12)


# ==================================================================================================
# Exact predictions: lowrank_op.gpytorch_kernels (FeatureKernel, FactoredPredictionStrategy)
# ==================================================================================================

#: Every iterative entry point of linear_operator, under each name it is called by.
ITERATIVE = (
    "linear_operator.utils.linear_cg",
    "linear_operator.utils.minres",
    "linear_operator.utils.contour_integral_quad",
    "linear_operator.utils.contour_integral_quad.linear_cg",
    "linear_operator.utils.contour_integral_quad.minres",
    "linear_operator.utils.lanczos.lanczos_tridiag",
    "linear_operator.utils.stochastic_lq.lanczos_tridiag",
)


@contextlib.contextmanager
def no_iterative_methods():
    """Every CG, MINRES and Lanczos entry point raises; afterwards none may have been called."""
    mocks = [MagicMock(side_effect=AssertionError(f"{name} was called")) for name in ITERATIVE]
    with contextlib.ExitStack() as stack:
        for name, mock in zip(ITERATIVE, mocks):
            stack.enter_context(patch(name, new=mock))
        yield
    called = [name for name, mock in zip(ITERATIVE, mocks) if mock.called]
    assert not called, called


class FourierFeatures(torch.nn.Module):
    """``phi(x) = sqrt(2 / R) cos(x Omega / l + b)``, a learned lengthscale, optionally batched."""

    def __init__(self, d_in, rank, batch_shape=(), dtype=torch.float64, seed=0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("omega", torch.randn(*batch_shape, d_in, rank, generator=gen).to(dtype))
        self.register_buffer("phase", (2 * math.pi * torch.rand(*batch_shape, 1, rank, generator=gen)).to(dtype))
        self.raw_lengthscale = torch.nn.Parameter(torch.full((*batch_shape, 1, 1), -0.5, dtype=dtype))

    def forward(self, x):
        lengthscale = torch.nn.functional.softplus(self.raw_lengthscale)
        return math.sqrt(2 / self.omega.shape[-1]) * torch.cos(x @ self.omega / lengthscale + self.phase)


class FeatureGP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, covar_module, batch_shape=()):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size(batch_shape))
        self.covar_module = covar_module

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


class OptedInKernel(RandomFeatureKernel):
    """README's plain kernel, given this project's prediction strategy with one line."""

    prediction_strategy = FactoredPredictionStrategy


def gp_data(n, n_test, batch_shape=(), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*batch_shape, n + n_test, D_IN, generator=gen, dtype=torch.float64) * 4
    y = torch.sin(2 * x[..., 0]) * torch.cos(x[..., 1]) + 0.1 * torch.randn(x.shape[:-1], generator=gen, dtype=torch.float64)
    return x[..., :n, :].to(dtype), y[..., :n].to(dtype), x[..., n:, :].to(dtype), y[..., n:].to(dtype)


def build(kind, x, y, batch_shape=(), dtype=torch.float64, rank=16, noise=0.05):
    """A model in eval mode: ``kind`` is "feature", "scaled" (ScaleKernel around it) or "opted_in"."""
    bs = torch.Size(batch_shape)
    if kind == "opted_in":
        kernel = OptedInKernel(D_IN, rank).to(dtype)
    else:
        kernel = FeatureKernel(FourierFeatures(D_IN, rank, batch_shape, dtype), batch_shape=bs)
        if kind == "scaled":
            kernel = gpytorch.kernels.ScaleKernel(kernel, batch_shape=bs)
            kernel.outputscale = torch.linspace(1.5, 2.5, max(bs.numel(), 1)).reshape(bs)
    likelihood = gpytorch.likelihoods.GaussianLikelihood(batch_shape=bs)
    model = FeatureGP(x, y, likelihood, kernel, batch_shape).to(dtype)
    likelihood.noise = noise
    model.mean_module.constant.data.fill_(0.1)
    model.eval()
    likelihood.eval()
    return model, likelihood


def features_and_scale(model, x):
    """The model's own features at ``x`` (float64) and the constant ``c`` with ``k = c phi phi^T``."""
    kernel = model.covar_module
    with torch.no_grad():
        if isinstance(kernel, gpytorch.kernels.ScaleKernel):
            return kernel.base_kernel.features(x).double(), kernel.outputscale.double()[..., None, None]
        return kernel.features(x).double(), torch.ones((), dtype=torch.float64)


def dense_posterior(model, likelihood, x, y, x_test, y_test):
    """The same GP, dense in float64: mean, covariance, ``log p(y_test)``, and kappa(C)."""
    phi, c = features_and_scale(model, x)
    phi_t, _ = features_and_scale(model, x_test)
    noise = likelihood.noise.detach().double()[..., None]  # (..., 1, 1)
    mu = model.mean_module.constant.detach().double()[..., None]
    n = x.shape[-2]
    K = c * phi @ phi.mT + noise * torch.eye(n, dtype=torch.float64)
    K_st = c * phi_t @ phi.mT
    mean = mu + (K_st @ torch.linalg.solve(K, (y.double() - mu).unsqueeze(-1))).squeeze(-1)
    cov = c * phi_t @ phi_t.mT - K_st @ torch.linalg.solve(K, K_st.mT)
    eye_t = torch.eye(x_test.shape[-2], dtype=torch.float64)
    log_prob = torch.distributions.MultivariateNormal(mean, cov + noise * eye_t).log_prob(y_test.double())
    C = torch.eye(phi.shape[-1], dtype=torch.float64) + c * phi.mT @ phi / noise
    return mean, cov, log_prob, torch.linalg.cond(C).max()


def assert_small(err, bound, what):
    err, bound = float(torch.as_tensor(err).detach()), float(torch.as_tensor(bound).detach())
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g}"


CASES = [
    pytest.param("feature", (), id="feature"),
    pytest.param("scaled", (), id="scaled"),
    pytest.param("opted_in", (), id="opted_in"),
    pytest.param("scaled", (2,), id="scaled-batch2"),
]


@pytest.mark.parametrize("fast_pred_var", [False, True], ids=["exact_var", "fast_pred_var"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, batch_shape", CASES)
def test_predictions_match_dense_without_iterative_methods(kind, batch_shape, dtype, fast_pred_var):
    # max_cholesky_size(0): at this small N GPyTorch's generic path would otherwise use Cholesky.
    x, y, x_test, y_test = gp_data(120, 40, batch_shape, dtype)
    model, likelihood = build(kind, x, y, batch_shape, dtype)
    with no_iterative_methods(), gpytorch.settings.max_cholesky_size(0), gpytorch.settings.fast_pred_var(fast_pred_var):
        pred = model(x_test)
        assert isinstance(model.prediction_strategy, FactoredPredictionStrategy)
        assert isinstance(pred.lazy_covariance_matrix, FactoredMatrix)
        # phi phi^T + noise is factorised by Cholesky; ScaleKernel's c phi phi^T (c on A) by LU.
        assert model.prediction_strategy.factored_cache[0].hermitian == (kind != "scaled")
        mean, var, cov = pred.mean, pred.variance, pred.covariance_matrix
        marginal = likelihood(pred)
        assert isinstance(marginal.lazy_covariance_matrix, FactoredAddedDiag)
        log_prob = marginal.log_prob(y_test)
    ref_mean, ref_cov, ref_log_prob, kappa = dense_posterior(model, likelihood, x, y, x_test, y_test)
    assert mean.dtype == var.dtype == log_prob.dtype == dtype
    assert mean.shape == var.shape == (*batch_shape, 40) and cov.shape == (*batch_shape, 40, 40)
    # Backward-stable errors: eps times kappa(C) times the size of what is computed (a 20x margin).
    bound = 20 * torch.finfo(dtype).eps * kappa
    prior_var = ref_cov.diagonal(dim1=-2, dim2=-1).max() + (ref_mean - 0.1).abs().max()
    assert_small((mean.double() - ref_mean).abs().max(), bound * (1 + y.abs().max()), "mean")
    assert_small((cov.double() - ref_cov).abs().max(), bound * prior_var, "covariance")
    assert_small((var.double() - ref_cov.diagonal(dim1=-2, dim2=-1)).abs().max(), bound * prior_var, "variance")
    assert bool((var > 0).all())  # a * C^{-1} * b: nothing subtracted, no negative variances in float32
    assert_small((log_prob.double() - ref_log_prob).abs().max(), bound * (ref_log_prob.abs().max() + 40), "log_prob")


@pytest.mark.parametrize("kind, batch_shape", [CASES[0], CASES[3]])
def test_train_mode_marginal_log_likelihood_matches_dense(kind, batch_shape):
    x, y, _, _ = gp_data(150, 0, batch_shape)
    model, likelihood = build(kind, x, y, batch_shape)
    model.train()
    likelihood.train()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    params = [p for p in model.parameters() if p.requires_grad]
    with no_iterative_methods(), gpytorch.settings.max_cholesky_size(0):
        value = mll(model(x), y)
        grads = torch.autograd.grad(value.sum(), params)
    phi, c = features_and_scale(model, x)  # detached: recompute with the graph for the reference
    kernel = model.covar_module
    base = kernel.base_kernel if isinstance(kernel, gpytorch.kernels.ScaleKernel) else kernel
    scale = kernel.outputscale[..., None, None] if base is not kernel else 1.0
    phi = base.features(x)
    K = scale * phi @ phi.mT + likelihood.noise[..., None] * torch.eye(150, dtype=torch.float64)
    mu = model.mean_module(x)
    reference = torch.distributions.MultivariateNormal(mu, covariance_matrix=K).log_prob(y) / 150
    torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(reference.sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)


def test_n2000_default_settings_within_1e8_of_dense():
    """The issue's case: N = 2000, float64, GPyTorch's default settings, small noise."""
    x, y, x_test, y_test = gp_data(2000, 300)
    model, likelihood = build("scaled", x, y, rank=24, noise=0.01)
    with no_iterative_methods():
        pred = model(x_test)
        mean, var = pred.mean, pred.variance
        log_prob = likelihood(pred).log_prob(y_test)
    ref_mean, ref_cov, ref_log_prob, kappa = dense_posterior(model, likelihood, x, y, x_test, y_test)
    assert float(kappa) * torch.finfo(torch.float64).eps < 1e-10  # so 1e-8 has a margin of 100
    assert_small((mean - ref_mean).abs().max(), 1e-8, "mean")
    assert_small((var - ref_cov.diagonal()).abs().max(), 1e-8, "variance")
    assert_small((var / ref_cov.diagonal() - 1).abs().max(), 1e-8, "relative variance")
    assert_small((log_prob - ref_log_prob).abs() / ref_log_prob.abs(), 1e-10, "log_prob")


def test_gradients_in_the_test_inputs_match_dense():
    x, y, x_test, _ = gp_data(100, 20)
    model, likelihood = build("scaled", x, y)
    x_test = x_test.clone().requires_grad_(True)
    with no_iterative_methods():
        pred = model(x_test)
        (pred.mean.sum() + pred.variance.sum()).backward()
    got = x_test.grad
    x_ref = x_test.detach().clone().requires_grad_(True)
    phi, c = features_and_scale(model, x)
    with torch.enable_grad():
        phi_t = model.covar_module.base_kernel.features(x_ref)
        noise = likelihood.noise.detach()
        K = c * phi @ phi.mT + noise * torch.eye(100, dtype=torch.float64)
        K_st = c * phi_t @ phi.mT
        mean = 0.1 + K_st @ torch.linalg.solve(K, y - 0.1)
        var = (c * phi_t * phi_t).sum(-1) - (K_st * torch.linalg.solve(K, K_st.mT).mT).sum(-1)
        (mean.sum() + var.sum()).backward()
    torch.testing.assert_close(got, x_ref.grad, rtol=1e-9, atol=1e-11)


def test_hyperparameter_gradients_of_predictions_without_detached_caches():
    x, y, x_test, _ = gp_data(100, 20)
    model, likelihood = build("feature", x, y)
    params = [model.covar_module.feature_map.raw_lengthscale, likelihood.noise_covar.raw_noise]
    with gpytorch.settings.detach_test_caches(False), no_iterative_methods():
        pred = model(x_test)
        got = torch.autograd.grad(pred.mean.sum() + pred.variance.sum(), params)
    phi, phi_t = (model.covar_module.features(z) for z in (x, x_test))
    K = phi @ phi.mT + likelihood.noise * torch.eye(100, dtype=torch.float64)
    K_st = phi_t @ phi.mT
    mean = 0.1 + K_st @ torch.linalg.solve(K, y - 0.1)
    var = (phi_t * phi_t).sum(-1) - (K_st * torch.linalg.solve(K, K_st.mT).mT).sum(-1)
    for g, w in zip(got, torch.autograd.grad(mean.sum() + var.sum(), params)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_fantasy_model_matches_a_model_on_all_the_data():
    x, y, x_test, y_test = gp_data(100, 30)
    model, _ = build("feature", x, y)
    model(x_test[:1])  # GPyTorch builds the strategy at the first prediction
    fantasy = model.get_fantasy_model(x_test[:10], y_test[:10])
    assert isinstance(fantasy.prediction_strategy, FactoredPredictionStrategy)
    full, _ = build("feature", torch.cat([x, x_test[:10]]), torch.cat([y, y_test[:10]]))
    with no_iterative_methods():
        got, want = fantasy(x_test[10:]), full(x_test[10:])
    torch.testing.assert_close(got.mean, want.mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.covariance_matrix, want.covariance_matrix, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("x_shape", [(7, D_IN), (3, 7, D_IN)])
def test_kernel_matrix_and_diagonal_broadcast_to_the_kernel_batch(x_shape):
    kernel = FeatureKernel(FourierFeatures(D_IN, 5), batch_shape=torch.Size([3]))
    x = torch.rand(*x_shape, dtype=torch.float64)
    with gpytorch.settings.debug(True):
        K = kernel(x).evaluate_kernel()
        d = kernel(x, diag=True)
    phi = kernel.features(x)
    assert isinstance(K, FactoredMatrix) and K.shape == (3, 7, 7) and d.shape == (3, 7)
    torch.testing.assert_close(K.to_dense(), (phi @ phi.mT).expand(3, 7, 7), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(d, K.to_dense().diagonal(dim1=-2, dim2=-1), rtol=1e-12, atol=1e-14)


def test_skip_posterior_variances_gives_zero_covariance():
    x, y, x_test, _ = gp_data(50, 10)
    model, _ = build("feature", x, y)
    with gpytorch.settings.skip_posterior_variances():
        pred = model(x_test)
    assert isinstance(pred.lazy_covariance_matrix, linear_operator.operators.ZeroLinearOperator)
    assert pred.lazy_covariance_matrix.shape == (10, 10)


class DenseFeatureKernel(FeatureKernel):
    """Returns a dense matrix: the structure FactoredPredictionStrategy needs is missing."""

    def forward(self, x1, x2, diag=False, **params):
        out = super().forward(x1, x2, diag=diag, **params)
        return out if diag else out.to_dense()


def test_missing_structure_warns_and_falls_back_to_gpytorch():
    x, y, x_test, _ = gp_data(50, 10)
    kernel = DenseFeatureKernel(FourierFeatures(D_IN, 8))
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = FeatureGP(x, y, likelihood, kernel).double().eval()
    with pytest.warns(StructureWarning, match=r"the train covariance with noise is a AddedDiagLinearOperator.*DefaultPredictionStrategy runs instead"):
        pred = model(x_test)
    with torch.no_grad():
        K = kernel(x, x).to_dense() + likelihood.noise * torch.eye(50, dtype=torch.float64)
        K_st = kernel(x_test, x).to_dense()
        mean = model.mean_module.constant + K_st @ torch.linalg.solve(K, y - model.mean_module.constant)
    torch.testing.assert_close(pred.mean.detach(), mean, rtol=1e-9, atol=1e-11)  # small N: Cholesky


def test_nan_policy_other_than_ignore_warns():
    x, y, x_test, _ = gp_data(50, 10)
    model, _ = build("feature", x, y)
    with gpytorch.settings.observation_nan_policy("mask"), pytest.warns(
        StructureWarning, match=r"`observation_nan_policy` is not 'ignore'"
    ):
        model(x_test)


# --- bad input ------------------------------------------------------------------------------------
def test_feature_map_must_be_callable():
    with pytest.raises(TypeError, match=r"`feature_map` must be a callable \(e\.g\. a torch\.nn\.Module\).*got int"):
        FeatureKernel(3)


def test_features_must_be_given():
    x = torch.rand(5, 2, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=r"FeatureKernel has no `feature_map`: pass one.*override `features\(x\)`"):
        FeatureKernel()(x).evaluate_kernel()


@pytest.mark.parametrize(
    "feature_map, exc, match",
    [
        (lambda x: x.sum(-1), ValueError, r"`features\(x1\)` must return shape \(\.\.\., 5, m\) for `x1` of shape \(5, 2\).*got shape \(5,\)"),
        (lambda x: x[:-1], ValueError, r"`features\(x1\)` must return shape \(\.\.\., 5, m\).*got shape \(4, 2\)"),
        (lambda x: x.tolist(), TypeError, r"`features\(x1\)` must return a torch\.Tensor, got list"),
    ],
)
def test_features_must_have_a_row_per_point(feature_map, exc, match):
    with pytest.raises(exc, match=match):
        FeatureKernel(feature_map)(torch.rand(5, 2, dtype=torch.float64)).evaluate_kernel()


def test_last_dim_is_batch_is_refused():
    kernel = FeatureKernel(lambda x: x)
    with pytest.raises(ValueError, match=r"`last_dim_is_batch=True` is not supported by FeatureKernel"):
        kernel.forward(torch.rand(5, 2), torch.rand(5, 2), last_dim_is_batch=True)


class NarrowTestKernel(gpytorch.kernels.Kernel):
    """Opted in, but K** uses fewer features than K_XX: not of the form a(x1) b(x2)^T."""

    prediction_strategy = FactoredPredictionStrategy

    def forward(self, x1, x2, diag=False, **params):
        width = 6 if x1.shape[-2] == x2.shape[-2] == 10 else 8
        return FactoredMatrix(torch.cos(x1 @ self.omega)[..., :width], torch.cos(x2 @ self.omega)[..., :width].mT)


def test_test_features_of_another_width_are_refused():
    x, y, x_test, _ = gp_data(50, 10)
    kernel = NarrowTestKernel()
    kernel.register_buffer("omega", torch.randn(D_IN, 8, dtype=torch.float64))
    model = FeatureGP(x, y, gpytorch.likelihoods.GaussianLikelihood().double(), kernel).double().eval()
    with pytest.raises(ValueError, match=r"the test covariance has inner dim 6 but the train covariance 8"):
        model(x_test)


def test_importing_lowrank_op_does_not_import_gpytorch():
    package = Path(FactoredMatrix.__module__.replace(".", "/")).parent
    root = Path(__file__).resolve().parent.parent / package
    importers = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name.split(".")[0] == "gpytorch" for name in names):
                importers.append(path.name)
    assert sorted(set(importers)) == ["gpytorch_kernels.py"]
    assert "gpytorch_kernels" not in (root / "__init__.py").read_text()
