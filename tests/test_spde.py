"""MaternPrecision (Q = τ(κ²I + L)^α on a Laplacian) and KnownLogdetSparseLinearOperator, against dense float64."""

from __future__ import annotations

import copy
import math
import pickle

import linear_operator
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from helpers import tolerance
from linear_operator.operators import DiagLinearOperator

import gpsparse
from gpsparse import NoisySparsePrecisionLinearOperator, SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels.spde import MaternPrecision
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator

TOL = tolerance(torch.float64, "direct")
F64 = torch.float64


# ------------------------------------------------------------------ fixtures
def path_laplacian(m: int, h: float) -> np.ndarray:
    """Dense Neumann path Laplacian (diagonal 1, 2, …, 2, 1) / h²."""
    lap = 2 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1)
    lap[0, 0] = lap[-1, -1] = 1.0
    return lap / h**2


def lattice(sizes=(7, 5), spacing=(0.8, 0.55)):
    """Dense 2-D Neumann lattice Laplacian and its eigenvalues (from numpy, not the closed form)."""
    (m1, m2), (h1, h2) = sizes, spacing
    lap = np.kron(path_laplacian(m1, h1), np.eye(m2)) + np.kron(np.eye(m1), path_laplacian(m2, h2))
    return lap, np.linalg.eigvalsh(lap)


def graph_laplacian(n: int = 30, seed: int = 0) -> np.ndarray:
    """Dense weighted graph Laplacian of a random sparse graph."""
    rng = np.random.default_rng(seed)
    adjacency = sp.random(n, n, density=0.12, random_state=rng).toarray()
    adjacency = adjacency + adjacency.T
    return np.diag(adjacency.sum(1)) - adjacency


