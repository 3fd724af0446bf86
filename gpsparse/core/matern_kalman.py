r"""The Matérn marginal likelihood by one fused Kalman pass: transitions and noises built inside the loop.

For the Matérn state space of ``gpsparse.core.markov`` (scaled gaps
``x_k = λ Δ_k ≥ 0``, output scale ``c``)

$$
A(x) = e^{−x} \sum_{k<s} x^k C_k, \qquad
Σ(x) = c \sum_{m=0}^{2s−2} P(m + 1, 2x) K_m, \qquad P_0 = c P_∞,
$$

``matern_filter`` runs the covariance-form filter of ``gpsparse.core.kalman``
computing ``A(x_k)`` and ``Σ(x_k)`` per step into ``s × s`` scratch (no
``(n, s, s)`` arrays), storing only the filtered moments;
``matern_adjoint`` runs the reverse mode, recomputing the blocks and the
predicted covariance ``P^−_k = A P_{k−1} Aᵀ + Σ`` per step, and contracts
the block adjoints with

$$
\frac{dA}{dx} = F A, \qquad \frac{dΣ}{dx} = c \sum_m 2 e^{−2x} \frac{(2x)^m}{m!} K_m
$$

(``F = C_1 − I``, the scaled drift), so that it returns ``x̄ (B, n−1)`` and
``c̄ (B,)`` directly. Memory ``O(n s (s + t))`` doubles; the per-step
arithmetic is that of the generic kernels (``gpsparse.core.kalman``'s step
functions, shared). ``P(m + 1, y)`` is evaluated as in
``gpsparse.core.markov.regularized_gamma`` (series below ``y = 2``, closed
form above, downward recurrence).
"""

from __future__ import annotations

import math

import numba
import numpy as np

from gpsparse.core.kalman import _predict, _predict_adjoint, _symmetrize, _update, _update_adjoint
from gpsparse.core.markov import _SERIES_TERMS

__all__ = ["matern_filter", "matern_adjoint"]

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_INLINE = {**_JIT, "inline": "always"}


@numba.njit(**_INLINE)
def _gamma(y, top, out, weights):
    """``out[m] = P(m + 1, y)`` and ``weights[m] = e^{−y} y^m/m!`` for ``m = 0 … top``."""
    weights[0] = math.exp(-y)
    for m in range(1, top + 1):
        weights[m] = weights[m - 1] * y / m
    if y < 2.0:
        tail = 1.0
        for i in range(top + 1 + _SERIES_TERMS, top + 1, -1):
            tail = 1.0 + tail * y / i
        fact = 1.0
        for i in range(2, top + 2):
            fact *= i
        out[top] = tail * y ** (top + 1) * math.exp(-y) / fact
    else:
        partial = 0.0
        for m in range(top + 1):
            partial += weights[m]
        out[top] = 1.0 - partial
    for m in range(top, 0, -1):
        out[m - 1] = out[m] + weights[m]


@numba.njit(**_INLINE)
def _blocks(x, scale, C, K, A, S, gam, weights):
    """``A(x)`` and ``c·Σ(x)`` into ``A, S (s, s)``; ``gam``, ``weights`` keep ``P(m + 1, 2x)`` and its weights."""
    s = A.shape[0]
    top = K.shape[0] - 1
    _gamma(2.0 * x, top, gam, weights)
    decay = math.exp(-x)
    for a in range(s):
        for b in range(s):
            acc = 0.0
            power = decay
            for k in range(C.shape[0]):
                acc += power * C[k, a, b]
                power *= x
            A[a, b] = acc
            acc = 0.0
            for m in range(top + 1):
                acc += gam[m] * K[m, a, b]
            S[a, b] = scale * acc


