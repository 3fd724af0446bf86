"""MarkovMaternKernel: state-space matrices, the exact precision, the kernel, and GPyTorch end to end.

References: matrix exponentials and 60-digit mpmath references for the state-space matrices, dense
inverses of the precision, finite differences (gradcheck), and gpytorch.kernels.MaternKernel in a
stock ExactGP (float64, exact Cholesky) for likelihoods, gradients and predictions.

The kernel runs on the state-space (Kalman) form, exact at any spacing (test_accuracy_versus_gap;
property-based checks with duplicates and near-duplicates in tests/test_markov_state_space.py). The
precision form (matern_precision) is tested on well-separated nodes.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from unittest.mock import patch

import gpytorch
import pytest
import torch
from helpers import tolerance

from gpsparse import SparseLinearOperator
from gpsparse.autograd.markov import _PrecisionValues, _RegularizedGamma
from gpsparse.core import markov as core
from gpsparse.core.banded import bandwidth
from gpsparse.kernels.markov import (
    CloseInputsWarning,
    MarkovMaternKernel,
    matern_covariance,
    matern_precision,
    matern_state_space,
    matern_transition_and_noise,
    precision_pattern,
)
from gpsparse.operators.state_space import (
    NoisyStateSpaceCovarianceLinearOperator,
    StateSpaceCovarianceLinearOperator,
)

NUS = [0.5, 1.5, 2.5]
TOL = tolerance(torch.float64, "direct")


def _grid(n, spacing, seed=0, shuffle=True):
    """Jittered grid ``(i + U/2)·spacing`` (gaps ≥ spacing/2), shuffled, shape ``(n, 1)``."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.arange(n, dtype=torch.float64) + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)) * spacing
    if shuffle:
        x = x[torch.randperm(n, generator=gen)]
    return x[:, None]


def _kernel(nu, lengthscale=1.0, **kwargs):
    kernel = MarkovMaternKernel(nu=nu, **kwargs).double()
    kernel.lengthscale = lengthscale
    return kernel


def _drift(nu):
    """The scaled companion matrix F (characteristic polynomial (u + 1)^s)."""
    s = int(nu + 0.5)
    F = torch.zeros(s, s, dtype=torch.float64)
    F[torch.arange(s - 1), torch.arange(1, s)] = 1.0
    F[-1] = -torch.tensor([math.comb(s, j) for j in range(s)], dtype=torch.float64)
    return F


# ------------------------------------------------------------ state space
@pytest.mark.parametrize("nu", NUS)
def test_stationary_covariance_solves_the_lyapunov_equation(nu):
    space = matern_state_space(nu)
    s, F, P = space.order, _drift(nu), space.stationary
    p = s - 1
    q = math.factorial(p) ** 2 / math.factorial(2 * p) * 2 ** (2 * p + 1)
    noise = torch.zeros(s, s, dtype=torch.float64)
    noise[-1, -1] = q
    torch.testing.assert_close(F @ P + P @ F.T + noise, torch.zeros(s, s, dtype=torch.float64), atol=1e-14, rtol=0)
    expected = {0.5: [[1.0]], 1.5: [[1.0, 0.0], [0.0, 1.0]], 2.5: [[1, 0, -1 / 3], [0, 1 / 3, 0], [-1 / 3, 0, 1]]}
    torch.testing.assert_close(P, torch.tensor(expected[nu], dtype=torch.float64), **TOL)
    torch.testing.assert_close(space.stationary_inverse @ P, torch.eye(s, dtype=torch.float64), **TOL)


