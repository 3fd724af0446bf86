"""A stock GPyTorch ExactGP with ScaleKernel(WendlandKernel()) trains sparsely and matches a dense model.

n = 2000 > linear_operator's ``max_cholesky_size`` (800), so every
log-determinant goes through gpsparse's stochastic Lanczos quadrature; the
dense reference is the same model with a kernel that forms the Wendland
matrix densely, evaluated by exact Cholesky.
"""

from __future__ import annotations

import contextlib

import gpytorch
import linear_operator
import pytest
import torch

import gpsparse
from gpsparse import SparseLinearOperator
from gpsparse.kernels import WendlandKernel

N = 2000
STEPS = 6
PARAMS = (
    "likelihood.noise_covar.raw_noise",
    "covar_module.raw_outputscale",
    "covar_module.base_kernel.raw_radius",
)


class DenseWendlandKernel(gpytorch.kernels.Kernel):
    """Reference: the same Wendland φ₃,₁ values as a dense matrix (torch.cdist)."""

    def __init__(self):
        super().__init__()
        self.register_parameter("raw_radius", torch.nn.Parameter(torch.zeros(1, 1)))
        self.register_constraint("raw_radius", gpytorch.constraints.Positive())

    @property
    def radius(self):
        return self.raw_radius_constraint.transform(self.raw_radius)

    def forward(self, x1, x2, diag=False, **params):
        if diag:
            return torch.ones(x1.shape[:-1], dtype=x1.dtype, device=x1.device)
        r = torch.cdist(x1, x2) / self.radius
        return (1 - r).clamp_min(0) ** 4 * (4 * r + 1)


class ExactModel(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, base_kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(base_kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def synthetic_data(n=N, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=dtype)
    f = torch.sin(6 * x[:, 0]) * torch.cos(4 * x[:, 1])
    return x, f + 0.1 * torch.randn(n, generator=g, dtype=dtype)


def build_model(x, y, base_kernel, *, radius, outputscale, noise):
    dtype = x.dtype
    likelihood = gpytorch.likelihoods.GaussianLikelihood().to(dtype)
    model = ExactModel(x, y, likelihood, base_kernel).to(dtype)
    kernel = model.covar_module.base_kernel
    kernel.initialize(raw_radius=kernel.raw_radius_constraint.inverse_transform(torch.tensor(radius, dtype=dtype)))
    model.covar_module.outputscale = torch.tensor(outputscale, dtype=dtype)
    likelihood.noise = torch.tensor(noise, dtype=dtype)
    return model, likelihood


def loss_and_gradient(model, likelihood, x, y):
    """``-mll`` and the gradient with respect to (raw noise, raw outputscale, raw radius)."""
    model.train()
    likelihood.train()
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    loss = -mll(model(x), y)
    loss.backward()
    params = dict(model.named_parameters())
    return loss.item(), torch.stack([params[name].grad.reshape(()) for name in PARAMS])


@contextlib.contextmanager
def nothing_densifies(monkeypatch):
    """Dense materialisation and dense Cholesky raise; counts inv_quad_logdet calls that reach the sparse type."""

    def refuse(*args, **kwargs):
        raise AssertionError("densified during training")

    calls = {"inv_quad_logdet": 0}
    original = SparseLinearOperator.inv_quad_logdet

    def counting(self, *args, **kwargs):
        calls["inv_quad_logdet"] += 1
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(SparseLinearOperator, "to_dense", refuse)
        m.setattr(torch.linalg, "cholesky_ex", refuse)
        m.setattr(torch.linalg, "cholesky", refuse)
        m.setattr(SparseLinearOperator, "inv_quad_logdet", counting)
        yield calls


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on the shared 2-core machines 2 threads can be 5-25x slower (DESIGN.md §6)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense_reference():
    """Exact loss and gradient of the dense model (Cholesky; n = 2000)."""
    x, y = synthetic_data()
    model, likelihood = build_model(x, y, DenseWendlandKernel(), radius=0.1, outputscale=1.0, noise=0.05)
    with linear_operator.settings.max_cholesky_size(10**6), gpytorch.settings.fast_computations(log_prob=False):
        loss, grad = loss_and_gradient(model, likelihood, x, y)
    return x, y, loss, grad


@pytest.mark.parametrize("cholesky", ["default", "max_cholesky_size(0)"])
def test_unchanged_adam_loop_trains_without_densifying(monkeypatch, cholesky):
    torch.manual_seed(0)
    x, y = synthetic_data()
    model, likelihood = build_model(x, y, WendlandKernel(), radius=0.05, outputscale=0.5, noise=0.5)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    settings = linear_operator.settings.max_cholesky_size(0) if cholesky != "default" else contextlib.nullcontext()
    losses = []
    with settings, nothing_densifies(monkeypatch) as calls:
        model.train()
        likelihood.train()
        for step in range(STEPS):
            optimizer.zero_grad()
            loss = -mll(model(x), y)
            loss.backward()
            if step == 0:
                params = dict(model.named_parameters())
                for name in PARAMS:
                    grad = params[name].grad
                    assert grad is not None and bool(torch.isfinite(grad).all()) and bool((grad != 0).all()), name
            optimizer.step()
            losses.append(loss.item())
    assert calls["inv_quad_logdet"] == STEPS  # every loss went through the sparse operator
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("gradient", ["adjoint", "hutchinson"])
def test_loss_and_gradient_match_dense_model(dense_reference, gradient):
    x, y, dense_loss, dense_grad = dense_reference
    torch.manual_seed(0)
    model, likelihood = build_model(x, y, WendlandKernel(), radius=0.1, outputscale=1.0, noise=0.05)
    with gpsparse.settings.logdet_defaults(num_probes=64, gradient=gradient):
        loss, grad = loss_and_gradient(model, likelihood, x, y)
    assert abs(loss - dense_loss) / abs(dense_loss) < 0.015, (loss, dense_loss)
    cosine = torch.nn.functional.cosine_similarity(grad, dense_grad, dim=0).item()
    assert cosine > 0.95, (grad, dense_grad)
    torch.testing.assert_close(grad, dense_grad, rtol=0.05, atol=0.0)


def test_float32_model_trains():
    torch.manual_seed(0)
    x, y = synthetic_data(dtype=torch.float32)
    model, likelihood = build_model(x, y, WendlandKernel(), radius=0.06, outputscale=0.5, noise=0.5)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model.train()
    likelihood.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.covar_module.base_kernel.raw_radius.dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
