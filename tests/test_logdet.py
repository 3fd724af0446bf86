"""SLQ log-determinants: exactness, gradients (adjoint = gradient of the estimate), determinism, errors."""

from __future__ import annotations

import pytest
import torch
from matrices import build, lattice_precision_13pt, random_spd, scipy_to_torch

import gpsparse
from gpsparse import NotPositiveDefiniteError, SparseLinearOperator
from gpsparse.linalg import logdet


def _leaf(coo):
    values = coo.values().clone().requires_grad_(True)
    return torch.sparse_coo_tensor(coo.indices(), values, coo.shape), values


def _dense_reference(coo):
    """logdet and its symmetrised gradient at the stored entries (= A⁻¹ there)."""
    values = coo.values().clone().requires_grad_(True)
    value = torch.logdet(torch.sparse_coo_tensor(coo.indices(), values, coo.shape).to_dense())
    value.backward()
    grad = torch.sparse_coo_tensor(coo.indices(), values.grad, coo.shape).to_dense()
    grad = 0.5 * (grad + grad.T)
    return value.detach(), grad[coo.indices()[0], coo.indices()[1]]


@pytest.mark.parametrize("gradient", ["adjoint", "hutchinson"])
@pytest.mark.parametrize("preconditioner", [None, "jacobi", "ic0"])
def test_exact_with_unit_probes_and_full_depth(gradient, preconditioner):
    """num_lanczos = n with probes √n·e_i makes SLQ exact: value and gradient equal the dense ones."""
    coo = scipy_to_torch(random_spd(40))
    n = coo.shape[0]
    expected, expected_grad = _dense_reference(coo)
    A, values = _leaf(coo)
    probes = torch.eye(n, dtype=torch.float64) * n**0.5
    est = logdet(
        A,
        probes=probes,
        num_lanczos=n,
        gradient=gradient,
        preconditioner=preconditioner,
        reorthogonalize=True,
        rtol=1e-13,
    )
    est.backward()
    torch.testing.assert_close(est, expected, rtol=1e-11, atol=1e-10)
    torch.testing.assert_close(values.grad, expected_grad, rtol=1e-8, atol=1e-10)


