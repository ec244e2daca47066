"""Amortised guides for a continuous code: an encoder x -> (h, mu, sigma) and a z-guide of the family
(:mod:`pyrossl.guides.zguide`) that turns them into q(z|x)."""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from torch import nn

from pyrossl.guides.zguide import DEFAULT_Z_GUIDE, ZGuideOptions, make_z_guide
from pyrossl.infer.params import register
from pyrossl.nn import ConvEncoder, GaussianHead


class CodeGuide(nn.Module):
    """Amortised guide for site ``z``: an encoder (MLP or conv) maps x to features h and (mu, sigma);
    the z-guide ``z_guide`` makes q(z|x) of them (``diag-normal``: N(mu, diag sigma^2), mean field).

    Used by the plain VAE (M1), the GMM-prior VAEs and CCVAE. ``kl_weight`` scales the site as the
    model's ``z`` is scaled (a beta-VAE's beta): ``TraceMeanField_ELBO`` weights the analytic KL by the
    guide site's scale, so both sides must carry it.
    """

    def __init__(
        self,
        image_shape,
        z_dim: int,
        hidden=(256,),
        act: str = "relu",
        net: str = "mlp",
        z_guide: str = DEFAULT_Z_GUIDE,
        z_options: ZGuideOptions | None = None,
    ):
        super().__init__()
        num_features = math.prod(image_shape)
        if net == "conv":
            self.features = ConvEncoder(image_shape, hidden[0], hidden=hidden[0], act=act)
            self.head = GaussianHead([hidden[0], hidden[0], z_dim], act)
        else:
            self.features = nn.Flatten()
            self.head = GaussianHead([num_features, *hidden, z_dim], act)
        self.z_guide = make_z_guide(z_guide, z_dim, self.head.features, z_options)
        self.kl_weight = 1.0

    def encode_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base location and scale of q(z|x) and the encoder's features h."""
        h = self.head.hidden(self.features(x))
        return (*self.head.params(h), h)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance of each unit of z under q(z|x) (exact for the Gaussian z-guides,
        Monte Carlo for a flow)."""
        return self.z_guide.moments(*self.encode_all(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of each unit of z under q(z|x)."""
        mean, var = self.moments(x)
        return mean, var.sqrt()

    def distribution(self, x: torch.Tensor):
        """q(z|x), batch shape [n], event shape [d]."""
        return self.z_guide.distribution(*self.encode_all(x))

    def point(self, x: torch.Tensor) -> torch.Tensor:
        """A deterministic code per image: the posterior mean (the flow's image of its base mean)."""
        return self.z_guide.point(*self.encode_all(x))

    def forward(self, x: torch.Tensor, *model_inputs, **model_options) -> None:
        """Samples ``z`` (plate ``data``); the model's other inputs (a prior mean, say) do not concern the guide."""
        register(self)
        with pyro.plate("data", x.shape[0]), poutine.scale(scale=self.kl_weight):
            pyro.sample("z", self.distribution(x))
