r"""``LaplaceMarginalLogLikelihood``: the Laplace approximation of ``log p(y | θ)`` with its exact gradient.

For a [`LaplaceGP`][gpsparse.models.LaplaceGP] (latent ``f = μ + W x``,
``x ~ N(0, Q⁻¹)`` a GMRF, a factorising likelihood ``ℓ_i = log p(y_i | f_i)``),

$$
\log p(y \mid θ) \approx \sum_i ℓ_i(\hat f_i) − \tfrac12 \hat x^\top Q \hat x
+ \tfrac12 \log\det Q − \tfrac12 \log\det\bigl(Q + W^\top H W\bigr),
\qquad H = \operatorname{diag}\bigl(−ℓ''(\hat f)\bigr),
$$

at the mode ``x̂`` (Newton on the sparse ``P = Q + WᵀHW``, warm-started from the
previous call's mode, ``model.laplace_state``). Its gradient with respect to
every hyperparameter — the kernel's (through the values of ``Q``), the
likelihood's (e.g. the negative-binomial dispersion) and the mean's — is the
exact gradient of this approximation, by implicit differentiation through
the mode, including the third-derivative term of ``log det P``
(``gpsparse.autograd.laplace``; ``docs/mathematics.md``, "Laplace
approximation"). So the unchanged GPyTorch loop trains it:

    mll = LaplaceMarginalLogLikelihood(likelihood, model)
    loss = -mll(model(train_x), train_y)
    loss.backward()
    optimizer.step()

Unlike ``gpytorch.mlls.ExactMarginalLogLikelihood``, the value is **not**
divided by the number of observations (``normalize=True`` divides). Log
priors of the hyperparameters (``register_prior``) are added, as GPyTorch does.

Exact on the banded, CHOLMOD and dense roads (``LaplaceGP``'s ``road``); on the
Krylov road ``log det P`` is a Hutchinson/Lanczos estimate from the model's fixed
probes and the gradient's selected-inverse terms are Hutchinson estimates
from the same probes (``gpsparse.core.laplace``).
"""

from __future__ import annotations

import gpytorch
from gpytorch.distributions import MultivariateNormal

from gpsparse.likelihoods.base import LaplaceLikelihood
from gpsparse.models.laplace import LaplaceGP

__all__ = ["LaplaceMarginalLogLikelihood"]


class LaplaceMarginalLogLikelihood(gpytorch.mlls.MarginalLogLikelihood):
    """The Laplace approximation of ``log p(y | θ)`` of a ``LaplaceGP`` (module docstring).

    Parameters
    ----------
    likelihood : LaplaceLikelihood
        The model's likelihood.
    model : LaplaceGP
        The model.
    normalize : bool
        Divide by the number of observations (as GPyTorch's exact MLL does); default False.

    Attributes
    ----------
    newton_iterations : int
        Newton iterations of the last call (0 when the warm start was already the mode).
    """

    def __init__(self, likelihood: LaplaceLikelihood, model: LaplaceGP, *, normalize: bool = False):
        if not isinstance(model, LaplaceGP):
            raise TypeError(
                f"LaplaceMarginalLogLikelihood needs a gpsparse.models.LaplaceGP, got {type(model).__name__}"
            )
        if not isinstance(likelihood, LaplaceLikelihood):
            raise TypeError(
                "LaplaceMarginalLogLikelihood needs a gpsparse.likelihoods likelihood, got " + type(likelihood).__name__
            )
        if model.likelihood is not likelihood:
            raise ValueError("the likelihood must be the model's (model.likelihood)")
        super().__init__(likelihood, model)
        self.normalize = bool(normalize)

    @property
    def newton_iterations(self) -> int:
        return self.model.laplace_state.iterations

    def forward(self, function_dist: MultivariateNormal, target, *params, **kwargs):
        """The approximate log marginal likelihood of ``target`` under the prior ``function_dist = model(train_x)``."""
        if not isinstance(function_dist, MultivariateNormal):
            raise TypeError("LaplaceMarginalLogLikelihood needs the model's prior MultivariateNormal, model(train_x)")
        if params or kwargs:
            raise TypeError(
                "LaplaceMarginalLogLikelihood takes no extra likelihood arguments (give exposures to the likelihood)"
            )
        value = self.model.laplace_log_marginal(function_dist, target)
        for _, module, prior, closure, _ in self.model.named_priors():
            value = value + prior.log_prob(closure(module)).sum()
        if self.normalize:
            value = value / target.shape[-1]
        return value
