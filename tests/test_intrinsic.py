"""Intrinsic GMRFs with linear constraints (issue 13, items 2 and 4), against dense float64 references.

The references are built here from the definitions, densely: random-walk and
Besag precisions, their Moore–Penrose inverses (``numpy.linalg.pinv``), the
scaling to unit generalised variance, linear interpolation, and GPyTorch's
marginal likelihood as ``torch.distributions.MultivariateNormal`` on the
dense ``K + σ²I``. Tolerances: 1e-8 (relative) for covariances, MLLs, all
hyperparameter gradients, predictive means and variances; 1e-10 for the
constraints on posterior means.
"""

from __future__ import annotations

import math
import re
import unittest
from pathlib import Path

import gpytorch
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase
from scipy.sparse.csgraph import connected_components

import gpsparse
from gpsparse import SparseLinearOperator
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.constraints import (
    component_basis,
    constrained_inverse_dense,
    constraint_basis,
    random_walk_structure,
)
from gpsparse.errors import NotPositiveDefiniteError
from gpsparse.kernels import BesagKernel, BYM2Kernel, RandomWalkKernel
from gpsparse.kernels.constrained_prediction import ConstrainedPredictionStrategy
from gpsparse.kernels.intrinsic import generalized_variances
from gpsparse.operators.constrained import (
    ConstrainedPrecisionLinearOperator,
    LinearConstraints,
    NoisyConstrainedPrecisionLinearOperator,
)

TIGHT = {"rtol": 1e-8, "atol": 1e-10}
EXACT_SOLVES = {"rtol": 1e-13}  # CG to rounding where the road is Krylov (graphs without CHOLMOD)


# ------------------------------------------------------------------ dense references
def _to_operator(matrix) -> SparseLinearOperator:
    dense = torch.as_tensor(np.asarray(sp.csr_matrix(matrix).toarray()), dtype=torch.float64)
    return SparseLinearOperator.from_tensor(dense.to_sparse())


def _rw_dense(t: np.ndarray, order: int) -> np.ndarray:
    """RW1: Σ (x_{i+1} − x_i)²/d_i; RW2: Σ_interior ((x_{i+1}−x_i)/d_i − (x_i−x_{i−1})/d_{i−1})² / ((d_{i−1}+d_i)/2)."""
    n, d = len(t), np.diff(t)
    if order == 1:
        D = np.zeros((n - 1, n))
        D[np.arange(n - 1), np.arange(n - 1)] = -1.0
        D[np.arange(n - 1), np.arange(1, n)] = 1.0
        return D.T @ np.diag(1.0 / d) @ D
    B = np.zeros((n - 2, n))
    for i in range(1, n - 1):
        B[i - 1, i - 1] = 1.0 / d[i - 1]
        B[i - 1, i] = -1.0 / d[i - 1] - 1.0 / d[i]
        B[i - 1, i + 1] = 1.0 / d[i]
    return B.T @ np.diag(2.0 / (d[:-1] + d[1:])) @ B


