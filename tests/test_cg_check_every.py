"""CG's host synchronisations every few iterations (issue 16, item 1: no ``.item()`` per iteration on CUDA).

``check_every = c`` must give the same solution, iteration counts, tridiagonals and errors
(with the iteration they name) as looking at every iteration; checked on the CPU, where the
default is 1, by forcing other values.
"""

from __future__ import annotations

import pytest
import torch

from gpsparse.core.krylov import cg
from gpsparse.errors import NotPositiveDefiniteError, SolverBreakdownError
from tests.matrices import lattice_precision_5pt, scipy_to_torch

DTYPE = torch.float64


def _matrix():
    return scipy_to_torch(lattice_precision_5pt(12, kappa=0.2)).to_dense()


@pytest.mark.parametrize("check_every", [2, 5, 8, 1000])
@pytest.mark.parametrize("preconditioned", [False, True])
def test_same_iterates_counts_and_tridiagonals(check_every, preconditioned):
    A = _matrix()
    n = A.shape[0]
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(n, 4, generator=gen, dtype=DTYPE)
    B[:, 1] *= 1e-3  # columns converging at different iterations
    B[:, 3] = A @ torch.ones(n, dtype=DTYPE)
    diag = A.diagonal()
    precond = (lambda r: r / diag.unsqueeze(-1)) if preconditioned else None
    x1, info1 = cg(lambda v: A @ v, B, preconditioner=precond, rtol=1e-10, return_tridiag=True, check_every=1)
    xc, infoc = cg(lambda v: A @ v, B, preconditioner=precond, rtol=1e-10, return_tridiag=True, check_every=check_every)
    assert torch.equal(x1, xc)
    assert torch.equal(info1.iterations_per_column, infoc.iterations_per_column)
    assert info1.iterations == infoc.iterations
    for a, b in zip(info1.tridiag, infoc.tridiag):
        assert torch.equal(a, b)
    assert torch.equal(info1.converged, infoc.converged)


@pytest.mark.parametrize("check_every", [1, 3, 16])
def test_indefinite_matrix_error_names_the_same_iteration(check_every):
    A = _matrix()
    A[5, 5] = -50.0
    b = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(2), dtype=DTYPE)
    with pytest.raises(NotPositiveDefiniteError) as reference:
        cg(lambda v: A @ v, b, check_every=1)
    with pytest.raises(NotPositiveDefiniteError) as error:
        cg(lambda v: A @ v, b, check_every=check_every)
    assert str(error.value) == str(reference.value)


def test_nonfinite_matvec_error_names_the_same_iteration():
    A = _matrix()
    calls = {"n": 0}

    def matvec(v):
        calls["n"] += 1
        out = A @ v
        return out * float("nan") if calls["n"] == 3 else out

    b = torch.randn(A.shape[0], generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    with pytest.raises(SolverBreakdownError) as reference:
        cg(matvec, b, check_every=1)
    calls["n"] = 0
    with pytest.raises(SolverBreakdownError) as error:
        cg(matvec, b, check_every=8)
    assert str(error.value) == str(reference.value)


def test_check_every_must_be_positive():
    A = _matrix()
    with pytest.raises(ValueError, match="check_every"):
        cg(lambda v: A @ v, torch.ones(A.shape[0], dtype=DTYPE), check_every=0)
