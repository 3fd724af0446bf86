#!/usr/bin/env python
"""Log-determinant benchmark: SLQ accuracy vs cost, gradient accuracy, and inv_quad_logdet + backward at n = 10⁶.

Matrices on an m × m lattice (n = m², L the Neumann 5-point Laplacian, 13 nonzeros per row):
``Q13 = τ(κ²I + L)²`` (a GMRF prior precision, no nugget needed: its smallest eigenvalue is
τκ⁴ > 0) and ``P13 = τ(κ²I + L)² + σ⁻²I`` (the posterior precision with unit-variance noise),
κ = 0.1 (correlation range √8/κ ≈ 28 cells), τ = 1, σ⁻² = 1; float64.

Part (a) — accuracy vs cost (``--parts a``)
    For each matrix, n, preconditioner (None, ``"jacobi"``, ``"ic0"``) and number of Lanczos
    steps K: ``gpsparse.logdet(op, probes=z_l, num_lanczos=K, preconditioner=…)`` for each of
    P fixed Rademacher probes separately (p = 1 calls; the p-probe estimate is exactly the
    mean of p single-probe estimates, since every probe runs its own Lanczos process). Error
    of the p-probe estimate = RMS over the P/p disjoint groups of probes of
    ``|estimate − exact| / |exact|`` (exact: CHOLMOD ``cholesky(A).logdet()``, checked against
    dense ``torch.logdet`` at n ≤ 10⁴). Also the bias (mean over all P probes) and the
    per-probe relative standard deviation, and the time of one library call with 16 probes
    (the preconditioner given as a string, so ``"ic0"`` includes its factorisation).
    ``"ic0"`` per-probe calls get a prebuilt ``IncompleteCholeskyPreconditioner`` (same factor,
    first diagonal shift of 0, 1e-3, 1e-2, 0.1, 1 with positive pivots, as the library does).
    Hutchinson mode (CG to ``rtol``; the tridiagonal comes from the CG coefficients) is
    measured the same way, its cost being the CG iterations.
Gradient (``--parts grad``)
    Small lattice (default 30 × 30): the gradient of the log-determinant with respect to the
    stored values, ``(A⁻¹)[i_e, j_e]`` (dense float64 autograd through ``torch.logdet``),
    against ``gpsparse.logdet(..., gradient="adjoint" | "hutchinson")``: relative error
    ``‖g − g*‖ / ‖g*‖``, RMS over seeds. Plus the exactness check of the adjoint
    (probes √n·I, K = n: the estimate and its gradient are exact).
Part (b) — ``SparseLinearOperator.inv_quad_logdet(y, logdet=True)`` + backward (``--parts b``)
    n = 10⁶ (1000 × 1000, ``P13``), y ~ N(0, I), loss = inv_quad + logdet, ``loss.backward()``
    (gradient for the values). Configurations through
    ``gpsparse.settings.logdet_defaults(gradient=, num_probes=, num_lanczos=, preconditioner=)``
    (and ``solver_defaults(rtol=)`` for the CG tolerance), the library defaults, and in the same
    run: CHOLMOD (``sksparse.cholmod.cholesky`` + ``logdet()`` + one solve for the quadratic
    term; no gradient), linear_operator's own CG/SLQ (see ``--help`` of ``linop`` below) and
    matfree (JAX) SLQ with its Lanczos adjoint (``custom_vjp=True``) plus a JAX CG solve.

How things are measured
-----------------------
* One worker process per case group, ``torch.set_num_threads(--threads)`` and
  OMP/MKL/OPENBLAS_NUM_THREADS = ``--threads`` (JAX: ``XLA_FLAGS`` single-threaded Eigen,
  ``intra_op_parallelism_threads``); the library is snapshotted at start (hash recorded).
* Times: ``time.perf_counter``; in (b) forward = ``inv_quad_logdet`` returning, backward =
  ``loss.backward()``; the pattern's lazy caches (transpose permutation, row indices, diagonal
  positions: built once per pattern in training) are built before timing and their cost is
  reported; a warm-up call on a 16 × 16 lattice precedes (numba, code paths).
* Memory in (b): peak RSS (VmHWM) reset through ``/proc/self/clear_refs`` before the call;
  ``peak growth`` = VmHWM − RSS before the call (the matrix, pattern, y exist before);
  ``process peak`` = the worker's absolute VmHWM during the call.
* linear_operator (``linop``): ``LinearOperator.inv_quad_logdet(op, y, logdet=True)`` called as
  the base-class method with linear_operator's default settings (10 Gaussian probes,
  ``max_lanczos_quadrature_iterations`` = 20, ``cg_tolerance`` = 1, ``max_cg_iterations`` = 1000,
  no preconditioner), in two variants: ``linop-base`` — the operator's own ``_solve`` hook
  (gpsparse's CG at rtol 1e-6 serving linear_operator's ``InvQuadLogdet``); ``linop-cg`` — a
  benchmark-local subclass whose ``_solve`` is ``LinearOperator._solve`` (``linear_cg``), i.e.
  linear_operator's whole CG/SLQ path. Both backwards go through the operator's
  ``_bilinear_derivative`` (a sampled product at the nonzeros): nothing densifies, so both
  run at n = 10⁶.

Usage::

    python benchmarks/logdet_benchmark.py --quick                 # small sizes, < 1 min
    python benchmarks/logdet_benchmark.py                         # full run (~40 min on a quiet machine)
    python benchmarks/logdet_benchmark.py --parts b --b-configs adjoint:p=2:K=20:pc=jacobi
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

MATRICES = {
    "Q13": dict(kappa=0.1, tau=1.0, noise_prec=0.0),
    "P13": dict(kappa=0.1, tau=1.0, noise_prec=1.0),
}
IC_SHIFTS = (0.0, 1e-3, 1e-2, 1e-1, 1.0)

DEFAULT_B_CONFIGS = [
    "default",
    "default-hutchinson",
    "adjoint:p=1:K=8:pc=jacobi",
    "adjoint:p=1:K=16:pc=jacobi",
    "adjoint:p=2:K=16:pc=jacobi",
    "adjoint:p=4:K=16:pc=jacobi",
    "adjoint:p=1:K=8:pc=ic0",
    "adjoint:p=2:K=8:pc=ic0",
    "hutchinson:p=1:pc=jacobi",
    "hutchinson:p=4:pc=jacobi",
    "hutchinson:p=1:pc=ic0",
    "hutchinson:p=2:pc=ic0",
    "hutchinson:p=4:pc=ic0",
]


def describe_matrix(name: str) -> str:
    p = MATRICES[name]
    s = f"τ(κ²I + L)², κ = {p['kappa']}, τ = {p['tau']}"
    return s + (f", + σ⁻²I with σ⁻² = {p['noise_prec']}" if p["noise_prec"] else "")


# --------------------------------------------------------------------------------------------------
# matrices
# --------------------------------------------------------------------------------------------------


def lattice_matrix(name: str, m: int):
    """scipy CSR (sorted indices, exactly symmetric) of the named lattice precision."""
    import scipy.sparse as sp

    p = MATRICES[name]
    d = np.full(m, 2.0)
    d[[0, -1]] = 1.0
    one = sp.diags([-np.ones(m - 1), d, -np.ones(m - 1)], [-1, 0, 1], format="csr")
    eye = sp.identity(m, format="csr")
    a5 = (p["kappa"] ** 2 * sp.identity(m * m) + sp.kron(one, eye) + sp.kron(eye, one)).tocsr()
    a = (p["tau"] * (a5 @ a5)).tocsr()
    if p["noise_prec"]:
        a = (a + p["noise_prec"] * sp.identity(m * m)).tocsr()
    a = ((a + a.T) * 0.5).tocsr()
    a.sum_duplicates()
    a.sort_indices()
    return a


def cached_matrix(cache: str, name: str, m: int):
    """(crow int32, col int32, values float64), cached as .npy files in ``cache``."""
    stem = os.path.join(cache, f"{name}_{m}")
    if not os.path.exists(stem + "_data.npy"):
        a = lattice_matrix(name, m)
        np.save(stem + "_crow.npy", a.indptr.astype(np.int32))
        np.save(stem + "_col.npy", a.indices.astype(np.int32))
        np.save(stem + "_data.npy", a.data.astype(np.float64))
    return np.load(stem + "_crow.npy"), np.load(stem + "_col.npy"), np.load(stem + "_data.npy")


def scipy_matrix(cache: str, name: str, m: int):
    import scipy.sparse as sp

    crow, col, data = cached_matrix(cache, name, m)
    n = m * m
    return sp.csr_matrix((data, col, crow), shape=(n, n))


def rhs_vector(n: int) -> np.ndarray:
    return np.random.default_rng(12345).standard_normal(n)


# --------------------------------------------------------------------------------------------------
# worker helpers
# --------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class Memory:
    """Peak RSS over a region: growth above the RSS at entry, and the absolute peak (MiB)."""

    def __enter__(self):
        _trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset via /proc/self/clear_refs"
        except OSError:
            self.method = "VmHWM not resettable (upper bound)"
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM")
        self.growth_mib = (hwm - self.start) / 1024
        self.peak_mib = hwm / 1024
        return False


def _torch_setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    return torch


def _build_op(torch, crow, col, data):
    """SparseLinearOperator (values require no grad) with warmed pattern caches; returns (pattern, values, setup s)."""
    from gpsparse import SparsityPattern

    n = crow.size - 1
    t0 = time.perf_counter()
    pattern = SparsityPattern(torch.from_numpy(crow), torch.from_numpy(col), (n, n), symmetric=True)
    for attr in ("row", "col_long", "transpose_perm", "diagonal_positions"):
        getattr(pattern, attr)
    return pattern, torch.from_numpy(data), time.perf_counter() - t0


def _ic0(torch, pattern, values):
    """Public IncompleteCholeskyPreconditioner with the library's shift sequence; (preconditioner, shift, seconds)."""
    import gpsparse
    from gpsparse.errors import NotPositiveDefiniteError

    A = pattern.to_sparse_csr(values)
    t0 = time.perf_counter()
    for shift in IC_SHIFTS:
        try:
            return gpsparse.IncompleteCholeskyPreconditioner.from_matrix(A, shift=shift), shift, time.perf_counter() - t0
        except NotPositiveDefiniteError:
            continue
    raise NotPositiveDefiniteError("IC(0) failed for every shift")