def _scaled_pinv(Q: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """``Q⁺`` scaled so that the geometric mean of its diagonal is 1 on every component."""
    S = np.linalg.pinv(Q, hermitian=True)
    labels = np.zeros(len(Q), dtype=int) if labels is None else labels
    scale = np.ones(len(Q))
    for c in np.unique(labels):
        nodes = labels == c
        scale[nodes] = np.exp(np.log(np.diag(S)[nodes]).mean())
    return S / np.sqrt(np.outer(scale, scale))


def _linear_interp(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    W = np.zeros((len(s), len(t)))
    for r, value in enumerate(s):
        j = min(max(np.searchsorted(t, value, side="right") - 1, 0), len(t) - 2)
        w = (value - t[j]) / (t[j + 1] - t[j])
        W[r, j], W[r, j + 1] = 1.0 - w, w
    return W


def _graph():
    """Two components (0–4: a path with a chord; 5–8: a square with a diagonal) and the isolated node 9."""
    edges = torch.tensor([[0, 1, 2, 3, 0, 5, 6, 7, 8, 5], [1, 2, 3, 4, 2, 6, 7, 8, 5, 7]])
    A = np.zeros((10, 10))
    A[edges[0], edges[1]] = A[edges[1], edges[0]] = 1.0
    return edges, A


def _besag_reference(A: np.ndarray) -> np.ndarray:
    """Scaled Besag covariance on all nodes (isolated nodes: zero rows and columns)."""
    L = np.diag(A.sum(1)) - A
    connected = np.flatnonzero(A.sum(1) > 0)
    _, labels = connected_components(sp.csr_matrix(A[np.ix_(connected, connected)]), directed=False)
    full = np.zeros_like(A)
    full[np.ix_(connected, connected)] = _scaled_pinv(L[np.ix_(connected, connected)], labels)
    return full


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel, mean=None):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean = gpytorch.means.ConstantMean() if mean is None else mean
        self.covar = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _loss_and_grads(model, x, y):
    for p in model.parameters():
        p.grad = None
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpsparse.settings.solver_defaults(**EXACT_SOLVES):
        loss = -mll(model(x), y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _dense_loss_and_grads(model, K_fn, x, y):
    for p in model.parameters():
        p.grad = None
    K = K_fn() + model.likelihood.noise * torch.eye(len(y), dtype=torch.float64)
    mean = model.mean(x)
    loss = -torch.distributions.MultivariateNormal(mean, covariance_matrix=K).log_prob(y) / len(y)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _check_model(model, K_fn, x, y, K_test_fn, x_test):
    """MLL and every hyperparameter gradient, then predictive mean and variance, against the dense model."""
    loss, grads = _loss_and_grads(model, x, y)
    ref_loss, ref_grads = _dense_loss_and_grads(model, K_fn, x, y)
    torch.testing.assert_close(loss, ref_loss, **TIGHT)
    assert len(grads) == len(ref_grads) >= 3
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref, **TIGHT)
    model.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(**EXACT_SOLVES):
        pred = model(x_test)
        K = K_fn() + model.likelihood.noise * torch.eye(len(y), dtype=torch.float64)
        K_star, K_ss = K_test_fn()
        mean = model.mean(x_test) + K_star @ torch.linalg.solve(K, y - model.mean(x))
        var = torch.diagonal(K_ss - K_star @ torch.linalg.solve(K, K_star.T))
        torch.testing.assert_close(pred.mean, mean, **TIGHT)
        torch.testing.assert_close(pred.variance, var, rtol=1e-8, atol=1e-9)
    model.train()
    return pred


# ------------------------------------------------------------------ core numerics
@pytest.mark.parametrize("order", [1, 2])
def test_random_walk_structure_matches_the_definition_and_its_null_space(order):
    t = np.sort(np.random.default_rng(order).uniform(0.0, 5.0, 15))
    R = random_walk_structure(t, order)
    np.testing.assert_allclose(R.toarray(), _rw_dense(t, order), rtol=1e-12, atol=1e-12)
    V = component_basis(np.zeros(15, dtype=int), 1, order=order, positions=t)
    np.testing.assert_allclose(V.T @ V, np.eye(order), atol=1e-14)
    assert np.abs(R @ V).max() < 1e-10 * np.abs(R).max()
    eigenvalues = np.linalg.eigvalsh(R.toarray())
    assert eigenvalues[order] > 1e-6 * eigenvalues[-1]  # rank exactly N − order


def test_regular_rw2_is_the_standard_second_difference():
    h = 0.25
    t = h * np.arange(8)
    D2 = np.diff(np.eye(8), n=2, axis=0)  # rows (1, −2, 1)
    np.testing.assert_allclose(random_walk_structure(t, 2).toarray(), D2.T @ D2 / h**3, rtol=1e-12, atol=1e-9)
    D1 = np.diff(np.eye(8), axis=0)
    np.testing.assert_allclose(random_walk_structure(t, 1).toarray(), D1.T @ D1 / h, rtol=1e-12, atol=1e-12)


def test_constraint_basis_spans_the_rows_and_rejects_bad_matrices():
    A = np.array([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, 2.0]])
    V = constraint_basis(A)
    np.testing.assert_allclose(V.T @ V, np.eye(2), atol=1e-14)
    np.testing.assert_allclose(V @ (V.T @ A.T), A.T, atol=1e-14)  # same row space
    with pytest.raises(ValueError, match="rank deficient"):
        constraint_basis(np.array([[1.0, 1.0, 0.0], [2.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="rank deficient"):
        constraint_basis(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        constraint_basis(np.array([[1.0, np.nan, 0.0]]))
    with pytest.raises(ValueError, match="no free direction"):
        constraint_basis(np.eye(3))
    with pytest.raises(ValueError, match="orthonormal"):
        LinearConstraints(np.ones((4, 1)))


# ------------------------------------------------------------------ operators
@pytest.mark.parametrize("order", [1, 2])
def test_constrained_covariance_is_the_pseudo_inverse(order):
    t = np.sort(np.random.default_rng(3).uniform(0.0, 4.0, 12))
    Q = _rw_dense(t, order) * 1.7
    constraints = LinearConstraints.from_components(np.zeros(12, dtype=int), 1, order=order, positions=t)
    K = ConstrainedPrecisionLinearOperator(_to_operator(Q), constraints)
    torch.testing.assert_close(K.to_dense(), torch.tensor(np.linalg.pinv(Q, hermitian=True)), **TIGHT)
    # rows, a cross-covariance and the diagonal through a rectangular W
    gen = np.random.default_rng(4)
    W1 = _linear_interp(t, gen.uniform(t[0], t[-1], 7))
    W2 = _linear_interp(t, gen.uniform(t[0], t[-1], 5))
    cross = ConstrainedPrecisionLinearOperator(
        _to_operator(Q), constraints, interp=torch.tensor(W1).to_sparse(), right_interp=torch.tensor(W2).to_sparse()
    )
    reference = W1 @ np.linalg.pinv(Q, hermitian=True) @ W2.T
    torch.testing.assert_close(cross.to_dense(), torch.tensor(reference), **TIGHT)
    torch.testing.assert_close(cross.mT.to_dense(), torch.tensor(reference.T), **TIGHT)
    square = ConstrainedPrecisionLinearOperator(_to_operator(Q), constraints, interp=torch.tensor(W1).to_sparse())
    torch.testing.assert_close(
        square._diagonal(), torch.tensor(np.diag(W1 @ np.linalg.pinv(Q, hermitian=True) @ W1.T)), **TIGHT
    )


def test_general_constraints_condition_a_proper_or_posterior_precision():
    """Σ = V_⊥(V_⊥ᵀQV_⊥)⁻¹V_⊥ᵀ for precisions that are not intrinsic: a corner constraint, a posterior."""
    t = np.arange(10.0)
    Q = _rw_dense(t, 1)
    corner = np.zeros((1, 10))
    corner[0, 3] = 1.0  # x_3 = 0: the RW1 pinned at one node (null space of Q not spanned by the constraint)
    K = ConstrainedPrecisionLinearOperator(_to_operator(Q), corner)
    V = constraint_basis(corner)
    torch.testing.assert_close(K.to_dense(), torch.tensor(constrained_inverse_dense(Q, V)), **TIGHT)
    gen = np.random.default_rng(5)
    G = np.zeros((10, 10))
    for i in gen.integers(0, 10, 6):
        G[i, i] += 4.0
    two = LinearConstraints.from_matrix(np.stack([np.ones(10), t]))
    posterior = ConstrainedPrecisionLinearOperator(_to_operator(Q + G + 0.3 * np.eye(10)), two)
    reference = constrained_inverse_dense(Q + G + 0.3 * np.eye(10), two.basis().numpy())
    torch.testing.assert_close(posterior.to_dense(), torch.tensor(reference), **TIGHT)
    np.testing.assert_allclose(two.matrix.numpy() @ posterior.to_dense().numpy(), 0.0, atol=1e-12)


def _noisy_fixture(pseudo: bool, graph: bool = False):
    if graph:
        _, A = _graph()
        A = A[:9, :9]  # the two components
        Q = (np.diag(A.sum(1)) - A) * 1.3
        labels = np.repeat([0, 1], [5, 4])
        constraints = LinearConstraints.from_components(labels, 2)
    else:
        t = np.sort(np.random.default_rng(6).uniform(0.0, 3.0, 9))
        Q = _rw_dense(t, 2) * 0.8
        constraints = LinearConstraints.from_components(np.zeros(9, dtype=int), 1, order=2, positions=t)
    gen = np.random.default_rng(7)
    W = np.zeros((13, 9))
    W[np.arange(13), gen.integers(0, 9, 13)] = gen.uniform(0.5, 1.5, 13)
    noise = gen.uniform(0.1, 0.6, 13)
    y = gen.normal(size=13)
    eigenvalues = np.linalg.eigvalsh(Q)
    log_pdet = float(np.log(eigenvalues[constraints.num_constraints :]).sum())
    return Q, constraints, W, noise, y, (log_pdet if pseudo else None)


@pytest.mark.parametrize("pseudo", [False, True], ids=["completion", "pseudo_logdet"])
@pytest.mark.parametrize("graph", [False, True], ids=["rw2", "besag"])
def test_noisy_marginal_likelihood_and_gradients_match_dense(pseudo, graph):
    Q, constraints, W, noise, y, log_pdet = _noisy_fixture(pseudo, graph)
    base = _to_operator(Q)
    values = base.values.detach().clone().requires_grad_(True)
    scale = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)  # a ScaleKernel-like parameter of Q
    noise_t = torch.tensor(noise, requires_grad=True)
    y_t = torch.tensor(y)
    Qop = SparseLinearOperator(values * scale, pattern=base.pattern)
    pdet = None if log_pdet is None else log_pdet + (9 - constraints.num_constraints) * torch.log(scale)
    op = ConstrainedPrecisionLinearOperator(Qop, constraints, interp=torch.tensor(W).to_sparse(), pseudo_logdet=pdet)
    noisy = op.add_diagonal(noise_t)
    assert isinstance(noisy, NoisyConstrainedPrecisionLinearOperator)
    with gpsparse.settings.solver_defaults(**EXACT_SOLVES):
        quad, logdet = noisy.inv_quad_logdet(y_t.unsqueeze(-1), logdet=True)
    (quad + logdet).backward()
    grads = (scale.grad.clone(), noise_t.grad.clone())
    # dense: K = W (sQ)⁺ Wᵀ + D, differentiable in s and d through pinv of the constant Q
    s_ref = torch.tensor(1.4, dtype=torch.float64, requires_grad=True)
    d_ref = torch.tensor(noise, requires_grad=True)
    Wd = torch.tensor(W)
    K = Wd @ torch.tensor(np.linalg.pinv(Q, hermitian=True)) @ Wd.T / s_ref + torch.diag(d_ref)
    ref_quad = y_t @ torch.linalg.solve(K, y_t)
    ref_logdet = torch.logdet(K)
    (ref_quad + ref_logdet).backward()
    torch.testing.assert_close(quad, ref_quad.detach(), **TIGHT)
    torch.testing.assert_close(logdet, ref_logdet.detach(), **TIGHT)
    torch.testing.assert_close(grads[0], s_ref.grad, **TIGHT)
    torch.testing.assert_close(grads[1], d_ref.grad, **TIGHT)
    # every stored value of Q (general perturbations: the conditioned model's derivative) against dense autograd
    if not pseudo:
        dense_values = values.detach().clone().requires_grad_(True)
        Qd = torch.zeros(9, 9, dtype=torch.float64).index_put((base.pattern.row, base.pattern.col_long), dense_values)
        V = constraints.basis()
        full, _ = torch.linalg.qr(torch.cat([V, torch.eye(9, dtype=torch.float64)], 1))
        perp = full[:, constraints.num_constraints : 9]
        sigma = perp @ torch.linalg.inv(perp.T @ (1.4 * Qd) @ perp) @ perp.T
        Kd = Wd @ sigma @ Wd.T + torch.diag(torch.tensor(noise))
        (y_t @ torch.linalg.solve(Kd, y_t) + torch.logdet(Kd)).backward()
        torch.testing.assert_close(values.grad, dense_values.grad, rtol=1e-7, atol=1e-9)
    # solves and the diagonal
    with gpsparse.settings.solver_defaults(**EXACT_SOLVES):
        torch.testing.assert_close(noisy.solve(y_t), torch.linalg.solve(K.detach(), y_t), **TIGHT)
        torch.testing.assert_close(noisy._diagonal().detach(), torch.diagonal(K.detach()), **TIGHT)


def test_posterior_mean_satisfies_the_constraints_and_matches_dense():
    Q, constraints, W, noise, y, _ = _noisy_fixture(False, graph=True)
    noisy = NoisyConstrainedPrecisionLinearOperator(
        _to_operator(Q), torch.tensor(noise), constraints, interp=torch.tensor(W).to_sparse()
    )
    mean = noisy.posterior_mean(torch.tensor(y))
    G = W.T @ np.diag(1.0 / noise) @ W
    reference = constrained_inverse_dense(Q + G, constraints.basis().numpy()) @ (W.T @ (y / noise))
    torch.testing.assert_close(mean, torch.tensor(reference), **TIGHT)
    assert float(constraints.residual(mean).abs().max()) < 1e-10
    # CG at a loose tolerance: the constraints still hold to rounding (the final projection)
    with gpsparse.settings.solver_defaults(rtol=1e-3):
        loose = noisy.posterior_mean(torch.tensor(y))
    assert float(constraints.residual(loose).abs().max()) < 1e-10


def test_scaling_by_a_constant_keeps_the_closed_form():
    Q, constraints, W, noise, y, log_pdet = _noisy_fixture(True)
    op = ConstrainedPrecisionLinearOperator(
        _to_operator(Q),
        constraints,
        interp=torch.tensor(W).to_sparse(),
        pseudo_logdet=torch.tensor(log_pdet, dtype=torch.float64),
    )
    scaled = op * 2.5
    assert isinstance(scaled, ConstrainedPrecisionLinearOperator)
    torch.testing.assert_close(scaled.to_dense(), 2.5 * op.to_dense(), **TIGHT)
    a = scaled.add_diagonal(torch.tensor(noise)).inv_quad_logdet(torch.tensor(y).unsqueeze(-1), logdet=True)
    b = ConstrainedPrecisionLinearOperator(_to_operator(Q / 2.5), constraints, interp=torch.tensor(W).to_sparse())
    b = b.add_diagonal(torch.tensor(noise)).inv_quad_logdet(torch.tensor(y).unsqueeze(-1), logdet=True)
    torch.testing.assert_close(a[0], b[0], **TIGHT)
    torch.testing.assert_close(a[1], b[1], **TIGHT)


# ------------------------------------------------------------------ kernels against dense GPyTorch
@pytest.mark.parametrize("order", [1, 2])
def test_random_walk_kernel_matches_dense_model(order):
    gen = torch.Generator().manual_seed(order)
    knots = torch.sort(torch.rand(14, generator=gen, dtype=torch.float64) * 4.0).values
    x = (knots[0] + (knots[-1] - knots[0]) * torch.rand(25, generator=gen, dtype=torch.float64)).unsqueeze(-1)
    x = torch.cat([x, knots[[0, 5, 13]].unsqueeze(-1)])  # knots themselves, the two ends included
    y = torch.sin(2.0 * x[:, 0]) + 0.2 * torch.randn(len(x), generator=gen, dtype=torch.float64)
    x_test = torch.linspace(float(knots[0]), float(knots[-1]), 9, dtype=torch.float64).unsqueeze(-1)
    kernel = gpytorch.kernels.ScaleKernel(RandomWalkKernel(knots, order=order))
    model = Model(x, y, kernel).double()
    kernel.outputscale = 0.7
    model.likelihood.noise = 0.15
    model.mean.constant.data.fill_(0.2)
    t = knots.numpy()
    cov = torch.tensor(_scaled_pinv(_rw_dense(t, order)))
    W, Ws = torch.tensor(_linear_interp(t, x[:, 0].numpy())), torch.tensor(_linear_interp(t, x_test[:, 0].numpy()))

    def K_fn():
        return kernel.outputscale * (W @ cov @ W.T)

    def K_test_fn():
        return kernel.outputscale * (Ws @ cov @ W.T), kernel.outputscale * (Ws @ cov @ Ws.T)

    _check_model(model, K_fn, x, y, K_test_fn, x_test)
    assert kernel.base_kernel.scale_method == "selected"  # the banded road
    model.eval()
    with torch.no_grad():
        model(x_test)
        latent = model.prediction_strategy.latent_mean()
    assert float(kernel.base_kernel.constraints.residual(latent).abs().max()) < 1e-10


def test_besag_kernel_matches_dense_model_with_two_components_and_an_isolated_node():
    edges, A = _graph()
    kernel = gpytorch.kernels.ScaleKernel(BesagKernel(edges, 10))
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 2, 2, 6, 9, 4], dtype=torch.float64)
    x = ids.unsqueeze(-1)
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(len(x), generator=gen, dtype=torch.float64)
    x_test = torch.arange(10.0, dtype=torch.float64).unsqueeze(-1)
    model = Model(x, y, kernel).double()
    kernel.outputscale = 1.3
    model.likelihood.noise = 0.3
    cov = torch.tensor(_besag_reference(A))
    S = torch.zeros(len(x), 10, dtype=torch.float64)
    S[torch.arange(len(x)), ids.long()] = 1.0

    def K_fn():
        return kernel.outputscale * (S @ cov @ S.T)

    def K_test_fn():
        return kernel.outputscale * (cov @ S.T), kernel.outputscale * cov

    pred = _check_model(model, K_fn, x, y, K_test_fn, x_test)
    assert kernel.base_kernel.graph.num_components == 2
    assert kernel.base_kernel.isolated.tolist() == [9]
    # the isolated node has no structured effect: its predictive variance is the noise alone (f ≡ 0)
    model.eval()
    with torch.no_grad():
        noisy = model.likelihood(model(x_test))
        latent = model.prediction_strategy.latent_mean()
    assert float(pred.mean[9] - model.mean.constant.detach()) == pytest.approx(0.0, abs=1e-12)
    assert float(noisy.variance[9]) == pytest.approx(float(model.likelihood.noise.detach()), abs=1e-12)
    constraints = kernel.base_kernel.constraints
    assert constraints.num_constraints == 2
    assert float(constraints.residual(latent).abs().max()) < 1e-10  # each component sums to zero


def test_bym2_kernel_matches_dense_model_and_its_components():
    edges, A = _graph()
    kernel = BYM2Kernel(edges, 10)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 3, 5, 5, 9], dtype=torch.float64)
    x = ids.unsqueeze(-1)
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(len(x), generator=gen, dtype=torch.float64)
    x_test = torch.arange(10.0, dtype=torch.float64).unsqueeze(-1)
    model = Model(x, y, kernel).double()
    kernel.phi = 0.35
    kernel.precision = 2.2
    model.likelihood.noise = 0.25
    model.mean.constant.data.fill_(-0.3)
    besag = torch.tensor(_besag_reference(A))
    S = torch.zeros(len(x), 10, dtype=torch.float64)
    S[torch.arange(len(x)), ids.long()] = 1.0

    def structure(left, right):
        return ((1 - kernel.phi) * left @ right.T + kernel.phi * left @ besag @ right.T) / kernel.precision

    eye = torch.eye(10, dtype=torch.float64)

    def K_fn():
        return structure(S, S)

    def K_test_fn():
        return structure(eye, S), structure(eye, eye)

    _check_model(model, K_fn, x, y, K_test_fn, x_test)
    assert [name for name, _ in model.named_parameters()] == [
        "likelihood.noise_covar.raw_noise",
        "mean.raw_constant",
        "covar.raw_phi",
        "covar.raw_precision",
    ]
    model.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(**EXACT_SOLVES):
        pred = model(x_test)
        strategy = model.prediction_strategy
        assert isinstance(strategy, ConstrainedPredictionStrategy)
        (m_v, v_v), (m_u, v_u) = strategy.component_predictions()
        latent = strategy.latent_mean()
        # dense components: posterior of (a, c) given y, a = √((1−φ)/τ) v, c = √(φ/τ) u*
        phi, tau = float(kernel.phi), float(kernel.precision)
        K = K_fn() + model.likelihood.noise * torch.eye(len(y), dtype=torch.float64)
        r = torch.linalg.solve(K, y - model.mean.constant)
        ref_u = phi / tau * besag @ S.T @ r
        ref_v = (1 - phi) / tau * S.T @ r
        cov_u = phi / tau * besag
        ref_var_u = torch.diagonal(cov_u - cov_u @ S.T @ torch.linalg.solve(K, S @ cov_u))
    torch.testing.assert_close(m_u, ref_u, **TIGHT)
    torch.testing.assert_close(m_v, ref_v, **TIGHT)
    torch.testing.assert_close(v_u, ref_var_u, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(m_u + m_v + model.mean.constant, pred.mean, **TIGHT)
    assert float(kernel.constraints.residual(latent).abs().max()) < 1e-10
    assert float(m_u[9]) == 0.0 and float(v_u[9]) == 0.0  # the isolated node: no structured effect


def test_bym2_hyperparameters_priors_constraints_and_batches():
    edges, _ = _graph()
    kernel = BYM2Kernel(
        edges, phi_prior=gpytorch.priors.UniformPrior(0.0, 1.0), precision_prior=gpytorch.priors.GammaPrior(1.0, 0.1)
    )
    assert {name for name, *_ in kernel.named_priors()} == {"phi_prior", "precision_prior"}
    kernel.phi = 0.9
    assert float(kernel.phi) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="within"):
        BYM2Kernel(edges, phi_constraint=gpytorch.constraints.Interval(0.0, 2.0))
    batch = BYM2Kernel(edges, 10, batch_shape=torch.Size([2])).double()
    batch.phi = torch.tensor([0.2, 0.8], dtype=torch.float64)
    x = torch.arange(10.0, dtype=torch.float64).unsqueeze(-1)
    dense = batch(x).to_dense()
    assert dense.shape == (2, 10, 10)
    for b, phi in enumerate((0.2, 0.8)):
        single = BYM2Kernel(edges, 10).double()
        single.phi = phi
        torch.testing.assert_close(dense[b], single(x).to_dense(), **TIGHT)


