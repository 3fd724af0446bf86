r"""``LaplaceGP``: a GPyTorch model with a non-Gaussian likelihood, inferred by the Laplace approximation.

The covariance module is any gpsparse sparse-precision kernel (a kernel
returning ``W Q⁻¹ Wᵀ``: ``LatticeMaternKernel``, ``GraphMaternKernel``, their
``ScaleKernel`` and sums) or an intrinsic GMRF kernel (``BYM2Kernel``,
``BesagKernel``, ``RandomWalkKernel``, and their sums with the others: the
approximation then lives on the constraint subspace, ``gpsparse.core.laplace_constraints``,
exact roads only), so the latent field at the observations is
``f = μ + W x`` with ``x ~ N(0, Q⁻¹)`` on the N latent nodes. Everything runs
on the latent ``x``: Newton's method for the mode ``x̂`` on the sparse
``P = Q + Wᵀ H W`` and the log-determinants (``gpsparse.core.laplace``), the
objective with its implicit gradient (``gpsparse.autograd.laplace``,
[`LaplaceMarginalLogLikelihood`][gpsparse.mlls.LaplaceMarginalLogLikelihood]).

*Training.* ``model.train(); output = model(train_x)`` is the prior
``MultivariateNormal`` (as for an ``ExactGP``); the marginal likelihood reads
``Q`` and ``W`` from its covariance. The last mode is kept in
``model.laplace_state`` and warm-starts the next Newton run (across optimiser
steps, and for prediction).

*Prediction.* ``model.eval(); model(x_test)`` is the Gaussian (Laplace)
approximation of the latent at the test points,

$$
f_* \mid y \approx N\bigl(μ_* + W_* \hat x,\; W_* P^{-1} W_*^\top\bigr),
$$

returned as a ``MultivariateNormal`` whose covariance is a
[`SparsePrecisionLinearOperator`][gpsparse.SparsePrecisionLinearOperator] with
precision ``P`` at the mode (variances exact from one selected inverse of
``P`` on the banded or CHOLMOD roads, ``gpsparse.operators.precision.covariance_diagonal``;
``P`` is stored on the pattern of ``P + 0·W*ᵀW*`` when a test row couples
nodes outside it, as the Gaussian prediction does). ``likelihood(model(x_test))``
is the predictive distribution by Gauss–Hermite quadrature. The mode and ``P``
are computed once per hyperparameter values and reused across calls (the
cache is dropped by ``model.train()`` and whenever a parameter changes).
The predictive mean is differentiable in the mean module's parameters only
(``x̂`` is a constant there).

*Roads* for ``P`` (``road="auto"``, in this order): the exact banded
Cholesky (half-bandwidth within ``max_banded_bandwidth``, e.g. 1-D lattices),
CHOLMOD whenever scikit-sparse is installed (whatever
``logdet_defaults(method=...)`` says: Newton factorises ``P`` at every
iteration and the gradient needs its selected inverse, which only a
factorisation gives), a dense Cholesky for ``N ≤ dense_max_nodes`` (2048)
within ``max_dense_size``, else the Krylov road (CG solves, Hutchinson
probes for ``log det P`` and ``diag(W P⁻¹ Wᵀ)``: a stochastic objective and
gradient estimate, stated in ``gpsparse.core.laplace``). ``log det Q`` is
the kernel's closed form where it has one (lattices; graphs with their
spectrum), else the same road on ``Q``.
"""

from __future__ import annotations

from dataclasses import replace

import gpytorch
import torch
from gpytorch.distributions import MultivariateNormal
from torch import Tensor

