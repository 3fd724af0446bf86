"""Separable space–time precisions (issue 13, item 3): ``Q = Q_t ⊗ Q_s``, ``W = W_t ⊙ W_s``, against dense float64.

The dense references form ``torch.kron(Q_t, Q_s)`` from the components' dense
precisions and the row-wise Kronecker product of their dense interpolations
(``einsum``), independently of ``gpsparse.core.kronecker``.
"""

from __future__ import annotations

import pickle
import unittest

import gpytorch
import pytest
import torch
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase
from test_conformance import _known_logdet_operator

import gpsparse
import gpsparse.core.cholmod
from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
from gpsparse.core.kronecker import (
    KroneckerPattern,
    TimeBlockPreconditioner,
    kronecker_pattern,
    time_block_structure,
    time_block_values,
)
from gpsparse.core.pattern import SparsityPattern
from gpsparse.kernels import (
    AR1Kernel,
    GraphMaternKernel,
    LatticeMaternKernel,
    MarkovMaternKernel,
    OrnsteinUhlenbeckKernel,
    SpaceTimeKernel,
    SparsePrecisionAdditiveKernel,
)
from gpsparse.kernels.lattice import neumann_eigenvalues, neumann_laplacian
from gpsparse.kernels.prediction import SparsePrecisionPredictionStrategy
from gpsparse.kernels.spde import MaternPrecision
from gpsparse.operators.kronecker import KroneckerPrecisionLinearOperator, SpaceTimeNoisyLinearOperator, face_split
from gpsparse.operators.precision import NoisySparsePrecisionLinearOperator

BOX = [[0.0, 0.0], [1.0, 1.0]]
TIGHT = {"rtol": 1e-8, "atol": 1e-10}
EXACT = {"rtol": 1e-12, "atol": 1e-13}
IRREGULAR = [0.0, 0.4, 1.0, 1.3, 2.5, 3.0]


# ------------------------------------------------------------------ fixtures
def _time_precision(knots=(0.0, 0.5, 1.2), lengthscale=0.9, dtype=torch.float32, batch=()):
    kernel = OrnsteinUhlenbeckKernel(torch.tensor(knots), batch_shape=torch.Size(batch)).to(dtype)
    count = int(torch.Size(batch).numel())
    kernel.lengthscale = torch.linspace(lengthscale, 1.5 * lengthscale, count).reshape(*batch, 1, 1)
    return kernel.precision().detach()


def _space_precision(batch=(), dtype=torch.float64, kappa2=(0.8, 1.6), tau=(0.5, 0.3)):
    """``τ(κ²I + L)²`` on a 4 × 5 lattice with cells 1 × 0.7 (distinct eigenvalues), ``(*batch, 20, 20)``."""
    sizes, spacing = (4, 5), (1.0, 0.7)
    structure = MaternPrecision(neumann_laplacian(sizes, spacing), 2, eigenvalues=neumann_eigenvalues(sizes, spacing))
    count = int(torch.Size(batch).numel())
    kappa2 = torch.linspace(*kappa2, count, dtype=dtype).reshape(batch)
    tau = torch.linspace(*tau, count, dtype=dtype).reshape(batch)
    return structure.operator(kappa2, tau)


def _kron_operator(batch=(), closed_form=True):
    """``Q_t ⊗ Q_s``: a 3-knot Ornstein–Uhlenbeck chain ⊗ a 4 × 5 lattice Matérn precision (N = 60, float32).

    N ≤ 64, the default Lanczos depth, so the suite's Lanczos ``sqrt_inv_matmul`` is exact.

    The space factor is well conditioned (κ² = 2.5, τ = 0.1: entries of order 1 in ``Q`` and ``Q⁻¹``,
    so that the suite's absolute tolerances hold in float32 for samples and solve gradients).
    ``closed_form=False`` drops the factors' closed-form log-determinants (each factor's own road,
    differentiable in its values: the suite's gradient checks of sums with a diagonal compare
    against the dense matrix's values only).
    """
    Qt, Qs = _time_precision(batch=batch), _space_precision(dtype=torch.float32, kappa2=(2.5, 2.5), tau=(0.1, 0.1))
    if not closed_form:
        Qt, Qs = (SparseLinearOperator(A.values, pattern=A.pattern) for A in (Qt, Qs))
    return KroneckerPrecisionLinearOperator(Qt, Qs)