def test_sum_of_intrinsic_and_sparse_precision_kernels_matches_dense_model():
    """Besag (area id) + scaled RW1 (time) + scaled lattice Matérn (time): one constrained block operator."""
    from gpsparse.kernels import IntrinsicAdditiveKernel, LatticeMaternKernel

    edges, A = _graph()
    gen = torch.Generator().manual_seed(4)
    n = 30
    ids = torch.randint(0, 10, (n,), generator=gen).double()
    time = torch.rand(n, generator=gen, dtype=torch.float64)
    x = torch.stack([ids, time], -1)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    knots = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    kernel = (
        BesagKernel(edges, 10, active_dims=[0])
        + gpytorch.kernels.ScaleKernel(RandomWalkKernel(knots, active_dims=[1]))
        + gpytorch.kernels.ScaleKernel(LatticeMaternKernel([0.0, 1.0], 12, active_dims=[1]))
    )
    assert isinstance(kernel, IntrinsicAdditiveKernel) and len(kernel.kernels) == 3
    model = Model(x, y, kernel).double()
    kernel.kernels[1].outputscale = 0.6
    kernel.kernels[2].outputscale = 0.4
    kernel.kernels[2].base_kernel.lengthscale = 0.3
    model.likelihood.noise = 0.2
    besag = torch.tensor(_besag_reference(A))
    rw = torch.tensor(_scaled_pinv(_rw_dense(knots.numpy(), 1)))
    lattice = kernel.kernels[2].base_kernel
    x_test = torch.stack([torch.arange(10.0, dtype=torch.float64), torch.linspace(0.05, 0.95, 10)], -1)

    def parts(a, b):
        Sa, Sb = (
            torch.zeros(len(z), 10, dtype=torch.float64).index_put_(
                (torch.arange(len(z)), z[:, 0].long()), torch.tensor(1.0, dtype=torch.float64)
            )
            for z in (a, b)
        )
        Wa, Wb = (torch.tensor(_linear_interp(knots.numpy(), z[:, 1].numpy())) for z in (a, b))
        La, Lb = (lattice.interpolation(z[:, 1:]).to_dense() for z in (a, b))
        Ql = torch.linalg.inv(lattice.precision().to_dense())
        return [
            Sa @ besag @ Sb.T,
            kernel.kernels[1].outputscale * Wa @ rw @ Wb.T,
            kernel.kernels[2].outputscale * La @ Ql @ Lb.T,
        ]

    def K_fn():
        return sum(parts(x, x))

    def K_test_fn():
        return sum(parts(x_test, x)), sum(parts(x_test, x_test))

    pred = _check_model(model, K_fn, x, y, K_test_fn, x_test)
    model.eval()
    with torch.no_grad(), gpsparse.settings.solver_defaults(**EXACT_SOLVES):
        pred = model(x_test)
        components = model.prediction_strategy.component_predictions()
        K = K_fn() + model.likelihood.noise * torch.eye(n, dtype=torch.float64)
        weights = torch.linalg.solve(K, y - model.mean.constant)
        for (mean, _), part in zip(components, parts(x_test, x)):
            torch.testing.assert_close(mean, part @ weights, **TIGHT)
        latent = model.prediction_strategy.latent_mean()
    assert len(components) == 3
    torch.testing.assert_close(sum(m for m, _ in components) + model.mean.constant, pred.mean, **TIGHT)
    assert float(model.prediction_strategy._train_operator().constraints.residual(latent).abs().max()) < 1e-10


