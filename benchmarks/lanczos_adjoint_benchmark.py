#!/usr/bin/env python
"""Lanczos adjoint vs unrolled autograd through Lanczos: time and memory of forward and backward.

Loss: the stochastic Lanczos quadrature (SLQ) log-determinant estimate
``(1/p) Σ_l ‖z_l‖² e₁ᵀ log(T_l) e₁`` of the 2-D lattice precision
``A = τ(κ²I + L)² + σ⁻²I`` (13 nonzeros per row, L the Neumann 5-point Laplacian of an
m × m lattice, n = m²), K Lanczos steps from p fixed Rademacher probes, no preconditioner,
float64; gradient with respect to the nnz stored values. Methods:

* ``adjoint`` — ``gpsparse.logdet(op, probes=z, num_lanczos=K, preconditioner=None)``
  (adjoint gradient: Daleckii–Krein cotangents on T, ``gpsparse.core.lanczos.lanczos_adjoint``,
  one sampled product at the nonzeros);
* ``lanczos-fn`` — ``gpsparse.lanczos(op, z, K)`` (the differentiable decomposition, autograd
  Function with the Lanczos adjoint as backward) and the same loss computed in torch from
  ``dec.alpha``/``dec.beta`` (autograd through the K × K ``eigh``);
* ``unrolled`` — plain torch autograd through the Lanczos loop: gpsparse's own forward loop
  ``gpsparse.core.lanczos._lanczos(..., differentiable=True)`` (no in-place writes; the oracle
  of the adjoint tests) with the differentiable SpMM ``gpsparse.autograd.sparse.SparseMatmul``
  (backward: a transposed SpMM and a sampled product per step), same loss.

All three run the same forward recurrence (re-orthogonalisation off unless ``--reorth``
rows are requested) and give the same gradient (checked: ``grad rel diff`` column).

How things are measured
-----------------------
* One worker process per (n, K, p, method, reorth): fresh imports, ``torch.set_num_threads``
  (and OMP/MKL_NUM_THREADS) = ``--threads``; the pattern's lazily built caches (transpose
  permutation, row indices, diagonal positions) are built before timing (a training loop
  builds them once). A warm-up call on an 8 × 8 lattice precedes the measurement.
* Times: ``time.perf_counter``; forward = up to the loss value, backward = ``loss.backward()``;
  median over ``--repeats`` calls (default 3, 1 in ``--quick``).
* Memory: on the first timed call, the process's peak resident set size is reset
  (``/proc/self/clear_refs`` = 5 after ``gc.collect`` and ``malloc_trim``; Linux ``VmHWM``)
  and ``peak`` is the growth of VmHWM over the forward + backward relative to the RSS just
  before the call; ``held`` is the RSS growth between before the call and the end of the
  forward (what the autograd graph keeps for the backward). The matrix, pattern and probes
  exist before and are not counted.
* Time split of ``adjoint`` (and ``lanczos-fn``): the worker wraps the functions
  ``gpsparse.logdet`` (resp. ``gpsparse.funm``) looks up at call time (``lanczos``,
  ``quadrature_with_grad``, ``lanczos_adjoint``, ``sampled_product``,
  ``symmetrize_values_grad``); nothing in the library is modified.
* Floors, same process, just before the case: ``SpMM`` = median time of one
  ``gpsparse.core.sparse_ops.spmm`` with p columns into a reused buffer (the forward does K of
  them); ``SDDMM`` = ``gpsparse.core.sparse_ops.sampled_product`` with p·K columns, for
  row-major (contiguous ``(n, pK)``) and column-major factors (the layout
  ``lanczos_adjoint`` returns).
* The library is copied to a temporary snapshot at start so that all workers of one run
  import the same code (the repository is edited concurrently); its hash is recorded.

Usage::

    python benchmarks/lanczos_adjoint_benchmark.py --quick          # n = 10⁴, K = 10, 50, p = 1 (< 1 min)
    python benchmarks/lanczos_adjoint_benchmark.py                  # n = 10⁴, 10⁵; K = 10, 50, 100; p = 1, 4
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

import numpy as np

KAPPA, TAU, NOISE_PREC = 0.1, 1.0, 1.0
METHODS = ("adjoint", "lanczos-fn", "unrolled")


# --------------------------------------------------------------------------------------------------
# matrix
# --------------------------------------------------------------------------------------------------


def lattice_matrix(m: int, kappa: float = KAPPA, tau: float = TAU, noise_prec: float = NOISE_PREC):
    """scipy CSR (sorted, exactly symmetric) of τ(κ²I + L)² + σ⁻²I on an m × m lattice (Neumann L)."""
    import scipy.sparse as sp

    d = np.full(m, 2.0)
    d[[0, -1]] = 1.0
    one = sp.diags([-np.ones(m - 1), d, -np.ones(m - 1)], [-1, 0, 1], format="csr")
    eye = sp.identity(m, format="csr")
    a5 = (kappa**2 * sp.identity(m * m) + sp.kron(one, eye) + sp.kron(eye, one)).tocsr()
    a = (tau * (a5 @ a5) + noise_prec * sp.identity(m * m)).tocsr()
    a = ((a + a.T) * 0.5).tocsr()
    a.sum_duplicates()
    a.sort_indices()
    return a


def cached_matrix(cache: str, m: int):
    stem = os.path.join(cache, f"A13_{m}")
    if not os.path.exists(stem + "_data.npy"):
        a = lattice_matrix(m)
        np.save(stem + "_crow.npy", a.indptr.astype(np.int32))
        np.save(stem + "_col.npy", a.indices.astype(np.int32))
        np.save(stem + "_data.npy", a.data.astype(np.float64))
    return np.load(stem + "_crow.npy"), np.load(stem + "_col.npy"), np.load(stem + "_data.npy")


# --------------------------------------------------------------------------------------------------
# worker
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


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _median_time(call, seconds=0.5, min_calls=5, max_calls=100) -> float:
    call()
    times = []
    end = time.perf_counter() + seconds
    while len(times) < min_calls or (time.perf_counter() < end and len(times) < max_calls):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class Split:
    """Accumulated time of named functions, wrapped in a module's namespace (this process only)."""

    def __init__(self, module, names):
        self.times: dict[str, float] = {}
        for name in names:
            original = getattr(module, name)
            setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        times = self.times

        def wrapped(*a, **kw):
            t0 = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                times[name] = times.get(name, 0.0) + time.perf_counter() - t0

        return wrapped