class Model(gpytorch.models.ExactGP):
    def __init__(self, x, y, kernel):
        super().__init__(x, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean = gpytorch.means.ConstantMean()
        self.covar = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean(x), self.covar(x))


def _space_time_kernel(time="ar1", space="lattice", posterior="auto"):
    if space == "lattice":
        space_kernel = LatticeMaternKernel(BOX, (7, 6))
        space_kernel.lengthscale = 0.45
    else:
        ring = torch.stack([torch.arange(12), (torch.arange(12) + 1) % 12])
        chords = torch.tensor([[0, 3, 5], [6, 9, 11]])
        space_kernel = GraphMaternKernel(torch.cat([ring, chords], 1), alpha=2)
        space_kernel.lengthscale = 1.7
    if time == "ar1":
        time_kernel = AR1Kernel(torch.arange(5.0))
        time_kernel.rho = 0.65
    elif time == "ou":
        time_kernel = OrnsteinUhlenbeckKernel(torch.tensor(IRREGULAR, dtype=torch.float64))
        time_kernel.lengthscale = 1.1
    else:  # a 1-D lattice Matérn ν = 3/2 in time
        time_kernel = LatticeMaternKernel([0.0, 4.0], 9)
        time_kernel.lengthscale = 2.0
    kernel = gpytorch.kernels.ScaleKernel(SpaceTimeKernel(space_kernel, time_kernel, posterior=posterior))
    kernel.outputscale = 1.4
    return kernel


