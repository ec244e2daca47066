"""Diagonal-Gaussian guides for a continuous latent code: q(z|x) = N(mu(x), diag sigma(x)^2)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrossl.nn import ConvEncoder, GaussianHead


class DiagonalNormalGuide(nn.Module):
    """Amortised mean-field guide for site ``z``: an encoder (MLP or conv) maps x to (mu, sigma).

    Used by the plain VAE (M1) and as the encoder of the GMM-prior VAEs. ``kl_weight`` scales the
    site as the model's ``z`` is scaled (a beta-VAE's beta): ``TraceMeanField_ELBO`` weights the analytic
    KL by the guide site's scale, so both sides must carry it.
    """

    def __init__(self, image_shape, z_dim: int, hidden=(256,), act: str = "relu", net: str = "mlp"):
        super().__init__()
        num_features = math.prod(image_shape)
        if net == "conv":
            self.features = ConvEncoder(image_shape, hidden[0], hidden=hidden[0], act=act)
            self.head = GaussianHead([hidden[0], hidden[0], z_dim], act)
        else:
            self.features = nn.Flatten()
            self.head = GaussianHead([num_features, *hidden, z_dim], act)
        self.kl_weight = 1.0

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The location and scale of q(z|x)."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor, *model_inputs, **model_options) -> None:
        """Samples ``z``; the model's other inputs (a prior mean, say) do not concern the guide."""
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.kl_weight):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
