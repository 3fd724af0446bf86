r"""Covariances of stationary linear state-space models (1-D Markov kernels): ``K`` and ``K + D``.

A stationary Gauss–Markov process on sorted *steps* ``t_0 ≤ t_1 ≤ … ≤ t_{n−1}``
(equal steps allowed) with state ``z`` of dimension ``s``,
``z_k = A_k z_{k−1} + ε_k``, ``ε_k ~ N(0, Σ_k)``, ``Σ_k = P_0 − A_k P_0 A_kᵀ``,
observed through its first component, has the covariance
``K_{ij} = e_0ᵀ Cov(z_i, z_j) e_0`` (``Cov(z_i, z_j) = A_{i←j} P_0`` for
``i ≥ j``). The operators here hold ``(A, Σ, P_0)`` and, per row and column,
the step it reads; every operation is ``O(n s³)`` through
``gpsparse.autograd.kalman``:

* ``K v``: two linear recurrences (the past and the future);
* ``(K + D)⁻¹ v``, ``vᵀ(K + D)⁻¹v`` and ``log det(K + D)``: the covariance-form
  Kalman filter (innovations ``v_k``, variances ``S_k``:
  ``log det = Σ log S_k``, ``vᵀ(K + D)⁻¹v = Σ v_k²/S_k``) and its adjoint.

Nothing inverts ``Σ_k``, so the results stay exact as steps approach each other
and coincide (``A = I``, ``Σ = 0``) — unlike the precision form
``W Q⁻¹ Wᵀ`` (``Q`` has ``Σ_k⁻¹`` entries). Gradients reach ``A``, ``Σ``,
``P_0`` and the noise, hence the inputs (each input is its own step) and the
hyperparameters they are computed from.
"""

from __future__ import annotations

import math

import torch
from linear_operator.operators import DiagLinearOperator, LinearOperator
from torch import Tensor

from gpsparse import settings as gs_settings
from gpsparse.autograd.kalman import (
    kalman_inv_quad_logdet,
    kalman_solve,
    matern_inv_quad_logdet,
    state_space_matmul,
)
from gpsparse.autograd.markov import matern_transition_and_noise
from gpsparse.core.markov import matern_order, matern_state_space
from gpsparse.errors import DenseSizeError

__all__ = [
    "StateSpaceCovarianceLinearOperator",
    "MaternCovarianceLinearOperator",
    "NoisyStateSpaceCovarianceLinearOperator",
]