def _inputs(n, time="ar1", space="lattice", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if space == "lattice":
        s = torch.rand(n, 2, generator=gen, dtype=torch.float64)
    else:
        s = torch.randint(0, 12, (n, 1), generator=gen).double()
    end = IRREGULAR[-1] if time == "ou" else 4.0
    t = end * torch.rand(n, 1, generator=gen, dtype=torch.float64)
    t[: n // 3] = t[: n // 3].round().clamp(max=end)  # some times on knots (one time weight)
    return torch.cat([s, t], -1)


def _model(n=70, time="ar1", space="lattice", posterior="auto"):
    x = _inputs(n, time, space)
    y = (
        torch.sin(3 * x[:, 0])
        + 0.4 * torch.cos(2 * x[:, -1])
        + 0.1 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    )
    model = Model(x, y, _space_time_kernel(time, space, posterior)).double()
    model.likelihood.noise = 0.08
    model.mean.constant = 0.2
    return model


def _dense_parts(kernel, x):
    """Dense ``(Q, W)`` of a ``ScaleKernel(SpaceTimeKernel)``: ``kron(Q_t, Q_s)`` and the row-wise Kronecker ``W``."""
    st = kernel.base_kernel
    space, time = st.space_kernel, st.time_kernel
    s, t = x[:, : st.space_dims], x[:, st.space_dims :]
    Q = torch.kron(time.precision().to_dense(), space.precision().to_dense())
    w_t = time.interpolation(t).to_dense()
    w_s = space.interpolation(s).to_dense() if isinstance(space, LatticeMaternKernel) else _selection(space, s)
    W = torch.einsum("ra,ri->rai", w_t, w_s).reshape(len(x), -1)
    return Q, W


def _selection(kernel, s):
    W = torch.zeros(len(s), kernel.num_nodes, dtype=torch.float64)
    W[torch.arange(len(s)), s[:, 0].long()] = 1.0
    return W


def _dense_covariance(kernel, x1, x2=None):
    Q, W1 = _dense_parts(kernel, x1)
    W2 = W1 if x2 is None else _dense_parts(kernel, x2)[1]
    return kernel.outputscale * (W1 @ torch.linalg.solve(Q, W2.T))


def _dense_loss(model, x, y):
    K = _dense_covariance(model.covar, x) + model.likelihood.noise * torch.eye(len(x), dtype=x.dtype)
    dist = torch.distributions.MultivariateNormal(model.mean.constant.expand(len(x)), covariance_matrix=K)
    return -dist.log_prob(y) / len(x)


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------ core and operator
def test_kronecker_pattern_matches_the_generic_pattern_structures():
    Qt, Qs = _time_precision(), _known_logdet_operator()
    pattern = kronecker_pattern(Qt.pattern, Qs.pattern)
    assert (
        isinstance(pattern, KroneckerPattern) and pattern.symmetric and pattern.nnz == Qt.pattern.nnz * Qs.pattern.nnz
    )
    generic = SparsityPattern(pattern.crow, pattern.col, pattern.size, symmetric=True)
    assert torch.equal(pattern.transpose_perm, generic.transpose_perm)
    assert torch.equal(pattern.diagonal_positions, generic.diagonal_positions)
    gen = torch.Generator().manual_seed(0)
    rows, cols = torch.randint(0, 60, (500,), generator=gen), torch.randint(0, 60, (500,), generator=gen)
    for got, expected in zip(pattern.positions(rows, cols), generic.positions(rows, cols)):
        assert torch.equal(got, expected)
    clone = pickle.loads(pickle.dumps(pattern))
    assert isinstance(clone, KroneckerPattern) and torch.equal(clone.col, pattern.col)


def test_operator_against_dense_kron():
    Qt, Qs = _time_precision(dtype=torch.float64), _space_precision()
    Q = KroneckerPrecisionLinearOperator(Qt, Qs)
    dense = torch.kron(Qt.to_dense(), Qs.to_dense())
    torch.testing.assert_close(Q.to_dense(), dense, **EXACT)
    torch.testing.assert_close(Q.logdet(), torch.linalg.slogdet(dense)[1], **EXACT)
    torch.testing.assert_close(Q.diagonal(), dense.diagonal(), **EXACT)
    rhs = torch.randn(60, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(Q._matmul(rhs), dense @ rhs, **EXACT)
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        torch.testing.assert_close(Q.solve(rhs), torch.linalg.solve(dense, rhs), **EXACT)
        torch.testing.assert_close(Q.inv_quad(rhs), (rhs * torch.linalg.solve(dense, rhs)).sum(), **EXACT)
    inverse = torch.linalg.inv(dense)
    torch.testing.assert_close(Q.selected_inverse(), inverse[Q.pattern.row, Q.pattern.col_long], **EXACT)
    # c·Q keeps the factors (the space factor scaled) and the log-determinant
    scaled = Q * 2.5
    assert isinstance(scaled, KroneckerPrecisionLinearOperator)
    torch.testing.assert_close(scaled.logdet(), torch.linalg.slogdet(2.5 * dense)[1], **EXACT)
    assert type(Q * -1.0) is SparseLinearOperator


def test_log_det_from_factors_equals_dense_slogdet_without_closed_forms():
    """Factors without closed forms: each factor's own road; the product's log det is still from the factors."""
    Qt = _time_precision(dtype=torch.float64)
    Qs = _space_precision()
    plain_t, plain_s = (SparseLinearOperator(A.values, pattern=A.pattern) for A in (Qt, Qs))
    Q = KroneckerPrecisionLinearOperator(plain_t, plain_s)
    dense = torch.kron(Qt.to_dense(), Qs.to_dense())
    torch.testing.assert_close(Q.logdet(), torch.linalg.slogdet(dense)[1], **EXACT)
    expected = Qs.shape[-1] * torch.logdet(Qt.to_dense()) + Qt.shape[-1] * torch.logdet(Qs.to_dense())
    torch.testing.assert_close(Q.known_logdet, expected, **EXACT)


def test_gradients_reach_the_factor_values():
    Qt, Qs = _time_precision(dtype=torch.float64), _space_precision()
    vt = Qt.values.clone().requires_grad_(True)
    vs = Qs.values.clone().requires_grad_(True)
    Q = KroneckerPrecisionLinearOperator(
        SparseLinearOperator(vt, pattern=Qt.pattern), SparseLinearOperator(vs, pattern=Qs.pattern)
    )
    rhs = torch.randn(60, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        (Q.logdet() + Q.inv_quad(rhs) + Q.to_dense().pow(2).sum()).backward()
    vt_d = vt.detach().clone().requires_grad_(True)
    vs_d = vs.detach().clone().requires_grad_(True)
    from gpsparse.core.sparse_ops import to_dense

    dense = torch.kron(to_dense(vt_d, Qt.pattern), to_dense(vs_d, Qs.pattern))
    dense = 0.5 * (dense + dense.T)
    (torch.logdet(dense) + (rhs * torch.linalg.solve(dense, rhs)).sum() + dense.pow(2).sum()).backward()
    sym_t = 0.5 * (vt_d.grad + vt_d.grad[Qt.pattern.transpose_perm])
    sym_s = 0.5 * (vs_d.grad + vs_d.grad[Qs.pattern.transpose_perm])
    torch.testing.assert_close(vt.grad, sym_t, **TIGHT)
    torch.testing.assert_close(vs.grad, sym_s, **TIGHT)


def test_batched_factors_broadcast():
    Q = KroneckerPrecisionLinearOperator(_time_precision(batch=(2,), dtype=torch.float64), _space_precision((3, 1)))
    assert Q.batch_shape == (3, 2)
    dense_t, dense_s = Q.time_precision.to_dense(), Q.space_precision.to_dense()
    for i in range(3):
        for j in range(2):
            expected = torch.kron(dense_t[i, j], dense_s[i, j])
            torch.testing.assert_close(Q.to_dense()[i, j], expected, **EXACT)
            torch.testing.assert_close(Q.logdet()[i, j], torch.logdet(expected), **EXACT)
    member = Q[1]
    assert isinstance(member, KroneckerPrecisionLinearOperator) and member.batch_shape == (2,)
    torch.testing.assert_close(member.to_dense(), Q.to_dense()[1], **EXACT)


def test_posterior_precision_adds_the_gram_inside_the_kronecker_pattern():
    kernel = _space_time_kernel()
    x = _inputs(40).float().double()
    kernel = kernel.double()
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = kernel(x)
    Ky = K.add_diagonal(torch.tensor(0.1, dtype=torch.float64))
    assert isinstance(Ky, NoisySparsePrecisionLinearOperator)
    assert isinstance(Ky.Q, KroneckerPrecisionLinearOperator)
    P = Ky.posterior_precision()
    assert P.pattern is Ky.Q.pattern  # bilinear space and linear time weights stay inside Q's stencil
    Q, W = _dense_parts(kernel, x)
    torch.testing.assert_close(P.to_dense(), kernel.outputscale.reciprocal() * Q + W.T @ W / 0.1, **EXACT)


def test_face_split_is_the_row_wise_kronecker_product():
    gen = torch.Generator().manual_seed(4)
    mask_t, mask_s = torch.rand(9, 5, generator=gen) < 0.4, torch.rand(9, 7, generator=gen) < 0.5
    mask_t[:, 0] = mask_s[:, 0] = True
    W_t = SparseLinearOperator.from_tensor((torch.rand(9, 5, generator=gen) * mask_t).double().to_sparse())
    W_s = SparseLinearOperator.from_tensor((torch.rand(9, 7, generator=gen) * mask_s).double().to_sparse())
    W = face_split(W_t, W_s)
    expected = torch.einsum("ra,ri->rai", W_t.to_dense(), W_s.to_dense()).reshape(9, 35)
    torch.testing.assert_close(W.to_dense(), expected, **EXACT)
    assert face_split(W_t, W_s).pattern is W.pattern  # cached by the factor patterns
    with pytest.raises(ValueError, match="as many rows"):
        face_split(W_t, SparseLinearOperator.from_tensor(torch.eye(4, dtype=torch.float64).to_sparse()))


class TestKroneckerPrecisionLinearOperator(LinearOperatorTestCase, unittest.TestCase):
    """``Q_t ⊗ Q_s`` (60 × 60): products and solves by the factors, gradients to both factors' values."""

    seed = 0
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = False

    def create_linear_op(self):
        return _kron_operator()

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()


class TestKroneckerPrecisionLinearOperatorBatch(TestKroneckerPrecisionLinearOperator):
    """A batch of 2 time factors ⊗ one space factor (broadcast)."""

    seed = 1

    def create_linear_op(self):
        return _kron_operator(batch=(2,))


class TestSpaceTimeCovarianceLinearOperator(LinearOperatorTestCase, unittest.TestCase):
    """``W Q⁻¹ Wᵀ + D`` with ``Q = Q_t ⊗ Q_s`` and ``W = W_t ⊙ W_s`` (12 × 12) — the operator GPyTorch trains on."""

    seed = 0
    should_test_sample = True
    should_call_cg = False
    should_call_lanczos = True

    def create_linear_op(self):
        Q = _kron_operator(closed_form=False)
        gen = torch.Generator().manual_seed(9)
        rows = torch.arange(12)
        W_t = torch.zeros(12, 3)
        W_t[rows, rows % 3] = 0.7
        W_t[rows, (rows + 1) % 3] = 0.3
        W_s = torch.zeros(12, 20)
        W_s[rows, rows] = 0.8
        W_s[rows, (3 * rows + 5) % 20] = 0.2 * torch.rand(12, generator=gen)
        W = face_split(
            SparseLinearOperator.from_tensor(W_t.to_sparse()), SparseLinearOperator.from_tensor(W_s.to_sparse())
        )
        noise = 0.2 + 0.3 * torch.rand(12, generator=gen)
        return SparsePrecisionLinearOperator(Q, interp=W).add_diagonal(noise)

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()


# ------------------------------------------------------------------ temporal kernels
def test_ar1_and_ornstein_uhlenbeck_covariances_at_the_knots():
    ar1 = AR1Kernel(torch.arange(6.0)).double()
    ar1.rho = -0.35
    knots = torch.arange(6.0, dtype=torch.float64)
    expected = (-0.35) ** (knots[:, None] - knots).abs()
    torch.testing.assert_close(ar1(knots[:, None]).to_dense(), expected, **EXACT)
    Q = ar1.precision()
    torch.testing.assert_close(Q.to_dense(), torch.linalg.inv(expected), **EXACT)
    torch.testing.assert_close(Q.logdet(), -5 * torch.log1p(torch.tensor(-(0.35**2), dtype=torch.float64)), **EXACT)
    ou = OrnsteinUhlenbeckKernel(torch.tensor(IRREGULAR, dtype=torch.float64)).double()
    ou.lengthscale = torch.tensor(0.8, dtype=torch.float64)  # a float would pass through float32
    grid = torch.tensor(IRREGULAR, dtype=torch.float64)
    expected = torch.exp(-(grid[:, None] - grid).abs() / 0.8)
    torch.testing.assert_close(ou(grid[:, None]).to_dense(), expected, **EXACT)
    torch.testing.assert_close(ou.precision().logdet(), torch.linalg.slogdet(expected)[1].neg(), **EXACT)
    # gpytorch's own Matérn ν = 1/2 with the same lengthscale
    matern = gpytorch.kernels.MaternKernel(nu=0.5).double()
    matern.lengthscale = torch.tensor(0.8, dtype=torch.float64)
    torch.testing.assert_close(ou(grid[:, None]).to_dense(), matern(grid[:, None]).to_dense(), **TIGHT)


def test_time_interpolation_between_knots():
    kernel = OrnsteinUhlenbeckKernel(torch.tensor(IRREGULAR, dtype=torch.float64)).double()
    t = torch.tensor([[0.0], [0.1], [1.3], [2.8], [3.0]], dtype=torch.float64)
    W = kernel.interpolation(t)
    assert W.pattern.nnz == 1 + 2 + 1 + 2 + 1  # one weight at a knot
    expected = torch.zeros(5, 6, dtype=torch.float64)
    expected[0, 0] = 1.0
    expected[1, 0], expected[1, 1] = 0.75, 0.25
    expected[2, 3] = 1.0
    expected[3, 4], expected[3, 5] = 0.4, 0.6
    expected[4, 5] = 1.0
    torch.testing.assert_close(W.to_dense(), expected, **EXACT)


# ------------------------------------------------------------------ the space–time kernel
@pytest.mark.parametrize("time", ["ar1", "ou", "lattice"])
def test_covariance_matches_dense_kron_reference(time):
    kernel = _space_time_kernel(time).double()
    x1, x2 = _inputs(25, time, seed=2), _inputs(9, time, seed=3)
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        K = kernel(x1).to_dense()
        cross = kernel(x2, x1).to_dense()
        diagonal = kernel(x1, diag=True)
        # the product kernel: the Hadamard product of the components' covariances
        st = kernel.base_kernel
        space = st.space_kernel(x1[:, :2]).to_dense()
        temporal = st.time_kernel(x1[:, 2:]).to_dense()
    torch.testing.assert_close(K, _dense_covariance(kernel, x1), **TIGHT)
    torch.testing.assert_close(cross, _dense_covariance(kernel, x2, x1), **TIGHT)
    torch.testing.assert_close(diagonal, _dense_covariance(kernel, x1).diagonal(), **TIGHT)
    torch.testing.assert_close(K, kernel.outputscale * space * temporal, **TIGHT)


def test_log_det_q_from_factors_equals_dense_slogdet():
    kernel = _space_time_kernel("ou").double()
    Q = kernel.base_kernel.precision()
    assert isinstance(Q, KroneckerPrecisionLinearOperator) and Q.shape == (6 * 42, 6 * 42)
    dense, _ = _dense_parts(kernel, _inputs(3, "ou"))
    torch.testing.assert_close(Q.logdet(), torch.linalg.slogdet(dense)[1], **TIGHT)
    torch.testing.assert_close(Q.to_dense(), dense, **EXACT)


@pytest.mark.parametrize(
    ("time", "space"), [("ar1", "lattice"), ("ou", "lattice"), ("ar1", "graph"), ("lattice", "lattice")]
)
def test_marginal_likelihood_and_all_gradients_match_dense(time, space):
    model = _model(time=time, space=space)
    x, y = model.train_inputs[0], model.train_targets
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    op = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(op, NoisySparsePrecisionLinearOperator) and isinstance(op.Q, KroneckerPrecisionLinearOperator)
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        loss = -mll(model(x), y)
        loss.backward()
    grads = _grads(model)
    model.zero_grad()
    reference = _dense_loss(model, x, y)
    reference.backward()
    expected = _grads(model)
    torch.testing.assert_close(loss, reference, **TIGHT)
    assert set(grads) == set(expected) and len(grads) == 5  # noise, mean, outputscale, space and time parameters
    for name in grads:
        assert bool((grads[name] != 0).all()), name
        torch.testing.assert_close(grads[name], expected[name], **TIGHT, msg=name)


def test_prediction_matches_dense():
    model = _model(time="ou")
    x, y = model.train_inputs[0], model.train_targets
    model.eval()
    x_test = _inputs(11, "ou", seed=5)
    with torch.no_grad(), gpsparse.settings.solver_defaults(rtol=1e-13):
        pred = model(x_test)
        mean, variance = pred.mean, pred.variance
        assert isinstance(model.prediction_strategy, SparsePrecisionPredictionStrategy)
        kernel = model.covar
        K = _dense_covariance(kernel, x) + model.likelihood.noise * torch.eye(len(x), dtype=x.dtype)
        cross = _dense_covariance(kernel, x_test, x)
        c = model.mean.constant
        expected_mean = c + cross @ torch.linalg.solve(K, y - c)
        expected_var = _dense_covariance(kernel, x_test).diagonal() - (cross * torch.linalg.solve(K, cross.T).T).sum(-1)
    torch.testing.assert_close(mean, expected_mean, **TIGHT)
    torch.testing.assert_close(variance, expected_var, **TIGHT)


def test_space_time_term_in_an_additive_model_stays_sparse():
    st = _space_time_kernel("ar1").base_kernel
    spatial = LatticeMaternKernel(BOX, 5, active_dims=[0, 1])
    additive = SparsePrecisionAdditiveKernel(st, spatial).double()
    x = _inputs(20)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        K = additive(x)
    assert isinstance(K, SparsePrecisionLinearOperator) and K.components == (0, 5 * 42, 5 * 42 + 25)
    with gpsparse.settings.solver_defaults(rtol=1e-13):
        expected = st(x).to_dense() + spatial(x[:, :2]).to_dense()
        torch.testing.assert_close(K.to_dense(), expected, **TIGHT)


# ------------------------------------------------------------------ the matrix-free posterior
def _unit_probes(monkeypatch, n):
    """Probes ``√N e_i`` (all N of them): the Hutchinson estimates of the trace become exact."""
    import gpsparse.operators.kronecker as kronecker

    probes = (n**0.5) * torch.eye(n, dtype=torch.float64).unsqueeze(0)
    monkeypatch.setattr(kronecker, "rademacher", lambda shape, **kwargs: probes)


@pytest.mark.parametrize("preconditioner", [None, "jacobi", "ic0", "cholesky"])
@pytest.mark.parametrize("time", ["ar1", "ou"])
def test_matrix_free_marginal_likelihood_is_exact_with_unit_probes(monkeypatch, preconditioner, time):
    """The matrix-free road (P from the factors and W) with all N unit probes equals the dense MLL and gradients."""
    if preconditioner == "cholesky" and not gpsparse.core.cholmod.cholmod_available():
        pytest.skip("scikit-sparse not installed")
    model = _model(time=time, posterior="kronecker")
    x, y = model.train_inputs[0], model.train_targets
    op = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
    assert isinstance(op, SpaceTimeNoisyLinearOperator) and op.uses_matrix_free_posterior()
    _unit_probes(monkeypatch, op.Q.shape[-1])
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with (
        gpsparse.settings.solver_defaults(rtol=1e-13),
        gpsparse.settings.logdet_defaults(preconditioner=preconditioner),
    ):
        loss = -mll(model(x), y)
        loss.backward()
    grads = _grads(model)
    model.zero_grad()
    reference = _dense_loss(model, x, y)
    reference.backward()
    expected = _grads(model)
    torch.testing.assert_close(loss, reference, **TIGHT)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], **TIGHT, msg=name)


def test_matrix_free_estimate_with_random_probes():
    torch.manual_seed(0)
    model = _model(time="ou", posterior="kronecker")
    x, y = model.train_inputs[0], model.train_targets
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    with gpsparse.settings.logdet_defaults(num_probes=256):
        loss = -mll(model(x), y)
    reference = _dense_loss(model, x, y)
    assert abs(float(loss.detach() - reference.detach())) < 0.01 * abs(float(reference.detach())) + 0.01


def test_posterior_mode_choice():
    kernel = gpytorch.kernels.ScaleKernel(
        SpaceTimeKernel(LatticeMaternKernel(BOX, 16), AR1Kernel(torch.arange(6.0)))
    ).double()
    x = _inputs(30)
    with gpytorch.settings.lazily_evaluate_kernels(False):
        op = (kernel(x) * 2.0).add_diagonal(torch.tensor(0.1, dtype=torch.float64))  # the type survives scaling
    assert isinstance(op, SpaceTimeNoisyLinearOperator) and op.Q.shape[-1] == 6 * 256
    assert not op.uses_matrix_free_posterior()  # adjoint gradients below 10⁵ rows: the sparse road
    with gpsparse.settings.logdet_defaults(gradient="hutchinson"):
        assert op.uses_matrix_free_posterior()
        with gpsparse.settings.logdet_defaults(method="cholesky"):
            assert not op.uses_matrix_free_posterior()
    small = _model()
    small_op = small.likelihood(small(small.train_inputs[0])).lazy_covariance_matrix.evaluate_kernel()
    with gpsparse.settings.logdet_defaults(gradient="hutchinson"):
        assert not small_op.uses_matrix_free_posterior()  # N ≤ 1024: exact dense road
    with pytest.raises(ValueError, match="posterior must be one of"):
        SpaceTimeKernel(LatticeMaternKernel(BOX, 4), AR1Kernel([0.0, 1.0]), posterior="dense")


def test_time_block_preconditioner_holds_the_diagonal_blocks_of_p():
    model = _model(time="ou")
    x = model.train_inputs[0]
    op = model.likelihood(model(x)).lazy_covariance_matrix.evaluate_kernel()
    Qt, Qs = op.Q.time_precision, op.Q.space_precision
    factors = op.factors
    structure = time_block_structure(factors.time_interp.pattern, factors.space_interp.pattern, Qs.pattern)
    weights = op.noise.reciprocal()
    blocks = time_block_values(
        structure, Qt.values, Qt.pattern, Qs.values, factors.time_interp.values, factors.space_interp.values, weights
    )
    P = op.posterior_precision().to_dense().detach()
    n_t, n_s = op.Q.num_times, op.Q.num_space
    from gpsparse.core.sparse_ops import to_dense

    dense_blocks = to_dense(blocks, structure[0])
    for a in range(n_t):
        torch.testing.assert_close(dense_blocks[a], P[a * n_s : (a + 1) * n_s, a * n_s : (a + 1) * n_s], **EXACT)
    if gpsparse.core.cholmod.cholmod_available():
        from gpsparse.core.cholmod import CholeskyPreconditioner

        M = TimeBlockPreconditioner(CholeskyPreconditioner.from_matrix(blocks, structure[0]), n_t, n_s)
        torch.testing.assert_close(M.logdet(), torch.logdet(dense_blocks).sum(), **EXACT)
        r = torch.randn(2, n_t * n_s, 3, dtype=torch.float64)
        dense_m = torch.block_diag(*dense_blocks)
        torch.testing.assert_close(M.solve(r), torch.linalg.solve(dense_m, r), **EXACT)
        torch.testing.assert_close(M.apply_inv_factor_t(M.apply_inv_factor(r)), torch.linalg.solve(dense_m, r), **EXACT)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("grid", "match"),
    [
        ([0.0, 2.0, 1.0, 3.0], "not sorted"),
        ([0.0, 1.0, 1.0, 2.0], "duplicated knots"),
        ([[0.0, 1.0]], "1-D"),
        ([1.0], "at least two knots"),
        ([0.0, float("nan")], "finite"),
    ],
)
def test_bad_time_grids_are_refused(grid, match):
    for kernel in (AR1Kernel, OrnsteinUhlenbeckKernel):
        with pytest.raises(ValueError, match=match):
            kernel(grid)


def test_ar1_needs_an_evenly_spaced_grid():
    with pytest.raises(ValueError, match="evenly spaced.*OrnsteinUhlenbeckKernel"):
        AR1Kernel([0.0, 1.0, 3.0])


def test_times_outside_the_grid_are_refused():
    kernel = _space_time_kernel("ar1").double()
    x = _inputs(5)
    x[2, 2] = 4.5
    with pytest.raises(ValueError, match=r"outside the time grid.*\[0, 4\]"):
        kernel(x).to_dense()
    x[2, 2] = -0.1
    with pytest.raises(ValueError, match="outside the time grid"):
        kernel(x).to_dense()


def test_wrong_input_width_is_refused():
    kernel = _space_time_kernel("ar1").double()
    with pytest.raises(ValueError, match=r"inputs of shape \(\.\.\., n, 3\): 2 space columns then the time column"):
        kernel(torch.rand(5, 2, dtype=torch.float64)).to_dense()
    graph = _space_time_kernel("ar1", space="graph").double()
    with pytest.raises(ValueError, match=r"\(\.\.\., n, 2\): 1 space column then the time column"):
        graph(torch.rand(5, 3, dtype=torch.float64)).to_dense()


def test_components_that_are_not_sparse_precision_kernels_are_refused():
    space = LatticeMaternKernel(BOX, 5)
    with pytest.raises(TypeError, match="MarkovMaternKernel is a state-space kernel"):
        SpaceTimeKernel(space, MarkovMaternKernel(nu=0.5))
    with pytest.raises(TypeError, match="sparse-precision kernel"):
        SpaceTimeKernel(gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel()), AR1Kernel([0.0, 1.0]))
    with pytest.raises(ValueError, match="space_dims"):
        SpaceTimeKernel(SparsePrecisionAdditiveKernel(space, LatticeMaternKernel(BOX, 4)), AR1Kernel([0.0, 1.0]))