def dense_q(lap: np.ndarray, alpha: int, kappa2: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """τ (κ²I + L)^α by dense matrix powers (differentiable in κ² and τ)."""
    L = torch.as_tensor(lap, dtype=F64)
    base = kappa2 * torch.eye(L.shape[0], dtype=F64) + L
    return tau * torch.linalg.matrix_power(base, alpha)


def scalars(*values):
    return [torch.tensor(v, dtype=F64, requires_grad=True) for v in values]


# ------------------------------------------------------------ MaternPrecision
@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("which", ["lattice", "graph"])
def test_values_match_dense_power(alpha, which):
    lap = lattice()[0] if which == "lattice" else graph_laplacian()
    structure = MaternPrecision(sp.csr_matrix(lap), alpha)
    kappa2, tau = scalars(0.7, 1.9)
    Q = structure.operator(kappa2, tau)
    assert type(Q) is SparseLinearOperator and Q.pattern.symmetric  # no eigenvalues: no closed form
    expected = dense_q(lap, alpha, kappa2, tau)
    torch.testing.assert_close(Q.to_dense(), expected, **TOL)
    # the pattern is that of (|L| + I)^α: every entry of every power L^k, k ≤ α, and the full diagonal
    reach = np.linalg.matrix_power((np.abs(lap) + np.eye(lap.shape[0])) > 0, alpha).astype(bool)
    stored = torch.zeros(Q.shape, dtype=torch.bool)
    stored[Q.pattern.row, Q.pattern.col_long] = True
    assert torch.equal(stored, torch.from_numpy(reach))
    assert bool((Q.pattern.diagonal_positions >= 0).all())
    # the stored values are exactly symmetric (the symmetric pattern's promise)
    assert torch.equal(Q.values, Q.values[Q.pattern.transpose_perm])


def test_coefficients_are_the_binomial_expansion():
    structure = MaternPrecision(sp.csr_matrix(lattice()[0]), 3)
    kappa2 = torch.tensor([0.5, 2.0], dtype=F64)
    expected = torch.stack([kappa2**3, 3 * kappa2**2, 3 * kappa2, torch.ones_like(kappa2)], -1)
    torch.testing.assert_close(structure.coefficients(kappa2), expected, **TOL)
    assert structure.basis.shape == (4, structure.pattern.nnz)
    np.testing.assert_array_equal(structure.basis[0][structure.pattern.diagonal_positions.numpy()], 1.0)


@pytest.mark.parametrize("alpha", [1, 2, 3])
@pytest.mark.parametrize("which", ["lattice", "graph"])
def test_exact_logdet_value_and_gradients_match_dense(alpha, which):
    lap, eig = lattice() if which == "lattice" else (graph_laplacian(), np.linalg.eigvalsh(graph_laplacian()))
    structure = MaternPrecision(sp.csr_matrix(lap), alpha, eigenvalues=eig)
    kappa2, tau = scalars(0.45, 2.3)
    Q = structure.operator(kappa2, tau)
    assert isinstance(Q, KnownLogdetSparseLinearOperator)
    logdet = Q.logdet()
    logdet.backward()
    kappa2_r, tau_r = scalars(0.45, 2.3)
    expected = torch.logdet(dense_q(lap, alpha, kappa2_r, tau_r))
    expected.backward()
    torch.testing.assert_close(logdet, expected, **TOL)
    torch.testing.assert_close(kappa2.grad, kappa2_r.grad, **TOL)
    torch.testing.assert_close(tau.grad, tau_r.grad, **TOL)
    torch.testing.assert_close(structure.logdet(kappa2.detach(), tau.detach()), expected.detach(), **TOL)


@pytest.mark.skipif(not cholmod_available(), reason="scikit-sparse (CHOLMOD) not installed")
def test_exact_logdet_matches_cholmod_on_a_larger_lattice():
    from gpsparse.autograd.cholmod import cholesky_logdet

    m1, m2, h1, h2 = 40, 30, 0.1, 0.13
    lap = sp.kron(sp.csr_matrix(path_laplacian(m1, h1)), sp.identity(m2)) + sp.kron(
        sp.identity(m1), sp.csr_matrix(path_laplacian(m2, h2))
    )
    eig = np.add.outer(np.linalg.eigvalsh(path_laplacian(m1, h1)), np.linalg.eigvalsh(path_laplacian(m2, h2)))
    structure = MaternPrecision(lap, 2, eigenvalues=eig.ravel())
    kappa2, tau = torch.tensor(3.0, dtype=F64), torch.tensor(1e-3, dtype=F64)
    Q = structure.operator(kappa2, tau)
    torch.testing.assert_close(Q.logdet(), cholesky_logdet(Q.values, Q.pattern), rtol=1e-11, atol=1e-8)


def test_batched_parameters_share_the_pattern():
    lap, eig = lattice()
    structure = MaternPrecision(sp.csr_matrix(lap), 2, eigenvalues=eig)
    kappa2 = torch.tensor([[0.3], [1.2]], dtype=F64)  # (2, 1)
    tau = torch.tensor([0.5, 1.0, 2.0], dtype=F64)  # (3,)
    Q = structure.operator(kappa2, tau)
    assert Q.values.shape == (2, 3, structure.pattern.nnz) and Q.pattern is structure.pattern
    assert Q.known_logdet.shape == (2, 3)
    dense = Q.to_dense()
    for i in range(2):
        for j in range(3):
            expected = dense_q(lap, 2, kappa2[i, 0], tau[j])
            torch.testing.assert_close(dense[i, j], expected, **TOL)
            torch.testing.assert_close(Q.known_logdet[i, j], torch.logdet(expected), **TOL)


def test_mean_variance_and_dtypes():
    lap, eig = lattice()
    structure = MaternPrecision(sp.csr_matrix(lap), 3, eigenvalues=eig)
    kappa2 = torch.tensor([0.4, 1.5], dtype=F64)
    expected = torch.stack(
        [torch.linalg.inv(dense_q(lap, 3, k, torch.tensor(1.0, dtype=F64))).diagonal().mean() for k in kappa2]
    )
    torch.testing.assert_close(structure.mean_variance(kappa2), expected, **TOL)
    Q32 = structure.operator(torch.tensor(0.4), torch.tensor(1.0))
    assert Q32.dtype == torch.float32 and Q32.known_logdet.dtype == torch.float32
    torch.testing.assert_close(
        Q32.to_dense().double(), dense_q(lap, 3, kappa2[0], torch.tensor(1.0, dtype=F64)), rtol=1e-5, atol=1e-5
    )
    Q64 = structure.operator(kappa2[0], torch.tensor(1.0, dtype=F64))
    assert Q64.dtype == F64 and Q64.pattern is Q32.pattern  # one pattern, value caches per dtype


def test_materns_precision_errors():
    lap, eig = lattice()
    with pytest.raises(ValueError, match="alpha must be an integer ≥ 1"):
        MaternPrecision(sp.csr_matrix(lap), 0)
    with pytest.raises(ValueError, match="alpha must be an integer ≥ 1"):
        MaternPrecision(sp.csr_matrix(lap), 1.5)
    with pytest.raises(ValueError, match="must be square"):
        MaternPrecision(sp.csr_matrix(np.ones((3, 4))), 1)
    bad = lap.copy()
    bad[0, 1] += 0.5
    with pytest.raises(ValueError, match="must be symmetric"):
        MaternPrecision(sp.csr_matrix(bad), 1)
    with pytest.raises(ValueError, match="expected 35 eigenvalues, got 34"):
        MaternPrecision(sp.csr_matrix(lap), 1, eigenvalues=eig[:-1])
    plain = MaternPrecision(sp.csr_matrix(lap), 1)
    one = torch.tensor(1.0, dtype=F64)
    with pytest.raises(ValueError, match="needs the Laplacian's eigenvalues"):
        plain.logdet(one, one)
    with pytest.raises(ValueError, match="needs the Laplacian's eigenvalues"):
        plain.mean_variance(one)


# ------------------------------------------------------- KnownLogdet operator
def known_operator(batch=(), alpha=2):
    """A KnownLogdetSparseLinearOperator from MaternPrecision (differentiable leaf κ², τ) and its dense twin."""
    lap, eig = lattice()
    structure = MaternPrecision(sp.csr_matrix(lap), alpha, eigenvalues=eig)
    n = int(torch.Size(batch).numel())
    kappa2 = torch.linspace(0.4, 1.1, n, dtype=F64).reshape(batch).requires_grad_(True)
    tau = torch.linspace(1.5, 0.7, n, dtype=F64).reshape(batch).requires_grad_(True)
    return structure.operator(kappa2, tau), (lap, alpha, kappa2, tau)


def dense_twin(params):
    lap, alpha, kappa2, tau = params
    k, t = kappa2.detach().clone().requires_grad_(True), tau.detach().clone().requires_grad_(True)
    batch = k.shape
    flat = [dense_q(lap, alpha, a, b) for a, b in zip(k.reshape(-1), t.reshape(-1))]
    return torch.stack(flat).reshape(*batch, *flat[0].shape), k, t


@pytest.mark.parametrize("batch", [(), (2,)], ids=["single", "batch"])
def test_inv_quad_logdet_uses_the_known_logdet_and_gradients_match_dense(batch):
    Q, params = known_operator(batch)
    rhs = torch.randn(*batch, Q.shape[-1], 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    with gpsparse.settings.solver_defaults(rtol=1e-12), linear_operator.settings.max_cholesky_size(0):
        quad, logdet = Q.inv_quad_logdet(rhs, logdet=True)
    assert logdet is Q.known_logdet
    (quad.sum() + 2 * logdet.sum()).backward()
    dense, k, t = dense_twin(params)
    quad_r = (rhs * torch.linalg.solve(dense, rhs)).sum((-1, -2))
    (quad_r.sum() + 2 * torch.logdet(dense).sum()).backward()
    torch.testing.assert_close(quad, quad_r, **tolerance(F64, "iterative"))
    torch.testing.assert_close(logdet, torch.logdet(dense), **TOL)
    torch.testing.assert_close(params[2].grad, k.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(params[3].grad, t.grad, rtol=1e-8, atol=1e-10)
    _, only = Q.inv_quad_logdet(None, logdet=True)
    assert only is Q.known_logdet
    assert torch.equal(torch.logdet(Q), Q.known_logdet)  # __torch_function__ → logdet → inv_quad_logdet


def test_logdet_broadcasts_to_the_batch_of_the_right_hand_side():
    Q, _ = known_operator()
    rhs = torch.randn(4, Q.shape[-1], 2, dtype=F64)
    quad, logdet = Q.inv_quad_logdet(rhs, logdet=True)
    assert quad.shape == (4,) and logdet.shape == (4,)
    torch.testing.assert_close(logdet, Q.known_logdet.expand(4))


def test_matmul_and_bilinear_derivative_with_the_extra_logdet_argument():
    """linear_operator's Matmul Function rebuilds the operator from (values, logdet): gradients reach the values."""
    Q, params = known_operator((2,))
    assert len(Q.representation()) == 2
    rhs = torch.randn(2, Q.shape[-1], 3, dtype=F64, requires_grad=True)
    weights = torch.randn(2, Q.shape[-1], 3, dtype=F64)
    (weights * (Q @ rhs)).sum().backward()
    dense, k, t = dense_twin(params)
    rhs_r = rhs.detach().clone().requires_grad_(True)
    (weights * (dense @ rhs_r)).sum().backward()
    torch.testing.assert_close(rhs.grad, rhs_r.grad, **TOL)
    torch.testing.assert_close(params[2].grad, k.grad, **TOL)
    torch.testing.assert_close(params[3].grad, t.grad, **TOL)
    grads = Q.detach()._bilinear_derivative(torch.ones(2, Q.shape[-1], 1, dtype=F64), rhs.detach())
    assert len(grads) == 2 and grads[1] is None


def test_positive_scaling_keeps_the_closed_form():
    Q, params = known_operator((3,))
    c = torch.tensor([0.5, 2.0, 7.0], dtype=F64, requires_grad=True)
    scaled = Q * c.reshape(3, 1, 1)  # LinearOperator.mul → _mul_constant, as ScaleKernel does
    assert isinstance(scaled, KnownLogdetSparseLinearOperator)
    dense, _, _ = dense_twin(params)
    expected = torch.logdet(dense.detach() * c.detach().reshape(3, 1, 1))
    torch.testing.assert_close(scaled.logdet(), expected, **TOL)
    scaled.logdet().sum().backward()
    torch.testing.assert_close(c.grad, Q.shape[-1] / c.detach(), **TOL)  # d/dc (log det A + n log c)
    scalar = Q * 3.0
    assert isinstance(scalar, KnownLogdetSparseLinearOperator)
    torch.testing.assert_close(scalar.logdet(), Q.known_logdet + Q.shape[-1] * math.log(3.0), **TOL)
    negative = Q._mul_constant(torch.tensor(-1.0, dtype=F64))
    assert type(negative) is SparseLinearOperator  # log det of −A: no closed form here


def test_operations_that_lose_the_closed_form_fall_back_to_the_general_paths():
    Q, params = known_operator()
    dense, _, _ = dense_twin(params)
    shifted = Q.add_diagonal(torch.tensor(0.5, dtype=F64))
    assert type(shifted) is SparseLinearOperator
    n = Q.shape[-1]
    torch.testing.assert_close(shifted.logdet(), torch.logdet(dense + 0.5 * torch.eye(n, dtype=F64)), **TOL)
    assert type(Q + Q) is SparseLinearOperator
    torch.testing.assert_close((Q + Q).logdet(), torch.logdet(2 * dense), **TOL)
    assert type(Q[:5, :5]) is SparseLinearOperator


def test_batch_operations_keep_the_closed_form():
    Q, params = known_operator((2, 3))
    dense, _, _ = dense_twin(params)
    logdets = torch.logdet(dense)
    for op, expected in (
        (Q[1], logdets[1]),
        (Q[:, 2], logdets[:, 2]),
        (Q[torch.tensor([1, 0])], logdets[[1, 0]]),
        (Q.permute(1, 0, 2, 3), logdets.T),
        (Q.unsqueeze(0), logdets.unsqueeze(0)),
        (Q[0].expand(4, 3, *Q.shape[-2:]), logdets[0].expand(4, 3)),
        (Q.mT, logdets),
    ):
        assert isinstance(op, KnownLogdetSparseLinearOperator), type(op)
        torch.testing.assert_close(op.logdet(), expected, **TOL)
    single, single_params = known_operator()
    expanded = single.expand(2, *single.shape)
    assert isinstance(expanded, KnownLogdetSparseLinearOperator) and expanded.known_logdet.shape == (2,)
    assert type(Q.sum(0)) is SparseLinearOperator  # a sum of matrices has no known log-determinant


def test_copies_and_conversions_keep_the_closed_form():
    Q, _ = known_operator((2,))
    Q = Q.detach()
    for op in (pickle.loads(pickle.dumps(Q)), copy.deepcopy(Q), Q.clone(), Q.float().double(), Q.detach()):
        assert isinstance(op, KnownLogdetSparseLinearOperator)
        torch.testing.assert_close(op.logdet(), Q.known_logdet)
        torch.testing.assert_close(op.to_dense(), Q.to_dense())
    assert Q.float().known_logdet.dtype == torch.float32


def test_noisy_precision_covariance_uses_the_known_logdet_and_matches_dense():
    """W Q⁻¹ Wᵀ + σ²I through the posterior precision: log det Q is the closed form, gradients exact."""
    Q, params = known_operator()
    gen = torch.Generator().manual_seed(3)
    rows = torch.randperm(Q.shape[-1], generator=gen)[:20]
    W = torch.zeros(20, Q.shape[-1], dtype=F64)
    W[torch.arange(20), rows] = 0.6
    W[torch.arange(20), (rows + 1) % Q.shape[-1]] = 0.4
    noise = torch.tensor(0.05, dtype=F64, requires_grad=True)
    y = torch.randn(20, dtype=F64, generator=gen)
    K = SparsePrecisionLinearOperator(Q, interp=W.to_sparse()) + DiagLinearOperator(noise.expand(20))
    assert isinstance(K, NoisySparsePrecisionLinearOperator)
    with gpsparse.settings.solver_defaults(rtol=1e-12):
        quad, logdet = K.inv_quad_logdet(y, logdet=True)
    (quad + logdet).backward()
    dense, k, t = dense_twin(params)
    noise_r = noise.detach().clone().requires_grad_(True)
    Ky = W @ torch.linalg.inv(dense) @ W.T + noise_r * torch.eye(20, dtype=F64)
    quad_r = y @ torch.linalg.solve(Ky, y)
    (quad_r + torch.logdet(Ky)).backward()
    torch.testing.assert_close(quad, quad_r, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(logdet, torch.logdet(Ky), rtol=1e-9, atol=1e-10)
    for got, expected in ((params[2].grad, k.grad), (params[3].grad, t.grad), (noise.grad, noise_r.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)


def test_known_logdet_operator_errors():
    Q, _ = known_operator()
    values, pattern = Q.values.detach(), Q.pattern
    with pytest.raises(ValueError, match="needs a symmetric pattern"):
        KnownLogdetSparseLinearOperator(values, torch.tensor(0.0, dtype=F64), pattern=pattern.with_symmetric(False))
    with pytest.raises(ValueError, match=r"logdet must have the batch shape \(\) of the values, got \(2,\)"):
        KnownLogdetSparseLinearOperator(values, torch.zeros(2, dtype=F64), pattern=pattern)
    with pytest.raises(ValueError, match="got float"):
        KnownLogdetSparseLinearOperator(values, 1.0, pattern=pattern)
    with pytest.raises(ValueError, match="dtype and device of the values"):
        KnownLogdetSparseLinearOperator(values, torch.tensor(0.0), pattern=pattern)
    rect, _ = SparsityPattern.from_indices(torch.tensor([0, 1]), torch.tensor([1, 2]), (2, 3))
    with pytest.raises(ValueError, match="needs a symmetric pattern"):
        KnownLogdetSparseLinearOperator(torch.ones(2, dtype=F64), torch.tensor(0.0, dtype=F64), pattern=rect)