def test_intrinsic_models_on_device_match_the_cpu(device):
    """BYM2 and a scaled RW2: the marginal likelihood, its gradients and the latent mean on ``device`` (CUDA if any)."""
    edges, _ = _graph()
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2, 6], dtype=torch.float64)
    y = torch.linspace(-1.0, 1.0, 12, dtype=torch.float64).sin()
    knots = torch.linspace(0.0, 1.0, 9, dtype=torch.float64)
    results = []
    for where in (torch.device("cpu"), device):
        out = []
        for kernel, x in (
            (BYM2Kernel(edges, 10), ids.unsqueeze(-1)),
            (gpytorch.kernels.ScaleKernel(RandomWalkKernel(knots, order=2)), (ids / 10.0).unsqueeze(-1)),
        ):
            model = Model(x.to(where), y.to(where), kernel).double().to(where)
            loss, grads = _loss_and_grads(model, x.to(where), y.to(where))
            model.eval()
            with torch.no_grad():
                model(x[:3].to(where))
                latent = model.prediction_strategy.latent_mean()
            out.append((loss.cpu(), [g.cpu() for g in grads], latent.cpu()))
        results.append(out)
    for (loss_a, grads_a, latent_a), (loss_b, grads_b, latent_b) in zip(*results):
        torch.testing.assert_close(loss_b, loss_a, **TIGHT)
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(b, a, **TIGHT)
        torch.testing.assert_close(latent_b, latent_a, rtol=1e-8, atol=1e-10)


