"""The plain VAE (Kingma & Welling 2014), also "M1" of Kingma et al. 2014.

Generative model, for each image x with D pixels:

    z ~ N(0, I_d),    x ~ Bernoulli(sigmoid(f_theta(z)))  (D independent pixels)

trained by maximising the ELBO  E_q(z|x)[log p(x|z)] - beta * KL(q(z|x) || p(z))  with the guide
q(z|x) of the z-guide family (:mod:`pyrossl.guides.zguide`; ``diag-normal`` is N(mu_phi(x), diag
sigma_phi(x)^2)), or the importance-weighted bound (``train.objective = "iwae"``, Burda et al. 2016).
The KL is analytic for the diagonal Gaussian (``TraceMeanField_ELBO``), a Monte Carlo estimate for the
others. Grey-level pixels in [0, 1] are scored with the Bernoulli log-likelihood as a cross-entropy
(or binarised per batch with ``data.binarize``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrossl.config import setting
from pyrossl.evaluate import iwae_log_likelihood, per_image, reconstruction_bce_sum
from pyrossl.figures import Figure
from pyrossl.guides.normal import CodeGuide
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options
from pyrossl.infer.iwae import importance_log_weights
from pyrossl.infer.objective import Objective
from pyrossl.infer.params import register
from pyrossl.nn import BernoulliDecoder, check_network_options, pixel_likelihood
from pyrossl.zoo import ELBOModuleEntry, ZooModel


@dataclass
class VAEOptions(ZGuideOptions):
    z_dim: int = setting(16, "width of the continuous code z")
    hidden: list[int] = setting([256], "widths of the hidden layers (the encoder's; the decoder mirrors them)")
    act: str = setting("relu", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv (images of at least 8x8, sides divisible by 4)")
    beta: float = setting(1.0, "weight of the KL term (1: the ELBO)")

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)


class VAEModel(nn.Module):
    """p(z) p(x|z) with a standard-normal prior; ``x=None`` samples images."""

    def __init__(self, image_shape, z_dim: int, hidden=(256,), act: str = "relu", net: str = "mlp", beta: float = 1.0):
        super().__init__()
        self.beta = beta
        self.register_buffer("prior_loc", torch.zeros(z_dim), persistent=False)
        self.decoder = BernoulliDecoder(image_shape, z_dim, hidden, act, net)

    def forward(self, x: torch.Tensor | None = None, num: int | None = None) -> torch.Tensor:
        """Sites ``z`` ``[n, z_dim]`` and ``x`` (flat pixels ``[n, D]``, observed when ``x`` is given) in
        plate ``data``; ``num``: how many images to draw when ``x`` is None."""
        register(self)
        n = x.shape[0] if x is not None else num
        loc = self.prior_loc.expand(n, -1)
        with pyro.plate("data", n):
            with poutine.scale(scale=self.beta):
                z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            logits = self.decoder(z)
            return pyro.sample("x", pixel_likelihood(logits), obs=None if x is None else x.flatten(1))


class VAE(ELBOModuleEntry, ZooModel):
    name = "vae"
    description = "plain Bernoulli VAE (M1): ELBO, reconstructions, samples, IWAE log-likelihood"
    Options = VAEOptions
    guides = {"amortised": "an encoder x -> q(z|x); the family of q is the z_guide"}
    default_guide = "amortised"
    guide_aliases = {"diag-normal": "amortised"}  # its name before the z-guides (now z_guide = "diag-normal")
    z_guides = Z_GUIDES
    objectives = ("elbo", "iwae")
    selection_metric = "elbo"

    def __init__(self, meta: dict, options: VAEOptions, guide: str = "amortised", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        shape = meta["image_shape"]
        self.loss = self.make_elbo()(
            VAEModel(shape, o.z_dim, o.hidden, o.act, o.net),
            CodeGuide(shape, o.z_dim, o.hidden, o.act, o.net, z_guide=self.z_guide_name, z_options=o),
        )
        # evaluation reports the one-sample ELBO, whatever the training objective
        self.eval_elbo = self.make_elbo(objective=Objective())
        self.set_beta(o.beta)

    def set_beta(self, beta: float) -> None:
        """The KL weight, on the model's and the guide's ``z`` alike (the analytic KL takes the guide's)."""
        self.model.beta = self.guide.kl_weight = beta

    @torch.no_grad()
    def evaluation_counts(self, x, y, batch_size=1000):
        """Sums over the images of the ELBO (beta = 1, whatever beta trains with) and of the
        reconstruction cross-entropy."""
        beta = self.model.beta
        self.set_beta(1.0)
        try:
            elbo = sum(-self.eval_elbo.loss(self.model, self.guide, xb) for xb in torch.split(x, batch_size))
        finally:
            self.set_beta(beta)
        z = torch.cat([self.latent(xb) for xb in torch.split(x, batch_size)])
        return {
            "elbo": torch.tensor(elbo, dtype=torch.float64),
            "count": torch.tensor(x.shape[0]),
            "reconstruction_bce": reconstruction_bce_sum(self.decode, z, x, batch_size),
        }

    def metrics_from_counts(self, counts):
        return per_image(counts, "elbo", "reconstruction_bce")

    @torch.no_grad()
    def log_likelihood(self, x, num_samples, batch_size=100):
        def one(xb):
            log_w = importance_log_weights(self.model, self.guide, xb, num_samples=num_samples)
            return iwae_log_likelihood(log_w)

        return torch.cat([one(xb) for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities of p(x|z) as images [n, C, H, W]."""
        return torch.sigmoid(self.model.decoder(z)).reshape(z.shape[0], *self.meta["image_shape"])

    @torch.no_grad()
    def code_moments(self, x):
        return self.guide.moments(x)

    @torch.no_grad()
    def latent(self, x):
        return self.guide.point(x)

    @torch.no_grad()
    def posterior(self, x):
        loc, scale = self.guide.encode(x)
        return {"z_loc": loc, "z_scale": scale}

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode(self.latent(x))

    @torch.no_grad()
    def sample(self, n, y=None):
        z = torch.randn(n, self.options.z_dim, device=next(self.parameters()).device)
        return self.decode(z)

    def figures(self, x, y, outputs=None):
        x = x[:10]
        return [
            Figure.reconstructions("reconstructions", x, self.reconstruct(x)),
            Figure.images("samples", self.sample(100), nrow=10, title="samples from p(x|z), z ~ N(0, I)"),
        ]
