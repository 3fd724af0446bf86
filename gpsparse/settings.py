"""Global settings of gpsparse, as context managers.

Only boundary code reads these (the public functions in ``gpsparse.linalg``
through ``gpsparse.linalg.config.road_config``, the operators and the
kernels), once per call, into frozen configurations; autograd Functions and
cores take every setting as an argument.

Examples
--------
>>> import gpsparse
>>> with gpsparse.settings.max_dense_size(10_000):
...     pass  # to_dense / dense Cholesky refused above 10 000 rows·columns
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace

from gpsparse.core.defaults import (
    DEFAULT_CHOLESKY_REFRESH,
    DEFAULT_MAX_BANDED_BANDWIDTH,
    DEFAULT_MAX_DENSE_SIZE,
    DEFAULT_NUM_LANCZOS,
    DEFAULT_NUM_PROBES,
    DEFAULT_RTOL,
    DEFAULT_VARIANCE_PROBES,
)

__all__ = ["max_dense_size", "solver_defaults", "logdet_defaults", "variance_defaults", "current"]


@dataclass(frozen=True)
class _Settings:
    #: Largest number of matrix elements (``batch · m · n``) that ``to_dense``
    #: and dense factorisations of a sparse operator may form: 2²⁴ ≈ 1.7·10⁷
    #: elements (128 MiB in float64; e.g. 4096 × 4096).
    max_dense_size: int = DEFAULT_MAX_DENSE_SIZE
    #: Relative tolerance of the operator's solves and inverse quadratic forms.
    rtol: float = DEFAULT_RTOL
    #: Absolute tolerance of the operator's solves.
    atol: float = 0.0
    #: Iteration cap of the operator's solves (``None``: ``10·n``).
    max_iters: int | None = None
    #: Preconditioner of the operator's solves: None, "jacobi" or "ic0".
    preconditioner: str | None = None
    #: Gradient of the log-determinant: "adjoint" (exact gradient of the SLQ
    #: estimate, Lanczos adjoints) or "hutchinson" (probe reuse from one CG run).
    logdet_gradient: str = "adjoint"
    #: Probes of the SLQ log-determinant (linear_operator's
    #: ``num_trace_samples`` is used instead when a user has changed it).
    num_probes: int = DEFAULT_NUM_PROBES
    #: Lanczos steps per probe (linear_operator's
    #: ``max_lanczos_quadrature_iterations`` is used when a user has changed it).
    num_lanczos: int = DEFAULT_NUM_LANCZOS
    #: Fixed preconditioner of the log-determinant: "jacobi" (exact diagonal
    #: scaling, free), "ic0" or None.
    logdet_preconditioner: str | None = "jacobi"
    #: "slq" (stochastic Lanczos quadrature) or "cholesky" (exact sparse Cholesky through
    #: CHOLMOD, optional dependency scikit-sparse) for log-determinants and the solves beside them.
    logdet_method: str = "slq"
    #: With preconditioner "cholesky": refactorise the (stale) preconditioner every this many uses.
    cholesky_refresh: int = DEFAULT_CHOLESKY_REFRESH
    #: Operators with at least this many rows get the large-size log-determinant defaults
    #: (``gradient="hutchinson"``, ``num_probes=4``, ``preconditioner="ic0"`` on CPU, ``"jacobi"`` on
    #: CUDA) for every one of these three settings not set through ``logdet_defaults``
    #: (measured at N = 10⁶: one marginal likelihood + gradient 17 s instead of 254 s, relative
    #: error 3e-6; ``benchmarks/results/precision_cpu_1thread.md``). 0 disables the switch.
    large_logdet_size: int = 100_000
    #: Names of the log-determinant settings chosen explicitly (kept at every size).
    logdet_explicit: frozenset = frozenset()
    #: Symmetric operators whose half-bandwidth max|i − j| is at most this use the exact banded
    #: Cholesky path (LAPACK pbtrf, O(N·b²)) for solves and log-determinants (0 disables it).
    max_banded_bandwidth: int = DEFAULT_MAX_BANDED_BANDWIDTH
    #: Variances of sparse-precision covariances: "auto", "exact" or "stochastic".
    variance_method: str = "auto"
    #: Probes of the stochastic variance estimator.
    variance_probes: int = DEFAULT_VARIANCE_PROBES
    #: "auto" computes variances exactly up to this many points.
    exact_variance_limit: int = 1024
    #: "auto" computes variances exactly at any number of points from a selected inverse of the
    #: precision (banded road, or CHOLMOD when installed) for precisions of at most this many nodes.
    selected_inverse_limit: int = 1_000_000
    #: Probe-parallel run (``gpsparse.core.config.ProbePartition``) set by
    #: ``gpsparse.distributed.probe_parallel``; None: this process does every probe.
    probe_partition: object = None


_state = threading.local()


def current() -> _Settings:
    """The settings in force in this thread."""
    return getattr(_state, "value", _Settings())


@contextmanager
def _override(**changes):
    previous = current()
    _state.value = replace(previous, **changes)
    try:
        yield _state.value
    finally:
        _state.value = previous


def probe_partition(partition):
    """Set the probe partition (a ``gpsparse.core.config.ProbePartition`` or None) for the block.

    The public entry point is ``gpsparse.distributed.probe_parallel``, which
    builds the partition from a ``torch.distributed`` process group.
    """
    return _override(probe_partition=partition)


def max_dense_size(elements: int):
    """Allow dense materialisation (``to_dense``, dense Cholesky) up to ``elements`` matrix entries."""
    if int(elements) < 0:
        raise ValueError(f"max_dense_size must be non-negative, got {elements}")
    return _override(max_dense_size=int(elements))


def solver_defaults(
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_iters: int | None = None,
    preconditioner: str | None = None,
    max_banded_bandwidth: int | None = None,
):
    """Override the solve settings used by [`SparseLinearOperator`][gpsparse.SparseLinearOperator].

    The method is chosen by the operator: the exact banded Cholesky for
    symmetric operators of half-bandwidth ≤ ``max_banded_bandwidth`` (default
    6; 0 disables), else CG for symmetric matrices and BiCGSTAB otherwise.
    linear_operator's ``cg_tolerance`` (default 1, meant for training) is
    deliberately *not* used: gpsparse solves to ``rtol`` (default 1e-6).
    """
    changes = dict(
        rtol=rtol,
        atol=atol,
        max_iters=max_iters,
        preconditioner=preconditioner,
        max_banded_bandwidth=max_banded_bandwidth,
    )
    return _override(**{k: v for k, v in changes.items() if v is not None})


def logdet_defaults(
    *,
    gradient: str | None = None,
    num_probes: int | None = None,
    num_lanczos: int | None = None,
    preconditioner: str | None | bool = False,
    method: str | None = None,
    cholesky_refresh: int | None = None,
    large_size: int | None = None,
):
    """Override how [`SparseLinearOperator`][gpsparse.SparseLinearOperator] computes log-determinants.

    Parameters
    ----------
    gradient : {"adjoint", "hutchinson"}
        ``"adjoint"``: exact gradient of the stochastic Lanczos quadrature
        estimate (Lanczos adjoints; stores or recomputes the Krylov bases).
        ``"hutchinson"``: probe reuse from one batched CG run that also solves
        the inverse quadratic term (cheaper, O(n·p) memory; an unbiased
        gradient of the true log-determinant rather than of the estimate).
    num_probes, num_lanczos : int
        Probes and Lanczos steps (defaults 16 and 64; linear_operator's
        ``num_trace_samples`` / ``max_lanczos_quadrature_iterations`` take
        precedence when a user has set them away from their defaults).
    preconditioner : "jacobi", "ic0", "cholesky" or None
        Fixed preconditioner with exact log-determinant (default "jacobi").
        ``"cholesky"`` is a CHOLMOD factor of the matrix from an earlier call
        (an earlier optimiser step), reused as ``M`` and refactorised every
        ``cholesky_refresh`` uses (default 10): SLQ on ``C⁻¹AC⁻ᵀ ≈ I`` then
        needs few Lanczos steps.
    method : {"slq", "cholesky"}
        ``"cholesky"``: exact log-determinants and solves by sparse Cholesky
        (CHOLMOD; needs ``pip install "gpsparse[cholmod]"``), gradients by
        selected inversion — the exact reference path.
    large_size : int
        Size switch (default 100 000 rows; 0 disables it): operators at least
        this large use ``gradient="hutchinson"``, ``num_probes=4`` and
        ``preconditioner="ic0"`` (``"jacobi"`` on CUDA) for each of these three
        settings that is not given explicitly here — the defaults above are
        for smaller operators. An explicit ``gradient="adjoint"`` keeps the
        small-size probe count and preconditioner. Measured at N = 10⁶ (lattice GMRF marginal
        likelihood + gradient, 1 thread): 17 s and relative error 3e-6,
        against 254 s with the small-size defaults.

    Examples
    --------
    >>> import gpsparse
    >>> with gpsparse.settings.logdet_defaults(gradient="hutchinson", num_probes=32):
    ...     pass  # mll(model(x), y).backward() here uses probe reuse with 32 probes
    """
    if gradient is not None and gradient not in ("adjoint", "hutchinson"):
        raise ValueError(f"gradient must be 'adjoint' or 'hutchinson', got {gradient!r}")
    for name, value in (("num_probes", num_probes), ("num_lanczos", num_lanczos)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if method is not None and method not in ("slq", "cholesky"):
        raise ValueError(f"method must be 'slq' or 'cholesky', got {method!r}")
    changes = dict(
        logdet_gradient=gradient,
        num_probes=num_probes,
        num_lanczos=num_lanczos,
        logdet_method=method,
        cholesky_refresh=cholesky_refresh,
    )
    changes = {k: v for k, v in changes.items() if v is not None}
    if preconditioner is not False:
        changes["logdet_preconditioner"] = preconditioner
    if large_size is not None:
        if int(large_size) < 0:
            raise ValueError(f"large_size must be a non-negative integer, got {large_size}")
        changes["large_logdet_size"] = int(large_size)
    changes["logdet_explicit"] = current().logdet_explicit | {k for k in changes if k in _SIZE_AWARE}
    return _override(**changes)


#: Settings with large-size defaults (see ``_Settings.large_logdet_size``), and those defaults.
_SIZE_AWARE = ("logdet_gradient", "num_probes", "logdet_preconditioner")
LARGE_SIZE_DEFAULTS = {"logdet_gradient": "hutchinson", "num_probes": 4, "logdet_preconditioner": "ic0"}


def logdet_setting(name: str, num_rows: int, device_type: str = "cpu"):
    """The log-determinant setting ``name`` in force for an operator with ``num_rows`` rows.

    Explicit choices ([`logdet_defaults`][gpsparse.settings.logdet_defaults]) win; otherwise operators with at
    least ``large_logdet_size`` rows get ``LARGE_SIZE_DEFAULTS`` (with the
    Jacobi scaling instead of IC(0) on CUDA, where IC(0) factorises on the CPU).
    The probe count and preconditioner switch only together with the gradient:
    an explicit ``gradient="adjoint"`` keeps 16 probes and the Jacobi scaling
    unless those are set too (IC(0) in the adjoint mode measured 3.1 GB and 19 s
    against 2.1 GB and 7 s at N = 250 000, 8 probes × 32 steps).
    """
    s = current()
    if name in s.logdet_explicit or not (0 < s.large_logdet_size <= num_rows):
        return getattr(s, name)
    if name != "logdet_gradient" and logdet_setting("logdet_gradient", num_rows, device_type) != "hutchinson":
        return getattr(s, name)  # an explicit adjoint keeps its own defaults (IC(0) costs memory there)
    if name == "logdet_preconditioner" and device_type != "cpu":
        return "jacobi"
    return LARGE_SIZE_DEFAULTS[name]


def variance_defaults(
    *,
    method: str | None = None,
    num_probes: int | None = None,
    exact_limit: int | None = None,
    selected_inverse_limit: int | None = None,
):
    """How variances ``diag(W Q⁻¹ Wᵀ)`` of sparse-precision covariances are computed (prediction).

    ``method``: "auto", "exact" or "stochastic" (``num_probes`` Monte Carlo
    samples, default 64). "auto" is exact — from a selected inverse of ``Q``
    (the banded road at any size, or CHOLMOD when scikit-sparse is installed
    for ``Q`` of at most ``selected_inverse_limit`` nodes: default 10⁶, where a
    2-D lattice's selected inversion took 515 s and 5.6 GB, measured in
    ``benchmarks/variance_benchmark.py``) at any number of points, else by
    solves up to ``exact_limit`` points (default 1024) — and
    stochastic beyond or under ``gpytorch.settings.fast_pred_var()``. See
    ``gpsparse.operators.precision.covariance_diagonal``.
    """
    if method is not None and method not in ("auto", "exact", "stochastic"):
        raise ValueError(f"method must be 'auto', 'exact' or 'stochastic', got {method!r}")
    for name, value in (("num_probes", num_probes), ("exact_limit", exact_limit)):
        if value is not None and int(value) < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if selected_inverse_limit is not None and int(selected_inverse_limit) < 0:
        raise ValueError(f"selected_inverse_limit must be non-negative, got {selected_inverse_limit}")
    changes = dict(
        variance_method=method,
        variance_probes=num_probes,
        exact_variance_limit=exact_limit,
        selected_inverse_limit=selected_inverse_limit,
    )
    return _override(**{k: v for k, v in changes.items() if v is not None})