class StateSpaceCovarianceLinearOperator(LinearOperator):
    r"""``K = E₁ C E₂ᵀ``: the first-component covariance of a stationary state-space model, never formed.

    Parameters
    ----------
    transitions : Tensor
        ``A (*batch, n − 1, s, s)``: ``z_k = A_{k−1} z_{k−1} + ε``.
    noises : Tensor
        ``Σ (*batch, n − 1, s, s)``, equal to ``P_0 − A P_0 Aᵀ`` (stationarity;
        passed separately because that difference cancels for short gaps).
    stationary : Tensor
        ``P_0 (*batch, s, s)``, the covariance of every state.
    rows : Tensor
        ``(m₁,)`` long: the step of each row.
    cols : Tensor, optional
        ``(m₂,)`` long: the step of each column (``rows`` if omitted: a
        symmetric ``K``).

    Notes
    -----
    * ``K v`` costs ``O(n s² t)`` for ``t`` columns (scatter to the steps, two
      recurrences, gather).
    * ``c·K`` for ``c > 0`` (``ScaleKernel``) scales ``Σ`` and ``P_0``; other
      constants go through linear_operator's generic constant multiple.
    * ``K + D`` (``add_diagonal``, ``+ DiagLinearOperator``: GPyTorch's
      Gaussian likelihood) returns a
      [`NoisyStateSpaceCovarianceLinearOperator`][gpsparse.operators.state_space.NoisyStateSpaceCovarianceLinearOperator]
      (symmetric ``K`` whose rows are one per step).
    * ``solve`` / ``logdet`` of the noise-free ``K`` are not offered (``K`` is
      singular for repeated inputs); add noise.
    """

    def __init__(
        self,
        transitions: Tensor,
        noises: Tensor,
        stationary: Tensor,
        rows: Tensor,
        cols: Tensor | None = None,
        *,
        step_order: Tensor | None = None,
    ):
        s = stationary.shape[-1]
        if transitions.shape[-2:] != (s, s) or noises.shape[-2:] != (s, s) or stationary.shape[-2] != s:
            raise ValueError(
                f"state-space blocks of shapes {tuple(transitions.shape)}, {tuple(noises.shape)} and "
                f"{tuple(stationary.shape)} do not share one state dimension"
            )
        n = transitions.shape[-3] + 1
        if noises.shape[-3] != n - 1:
            raise ValueError(f"{transitions.shape[-3]} transitions but {noises.shape[-3]} noise covariances")
        for name, index in (("rows", rows), ("cols", cols)):
            if index is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
                raise ValueError(f"{name} must index the {n} steps")
        super().__init__(transitions, noises, stationary, rows=rows, cols=cols, step_order=step_order)
        self.transitions, self.noises, self.stationary = transitions, noises, stationary
        self.rows, self.cols, self._step_order = rows, cols, step_order

    # ------------------------------------------------------------ structure
    @property
    def num_steps(self) -> int:
        return self.transitions.shape[-3] + 1

    @property
    def _cols(self) -> Tensor:
        return self.rows if self.cols is None else self.cols

    @property
    def step_order(self) -> Tensor:
        """``argsort(rows)``: step ``k`` holds row ``step_order[k]`` (from the kernel's cache, else computed once)."""
        if self._step_order is None:
            self._step_order = torch.argsort(self.rows)
        return self._step_order

    def _kept_order(self, changes: dict) -> Tensor | None:
        """The step order for ``_with``: kept unless the rows or columns change."""
        return None if ("rows" in changes or "cols" in changes) else self._step_order

    @property
    def is_symmetric(self) -> bool:
        return self.cols is None or self.cols is self.rows

    def _state_batch(self) -> torch.Size:
        return torch.broadcast_shapes(self.transitions.shape[:-3], self.noises.shape[:-3], self.stationary.shape[:-2])

    def _size(self) -> torch.Size:
        return torch.Size((*self._state_batch(), self.rows.numel(), self._cols.numel()))

    def _with(self, **changes) -> StateSpaceCovarianceLinearOperator:
        fields = dict(
            transitions=self.transitions, noises=self.noises, stationary=self.stationary, rows=self.rows, cols=self.cols
        )
        fields["step_order"] = self._kept_order(changes)
        fields.update(changes)
        return StateSpaceCovarianceLinearOperator(**fields)

    def _transpose_nonbatch(self) -> StateSpaceCovarianceLinearOperator:
        return self if self.is_symmetric else self._with(rows=self._cols, cols=self.rows)

    def _expand_batch(self, batch_shape) -> StateSpaceCovarianceLinearOperator:
        s = self.stationary.shape[-1]
        n = self.num_steps
        return self._with(
            transitions=self.transitions.expand(*batch_shape, n - 1, s, s),
            noises=self.noises.expand(*batch_shape, n - 1, s, s),
            stationary=self.stationary.expand(*batch_shape, s, s),
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        op = self
        if batch_indices:
            batch = self._state_batch()
            expanded = self._expand_batch(batch) if batch else self
            op = expanded._with(
                transitions=expanded.transitions[(*batch_indices, Ellipsis)],
                noises=expanded.noises[(*batch_indices, Ellipsis)],
                stationary=expanded.stationary[(*batch_indices, Ellipsis)],
            )
        rows = self.rows[row_index].reshape(-1)
        cols = self._cols[col_index].reshape(-1)
        return op._with(rows=rows, cols=cols)

    # ------------------------------------------------------------- products
    def _matmul(self, rhs: Tensor) -> Tensor:
        vector = rhs.dim() == 1
        rhs = rhs.unsqueeze(-1) if vector else rhs
        n = self.num_steps
        steps = torch.zeros(*rhs.shape[:-2], n, rhs.shape[-1], dtype=rhs.dtype, device=rhs.device)
        steps = steps.index_add(-2, self._cols, rhs)
        out = state_space_matmul(self.transitions, self.stationary, steps).index_select(-2, self.rows)
        return out.squeeze(-1) if vector else out

    def _diagonal(self) -> Tensor:
        if not self.is_symmetric:
            raise ValueError("the diagonal of a cross-covariance is not defined here")
        diagonal = self.stationary[..., 0, 0, None].to(self.dtype)
        return diagonal.expand(*self._state_batch(), self.rows.numel())

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if not bool((other.detach() > 0).all()):
            return super()._mul_constant(other)
        return self._with(
            noises=self.noises * other[..., None, None, None], stationary=self.stationary * other[..., None, None]
        )

    def to_dense(self) -> Tensor:
        """Dense ``K`` within [`gpsparse.settings.max_dense_size`][] (products with identity columns)."""
        _check_dense(self.shape, "state-space covariance")
        cols = self.shape[-1]
        eye = torch.eye(cols, dtype=self.dtype, device=self.device)
        return self._matmul(eye.expand(*self.batch_shape, cols, cols))

    def _cholesky(self, upper: bool = False):
        _check_dense(self.shape, "state-space covariance")
        return super()._cholesky(upper=upper)

    # ---------------------------------------------------------------- noise
    def add_diagonal(self, diag: Tensor) -> NoisyStateSpaceCovarianceLinearOperator:
        """``K + D`` with ``D`` diagonal (scalar, ``(m,)`` or batched)."""
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        m = self.shape[-1]
        diag = diag.reshape(1) if diag.dim() == 0 else diag
        noise = diag.expand(*torch.broadcast_shapes(diag.shape[:-1], self.batch_shape), m)
        return NoisyStateSpaceCovarianceLinearOperator(self, noise)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        raise NotImplementedError(
            "solve with a noise-free state-space covariance K is not offered (K is singular for repeated inputs "
            "and ill-conditioned for close ones); add observation noise (K + D, as GPyTorch's GaussianLikelihood "
            "does), which works through the Kalman filter"
        )

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        return self.solve(inv_quad_rhs)  # raises: the noise-free K has no Kalman form (solve's message)


class MaternCovarianceLinearOperator(StateSpaceCovarianceLinearOperator):
    r"""``c·k_ν(λ|t_i − t_j|)`` on sorted steps: a ``StateSpaceCovarianceLinearOperator`` given by its gaps.

    Parameters
    ----------
    gaps : Tensor
        ``(n − 1,)`` (or batched) non-negative ``Δ_k = t_k − t_{k−1}`` of the sorted steps.
    rate : Tensor
        ``(*batch,)`` positive ``λ = √(2ν)/ℓ``.
    scale : Tensor
        ``(*batch,)`` positive output scale ``c``.
    nu : float
        0.5, 1.5 or 2.5.
    rows, cols : Tensor
        As ``StateSpaceCovarianceLinearOperator``.

    Notes
    -----
    The transitions ``A(λΔ)``, noises ``c·Σ(λΔ)`` and ``P_0 = c·P∞``
    (``gpsparse.core.markov``) are built when a product, a solve or a
    prediction needs them (cached on the operator); the marginal likelihood of
    ``K + D`` (``inv_quad_logdet``) does not build them: it runs the fused
    filter of ``gpsparse.core.matern_kalman`` on the gaps, in float64 and
    ``O(n s (s + t))`` memory, with the chain rule through ``λΔ`` in float64
    too (float32 models keep ~1e-6 relative gradients at long lengthscales).
    """

    def __init__(
        self,
        gaps: Tensor,
        rate: Tensor,
        scale: Tensor,
        nu: float,
        rows: Tensor,
        cols: Tensor | None = None,
        *,
        step_order: Tensor | None = None,
    ):
        matern_order(nu)
        n = gaps.shape[-1] + 1
        for name, index in (("rows", rows), ("cols", cols)):
            if index is not None and index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
                raise ValueError(f"{name} must index the {n} steps")
        LinearOperator.__init__(self, gaps, rate, scale, nu=nu, rows=rows, cols=cols, step_order=step_order)
        self.gaps, self.rate, self.scale, self.nu = gaps, rate, scale, float(nu)
        self.rows, self.cols, self._step_order = rows, cols, step_order
        self._blocks = None

    def _state_space(self):
        if self._blocks is None:
            A, S = matern_transition_and_noise(self.rate[..., None] * self.gaps, self.nu)
            P = matern_state_space(self.nu).stationary.to(device=self.gaps.device, dtype=A.dtype)
            c = self.scale.to(A.dtype)
            self._blocks = (A, S * c[..., None, None, None], P * c[..., None, None])
        return self._blocks

    @property
    def transitions(self) -> Tensor:
        return self._state_space()[0]

    @property
    def noises(self) -> Tensor:
        return self._state_space()[1]

    @property
    def stationary(self) -> Tensor:
        return self._state_space()[2]

    @property
    def num_steps(self) -> int:
        return self.gaps.shape[-1] + 1

    def _state_batch(self) -> torch.Size:
        return torch.broadcast_shapes(self.gaps.shape[:-1], self.rate.shape, self.scale.shape)

    def _with(self, **changes) -> MaternCovarianceLinearOperator:
        fields = dict(gaps=self.gaps, rate=self.rate, scale=self.scale, nu=self.nu, rows=self.rows, cols=self.cols)
        fields["step_order"] = self._kept_order(changes)
        fields.update(changes)
        return MaternCovarianceLinearOperator(**fields)

    def _expand_batch(self, batch_shape) -> MaternCovarianceLinearOperator:
        return self._with(
            gaps=self.gaps.expand(*batch_shape, self.gaps.shape[-1]),
            rate=self.rate.expand(batch_shape),
            scale=self.scale.expand(batch_shape),
        )

    def _getitem(self, row_index, col_index, *batch_indices) -> LinearOperator:
        op = self
        if batch_indices:
            e = self._expand_batch(self._state_batch())
            op = e._with(
                gaps=e.gaps[(*batch_indices, Ellipsis)], rate=e.rate[batch_indices], scale=e.scale[batch_indices]
            )
        return op._with(rows=self.rows[row_index].reshape(-1), cols=self._cols[col_index].reshape(-1))

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if not bool((other.detach() > 0).all()):
            return LinearOperator._mul_constant(self, other)
        return self._with(scale=self.scale * other)


class NoisyStateSpaceCovarianceLinearOperator(LinearOperator):
    r"""``K + D`` for a state-space covariance ``K`` with one row per step, through the Kalman filter.

    Parameters
    ----------
    covariance : StateSpaceCovarianceLinearOperator
        Symmetric, ``rows`` a permutation of the steps (row ``i`` reads step
        ``rows[i]``).
    noise : Tensor
        ``(*batch, m)`` positive variances.

    Notes
    -----
    ``inv_quad_logdet`` runs one filter forward (the innovations form) and its
    adjoint backward; ``solve`` the filter and the adjoint's mean part.
    Results are exact to rounding (computed in float64 for every input dtype)
    for any spacing of the inputs, repeated inputs included.
    """

    def __init__(self, covariance: StateSpaceCovarianceLinearOperator, noise: Tensor):
        if not isinstance(covariance, StateSpaceCovarianceLinearOperator) or not covariance.is_symmetric:
            raise TypeError("covariance must be a symmetric StateSpaceCovarianceLinearOperator")
        m = covariance.rows.numel()
        if m != covariance.num_steps:
            raise ValueError(f"K + D needs one row per step: {m} rows on {covariance.num_steps} steps")
        if noise.shape[-1] != m:
            raise ValueError(f"noise has {noise.shape[-1]} entries but the covariance has {m} rows")
        if not bool(torch.isfinite(noise.detach()).all()) or bool((noise.detach() <= 0).any()):
            raise ValueError("the noise variances must be finite and positive")
        super().__init__(covariance, noise)
        self.covariance, self.noise = covariance, noise
        self._order = covariance.step_order  # step k holds row _order[k]

    def _size(self) -> torch.Size:
        m = self.noise.shape[-1]
        return torch.Size((*torch.broadcast_shapes(self.covariance.batch_shape, self.noise.shape[:-1]), m, m))

    def _matmul(self, rhs: Tensor) -> Tensor:
        return self.covariance._matmul(rhs) + self.noise.unsqueeze(-1) * rhs

    def _transpose_nonbatch(self) -> NoisyStateSpaceCovarianceLinearOperator:
        return self

    def _diagonal(self) -> Tensor:
        return self.covariance._diagonal() + self.noise

    def _expand_batch(self, batch_shape) -> NoisyStateSpaceCovarianceLinearOperator:
        return NoisyStateSpaceCovarianceLinearOperator(
            self.covariance._expand_batch(batch_shape), self.noise.expand(*batch_shape, self.noise.shape[-1])
        )

    def _mul_constant(self, other) -> LinearOperator:
        other = torch.as_tensor(other, dtype=self.dtype, device=self.device)
        if not bool((other.detach() > 0).all()):
            return super()._mul_constant(other)
        scaled = self.covariance._mul_constant(other)
        return NoisyStateSpaceCovarianceLinearOperator(scaled, self.noise * other[..., None])

    def add_diagonal(self, diag: Tensor) -> NoisyStateSpaceCovarianceLinearOperator:
        diag = torch.as_tensor(diag, dtype=self.dtype, device=self.device)
        return NoisyStateSpaceCovarianceLinearOperator(self.covariance, self.noise + diag)

    def __add__(self, other):
        if isinstance(other, DiagLinearOperator):
            return self.add_diagonal(other._diagonal())
        return super().__add__(other)

    def to_dense(self) -> Tensor:
        return self.covariance.to_dense() + torch.diag_embed(self.noise)

    def _cholesky(self, upper: bool = False):
        _check_dense(self.shape, "state-space covariance")
        return super()._cholesky(upper=upper)

    # --------------------------------------------------------- the filter
    def _steps(self, x: Tensor) -> Tensor:
        """Rows → steps along dim −2 (row ``_order[k]`` to step ``k``)."""
        return x.index_select(-2, self._order)

    def _arguments(self):
        op = self.covariance
        return op.transitions, op.noises, op.stationary, self.noise.index_select(-1, self._order)

    def solve(self, right_tensor: Tensor, left_tensor: Tensor | None = None) -> Tensor:
        """``(K + D)⁻¹ R`` by the Kalman filter (differentiable in ``R``, the state space and the noise)."""
        vector = right_tensor.dim() == 1
        rhs = right_tensor.unsqueeze(-1) if vector else right_tensor
        alpha = kalman_solve(*self._arguments(), self._steps(rhs)).index_select(-2, self.covariance.rows)
        alpha = alpha.squeeze(-1) if vector else alpha
        return alpha if left_tensor is None else left_tensor @ alpha

    def inv_quad(self, inv_quad_rhs: Tensor, reduce_inv_quad: bool = True) -> Tensor:
        return self.inv_quad_logdet(inv_quad_rhs, logdet=False, reduce_inv_quad=reduce_inv_quad)[0]

    def inv_quad_logdet(self, inv_quad_rhs: Tensor | None = None, logdet: bool = False, reduce_inv_quad: bool = True):
        """``Rᵀ(K + D)⁻¹R`` (per column, or summed) and ``log det(K + D)``: one filter pass."""
        zero = torch.zeros([], dtype=self.dtype, device=self.device)
        if inv_quad_rhs is None:
            rhs = torch.zeros(self.shape[-1], 1, dtype=self.dtype, device=self.device)
        else:
            rhs = inv_quad_rhs.unsqueeze(-1) if inv_quad_rhs.dim() == 1 else inv_quad_rhs
        op = self.covariance
        if isinstance(op, MaternCovarianceLinearOperator):
            noise = self.noise.index_select(-1, self._order)
            quad, logdet_term = matern_inv_quad_logdet(op.gaps, op.rate, op.scale, noise, self._steps(rhs), op.nu)
        else:
            quad, logdet_term = kalman_inv_quad_logdet(*self._arguments(), self._steps(rhs))
        if inv_quad_rhs is None:
            quad = zero
        elif reduce_inv_quad:
            quad = quad.sum(-1)
        return quad, (logdet_term if logdet else zero)


def _check_dense(shape: torch.Size, what: str) -> None:
    limit = gs_settings.current().max_dense_size
    if math.prod(shape) > limit:
        raise DenseSizeError(
            f"a dense {what} of shape {tuple(shape)} exceeds gpsparse.settings.max_dense_size = {limit:,}"
        )