@pytest.mark.parametrize("nu", NUS)
def test_transition_and_noise_match_matrix_exponential_and_60_digit_references(nu):
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 60  # Σ(1e-6) ~ 1e-30 needs ~30 digits of the difference below
    space = matern_state_space(nu)
    s = space.order
    xs = [1e-6, 1e-3, 0.2, 0.999, 1.0, 1.001, 2.5, 40.0]
    A, S = matern_transition_and_noise(torch.tensor(xs, dtype=torch.float64), nu)
    F = _drift(nu)
    torch.testing.assert_close(A, torch.linalg.matrix_exp(F * torch.tensor(xs, dtype=torch.float64)[:, None, None]))
    # Σ(x) = P∞ − A P∞ Aᵀ in 60 digits (P∞ has entries 0, ±1, ±1/3, ±1 exactly)
    Fm = mpmath.matrix(F.tolist())
    Pm = mpmath.matrix([[mpmath.mpf(round(3 * v)) / 3 for v in row] for row in space.stationary.tolist()])
    for k, x in enumerate(xs):
        Am = mpmath.expm(Fm * mpmath.mpf(x))
        ref = Pm - Am * Pm * Am.T
        for a in range(s):
            for b in range(s):
                scale = mpmath.sqrt(ref[a, a] * ref[b, b])
                err = abs(mpmath.mpf(float(S[k, a, b])) - ref[a, b]) / scale
                assert err < 1e-14, (x, a, b, float(err))


