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

Every ELBO here keeps Pyro's contract: ``loss``, ``loss_and_grads`` and ``differentiable_loss`` give the
same value for the same random draws (:class:`DifferentiableLossELBO`), so ``pyro.infer.SVI`` and the
zoo's trainer optimise the same objective. Observed guide sites marked ``infer={"is_auxiliary": True}``
add their (scaled) log-probability to the objective (:class:`AuxiliaryTermsMixin`): a supervised term
of the guide such as M2's alpha log q(y|x), the pattern of ``pyro.contrib.cevae.TraceCausalEffect_ELBO``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.util import get_dependent_plate_dims, is_identically_zero, torch_item, torch_sum

OBJECTIVES = ("elbo", "iwae")


@dataclass(frozen=True)
class Objective:
    """``train.objective`` and ``train.particles``, as an entry builds its ELBOs from them."""

    name: str = "elbo"
    particles: int = 1


class DifferentiableLossELBO(ELBO):
    """An ELBO defined by its ``differentiable_loss`` alone: ``loss`` is its value and ``loss_and_grads``
    its value and gradient, so the three agree for the same random draws (what ``pyro.infer.SVI.step``
    calls is what the trainer differentiates). A subclass that does not trace through Pyro's
    per-particle machinery also defines ``_get_trace`` (raising)."""

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if torch.is_tensor(loss) and loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


def auxiliary_terms(guide_trace) -> list[str]:
    """The observed guide sites marked ``is_auxiliary``: terms of the objective, not latents."""
    return [
        name
        for name, site in guide_trace.nodes.items()
        if site["type"] == "sample" and site["is_observed"] and site["infer"].get("is_auxiliary")
    ]


class AuxiliaryTermsMixin:
    """For ``Trace_ELBO`` / ``TraceMeanField_ELBO``: the objective of each particle is the ELBO of the
    guide without its observed auxiliary sites, plus their log-probabilities with their scales,

        ELBO(x) + sum_a scale_a log q(obs_a | ...),

    e.g. M2's labelled term L(x, y) + alpha log q(y|x) (Kingma et al. 2014, eq. 9) when the guide scores
    the observed label at a site scaled by alpha."""

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        names = auxiliary_terms(guide_trace)
        if not names:
            return super()._differentiable_loss_particle(model_trace, guide_trace)
        latent_trace = guide_trace.copy()
        for name in names:
            latent_trace.remove_node(name)
        loss, surrogate_loss = super()._differentiable_loss_particle(model_trace, latent_trace)
        log_q = sum(guide_trace.nodes[name]["log_prob_sum"] for name in names)
        return loss - torch_item(log_q), surrogate_loss - log_q

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The value of :meth:`differentiable_loss` (``Trace_ELBO.loss`` would score the auxiliary sites
        as latents of the guide, with the opposite sign)."""
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss += torch_item(self._differentiable_loss_particle(model_trace, guide_trace)[0]) / self.num_particles
        return loss


class LabelledMeanField_ELBO(AuxiliaryTermsMixin, TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` with the guide's observed auxiliary sites as terms (:class:`AuxiliaryTermsMixin`)."""


class DispatchingELBO(DifferentiableLossELBO):
    """An ELBO that hands each call to one of several ELBOs, chosen by :meth:`choose` from the model and
    the batch: ``loss``, ``loss_and_grads`` and ``differentiable_loss`` all go to the same one."""

    def choose(self, model, guide, *args, **kwargs) -> ELBO:
        raise NotImplementedError

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} delegates to the ELBO that choose() picks")

    def differentiable_loss(self, model, guide, *args, **kwargs):
        return self.choose(model, guide, *args, **kwargs).differentiable_loss(model, guide, *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs):
        return self.choose(model, guide, *args, **kwargs).loss(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs):
        return self.choose(model, guide, *args, **kwargs).loss_and_grads(model, guide, *args, **kwargs)


class SemiSupervisedELBO(DispatchingELBO):
    """The objective of a model ``model(x, y=None)`` whose guide takes the same arguments:
    ``(model, guide, x)`` is scored by the unlabelled bound (the ELBO ``unlabelled``, which may
    enumerate or relax y) and ``(model, guide, x, y)`` by the labelled one (``labelled``), each summed
    over the batch. The zoo's trainer adds the two per-example means."""

    def __init__(self, unlabelled: ELBO, labelled: ELBO):
        super().__init__(
            num_particles=unlabelled.num_particles,
            max_plate_nesting=1,
            vectorize_particles=unlabelled.vectorize_particles,
        )
        self.unlabelled, self.labelled = unlabelled, labelled

    def choose(self, model, guide, x=None, y=None, *args, **kwargs):
        return self.unlabelled if y is None else self.labelled


class IWAE_ELBO(DifferentiableLossELBO, RenyiELBO):
    """RenyiELBO with alpha = 0 (the IWAE bound) and the ``differentiable_loss`` that Pyro's class lacks,
    so it can train an ``ELBOModule`` and a loss module with ``torch.optim``.

    With reparameterised sites only, the surrogate of RenyiELBO's gradient is the bound itself:
    d/dphi log 1/k sum_i w_i = sum_i (w_i / sum_j w_j) d/dphi log w_i.
    ``loss`` is the same bound (:class:`DifferentiableLossELBO`). Observed auxiliary guide sites are
    terms outside the bound: -(L_k(x) + mean over particles of their scaled log-probabilities).
    """

    def __init__(self, num_particles: int = 2, max_plate_nesting: int = 1):
        super().__init__(
            alpha=0,
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=num_particles > 1,
        )

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        log_weights, auxiliary = [], 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w = 0.0
            terms = auxiliary_terms(guide_trace)
            for name in terms:
                auxiliary = auxiliary + guide_trace.nodes[name]["log_prob"].sum()
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] != "sample" or (sign < 0 and site["name"] in terms):
                        continue
                    if sign < 0 and not is_identically_zero(site["score_parts"].score_function):
                        raise ValueError(f"the IWAE objective needs reparameterised sites; '{site['name']}' is not")
                    log_w = log_w + sign * torch_sum(site["log_prob"], sum_dims)
            log_weights.append(log_w)
        if self.vectorize_particles and self.num_particles > 1:
            log_weights = log_weights[0]
        else:
            log_weights = torch.stack(log_weights)
        bound = (torch.logsumexp(log_weights, dim=0) - math.log(self.num_particles)).sum()
        return -(bound + auxiliary / self.num_particles)


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