@numba.njit(**_INLINE)
def _blocks_vjp(x, scale, C, K, A, S, weights, Abar, Sbar):
    """``(x̄, c̄)`` of ``⟨Ā, A(x)⟩ + ⟨Σ̄, c Σ(x)⟩`` (``dA/dx = F A``, ``F = C_1 − I``; module docstring)."""
    s = A.shape[0]
    top = K.shape[0] - 1
    xbar = 0.0
    cbar = 0.0
    for a in range(s):
        for b in range(s):
            if s > 1:
                FA = -A[a, b]
                for j in range(s):
                    FA += C[1, a, j] * A[j, b]
            else:
                FA = -A[a, b]
            xbar += Abar[a, b] * FA
            dS = 0.0
            for m in range(top + 1):
                dS += 2.0 * weights[m] * K[m, a, b]
            xbar += Sbar[a, b] * scale * dS
            if scale != 0.0:
                cbar += Sbar[a, b] * S[a, b] / scale
    return xbar, cbar


@numba.njit(**_JIT)
def matern_filter(x, scale, noise, y, C, K, Pinf, mf, Pf, v, innov):
    """The fused filter (module docstring): ``x (B, n−1)``, ``scale (B,)``, ``noise (B, n)``, ``y (B, n, t)``.

    Fills ``mf (B, n, s, t)``, ``Pf (B, n, s, s)``, ``v (B, n, t)``,
    ``innov (B, n)``. Every step is observed.
    """
    B, n, s, t = mf.shape
    top = K.shape[0] - 1
    A = np.empty((s, s))
    S = np.empty((s, s))
    Pp = np.empty((s, s))
    mp = np.empty((s, t))
    gam = np.empty(top + 1)
    weights = np.empty(top + 1)
    for b in range(B):
        for k in range(n):
            if k == 0:
                mp[:, :] = 0.0
                for a in range(s):
                    for i in range(s):
                        Pp[a, i] = scale[b] * Pinf[a, i]
            else:
                _blocks(x[b, k - 1], scale[b], C, K, A, S, gam, weights)
                _predict(A, S, mf[b, k - 1], Pf[b, k - 1], mp, Pp)
            innov[b, k] = _update(Pp, noise[b, k], y[b, k], mp, mf[b, k], Pf[b, k], v[b, k])


@numba.njit(**_JIT)
def matern_adjoint(x, scale, noise, C, K, Pinf, mf, Pf, v, innov, g, h, xbar, scalebar, dbar, ybar):
    """Reverse mode of ``Σ_c g_c Σ_k v²/S + h Σ_k log S`` through ``matern_filter``.

    Fills ``xbar (B, n−1)``, ``scalebar (B,)``, ``dbar (B, n)``, ``ybar (B, n, t)``.
    """
    B, n, s, t = mf.shape
    top = K.shape[0] - 1
    A = np.empty((s, s))
    S = np.empty((s, s))
    Pp = np.empty((s, s))
    Abar = np.empty((s, s))
    Sbar = np.empty((s, s))
    mp = np.empty((s, t))
    mbar = np.empty((s, t))
    Pbar = np.empty((s, s))
    cbar = np.empty(s)
    tmp = np.empty((s, s))
    gam = np.empty(top + 1)
    weights = np.empty(top + 1)
    for b in range(B):
        mbar[:, :] = 0.0
        Pbar[:, :] = 0.0
        total_scale = 0.0
        for k in range(n - 1, -1, -1):
            if k == 0:
                for a in range(s):
                    for i in range(s):
                        Pp[a, i] = scale[b] * Pinf[a, i]
            else:
                _blocks(x[b, k - 1], scale[b], C, K, A, S, gam, weights)
                _predict(A, S, mf[b, k - 1], Pf[b, k - 1], mp, Pp)
            dbar[b, k] = _update_adjoint(Pp, innov[b, k], v[b, k], g[b], h[b], mbar, Pbar, cbar, True, ybar[b, k])
            _symmetrize(Pbar)
            if k == 0:
                for a in range(s):
                    for i in range(s):
                        total_scale += Pbar[a, i] * Pinf[a, i]
                break
            for a in range(s):
                for i in range(s):
                    Sbar[a, i] = Pbar[a, i]
            _predict_adjoint(A, mf[b, k - 1], Pf[b, k - 1], mbar, Pbar, tmp, cbar, Abar, True)
            xb, cb = _blocks_vjp(x[b, k - 1], scale[b], C, K, A, S, weights, Abar, Sbar)
            xbar[b, k - 1] = xb
            total_scale += cb
        scalebar[b] = total_scale
