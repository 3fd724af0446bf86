r"""Kalman filter, its adjoint, the RTS smoother and the state-space covariance product (numba kernels).

A stationary linear Gaussian state-space model on ``n`` sorted steps (gaps
``Δ_k ≥ 0``, *zero allowed*: equal inputs are steps with ``A = I``, ``Σ = 0``),

$$
z_0 \sim N(0, P_0), \qquad z_k = A_k z_{k-1} + ε_k,\ ε_k \sim N(0, Σ_k), \qquad
y_k = z_{k,0} + e_k,\ e_k \sim N(0, d_k),
$$

with ``Σ_k = P_0 − A_k P_0 A_kᵀ`` (so ``Cov z_k = P_0`` at every step) has the
observation covariance ``K + D``, ``K_{ij} = e_0ᵀ A_{i←j} P_0 e_0`` (``i ≥ j``,
``A_{i←j} = A_i ⋯ A_{j+1}``) — for the Matérn state spaces of
``gpsparse.core.markov`` exactly the Matérn covariance. This module works with
that covariance form and never inverts ``Σ_k``: it stays exact as gaps shrink
to zero, where the precision form (``Σ_k⁻¹ ~ Δ^{−(2s−1)}``) loses
``(2s − 1)·log10(1/λΔ)`` digits.

Kernels (``B`` batch members, ``n`` steps, state dimension ``s ≤ 3``, ``t``
right-hand sides; every array float64 and C-contiguous):

* ``kalman_filter`` — the covariance-form filter: innovations
  ``v_k = y_k − e_0ᵀ m_k^−`` and their variances ``S_k = e_0ᵀ P_k^− e_0 + d_k``,
  so that ``log det(K + D) = Σ_k log S_k`` and ``yᵀ(K + D)⁻¹y = Σ_k v_k²/S_k``
  (the innovations form of the Gaussian likelihood). Unobserved steps
  (``observed[k] = False``) skip the update.
* ``kalman_adjoint`` — reverse mode of
  ``J = Σ_c g_c Σ_k v_{kc}²/S_k + h Σ_k log S_k`` with respect to ``A``, ``Σ``,
  ``P_0``, ``d`` and ``y`` (hand-derived, ``O(n s²(s + t))``; formulas in
  ``_adjoint_step``). With ``g = ½``, ``h = 0`` the gradient with respect to
  ``y`` is the solve ``(K + D)⁻¹ y``; ``want_params=False`` then skips the
  covariance adjoint.
* ``rts_smoother`` — Rauch–Tung–Striebel smoothed means and variances of the
  first state component (values only; predictions at unobserved steps).
* ``covariance_matmul`` / ``covariance_matmul_adjoint`` — ``u ↦ E₀ᵀ C E₀ u``
  with ``C = Cov(z)``: two linear recurrences,
  ``f_k = A_k f_{k−1} + P_0 e_0 u_k`` and ``g_k = A_{k+1}ᵀ(g_{k+1} + e_0 u_{k+1})``,
  ``(Ku)_k = e_0ᵀ(f_k + P_0 g_k)`` (stable: ``A_k`` are contractions), and the
  reverse mode of both.

The layers (DESIGN.md §1): pure numerics on numpy arrays; the autograd
Functions are ``gpsparse.autograd.kalman``.
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = [
    "kalman_filter",
    "kalman_adjoint",
    "rts_smoother",
    "covariance_matmul",
    "covariance_matmul_adjoint",
]

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}
_INLINE = {**_JIT, "inline": "always"}


# ---------------------------------------------------------------------------
# The filter
# ---------------------------------------------------------------------------


@numba.njit(**_INLINE)
def _predict(A, S, m_prev, P_prev, mp, Pp):
    """``m^− = A m``, ``P^− = A P Aᵀ + Σ`` (``A``, ``Σ``, ``P`` ``s × s``; ``m`` ``s × t``)."""
    s, t = m_prev.shape
    for a in range(s):
        for c in range(t):
            acc = 0.0
            for b in range(s):
                acc += A[a, b] * m_prev[b, c]
            mp[a, c] = acc
    for a in range(s):
        for b in range(s):
            acc = S[a, b]
            for i in range(s):
                Ai = A[a, i]
                if Ai != 0.0:
                    for j in range(s):
                        acc += Ai * P_prev[i, j] * A[b, j]
            Pp[a, b] = acc


@numba.njit(**_INLINE)
def _update(P, noise_k, y_k, mp, m_out, P_out, v_k):
    """Measurement update of the first component; returns ``S_k = P^−_{00} + d_k`` (writes ``m, P, v``)."""
    s, t = mp.shape
    Sk = P[0, 0] + noise_k
    for c in range(t):
        vc = y_k[c] - mp[0, c]
        v_k[c] = vc
        u = vc / Sk
        for a in range(s):
            m_out[a, c] = mp[a, c] + P[a, 0] * u
    for a in range(s):
        for i in range(s):
            P_out[a, i] = P[a, i] - P[a, 0] * P[i, 0] / Sk
    return Sk


@numba.njit(**_JIT)
def kalman_filter(A, S, P0, noise, observed, y, mf, Pf, Pp, v, innov):
    """Run the filter for every batch member; fills ``mf, Pf, Pp, v, innov`` in place.

    Shapes: ``A, S (B, n−1, s, s)``, ``P0 (B, s, s)``, ``noise (B, n)``,
    ``observed (n,)`` bool, ``y (B, n, t)``; outputs ``mf (B, n, s, t)`` and
    ``Pf (B, n, s, s)`` (filtered), ``Pp (B, n, s, s)`` (predicted),
    ``v (B, n, t)`` (innovations, 0 where unobserved), ``innov (B, n)``
    (``S_k``, 1 where unobserved).
    """
    B, n, s, t = mf.shape
    mp = np.empty((s, t))
    for b in range(B):
        for k in range(n):
            if k == 0:
                mp[:, :] = 0.0
                Pp[b, 0] = P0[b]
            else:
                _predict(A[b, k - 1], S[b, k - 1], mf[b, k - 1], Pf[b, k - 1], mp, Pp[b, k])
            if observed[k]:
                innov[b, k] = _update(Pp[b, k], noise[b, k], y[b, k], mp, mf[b, k], Pf[b, k], v[b, k])
            else:
                innov[b, k] = 1.0
                v[b, k] = 0.0
                mf[b, k] = mp
                Pf[b, k] = Pp[b, k]


# ---------------------------------------------------------------------------
# Its adjoint
# ---------------------------------------------------------------------------


@numba.njit(**_INLINE)
def _update_adjoint(P, Sk, v_k, g, h, mbar, Pbar, cbar, want_params, ybar_k):
    r"""Reverse mode of one measurement update (``kalman_adjoint``); turns ``m̄, P̄`` into ``m̄^−, P̄^−``.

    Returns ``d̄_k = S̄`` (complete only with ``want_params``); writes ``ȳ_k``.
    """
    s, t = mbar.shape
    Sb = h / Sk
    if want_params:
        cPc = 0.0
        for a in range(s):
            acc = 0.0
            for i in range(s):
                acc += (Pbar[a, i] + Pbar[i, a]) * P[i, 0]
                cPc += P[a, 0] * Pbar[a, i] * P[i, 0]
            cbar[a] = -acc / Sk
        Sb += cPc / (Sk * Sk)
    for c in range(t):
        vc = v_k[c]
        w = 0.0
        for a in range(s):
            w += P[a, 0] * mbar[a, c]
        if want_params:
            u = vc / Sk
            for a in range(s):
                cbar[a] += mbar[a, c] * u
        vb = (2.0 * g[c] * vc + w) / Sk
        Sb -= (g[c] * vc * vc + w * vc) / (Sk * Sk)
        ybar_k[c] = vb
        mbar[0, c] -= vb
    if want_params:
        for a in range(s):
            Pbar[a, 0] += cbar[a]
        Pbar[0, 0] += Sb
    return Sb


@numba.njit(**_INLINE)
def _symmetrize(M):
    s = M.shape[0]
    for a in range(s):
        for i in range(a + 1, s):
            sym = 0.5 * (M[a, i] + M[i, a])
            M[a, i] = sym
            M[i, a] = sym


@numba.njit(**_INLINE)
def _predict_adjoint(Ak, m_prev, P_prev, mbar, Pbar, tmp, work, Abar_k, want_params):
    r"""Reverse mode of ``m^− = A m``, ``P^− = A P Aᵀ + Σ``.

    ``Ā = m̄^− mᵀ + 2 P̄^− A P``, then ``m̄ = Aᵀ m̄^−`` and ``P̄ = Aᵀ P̄^− A``.

    ``Σ̄ = P̄^−`` is read by the caller before this call; ``tmp (s, s)`` and
    ``work (s,)`` are scratch.
    """
    s, t = mbar.shape
    if want_params:
        for a in range(s):  # tmp = P̄^− A
            for i in range(s):
                acc = 0.0
                for j in range(s):
                    acc += Pbar[a, j] * Ak[j, i]
                tmp[a, i] = acc
        for a in range(s):
            for i in range(s):
                acc = 0.0
                for c in range(t):
                    acc += mbar[a, c] * m_prev[i, c]
                for j in range(s):
                    acc += 2.0 * tmp[a, j] * P_prev[j, i]
                Abar_k[a, i] = acc
        for a in range(s):  # P̄ = Aᵀ (P̄^− A)
            for i in range(s):
                acc = 0.0
                for j in range(s):
                    acc += Ak[j, a] * tmp[j, i]
                Pbar[a, i] = acc
    for c in range(t):
        for a in range(s):
            acc = 0.0
            for j in range(s):
                acc += Ak[j, a] * mbar[j, c]
            work[a] = acc
        for a in range(s):
            mbar[a, c] = work[a]


@numba.njit(**_JIT)
def kalman_adjoint(A, S, P0, noise, observed, mf, Pf, Pp, v, innov, g, h, want_params, Abar, Sbar, P0bar, dbar, ybar):
    r"""Reverse mode of ``J = Σ_c g_c Σ_k v_{kc}²/S_k + h Σ_k log S_k`` through ``kalman_filter``.

    Inputs as ``kalman_filter`` plus its outputs and the weights ``g (B, t)``,
    ``h (B,)``; fills ``Abar, Sbar (B, n−1, s, s)``, ``P0bar (B, s, s)``,
    ``dbar (B, n)`` (only with ``want_params``) and ``ybar (B, n, t)``.

    Per observed step (``c = P^− e_0``, ``u = v/S``, ``m = m^− + c uᵀ``,
    ``P = P^− − c cᵀ/S``) with ``w_c = cᵀ m̄_c``:

    * ``v̄_c = (2 g_c v_c + w_c)/S``; ``ȳ_k = v̄``; ``m̄^− = m̄ − e_0 v̄ᵀ``;
    * ``S̄ = h/S − Σ_c (g_c v_c² + w_c v_c)/S² + cᵀP̄c/S²``; ``d̄_k = S̄``;
    * ``c̄ = Σ_c m̄_c u_c − (P̄ + P̄ᵀ)c/S``;
      ``P̄^− = P̄ + c̄ e_0ᵀ + S̄ e_0 e_0ᵀ`` (then symmetrised: every ``P`` is
      symmetric, so the symmetric part carries the whole derivative).

    Per prediction (``m^− = A m``, ``P^− = A P Aᵀ + Σ``):
    ``Ā = m̄^− mᵀ + 2 P̄^− A P``, ``Σ̄ = P̄^−``, ``m̄ = Aᵀ m̄^−``,
    ``P̄ = Aᵀ P̄^− A``; at step 0 ``P̄_0 = P̄^−``.
    """
    B, n, s, t = mf.shape
    mbar = np.empty((s, t))
    Pbar = np.empty((s, s))
    cbar = np.empty(s)
    tmp = np.empty((s, s))
    for b in range(B):
        mbar[:, :] = 0.0
        Pbar[:, :] = 0.0
        for k in range(n - 1, -1, -1):
            if observed[k]:
                d = _update_adjoint(
                    Pp[b, k], innov[b, k], v[b, k], g[b], h[b], mbar, Pbar, cbar, want_params, ybar[b, k]
                )
                if want_params:
                    dbar[b, k] = d
            else:
                ybar[b, k] = 0.0
                if want_params:
                    dbar[b, k] = 0.0
            if want_params:
                _symmetrize(Pbar)
            if k == 0:
                if want_params:
                    P0bar[b] = Pbar
                break
            if want_params:
                Sbar[b, k - 1] = Pbar
            _predict_adjoint(
                A[b, k - 1], mf[b, k - 1], Pf[b, k - 1], mbar, Pbar, tmp, cbar, Abar[b, k - 1], want_params
            )


# ---------------------------------------------------------------------------
# The smoother (predictions)
# ---------------------------------------------------------------------------


@numba.njit(**_JIT)
def rts_smoother(A, mf, Pf, Pp, mean0, var0):
    r"""Smoothed first components: ``mean0 (B, n, t)`` and ``var0 (B, n)``, filled in place.

    ``G_k = P_k A_{k+1}ᵀ (P^−_{k+1})⁻¹``,
    ``m^s_k = m_k + G_k (m^s_{k+1} − A_{k+1} m_k)``,
    ``P^s_k = P_k + G_k (P^s_{k+1} − P^−_{k+1}) G_kᵀ``. ``P^−_{k+1}`` is
    positive definite whenever the observation noise is (a zero gap gives
    ``G = I``).
    """
    B, n, s, t = mf.shape
    ms = np.empty((s, t))
    Ps = np.empty((s, s))
    for b in range(B):
        ms[:, :] = mf[b, n - 1]
        Ps[:, :] = Pf[b, n - 1]
        mean0[b, n - 1] = ms[0]
        var0[b, n - 1] = Ps[0, 0]
        for k in range(n - 2, -1, -1):
            Ak = A[b, k]
            GT = np.linalg.solve(Pp[b, k + 1], Ak @ Pf[b, k])  # Gᵀ = (P^−)⁻¹ A P
            G = GT.T.copy()
            ms[:, :] = mf[b, k] + G @ (ms - Ak @ mf[b, k])
            Ps[:, :] = Pf[b, k] + G @ (Ps - Pp[b, k + 1]) @ GT
            mean0[b, k] = ms[0]
            var0[b, k] = Ps[0, 0]


# ---------------------------------------------------------------------------
# The covariance product
# ---------------------------------------------------------------------------


@numba.njit(**_JIT)
def covariance_matmul(A, P0, u, out, f, gq):
    r"""``out = E₀ᵀ Cov(z) E₀ u`` for ``u (B, n, t)``; ``f, gq (B, n, s, t)`` keep the recurrences.

    ``f_0 = P_0 e_0 u_0``, ``f_k = A_k f_{k−1} + P_0 e_0 u_k`` (the past);
    ``g_{n−1} = 0``, ``g_k = A_{k+1}ᵀ(g_{k+1} + e_0 u_{k+1})`` (the future);
    ``out_k = e_0ᵀ(f_k + P_0 g_k)`` — from ``Cov(z_i, z_j) = A_{i←j} P_0``
    (``i ≥ j``) and its transpose.
    """
    B, n, s, t = f.shape
    for b in range(B):
        p = P0[b]
        for c in range(t):
            for a in range(s):
                f[b, 0, a, c] = p[a, 0] * u[b, 0, c]
        for k in range(1, n):
            Ak = A[b, k - 1]
            for c in range(t):
                for a in range(s):
                    acc = p[a, 0] * u[b, k, c]
                    for j in range(s):
                        acc += Ak[a, j] * f[b, k - 1, j, c]
                    f[b, k, a, c] = acc
        gq[b, n - 1] = 0.0
        for k in range(n - 2, -1, -1):
            Ak = A[b, k]
            for c in range(t):
                for a in range(s):
                    acc = Ak[0, a] * u[b, k + 1, c]
                    for j in range(s):
                        acc += Ak[j, a] * gq[b, k + 1, j, c]
                    gq[b, k, a, c] = acc
        for k in range(n):
            for c in range(t):
                acc = f[b, k, 0, c]
                for a in range(s):
                    acc += p[0, a] * gq[b, k, a, c]
                out[b, k, c] = acc


@numba.njit(**_JIT)
def covariance_matmul_adjoint(A, P0, u, f, gq, obar, Abar, P0bar, ubar):
    r"""Reverse mode of ``covariance_matmul``: fills ``Abar (B, n−1, s, s)``, ``P0bar (B, s, s)``, ``ubar (B, n, t)``.

    The past: ``F̄_k = e_0 ō_k + A_{k+1}ᵀ F̄_{k+1}`` (reverse order),
    ``Ā_k += F̄_k f_{k−1}ᵀ``, ``ū_k += e_0ᵀ P_0ᵀ F̄_k``,
    ``P̄_0 += F̄_k u_kᵀ e_0ᵀ``. The future, with ``h_k = g_k + e_0 u_k``:
    ``Ḡ_k = P_0ᵀ e_0 ō_k + A_k Ḡ_{k−1}`` (forward order),
    ``Ā_k += h_k Ḡ_{k−1}ᵀ``, ``ū_k += e_0ᵀ A_k Ḡ_{k−1}``;
    ``P̄_0 += e_0 Σ_k ō_k g_kᵀ``.
    """
    B, n, s, t = f.shape
    F = np.empty((s, t))
    Fn = np.empty((s, t))
    G = np.empty((s, t))
    H = np.empty((s, t))
    for b in range(B):
        p = P0[b]
        P0bar[b] = 0.0
        Abar[b] = 0.0
        ubar[b] = 0.0
        # the past, reverse order
        F[:, :] = 0.0
        for k in range(n - 1, -1, -1):
            if k < n - 1:
                Ak = A[b, k]
                for c in range(t):
                    for a in range(s):
                        acc = 0.0
                        for j in range(s):
                            acc += Ak[j, a] * F[j, c]
                        Fn[a, c] = acc
                F[:, :] = Fn
            for c in range(t):
                F[0, c] += obar[b, k, c]
            for c in range(t):
                acc = 0.0
                for a in range(s):
                    acc += p[a, 0] * F[a, c]
                    P0bar[b, a, 0] += F[a, c] * u[b, k, c]
                ubar[b, k, c] += acc
            if k > 0:
                for a in range(s):
                    for j in range(s):
                        acc = 0.0
                        for c in range(t):
                            acc += F[a, c] * f[b, k - 1, j, c]
                        Abar[b, k - 1, a, j] += acc
        # the future, forward order: Ḡ_0 = direct; h̄_k = A_k Ḡ_{k−1}, Ḡ_k = direct + h̄_k
        for k in range(n):
            for c in range(t):
                for a in range(s):
                    G[a, c] = p[0, a] * obar[b, k, c]
                    P0bar[b, 0, a] += obar[b, k, c] * gq[b, k, a, c]
            if k > 0:
                Ak = A[b, k - 1]
                for c in range(t):
                    for a in range(s):
                        acc = 0.0
                        for j in range(s):
                            acc += Ak[a, j] * H[j, c]
                        G[a, c] += acc
                        if a == 0:
                            ubar[b, k, c] += acc
                for a in range(s):
                    for j in range(s):
                        acc = 0.0
                        for c in range(t):
                            hv = gq[b, k, a, c] + (u[b, k, c] if a == 0 else 0.0)
                            acc += hv * H[j, c]
                        Abar[b, k - 1, a, j] += acc
            H[:, :] = G