# ------------------------------------------------------------------ scaling
def test_besag_scaling_is_exact_per_component():
    edges, A = _graph()
    kernel = BesagKernel(edges, 10)
    variances = kernel(torch.arange(10.0, dtype=torch.float64).unsqueeze(-1), diag=True)
    torch.testing.assert_close(variances, torch.tensor(np.diag(_besag_reference(A))), **TIGHT)
    for nodes in ([0, 1, 2, 3, 4], [5, 6, 7, 8]):
        assert float(variances[nodes].log().mean().exp()) == pytest.approx(1.0, abs=1e-12)
    unscaled = BesagKernel(edges, 10, scale=False)
    L = np.diag(A.sum(1)) - A
    raw = unscaled(torch.arange(9.0, dtype=torch.float64).unsqueeze(-1)).to_dense()
    torch.testing.assert_close(raw, torch.tensor(np.linalg.pinv(L[:9, :9], hermitian=True)), **TIGHT)


@pytest.mark.parametrize("order", [1, 2])
def test_random_walk_scaling_is_exact_beyond_the_dense_size(order):
    """The banded road's selected inverse gives the same scale as dense algebra (and runs at any size)."""
    gen = np.random.default_rng(9)
    t = np.arange(300) * 0.03 + gen.uniform(0.0, 0.02, 300)  # irregular gaps 0.01–0.05
    dense = RandomWalkKernel(torch.tensor(t), order=order, max_dense_nodes=2048)
    selected = RandomWalkKernel(torch.tensor(t), order=order)
    assert (dense.scale_method, selected.scale_method) == ("dense", "selected")
    # RW2 on 300 irregular gaps has a condition number ~1e10: either road is accurate to ~1e-16 × that, and
    # agreement to 1e-9 held with one LAPACK build but not another (4e-9 with numpy 2.4.6's OpenBLAS).
    assert selected.scale == pytest.approx(dense.scale, rel=1e-9 if order == 1 else 1e-7)
    assert selected.structure.pseudo_logdet == pytest.approx(dense.structure.pseudo_logdet, rel=1e-9)
    size = 20_000 if order == 1 else 3_000  # RW2's condition number grows like N⁴ (class notes)
    big = RandomWalkKernel(torch.linspace(0.0, 1.0, size, dtype=torch.float64), order=order)
    assert big.scale_method == "selected" and math.isfinite(big.scale) and big.logdet_method == "exact"


