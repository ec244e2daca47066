import math

import pytest
import torch
from torch.distributions import OneHotCategorical, RelaxedOneHotCategorical, kl_divergence

from pyrossl.infer.relaxed import ConcreteLabel, LogisticNormalLabel


def test_concrete_log_prob_matches_torch_where_torch_is_finite():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    for t in (2.0, 0.7):
        ours = ConcreteLabel(t, logits)
        y = ours.rsample()
        reference = RelaxedOneHotCategorical(torch.tensor(t), logits=logits).log_prob(y)
        assert torch.allclose(ours.log_prob(y), reference, atol=1e-3, rtol=1e-4)


def test_concrete_is_finite_where_torch_underflows():
    """Pyro issue 3304: at low temperature a sample coordinate underflows to 0 and torch gives NaN."""
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 5
    ours = ConcreteLabel(0.01, logits)
    y = ours.rsample()
    assert (y == 0).any()  # the case that breaks torch's density
    assert torch.isfinite(ours.log_prob(y)).all()


def test_concrete_density_integrates_to_one_on_two_classes():
    """K = 2: the density of y_1 on (0, 1) must integrate to 1 (the simplex is one-dimensional)."""
    d = ConcreteLabel(1.5, torch.tensor([0.3, -0.4]))  # t > 1: the density vanishes at the edges
    y1 = torch.linspace(1e-4, 1 - 1e-4, 20001, dtype=torch.float64)
    y = torch.stack([y1, 1 - y1], -1).float()
    # density w.r.t. the Lebesgue measure on the first coordinate
    integral = torch.trapezoid(d.log_prob(y).double().exp(), y1)
    assert integral.item() == pytest.approx(1.0, abs=2e-3)


def test_logistic_normal_density_integrates_to_one_on_two_classes():
    d = LogisticNormalLabel(torch.tensor([0.5, -0.2]), sigma=0.8, sharpness=1.5)
    y1 = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    y = torch.stack([y1, 1 - y1], -1).float()
    integral = torch.trapezoid(d.log_prob(y).double().exp(), y1)
    assert integral.item() == pytest.approx(1.0, abs=2e-3)


def test_logistic_normal_log_prob_matches_a_direct_change_of_variables():
    """K = 3: v = log(y_1:2 / y_3) / s ~ N(mu, sigma^2 (I + 11^T)); Jacobian of v -> y_1:2 by autograd."""
    torch.manual_seed(1)
    logits, sigma, sharp = torch.randn(3, dtype=torch.float64), 0.7, 1.3
    d = LogisticNormalLabel(logits, sigma, sharp)
    y = d.rsample()
    mu = logits[:2] - logits[2]
    cov = sigma**2 * (torch.eye(2, dtype=torch.float64) + 1)
    to_v = lambda y12: torch.log(y12 / (1 - y12.sum())) / sharp  # noqa: E731
    jac = torch.autograd.functional.jacobian(to_v, y[:2])
    expected = torch.distributions.MultivariateNormal(mu, cov).log_prob(to_v(y[:2])) + torch.logdet(jac)
    assert torch.allclose(d.log_prob(y), expected, atol=1e-8)


@pytest.mark.parametrize(
    "make",
    [
        lambda logits: ConcreteLabel(0.5, logits),
        lambda logits: ConcreteLabel(0.5, logits, straight_through=True),
        lambda logits: LogisticNormalLabel(logits, 1.0, 2.0),
    ],
)
def test_kl_to_a_categorical_is_the_categorical_kl(make):
    logits = torch.randn(5, 4)
    prior = OneHotCategorical(logits=torch.zeros(5, 4))
    expected = kl_divergence(OneHotCategorical(logits=logits), prior)
    assert torch.allclose(kl_divergence(make(logits), prior), expected, atol=1e-6)


def test_straight_through_is_one_hot_forward_with_a_gradient():
    logits = torch.randn(8, 5, requires_grad=True)
    y = ConcreteLabel(0.5, logits, straight_through=True).rsample()
    assert torch.allclose(y.sum(-1), torch.ones(8))
    assert torch.allclose(y, torch.nn.functional.one_hot(y.argmax(-1), 5).float(), atol=1e-6)
    (y * torch.arange(5.0)).sum().backward()
    assert logits.grad.abs().sum() > 0


def test_samples_are_on_the_simplex_and_expand():
    d = LogisticNormalLabel(torch.randn(4), 1.0, 1.0).expand((3, 2))
    y = d.rsample((7,))
    assert y.shape == (7, 3, 2, 4) and torch.allclose(y.sum(-1), torch.ones(7, 3, 2))
    assert ConcreteLabel(1.0, torch.randn(4)).expand((3,)).batch_shape == (3,)
    assert math.isclose(ConcreteLabel(1.0, torch.zeros(3)).mean.sum().item(), 1.0, rel_tol=1e-6)


def _gaussian_argmax_probs(logits, sigma):
    """P(argmax_k (logits_k + sigma eps_k) = k), eps ~ N(0, I): int phi(t) prod_j Phi(t + (l_k - l_j) / sigma) dt."""
    normal = torch.distributions.Normal(0.0, 1.0)
    t = torch.linspace(-10, 10, 20001, dtype=torch.float64)
    scaled = logits.double() / sigma
    probs = []
    for k in range(len(scaled)):
        integrand = normal.log_prob(t).exp()
        for j in range(len(scaled)):
            if j != k:
                integrand = integrand * normal.cdf(t + scaled[k] - scaled[j])
        probs.append(torch.trapezoid(integrand, t))
    return torch.stack(probs)


def test_logistic_normal_class_law_is_not_the_softmax_its_kl_uses():
    """The docstrings' claim: the class a LogisticNormalLabel sample points to (its argmax) follows the
    Gaussian argmax law, not softmax(logits), so the registered KL (that of Cat(softmax(logits))) is a
    surrogate, not the KL of what the guide draws."""
    torch.manual_seed(0)
    logits = torch.tensor([0.3, -1.2, 0.7])
    exact = _gaussian_argmax_probs(logits, 1.0)
    n = 400_000
    for sharpness in (1.0, 3.0):  # the argmax does not depend on the sharpness
        y = LogisticNormalLabel(logits, sigma=1.0, sharpness=sharpness).rsample((n,))
        freq = torch.bincount(y.argmax(-1), minlength=3).double() / n
        assert torch.allclose(freq, exact, atol=4e-3), (freq, exact)  # 4 standard errors at most
    # measured: (0.373, 0.038, 0.589) against softmax (0.368, 0.082, 0.549)
    assert torch.allclose(exact, torch.tensor([0.373, 0.038, 0.589], dtype=torch.float64), atol=2e-3)
    softmax = logits.softmax(-1).double()
    assert (freq - softmax).abs().max() > 0.03
    prior = OneHotCategorical(logits=torch.zeros(3))
    surrogate = kl_divergence(LogisticNormalLabel(logits, 1.0, 1.0), prior)
    assert surrogate == pytest.approx(kl_divergence(OneHotCategorical(probs=softmax.float()), prior).item(), abs=1e-6)
    of_the_class_drawn = kl_divergence(OneHotCategorical(probs=exact.float()), prior)
    assert abs(surrogate - of_the_class_drawn) > 0.03
