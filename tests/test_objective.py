"""The objective switch: which Pyro ELBO an entry gets, k-sample ELBOs, and the IWAE bound, checked on a
conjugate model where log p(x) is known in closed form."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrossl.infer.objective import IWAE_ELBO, Objective, make_elbo


class Conjugate(nn.Module):
    """z ~ N(0, 1), x ~ N(z, 1): log p(x) = log N(x; 0, 2), posterior N(x / 2, 1/2)."""

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)


class Guide(nn.Module):
    def __init__(self, shift=0.0, log_scale=0.0):
        super().__init__()
        self.shift = nn.Parameter(torch.tensor(shift))
        self.log_scale = nn.Parameter(torch.tensor(log_scale))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2 + self.shift, self.log_scale.exp()))


X = torch.tensor([0.3, -1.2, 2.0])
LOG_PX = dist.Normal(0.0, math.sqrt(2.0)).log_prob(X).sum()


@pytest.mark.parametrize("k", [1, 5])
def test_with_the_exact_posterior_every_estimate_is_log_p_x(k):
    exact = Guide(0.0, 0.5 * math.log(0.5))
    for elbo in (make_elbo(Objective("elbo", k), analytic_kl=False), make_elbo(Objective("iwae", k))):
        assert -elbo.differentiable_loss(Conjugate(), exact, X).item() == pytest.approx(LOG_PX.item(), abs=1e-4)


def test_iwae_bound_tightens_with_k_and_stays_below_log_p_x():
    pyro.set_rng_seed(0)
    poor = Guide(0.8, 0.3)
    bounds = [
        -sum(IWAE_ELBO(num_particles=k).differentiable_loss(Conjugate(), poor, X).item() for _ in range(200)) / 200
        for k in (1, 4, 32)
    ]
    assert bounds[0] < bounds[1] < bounds[2] < LOG_PX.item()
    # k = 1 is the ELBO: the same draw gives the same number
    pyro.set_rng_seed(2)
    one = IWAE_ELBO(num_particles=1).differentiable_loss(Conjugate(), poor, X).item()
    pyro.set_rng_seed(2)
    assert one == pytest.approx(Trace_ELBO().differentiable_loss(Conjugate(), poor, X).item(), rel=1e-6)


def test_iwae_value_is_renyi_elbo_s_and_its_gradient_reaches_module_parameters():
    guide = Guide(0.5, 0.2)
    pyro.set_rng_seed(1)
    loss = IWAE_ELBO(num_particles=8).differentiable_loss(Conjugate(), guide, X)
    loss.backward()
    assert guide.shift.grad.abs() > 0 and guide.log_scale.grad.abs() > 0
    pyro.set_rng_seed(1)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    assert renyi.loss(Conjugate(), guide, X) == pytest.approx(loss.item(), rel=1e-5)


def test_the_elbo_class_follows_the_model_and_guide():
    assert type(make_elbo(Objective(), enumerated=True)) is TraceEnum_ELBO
    assert type(make_elbo(Objective(), analytic_kl=True)) is TraceMeanField_ELBO
    assert type(make_elbo(Objective(), analytic_kl=False)) is Trace_ELBO
    assert make_elbo(Objective("elbo", 4)).num_particles == 4 and make_elbo(Objective("elbo", 4)).vectorize_particles
    with pytest.raises(ValueError, match="enumerate"):
        make_elbo(Objective("iwae", 4), enumerated=True)


def test_iwae_refuses_a_score_function_site():
    class Discrete(nn.Module):
        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                pyro.sample("c", dist.Bernoulli(0.5))

    with pytest.raises(ValueError, match="reparameterised"):
        IWAE_ELBO(num_particles=2).differentiable_loss(Discrete(), Discrete(), X)