from gpsparse.autograd.laplace import laplace_objective
from gpsparse.core.banded import bandwidth
from gpsparse.core.cholmod import cholmod_available
from gpsparse.core.config import LogdetConfig, SolverConfig
from gpsparse.core.laplace import (
    ConstraintSpace,
    KrylovOptions,
    LaplaceProblem,
    ModeState,
    NewtonOptions,
    find_mode,
    identity_pattern,
    posterior_structure,
)
from gpsparse.core.quadrature import rademacher
from gpsparse.kernels.base import is_sparse_precision_kernel
from gpsparse.kernels.intrinsic import IntrinsicAdditiveKernel, _IntrinsicKernel
from gpsparse.likelihoods.base import LaplaceLikelihood
from gpsparse.linalg import dispatch
from gpsparse.linalg.config import road_config
from gpsparse.linalg.variance import couples_outside, pattern_with_pairs
from gpsparse.operators.constrained import ConstrainedPrecisionLinearOperator, constrained_logdet
from gpsparse.operators.known_logdet import KnownLogdetSparseLinearOperator
from gpsparse.operators.precision import SparsePrecisionLinearOperator
from gpsparse.operators.sparse import SparseLinearOperator

__all__ = ["LaplaceGP", "ROAD_CHOICES", "is_intrinsic_kernel"]

#: ``road`` values of ``LaplaceGP``.
ROAD_CHOICES = ("auto", "banded", "cholesky", "dense", "krylov")
#: ``road="auto"`` takes the dense road for at most this many latent nodes when neither banded nor CHOLMOD applies.
DENSE_MAX_NODES = 2048


def is_intrinsic_kernel(kernel: gpytorch.kernels.Kernel) -> bool:
    """Whether ``kernel`` is an intrinsic GMRF kernel (random walk, Besag, BYM2) or a sum holding one."""
    while isinstance(kernel, gpytorch.kernels.ScaleKernel):
        kernel = kernel.base_kernel
    return isinstance(kernel, (_IntrinsicKernel, IntrinsicAdditiveKernel))


def _prior_operator(prior: MultivariateNormal):
    """The prior's covariance as a ``SparsePrecisionLinearOperator`` or ``ConstrainedPrecisionLinearOperator``."""
    op = prior.lazy_covariance_matrix
    op = op.evaluate_kernel() if hasattr(op, "evaluate_kernel") else op
    if isinstance(op, ConstrainedPrecisionLinearOperator) and op.is_symmetric:
        return op
    if not isinstance(op, SparsePrecisionLinearOperator) or not op.is_symmetric or op.sign < 0:
        raise TypeError(
            "the Laplace approximation needs a prior covariance W Q⁻¹ Wᵀ (a SparsePrecisionLinearOperator from "
            "a gpsparse sparse-precision kernel, or a ConstrainedPrecisionLinearOperator from an intrinsic one), "
            f"got {type(op).__name__}"
        )
    return op


