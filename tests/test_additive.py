"""Sums of sparse-precision covariances (issue 13, item 1): one block-diagonal precision, against dense float64."""

from __future__ import annotations

import time
import unittest
from unittest.mock import patch

import gpytorch
import pytest
import torch
from linear_operator.operators import DiagLinearOperator, SumLinearOperator
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase
from test_conformance import _interp, _known_logdet_operator, _spd_operator

import gpsparse
from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.kernels import (
    LatticeMaternKernel,
    MarkovMaternKernel,
    SparsePrecisionAdditiveKernel,
    component_predictions,
)
from gpsparse.kernels.prediction import SparsePrecisionPredictionStrategy
from gpsparse.operators.block import block_diagonal
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.precision import NoisySparsePrecisionLinearOperator

BOX = [[0.0, 0.0], [1.0, 1.0]]
TIGHT = {"rtol": 1e-8, "atol": 1e-10}


# ------------------------------------------------------------------ models
class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean = gpytorch.means.ConstantMean()
        self.covar = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _scaled(grid, lengthscale, outputscale):
    kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel(BOX, grid))
    kernel.base_kernel.lengthscale = lengthscale
    kernel.outputscale = outputscale
    return kernel


def _components(three: bool = True):
    parts = [_scaled(12, 0.3, 1.5), _scaled(7, 0.8, 0.6)]
    if three:
        parts.append(_scaled(12, 0.12, 0.3))  # the first lattice, another lengthscale
    return parts


def _data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    y = torch.sin(4 * x[:, 0]) * torch.cos(3 * x[:, 1]) + 0.1 * torch.randn(n, generator=gen, dtype=torch.float64)
    return x, y


def _model(n=200, three=True, additive=SparsePrecisionAdditiveKernel, seed=0):
    x, y = _data(n, seed)
    model = Model(x, y, additive(*_components(three))).double()
    model.likelihood.noise = 0.05
    return model


def _dense_component(kernel, x1, x2):
    """``c · W(x1) Q⁻¹ W(x2)ᵀ`` formed densely: dense Q, exact inverse (differentiable in the parameters)."""
    base = kernel.base_kernel
    Q = base.precision().to_dense()
    w1, w2 = base.interpolation(x1).to_dense(), base.interpolation(x2).to_dense()
    return kernel.outputscale * (w1 @ torch.linalg.inv(Q) @ w2.T)


def _dense_loss(model, x, y):
    K = sum(_dense_component(k, x, x) for k in model.covar.kernels)
    K = K + model.likelihood.noise * torch.eye(len(x), dtype=x.dtype)
    mean = model.mean.constant.expand(len(x))
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=K)
    return -dist.log_prob(y) / len(x)


def _grads(model):
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


