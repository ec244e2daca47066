"""The CCVAE guide (Joy et al. 2021): an encoder q(z|x) = q(z_c|x) q(z_s|x) and a diagonal classifier q(y|z_c).

Sites, in the ``data`` plate:

- ``z_c`` (one dimension per label: per attribute, or per class of a categorical label) and ``z_s``
  (style), both diagonal Gaussians from one encoder;
- ``y`` ~ q(y|z_c). Unlabelled: enumerated in parallel for a categorical label (the exact sum over
  classes), sampled for binary attributes (Pyro scores it with a score-function gradient).
  Labelled: observed, so the trace holds log q(y|z_c);
- labelled only, two more observed sites that :class:`pyrossl.models.ccvae.CCVAE_ELBO` reads:
  ``y_weight`` (q(y|z_c) with z_c detached: the importance weight's numerator, whose gradient reaches
  the classifier and not the encoder, as in the authors' code) and ``y_x``, the Monte Carlo estimate
  q(y|x) = 1/k sum_j q(y|z_c^j), z_c^j ~ q(z_c|x), written as a uniform mixture of the k classifiers'
  distributions so that its log-probability is the log of that average.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrossl.guides.normal import DiagonalNormalGuide


class DiagonalClassifier(nn.Module):
    """q(y|z_c): label i's logit is ``weight[i] * z_c[i] + bias[i]``, from its own latent dimension only."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_labels))
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, z_c: torch.Tensor) -> torch.Tensor:
        return z_c * self.weight + self.bias


def label_distribution(logits: torch.Tensor, multilabel: bool) -> dist.Distribution:
    """Independent Bernoulli attributes (event dim 1) or one categorical label, from classifier logits."""
    if multilabel:
        return dist.Bernoulli(logits=logits).to_event(1)
    return dist.Categorical(logits=logits)


class CCVAEGuide(nn.Module):
    def __init__(self, image_shape, num_labels: int, z_style: int, multilabel: bool, hidden=(500,),
                 act: str = "relu", net: str = "mlp", k: int = 100):
        super().__init__()
        self.num_labels, self.z_style, self.multilabel, self.k = num_labels, z_style, multilabel, k
        self.encoder = DiagonalNormalGuide(image_shape, num_labels + z_style, hidden, act, net)
        self.classifier = DiagonalClassifier(num_labels)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z|x), z = [z_c, z_s]."""
        return self.encoder.encode(x)

    def q_y_x(self, loc_c: torch.Tensor, scale_c: torch.Tensor, k: int | None = None) -> dist.Distribution:
        """q(y|x) ~= 1/k sum_j q(y|z_c^j), z_c^j ~ q(z_c|x) (reparameterised): a uniform mixture, batch shape [B]."""
        k = k or self.k
        z = dist.Normal(loc_c, scale_c).rsample((k,)).transpose(0, 1)  # [B, k, c]
        logits = self.classifier(z)
        mixing = dist.Categorical(logits=torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device))
        return dist.MixtureSameFamily(mixing, label_distribution(logits, self.multilabel))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        c = self.num_labels
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            z_c = pyro.sample("z_c", dist.Normal(loc[:, :c], scale[:, :c]).to_event(1))
            pyro.sample("z_s", dist.Normal(loc[:, c:], scale[:, c:]).to_event(1))
            q_y = label_distribution(self.classifier(z_c), self.multilabel)
            if y is None:
                infer = {} if self.multilabel else {"enumerate": "parallel"}
                pyro.sample("y", q_y, infer=infer)
                return
            pyro.sample("y", q_y, obs=y)
            pyro.sample("y_weight", label_distribution(self.classifier(z_c.detach()), self.multilabel), obs=y)
            pyro.sample("y_x", self.q_y_x(loc[:, :c], scale[:, :c]), obs=y)
