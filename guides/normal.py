"""Diagonal-Gaussian guides for a continuous latent code: q(z|x) = N(mu(x), diag sigma(x)^2)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrossl.nn import ConvEncoder, GaussianHead


class DiagonalNormalGuide(nn.Module):
    """Amortised mean-field guide for site ``z``: an encoder (MLP or conv) maps x to (mu, sigma).

    Used by the plain VAE (M1) and as the encoder of the GMM-prior VAE.
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

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The location and scale of q(z|x)."""
        return self.head(self.features(x))

    def forward(self, x: torch.Tensor) -> None:
        loc, scale = self.encode(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))