def test_adjoint_gradient_is_the_gradient_of_the_estimate():
    """Central finite differences of the (fixed-probe) estimate agree with its adjoint gradient to ~1e-6."""
    coo = scipy_to_torch(lattice_precision_13pt(10, kappa=0.4, noise=2.0))
    indices = coo.indices()
    direction = torch.randn(coo.values().shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    # a symmetric perturbation keeps the matrix symmetric
    dense_dir = torch.sparse_coo_tensor(indices, direction, coo.shape).to_dense()
    direction = (0.5 * (dense_dir + dense_dir.T))[indices[0], indices[1]]

    def estimate(values):
        A = torch.sparse_coo_tensor(indices, values, coo.shape)
        return logdet(A, num_probes=4, num_lanczos=12, generator=torch.Generator().manual_seed(7))

    values = coo.values().clone().requires_grad_(True)
    estimate(values).backward()
    h = 1e-5
    with torch.no_grad():
        fd = (estimate(coo.values() + h * direction) - estimate(coo.values() - h * direction)) / (2 * h)
    analytic = (values.grad * direction).sum()
    assert abs(float(fd - analytic)) <= 1e-6 * abs(float(analytic))


def test_gradcheck_tiny_symmetric_parameterisation():
    coo = build("lattice5-3x3")
    indices, n = coo.indices(), coo.shape[0]
    upper = indices[0] <= indices[1]
    key = indices[0][upper] * n + indices[1][upper]
    param_index = torch.searchsorted(
        key, torch.minimum(indices[0], indices[1]) * n + torch.maximum(indices[0], indices[1])
    )
    probes = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def f(params):
        return logdet(torch.sparse_coo_tensor(indices, params[param_index], coo.shape), probes=probes, num_lanczos=5)

    assert torch.autograd.gradcheck(f, (coo.values()[upper].clone().requires_grad_(True),), atol=1e-7, rtol=1e-6)


def test_same_generator_state_same_estimate():
    A = scipy_to_torch(lattice_precision_13pt(12))
    first = logdet(A, generator=torch.Generator().manual_seed(3))
    second = logdet(A, generator=torch.Generator().manual_seed(3))
    other = logdet(A, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second) and not torch.equal(first, other)


@pytest.mark.parametrize("gradient", ["adjoint", "hutchinson"])
def test_converges_to_dense_as_probes_grow(gradient):
    coo = scipy_to_torch(lattice_precision_13pt(20, kappa=0.5, noise=1.0))
    expected, expected_grad = _dense_reference(coo)
    errors = []
    for probes in (4, 64):
        A, values = _leaf(coo)
        est = logdet(
            A, num_probes=probes, num_lanczos=30, gradient=gradient, generator=torch.Generator().manual_seed(0)
        )
        est.backward()
        errors.append(
            (
                abs(float(est - expected)) / abs(float(expected)),
                float((values.grad - expected_grad).norm() / expected_grad.norm()),
            )
        )
    assert errors[1][0] < 1e-2
    # per-nonzero gradients are noisy (DESIGN.md §4): the error falls like 1/√p (16× probes → ~4×)
    assert errors[1][1] < errors[0][1] / 2.5 and errors[1][1] < 0.35


def test_chunked_probes_match_unchunked():
    coo = scipy_to_torch(lattice_precision_13pt(12))
    results = []
    for budget in (2**30, 1):  # 1 byte: one probe per chunk, bases recomputed in the backward
        A, values = _leaf(coo)
        est = logdet(A, num_probes=6, num_lanczos=15, generator=torch.Generator().manual_seed(2), max_memory=budget)
        est.backward()
        results.append((est.detach(), values.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-10, atol=1e-12)


def test_batched_operator():
    base = SparseLinearOperator.from_tensor(scipy_to_torch(random_spd(30)))
    scales = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64).view(3, 1)
    op = SparseLinearOperator(base.values * scales, pattern=base.pattern)
    n = 30
    est = logdet(op, probes=torch.eye(n, dtype=torch.float64) * n**0.5, num_lanczos=n, reorthogonalize=True)
    torch.testing.assert_close(est, torch.logdet(op.to_dense()), rtol=1e-10, atol=1e-10)


def test_bad_inputs():
    A = build("lattice5-6x6")
    with pytest.raises(ValueError, match="num_probes"):
        logdet(A, num_probes=0)
    with pytest.raises(ValueError, match="num_lanczos"):
        logdet(A, num_lanczos=-2)
    with pytest.raises(ValueError, match="gradient"):
        logdet(A, gradient="exact")
    with pytest.raises(ValueError, match="symmetric"):
        logdet(build("nonsym-40"))
    with pytest.raises(NotPositiveDefiniteError):
        logdet(build("sym-indefinite-40"), preconditioner=None)
    with pytest.raises(NotPositiveDefiniteError):
        logdet(build("sym-indefinite-40"), preconditioner=None, gradient="hutchinson")
    bad = torch.sparse_coo_tensor(
        A.indices(), A.values().clone().index_fill_(0, torch.tensor([0]), float("nan")), A.shape
    )
    with pytest.raises(ValueError, match="NaN"):
        logdet(bad)
    with pytest.raises(ValueError, match="probes must have shape"):
        logdet(A, probes=torch.ones(5, 2, dtype=torch.float64))


@pytest.mark.parametrize("gradient", ["adjoint", "hutchinson"])
def test_operator_inv_quad_logdet_matches_dense(gradient):
    """The operator's iterative inv_quad_logdet (max_cholesky_size(0)) against dense float64."""
    import linear_operator

    coo = scipy_to_torch(lattice_precision_13pt(15, kappa=0.5, noise=1.0))
    expected, expected_grad = _dense_reference(coo)
    y = torch.randn(coo.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dense = coo.to_dense()
    expected_quad = (y * torch.linalg.solve(dense, y)).sum()
    A, values = _leaf(coo)
    op = SparseLinearOperator.from_tensor(A)
    torch.manual_seed(0)
    with (
        linear_operator.settings.max_cholesky_size(0),
        gpsparse.settings.logdet_defaults(gradient=gradient, num_probes=256),
    ):
        quad, ld = op.inv_quad_logdet(inv_quad_rhs=y, logdet=True)
    torch.testing.assert_close(quad, expected_quad, rtol=1e-6, atol=1e-8)
    assert abs(float(ld - expected)) < 1e-2 * abs(float(expected))
    ld.backward()
    assert float((values.grad - expected_grad).norm() / expected_grad.norm()) < 0.2


def _batched_operator():
    base = SparseLinearOperator.from_tensor(scipy_to_torch(lattice_precision_13pt(8, kappa=0.7, noise=1.0)))
    scales = torch.tensor([1.0, 1.7], dtype=torch.float64).view(2, 1)
    return SparseLinearOperator(base.values * scales, pattern=base.pattern)


@pytest.mark.parametrize("gradient", ["adjoint", "hutchinson"])
@pytest.mark.parametrize("batched", [False, True])
def test_inv_quad_logdet_argument_combinations(gradient, batched):
    """Every combination linear_operator uses, on the iterative path, against dense float64."""
    import linear_operator

    op = _batched_operator() if batched else SparseLinearOperator.from_tensor(scipy_to_torch(lattice_precision_13pt(8)))
    dense = op.to_dense()
    n = dense.shape[-1]
    rhs = torch.randn(*op.batch_shape, n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact_quad = (rhs * torch.linalg.solve(dense, rhs)).sum(-2)
    probes = torch.eye(n, dtype=torch.float64) * n**0.5  # exact SLQ at full depth
    with (
        linear_operator.settings.max_cholesky_size(0),
        linear_operator.settings.num_trace_samples(n),
        gpsparse.settings.logdet_defaults(gradient=gradient, num_lanczos=n),
        patch_probes(probes),
    ):
        quad, ld = op.inv_quad_logdet(inv_quad_rhs=rhs, logdet=True, reduce_inv_quad=False)
        torch.testing.assert_close(quad, exact_quad, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(ld, torch.logdet(dense), rtol=1e-6, atol=1e-6)
        quad, ld = op.inv_quad_logdet(inv_quad_rhs=rhs, logdet=True)
        torch.testing.assert_close(quad, exact_quad.sum(-1), rtol=1e-6, atol=1e-8)
        quad, ld = op.inv_quad_logdet(inv_quad_rhs=None, logdet=True)
        torch.testing.assert_close(ld, torch.logdet(dense), rtol=1e-6, atol=1e-6)
        quad, ld = op.inv_quad_logdet(inv_quad_rhs=rhs, logdet=False, reduce_inv_quad=False)
        torch.testing.assert_close(quad, exact_quad, rtol=1e-6, atol=1e-8)
        assert ld.shape == ()
        torch.testing.assert_close(op.logdet(), torch.logdet(dense), rtol=1e-6, atol=1e-6)
        single = rhs[..., :1] if batched else rhs[:, 0]  # a vector right-hand side only for a single matrix
        torch.testing.assert_close(op.inv_quad(single), exact_quad[..., 0], rtol=1e-6, atol=1e-8)


class patch_probes:
    """Replace the operator's Rademacher probes by fixed ones (exactness checks)."""

    def __init__(self, probes):
        self.probes = probes

    def __enter__(self):
        from unittest.mock import patch

        def fake(shape, *, generator, dtype, device):
            return self.probes.to(dtype).expand(shape[0], *self.probes.shape).clone()

        self._patch = patch("gpsparse.linalg.dispatch.rademacher", side_effect=fake)
        self._patch.start()

    def __exit__(self, *exc):
        self._patch.stop()


def _logdet_config(num_rows: int = 0, device_type: str = "cpu"):
    """The log-determinant settings an operator of ``num_rows`` rows gets."""
    from gpsparse.operators.sparse import operator_road_config

    return operator_road_config(symmetric=True, num_rows=num_rows, device_type=device_type).logdet


def test_size_aware_defaults_keep_explicit_choices():
    small, large = _logdet_config(10_000), _logdet_config(100_000)
    assert (small.gradient, small.num_probes, small.preconditioner) == ("adjoint", 16, "jacobi")
    assert (large.gradient, large.num_probes, large.preconditioner) == ("hutchinson", 4, "ic0")
    assert _logdet_config(100_000, "cuda").preconditioner == "jacobi"
    with gpsparse.settings.logdet_defaults(num_probes=9), gpsparse.settings.logdet_defaults(method="slq"):
        config = _logdet_config(10**6)  # explicit choices survive nesting; the rest stays size-aware
    assert (config.gradient, config.num_probes, config.preconditioner) == ("hutchinson", 9, "ic0")
    with gpsparse.settings.logdet_defaults(gradient="adjoint"):
        config = _logdet_config(10**6)  # an explicit adjoint keeps the small-size probes and scaling
    assert (config.gradient, config.num_probes, config.preconditioner) == ("adjoint", 16, "jacobi")
    with gpsparse.settings.logdet_defaults(preconditioner=None):
        assert _logdet_config(10**6).preconditioner is None
    with gpsparse.settings.logdet_defaults(large_size=0):
        assert _logdet_config(10**6).gradient == "adjoint"
    with pytest.raises(ValueError, match="large_size"):
        gpsparse.settings.logdet_defaults(large_size=-1)


def test_reads_linear_operator_settings_when_user_set():
    import linear_operator

    assert _logdet_config().num_probes == gpsparse.settings.current().num_probes
    with linear_operator.settings.num_trace_samples(7), linear_operator.settings.max_lanczos_quadrature_iterations(11):
        config = _logdet_config()
    assert (config.num_probes, config.num_lanczos) == (7, 11)
    with gpsparse.settings.logdet_defaults(num_probes=5, gradient="hutchinson"):
        assert _logdet_config().num_probes == 5 and _logdet_config().gradient == "hutchinson"
    with pytest.raises(ValueError, match="num_probes"):
        gpsparse.settings.logdet_defaults(num_probes=0)
    with pytest.raises(ValueError, match="gradient"):
        gpsparse.settings.logdet_defaults(gradient="exact")


def test_operator_logdet_bad_matrices():
    import linear_operator

    indefinite = SparseLinearOperator.from_tensor(build("sym-indefinite-40"))
    with linear_operator.settings.max_cholesky_size(0):
        with pytest.raises(NotPositiveDefiniteError):
            indefinite.inv_quad_logdet(torch.ones(40, 1, dtype=torch.float64), logdet=True)
        nan = SparseLinearOperator(
            indefinite.values.clone().index_fill_(0, torch.tensor([3]), float("nan")), pattern=indefinite.pattern
        )
        with pytest.raises(ValueError, match="NaN"):
            nan.inv_quad_logdet(torch.ones(40, 1, dtype=torch.float64), logdet=True)
        with pytest.raises(ValueError, match="symmetric"):
            SparseLinearOperator.from_tensor(build("nonsym-40")).inv_quad_logdet(
                torch.ones(40, 1, dtype=torch.float64), logdet=True
            )