def worker(spec: dict):
    """Run the cases of ``spec["cases"]`` (same n) in this process; yield one result dict per case."""
    import torch

    torch.set_num_threads(spec["threads"])
    import gpsparse
    from gpsparse import SparseLinearOperator, SparsityPattern
    from gpsparse.autograd.sparse import SparseMatmul
    from gpsparse.core.lanczos import _lanczos
    from gpsparse.core.quadrature import FUNCTIONS, quadrature, rademacher
    from gpsparse.core.sparse_ops import sampled_product, spmm

    tol = math.sqrt(torch.finfo(torch.float64).eps)
    log = FUNCTIONS["log"]
    splits = {
        "adjoint": Split(sys.modules["gpsparse.logdet"], ("lanczos", "quadrature_with_grad", "lanczos_adjoint", "sampled_product", "symmetrize_values_grad")),
        "lanczos-fn": Split(sys.modules["gpsparse.funm"], ("lanczos_core", "lanczos_adjoint", "sampled_product", "symmetrize_values_grad")),
    }

    def slq_loss(method, K, reorth, values, pattern, z):
        """The SLQ estimate as a differentiable function of the values (same number for all methods)."""
        n = pattern.size[0]
        K = min(K, n)
        norms2 = z.pow(2).sum(0)  # (p,)
        if method == "adjoint":
            return gpsparse.logdet(
                SparseLinearOperator(values, pattern=pattern), probes=z, num_lanczos=K,
                preconditioner=None, gradient="adjoint", reorthogonalize=reorth, max_memory=2**40,
            )
        if method == "lanczos-fn":
            dec = gpsparse.lanczos(SparseLinearOperator(values, pattern=pattern), z, K, reorthogonalize=reorth)
        else:
            values2d = values.unsqueeze(0)
            dec = _lanczos(lambda x: SparseMatmul.apply(values2d, x, pattern), z.unsqueeze(0), K, reorth, tol, differentiable=True)
        return (norms2 / z.shape[1] * quadrature(dec.alpha[0], dec.beta[0], log)).sum()

    def build(crow, col, data):
        n = crow.size - 1
        pattern = SparsityPattern(torch.from_numpy(crow), torch.from_numpy(col), (n, n), symmetric=True)
        for attr in ("row", "col_long", "transpose_perm", "diagonal_positions"):
            getattr(pattern, attr)  # lazily built caches: built once per pattern in a training loop
        return pattern, torch.from_numpy(data)

    # warm-up on a tiny lattice (code paths, eigh, autograd), every method and probe count
    a = lattice_matrix(8)
    pw, vw = build(a.indptr.astype(np.int32), a.indices.astype(np.int32), a.data)
    for case in spec["cases"]:
        zw = rademacher((64, case["p"]), generator=torch.Generator().manual_seed(1), dtype=torch.float64, device="cpu")
        v = vw.clone().requires_grad_()
        slq_loss(case["method"], 10, case["reorth"], v, pw, zw).backward()

    crow, col, data = cached_matrix(spec["cache"], spec["m"])
    pattern, values0 = build(crow, col, data)
    n = pattern.size[0]
    floor_s = spec.get("floor_seconds", 0.5)
    spmm_floor: dict[int, float] = {}
    for case in spec["cases"]:
        method, K, p, reorth = case["method"], case["K"], case["p"], case["reorth"]
        z = rademacher((n, p), generator=torch.Generator().manual_seed(0), dtype=torch.float64, device="cpu")
        result: dict = {"loadavg": os.getloadavg()}
        try:
            # floors
            if p not in spmm_floor:
                X = torch.randn(1, n, p, dtype=torch.float64)
                Y = torch.empty_like(X)
                spmm_floor[p] = _median_time(lambda: spmm(values0.unsqueeze(0), pattern, X, out=Y), seconds=floor_s)
                del X, Y
            result["spmm_s"] = spmm_floor[p]
            if method != "unrolled":
                left = torch.randn(1, n, p * K, dtype=torch.float64)
                right = torch.randn(1, n, p * K, dtype=torch.float64)
                result["sddmm_row_s"] = _median_time(lambda: sampled_product(pattern, left, right), seconds=floor_s, min_calls=3)
                left_c, right_c = left.mT.contiguous().mT, right.mT.contiguous().mT
                del left, right
                result["sddmm_col_s"] = _median_time(lambda: sampled_product(pattern, left_c, right_c), seconds=floor_s, min_calls=3)
                del left_c, right_c
            split = splits.get(method)
            runs = []
            grad = None
            for rep in range(spec["repeats"]):
                values = values0.clone().requires_grad_()
                _trim()
                if split:
                    split.times.clear()
                measure_mem = rep == 0
                if measure_mem:
                    result["memory_method"] = "VmHWM growth (clear_refs reset)" if _reset_peak() else "VmHWM (not resettable)"
                rss0 = _status_kib("VmRSS")
                t0 = time.perf_counter()
                loss = slq_loss(method, K, reorth, values, pattern, z)
                value = float(loss.detach())
                t1 = time.perf_counter()
                rss1 = _status_kib("VmRSS")
                loss.backward()
                t2 = time.perf_counter()
                run = {"fwd_s": t1 - t0, "bwd_s": t2 - t1, "loss": value}
                if measure_mem:
                    run["held_mib"] = (rss1 - rss0) / 1024
                    run["peak_mib"] = (_status_kib("VmHWM") - rss0) / 1024
                if split:
                    run["split"] = dict(split.times)
                runs.append(run)
                grad = values.grad
                loss = values = None
            result["runs"] = runs
            if method != "adjoint" and spec.get("check", True):
                # the adjoint gradient on the same probes (correctness of this row)
                v2 = values0.clone().requires_grad_()
                slq_loss("adjoint", K, reorth, v2, pattern, z).backward()
                result["grad_rel_diff"] = float((grad - v2.grad).norm() / v2.grad.norm())
                v2 = None
            result["grad_norm"] = float(grad.norm())
            grad = None
        except Exception:
            result["error"] = traceback.format_exc().strip().splitlines()[-1]
        yield result


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    try:
        for index, result in enumerate(worker(spec)):
            print(f"RESULT {index} " + json.dumps(result), flush=True)
    except Exception:
        print("WORKER-ERROR " + json.dumps(traceback.format_exc()), flush=True)


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def snapshot_library(cache: str) -> dict:
    """Copy the gpsparse package into ``cache`` so that every worker of this run imports the same code."""
    import importlib.util

    source = importlib.util.find_spec("gpsparse").submodule_search_locations[0]
    target = os.path.join(cache, "snapshot")
    shutil.copytree(source, os.path.join(target, "gpsparse"), ignore=shutil.ignore_patterns("__pycache__"))
    digest = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(target, "gpsparse"))):
        if name.endswith(".py"):
            with open(os.path.join(target, "gpsparse", name), "rb") as f:
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
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
    }