def test_besag_scaling_methods_agree():
    side = 12
    index = np.arange(side * side).reshape(side, side)
    edges = np.concatenate(
        [np.stack([index[:, :-1].ravel(), index[:, 1:].ravel()]), np.stack([index[:-1].ravel(), index[1:].ravel()])], 1
    )
    adjacency = sp.coo_matrix((np.ones(edges.shape[1]), (edges[0], edges[1])), shape=(side**2, side**2))
    labels = np.zeros(side**2, dtype=int)
    constraints = LinearConstraints.from_components(labels, 1)
    lap = sp.diags(np.asarray((adjacency + adjacency.T).sum(1)).ravel()) - (adjacency + adjacency.T)
    exact, method = generalized_variances(lap, constraints, method="dense")
    assert method == "dense"
    np.testing.assert_allclose(exact, np.diag(np.linalg.pinv(lap.toarray(), hermitian=True)), rtol=1e-10)
    root = sp.csr_matrix(
        (
            np.r_[np.ones(edges.shape[1]), -np.ones(edges.shape[1])],
            (np.tile(np.arange(edges.shape[1]), 2), edges.ravel()),
        ),
        shape=(edges.shape[1], side**2),
    )
    with gpsparse.settings.solver_defaults(rtol=1e-10):
        estimate, _ = generalized_variances(lap, constraints, method="stochastic", root=root, num_samples=800)
    gm_exact, gm_estimate = np.exp(np.log(exact).mean()), np.exp(np.log(estimate).mean())
    assert gm_estimate == pytest.approx(gm_exact, rel=0.02)  # √(2/(S n)) ≈ 0.4 %, bias ≈ 1/S
    if cholmod_available():
        selected, method = generalized_variances(lap, constraints, method="selected")
        assert method == "selected"
        np.testing.assert_allclose(selected, exact, rtol=1e-9)


