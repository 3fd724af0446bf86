"""The numerical defaults of gpsparse, defined once (no imports: every layer may read them).

``gpsparse.core.config`` (the frozen configurations), the Krylov cores'
keyword defaults, the preconditioner registry and [`gpsparse.settings`][]
all take their defaults from here.
"""

#: Relative tolerance of solves and inverse quadratic forms (linear_operator's training
#: ``cg_tolerance = 1`` is deliberately not used).
DEFAULT_RTOL = 1e-6
#: Probes of the stochastic Lanczos quadrature log-determinant (small-size default).
DEFAULT_NUM_PROBES = 16
#: Lanczos steps per probe.
DEFAULT_NUM_LANCZOS = 64
#: Bytes allowed for stored Krylov bases in the adjoint mode (probes are chunked beyond).
DEFAULT_MAX_MEMORY = 2**29
#: Uses of a stale CHOLMOD preconditioner before it is refactorised.
DEFAULT_CHOLESKY_REFRESH = 10
#: Largest half-bandwidth of the exact banded road (0 disables it).
DEFAULT_MAX_BANDED_BANDWIDTH = 6
#: Largest number of elements a dense materialisation may form (2²⁴: 128 MiB in float64).
DEFAULT_MAX_DENSE_SIZE = 2**24
#: Probes of the stochastic variance estimator.
DEFAULT_VARIANCE_PROBES = 64
