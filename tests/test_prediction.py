"""GPyTorch training and prediction with a sparse-precision kernel, against a dense GPyTorch model."""

from __future__ import annotations

from unittest.mock import patch

import gpytorch
import linear_operator
import pytest
import torch
from matrices import lattice_laplacian, scipy_to_torch

import gpsparse
from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.core.cholmod import cholmod_available
from gpsparse.kernels import SparsePrecisionKernel
from gpsparse.operators.precision import covariance_diagonal

M = 16  # lattice side, N = 256 latent nodes


def bilinear(points: torch.Tensor) -> torch.Tensor:
    """Bilinear interpolation matrix (m × M²) of points in [0, M−1]²."""
    x = points.detach().double()
    i0 = x.floor().long().clamp(0, M - 2)
    f = x - i0
    rows, cols, vals = [], [], []
    for di, dj in ((0, 0), (1, 0), (0, 1), (1, 1)):
        w = (f[:, 0] if di else 1 - f[:, 0]) * (f[:, 1] if dj else 1 - f[:, 1])
        rows.append(torch.arange(len(x)))
        cols.append((i0[:, 0] + di) * M + (i0[:, 1] + dj))
        vals.append(w)
    idx = torch.stack([torch.cat(rows), torch.cat(cols)])
    return torch.sparse_coo_tensor(idx, torch.cat(vals), (len(x), M * M)).coalesce()