class LaplaceGP(gpytorch.models.GP):
    r"""A latent GMRF with a non-Gaussian likelihood, inferred by the Laplace approximation (module docstring).

    Parameters
    ----------
    train_x : Tensor
        ``(n, d)`` training inputs (``(n,)`` is read as ``(n, 1)``).
    train_y : Tensor
        ``(n,)`` targets, validated by the likelihood (counts, labels).
    likelihood : LaplaceLikelihood
        [`PoissonLikelihood`][gpsparse.likelihoods.PoissonLikelihood],
        [`BernoulliLikelihood`][gpsparse.likelihoods.BernoulliLikelihood] or
        [`NegativeBinomialLikelihood`][gpsparse.likelihoods.NegativeBinomialLikelihood].
    mean_module : gpytorch.means.Mean, optional
        Prior mean ``μ(x)`` (default ``ConstantMean()``, a learnable intercept).
    covar_module : gpytorch.kernels.Kernel
        A sparse-precision kernel, possibly in ``ScaleKernel`` and sums
        (``gpsparse.kernels.is_sparse_precision_kernel``).
    road : {"auto", "banded", "cholesky", "dense", "krylov"}
        Road of the posterior precision (module notes).
    newton_tol : float
        Newton's tolerance on the step, relative to ``1 + ‖x‖∞`` (``NewtonOptions``).
    max_newton_iters : int
        Newton iterations before ``NonConvergenceError``.
    num_probes : int
        Rademacher probes of the Krylov road (fixed per model: the objective
        is then a deterministic function of the hyperparameters).
    probe_seed : int
        Seed of those probes.
    krylov_preconditioner : {"ic0", "jacobi", None}
        Preconditioner of the Krylov road's CG runs (Newton solves to ``rtol = 1e-8``,
        probe solves to ``1e-6``), rebuilt for every ``P``. IC(0) (default) was 6× faster
        than Jacobi on a 150² lattice Poisson model (13-point ``P``); use ``"jacobi"`` on CUDA.

    Notes
    -----
    Subclasses may override ``forward(x)`` (returning the prior
    ``MultivariateNormal`` with a sparse-precision covariance), as for an
    ``ExactGP``. Batched models (several fields at once) are not supported.

    Examples
    --------
    >>> import torch, gpytorch
    >>> from gpsparse.kernels import LatticeMaternKernel
    >>> from gpsparse.likelihoods import PoissonLikelihood
    >>> from gpsparse.mlls import LaplaceMarginalLogLikelihood
    >>> from gpsparse.models import LaplaceGP
    >>> x = torch.linspace(0, 1, 50, dtype=torch.float64).unsqueeze(-1)
    >>> y = torch.poisson(torch.exp(1.0 + torch.sin(6 * x[:, 0])))
    >>> kernel = gpytorch.kernels.ScaleKernel(LatticeMaternKernel([-0.2, 1.2], 57))
    >>> model = LaplaceGP(x, y, PoissonLikelihood(), covar_module=kernel).double()
    >>> mll = LaplaceMarginalLogLikelihood(model.likelihood, model)
    >>> loss = -mll(model(x), y)
    >>> loss.backward()
    >>> _ = model.eval()
    >>> with torch.no_grad():
    ...     rate = model.likelihood(model(x)).mean   # predictive mean counts
    >>> rate.shape
    torch.Size([50])
    """

    def __init__(
        self,
        train_x: Tensor,
        train_y: Tensor,
        likelihood: LaplaceLikelihood,
        mean_module: gpytorch.means.Mean | None = None,
        covar_module: gpytorch.kernels.Kernel | None = None,
        *,
        road: str = "auto",
        newton_tol: float = 1e-10,
        max_newton_iters: int = 100,
        num_probes: int = 64,
        probe_seed: int = 0,
        krylov_preconditioner: str | None = "ic0",
    ):
        super().__init__()
        if not isinstance(likelihood, LaplaceLikelihood):
            raise TypeError(
                "LaplaceGP needs a gpsparse.likelihoods likelihood with closed-form derivatives "
                f"(PoissonLikelihood, BernoulliLikelihood, NegativeBinomialLikelihood), got {type(likelihood).__name__}"
            )
        if covar_module is None:
            raise TypeError("LaplaceGP needs a covar_module (a gpsparse sparse-precision kernel)")
        if not (is_sparse_precision_kernel(covar_module) or is_intrinsic_kernel(covar_module)):
            raise TypeError(
                "LaplaceGP needs a sparse-precision covariance module (a gpsparse kernel returning W Q⁻¹ Wᵀ or an "
                "intrinsic GMRF kernel, possibly in ScaleKernel or sums of such kernels), got "
                f"{type(covar_module).__name__}"
            )
        if road not in ROAD_CHOICES:
            raise ValueError(f"road must be one of {ROAD_CHOICES}, got {road!r}")
        if road == "cholesky" and not cholmod_available():
            raise ImportError('road="cholesky" needs scikit-sparse (CHOLMOD): pip install "gpsparse[cholmod]"')
        self.likelihood = likelihood
        self.mean_module = gpytorch.means.ConstantMean() if mean_module is None else mean_module
        self.covar_module = covar_module
        self.road = road
        self.newton = NewtonOptions(tol=float(newton_tol), max_iters=int(max_newton_iters))
        self.krylov = KrylovOptions(
            solver=SolverConfig(rtol=1e-8, preconditioner=krylov_preconditioner),
            logdet=LogdetConfig(rtol=1e-6, preconditioner=krylov_preconditioner),
            num_probes=int(num_probes),
        )
        self.probe_seed = int(probe_seed)
        self._probes: Tensor | None = None
        self.laplace_state = ModeState()
        self._posterior_cache = None
        self._variance_cache = None
        self.set_train_data(train_x, train_y)

    # ------------------------------------------------------------------ data
    def set_train_data(self, inputs: Tensor, targets: Tensor) -> None:
        """Replace the training data (the stored mode is kept as a warm start when the latent size matches)."""
        if torch.is_tensor(inputs):
            inputs = (inputs,)
        self.train_inputs = tuple(i.unsqueeze(-1) if i.dim() == 1 else i for i in inputs)
        targets = self.likelihood.check_targets(targets)
        if targets.dim() != 1:
            raise ValueError(f"train_y must be 1-D (one target per input), got shape {tuple(targets.shape)}")
        if targets.shape[0] != self.train_inputs[0].shape[-2]:
            raise ValueError(f"{targets.shape[0]} targets for {self.train_inputs[0].shape[-2]} inputs")
        self.train_targets = targets
        self._posterior_cache = None

    def _apply(self, fn):
        # .double(), .to(device): move the data with the parameters (as ExactGP does).
        self.train_inputs = tuple(fn(i) for i in self.train_inputs)
        self.train_targets = fn(self.train_targets)
        self._posterior_cache = None
        return super()._apply(fn)

    # ------------------------------------------------------------------ GPyTorch protocol
    def forward(self, x: Tensor) -> MultivariateNormal:
        return MultivariateNormal(self.mean_module(x), self.covar_module(x))

    def train(self, mode: bool = True):
        self._posterior_cache = None
        self._variance_cache = None
        return super().train(mode)

    def __call__(self, *args, **kwargs):
        inputs = [i.unsqueeze(-1) if i.dim() == 1 else i for i in args]
        if self.training:
            if gpytorch.settings.debug.on() and not all(
                torch.equal(a, b) for a, b in zip(self.train_inputs, inputs, strict=True)
            ):
                raise RuntimeError("You must train on the training inputs!")
            return super().__call__(*inputs, **kwargs)
        if gpytorch.settings.prior_mode.on():
            return super().__call__(*inputs, **kwargs)
        return self.predict(*inputs)

    # ------------------------------------------------------------------ the Laplace problem
    def laplace_problem(self, prior: MultivariateNormal, target: Tensor):
        """``(problem, q_values, mean, likelihood_params, Q)`` for the prior at the training inputs.

        ``Q`` and ``W`` come from the prior's covariance (a sparse-precision
        operator); ``problem`` (``gpsparse.core.laplace.LaplaceProblem``) holds
        the structure of ``P``, the road, the likelihood's closed forms and
        this model's ``laplace_state`` (the warm start).
        """
        op = _prior_operator(prior)
        Q = op.Q
        if Q.batch_shape != torch.Size() or prior.mean.dim() != 1:
            raise NotImplementedError("LaplaceGP handles one field: batched kernels or means are not supported")
        m = prior.mean.shape[-1]
        if op.interp is None:
            w_pattern = identity_pattern(Q.shape[-1], Q.device)
            w_values = torch.ones(Q.shape[-1], dtype=torch.float64, device=Q.device)
        else:
            w_pattern, w_values = op.interp.pattern, op.interp.values.detach().to(torch.float64)
        structure = posterior_structure(Q.pattern, w_pattern)
        road = self._choose_road(structure, isinstance(op, ConstrainedPrecisionLinearOperator))
        space = None
        if isinstance(op, ConstrainedPrecisionLinearOperator):
            space = ConstraintSpace(op.constraints.basis(torch.float64, Q.device), op.constraints.pivots.to(Q.device))
        y = self.likelihood.check_targets(target).to(device=Q.device, dtype=torch.float64)
        if y.shape != (m,):
            raise ValueError(f"the targets have shape {tuple(y.shape)} but the model has {m} training points")
        offset = self.likelihood.training_offset(m)
        offset = None if offset is None else offset.to(device=Q.device, dtype=torch.float64)
        likelihood = self.likelihood

        def terms(f: Tensor, params: tuple):
            return likelihood.closed_forms(f, y, params, offset)

        problem = LaplaceProblem(
            structure=structure,
            w_values=w_values,
            terms=terms,
            road=road,
            newton=self.newton,
            krylov=self.krylov,
            probes=self._krylov_probes(structure.num_nodes, Q.device) if road == "krylov" else None,
            state=self.laplace_state,
            constraints=space,
        )
        return problem, Q.values, prior.mean, likelihood.laplace_parameters(), Q

    def _choose_road(self, structure, constrained: bool = False) -> str:
        n = structure.num_nodes
        config = road_config(symmetric=True, num_rows=n, dense_max_rows=DENSE_MAX_NODES)
        if self.road == "auto":
            config = replace(config, cholesky=cholmod_available())
            road = dispatch.choose_road(structure.pattern, config, logdet=True)
            if road == "krylov" and constrained and n * n <= config.max_dense_size:
                return "dense"  # the constrained approximation has exact roads only
            return road
        if self.road == "banded" and bandwidth(structure.pattern) > max(config.max_banded_bandwidth, 1):
            raise ValueError(
                f'road="banded" needs a half-bandwidth ≤ max_banded_bandwidth = {config.max_banded_bandwidth}, '
                f"got {bandwidth(structure.pattern)}"
            )
        if self.road == "dense" and n * n > config.max_dense_size:
            raise ValueError(
                f'road="dense" would form a {n} × {n} matrix, above gpsparse.settings.max_dense_size = '
                f"{config.max_dense_size:,}"
            )
        return self.road

    def _krylov_probes(self, n: int, device) -> Tensor:
        if self._probes is None or self._probes.shape[0] != n or self._probes.device != torch.device(device):
            gen = torch.Generator().manual_seed(self.probe_seed)
            self._probes = rademacher((n, self.krylov.num_probes), generator=gen, dtype=torch.float64, device="cpu")
            self._probes = self._probes.to(device)
        return self._probes

    def prior_logdet(self, Q: SparseLinearOperator, road: str, prior_op=None) -> Tensor:
        """``log det Q`` (``log det_S Q`` under constraints): the closed form where known, else the road's.

        ``prior_op`` is the prior covariance operator; a constrained one gives
        its ``pseudo_logdet`` or, without one, the completion of ``Q``
        (``gpsparse.operators.constrained.constrained_logdet``). Differentiable.
        """
        if isinstance(prior_op, ConstrainedPrecisionLinearOperator):
            return constrained_logdet(prior_op)
        if isinstance(Q, KnownLogdetSparseLinearOperator):
            return Q.known_logdet
        n = Q.shape[-1]
        config = road_config(symmetric=True, num_rows=n, dense_max_rows=n if road == "dense" else 0)
        config = replace(config, road=road, cholesky=road == "cholesky")
        return dispatch.logdet(Q.values, Q.pattern, config)

    def laplace_log_marginal(self, prior: MultivariateNormal, target: Tensor) -> Tensor:
        """The Laplace approximation of ``log p(y | θ)`` (differentiable; what the mll returns before priors)."""
        problem, q_values, mean, params, Q = self.laplace_problem(prior, target)
        value = laplace_objective(problem, q_values, mean, params)
        if problem.road == "krylov":  # the objective already holds −½(log det P − log det Q), one set of probes
            return value
        return value + 0.5 * self.prior_logdet(Q, problem.road, _prior_operator(prior)).to(value)

    # ------------------------------------------------------------------ prediction
    def _parameter_key(self) -> tuple:
        return tuple(p.detach().clone() for p in self.parameters())

    def _same_key(self, key) -> bool:
        cached = self._posterior_cache
        if cached is None or len(cached["key"]) != len(key):
            return False
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(cached["key"], key))

    def posterior(self) -> dict:
        """The Laplace posterior at the current hyperparameters: ``{"mode", "precision", "Q", "iterations"}``.

        ``mode`` is ``x̂`` ``(N,)`` and ``precision`` the SparseLinearOperator
        ``P = Q + Wᵀ H(f̂) W`` (detached). Cached per parameter values.
        """
        key = self._parameter_key()
        if self._same_key(key):
            return self._posterior_cache
        with torch.no_grad():
            prior = self.forward(*self.train_inputs)
            problem, q_values, mean, params, Q = self.laplace_problem(prior, self.train_targets)
            result = find_mode(problem, q_values, mean, params)
            dtype = q_values.dtype
            precision = SparseLinearOperator(result.p_values.to(dtype), pattern=problem.structure.pattern)
        self._posterior_cache = {
            "key": key,
            "mode": result.x.to(dtype),
            "precision": precision,
            "Q": Q,
            "iterations": result.iterations,
            "road": problem.road,
        }
        self._variance_cache = None
        return self._posterior_cache

    def predict(self, x: Tensor) -> MultivariateNormal:
        """``N(μ* + W* x̂, W* P⁻¹ W*ᵀ)`` at ``x`` (module notes); what ``model(x)`` returns in eval mode."""
        post = self.posterior()
        test_mean = self.mean_module(x)
        cross = self.covar_module(x, *self.train_inputs)
        cross = cross.evaluate_kernel() if hasattr(cross, "evaluate_kernel") else cross
        constrained = isinstance(cross, ConstrainedPrecisionLinearOperator)
        if not (constrained or isinstance(cross, SparsePrecisionLinearOperator)):
            raise TypeError(f"expected a sparse-precision cross-covariance, got {type(cross).__name__}")
        Q = post["Q"]
        if cross.Q.shape != Q.shape or cross.Q.pattern.nnz != Q.pattern.nnz:
            raise NotImplementedError(
                "LaplaceGP predicts with kernels whose latent nodes do not depend on the inputs (lattices, graphs); "
                "this kernel builds other nodes for the test inputs"
            )
        w_test = cross.interp
        mode = post["mode"].to(test_mean)
        latent = mode if w_test is None else w_test._matmul(mode.unsqueeze(-1)).squeeze(-1)
        mean = test_mean + latent
        if constrained:  # W* Σ_P W*ᵀ: the constrained posterior covariance
            covar = ConstrainedPrecisionLinearOperator(post["precision"], cross.constraints, interp=w_test)
        else:
            covar = SparsePrecisionLinearOperator(self._variance_precision(post["precision"], w_test), interp=w_test)
        return MultivariateNormal(mean, covar)

    def _variance_precision(self, precision: SparseLinearOperator, w_test) -> SparseLinearOperator:
        """``P`` on the pattern of ``P + 0·W*ᵀW*`` when ``W*`` couples nodes outside ``P`` (exact roads only)."""
        if w_test is None:
            return precision
        cached = self._variance_cache
        if cached is not None and cached[0] is w_test.pattern and cached[1] is precision:
            return cached[2]
        widened = precision
        if couples_outside(precision.pattern, w_test):
            values, pattern = pattern_with_pairs(precision.values, precision.pattern, w_test)
            candidate = SparseLinearOperator(values, pattern=pattern)
            if cholmod_available() or candidate.road(logdet=False) == "banded":
                widened = candidate
        self._variance_cache = (w_test.pattern, precision, widened)
        return widened

    @property
    def newton_iterations(self) -> int:
        """Newton iterations of the last mode computation (training or prediction)."""
        return self.laplace_state.iterations

    def extra_repr(self) -> str:
        return f"road={self.road!r}, newton_tol={self.newton.tol:g}, max_newton_iters={self.newton.max_iters}"