# ------------------------------------------------------------------ bad input
def test_isolated_nodes_and_graphs_without_edges():
    edges, _ = _graph()
    kernel = BesagKernel(edges, 12)  # nodes 9, 10, 11 isolated
    assert kernel.isolated.tolist() == [9, 10, 11]
    variances = kernel(torch.arange(12.0, dtype=torch.float64).unsqueeze(-1), diag=True)
    assert variances[9:].abs().max() == 0.0 and bool((variances[:9] > 0).all())
    with pytest.raises(ValueError, match="no edges"):
        BesagKernel(torch.zeros(2, 0, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="out of range"):
        kernel(torch.tensor([[12.0]])).to_dense()
    with pytest.raises(ValueError, match="integer node ids"):
        kernel(torch.tensor([[0.5]])).to_dense()


def test_constraints_that_leave_the_field_improper_raise():
    t = np.arange(8.0)
    Q = _rw_dense(t, 2)
    rw2 = LinearConstraints.from_components(np.zeros(8, dtype=int), 1, order=2, positions=t)
    assert rw2.check(Q) == "intrinsic"
    # an RW2 with only the sum-to-zero constraint: its linear trend is still free
    sum_only = LinearConstraints.from_components(np.zeros(8, dtype=int), 1, order=1)
    with pytest.raises(ValueError, match="improper"):
        sum_only.check(Q)
    # a Besag graph of two components with one global sum-to-zero constraint
    _, A = _graph()
    L = np.diag(A[:9, :9].sum(1)) - A[:9, :9]
    with pytest.raises(ValueError, match="one sum-to-zero constraint per connected component"):
        LinearConstraints.from_matrix(np.ones((1, 9))).check(L)
    assert LinearConstraints.from_components(np.repeat([0, 1], [5, 4]), 2).check(_to_operator(L)) == "intrinsic"
    # a corner constraint on an RW1: proper, but not the null space of Q
    corner = np.zeros((1, 8))
    corner[0, 0] = 1.0
    assert LinearConstraints.from_matrix(corner).check(_rw_dense(t, 1)) == "conditioned"
    # two constraints that are not the RW2's null space but leave no null direction free: proper (conditioned)
    other = LinearConstraints.from_matrix(np.stack([np.ones(8), (-1.0) ** np.arange(8)]))
    assert other.check(Q) == "conditioned"
    # constraints orthogonal to the trend t − mean leave it free: improper
    second_difference = np.r_[1.0, -2.0, 1.0, np.zeros(5)]  # sums to zero, ⟂ t − mean
    with pytest.raises(ValueError, match="improper"):
        LinearConstraints.from_matrix(np.stack([np.ones(8), second_difference])).check(Q)
    with pytest.raises(ValueError, match="rank deficient"):
        ConstrainedPrecisionLinearOperator(_to_operator(Q), np.stack([np.ones(8), 2 * np.ones(8)]))
    with pytest.raises(ValueError, match="constraints are on"):
        ConstrainedPrecisionLinearOperator(_to_operator(Q), np.ones((1, 7)))


def test_noise_free_data_that_conflict_with_the_constraint_raise():
    """Observing every node of a sum-to-zero field without noise: K is singular (the data must sum to zero)."""
    t = np.arange(6.0)
    constraints = LinearConstraints.from_components(np.zeros(6, dtype=int), 1)
    K = ConstrainedPrecisionLinearOperator(_to_operator(_rw_dense(t, 1)), constraints)
    with pytest.raises(NotPositiveDefiniteError, match="sum to"):
        K.inv_quad_logdet(torch.ones(6, 1, dtype=torch.float64), logdet=True)
    # a subset of the nodes is fine: no combination of them is fixed by the constraint
    subset = K[:5, :5]
    dense = torch.tensor(np.linalg.pinv(_rw_dense(t, 1), hermitian=True))[:5, :5]
    torch.testing.assert_close(subset.to_dense(), dense, **TIGHT)
    torch.testing.assert_close(subset.inv_quad_logdet(None, logdet=True)[1], torch.logdet(dense), **TIGHT)


def test_random_walk_knots_are_sorted_and_merged_and_inputs_checked():
    knots = torch.tensor([3.0, 1.0, 2.0, 1.0, 0.5, 3.0], dtype=torch.float64)
    kernel = RandomWalkKernel(knots, order=2)
    reference = RandomWalkKernel(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64), order=2)
    assert kernel.knots.tolist() == [0.5, 1.0, 2.0, 3.0]
    x = torch.tensor([[2.5], [0.5], [1.7], [3.0], [1.7]], dtype=torch.float64)  # unsorted, repeated
    torch.testing.assert_close(kernel(x).to_dense(), reference(x).to_dense(), **TIGHT)
    with pytest.raises(ValueError, match="outside the random walk's knots"):
        kernel(torch.tensor([[3.5]], dtype=torch.float64)).to_dense()
    with pytest.raises(ValueError, match="finite"):
        kernel(torch.tensor([[float("nan")]], dtype=torch.float64)).to_dense()
    with pytest.raises(ValueError, match="at least 3 distinct"):
        RandomWalkKernel(torch.tensor([1.0, 2.0, 2.0]), order=2)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        RandomWalkKernel(knots, order=3)


