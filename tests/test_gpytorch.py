"""An exact GPyTorch GP whose covariance is a low-rank FactoredMatrix kernel plus Gaussian noise.

The kernel returns ``FactoredMatrix(phi(x1), phi(x2).mT)`` with ``phi`` random Fourier features of
an RBF kernel (learned lengthscale and outputscale); GaussianLikelihood adds its noise, and the
marginal covariance becomes a :class:`~lowrank_op.FactoredAddedDiag`, whose ``inv_quad_logdet`` is
exact (Woodbury, determinant lemma) at ``n`` above linear_operator's ``max_cholesky_size``, where
GPyTorch would otherwise run CG and stochastic Lanczos quadrature. gpytorch is a test-only extra.
"""

from __future__ import annotations

import math
from unittest.mock import MagicMock, patch

import gpytorch  # in the `test` extra: a missing install fails here rather than skipping
import linear_operator
import torch

from lowrank_op import FactoredAddedDiag, FactoredMatrix

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
