"""linear_operator's own conformance suite, run against SparseLinearOperator.

Class attributes that differ from the suite's defaults, and why:

* ``should_call_cg = False`` — solves and inverse quadratic forms run on
  gpsparse's own CG (``gpsparse.krylov.cg``), never on
  ``linear_operator.utils.linear_cg`` (whose loose training tolerance and
  dense-gradient path are what gpsparse replaces).

Skipped: ``test_sqrt_inv_matmul`` and ``test_sqrt_inv_matmul_no_lhs``.
``sqrt_inv_matmul`` still runs linear_operator's contour-integral quadrature
(``SqrtInvMatmul``), whose float32 value gradient is off by ~8e-3 from the
exact one on this fixture (tolerance 1e-3) — and off by exactly as much for a
``DenseLinearOperator`` of the same matrix. :func:`test_sqrt_inv_matmul_matches_dense_operator`
shows gpsparse's operator reproduces ``DenseLinearOperator`` there to
rounding, so the gap is linear_operator's quadrature, not this adapter.
"""

from __future__ import annotations

import unittest

import linear_operator
import torch
from linear_operator.operators import DenseLinearOperator
from linear_operator.test.linear_operator_test_case import LinearOperatorTestCase, RectangularLinearOperatorTestCase
from matrices import lattice_precision_13pt, random_spd, scipy_to_torch

from gpsparse import SparseLinearOperator
from gpsparse.pattern import SparsityPattern


def _spd_operator(batch_shape=()):
    base = scipy_to_torch(lattice_precision_13pt(4, kappa=0.9, noise=0.7), torch.float32)
    op = SparseLinearOperator.from_tensor(base)
    if not batch_shape:
        return op
    scales = torch.linspace(0.5, 1.5, int(torch.Size(batch_shape).numel())).reshape(*batch_shape, 1)
    jitter = scipy_to_torch(random_spd(16, seed=4), torch.float32)
    extra = SparseLinearOperator.from_tensor(jitter)
    total = op + extra
    return SparseLinearOperator(total.values * scales, pattern=total.pattern)


class TestSparseLinearOperator(LinearOperatorTestCase, unittest.TestCase):
    seed = 0
    should_test_sample = True
    should_call_cg = False

    def create_linear_op(self):
        return _spd_operator()

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()


    _SQRT_REASON = (
        "linear_operator's contour-integral SqrtInvMatmul is inaccurate here (gradient error ~8e-3, "
        "identical for DenseLinearOperator); see test_sqrt_inv_matmul_matches_dense_operator"
    )

    @unittest.skip(_SQRT_REASON)
    def test_sqrt_inv_matmul(self):
        pass

    @unittest.skip(_SQRT_REASON)
    def test_sqrt_inv_matmul_no_lhs(self):
        pass


def test_sqrt_inv_matmul_matches_dense_operator():
    """Same values and value gradients as linear_operator's DenseLinearOperator on the same matrix."""
    torch.manual_seed(0)
    op = _spd_operator().detach().requires_grad_(True)
    dense = op.to_dense().detach().requires_grad_(True)
    rhs, lhs = torch.randn(16, 3), torch.randn(2, 16)
    grads = []
    for operator in (op, DenseLinearOperator(dense)):
        res, quad = linear_operator.sqrt_inv_matmul(operator, rhs, lhs)
        (res.sum() + quad.sum()).backward()
        grads.append(res)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    dense_grad = 0.5 * (dense.grad + dense.grad.T)
    torch.testing.assert_close(op.values.grad, dense_grad[op.pattern.row, op.pattern.col_long], rtol=1e-4, atol=1e-6)


class TestSparseLinearOperatorBatch(TestSparseLinearOperator):
    seed = 1

    def create_linear_op(self):
        return _spd_operator((2,))


class TestSparseLinearOperatorMultiBatch(TestSparseLinearOperator):
    seed = 2
    # The suite's multi-batch cases run the same code paths with larger batches; sampling is slow there.
    should_test_sample = False

    def create_linear_op(self):
        return _spd_operator((2, 3))


class TestSparseLinearOperatorRectangular(RectangularLinearOperatorTestCase, unittest.TestCase):
    seed = 3

    def create_linear_op(self):
        gen = torch.Generator().manual_seed(5)
        mask = torch.rand(7, 5, generator=gen) < 0.4
        mask[torch.arange(5), torch.arange(5)] = True
        row, col = mask.nonzero().T
        pattern, _ = SparsityPattern.from_indices(row, col, (7, 5))
        values = torch.randn(2, pattern.nnz, generator=gen)
        return SparseLinearOperator(values, pattern=pattern)

    def evaluate_linear_op(self, linear_op):
        return linear_op.to_dense()