# ------------------------------------------------------------------ fixed effects (docs/guide.md)
def test_guide_fixed_effects_snippet_runs():
    """The guide's fixed-effects snippet (LinearMean over covariates + a BYM2 area effect) runs as written."""
    guide = (Path(__file__).resolve().parent.parent / "docs" / "guide.md").read_text()
    section = guide.split("## Fixed effects and intrinsic fields", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/guide.md", "exec"), namespace)  # noqa: S102 - the guide's own code
    model = namespace["model"]
    assert isinstance(model.mean, gpytorch.means.LinearMean)
    assert bool(torch.isfinite(namespace["loss"])) and namespace["losses"][-1] < namespace["losses"][0]
    assert float(namespace["structured"].sum().abs()) < 1e-10


# ------------------------------------------------------------------ linear_operator's conformance suite
def _besag_two_components(batch_shape=()):
    """Besag precision on two components of 8 nodes with random edge weights (float32 leaves), and its constraints."""
    rng = np.random.default_rng(3)
    rows, cols = [], []
    for offset in (0, 8):
        rows += [offset + i for i in range(7)] + [offset, offset + 2]
        cols += [offset + i + 1 for i in range(7)] + [offset + 3, offset + 6]
    weights = rng.uniform(0.5, 2.0, len(rows))
    A = sp.coo_matrix((weights, (rows, cols)), shape=(16, 16))
    A = (A + A.T).tocsr()
    L = sp.diags(np.asarray(A.sum(1)).ravel()) - A
    Q = SparseLinearOperator.from_tensor(torch.tensor(L.toarray(), dtype=torch.float32).to_sparse())
    if batch_shape:
        scales = torch.linspace(0.5, 1.5, int(torch.Size(batch_shape).numel())).reshape(*batch_shape, 1)
        Q = SparseLinearOperator(Q.values * scales, pattern=Q.pattern)
    return Q, LinearConstraints.from_components(np.repeat([0, 1], 8), 2)


def _selection():
    """W (10 × 16): ten of the nodes, five per component, weights 0.7–1.3 (K is then positive definite)."""
    index = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 13, 15])
    weights = 0.7 + 0.6 * torch.rand(10, generator=torch.Generator().manual_seed(5))
    return torch.sparse_coo_tensor(torch.stack([torch.arange(10), index]), weights, (10, 16)).coalesce()


class TestConstrainedPrecisionLinearOperator(LinearOperatorTestCase, unittest.TestCase):
    """``K = W Q⁺ Wᵀ``: Besag on two components, two sum-to-zero constraints, W selecting 10 of 16 nodes.

    Attributes as for ``SparsePrecisionLinearOperator`` in ``tests/test_conformance.py``: gpsparse's own
    solves (no ``linear_cg``), linear_operator's Lanczos for root decompositions.
    """

    seed = 0
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = True

    def create_linear_op(self):
        Q, constraints = _besag_two_components()
        return ConstrainedPrecisionLinearOperator(Q, constraints, interp=_selection())

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()


class TestConstrainedPrecisionLinearOperatorPosterior(TestConstrainedPrecisionLinearOperator):
    """A precision that is not intrinsic (a posterior ``Q + WᵀD⁻¹W``) under the same constraints."""

    def create_linear_op(self):
        Q, constraints = _besag_two_components()
        gram = torch.zeros(16, dtype=torch.float32)
        gram[[1, 4, 9, 12]] = 2.0
        return ConstrainedPrecisionLinearOperator(Q.add_diagonal(gram), constraints, interp=_selection())


class TestConstrainedPrecisionLinearOperatorBatch(TestConstrainedPrecisionLinearOperator):
    seed = 1

    def create_linear_op(self):
        Q, constraints = _besag_two_components((2,))
        return ConstrainedPrecisionLinearOperator(Q, constraints, interp=_selection())


class TestNoisyConstrainedPrecisionLinearOperator(TestConstrainedPrecisionLinearOperator):
    """``K + D``: the training covariance GPyTorch's Gaussian likelihood forms."""

    def create_linear_op(self):
        Q, constraints = _besag_two_components()
        noise = 0.2 + 0.3 * torch.rand(10, generator=torch.Generator().manual_seed(7))
        return ConstrainedPrecisionLinearOperator(Q, constraints, interp=_selection()).add_diagonal(noise)


class TestNoisyConstrainedPrecisionLinearOperatorBatch(TestConstrainedPrecisionLinearOperator):
    seed = 1

    def create_linear_op(self):
        Q, constraints = _besag_two_components((3,))
        noise = (0.2 + 0.3 * torch.rand(3, 10, generator=torch.Generator().manual_seed(7))).reshape(3, 10)
        return ConstrainedPrecisionLinearOperator(Q, constraints, interp=_selection()).add_diagonal(noise)
