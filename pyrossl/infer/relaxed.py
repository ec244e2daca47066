"""Reparameterised relaxations of a categorical label q(y|x) = Cat(softmax(logits)).

Each distribution here lives on the probability simplex and draws differentiable samples that
stand in for the one-hot label fed to a decoder. Its KL divergence to a categorical prior is the KL
*of the categoricals* (Jang et al. 2017, section 3.1):

    KL(q || p) = sum_k pi_k (log pi_k - log p_k),   pi = softmax(logits),

registered with ``torch.distributions.kl_divergence``, so ``TraceMeanField_ELBO`` uses it in
closed form and never needs a relaxed density inside the loss.

This KL is a *surrogate*: it is the KL of Cat(softmax(logits)) to the prior, not that of the law of
the relaxed sample (a density on the simplex, against a prior that has none), nor that of the class
the sample points to. For :class:`LogisticNormalLabel` the latter is the law of
argmax_k (logits_k + sigma eps_k), which is not softmax(logits): for logits (0.3, -1.2, 0.7) and
sigma = 1 it is about (0.373, 0.038, 0.589) against softmax's (0.368, 0.082, 0.549)
(``tests/test_relaxed.py`` measures it). An unlabelled loss built on these KLs is therefore not a
bound on -log p(x) of any model; where a bound is wanted, the relaxed vector must be a latent of the
model itself with a KL of its own law (``dirichlet`` and ``logistic-normal-latent`` in
:mod:`pyrossl.guides.label`, whose KLs are torch's Dirichlet/Dirichlet and Normal/Normal ones).

- :class:`ConcreteLabel`: Gumbel-softmax / Concrete (Jang et al. 2017; Maddison et al. 2017),
  ``straight_through=True`` gives the hard one-hot forward with the relaxed gradient.
- :class:`LogisticNormalLabel`: y = softmax(sharpness * (logits + sigma * eps)), eps ~ N(0, I).

Both have finite log-densities at any temperature (torch's ``RelaxedOneHotCategorical.log_prob``
turns NaN when a coordinate of the sample underflows to 0, Pyro issue 3304).
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints, kl_divergence, register_kl

_TINY = torch.finfo(torch.float32).tiny


class _RelaxedLabel(TorchDistribution):
    arg_constraints = {"logits": constraints.real_vector}
    support = constraints.simplex
    has_rsample = True

    def __init__(self, logits: torch.Tensor, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)
        super().__init__(logits.shape[:-1], logits.shape[-1:], validate_args=validate_args)

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.exp()

    @property
    def mean(self) -> torch.Tensor:
        return self.probs

    def _log_value(self, value: torch.Tensor) -> torch.Tensor:
        return value.clamp_min(_TINY).log()


class ConcreteLabel(_RelaxedLabel):
    """Gumbel-softmax sample y = softmax((logits + g) / temperature), g ~ Gumbel(0, 1).

    The log-density is the Concrete density (Maddison et al. 2017, eq. 2)

        log p(y) = log (K-1)! + (K-1) log t + sum_k (log pi_k - (t+1) log y_k)
                   - K logsumexp_k (log pi_k - t log y_k),

    computed from log y clamped at the smallest normal float, so it stays finite.
    """

    arg_constraints = {"logits": constraints.real_vector, "temperature": constraints.positive}

    def __init__(self, temperature, logits: torch.Tensor, straight_through: bool = False, validate_args=None):
        self.temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
        self.straight_through = straight_through
        super().__init__(logits, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        logits = self.logits.expand(torch.Size(batch_shape) + self.event_shape)
        return ConcreteLabel(self.temperature, logits, self.straight_through, validate_args=False)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device).clamp(_TINY, 1.0 - 1e-7)
        gumbel = -(-u.log()).log()
        soft = torch.softmax((self.logits + gumbel) / self.temperature, dim=-1)
        if not self.straight_through:
            return soft
        hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft)
        return hard + soft - soft.detach()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        k = self.logits.shape[-1]
        t = self.temperature
        log_y = self._log_value(value)
        return (
            math.lgamma(k)
            + (k - 1) * t.log()
            + (self.logits - (t + 1) * log_y).sum(-1)
            - k * (self.logits - t * log_y).logsumexp(-1)
        )


class LogisticNormalLabel(_RelaxedLabel):
    """y = softmax(sharpness * (logits + sigma * eps)) with eps ~ N(0, I_K).

    Softmax ignores a common shift, so y is the additive logistic transform of the K-1 differences
    v_k = logits_k - logits_K + sigma (eps_k - eps_K), a Gaussian N(mu, sigma^2 (I + 1 1^T)). The
    density on the simplex (Aitchison & Shen 1980) is therefore

        log p(y) = log N(v; mu, sigma^2 (I + 1 1^T)) - (K-1) log sharpness - sum_k log y_k,
        v = log(y_{1..K-1} / y_K) / sharpness,

    with (I + 1 1^T)^-1 = I - 1 1^T / K and det(I + 1 1^T) = K.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "sigma": constraints.positive,
        "sharpness": constraints.positive,
    }

    def __init__(self, logits: torch.Tensor, sigma: float = 1.0, sharpness: float = 1.0, validate_args=None):
        self.sigma = torch.as_tensor(sigma, dtype=logits.dtype, device=logits.device)
        self.sharpness = torch.as_tensor(sharpness, dtype=logits.dtype, device=logits.device)
        super().__init__(logits, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        logits = self.logits.expand(torch.Size(batch_shape) + self.event_shape)
        return LogisticNormalLabel(logits, self.sigma, self.sharpness, validate_args=False)

    def rsample(self, sample_shape=()) -> torch.Tensor:
        shape = self._extended_shape(torch.Size(sample_shape))
        eps = torch.randn(shape, dtype=self.logits.dtype, device=self.logits.device)
        return torch.softmax(self.sharpness * (self.logits + self.sigma * eps), dim=-1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        k = self.logits.shape[-1]
        log_y = self._log_value(value)
        v = (log_y[..., :-1] - log_y[..., -1:]) / self.sharpness
        d = v - (self.logits[..., :-1] - self.logits[..., -1:])
        quad = ((d * d).sum(-1) - d.sum(-1) ** 2 / k) / self.sigma**2
        log_normal = -0.5 * (quad + (k - 1) * math.log(2 * math.pi) + math.log(k)) - (k - 1) * self.sigma.log()
        return log_normal - (k - 1) * self.sharpness.log() - log_y.sum(-1)


def _categorical_kl(q: _RelaxedLabel, p_logits: torch.Tensor) -> torch.Tensor:
    p_logits = p_logits - p_logits.logsumexp(-1, keepdim=True)
    return (q.probs * (q.logits - p_logits)).sum(-1)


# registered on torch's OneHotCategorical, so Pyro's subclass of it is covered too.
# The surrogate KL of the categoricals is kept for LogisticNormalLabel (not replaced by the Gaussian
# KL of its logits): against M2's categorical prior no KL of the relaxed sample's own law exists,
# and a Gaussian-logit KL would mean a different model, which is the ``logistic-normal-latent``
# guide's; ``logistic-normal`` stays the relaxation of the categorical model, like Gumbel-softmax.
@register_kl(ConcreteLabel, torch.distributions.OneHotCategorical)
@register_kl(LogisticNormalLabel, torch.distributions.OneHotCategorical)
def _kl_relaxed_categorical(q, p):
    return _categorical_kl(q, p.logits)


__all__ = ["ConcreteLabel", "LogisticNormalLabel", "kl_divergence"]  # kl_divergence knows both now