def run_worker(spec: dict, threads: int, pythonpath: str, timeout: float) -> list[dict]:
    """One worker process for ``spec["cases"]``; a result dict per case (an error dict if it did not finish)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONWARNINGS"] = "ignore"
    results: dict[int, dict] = {}
    why = ""
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
            capture_output=True, text=True, env=env, timeout=timeout,
        )
        for line in proc.stdout.splitlines():
            if line.startswith("RESULT "):
                _, index, payload = line.split(" ", 2)
                results[int(index)] = json.loads(payload)
            elif line.startswith("WORKER-ERROR "):
                why = json.loads(line[13:]).strip().splitlines()[-1]
        why = why or f"worker exited with code {proc.returncode}: {proc.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired as err:
        why = f"timeout after {timeout:.0f} s"
        for line in (err.stdout or b"").decode().splitlines() if isinstance(err.stdout, bytes) else (err.stdout or "").splitlines():
            if line.startswith("RESULT "):
                _, index, payload = line.split(" ", 2)
                results[int(index)] = json.loads(payload)
    return [results.get(i, {"error": why}) for i in range(len(spec["cases"]))]


def summarise(spec: dict, raw: dict) -> dict:
    row = {k: spec[k] for k in ("n", "K", "p", "method", "reorth")}
    row["error"] = raw.get("error")
    runs = raw.get("runs", [])
    if not runs:
        return row
    row["fwd_s"] = statistics.median(r["fwd_s"] for r in runs)
    row["bwd_s"] = statistics.median(r["bwd_s"] for r in runs)
    row["bwd_over_fwd"] = row["bwd_s"] / row["fwd_s"]
    row["held_mib"] = runs[0].get("held_mib")
    row["peak_mib"] = runs[0].get("peak_mib")
    row["loss"] = runs[0]["loss"]
    row["spmm_ms"] = raw["spmm_s"] * 1e3
    row["K_spmm_s"] = raw["spmm_s"] * spec["K"]
    row["sddmm_row_s"] = raw.get("sddmm_row_s")
    row["sddmm_col_s"] = raw.get("sddmm_col_s")
    row["grad_rel_diff"] = raw.get("grad_rel_diff")
    row["loadavg"] = raw.get("loadavg")
    row["memory_method"] = raw.get("memory_method")
    if runs[0].get("split"):
        keys = runs[0]["split"].keys()
        row["split"] = {k: statistics.median(r["split"].get(k, 0.0) for r in runs) for k in keys}
    # memory a basis of K vectors (n, p) occupies
    row["basis_mib"] = spec["n"] * spec["p"] * spec["K"] * 8 / 2**20
    return row


def fmt(x, spec=".3g"):
    return "–" if x is None else format(x, spec)


def markdown(info: dict, rows: list[dict]) -> str:
    la = info["loadavg_start"]
    le = info.get("loadavg_end", (float("nan"),) * 3)
    snap = info.get("snapshot", {})
    out = ["# Lanczos adjoint vs unrolled autograd (SLQ log-determinant loss)\n"]
    out.append(
        f"* machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']} (CPU), Python {info['python']}; "
        f"gpsparse git {snap.get('git_commit', '?')} (source sha256 {snap.get('sha256', '?')}"
        + (f", uncommitted: {', '.join(snap['uncommitted'])}" if snap.get("uncommitted") else "")
        + ")\n"
        f"* torch threads: **{info['threads']}**; {info.get('process_note', 'one worker process per row')}\n"
        f"* date: {info['date']}; load average at start {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}, at end "
        f"{le[0]:.2f} / {le[1]:.2f} / {le[2]:.2f}; wall time {info.get('wall_s', 0):.0f} s\n"
        f"* command: `{info.get('command', '')}`\n"
        f"* matrix: τ(κ²I + L)² + σ⁻²I on an m × m lattice (n = m², 13 nnz/row), κ = {KAPPA}, τ = {TAU}, σ⁻² = {NOISE_PREC}; "
        "float64; p Rademacher probes (seed 0), K Lanczos steps, no preconditioner; loss = SLQ estimate, gradient w.r.t. the values\n"
        "* fwd / bwd: median seconds over the repeats; held = RSS growth from before the call to the end of the forward; "
        "peak = growth of the peak RSS (VmHWM, reset through /proc/self/clear_refs) over forward + backward, first timed call; "
        "basis = n·p·K·8 bytes (one stored Krylov basis)\n"
        "* mem ratio = peak(unrolled) / peak(method); grad rel diff = ‖g − g_adjoint‖/‖g_adjoint‖ on the same probes\n"
    )
    out.append("\n## Forward, backward, memory\n")
    out.append("| n | K | p | reorth | method | fwd s | bwd s | bwd/fwd | held MiB | peak MiB | basis MiB | mem ratio | grad rel diff |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['n']} | {r['K']} | {r['p']} | {r['reorth']} | {r['method']} | error: {r['error'][:80]} ||||||||")
            continue
        ref = next((u for u in rows if u["method"] == "unrolled" and all(u[k] == r[k] for k in ("n", "K", "p", "reorth")) and not u.get("error")), None)
        ratio = ref["peak_mib"] / r["peak_mib"] if ref and r.get("peak_mib") else None
        out.append(
            f"| {r['n']} | {r['K']} | {r['p']} | {r['reorth']} | {r['method']} | {fmt(r['fwd_s'])} | {fmt(r['bwd_s'])} | "
            f"{fmt(r['bwd_over_fwd'], '.2f')} | {fmt(r['held_mib'], '.0f')} | {fmt(r['peak_mib'], '.0f')} | {fmt(r['basis_mib'], '.0f')} | "
            f"{fmt(ratio, '.1f')} | {fmt(r.get('grad_rel_diff'), '.1e')} |"
        )
    split_rows = [r for r in rows if r.get("split") and not r.get("error")]
    if split_rows:
        out.append("\n## Where the time goes (adjoint paths)\n")
        out.append(
            "fwd Lanczos = the forward recurrence (K SpMMs with p columns + vector work); K·SpMM = K × the bare SpMM "
            "floor; bwd adjoint = the reverse recurrence `lanczos_adjoint` (K SpMMs + vector work); sampled = "
            "`sampled_product` of the (n, pK) factors at the nonzeros; sym = `symmetrize_values_grad`; SDDMM row/col = "
            "`sampled_product` floor with contiguous row-major / column-major (n, pK) factors (lanczos_adjoint returns "
            "column-major ones).\n"
        )
        out.append("| n | K | p | reorth | method | fwd s | fwd Lanczos s | K·SpMM s | bwd s | bwd adjoint s | bwd sampled s | bwd sym s | bwd other s | SDDMM row / col s |")
        out.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in split_rows:
            s = r["split"]
            fl = s.get("lanczos", s.get("lanczos_core", 0.0))
            adj, smp, sym = s.get("lanczos_adjoint", 0.0), s.get("sampled_product", 0.0), s.get("symmetrize_values_grad", 0.0)
            other = r["bwd_s"] - adj - smp - sym
            out.append(
                f"| {r['n']} | {r['K']} | {r['p']} | {r['reorth']} | {r['method']} | {fmt(r['fwd_s'])} | {fmt(fl)} | {fmt(r['K_spmm_s'])} | "
                f"{fmt(r['bwd_s'])} | {fmt(adj)} | {fmt(smp)} | {fmt(sym)} | {fmt(other)} | "
                f"{fmt(r.get('sddmm_row_s'))} / {fmt(r.get('sddmm_col_s'))} |"
            )
    out.append("\n## Targets\n")
    out.append("Backward ≤ 1.5 × forward (adjoint); memory ≥ 10× lower than unrolled at K = 50.\n")
    out.append("| n | p | reorth | method | K | bwd/fwd | ≤ 1.5? | mem ratio | ≥ 10? |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["method"] == "unrolled" or r.get("error"):
            continue
        ref = next((u for u in rows if u["method"] == "unrolled" and all(u[k] == r[k] for k in ("n", "K", "p", "reorth")) and not u.get("error")), None)
        ratio = ref["peak_mib"] / r["peak_mib"] if ref and r.get("peak_mib") else None
        mem_ok = "–" if ratio is None else ("yes" if ratio >= 10 else "no")
        if r["K"] != 50:
            mem_ok = f"({mem_ok})"
        out.append(
            f"| {r['n']} | {r['p']} | {r['reorth']} | {r['method']} | {r['K']} | {fmt(r['bwd_over_fwd'], '.2f')} | "
            f"{'yes' if r['bwd_over_fwd'] <= 1.5 else 'no'} | {fmt(ratio, '.1f')} | {mem_ok} |"
        )
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["1e4", "1e5"], help="n (rounded to a square m²)")
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 50, 100], help="Lanczos steps K")
    parser.add_argument("--probes", nargs="+", type=int, default=[1, 4], help="probes p")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--reorth-sizes", nargs="*", default=["1e4"], help="also run re-orthogonalised Lanczos at these n")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    parser.add_argument("--quick", action="store_true", help="n = 10⁴, K = 10, 50, p = 1, no re-orthogonalised rows, 1 repeat, one process")
    parser.add_argument("--one-process", action="store_true", help="run all cases of one n in one worker process (faster start-up; "
                        "memory figures then share one allocator)")
    parser.add_argument("--out", default="benchmarks/results/lanczos_adjoint", help="output stem: <out>.md and <out>.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    if args.quick:
        args.sizes, args.steps, args.probes, args.reorth_sizes, args.repeats = ["1e4"], [10, 50], [1], [], 1
        args.one_process = True
        if args.out == "benchmarks/results/lanczos_adjoint":
            args.out = "benchmarks/results/lanczos_adjoint_quick"

    info = machine_info(args.threads)
    info["process_note"] = "one worker process per n (--one-process)" if args.one_process else "one worker process per row"
    info["command"] = "python benchmarks/lanczos_adjoint_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {info['cpu']} ({info['cores']} cores), torch {info['torch']}, threads={args.threads}, "
          f"load average {info['loadavg_start'][0]:.2f}, {info['date']}", flush=True)
    cache = tempfile.mkdtemp(prefix="gpsparse_lanczos_bench_")
    t_start = time.perf_counter()
    rows = []
    try:
        snap = snapshot_library(cache)
        info["snapshot"] = {k: v for k, v in snap.items() if k != "path"}
        cases = []
        reorth_ms = {int(round(float(s) ** 0.5)) for s in args.reorth_sizes}
        for size in args.sizes:
            m = int(round(float(size) ** 0.5))
            cached_matrix(cache, m)
            for reorth in (False, True):
                if reorth and m not in reorth_ms:
                    continue
                for p in args.probes:
                    for K in args.steps:
                        for method in args.methods:
                            cases.append(dict(m=m, n=m * m, K=K, p=p, method=method, reorth=reorth))
        # one worker process per case (clean memory accounting), or one per n with --one-process
        groups: list[list[dict]] = []
        for case in cases:
            if args.one_process and groups and groups[-1][0]["m"] == case["m"]:
                groups[-1].append(case)
            else:
                groups.append([case])
        print(f"{'n':>7} {'K':>4} {'p':>2} {'reorth':6} {'method':10} {'fwd s':>7} {'bwd s':>7} {'bwd/fwd':>7} "
              f"{'held MiB':>8} {'peak MiB':>8} {'load':>5}", flush=True)
        for group in groups:
            spec = dict(m=group[0]["m"], cases=group, threads=args.threads, repeats=args.repeats, cache=cache,
                        floor_seconds=0.15 if args.quick else 0.5)
            for case, raw in zip(group, run_worker(spec, args.threads, snap["path"], args.timeout * len(group))):
                row = summarise(case, raw)
                rows.append(row)
                if row.get("error"):
                    print(f"{case['n']:>7} {case['K']:>4} {case['p']:>2} {str(case['reorth']):6} {case['method']:10} ERROR {row['error']}", flush=True)
                else:
                    print(f"{row['n']:>7} {row['K']:>4} {row['p']:>2} {str(row['reorth']):6} {row['method']:10} {row['fwd_s']:7.3f} "
                          f"{row['bwd_s']:7.3f} {row['bwd_over_fwd']:7.2f} {fmt(row['held_mib'], '8.0f')} {fmt(row['peak_mib'], '8.0f')} "
                          f"{row['loadavg'][0]:5.2f}", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    info["wall_s"] = time.perf_counter() - t_start
    info["loadavg_end"] = os.getloadavg()
    md = markdown(info, rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md)
    with open(args.out + ".json", "w") as f:
        json.dump({"info": info, "rows": rows}, f, indent=1)
    print()
    print(md)


if __name__ == "__main__":
    main()