class LatticeTestKernel(SparsePrecisionKernel):
    """Q(κ) = (κ²I + L)² on an M × M lattice, observed by bilinear interpolation (a test stand-in)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.register_parameter("raw_kappa", torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64)))
        lap = lattice_laplacian(M)
        self._lap = SparseLinearOperator.from_tensor(scipy_to_torch(lap))
        self._lap2 = SparseLinearOperator.from_tensor(scipy_to_torch(lap @ lap))

    @property
    def kappa(self):
        return torch.nn.functional.softplus(self.raw_kappa) + 0.05

    def precision(self) -> SparseLinearOperator:
        k2 = self.kappa**2
        return (self._lap2 + self._lap * (2 * k2)).add_diagonal(k2**2)

    def forward(self, x1, x2, diag=False, **params):
        Q = self.precision()
        w1 = bilinear(x1)
        if diag:
            return covariance_diagonal(Q, SparseLinearOperator.from_tensor(w1, symmetric=False), method="exact")
        same = x1.shape == x2.shape and torch.equal(x1, x2)
        return SparsePrecisionLinearOperator(Q, interp=w1, right_interp=None if same else bilinear(x2))


class DenseKernel(gpytorch.kernels.Kernel):
    """The same covariance, formed densely (reference)."""

    def __init__(self, sparse_kernel):
        super().__init__()
        self.sparse_kernel = sparse_kernel

    def forward(self, x1, x2, diag=False, **params):
        cov = torch.linalg.inv(self.sparse_kernel.precision().to_dense())
        k = bilinear(x1).to_dense() @ cov @ bilinear(x2).to_dense().T
        return k.diagonal() if diag else k


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean = gpytorch.means.ConstantMean()
        self.covar = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64) * (M - 1)
    y = torch.sin(x[:, 0] / 3) * torch.cos(x[:, 1] / 4) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def _models(x, y):
    torch.set_default_dtype(torch.float64)
    try:
        models = []
        for kernel in (LatticeTestKernel(), DenseKernel(LatticeTestKernel())):
            likelihood = gpytorch.likelihoods.GaussianLikelihood()
            likelihood.noise = 0.05
            model = Model(x, y, likelihood, kernel)
            model.covar.outputscale = 2.0
            models.append((model, likelihood))
        return models
    finally:
        torch.set_default_dtype(torch.float32)


def test_training_loss_and_gradients_match_dense():
    x, y = _data(600)
    (sparse, lik_s), (dense, lik_d) = _models(x, y)
    torch.manual_seed(0)
    with (
        linear_operator.settings.max_cholesky_size(0),
        gpsparse.settings.logdet_defaults(num_probes=128, num_lanczos=50),
    ):
        with patch.object(SparseLinearOperator, "to_dense", side_effect=AssertionError("densified")):
            loss_s = -gpytorch.mlls.ExactMarginalLogLikelihood(lik_s, sparse)(sparse(x), y)
            loss_s.backward()
    loss_d = -gpytorch.mlls.ExactMarginalLogLikelihood(lik_d, dense)(dense(x), y)
    loss_d.backward()
    # the loss is per observation and near zero here: compare in nats per observation
    assert abs(float(loss_s - loss_d)) < 0.01
    gs = torch.cat([p.grad.reshape(-1) for p in sparse.parameters()])
    gd = torch.cat([p.grad.reshape(-1) for p in dense.parameters()])
    assert gs.numel() == 4 and bool((gs != 0).all())
    assert float(torch.nn.functional.cosine_similarity(gs, gd, dim=0)) > 0.99


@pytest.mark.parametrize("fast", [False, True])
def test_prediction_matches_dense(fast):
    x, y = _data(400)
    x_test = torch.rand(150, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * (M - 1)
    (sparse, lik_s), (dense, lik_d) = _models(x, y)
    for model, lik in ((sparse, lik_s), (dense, lik_d)):
        model.eval()
        lik.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-10), gpytorch.settings.fast_pred_var(fast):
        with gpsparse.settings.variance_defaults(num_probes=4000):
            pred_s = lik_s(sparse(x_test))
            mean_s, var_s = pred_s.mean, pred_s.variance
        with gpytorch.settings.fast_pred_var(False):
            pred_d = lik_d(dense(x_test))
            mean_d, var_d = pred_d.mean, pred_d.variance
    torch.testing.assert_close(mean_s, mean_d, rtol=1e-6, atol=1e-7)
    if fast:  # stochastic diagonal estimator: unbiased, error ~ off-diagonal mass / √probes
        assert float(((var_s - var_d) / var_d).abs().mean()) < 0.05
    else:
        torch.testing.assert_close(var_s, var_d, rtol=1e-6, atol=1e-8)


def test_skip_posterior_variances_and_samples():
    x, y = _data(300)
    x_test = torch.rand(20, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * (M - 1)
    (sparse, lik), _ = _models(x, y)
    sparse.eval()
    lik.eval()
    with torch.no_grad(), gpytorch.settings.skip_posterior_variances():
        out = sparse(x_test)
        assert torch.all(out.variance <= 1e-9)  # GPyTorch clamps variances at 1e-10
    with torch.no_grad():
        samples = sparse(x_test).rsample(torch.Size([3]))
    assert samples.shape == (3, 20) and torch.isfinite(samples).all()


@pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")
def test_fixed_noise_likelihood_matches_dense():
    """Heteroscedastic noise through gpytorch's FixedNoiseGaussianLikelihood: loss, gradients, prediction."""
    x, y = _data(300, seed=4)
    noise = 0.02 + 0.1 * torch.rand(300, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x_test = torch.rand(40, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * (M - 1)
    results = []
    for kernel, cholesky_size in ((LatticeTestKernel(), 0), (DenseKernel(LatticeTestKernel()), 10**9)):
        likelihood = gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise)
        model = Model(x, y, likelihood, kernel).double()
        torch.manual_seed(0)
        with (
            linear_operator.settings.max_cholesky_size(cholesky_size),
            gpsparse.settings.logdet_defaults(method="cholesky"),
        ):
            loss = -gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)(model(x), y)
            loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        model.eval()
        likelihood.eval()
        with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-10):
            pred = model(x_test)
            results.append((loss.detach(), grads, pred.mean, pred.variance))
    (loss_s, g_s, m_s, v_s), (loss_d, g_d, m_d, v_d) = results
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(g_s, g_d, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(m_s, m_d, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(v_s, v_d, rtol=1e-6, atol=1e-9)
