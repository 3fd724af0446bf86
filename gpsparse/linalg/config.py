"""Global settings → frozen configuration, read once at the boundary.

``road_config`` is the single place below the operators where
[`gpsparse.settings`][] is read: public functions and operators call it once
per call and pass the frozen ``RoadConfig`` down;
nothing below (autograd Functions, cores) reads global state.
"""

from __future__ import annotations

from gpsparse import settings
from gpsparse.core.config import LogdetConfig, RoadConfig, SolverConfig

__all__ = ["road_config"]


def road_config(
    *,
    symmetric: bool,
    num_rows: int,
    device_type: str = "cpu",
    dense_max_rows: int = 0,
    num_probes: int | None = None,
    num_lanczos: int | None = None,
    road: str = "auto",
) -> RoadConfig:
    """The ``RoadConfig`` that the settings in force give a matrix.

    Parameters
    ----------
    symmetric : bool
        Whether the matrix is declared symmetric (CG; else BiCGSTAB).
    num_rows : int
        Its size (the large-size log-determinant defaults switch on it,
        [`gpsparse.settings.logdet_defaults`][]).
    device_type : str
        ``"cpu"`` or ``"cuda"`` (IC(0) is replaced by the Jacobi scaling off the CPU).
    dense_max_rows : int
        Log-determinants of at most this many rows take the dense road (0: never).
    num_probes, num_lanczos : int, optional
        Overrides of the SLQ probe count and depth (the operators pass
        linear_operator's settings when a user changed them).
    road : str
        ``"auto"`` or a forced road (``gpsparse.core.config.ROADS``).
    """
    s = settings.current()

    def logdet_setting(name):
        return settings.logdet_setting(name, num_rows, device_type)

    solver = SolverConfig(
        method="cg" if symmetric else "bicgstab",
        rtol=s.rtol,
        atol=s.atol,
        max_iters=s.max_iters,
        preconditioner=s.preconditioner,
        cholesky_refresh=s.cholesky_refresh,
    )
    logdet = LogdetConfig(
        num_probes=logdet_setting("num_probes") if num_probes is None else num_probes,
        num_lanczos=s.num_lanczos if num_lanczos is None else num_lanczos,
        gradient=logdet_setting("logdet_gradient"),
        preconditioner=logdet_setting("logdet_preconditioner"),
        rtol=s.rtol,
        cholesky_refresh=s.cholesky_refresh,
    )
    return RoadConfig(
        road=road,
        max_banded_bandwidth=s.max_banded_bandwidth,
        cholesky=s.logdet_method == "cholesky",
        dense_max_rows=dense_max_rows,
        max_dense_size=s.max_dense_size,
        solver=solver,
        logdet=logdet,
        partition=s.probe_partition,
    )
