r"""Autograd Functions over the Kalman-filter kernels of ``gpsparse.core.kalman``.

The stationary state-space covariance (``gpsparse.core.kalman``: transitions
``A (*batch, n−1, s, s)``, process noises ``Σ = P_0 − A P_0 Aᵀ`` of the same
shape, stationary covariance ``P_0 (*batch, s, s)``, observations of the
first state component with noise variances ``d (*batch, n)``):

* ``kalman_inv_quad_logdet(A, Σ, P_0, d, R)`` → ``(Rᵀ(K + D)⁻¹R)_{cc}``
  ``(*batch, t)`` and ``log det(K + D)`` ``(*batch,)``: one filter forward,
  its hand-written adjoint backward (gradients for every input);
* ``kalman_solve(A, Σ, P_0, d, R)`` → ``(K + D)⁻¹ R`` ``(*batch, n, t)``: the
  filter and the mean part of its adjoint; backward: another solve for the
  right-hand side and ``−R̄ᵀ (dK + dD) α`` through the covariance product;
* ``state_space_matmul(A, P_0, U)`` → ``K U`` ``(*batch, n, t)`` by two linear
  recurrences, with their reverse mode.

The backward of ``kalman_solve`` and of the covariance product use the
stationarity ``Cov z_k = P_0`` (their gradient reaches ``A`` and ``P_0``, not
``Σ``; the total derivative with respect to anything that ``A``, ``Σ`` and
``P_0`` are computed from is the same as long as ``Σ = P_0 − A P_0 Aᵀ``).
Every kernel computes in float64 whatever the input dtype (float32 inputs
get float32 results with float64 accuracy inside). The backward passes are
differentiable once (``first_order_only``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gpsparse.autograd.first_order import first_order_only
from gpsparse.core import kalman as core
from gpsparse.core import matern_kalman as matern_core
from gpsparse.core.markov import matern_state_space

__all__ = [
    "kalman_inv_quad_logdet",
    "matern_inv_quad_logdet",
    "kalman_solve",
    "state_space_matmul",
    "smoothed_moments",
]


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy())


def _to(x: np.ndarray, like: Tensor) -> Tensor:
    return torch.from_numpy(x).to(device=like.device, dtype=like.dtype)


def _flat(x: Tensor, batch: torch.Size, tail: int) -> Tensor:
    """``x`` expanded to ``(*batch, *x.shape[-tail:])`` and flattened to ``(B, …)``."""
    tail_shape = x.shape[x.dim() - tail :]
    return x.expand(*batch, *tail_shape).reshape(math.prod(batch), *tail_shape)


def _filter(A, S, P0, noise, observed, rhs):
    """Run ``core.kalman_filter`` on flattened float64 arrays; returns the state dict."""
    B, n, t = rhs.shape
    s = P0.shape[-1]
    state = {
        "mf": np.empty((B, n, s, t)),
        "Pf": np.empty((B, n, s, s)),
        "Pp": np.empty((B, n, s, s)),
        "v": np.empty((B, n, t)),
        "innov": np.empty((B, n)),
    }
    core.kalman_filter(
        A, S, P0, noise, observed, rhs, state["mf"], state["Pf"], state["Pp"], state["v"], state["innov"]
    )
    return state


def _adjoint(A, S, P0, noise, observed, state, g, h, want_params):
    B, n, s, t = state["mf"].shape
    out = {
        "A": np.zeros((B, max(n - 1, 0), s, s)),
        "S": np.zeros((B, max(n - 1, 0), s, s)),
        "P0": np.zeros((B, s, s)),
        "d": np.zeros((B, n)),
        "y": np.zeros((B, n, t)),
    }
    core.kalman_adjoint(
        A, S, P0, noise, observed, state["mf"], state["Pf"], state["Pp"], state["v"], state["innov"],
        np.ascontiguousarray(g), np.ascontiguousarray(h), want_params,
        out["A"], out["S"], out["P0"], out["d"], out["y"],
    )  # fmt: skip
    return out


def _check_innovations(innov: np.ndarray) -> None:
    if not np.all(np.isfinite(innov)) or np.any(innov <= 0):
        worst = float(np.nanmin(innov)) if innov.size else float("nan")
        raise ValueError(
            f"Kalman filter: an innovation variance is not positive and finite (smallest {worst:.3e}); the "
            "observation noise must be positive and the transitions finite"
        )


class _InvQuadLogdet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, S, P0, noise, rhs, observed):
        arrays = [_np(x) for x in (A, S, P0, noise, rhs)]
        state = _filter(*arrays[:4], observed, arrays[4])
        _check_innovations(state["innov"][:, observed])
        quad = (state["v"] ** 2 / state["innov"][:, :, None]).sum(1)
        logdet = np.where(observed[None], np.log(state["innov"]), 0.0).sum(1)
        ctx.arrays, ctx.state, ctx.observed = arrays, state, observed
        ctx.anchor = noise
        ctx.like = (A, S, P0, noise, rhs)
        return _to(quad, rhs), _to(logdet, rhs)

    @staticmethod
    @first_order_only("the Kalman filter's marginal likelihood (state-space Markov kernels)")
    def backward(ctx, grad_quad, grad_logdet):
        A, S, P0, noise, _ = ctx.arrays
        g = _np(grad_quad) if grad_quad is not None else np.zeros(ctx.state["v"].shape[::2])
        h = _np(grad_logdet) if grad_logdet is not None else np.zeros(ctx.state["v"].shape[0])
        out = _adjoint(A, S, P0, noise, ctx.observed, ctx.state, g, h, True)
        grads = [_to(out[key], like) for key, like in zip(("A", "S", "P0", "d", "y"), ctx.like)]
        return (*grads, None)


def kalman_inv_quad_logdet(A: Tensor, S: Tensor, P0: Tensor, noise: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
    """``(diag(Rᵀ(K + D)⁻¹R), log det(K + D))`` of ``(*batch, t)`` and ``(*batch,)`` (module docstring)."""
    batch = torch.broadcast_shapes(A.shape[:-3], S.shape[:-3], P0.shape[:-2], noise.shape[:-1], rhs.shape[:-2])
    n, t = rhs.shape[-2:]
    observed = np.ones(n, dtype=bool)
    flat = (_flat(A, batch, 3), _flat(S, batch, 3), _flat(P0, batch, 2), _flat(noise, batch, 1), _flat(rhs, batch, 2))
    quad, logdet = _InvQuadLogdet.apply(*flat, observed)
    return quad.reshape(*batch, t), logdet.reshape(batch)


def _solve_arrays(arrays, observed):
    A, S, P0, noise, rhs = arrays
    state = _filter(A, S, P0, noise, observed, rhs)
    _check_innovations(state["innov"][:, observed])
    B, n, t = rhs.shape
    out = _adjoint(A, S, P0, noise, observed, state, np.full((B, t), 0.5), np.zeros(B), False)
    return out["y"]


def _matmul_arrays(A, P0, u):
    B, n, t = u.shape
    s = P0.shape[-1]
    out, f, g = np.empty((B, n, t)), np.empty((B, n, s, t)), np.empty((B, n, s, t))
    core.covariance_matmul(A, P0, u, out, f, g)
    return out, f, g


def _matmul_adjoint(A, P0, u, f, g, obar):
    B, n, t = u.shape
    s = P0.shape[-1]
    Abar, P0bar, ubar = np.zeros((B, max(n - 1, 0), s, s)), np.zeros((B, s, s)), np.zeros((B, n, t))
    core.covariance_matmul_adjoint(A, P0, u, f, g, np.ascontiguousarray(obar), Abar, P0bar, ubar)
    return Abar, P0bar, ubar


class _Solve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, S, P0, noise, rhs):
        arrays = [_np(x) for x in (A, S, P0, noise, rhs)]
        observed = np.ones(rhs.shape[-2], dtype=bool)
        alpha = _solve_arrays(arrays, observed)
        ctx.arrays, ctx.alpha, ctx.observed = arrays, alpha, observed
        ctx.anchor = noise
        ctx.like = (A, S, P0, noise, rhs)
        return _to(alpha, rhs)

    @staticmethod
    @first_order_only("the Kalman-filter solve (state-space Markov kernels)")
    def backward(ctx, grad):
        A, S, P0, noise, _ = ctx.arrays
        rbar = _solve_arrays([A, S, P0, noise, _np(grad)], ctx.observed)  # (K + D)⁻¹ ᾱ
        # ⟨ᾱ, dα⟩ = −r̄ᵀ (dK + dD) α: the covariance product's adjoint with ō = −r̄ applied to α.
        _, f, g = _matmul_arrays(A, P0, ctx.alpha)
        Abar, P0bar, _ = _matmul_adjoint(A, P0, ctx.alpha, f, g, -rbar)
        dbar = -(rbar * ctx.alpha).sum(-1)
        like = ctx.like  # no gradient for Σ: the stationary form carries it through A and P_0 (module docstring)
        return _to(Abar, like[0]), None, _to(P0bar, like[2]), _to(dbar, like[3]), _to(rbar, like[4])


def kalman_solve(A: Tensor, S: Tensor, P0: Tensor, noise: Tensor, rhs: Tensor) -> Tensor:
    """``(K + D)⁻¹ R`` for ``R (*batch, n, t)`` (module docstring)."""
    batch = torch.broadcast_shapes(A.shape[:-3], S.shape[:-3], P0.shape[:-2], noise.shape[:-1], rhs.shape[:-2])
    n, t = rhs.shape[-2:]
    flat = (_flat(A, batch, 3), _flat(S, batch, 3), _flat(P0, batch, 2), _flat(noise, batch, 1), _flat(rhs, batch, 2))
    return _Solve.apply(*flat).reshape(*batch, n, t)


class _Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, A, P0, u):
        arrays = [_np(x) for x in (A, P0, u)]
        out, f, g = _matmul_arrays(*arrays)
        ctx.arrays, ctx.f, ctx.g = arrays, f, g
        ctx.anchor = u
        ctx.like = (A, P0, u)
        return _to(out, u)

    @staticmethod
    @first_order_only("the state-space covariance product (state-space Markov kernels)")
    def backward(ctx, grad):
        A, P0, u = ctx.arrays
        Abar, P0bar, ubar = _matmul_adjoint(A, P0, u, ctx.f, ctx.g, _np(grad))
        return tuple(_to(x, like) for x, like in zip((Abar, P0bar, ubar), ctx.like))


def state_space_matmul(A: Tensor, P0: Tensor, u: Tensor) -> Tensor:
    """``K U`` with ``K_{ij} = e_0ᵀ Cov(z_i, z_j) e_0`` for ``U (*batch, n, t)`` (module docstring)."""
    batch = torch.broadcast_shapes(A.shape[:-3], P0.shape[:-2], u.shape[:-2])
    n, t = u.shape[-2:]
    flat = (_flat(A, batch, 3), _flat(P0, batch, 2), _flat(u, batch, 2))
    return _Matmul.apply(*flat).reshape(*batch, n, t)


def smoothed_moments(A: Tensor, S: Tensor, P0: Tensor, noise: Tensor, rhs: Tensor, observed: Tensor):
    """Posterior means ``(*batch, n, t)`` and variances ``(*batch, n)`` of the first state component.

    Values only (no gradient): the filter over every step, updating at the
    ``observed`` ones (``(n,)`` bool) with the noise ``d`` and data ``R``,
    then the RTS smoother (``gpsparse.core.kalman.rts_smoother``).
    """
    batch = torch.broadcast_shapes(A.shape[:-3], S.shape[:-3], P0.shape[:-2], noise.shape[:-1], rhs.shape[:-2])
    n, t = rhs.shape[-2:]
    arrays = [_np(_flat(x, batch, k)) for x, k in ((A, 3), (S, 3), (P0, 2), (noise, 1), (rhs, 2))]
    mask = np.ascontiguousarray(observed.detach().cpu().numpy().astype(bool))
    state = _filter(*arrays[:4], mask, arrays[4])
    _check_innovations(state["innov"][:, mask])
    B = arrays[4].shape[0]
    mean, var = np.empty((B, n, t)), np.empty((B, n))
    core.rts_smoother(arrays[0], state["mf"], state["Pf"], state["Pp"], mean, var)
    return _to(mean, rhs).reshape(*batch, n, t), _to(np.maximum(var, 0.0), rhs).reshape(*batch, n)


class _MaternInvQuadLogdet(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gaps, rate, scale, noise, rhs, nu):
        space = matern_state_space(nu)
        consts = [_np(c) for c in (space.transition_coeffs, space.noise_coeffs, space.stationary)]
        gaps64, rate64 = _np(gaps), _np(rate)
        x = np.ascontiguousarray(rate64[:, None] * gaps64)  # λΔ in float64, whatever the input dtype
        arrays = [x, _np(scale), _np(noise), _np(rhs)]
        B, n, t = arrays[3].shape
        s = space.order
        mf, Pf, v, innov = np.empty((B, n, s, t)), np.empty((B, n, s, s)), np.empty((B, n, t)), np.empty((B, n))
        matern_core.matern_filter(*arrays, *consts, mf, Pf, v, innov)
        _check_innovations(innov)
        ctx.saved = (gaps64, rate64, arrays, consts, mf, Pf, v, innov)
        ctx.anchor = noise
        ctx.like = (gaps, rate, scale, noise, rhs)
        quad = (v**2 / innov[:, :, None]).sum(1)
        return _to(quad, rhs), _to(np.log(innov).sum(1), rhs)

    @staticmethod
    @first_order_only("the Kalman filter's marginal likelihood (state-space Markov kernels)")
    def backward(ctx, grad_quad, grad_logdet):
        gaps, rate, (x, scale, noise, rhs), consts, mf, Pf, v, innov = ctx.saved
        B, n, t = rhs.shape
        g = _np(grad_quad) if grad_quad is not None else np.zeros((B, t))
        h = _np(grad_logdet) if grad_logdet is not None else np.zeros(B)
        xbar, scalebar, dbar, ybar = np.zeros_like(x), np.zeros(B), np.zeros((B, n)), np.zeros((B, n, t))
        matern_core.matern_adjoint(x, scale, noise, *consts, mf, Pf, v, innov, g, h, xbar, scalebar, dbar, ybar)
        # x = λΔ: the chain rule in float64 (a float32 sum over n would cancel for long lengthscales)
        gapsbar, ratebar = rate[:, None] * xbar, (xbar * gaps).sum(-1)
        grads = [_to(a, like) for a, like in zip((gapsbar, ratebar, scalebar, dbar, ybar), ctx.like)]
        return (*grads, None)


def matern_inv_quad_logdet(
    gaps: Tensor, rate: Tensor, scale: Tensor, noise: Tensor, rhs: Tensor, nu: float
) -> tuple[Tensor, Tensor]:
    """``kalman_inv_quad_logdet`` for the Matérn ν state space, fused (``gpsparse.core.matern_kalman``).

    ``gaps (*batch, n−1)`` ``Δ ≥ 0`` between the sorted steps, ``rate (*batch,)``
    ``λ = √(2ν)/ℓ``, ``scale (*batch,)`` the output scale, ``noise (*batch, n)``,
    ``rhs (*batch, n, t)``; returns ``(*batch, t)`` and ``(*batch,)``. The
    scaled gaps ``λΔ``, the transitions and the noises are formed in float64
    inside the filter and its adjoint (memory ``O(n s (s + t))``); gradients
    reach the gaps, the rate, the scale, the noise and the right-hand side.
    """
    batch = torch.broadcast_shapes(gaps.shape[:-1], rate.shape, scale.shape, noise.shape[:-1], rhs.shape[:-2])
    n, t = rhs.shape[-2:]
    size = math.prod(batch)
    flat = (
        _flat(gaps, batch, 1),
        rate.expand(batch).reshape(size),
        scale.expand(batch).reshape(size),
        _flat(noise, batch, 1),
        _flat(rhs, batch, 2),
    )
    quad, logdet = _MaternInvQuadLogdet.apply(*flat, float(nu))
    return quad.reshape(*batch, t), logdet.reshape(batch)