# -------------------------------------------------------------- operators
def test_sum_is_one_sparse_precision_with_block_diagonal_q():
    x, _ = _data(30)
    k1, k2, k3 = (k.double() for k in _components())
    with gpytorch.settings.lazily_evaluate_kernels(False):
        ops = [k(x) for k in (k1, k2, k3)]
    total = ops[0] + ops[1] + ops[2]
    assert isinstance(total, SparsePrecisionLinearOperator)
    assert total.components == (0, 144, 193, 337)
    assert isinstance(total.Q, KnownLogdetSparseLinearOperator)
    torch.testing.assert_close(total.Q.known_logdet, sum(op.Q.known_logdet for op in ops), **TIGHT)
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        torch.testing.assert_close(total.to_dense(), sum(op.to_dense() for op in ops), **TIGHT)
    # cross-covariances: W* = [W*_1 W*_2 W*_3] against the training W
    x_test = torch.rand(7, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        cross = [k(x_test, x) for k in (k1, k2, k3)]
    summed = cross[0] + cross[1] + cross[2]
    assert isinstance(summed, SparsePrecisionLinearOperator) and summed.shape == (7, 30)
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        torch.testing.assert_close(summed.to_dense(), sum(c.to_dense() for c in cross), **TIGHT)
        torch.testing.assert_close(summed.mT.to_dense(), sum(c.to_dense() for c in cross).mT, **TIGHT)
    noisy = total + DiagLinearOperator(torch.full((30,), 0.1, dtype=torch.float64))
    assert isinstance(noisy, NoisySparsePrecisionLinearOperator) and noisy.components == total.components


def test_block_pattern_is_cached_and_gradients_reach_each_block():
    Q1, Q2 = _known_logdet_operator().double(), _spd_operator().double()
    Q1 = KnownLogdetSparseLinearOperator(Q1.values.clone().requires_grad_(), Q1.known_logdet, pattern=Q1.pattern)
    Q2 = SparseLinearOperator(Q2.values.clone().requires_grad_(), pattern=Q2.pattern)
    Q = block_diagonal([Q1, Q2])
    assert type(Q) is SparseLinearOperator  # one block without a closed form: the general roads
    assert block_diagonal([Q1, Q2]).pattern is Q.pattern
    dense = torch.block_diag(Q1.to_dense(), Q2.to_dense())
    torch.testing.assert_close(Q.to_dense(), dense)
    Q.logdet().backward()
    assert Q1.values.grad is not None and Q2.values.grad is not None
    assert bool((Q1.values.grad != 0).any()) and bool((Q2.values.grad != 0).any())


def test_sum_of_different_batch_shapes_broadcasts():
    batched = SparsePrecisionLinearOperator(_spd_operator((2,)).double(), interp=_interp("rectangular").double())
    single_q = _known_logdet_operator().double()
    single = SparsePrecisionLinearOperator(single_q, interp=_interp("rectangular", num_nodes=20).double())
    total = batched + single
    assert isinstance(total, SparsePrecisionLinearOperator) and total.batch_shape == (2,)
    assert total.Q.batch_shape == (2,) and total.components == (0, 16, 36)
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        torch.testing.assert_close(total.to_dense(), batched.to_dense() + single.to_dense(), **TIGHT)


def test_sum_with_a_negative_term_falls_back_to_the_generic_sum():
    x, _ = _data(20)
    k1, k2 = (k.double() for k in _components(three=False))
    with gpytorch.settings.lazily_evaluate_kernels(False):
        a, b = k1(x), k2(x)
    for total, dense in ((-a + b, -a.to_dense() + b.to_dense()), (a + b * -2.0, a.to_dense() - 2 * b.to_dense())):
        assert isinstance(total, SumLinearOperator)
        torch.testing.assert_close(total.to_dense(), dense, rtol=1e-5, atol=1e-7)


def test_bad_components_are_refused():
    with pytest.raises(ValueError, match="node offsets from 0 to 16"):
        SparsePrecisionLinearOperator(_spd_operator(), components=(0, 5, 15))
    with pytest.raises(ValueError, match="non-decreasing"):
        SparsePrecisionLinearOperator(_spd_operator(), components=(0, 9, 5, 16))


class TestSummedSparsePrecisionLinearOperator(LinearOperatorTestCase, unittest.TestCase):
    """``W_1 Q_1⁻¹ W_1ᵀ + W_2 Q_2⁻¹ W_2ᵀ`` (10 × 10, W = [W_1 W_2] of 36 columns)."""

    seed = 0
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = True

    def create_linear_op(self):
        first = SparsePrecisionLinearOperator(_spd_operator(), interp=_interp("rectangular"))
        second = SparsePrecisionLinearOperator(_known_logdet_operator(), interp=_interp("rectangular", num_nodes=20))
        return first + second

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()


# ------------------------------------------------------------------ GPyTorch
@pytest.mark.parametrize("additive", [SparsePrecisionAdditiveKernel, gpytorch.kernels.AdditiveKernel])
def test_training_loss_and_gradients_match_dense(additive):
    model = _model(additive=additive)
    x, y = model.train_inputs[0], model.train_targets
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    lazy = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(lazy, NoisySparsePrecisionLinearOperator) and lazy.components == (0, 144, 193, 337)
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        loss = -mll(model(x), y)
        loss.backward()
    grads = _grads(model)
    model.zero_grad()
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        reference = _dense_loss(model, x, y)
    reference.backward()
    assert grads.numel() == 8 and bool((grads != 0).all())
    torch.testing.assert_close(loss, reference, **TIGHT)
    torch.testing.assert_close(grads, _grads(model), rtol=1e-7, atol=1e-9)


def test_plus_of_kernels_builds_the_sparse_additive_kernel():
    a, b, c = (k.base_kernel for k in _components())
    total = a + b + c
    assert isinstance(total, SparsePrecisionAdditiveKernel) and len(total.kernels) == 3
    scaled = gpytorch.kernels.ScaleKernel(a) + gpytorch.kernels.ScaleKernel(b)
    assert type(scaled) is gpytorch.kernels.AdditiveKernel  # GPyTorch's: wrap it for sparse predictions
    wrapped = SparsePrecisionAdditiveKernel(*scaled.kernels)
    model = Model(*_data(40), wrapped).double().eval()
    with torch.no_grad():
        model(torch.rand(3, 2, dtype=torch.float64))
    assert isinstance(model.prediction_strategy, SparsePrecisionPredictionStrategy)


def test_predictions_and_components_match_dense():
    model = _model()
    x, y = model.train_inputs[0], model.train_targets
    x_test = torch.rand(40, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    model.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-13):
        pred = model(x_test)
        mean, variance = pred.mean, pred.variance
        parts = component_predictions(model, x_test)
        kernels = model.covar.kernels
        A = sum(_dense_component(k, x, x) for k in kernels) + model.likelihood.noise * torch.eye(len(x))
        residual = y - model.mean.constant
        dense_parts = []
        for k in kernels:
            cross = _dense_component(k, x_test, x)
            prior = _dense_component(k, x_test, x_test).diagonal()
            dense_parts.append(
                (cross @ torch.linalg.solve(A, residual), prior - (cross * torch.linalg.solve(A, cross.T).T).sum(-1))
            )
        cross = sum(_dense_component(k, x_test, x) for k in kernels)
        prior = sum(_dense_component(k, x_test, x_test) for k in kernels).diagonal()
        dense_mean = model.mean.constant + cross @ torch.linalg.solve(A, residual)
        dense_var = prior - (cross * torch.linalg.solve(A, cross.T).T).sum(-1)
    assert isinstance(model.prediction_strategy, SparsePrecisionPredictionStrategy)
    torch.testing.assert_close(mean, dense_mean, **TIGHT)
    torch.testing.assert_close(variance, dense_var, **TIGHT)
    assert len(parts) == 3
    torch.testing.assert_close(sum(m for m, _ in parts) + model.mean.constant, mean, **TIGHT)
    for (m_s, v_s), (m_d, v_d) in zip(parts, dense_parts):
        torch.testing.assert_close(m_s, m_d, **TIGHT)
        torch.testing.assert_close(v_s, v_d, **TIGHT)


def test_component_predictions_errors():
    model = _model(n=30, three=False)
    with pytest.raises(RuntimeError, match="eval mode"):
        component_predictions(model, model.train_inputs[0][:3])
    plain = _model(n=30, three=False, additive=gpytorch.kernels.AdditiveKernel).eval()
    with torch.no_grad(), pytest.raises(TypeError, match="SparsePrecisionPredictionStrategy"):
        component_predictions(plain, plain.train_inputs[0][:3])


def _no_dense():
    return (
        patch.object(SparseLinearOperator, "to_dense", side_effect=AssertionError("densified")),
        patch.object(SparsePrecisionLinearOperator, "to_dense", side_effect=AssertionError("densified")),
        patch.object(NoisySparsePrecisionLinearOperator, "to_dense", side_effect=AssertionError("densified")),
    )


def _step_and_predict(model, x_test):
    x, y = model.train_inputs[0], model.train_targets
    model.train()
    start = time.perf_counter()
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    loss.backward()
    step = time.perf_counter() - start
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        pred = model(x_test)
        mean, variance = pred.mean, pred.variance
        parts = component_predictions(model, x_test)
    predict = time.perf_counter() - start
    return loss, mean, variance, parts, step, predict


def test_no_dense_step_at_a_moderate_size():
    x, y = _data(1000, seed=2)
    model = Model(x, y, SparsePrecisionAdditiveKernel(_scaled(25, 0.3, 1.0), _scaled(15, 0.7, 0.5))).double()
    model.likelihood.noise = 0.05
    x_test = torch.rand(50, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.manual_seed(0)
    a, b, c = _no_dense()
    with a, b, c:
        loss, mean, variance, parts, _, _ = _step_and_predict(model, x_test)
    assert bool(torch.isfinite(loss)) and all(p.grad is not None for p in model.parameters())
    assert bool((variance > 0).all()) and len(parts) == 2
    torch.testing.assert_close(parts[0][0] + parts[1][0] + model.mean.constant, mean, rtol=1e-6, atol=1e-8)


def test_timing_at_the_issue_size(capsys):
    """Two ScaleKernel(LatticeMaternKernel) on 30 × 30 lattices, n = 1 500: printed, not asserted."""
    x, y = _data(1500, seed=3)
    model = Model(x, y, SparsePrecisionAdditiveKernel(_scaled(30, 0.5, 1.0), _scaled(30, 0.1, 0.3))).double()
    model.likelihood.noise = 0.05
    x_test = torch.rand(100, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.manual_seed(0)
    _step_and_predict(model, x_test)  # warm-up: patterns, interpolations
    model.zero_grad()
    model.prediction_strategy = None
    loss, _, _, _, step, predict = _step_and_predict(model, x_test)
    with capsys.disabled():
        print(f"\nadditive 2 × (30 × 30), n = 1 500: loss + backward {step:.2f} s, predict 100 points {predict:.2f} s")
    assert bool(torch.isfinite(loss))


# -------------------------------------------------- sums outside sparse precision
def test_sum_with_a_markov_kernel_takes_the_generic_path():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(60, 1, generator=gen, dtype=torch.float64)
    y = torch.sin(6 * x[:, 0])
    lattice = LatticeMaternKernel([0.0, 1.0], 30).double()
    markov = MarkovMaternKernel(nu=1.5).double()
    kernel = lattice + markov
    assert isinstance(kernel, SparsePrecisionAdditiveKernel)
    model = Model(x, y, kernel).double()
    model.likelihood.noise = 0.05
    covar = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
    assert not isinstance(covar, NoisySparsePrecisionLinearOperator)  # linear_operator's generic sum
    loss = -gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)(model(x), y)
    loss.backward()
    dense = lattice(x).to_dense() + markov(x).to_dense() + 0.05 * torch.eye(60, dtype=torch.float64)
    mean = model.mean.constant.expand(60)
    reference = -torch.distributions.MultivariateNormal(mean, covariance_matrix=dense).log_prob(y) / 60
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        pred = model(x[:5])
    assert not isinstance(model.prediction_strategy, SparsePrecisionPredictionStrategy)
    assert bool(torch.isfinite(pred.mean).all()) and bool(torch.isfinite(pred.variance).all())
