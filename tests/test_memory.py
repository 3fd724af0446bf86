"""Solve + backward at a size where an n × n tensor could never exist, with bounded peak memory.

n = 250 000 (an n × n float64 tensor would need 500 GB). The run happens in a
fresh subprocess so that its peak resident memory (``ru_maxrss``) measures
this workload alone (interpreter and torch included).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, resource, torch, gpsparse
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from matrices import lattice_precision_13pt, scipy_to_torch

    torch.manual_seed(0)
    A = scipy_to_torch(lattice_precision_13pt(500, kappa=0.5, noise=1.0))   # n = 250 000, 13 nnz/row
    values = A.values().clone().requires_grad_(True)
    A = torch.sparse_coo_tensor(A.indices(), values, A.shape)
    before = peak_rss_kib()
    B = torch.randn(A.shape[0], 4, dtype=torch.float64, requires_grad=True)
    X = gpsparse.solve(A, B, rtol=1e-8, strict=True)
    (X * torch.randn_like(X)).sum().backward()
    peak_kib = peak_rss_kib()
    print(json.dumps({"n": A.shape[0], "grad_shape": list(values.grad.shape), "nnz": values.numel(),
                      "peak_mib": peak_kib / 1024, "before_mib": before / 1024, "bgrad": list(B.grad.shape)}))
    """
)


def test_solve_backward_at_quarter_million_under_2gb():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, cwd=__file__.rsplit("/", 1)[0]
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["n"] == 250_000
    assert report["grad_shape"] == [report["nnz"]]  # one number per stored nonzero
    assert report["bgrad"] == [250_000, 4]
    assert report["peak_mib"] < 2048, report


LOGDET_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys, time, torch, gpsparse
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from gpsparse import SparseLinearOperator
    from matrices import lattice_precision_13pt, scipy_to_torch

    torch.manual_seed(0)
    A = scipy_to_torch(lattice_precision_13pt(500, kappa=0.5, noise=1.0))   # n = 250 000, 13 nnz/row
    values = A.values().clone().requires_grad_(True)
    op = SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(A.indices(), values, A.shape))
    y = torch.randn(A.shape[0], 1, dtype=torch.float64)
    start = time.perf_counter()
    with gpsparse.settings.logdet_defaults(gradient=sys.argv[1], num_probes=8, num_lanczos=32):
        quad, logdet = op.inv_quad_logdet(inv_quad_rhs=y, logdet=True)
    (quad + logdet).backward()
    peak_kib = peak_rss_kib()
    print(json.dumps({"grad_shape": list(values.grad.shape), "nnz": values.numel(), "peak_mib": peak_kib / 1024,
                      "seconds": time.perf_counter() - start, "finite": bool(torch.isfinite(values.grad).all())}))
    """
)


@pytest.mark.parametrize("gradient", ["adjoint", "hutchinson"])
def test_inv_quad_logdet_backward_at_quarter_million_under_3gb(gradient):
    out = subprocess.run(
        [sys.executable, "-c", LOGDET_SCRIPT, gradient],
        capture_output=True,
        text=True,
        check=True,
        cwd=__file__.rsplit("/", 1)[0],
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["grad_shape"] == [report["nnz"]] and report["finite"]
    assert report["peak_mib"] < 3072, report


PRECISION_SCRIPT = textwrap.dedent(
    """
    import json, resource, torch, gpsparse, linear_operator
    def peak_rss_kib():
        # this process's own peak RSS in KiB: VmHWM (a child's ru_maxrss starts at its parent's RSS at fork)
        try:
            with open("/proc/self/status") as status:
                return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    from gpsparse import SparseLinearOperator, SparsePrecisionLinearOperator
    from matrices import lattice_precision_13pt, scipy_to_torch

    torch.manual_seed(0)
    Q = scipy_to_torch(lattice_precision_13pt(500, kappa=0.5, noise=100.0))   # N = 250 000 latent nodes
    values = Q.values().clone().requires_grad_(True)
    Q = SparseLinearOperator.from_tensor(torch.sparse_coo_tensor(Q.indices(), values, Q.shape))
    n = Q.shape[0]
    rows = torch.randperm(n)[: n // 2].sort().values                       # half of the nodes observed
    ones = torch.ones(rows.numel(), dtype=torch.float64)
    W = torch.sparse_coo_tensor(torch.stack([torch.arange(rows.numel()), rows]), ones, (rows.numel(), n))
    noise = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    y = torch.randn(rows.numel(), 1, dtype=torch.float64)
    K = SparsePrecisionLinearOperator(Q, interp=W).add_diagonal(noise)
    with gpsparse.settings.logdet_defaults(num_probes=8, num_lanczos=32):
        quad, logdet = K.inv_quad_logdet(y, logdet=True)
    (quad + logdet).backward()
    peak_kib = peak_rss_kib()
    print(json.dumps({"peak_mib": peak_kib / 1024, "grad_shape": list(values.grad.shape), "nnz": values.numel(),
                      "noise_grad": float(noise.grad)}))
    """
)


def test_precision_mll_backward_at_quarter_million_under_3gb():
    out = subprocess.run(
        [sys.executable, "-c", PRECISION_SCRIPT],
        capture_output=True,
        text=True,
        check=True,
        cwd=__file__.rsplit("/", 1)[0],
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["grad_shape"] == [report["nnz"]] and report["noise_grad"] == report["noise_grad"]
    assert report["peak_mib"] < 3072, report
