"""The objective an entry trains with: which Pyro ELBO, and how many samples of the latents per step.

``train.objective = "elbo"`` with ``train.particles = k`` averages k samples of the ELBO's estimator;
the ELBO class follows from the model and guide:

- ``TraceEnum_ELBO`` where a discrete site is enumerated (M2's y, gmm-vae's c, CCVAE's y);
- ``TraceMeanField_ELBO`` where every continuous latent is a Gaussian against a Gaussian prior (the KL
  in closed form);
- ``Trace_ELBO`` otherwise (a low-rank or flow z-guide: the KL by Monte Carlo).

``train.objective = "iwae"`` is the importance-weighted bound of Burda et al. (2016, eq. 8),

    L_k(x) = E[ log 1/k sum_i p(x, z_i) / q(z_i|x) ],  z_1..k ~ q(z|x),

Pyro's :class:`~pyro.infer.RenyiELBO` with alpha = 0 (per example: Pyro keeps the data plate apart).
It needs reparameterised latents only, hence no enumerated sites.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_identically_zero, torch_sum, get_dependent_plate_dims

OBJECTIVES = ("elbo", "iwae")


@dataclass(frozen=True)
class Objective:
    """``train.objective`` and ``train.particles``, as an entry builds its ELBOs from them."""

    name: str = "elbo"
    particles: int = 1


class IWAE_ELBO(RenyiELBO):
    """RenyiELBO with alpha = 0 (the IWAE bound) and the ``differentiable_loss`` that Pyro's class lacks,
    so it can train an ``ELBOModule`` and a loss module with ``torch.optim``.

    With reparameterised sites only, the surrogate of RenyiELBO's gradient is the bound itself:
    d/dphi log 1/k sum_i w_i = sum_i (w_i / sum_j w_j) d/dphi log w_i.
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1):
        super().__init__(alpha=0, num_particles=num_particles, max_plate_nesting=max_plate_nesting,
                         vectorize_particles=num_particles > 1)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_weights = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] != "sample":
                        continue
                    if sign < 0 and not is_identically_zero(site["score_parts"].score_function):
                        raise ValueError(f"the IWAE objective needs reparameterised sites; '{site['name']}' is not")
                    log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
            log_weights.append(log_w)
        if self.vectorize_particles and self.num_particles > 1:
            log_weights = log_weights[0]
        else:
            log_weights = torch.stack(log_weights)
        return -(torch.logsumexp(log_weights, dim=0) - math.log(self.num_particles)).sum()


def particle_settings(objective: Objective | None) -> dict:
    """An ELBO's particle arguments: ``objective.particles`` samples per example, vectorised."""
    k = (objective or Objective()).particles
    return {"num_particles": k, "vectorize_particles": k > 1, "max_plate_nesting": 1}


def make_elbo(objective: Objective | None, enumerated: bool = False, analytic_kl: bool = True) -> ELBO:
    """The Pyro ELBO for a model/guide pair: ``enumerated`` when a discrete site is summed out,
    ``analytic_kl`` when every latent's KL to its prior is known in closed form."""
    o = objective or Objective()
    if o.name == "iwae":
        if enumerated:
            raise ValueError("the IWAE objective cannot enumerate a discrete site")
        return IWAE_ELBO(num_particles=o.particles)
    kwargs = particle_settings(o)
    if enumerated:
        return TraceEnum_ELBO(**kwargs)
    return TraceMeanField_ELBO(**kwargs) if analytic_kl else Trace_ELBO(**kwargs)
