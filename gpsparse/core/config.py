"""Frozen configuration objects of the numerical cores, and the defaults, defined once.

Static settings (method, tolerances, caps, preconditioner, probe counts) are
kept apart from per-call inputs (values, right-hand sides, probes), as in
lineax. They are hashable, travel into autograd Functions unchanged (so the
backward pass runs with the forward's settings) and are built at the public
boundary — from a function's arguments or from [`gpsparse.settings`][] by
the operators — so that nothing below reads global state.

The stopping rule of every Krylov core is, per column,
``‖b − A x‖₂ ≤ max(rtol·‖b‖₂, atol)``.

This module is a core: it imports neither gpytorch, linear_operator nor
``gpsparse.settings``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import Tensor

from gpsparse.core.defaults import (
    DEFAULT_CHOLESKY_REFRESH,
    DEFAULT_MAX_BANDED_BANDWIDTH,
    DEFAULT_MAX_DENSE_SIZE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_NUM_LANCZOS,
    DEFAULT_NUM_PROBES,
    DEFAULT_RTOL,
)
from gpsparse.core.preconditioners import PRECONDITIONER_NAMES, Preconditioner

__all__ = [
    "DEFAULT_RTOL",
    "DEFAULT_NUM_PROBES",
    "DEFAULT_NUM_LANCZOS",
    "DEFAULT_MAX_MEMORY",
    "DEFAULT_CHOLESKY_REFRESH",
    "METHODS",
    "GRADIENTS",
    "ROADS",
    "PreconditionerSpec",
    "SolverConfig",
    "LogdetConfig",
    "RoadConfig",
    "ProbePartition",
    "share",
]

METHODS = ("cg", "minres", "bicgstab")
GRADIENTS = ("adjoint", "hutchinson")
#: Roads of the dispatcher (``gpsparse.linalg.dispatch``): ``"auto"`` chooses among the others.
ROADS = ("auto", "banded", "cholesky", "dense", "krylov")
PreconditionerSpec = None | str | Preconditioner | Callable[[Tensor], Tensor]


def _check_preconditioner_name(spec: Any) -> None:
    if isinstance(spec, str) and spec not in PRECONDITIONER_NAMES:
        raise ValueError(f"unknown preconditioner {spec!r}; choose one of {PRECONDITIONER_NAMES}, an object or None")


@dataclass(frozen=True)
class SolverConfig:
    """Static settings of an iterative solve.

    Parameters
    ----------
    method : {"cg", "minres", "bicgstab"}
        ``cg`` for symmetric positive definite, ``minres`` for symmetric
        (possibly indefinite), ``bicgstab`` for general square matrices.
    rtol, atol : float
        Stopping rule per column: ``‖b − A x‖ ≤ max(rtol·‖b‖, atol)``.
    max_iters : int or None
        Iteration cap (``None``: the core's default, ``10·n``).
    preconditioner : None, "jacobi", "ic0", "cholesky", Preconditioner or callable
        A name builds the preconditioner from the (detached) matrix values
        at every call (``gpsparse.core.preconditioners.build_preconditioner``);
        an object or callable ``r ↦ M⁻¹ r`` is used as given. ``M`` must be
        symmetric: the backward pass applies it to ``Aᵀ`` too.
    strict : bool
        Raise [`NonConvergenceError`][gpsparse.errors.NonConvergenceError] instead of
        warning with [`ConvergenceWarning`][gpsparse.errors.ConvergenceWarning] when the
        tolerance is not reached.
    cholesky_refresh : int
        With ``preconditioner="cholesky"``: refactorise the stale factor every
        this many uses.
    symmetrize_grad : bool
        For a symmetric pattern, return the symmetrised value gradient
        ``(g + gᵀ)/2`` (default) rather than the entry-wise one.
    """

    method: str = "cg"
    rtol: float = DEFAULT_RTOL
    atol: float = 0.0
    max_iters: int | None = None
    preconditioner: PreconditionerSpec = None
    strict: bool = False
    cholesky_refresh: int = DEFAULT_CHOLESKY_REFRESH
    symmetrize_grad: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if not (self.rtol >= 0 and self.atol >= 0):
            raise ValueError(f"rtol and atol must be non-negative, got rtol={self.rtol}, atol={self.atol}")
        if self.max_iters is not None and int(self.max_iters) < 1:
            raise ValueError(f"max_iters must be a positive integer, got {self.max_iters}")
        spec = self.preconditioner
        _check_preconditioner_name(spec)
        if spec is not None and not isinstance(spec, str) and not callable(spec):
            raise TypeError(f"preconditioner must be None, a name, or callable r -> M⁻¹r, got {type(spec).__name__}")
        if int(self.cholesky_refresh) < 1:
            raise ValueError(f"cholesky_refresh must be a positive integer, got {self.cholesky_refresh}")

    def with_method(self, method: str) -> SolverConfig:
        return replace(self, method=method)


@dataclass(frozen=True)
class LogdetConfig:
    """Static settings of an SLQ log-determinant.

    Parameters
    ----------
    num_probes : int
        Number of probe vectors ``p`` (per batch entry).
    num_lanczos : int
        Lanczos steps ``K`` per probe (adjoint mode); ignored by the
        Hutchinson mode, whose CG runs to ``rtol``.
    gradient : {"adjoint", "hutchinson"}
        See ``gpsparse.core.slq``.
    preconditioner : None, "jacobi", "ic0", "cholesky" or Preconditioner
        ``"jacobi"`` is the exact symmetric diagonal scaling
        ``D^{-1/2} A D^{-1/2}``, applied as a differentiable transformation of
        the values, so the adjoint gradient stays the exact gradient of the
        estimate. ``"ic0"`` / ``"cholesky"`` (rebuilt from the detached values)
        and Preconditioner objects are fixed ``M = CCᵀ`` with exact
        ``logdet M``; gradients treat ``M`` as constant, which is exact for the
        true log-determinant (pass a fixed Preconditioner object to make the
        estimate a deterministic function).
    reorthogonalize : bool
        Full re-orthogonalisation of the Lanczos basis (O(n·p·K²) extra work).
    rtol : float
        CG tolerance of the Hutchinson mode.
    max_memory : int
        Bytes allowed for stored Krylov bases in adjoint mode; probes are
        processed in chunks (the backward re-runs the forward Lanczos of each
        chunk) when all bases do not fit.
    cholesky_refresh : int
        With ``preconditioner="cholesky"``: refactorise every this many uses.
    """

    num_probes: int = DEFAULT_NUM_PROBES
    num_lanczos: int = DEFAULT_NUM_LANCZOS
    gradient: str = "adjoint"
    preconditioner: Any = "jacobi"
    reorthogonalize: bool = False
    rtol: float = DEFAULT_RTOL
    max_memory: int = DEFAULT_MAX_MEMORY
    cholesky_refresh: int = DEFAULT_CHOLESKY_REFRESH

    def __post_init__(self) -> None:
        if int(self.num_probes) < 1:
            raise ValueError(f"num_probes must be a positive integer, got {self.num_probes}")
        if int(self.num_lanczos) < 1:
            raise ValueError(f"num_lanczos must be a positive integer, got {self.num_lanczos}")
        if self.gradient not in GRADIENTS:
            raise ValueError(f"gradient must be one of {GRADIENTS}, got {self.gradient!r}")
        spec = self.preconditioner
        _check_preconditioner_name(spec)
        if spec is not None and not isinstance(spec, (str, Preconditioner)):
            raise TypeError("a log-determinant preconditioner needs split factors and logdet: pass a Preconditioner")


@dataclass(frozen=True)
class ProbePartition:
    """Where this process stands in a probe-parallel run (``gpsparse.distributed``).

    The Krylov road's ``p`` probes (and ``k`` right-hand-side columns) are the
    same on every rank — drawn from the same generator stream — and rank ``r``
    of ``world_size`` processes the contiguous block
    ``torch.tensor_split(arange(p), world_size)[r]`` of them; the results are
    combined by collectives over ``group``.

    Parameters
    ----------
    group : object
        The ``torch.distributed`` process group (None: the default group).
        Opaque here: the cores never communicate.
    rank : int
        This process's rank within ``group`` (``0 ≤ rank < world_size``).
    world_size : int
        Number of processes in ``group`` (≥ 1).
    backend : str
        The group's backend (``"gloo"``, ``"nccl"``, …), for the device check.
    """

    group: Any
    rank: int
    world_size: int
    backend: str = "gloo"

    def __post_init__(self) -> None:
        if int(self.world_size) < 1 or not 0 <= int(self.rank) < int(self.world_size):
            raise ValueError(f"rank {self.rank} is not in a group of {self.world_size} processes")

    def block(self, count: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's contiguous share of ``count`` items (``tensor_split`` sizes)."""
        return share(count, self.world_size, self.rank)


def share(count: int, parts: int, index: int) -> tuple[int, int]:
    """``(start, stop)`` of block ``index`` when ``count`` items are split as ``torch.tensor_split`` does."""
    base, extra = divmod(int(count), int(parts))
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class RoadConfig:
    """Everything the dispatcher needs to choose and run a road (``gpsparse.linalg.dispatch``).

    Parameters
    ----------
    road : {"auto", "banded", "cholesky", "dense", "krylov"}
        ``"auto"``: the exact banded Cholesky for symmetric matrices of
        half-bandwidth ≤ ``max_banded_bandwidth``; else CHOLMOD when
        ``cholesky`` is set; else (log-determinants only) a dense Cholesky for
        ``n ≤ dense_max_rows`` within ``max_dense_size``; else Krylov / SLQ.
        Any other value forces that road.
    max_banded_bandwidth : int
        Largest half-bandwidth of the banded road (0 disables it).
    cholesky : bool
        Take the exact sparse-Cholesky road (CHOLMOD) for symmetric matrices.
    dense_max_rows : int
        Log-determinants of at most this many rows take the dense road (0: never).
    max_dense_size : int
        Elements a dense road may form (``batch · n · n``).
    solver, logdet : SolverConfig, LogdetConfig
        Settings of the Krylov road's solves and SLQ estimates.
    partition : ProbePartition, optional
        Split the Krylov road's probes and right-hand-side columns across the
        ranks of a process group (``gpsparse.distributed.probe_parallel``);
        None: one process does all of them.
    """

    road: str = "auto"
    max_banded_bandwidth: int = DEFAULT_MAX_BANDED_BANDWIDTH
    cholesky: bool = False
    dense_max_rows: int = 0
    max_dense_size: int = DEFAULT_MAX_DENSE_SIZE
    solver: SolverConfig = field(default_factory=SolverConfig)
    logdet: LogdetConfig = field(default_factory=LogdetConfig)
    partition: ProbePartition | None = None

    def __post_init__(self) -> None:
        if self.road not in ROADS:
            raise ValueError(f"unknown road {self.road!r}; choose one of {ROADS}")
        if int(self.max_banded_bandwidth) < 0:
            raise ValueError(f"max_banded_bandwidth must be non-negative, got {self.max_banded_bandwidth}")