def test_regularized_gamma_gradcheck_across_the_branch_point():
    x = torch.tensor([1e-4, 0.3, 0.99, 1.0, 1.01, 3.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: _RegularizedGamma.apply(v, 4), (x,))
    values = _RegularizedGamma.apply(x.detach(), 4)
    assert bool(((values >= 0) & (values <= 1)).all()) and bool((values[:-1] >= values[1:]).all())


@pytest.mark.parametrize("nu", NUS)
def test_custom_backwards_match_plain_autograd_of_the_core(nu):
    # the oracle: the same core forwards (default gamma = plain regularized_gamma) under plain autograd
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(7, generator=gen, dtype=torch.float64) * 3 + 1e-3
    top = 2 * int(nu + 0.5) - 2
    w = torch.randn(top + 1, 7, generator=gen, dtype=torch.float64)
    leaf = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad((core.regularized_gamma(leaf, top) * w).sum(), leaf)
    (got,) = torch.autograd.grad((_RegularizedGamma.apply(leaf, top) * w).sum(), leaf)
    torch.testing.assert_close(got, expected, **TOL)
    p_inv = matern_state_space(nu).stationary_inverse
    values = core.assemble_precision_values(leaf, nu, p_inv)
    g = torch.randn(values.shape, generator=gen, dtype=torch.float64)
    (expected,) = torch.autograd.grad((values * g).sum(), leaf)
    (got,) = torch.autograd.grad((_PrecisionValues.apply(leaf, float(nu), p_inv) * g).sum(), leaf)
    torch.testing.assert_close(got, expected, **TOL)


# -------------------------------------------------------------- precision
@pytest.mark.parametrize("nu", NUS)
def test_precision_is_the_exact_inverse_of_the_matern_covariance(nu):
    t = _grid(40, 0.4, shuffle=False)[:, 0]
    rate = torch.tensor(math.sqrt(2 * nu) / 0.7, dtype=torch.float64)
    Q = matern_precision(t, rate, nu)
    s = int(nu + 0.5)
    assert Q.shape == (40 * s, 40 * s) and Q.pattern.symmetric and bandwidth(Q.pattern) == 2 * s - 1
    assert torch.equal(Q.values, Q.values[Q.pattern.transpose_perm])  # exactly symmetric values
    cov = torch.linalg.inv(Q.to_dense())[::s, ::s]
    torch.testing.assert_close(cov, matern_covariance(rate * (t[:, None] - t).abs(), nu), rtol=1e-10, atol=1e-11)


def test_precision_pattern_is_block_tridiagonal_in_csr_order():
    pattern = precision_pattern(4, 3)
    dense = torch.zeros(12, 12, dtype=torch.bool)
    dense[pattern.row, pattern.col_long] = True
    node = torch.arange(12) // 3
    assert torch.equal(dense, (node[:, None] - node[None, :]).abs() <= 1)
    assert pattern.symmetric and pattern.nnz == 9 * (4 + 2 * 3)
    assert precision_pattern(1, 2).nnz == 4


@pytest.mark.parametrize("nu", NUS)
def test_precision_values_gradcheck_in_times_and_rate(nu):
    times = torch.tensor([0.0, 0.35, 0.5, 1.4, 1.6], dtype=torch.float64, requires_grad=True)
    rate = torch.tensor([1.3, 0.6], dtype=torch.float64, requires_grad=True)  # a batch of two rates
    assert torch.autograd.gradcheck(lambda t, r: matern_precision(t, r, nu).values, (times, rate), fast_mode=True)


# ------------------------------------------------------------------ kernel
@pytest.mark.parametrize("nu", NUS)
def test_kernel_matches_gpytorch_matern_with_unsorted_and_duplicate_inputs(nu):
    x = _grid(150, 0.3, seed=1)
    x = torch.cat([x, x[:7], x[3:5]])  # duplicates: steps with a zero gap
    kernel = _kernel(nu, 0.8)
    op = kernel(x).evaluate_kernel()
    assert isinstance(op, StateSpaceCovarianceLinearOperator) and op.num_steps == 159
    reference = gpytorch.kernels.MaternKernel(nu=nu).double()
    reference.lengthscale = 0.8
    torch.testing.assert_close(op.to_dense(), reference(x).to_dense(), rtol=1e-9, atol=1e-10)
    exact = matern_covariance(kernel.rate * (x - x.T).abs(), nu)
    torch.testing.assert_close(op.to_dense(), exact, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("nu", NUS)
def test_cross_covariance_lives_on_the_joint_nodes(nu):
    gen = torch.Generator().manual_seed(2)
    base = torch.arange(60, dtype=torch.float64)[:, None]
    x1 = base + 0.3 * torch.rand(60, 1, generator=gen, dtype=torch.float64)  # joint gaps ≥ 0.3
    x2 = (base[:45] + 0.6 + 0.1 * torch.rand(45, 1, generator=gen, dtype=torch.float64)).flip(0)
    x2[:4] = x1[:4]  # shared inputs: two steps with a zero gap
    kernel = _kernel(nu, 1.3)
    op = kernel(x1, x2).evaluate_kernel()
    assert op.shape == (60, 45) and op.cols is not None and op.num_steps == 105
    torch.testing.assert_close(
        op.to_dense(), matern_covariance(kernel.rate * (x1 - x2.T).abs(), nu), rtol=1e-10, atol=1e-11
    )


@pytest.mark.parametrize("nu", NUS)
def test_input_gradient_matches_dense_reference(nu):
    x = _grid(40, 0.5, seed=4).requires_grad_(True)
    weights = torch.rand(40, 40, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    kernel = _kernel(nu, 0.9)
    (grad,) = torch.autograd.grad((kernel(x).evaluate_kernel().to_dense() * weights).sum(), x)
    (expected,) = torch.autograd.grad((matern_covariance(kernel.rate * (x - x.T).abs(), nu) * weights).sum(), x)
    torch.testing.assert_close(grad, expected, rtol=1e-9, atol=1e-10)


def test_diag_is_one_on_equal_inputs_and_the_matern_value_otherwise():
    kernel = _kernel(1.5, 0.5)
    x1, x2 = _grid(30, 0.2), _grid(30, 0.2, seed=5)
    torch.testing.assert_close(kernel(x1, diag=True), torch.ones(30, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(
        kernel(x1, x2, diag=True), matern_covariance(kernel.rate * (x1 - x2).abs()[:, 0], 1.5), **TOL
    )
    covar = gpytorch.kernels.ScaleKernel(kernel).double()
    covar.outputscale = 2.5
    torch.testing.assert_close(covar(x1, diag=True), torch.full((30,), 2.5, dtype=torch.float64), **TOL)


def test_node_structure_is_cached_and_rebuilt_when_inputs_change():
    kernel = _kernel(2.5, 1.0)
    x = _grid(80, 0.3)
    first = kernel(x).evaluate_kernel()
    kernel.lengthscale = 1.7
    second = kernel(x).evaluate_kernel()
    kernel(x.clone()).evaluate_kernel()  # equal values: reused
    assert kernel.num_node_builds == 1 and second.rows is first.rows
    x.add_(0.01)  # in place: rebuilt
    kernel(x).evaluate_kernel()
    assert kernel.num_node_builds == 2
    kernel(x, x + 0.1).evaluate_kernel()
    kernel(x, x + 0.1).evaluate_kernel()
    assert kernel.num_node_builds == 3


def test_batched_lengthscales_share_one_pattern():
    kernel = MarkovMaternKernel(nu=1.5, batch_shape=torch.Size([2])).double()
    kernel.lengthscale = torch.tensor([0.5, 2.0], dtype=torch.float64).reshape(2, 1, 1)
    x = _grid(50, 0.3)
    op = kernel(x).evaluate_kernel()
    assert op.shape == (2, 50, 50) and op.transitions.shape == (2, 49, 2, 2)
    for b, ell in enumerate((0.5, 2.0)):
        torch.testing.assert_close(op.to_dense()[b], _kernel(1.5, ell)(x).to_dense(), **TOL)
    expanded = _kernel(1.5, 0.5)(x.expand(3, 50, 1)).evaluate_kernel()  # equal batch members are fine
    assert expanded.shape == (3, 50, 50)


def test_lengthscale_prior_and_constraint_follow_gpytorch_conventions():
    prior = gpytorch.priors.GammaPrior(2.0, 3.0)
    kernel = MarkovMaternKernel(
        nu=0.5, lengthscale_prior=prior, lengthscale_constraint=gpytorch.constraints.Interval(0.1, 5.0)
    )
    kernel.lengthscale = 0.7
    torch.testing.assert_close(kernel.lengthscale, torch.tensor([[0.7]]))
    ((name, module, p, closure, _),) = list(kernel.named_priors())
    assert name == "lengthscale_prior" and p is prior
    torch.testing.assert_close(closure(module), kernel.lengthscale)
    assert isinstance(kernel.raw_lengthscale_constraint, gpytorch.constraints.Interval)
    assert dict(kernel.named_parameters()).keys() == {"raw_lengthscale"}


def test_errors():
    x = _grid(10, 0.5)
    with pytest.raises(ValueError, match="nu must be one of"):
        MarkovMaternKernel(nu=3.5)
    with pytest.raises(ValueError, match="1-D inputs only; got ard_num_dims=2"):
        MarkovMaternKernel(nu=0.5, ard_num_dims=2)
    kernel = _kernel(0.5)
    with pytest.raises(ValueError, match=r"1-D inputs of shape \(..., n, 1\)"):
        kernel.forward(torch.rand(10, 2, dtype=torch.float64), torch.rand(10, 2, dtype=torch.float64))
    bad = x.clone()
    bad[3] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        kernel.forward(bad, bad)
    with pytest.raises(ValueError, match="at least one input point"):
        kernel.forward(x[:0], x[:0])
    with pytest.raises(NotImplementedError, match="differ between batch members"):
        kernel.forward(torch.stack([x, x + 1]), torch.stack([x, x + 1]))
    with pytest.raises(NotImplementedError, match="last_dim_is_batch"):
        kernel.forward(x, x, last_dim_is_batch=True)
    with pytest.raises(ValueError, match="pattern_cache_size"):
        MarkovMaternKernel(nu=0.5, pattern_cache_size=0)


def test_close_inputs_no_longer_warn():
    x = torch.tensor([[0.0], [1.0], [1.0 + 1e-5], [1.0 + 1e-5], [2.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for nu in NUS:
            _kernel(nu)(x).evaluate_kernel()
    assert issubclass(CloseInputsWarning, RuntimeWarning)  # kept for filters naming it


@pytest.mark.parametrize("nu", NUS)
def test_accuracy_versus_gap(nu):
    """One close pair (scaled gap x, down to 0) among well-separated points: exact at every gap.

    The precision form lost (2s − 1)·log10(1/x) digits here (ν = 5/2: 6e-4 relative at x = 1e-2, a
    failed factorisation at 1e-3); the state-space form keeps ~1e-15.
    """
    rate = math.sqrt(2 * nu)
    for x in (1e-1, 1e-2, 1e-3, 1e-6, 1e-12, 0.0):
        t = torch.cat([torch.arange(120, dtype=torch.float64) * 0.7, torch.tensor([42.0 + x / rate])])[:, None]
        y = torch.sin(t[:, 0]) + 0.3 * torch.randn(121, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        op = _kernel(nu)(t).evaluate_kernel().add_diagonal(torch.tensor(0.1, dtype=torch.float64))
        quad, logdet = op.inv_quad_logdet(y[:, None], logdet=True)
        dense = matern_covariance(rate * (t - t.T).abs(), nu) + 0.1 * torch.eye(121, dtype=torch.float64)
        chol = torch.linalg.cholesky(dense)
        ref = y @ torch.cholesky_solve(y[:, None], chol)[:, 0] + 2 * chol.diagonal().log().sum()
        assert abs(float((quad + logdet - ref) / ref)) < 1e-12, x


def test_scale_kernel_and_noise_take_the_kalman_filter():
    x = _grid(300, 0.4)
    covar = gpytorch.kernels.ScaleKernel(_kernel(2.5, 1.2)).double()
    covar.outputscale = 1.7
    lazy = covar(x)
    evaluated = lazy.evaluate_kernel()
    assert isinstance(evaluated, StateSpaceCovarianceLinearOperator)
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    likelihood.noise = 0.1
    prior = gpytorch.distributions.MultivariateNormal(torch.zeros(300, dtype=torch.float64), lazy)
    noisy = likelihood(prior).lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(noisy, NoisyStateSpaceCovarianceLinearOperator)
    y = torch.sin(x[:, 0])
    with (
        patch("gpsparse.core.krylov.cg", side_effect=AssertionError("CG used")),
        patch.object(SparseLinearOperator, "to_dense", side_effect=AssertionError("densified")),
        patch.object(StateSpaceCovarianceLinearOperator, "to_dense", side_effect=AssertionError("densified")),
    ):
        loss = -likelihood(prior).log_prob(y)
        loss.backward()
    for p in (likelihood.raw_noise, covar.raw_outputscale, covar.base_kernel.raw_lengthscale):
        assert p.grad is not None and bool(torch.isfinite(p.grad).all()) and bool((p.grad != 0).all())


# ---------------------------------------------------------------- end to end
class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(kernel)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x), self.covar_module(x))


def _pair(nu, x, y, likelihood_factory=gpytorch.likelihoods.GaussianLikelihood):
    """The same model with MarkovMaternKernel and with gpytorch's MaternKernel (float64)."""
    models = []
    for kernel in (MarkovMaternKernel(nu=nu), gpytorch.kernels.MaternKernel(nu=nu)):
        likelihood = likelihood_factory()
        model = Model(x, y, likelihood, kernel).double()
        model.covar_module.outputscale = 1.4
        model.covar_module.base_kernel.lengthscale = 1.1
        model.mean_module.constant.data.fill_(0.2)
        if isinstance(likelihood, gpytorch.likelihoods.GaussianLikelihood):
            likelihood.noise = 0.05
        models.append(model)
    return models


def _loss_and_grads(model, x, y):
    model.train()
    model.zero_grad()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpytorch.settings.max_cholesky_size(10**9):  # the dense reference: exact Cholesky
        loss = -mll(model(x), y)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _data(n, spacing=0.45, seed=0):
    x = _grid(n, spacing, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    y = torch.sin(x[:, 0] / 2) + 0.2 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def _test_inputs(x):
    """Between training points, outside their range, and equal to some of them."""
    ordered = torch.sort(x[:, 0]).values
    between = (ordered[:-1:7] + ordered[1::7]) / 2
    outside = torch.tensor([ordered[0] - 3.0, ordered[0] - 0.4, ordered[-1] + 0.5, ordered[-1] + 6.0])
    return torch.cat([between, outside, x[:9, 0]])[:, None]


@pytest.mark.parametrize("nu", NUS)
def test_exact_gp_matches_gpytorch_matern_loss_gradients_and_predictions(nu):
    x, y = _data(400)
    sparse, dense = _pair(nu, x, y)
    loss_s, grads_s = _loss_and_grads(sparse, x, y)
    loss_d, grads_d = _loss_and_grads(dense, x, y)
    # measured: loss 1e-14, gradients 1e-12, means 5e-12, variances 2e-11 (relative)
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-11, atol=0)
    assert grads_s.keys() == grads_d.keys()
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-9, atol=1e-11, msg=name)
    x_test = _test_inputs(x)
    preds = []
    for model in (sparse, dense):
        model.eval()
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**9):
            pred = model.likelihood(model(x_test))
            preds.append((pred.mean, pred.variance))
    (mean_s, var_s), (mean_d, var_d) = preds
    torch.testing.assert_close(mean_s, mean_d, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(var_s, var_d, rtol=1e-9, atol=1e-11)


def test_predictions_reuse_the_cached_training_weights():
    x, y = _data(200)
    sparse, dense = _pair(1.5, x, y)
    means = []
    for model in (sparse, dense):
        model.eval()
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**9):
            means.append(model(x[50:80]).mean)
    strategy = sparse.prediction_strategy
    assert strategy._alpha is not None  # α = (K + D)⁻¹(y − μ), one Kalman solve, cached
    torch.testing.assert_close(means[0], means[1], rtol=1e-9, atol=1e-10)
    with torch.no_grad(), patch.object(NoisyStateSpaceCovarianceLinearOperator, "solve", side_effect=AssertionError):
        assert sparse(x[:5] + 0.1).mean.shape == (5,)  # new inputs: the joint steps reuse the cached α


def test_fixed_noise_likelihood_matches_gpytorch():
    x, y = _data(300, seed=3)
    noise = 0.02 + 0.1 * torch.rand(300, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sparse, dense = _pair(2.5, x, y, lambda: gpytorch.likelihoods.FixedNoiseGaussianLikelihood(noise=noise))
    loss_s, grads_s = _loss_and_grads(sparse, x, y)
    loss_d, grads_d = _loss_and_grads(dense, x, y)
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-11, atol=0)
    for name in grads_s:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-9, atol=1e-11, msg=name)
    x_test = _test_inputs(x)
    preds = []
    for model in (sparse, dense):
        model.eval()
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(10**9):
            pred = model(x_test)
            preds.append((pred.mean, pred.variance))
    torch.testing.assert_close(preds[0][0], preds[1][0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(preds[0][1], preds[1][1], rtol=1e-9, atol=1e-11)


def test_adam_training_loop_tracks_gpytorch():
    x, y = _data(300, seed=5)
    trajectories = []
    for model in _pair(1.5, x, y):
        model.train()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
        losses = []
        for _ in range(5):
            optimizer.zero_grad()
            with gpytorch.settings.max_cholesky_size(10**9):
                loss = -mll(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        trajectories.append((torch.stack(losses), torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
    (losses_s, params_s), (losses_d, params_d) = trajectories
    torch.testing.assert_close(losses_s, losses_d, rtol=1e-11, atol=0)
    torch.testing.assert_close(params_s, params_d, rtol=1e-9, atol=1e-11)
    assert losses_s[-1] < losses_s[0]


@pytest.mark.slow
@pytest.mark.parametrize("nu", NUS)
def test_marginal_likelihood_matches_gpytorch_at_ten_thousand_points(nu):
    """n = 10⁴: gpytorch's dense MaternKernel (800 MB matrix, exact Cholesky) against the banded path.

    ~5 minutes per ν on the shared 2-core machine (all of it the dense reference; peak RSS ~6 GB).
    Subnormals are flushed to zero: far-apart entries e^{−λ|t − t'|} otherwise slow the dense
    Cholesky and its backward ~8×.
    """
    x, y = _data(10_000, spacing=0.3, seed=7)
    torch.set_flush_denormal(True)
    try:
        _compare_at_ten_thousand(x, y, nu)
    finally:
        torch.set_flush_denormal(False)  # the default


def _compare_at_ten_thousand(x, y, nu):
    results = []
    for kernel in (MarkovMaternKernel(nu=nu), gpytorch.kernels.MaternKernel(nu=nu)):
        covar = gpytorch.kernels.ScaleKernel(kernel).double()
        covar.outputscale = 1.4
        kernel.lengthscale = 2.0
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        likelihood.noise = 0.05
        with gpytorch.settings.max_cholesky_size(10**9):
            prior = gpytorch.distributions.MultivariateNormal(torch.zeros_like(y), covar(x))
            loss = -likelihood(prior).log_prob(y)
            loss.backward()
        del prior
        params = (kernel.raw_lengthscale, covar.raw_outputscale, likelihood.noise_covar.raw_noise)
        results.append(torch.stack([loss.detach()] + [p.grad.reshape(()) for p in params]))
    print(
        f"n = 10⁴, nu = {nu}: relative differences (loss, ∂ℓ, ∂σ², ∂noise)",
        ((results[0] - results[1]) / results[1]).abs().tolist(),
    )
    # gpytorch's own distances (√(x² + x'² − 2xx') on |x| ≤ 1500) are accurate to ~1e-10 here
    torch.testing.assert_close(results[0], results[1], rtol=1e-8, atol=0)


# -------------------------------------------------------------------- size
SIZE_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time, torch, gpytorch
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from unittest.mock import patch
    from gpsparse.kernels.markov import MarkovMaternKernel

    torch.set_num_threads(1)
    n, nu = int(sys.argv[1]), float(sys.argv[2])
    gen = torch.Generator().manual_seed(0)
    x = ((torch.arange(n, dtype=torch.float64) + 0.5 * torch.rand(n, generator=gen, dtype=torch.float64)) * 0.2)
    x = x[torch.randperm(n, generator=gen)][:, None]
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    covar = gpytorch.kernels.ScaleKernel(MarkovMaternKernel(nu=nu)).double()
    covar.base_kernel.lengthscale = 3.0
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    before = peak_rss_kib()
    start = time.perf_counter()
    with patch("gpsparse.core.krylov.cg", side_effect=AssertionError("CG used")):
        prior = gpytorch.distributions.MultivariateNormal(torch.zeros(n, dtype=torch.float64), covar(x))
        loss = -likelihood(prior).log_prob(y) / n
        loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_kib()
    print(json.dumps({"loss": float(loss), "seconds": seconds, "peak_mib": peak / 1024, "before_mib": before / 1024,
                      "grad": float(covar.base_kernel.raw_lengthscale.grad)}))
    """
)


def _run_size(n, nu):
    out = subprocess.run([sys.executable, "-c", SIZE_SCRIPT, str(n), str(nu)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"n = {n:,}, nu = {nu}: {report['seconds']:.1f} s, peak RSS {report['peak_mib']:.0f} MiB")
    return report


def test_marginal_likelihood_at_100k_points_is_linear_and_small():
    report = _run_size(100_000, 2.5)
    assert math.isfinite(report["loss"]) and report["grad"] != 0
    assert report["peak_mib"] < 2048, report  # the dense kernel matrix would need 80 GB


@pytest.mark.slow
def test_marginal_likelihood_at_one_million_points():
    report = _run_size(1_000_000, 1.5)
    assert math.isfinite(report["loss"]) and report["peak_mib"] < 8192, report