class CGCounter:
    """Records ``SolverInfo.iterations`` of every ``gpsparse.core.krylov.cg`` call (wrapped in this process only)."""

    def __init__(self):
        import gpsparse.core.krylov as krylov

        self.calls: list[int] = []
        original = krylov.cg

        def cg(*a, **kw):
            x, info = original(*a, **kw)
            self.calls.append(int(info.iterations))
            return x, info

        krylov.cg = cg


# --------------------------------------------------------------------------------------------------
# part (a): accuracy vs cost
# --------------------------------------------------------------------------------------------------


def work_accuracy(spec: dict) -> dict:
    torch = _torch_setup(spec["threads"])
    import gpsparse
    from gpsparse import SparseLinearOperator
    from gpsparse.core.quadrature import rademacher

    counter = CGCounter()
    crow, col, data = cached_matrix(spec["cache"], spec["matrix"], spec["m"])
    pattern, values, setup_s = _build_op(torch, crow, col, data)
    n = pattern.size[0]
    op = SparseLinearOperator(values, pattern=pattern)
    exact = spec["exact"]
    P = spec["probes"]
    Z = rademacher((n, P), generator=torch.Generator().manual_seed(spec.get("seed", 0)), dtype=torch.float64, device="cpu")
    out = {"n": n, "matrix": spec["matrix"], "exact": exact, "P": P, "rows": [], "pattern_setup_s": setup_s}
    # warm-up (numba kernels, code paths)
    with torch.no_grad():
        for pc in spec["preconds"]:
            gpsparse.logdet(op, probes=Z[:, :2], num_lanczos=4, preconditioner=pc)

    def summarise(est: list[float]) -> dict:
        e = np.asarray(est)
        row = {
            "bias_rel": float((e.mean() - exact) / abs(exact)),
            "sd_rel_per_probe": float(e.std(ddof=1) / abs(exact)) if e.size > 1 else None,
            "rms_rel": {},
        }
        p = 1
        while p <= e.size:
            groups = e[: (e.size // p) * p].reshape(-1, p).mean(1)
            row["rms_rel"][str(p)] = float(np.sqrt(np.mean((groups - exact) ** 2)) / abs(exact))
            row.setdefault("groups", {})[str(p)] = int(groups.size)
            p *= 4
        if str(e.size) not in row["rms_rel"]:
            row["rms_rel"][str(e.size)] = float(abs(e.mean() - exact) / abs(exact))
            row["groups"][str(e.size)] = 1
        return row

    time_p = min(spec.get("time_probes", 16), P)
    with torch.no_grad():
        for pc in spec["preconds"]:
            pc_obj, shift, build_s = (None, None, 0.0)
            if pc == "ic0":
                pc_obj, shift, build_s = _ic0(torch, pattern, values)
            elif pc == "jacobi":
                pc_obj = "jacobi"
            for K in spec["steps"]:
                est, times = [], []
                for l in range(P):
                    t0 = time.perf_counter()
                    value = gpsparse.logdet(op, probes=Z[:, l : l + 1], num_lanczos=K, preconditioner=pc_obj)
                    times.append(time.perf_counter() - t0)
                    est.append(float(value))
                t0 = time.perf_counter()
                call = float(gpsparse.logdet(op, probes=Z[:, :time_p], num_lanczos=K, preconditioner=pc))
                call_s = time.perf_counter() - t0
                row = dict(gradient="adjoint", precond=str(pc), K=K, per_probe_call_s=statistics.median(times),
                           call_probes=time_p, call_s=call_s, ic0_shift=shift, ic0_build_s=build_s,
                           consistency=abs(call - float(np.mean(est[:time_p]))) / abs(exact))
                row.update(summarise(est))
                out["rows"].append(row)
                print(f"  a {spec['matrix']} n={n} {pc} K={K}: rms(p=1) {row['rms_rel']['1']:.2e} bias {row['bias_rel']:.1e} "
                      f"call({time_p}) {call_s:.3f}s", file=sys.stderr, flush=True)
            for rtol in spec["hutch_rtols"]:
                if (spec["matrix"], str(pc)) in {tuple(x) for x in spec.get("hutch_skip", [])}:
                    continue
                est, times, its = [], [], []
                for l in range(min(spec["hutch_probes"], P)):
                    counter.calls.clear()
                    t0 = time.perf_counter()
                    value = gpsparse.logdet(op, probes=Z[:, l : l + 1], gradient="hutchinson", rtol=rtol, preconditioner=pc_obj)
                    times.append(time.perf_counter() - t0)
                    est.append(float(value))
                    its.append(sum(counter.calls))
                row = dict(gradient="hutchinson", precond=str(pc), rtol=rtol, K=float(np.mean(its)), per_probe_call_s=statistics.median(times),
                           ic0_shift=shift, ic0_build_s=build_s)
                row.update(summarise(est))
                out["rows"].append(row)
                print(f"  a {spec['matrix']} n={n} {pc} hutchinson rtol={rtol}: its {row['K']:.0f} rms(p=1) {row['rms_rel']['1']:.2e}",
                      file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# gradient accuracy (small n)
# --------------------------------------------------------------------------------------------------


def work_gradient(spec: dict) -> dict:
    torch = _torch_setup(spec["threads"])
    import gpsparse
    from gpsparse import SparseLinearOperator

    crow, col, data = cached_matrix(spec["cache"], spec["matrix"], spec["m"])
    pattern, values0, _ = _build_op(torch, crow, col, data)
    n = pattern.size[0]
    row_idx, col_idx = pattern.row, pattern.col_long

    def dense(values):
        return torch.zeros(n, n, dtype=values.dtype).index_put((row_idx, col_idx), values)

    v = values0.clone().requires_grad_()
    exact_ld = torch.logdet(dense(v))
    exact_ld.backward()
    g_exact = v.grad.clone()
    out = {"n": n, "matrix": spec["matrix"], "exact_logdet": float(exact_ld), "rows": []}

    # the adjoint is the gradient of the estimate: directional derivative against central finite differences
    # of the estimate itself (fixed probes, no preconditioner), at this n and on a 12 × 12 lattice, where K
    # approaches the dimension of the Krylov space
    from gpsparse.core.quadrature import rademacher

    def fd_rows(pattern_, values_, Ks):
        n_ = pattern_.size[0]
        z = rademacher((n_, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
        d = torch.randn(pattern_.nnz, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        d = 0.5 * (d + d[pattern_.transpose_perm]) * values_.abs() * 1e-3
        rows = []
        for reorth in (False, True):
            for K in Ks:
                def f(v):
                    return float(gpsparse.logdet(SparseLinearOperator(v, pattern=pattern_), probes=z, num_lanczos=K,
                                                 preconditioner=None, reorthogonalize=reorth))
                v = values_.clone().requires_grad_()
                try:
                    gpsparse.logdet(SparseLinearOperator(v, pattern=pattern_), probes=z, num_lanczos=K, preconditioner=None,
                                    reorthogonalize=reorth).backward()
                    ad = float(v.grad @ d)
                    fd = (f(values_ + 1e-3 * d) - f(values_ - 1e-3 * d)) / 2e-3
                    rows.append(dict(n=n_, K=K, reorth=reorth, adjoint=ad, fd=fd, rel_diff=abs(ad - fd) / abs(fd)))
                except Exception as err:  # noqa: BLE001 - reported
                    rows.append(dict(n=n_, K=K, reorth=reorth, error=f"{type(err).__name__}: {err}"[:160]))
        return rows

    out["fd_check"] = fd_rows(pattern, values0, spec.get("fd_steps", [10, 30, 64]))
    a12 = lattice_matrix(spec["matrix"], 12)
    p12, v12, _ = _build_op(torch, a12.indptr.astype(np.int32), a12.indices.astype(np.int32), a12.data)
    out["fd_check_small"] = fd_rows(p12, v12, [20, 40, 72])

    for cfg in spec["configs"]:
        errs, lderrs, times = [], [], []
        for seed in range(spec["seeds"]):
            v = values0.clone().requires_grad_()
            gen = torch.Generator().manual_seed(1000 + seed)
            t0 = time.perf_counter()
            est = gpsparse.logdet(SparseLinearOperator(v, pattern=pattern), num_probes=cfg["p"], num_lanczos=cfg.get("K", 64),
                                  gradient=cfg["gradient"], preconditioner=cfg["pc"], rtol=cfg.get("rtol", 1e-8), generator=gen)
            est.backward()
            times.append(time.perf_counter() - t0)
            errs.append(float((v.grad - g_exact).norm() / g_exact.norm()))
            lderrs.append(abs(float(est) - float(exact_ld)) / abs(float(exact_ld)))
        row = dict(cfg)
        row.update(grad_rel_rms=float(np.sqrt(np.mean(np.square(errs)))), logdet_rel_rms=float(np.sqrt(np.mean(np.square(lderrs)))),
                   time_s=statistics.median(times), seeds=spec["seeds"])
        out["rows"].append(row)
    return out


# --------------------------------------------------------------------------------------------------
# part (b): inv_quad_logdet + backward
# --------------------------------------------------------------------------------------------------


def parse_config(text: str) -> dict:
    """``default``, ``default-hutchinson`` or ``gradient:p=…:K=…:pc=…:rtol=…``."""
    if text in ("default", "default-hutchinson"):
        return {"name": text}
    parts = text.split(":")
    cfg = {"name": text, "gradient": parts[0]}
    for part in parts[1:]:
        key, value = part.split("=")
        if key in ("p", "K"):
            cfg[key] = int(value)
        elif key == "rtol":
            cfg[key] = float(value)
        elif key == "pc":
            cfg[key] = None if value in ("none", "None") else value
        else:
            raise ValueError(f"unknown key {key!r} in configuration {text!r}")
    return cfg


def _settings_context(cfg: dict):
    import contextlib

    import gpsparse

    stack = contextlib.ExitStack()
    if cfg["name"] == "default":
        return stack
    if cfg["name"] == "default-hutchinson":
        stack.enter_context(gpsparse.settings.logdet_defaults(gradient="hutchinson"))
        return stack
    kw = dict(gradient=cfg["gradient"], num_probes=cfg.get("p"), preconditioner=cfg.get("pc", "jacobi"))
    if "K" in cfg:
        kw["num_lanczos"] = cfg["K"]
    stack.enter_context(gpsparse.settings.logdet_defaults(**kw))
    if "rtol" in cfg:
        stack.enter_context(gpsparse.settings.solver_defaults(rtol=cfg["rtol"]))
    return stack


def work_b(spec: dict):
    """Yield one result per configuration of ``spec["configs"]`` (kinds gpsparse, linop-base, linop-cg)."""
    torch = _torch_setup(spec["threads"])
    from linear_operator.operators import LinearOperator

    from gpsparse import SparseLinearOperator

    class LinearCGOperator(SparseLinearOperator):
        """linear_operator's own CG (``linear_cg``) behind ``_solve`` (benchmark-local)."""

        _solve = LinearOperator._solve

    counter = CGCounter()
    lanczos_calls: list[tuple] = []
    logdet_mod = sys.modules["gpsparse.logdet"]
    original_lanczos = logdet_mod.lanczos

    def lanczos(matvec, v, K, **kw):
        lanczos_calls.append((tuple(v.shape), K))
        return original_lanczos(matvec, v, K, **kw)

    logdet_mod.lanczos = lanczos

    def call(kind, cfg, values, pattern, y):
        cls = LinearCGOperator if kind == "linop-cg" else SparseLinearOperator
        op = cls(values, pattern=pattern)
        if kind in ("linop-base", "linop-cg"):
            return LinearOperator.inv_quad_logdet(op, y, logdet=True)
        with _settings_context(cfg):
            return op.inv_quad_logdet(y, logdet=True)

    # warm-up on a small lattice with every configuration
    a = lattice_matrix(spec["matrix"], 16)
    pw, vw, _ = _build_op(torch, a.indptr.astype(np.int32), a.indices.astype(np.int32), a.data)
    yw = torch.from_numpy(rhs_vector(256))
    import linear_operator

    for case in spec["cases"]:
        with linear_operator.settings.max_cholesky_size(0):
            vv = vw.clone().requires_grad_()
            q, ld = call(case["kind"], case.get("config"), vv, pw, yw)
            (q + ld).backward()

    crow, col, data = cached_matrix(spec["cache"], spec["matrix"], spec["m"])
    pattern, values0, setup_s = _build_op(torch, crow, col, data)
    n = pattern.size[0]
    y = torch.from_numpy(rhs_vector(n))
    for case in spec["cases"]:
        kind, cfg = case["kind"], case.get("config")
        result = {"pattern_setup_s": setup_s, "loadavg": os.getloadavg(), "runs": []}
        try:
            for seed in range(case["seeds"]):
                torch.manual_seed(seed)
                counter.calls.clear()
                lanczos_calls.clear()
                values = values0.clone().requires_grad_()
                with Memory() as mem:
                    t0 = time.perf_counter()
                    quad, ld = call(kind, cfg, values, pattern, y)
                    t1 = time.perf_counter()
                    (quad + ld).backward()
                    t2 = time.perf_counter()
                run = dict(fwd_s=t1 - t0, bwd_s=t2 - t1, total_s=t2 - t0, logdet=float(ld), quad=float(quad),
                           peak_growth_mib=mem.growth_mib, process_peak_mib=mem.peak_mib, memory_method=mem.method,
                           cg_iterations=list(counter.calls), lanczos_calls=[list(c) for c in lanczos_calls],
                           grad_norm=float(values.grad.norm()))
                result["runs"].append(run)
                values = quad = ld = None
                print(f"  b {case['name']} seed {seed}: {run['total_s']:.2f} s, logdet {run['logdet']:.10g}", file=sys.stderr, flush=True)
        except Exception:
            result["error"] = traceback.format_exc().strip().splitlines()[-1]
        yield result


def work_cholmod(spec: dict) -> dict:
    from sksparse.cholmod import cholesky

    a = scipy_matrix(spec["cache"], spec["matrix"], spec["m"]).tocsc()
    y = rhs_vector(a.shape[0])
    with Memory() as mem:
        t0 = time.perf_counter()
        factor = cholesky(a)
        ld = factor.logdet()
        t1 = time.perf_counter()
        x = factor(y)
        quad = float(y @ x)
        t2 = time.perf_counter()
    out = dict(logdet=float(ld), quad=quad, factor_logdet_s=t1 - t0, solve_s=t2 - t1, total_s=t2 - t0,
               peak_growth_mib=mem.growth_mib, process_peak_mib=mem.peak_mib, memory_method=mem.method,
               nnz_factor=int(factor.L().nnz) if spec.get("nnz_factor") else None, loadavg=os.getloadavg())
    if spec.get("dense_check") and a.shape[0] <= 10_000:
        import torch

        torch.set_num_threads(spec["threads"])
        out["dense_logdet"] = float(torch.logdet(torch.from_numpy(a.toarray())))
    return out


def work_matfree(spec: dict) -> dict:
    """matfree SLQ (``tridiag_sym`` with ``custom_vjp=True``: the Lanczos adjoint) + JAX CG for yᵀA⁻¹y, value and gradient."""
    threads = spec["threads"]
    os.environ["XLA_FLAGS"] = (f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                               f"intra_op_parallelism_threads={threads}")
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import matfree
    from matfree import decomp, funm, stochtrace

    crow, col, data = cached_matrix(spec["cache"], spec["matrix"], spec["m"])
    n = crow.size - 1
    counts = np.diff(crow)
    rows_np = np.repeat(np.arange(n, dtype=np.int32), counts)
    diag_np = np.flatnonzero(rows_np == col)
    rows, cols, diagpos = jnp.asarray(rows_np), jnp.asarray(col), jnp.asarray(diag_np)
    y = jnp.asarray(rhs_vector(n))
    p, K, rtol = spec["p"], spec["K"], spec.get("rtol", 1e-6)

    def loss(vals, key, rows, cols, diagpos, y):
        def matvec(v, values):
            return jax.ops.segment_sum(values * v[cols], rows, num_segments=n, indices_are_sorted=True)

        tridiag = decomp.tridiag_sym(K, reortho="none", custom_vjp=True)
        integrand = funm.monte_carlo_funm_sym_logdet(tridiag)
        sampler = stochtrace.sampler_signs(jnp.zeros(n), num=p)
        estimator = stochtrace.estimator_monte_carlo(integrand, sampler)
        # exact Jacobi scaling as in gpsparse: logdet A = Σ log a_ii + logdet(D^{-1/2} A D^{-1/2})
        d = vals[diagpos]
        s = jax.lax.rsqrt(d)
        scaled = vals * s[rows] * s[cols]
        ld = estimator(matvec, key, scaled) + jnp.sum(jnp.log(d))
        x, _ = jax.scipy.sparse.linalg.cg(lambda v: matvec(v, vals), y, tol=rtol, maxiter=10 * n)
        quad = y @ x
        return ld + quad, (ld, quad)

    # the matrix structure and y are arguments (not closed-over constants, which XLA would constant-fold)
    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))

    def f(vals, key):
        return grad_fn(vals, key, rows, cols, diagpos, y)

    vals = jnp.asarray(data)
    out = {"matfree": matfree.__version__ if hasattr(matfree, "__version__") else "?", "jax": jax.__version__, "runs": [],
           "loadavg": os.getloadavg()}
    t0 = time.perf_counter()
    (_, _), g = f(vals, jax.random.PRNGKey(100))
    g.block_until_ready()
    out["compile_and_first_s"] = time.perf_counter() - t0
    for seed in range(spec["seeds"]):
        with Memory() as mem:
            t0 = time.perf_counter()
            (_, (ld, quad)), g = f(vals, jax.random.PRNGKey(seed))
            g.block_until_ready()
            t1 = time.perf_counter()
        out["runs"].append(dict(total_s=t1 - t0, logdet=float(ld), quad=float(quad), peak_growth_mib=mem.growth_mib,
                                process_peak_mib=mem.peak_mib, memory_method=mem.method))
        print(f"  b matfree seed {seed}: {t1 - t0:.2f} s", file=sys.stderr, flush=True)
    return out


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        kind = spec["kind"]
        if kind == "b":
            for index, result in enumerate(work_b(spec)):
                print(f"RESULT {index} " + json.dumps(result), flush=True)
            return
        fn = {"accuracy": work_accuracy, "gradient": work_gradient, "cholmod": work_cholmod, "matfree": work_matfree}[kind]
        print("RESULT 0 " + json.dumps(fn(spec)), flush=True)
    except Exception:
        print("WORKER-ERROR " + json.dumps(traceback.format_exc()), flush=True)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def snapshot_library(cache: str) -> dict:
    import importlib.util

    source = importlib.util.find_spec("gpsparse").submodule_search_locations[0]
    target = os.path.join(cache, "snapshot")
    shutil.copytree(source, os.path.join(target, "gpsparse"), ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(os.path.join(target, "gpsparse"))):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    repo = os.path.dirname(source)
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "gpsparse"], capture_output=True, text=True).stdout
        dirty = [line[3:] for line in dirty.split("\n") if line.strip()]
    except OSError:
        commit, dirty = "?", []
    return {"path": target, "sha256": digest.hexdigest()[:12], "git_commit": commit, "uncommitted": dirty}


def machine_info(threads: int) -> dict:
    import torch

    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.*)", f.read())
            model = found.group(1).strip() if found else model
    except OSError:
        pass
    from importlib import metadata

    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for mod in ("linear_operator", "scikit-sparse", "scipy", "numba", "jax", "matfree"):
        try:
            versions[mod] = metadata.version(mod)
        except metadata.PackageNotFoundError:
            versions[mod] = "not installed"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": threads,
        "versions": versions,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }


def run_worker(spec: dict, threads: int, pythonpath: str, timeout: float, count: int = 1) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    results: dict[int, dict] = {}
    why = ""
    with tempfile.TemporaryFile(mode="w+") as out:
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                stdout=out, stderr=None, text=True, env=env)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            why = f"timeout after {timeout:.0f} s"
        out.seek(0)
        for line in out.read().splitlines():
            if line.startswith("RESULT "):
                _, index, payload = line.split(" ", 2)
                results[int(index)] = json.loads(payload)
            elif line.startswith("WORKER-ERROR "):
                why = json.loads(line[13:]).strip().splitlines()[-1]
    why = why or f"worker exited with code {proc.returncode}"
    return [results.get(i, {"error": why}) for i in range(count)]


def fmt(x, spec=".3g"):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return format(x, spec)


def fmt_n(n: int) -> str:
    return f"{int(round(n ** 0.5))}²"


def markdown(info: dict, res: dict) -> str:
    la = info["loadavg_start"]
    le = info.get("loadavg_end", (float("nan"),) * 3)
    v = info["versions"]
    snap = info.get("snapshot", {})
    out = ["# gpsparse log-determinant benchmark\n"]
    out.append(
        f"* machine: {info['cpu']}, {info['cores']} cores; torch {v['torch']} (CPU), Python {v['python']}, linear_operator "
        f"{v['linear_operator']}, scikit-sparse {v['scikit-sparse']}, scipy {v['scipy']}, numba {v['numba']}, jax {v['jax']}, "
        f"matfree {v['matfree']}; gpsparse git {snap.get('git_commit', '?')} (source sha256 {snap.get('sha256', '?')}"
        + (f", uncommitted: {', '.join(snap['uncommitted'])}" if snap.get("uncommitted") else "") + ")\n"
        f"* threads: **{info['threads']}** (torch, OMP/MKL/OPENBLAS, XLA); one worker process per case group\n"
        f"* date: {info['date']}; load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}, at end "
        f"{le[0]:.2f} / {le[1]:.2f} / {le[2]:.2f}; wall time {info.get('wall_s', 0):.0f} s\n"
        f"* command: `{info.get('command', '')}`\n"
        "* matrices on an m × m lattice (n = m², 13 nnz/row, L = Neumann 5-point Laplacian): "
        + "; ".join(f"**{k}** = {describe_matrix(k)}" for k in MATRICES) + "; float64\n"
    )
    exact = res.get("exact", {})
    if exact:
        out.append("\n## Exact references (CHOLMOD)\n")
        out.append("| matrix | n | logdet | dense torch.logdet (n ≤ 10⁴) | CHOLMOD factor + logdet s |")
        out.append("|---|---|---|---|---|")
        for key, e in sorted(exact.items()):
            name, n = key.split("@")
            out.append(f"| {name} | {fmt_n(int(n))} | {e['logdet']:.12g} | {fmt(e.get('dense_logdet'), '.12g')} | {fmt(e.get('factor_logdet_s'))} |")

    acc = res.get("accuracy", [])
    if acc:
        out.append("\n## (a) Accuracy vs cost\n")
        out.append(
            "rel. error = RMS over disjoint groups of p probes of |estimate − exact|/|exact| (P probes in all; `groups` "
            "in the JSON); matvecs = p·K SpMM columns (Hutchinson: p × mean CG iterations); bias = error of the mean over all "
            "P probes (mostly the K-step quadrature error when it exceeds the P-probe noise sd/√P); sd = per-probe relative "
            "standard deviation; call s = one `gpsparse.logdet` forward with 16 probes (4 at n = 10⁶; preconditioner passed by "
            "name: `ic0` includes the factorisation); per-probe s = median single-probe call (ic0 prebuilt). `precond = jacobi` is the exact "
            "diagonal scaling (free; these matrices have a nearly constant diagonal, so it changes little).\n"
        )
        for block in acc:
            if block.get("error"):
                out.append(f"\n**{block.get('matrix')} n = {block.get('n')}: error {block['error']}**\n")
                continue
            ps = sorted({int(p) for r in block["rows"] for p in r["rms_rel"]})
            out.append(f"\n### {block['matrix']}, n = {fmt_n(block['n'])} = {block['n']:,}, P = {block['P']} probes, exact logdet {block['exact']:.10g}\n")
            out.append("| gradient mode | precond | K (CG its) | " + " | ".join(f"p={p}: matvecs / rel. err" for p in ps)
                       + " | bias | sd per probe | call s (16 probes) | per-probe s |")
            out.append("|---|---|---|" + "---|" * len(ps) + "---|---|---|---|")
            for r in block["rows"]:
                cells = []
                for p in ps:
                    err = r["rms_rel"].get(str(p))
                    cells.append("–" if err is None else f"{p * r['K']:.0f} / {err:.1e}")
                k = f"{r['K']}" if r["gradient"] == "adjoint" else f"{r['K']:.0f} (rtol {r['rtol']:g})"
                out.append(f"| {r['gradient']} | {r['precond']} | {k} | " + " | ".join(cells)
                           + f" | {r['bias_rel']:+.1e} | {fmt(r['sd_rel_per_probe'], '.1e')} | {fmt(r.get('call_s'))} | {fmt(r['per_probe_call_s'])} |")

    grad = res.get("gradient", [])
    if grad:
        out.append("\n## Gradient accuracy (small lattice, against dense autograd of torch.logdet)\n")
        out.append("grad err = RMS over seeds of ‖g − A⁻¹|nnz‖ / ‖A⁻¹|nnz‖ (g: the gradient w.r.t. the stored values); "
                   "logdet err = RMS relative error of the estimate; time = median forward + backward.\n")
        for block in grad:
            if block.get("error"):
                out.append(f"\n**gradient: error {block['error']}**\n")
                continue
            out.append(f"\n### {block['matrix']}, n = {block['n']}\n")
            fd = block.get("fd_check", []) + block.get("fd_check_small", [])
            if fd:
                out.append("Adjoint = gradient of the estimate? Directional derivative g·d (4 fixed probes, no preconditioner, d a random "
                           "symmetric perturbation of relative size 1e-3) against central differences of the estimate (step 1e-3·d):\n")
                out.append("| n | K | reorth | adjoint g·d | finite difference | rel. diff |")
                out.append("|---|---|---|---|---|---|")
                for r in fd:
                    if r.get("error"):
                        out.append(f"| {r['n']} | {r['K']} | {r['reorth']} | error: {r['error']} | | |")
                    else:
                        out.append(f"| {r['n']} | {r['K']} | {r['reorth']} | {r['adjoint']:.8e} | {r['fd']:.8e} | {r['rel_diff']:.1e} |")
                out.append("")
            out.append("| gradient | precond | p | K / rtol | grad err | logdet err | time s |")
            out.append("|---|---|---|---|---|---|---|")
            for r in block["rows"]:
                kk = r.get("K") if r["gradient"] == "adjoint" else f"rtol {r.get('rtol', 1e-8):g}"
                out.append(f"| {r['gradient']} | {r['pc']} | {r['p']} | {kk} | {r['grad_rel_rms']:.2e} | {r['logdet_rel_rms']:.1e} | {fmt(r['time_s'])} |")

    b = res.get("b")
    if b:
        out.append(f"\n## (b) inv_quad_logdet + backward, {b['matrix']}, n = {fmt_n(b['n'])} = {b['n']:,}\n")
        out.append(
            "Target: total (forward + backward) ≤ 20 s, logdet relative error ≤ 1e-3, peak memory ≤ 3 GB. Times: median over "
            "the seeds (probe draws); rel. err: the largest over the seeds; peak growth = VmHWM − RSS before the call "
            "(matrix, pattern, y not counted); process peak = absolute VmHWM of the worker. CG its = iterations of the "
            "CG runs in the call (Hutchinson: one run for probes + y; adjoint: the quadratic term's solve); Lanczos = "
            "(probe block, K) of each Lanczos run (backward re-runs appear when probes are chunked).\n"
        )
        ch = b.get("cholmod", {})
        if ch and not ch.get("error"):
            out.append(f"Exact (CHOLMOD): logdet {ch['logdet']:.12g}, yᵀA⁻¹y {ch['quad']:.10g}; pattern setup (lazy caches, once per "
                       f"pattern) {fmt(b.get('pattern_setup_s'))} s.\n")
        # per-probe relative sd of the estimate at this n from part (a) (largest K of each preconditioner)
        sd = {}
        for block in res.get("accuracy", []):
            if block.get("matrix") == b["matrix"] and block.get("n") == b["n"] and not block.get("error"):
                for r in block["rows"]:
                    if r["gradient"] == "adjoint" and r.get("sd_rel_per_probe") and r["K"] >= sd.get(r["precond"], (0, 0))[0]:
                        sd[r["precond"]] = (r["K"], r["sd_rel_per_probe"])

        def expected_sd(r):
            name = r.get("name", "")
            if name.startswith("default"):
                pc, p = "jacobi", 16
            elif name.startswith("matfree:") or name.startswith(("adjoint:", "hutchinson:")):
                cfg = parse_config(name.split(":", 1)[1] if name.startswith("matfree:") else name)
                pc, p = cfg.get("pc", "jacobi"), cfg["p"]
                if name.startswith("matfree:"):
                    pc = "jacobi"
            else:
                return None
            return sd[str(pc)][1] / p**0.5 if str(pc) in sd else None

        if sd:
            out.append("σ/√p = per-probe relative standard deviation measured in part (a) at this n for the same preconditioner "
                       "(Rademacher probes; the Hutchinson estimate uses the same probes and a converged quadrature), over √p: the "
                       "spread to expect of the relative error; the error column is one to three draws of it.\n")
        if info.get("exact_from"):
            out.append(f"The CHOLMOD reference (values and its timing) comes from an earlier run: `{info['exact_from']}`.\n")
        out.append("| method | configuration | seeds | fwd s | bwd s | total s | logdet rel. err | σ/√p (a) | inv_quad rel. err | peak growth MiB | process peak MiB | CG its | Lanczos (block, K) | targets met |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        if ch and not ch.get("error"):
            out.append(f"| CHOLMOD | factor + logdet + 1 solve, no gradient | 1 | {fmt(ch['factor_logdet_s'])} | – | {fmt(ch['total_s'])} | 0 | – | 0 | "
                       f"{ch['peak_growth_mib']:.0f} | {ch['process_peak_mib']:.0f} | – | – | (no gradient) |")
        elif ch:
            out.append(f"| CHOLMOD | error: {ch['error']} ||||||||||||")
        for r in b.get("rows", []):
            if r.get("error"):
                out.append(f"| {r['method']} | {r['config']} | error: {r['error'][:120]} |||||||||||")
                continue
            met = []
            met.append("time ✓" if r["total_s"] <= 20 else "time ✗")
            met.append("err ✓" if r["logdet_rel_max"] <= 1e-3 else "err ✗")
            met.append("mem ✓" if r["process_peak_mib"] <= 3 * 1024 else "mem ✗")
            out.append(
                f"| {r['method']} | {r['config']} | {r['seeds']} | {fmt(r.get('fwd_s'))} | {fmt(r.get('bwd_s'))} | {fmt(r['total_s'])} | "
                f"{r['logdet_rel_max']:.1e} | {fmt(expected_sd(r), '.1e')} | {fmt(r.get('quad_rel_max'), '.1e')} | {r['peak_growth_mib']:.0f} | {r['process_peak_mib']:.0f} | "
                f"{r.get('cg_its', '–')} | {r.get('lanczos', '–')} | {', '.join(met)} |"
            )
        if b.get("notes"):
            out.append("")
            out.extend(f"* {note}" for note in b["notes"])
    return "\n".join(out) + "\n"


def summarise_b(method: str, config: str, raw: dict, exact_ld: float, exact_quad: float) -> dict:
    row = {"method": method, "config": config}
    if raw.get("error"):
        row["error"] = raw["error"]
        return row
    runs = raw["runs"]
    row["seeds"] = len(runs)
    for key in ("fwd_s", "bwd_s", "total_s"):
        if key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
    row["logdet_rel_max"] = max(abs(r["logdet"] - exact_ld) / abs(exact_ld) for r in runs)
    row["logdet_rel_all"] = [abs(r["logdet"] - exact_ld) / abs(exact_ld) for r in runs]
    row["quad_rel_max"] = max(abs(r["quad"] - exact_quad) / abs(exact_quad) for r in runs)
    row["peak_growth_mib"] = max(r["peak_growth_mib"] for r in runs)
    row["process_peak_mib"] = max(r["process_peak_mib"] for r in runs)
    if "cg_iterations" in runs[0]:
        row["cg_its"] = ",".join(str(i) for i in runs[0]["cg_iterations"]) or "–"
        lz = runs[0].get("lanczos_calls") or []
        if lz:
            shapes = {}
            for shape, K in lz:
                shapes[(shape[-1], K)] = shapes.get((shape[-1], K), 0) + 1
            row["lanczos"] = " ".join(f"{c}×({p}, {K})" for (p, K), c in shapes.items())
    if "compile_and_first_s" in raw:
        row["compile_and_first_s"] = raw["compile_and_first_s"]
    row["loadavg"] = raw.get("loadavg")
    row["raw_runs"] = runs
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["a", "grad", "b"], choices=["a", "grad", "b"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--a-sizes", nargs="+", default=["1e4", "1e5"], help="n of part (a), full grid")
    parser.add_argument("--a-big", default="1e6", help="n of the few extra points of part (a) ('' to skip)")
    parser.add_argument("--a-steps", nargs="+", type=int, default=[5, 10, 20, 40, 80])
    parser.add_argument("--a-probes", nargs="+", type=int, default=[64, 32], help="P per size of --a-sizes")
    parser.add_argument("--a-big-probes", type=int, default=8)
    parser.add_argument("--a-big-configs", nargs="+", default=["P13:jacobi:10,20", "P13:ic0:5,10"],
                        help="matrix:precond:K,K,… points at --a-big")
    parser.add_argument("--matrices", nargs="+", default=list(MATRICES), choices=list(MATRICES), help="matrices of (a) and grad")
    parser.add_argument("--b-one-process", action="store_true", help="all (b) cases in one worker process (faster; memory less clean)")
    parser.add_argument("--hutch-rtols", nargs="+", type=float, default=[1e-2, 1e-4, 1e-6])
    parser.add_argument("--hutch-probes", type=int, default=16)
    parser.add_argument("--grad-m", type=int, default=30, help="lattice side of the gradient check")
    parser.add_argument("--grad-seeds", type=int, default=5)
    parser.add_argument("--b-size", default="1e6")
    parser.add_argument("--b-matrix", default="P13", choices=list(MATRICES))
    parser.add_argument("--b-configs", nargs="+", default=DEFAULT_B_CONFIGS,
                        help="default | default-hutchinson | adjoint:p=…:K=…:pc=… | hutchinson:p=…:pc=…[:rtol=…]")
    parser.add_argument("--b-seeds", type=int, default=3, help="probe draws per configuration (the defaults get 1)")
    parser.add_argument("--b-matfree", nargs="+", default=["p=1:K=8", "p=4:K=16"],
                        help="matfree configurations 'p=…:K=…' (Jacobi scaling, like gpsparse's adjoint rows), or 'none'")
    parser.add_argument("--exact-from", metavar="JSON", help="reuse the CHOLMOD references of an earlier run's JSON "
                        "(its timings are then not from this run)")
    parser.add_argument("--no-linop", action="store_true")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker process")
    parser.add_argument("--quick", action="store_true", help="small sizes everywhere (< 1 min)")
    parser.add_argument("--out", default="benchmarks/results/logdet", help="output stem: <out>.md and <out>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.quick:
        args.a_sizes, args.a_probes, args.a_big, args.a_steps = ["1e4"], [4], "", [10, 40]
        args.hutch_rtols, args.hutch_probes, args.matrices = [1e-4], 4, ["P13"]
        args.grad_m, args.grad_seeds = 12, 2
        args.b_size, args.b_configs, args.b_seeds, args.b_matfree = "1e4", ["adjoint:p=2:K=16:pc=jacobi", "hutchinson:p=2:pc=jacobi"], 1, ["none"]
        args.b_one_process = True
        if args.out == "benchmarks/results/logdet":
            args.out = "benchmarks/results/logdet_quick"

    info = machine_info(args.threads)
    info["command"] = "python benchmarks/logdet_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {info['cpu']} ({info['cores']} cores), torch {info['versions']['torch']}, threads={args.threads}, "
          f"load average {info['loadavg_start'][0]:.2f}, {info['date']}", flush=True)
    cache = tempfile.mkdtemp(prefix="gpsparse_logdet_bench_")
    t_start = time.perf_counter()
    res: dict = {"exact": {}, "accuracy": [], "gradient": [], "b": None}
    try:
        snap = snapshot_library(cache)
        info["snapshot"] = {k: v for k, v in snap.items() if k != "path"}
        base = dict(threads=args.threads, cache=cache)

        if args.exact_from:
            with open(args.exact_from) as f:
                res["exact"].update(json.load(f)["results"]["exact"])
            info["exact_from"] = args.exact_from

        def exact(name: str, m: int) -> dict:
            key = f"{name}@{m * m}"
            cached_matrix(cache, name, m)
            if key not in res["exact"]:
                cached_matrix(cache, name, m)
                r = run_worker(dict(base, kind="cholmod", matrix=name, m=m, dense_check=m * m <= 10_000), args.threads, snap["path"], args.timeout)[0]
                if r.get("error"):
                    raise RuntimeError(f"CHOLMOD failed for {key}: {r['error']}")
                res["exact"][key] = r
                print(f"# exact {key}: logdet {r['logdet']:.12g} (CHOLMOD {r['factor_logdet_s']:.2f} s"
                      + (f", dense {r['dense_logdet']:.12g}" if r.get("dense_logdet") is not None else "") + ")", flush=True)
            return res["exact"][key]

        if "b" in args.parts:
            m = int(round(float(args.b_size) ** 0.5))
            n = m * m
            ex = exact(args.b_matrix, m)
            b = {"matrix": args.b_matrix, "n": n, "cholmod": ex, "rows": [], "notes": []}
            res["b"] = b
            cases = []
            for text in args.b_configs:
                cfg = parse_config(text)
                seeds = 1 if cfg["name"].startswith("default") else args.b_seeds
                cases.append(dict(kind="gpsparse", name=text, config=cfg, seeds=seeds))
            if not args.no_linop:
                cases.append(dict(kind="linop-base", name="linop-base", seeds=args.b_seeds))
                cases.append(dict(kind="linop-cg", name="linop-cg", seeds=args.b_seeds))
            # one process per configuration (clean memory figures), or all in one with --b-one-process
            groups = [cases] if args.b_one_process else [[case] for case in cases]
            for group in groups:
                spec = dict(base, kind="b", matrix=args.b_matrix, m=m, cases=group)
                raws = run_worker(spec, args.threads, snap["path"], args.timeout * len(group), count=len(group))
                for case, raw in zip(group, raws):
                    b.setdefault("pattern_setup_s", raw.get("pattern_setup_s"))
                    method = {"gpsparse": "gpsparse", "linop-base": "linear_operator (base method, gpsparse _solve)",
                              "linop-cg": "linear_operator (linear_cg)"}[case["kind"]]
                    config = case["name"]
                    if case["kind"] == "gpsparse":
                        if config == "default":
                            config = "defaults: adjoint, 16 probes, 64 steps, jacobi"
                        elif config == "default-hutchinson":
                            config = "defaults + gradient=hutchinson (16 probes, jacobi, rtol 1e-6)"
                    elif case["kind"] == "linop-base":
                        config = "10 Gaussian probes, ≤ 20 quadrature steps, gpsparse CG rtol 1e-6"
                    else:
                        config = "10 Gaussian probes, ≤ 20 quadrature steps, cg_tolerance 1, max 1000 its"
                    row = summarise_b(method, config, raw, ex["logdet"], ex["quad"])
                    row["name"] = case["name"]
                    b["rows"].append(row)
                    if row.get("error"):
                        print(f"# (b) {case['name']}: ERROR {row['error']}", flush=True)
                    else:
                        print(f"# (b) {case['name']}: total {row['total_s']:.2f} s, logdet rel err {row['logdet_rel_max']:.1e}, "
                              f"process peak {row['process_peak_mib']:.0f} MiB", flush=True)
            # matfree (JAX) at the probes and depths given (Jacobi scaling, Rademacher probes, no re-orthogonalisation)
            for mf in args.b_matfree:
                if mf == "none":
                    continue
                cfg = parse_config("adjoint:" + mf)
                spec = dict(base, kind="matfree", matrix=args.b_matrix, m=m, p=cfg["p"], K=cfg["K"], seeds=args.b_seeds)
                raw = run_worker(spec, args.threads, snap["path"], args.timeout)[0]
                row = summarise_b("matfree (JAX)", f"SLQ p={cfg['p']}, K={cfg['K']}, Jacobi scaling, custom_vjp adjoint; jax CG rtol 1e-6",
                                  raw, ex["logdet"], ex["quad"])
                row["name"] = f"matfree:{mf}"
                b["rows"].append(row)
                if not row.get("error"):
                    b["notes"].append(f"matfree {mf}: jit compilation + first call {row.get('compile_and_first_s', float('nan')):.1f} s "
                                      "(not included in its total); matvec = `jax.ops.segment_sum` over the COO entries.")
                print(f"# (b) matfree {mf}: {row.get('error') or 'total %.2f s' % row['total_s']}", flush=True)
        if "a" in args.parts:
            for size, P in zip(args.a_sizes, args.a_probes + [args.a_probes[-1]] * len(args.a_sizes)):
                m = int(round(float(size) ** 0.5))
                for name in args.matrices:
                    ex = exact(name, m)
                    spec = dict(base, kind="accuracy", matrix=name, m=m, exact=ex["logdet"], probes=P, steps=args.a_steps,
                                preconds=[None, "jacobi", "ic0"], hutch_rtols=args.hutch_rtols, hutch_probes=args.hutch_probes,
                                # unpreconditioned CG on Q13 needs thousands of iterations, whose dense K×K eigh dominates
                                hutch_skip=[["Q13", "None"], ["Q13", "jacobi"]])
                    r = run_worker(spec, args.threads, snap["path"], args.timeout)[0]
                    r.setdefault("matrix", name)
                    r.setdefault("n", m * m)
                    res["accuracy"].append(r)
                    print(f"# (a) {name} n={m * m}: {'error ' + r['error'] if r.get('error') else 'done'}", flush=True)
            if args.a_big:
                m = int(round(float(args.a_big) ** 0.5))
                for item in args.a_big_configs:
                    name, pc, ks = item.split(":")
                    ex = exact(name, m)
                    spec = dict(base, kind="accuracy", matrix=name, m=m, exact=ex["logdet"], probes=args.a_big_probes,
                                steps=[int(k) for k in ks.split(",")], preconds=[None if pc == "none" else pc],
                                hutch_rtols=[], hutch_probes=0, time_probes=4)
                    r = run_worker(spec, args.threads, snap["path"], args.timeout)[0]
                    r.setdefault("matrix", name)
                    r.setdefault("n", m * m)
                    res["accuracy"].append(r)
                    print(f"# (a) {name} n={m * m} {pc}: {'error ' + r['error'] if r.get('error') else 'done'}", flush=True)

        if "grad" in args.parts:
            for name in args.matrices:
                configs = []
                for pc in (None, "jacobi", "ic0") if not args.quick else ("jacobi",):
                    for p in (1, 4, 16, 64) if not args.quick else (1, 16):
                        for K in (10, 30):
                            configs.append(dict(gradient="adjoint", pc=pc, p=p, K=K))
                        # unpreconditioned CG on Q13 needs ~n iterations: skipped (dense K×K eigh of the estimate)
                        if name != "Q13" or pc == "ic0":
                            configs.append(dict(gradient="hutchinson", pc=pc, p=p, rtol=1e-8))
                cached_matrix(cache, name, args.grad_m)
                spec = dict(base, kind="gradient", matrix=name, m=args.grad_m, configs=configs, seeds=args.grad_seeds,
                            fd_steps=[10, 30] if args.quick else [10, 30, 64])
                r = run_worker(spec, args.threads, snap["path"], args.timeout)[0]
                r.setdefault("matrix", name)
                res["gradient"].append(r)
                print(f"# gradient {name}: {'error ' + r['error'] if r.get('error') else 'done'}", flush=True)

    finally:
        shutil.rmtree(cache, ignore_errors=True)
    info["wall_s"] = time.perf_counter() - t_start
    info["loadavg_end"] = os.getloadavg()
    md = markdown(info, res)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump({"info": info, "results": res}, f, indent=1, default=str)
    print()
    print(md)


if __name__ == "__main__":
    main()
