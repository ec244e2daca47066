"""The GMM-prior VAE trained end to end, the zoo entry ``gmm-vae`` (:class:`GMMVAE`): the mixture *is* the
prior of one Pyro model (the VaDE prior of Jiang et al. 2017):

    c ~ Cat(pi),   z ~ N(mu_c, Sigma_c),   x ~ Bernoulli(f_theta(z))

with the guide q(z|x) and c summed out exactly by ``TraceEnum_ELBO`` (c is enumerated in the model;
the guide has no c), so the bound is E_q[log sum_c pi_c N(z; mu_c, sigma_c) + log p(x|z) - log q(z|x)],
and pi, mu, Sigma, the encoder and the decoder are learned jointly. The first ``warmup_epochs`` train a
plain VAE (prior N(0, I)); at the end of the warm-up a Gaussian mixture is fitted by EM to samples
of q(z|x) for every training image and becomes the prior's initial value. A point's cluster is
argmax_c p(c|z) at its code.
Covariances are full by default (``covariance = "diag"`` is VaDE's diag sigma_c^2): a plain VAE's
codes are correlated within a class, and on the same codes of Serket's 3,000 digits a diagonal
mixture clusters 0.55 of them correctly where a full one clusters 0.72.
``kl_weight`` (beta) multiplies log q(z|x) - log sum_c p(c) p(z|c) once the mixture is on (Pyro
scales an enumerated group outside its sum over c, so the weight applies to the marginal, not to each
component); beta > 1 trades reconstruction for codes that sit closer to their cluster. The reported
``elbo`` is always the bound with beta = 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.evaluate import iwae_log_likelihood, label_table, reconstruction_bce_sum
from pyrossl.infer.objective import DispatchingELBO
from pyrossl.infer.params import register
from pyrossl.mixture import PyroGaussianMixture
from pyrossl.models.clustering import ClusteringVAE, ClusteringVAEOptions, clustering_vae_metrics
from pyrossl.nn import BernoulliDecoder, pixel_likelihood


@dataclass
class GMMVAEOptions(ClusteringVAEOptions):
    covariance: str = setting("full", "of each prior component: full | diag (VaDE's)")
    reg_covar: float = setting(1e-3, "added to the warm-up mixture's variances")
    n_init: int = setting(10, "EM restarts of the warm-up mixture")
    warmup_epochs: int = setting(10, "plain-VAE epochs before the mixture prior is fitted and switched on")
    min_scale: float = setting(1e-3, "floor of the prior's component scales")
    kl_weight: float = setting(1.0, "beta on log q(z|x) - log p(z) once the mixture is on (the warm-up keeps 1)")

    def __post_init__(self):
        super().__post_init__()
        if self.warmup_epochs < 0 or not self.min_scale > 0 or not self.kl_weight > 0:
            raise ConfigError("options: warmup_epochs must be >= 0, min_scale > 0, kl_weight > 0")


class MixturePriorVAE(nn.Module):
    """c ~ Cat(pi), z ~ N(mu_c, Sigma_c), x ~ p(x|z); c enumerated. ``mixture=False``: z ~ N(0, I).

    Sigma_c = L_c L_c^T with L_c lower triangular, its diagonal ``min_scale + softplus(raw)``; with
    ``full=False`` L_c is diagonal (VaDE's diag sigma_c^2).
    """

    def __init__(self, decoder: BernoulliDecoder, clusters: int, z_dim: int, min_scale: float, full: bool = True):
        super().__init__()
        self.decoder = decoder
        self.min_scale = min_scale
        self.full = full
        self.logits = nn.Parameter(torch.zeros(clusters))
        self.loc = nn.Parameter(torch.zeros(clusters, z_dim))
        self.raw_scale = nn.Parameter(torch.zeros(clusters, z_dim))  # diagonal of L: min_scale + softplus(raw_scale)
        if full:
            self.raw_tril = nn.Parameter(torch.zeros(clusters, z_dim, z_dim))  # below the diagonal of L
        # False during the warm-up (the prior is N(0, I)); a buffer, so a checkpoint knows which
        self.register_buffer("mixture_on", torch.tensor(True))
        self.kl_weight = 1.0

    @property
    def mixture(self) -> bool:
        return bool(self.mixture_on)

    @property
    def scale(self) -> torch.Tensor:
        return self.min_scale + nn.functional.softplus(self.raw_scale)

    @property
    def scale_tril(self) -> torch.Tensor:
        """L_c of every component: [K, d, d]."""
        diag = torch.diag_embed(self.scale)
        return diag + torch.tril(self.raw_tril, -1) if self.full else diag

    def set_scale_tril(self, tril: torch.Tensor) -> None:
        s = (torch.diagonal(tril, dim1=-2, dim2=-1) - self.min_scale).clamp(min=1e-6)
        self.raw_scale.data.copy_(s + torch.log(-torch.expm1(-s)))  # inverse softplus
        if self.full:
            self.raw_tril.data.copy_(torch.tril(tril, -1))

    def component(self, c=None) -> dist.Distribution:
        """p(z | c) for the clusters ``c`` (all of them, batched, when None)."""
        loc = self.loc if c is None else self.loc[c]
        if self.full:
            return dist.MultivariateNormal(loc, scale_tril=self.scale_tril if c is None else self.scale_tril[c])
        return dist.Normal(loc, self.scale if c is None else self.scale[c]).to_event(1)

    def log_prior(self, z: torch.Tensor) -> torch.Tensor:
        """log p(c, z) for every c: [n, K]."""
        return self.logits.log_softmax(-1) + self.component().log_prob(z[:, None, :])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sites in plate ``data``: ``c`` (enumerated; once the mixture is on), ``z`` ``[n, z_dim]`` and ``x``
        (flat pixels, observed)."""
        register(self)
        n = x.shape[0]
        with pyro.plate("data", n):
            if self.mixture:
                # Pyro scales an enumerated group outside the sum over c: kl_weight * log sum_c p(c) p(z|c)
                with poutine.scale(scale=self.kl_weight):
                    c = pyro.sample("c", dist.Categorical(logits=self.logits), infer={"enumerate": "parallel"})
                    z = pyro.sample("z", self.component(c))
            else:
                zeros = self.loc.new_zeros(n, self.loc.shape[-1])
                z = pyro.sample("z", dist.Normal(zeros, torch.ones_like(zeros)).to_event(1))
            return pyro.sample("x", pixel_likelihood(self.decoder(z)), obs=x.flatten(1))


class MixturePriorELBO(DispatchingELBO):
    """The bound in force for :class:`MixturePriorVAE`: ``mixture`` (TraceEnum_ELBO, c summed out) once
    the model's mixture is on, ``warmup`` (the plain VAE's, analytic KL for a diagonal z-guide) before."""

    def __init__(self, mixture, warmup):
        super().__init__(num_particles=mixture.num_particles, max_plate_nesting=1)
        self.mixture, self.warmup = mixture, warmup

    def choose(self, model, guide, *args, **kwargs):
        return self.mixture if model.mixture else self.warmup


class GMMVAE(ClusteringVAE):
    name = "gmm-vae"
    description = "VAE with a Gaussian-mixture prior learned end to end (VaDE), the cluster enumerated exactly"
    Options = GMMVAEOptions
    objective_limits = {"iwae": "its cluster c is enumerated, which the importance-weighted bound cannot do"}

    def __init__(self, meta: dict, options: GMMVAEOptions, guide: str = "amortised", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        encoder, decoder = self._networks(o)
        prior = MixturePriorVAE(decoder, o.clusters, o.z_dim, o.min_scale, full=o.covariance == "full")
        # the warm-up's plain VAE has nothing to enumerate
        self.loss = MixturePriorELBO(self.make_elbo(enumerated=True), self.make_elbo())(prior, encoder)
        self.prior.mixture_on.fill_(o.warmup_epochs == 0)
        if o.warmup_epochs == 0:  # no warm-up: the components start spread around the origin
            with torch.no_grad():
                self.prior.loc.normal_(generator=torch.Generator().manual_seed(0))

    @property
    def prior(self) -> MixturePriorVAE:
        return self.loss.model

    @property
    def num_clusters(self) -> int:
        return self.options.clusters

    def set_kl_weight(self, kl_weight: float) -> None:
        """The weight of the z term, in model and guide alike (TraceMeanField_ELBO takes the guide's)."""
        self.prior.kl_weight = self.guide.kl_weight = kl_weight

    def forward(self, x, x_lab=None, y_lab=None):
        self.set_kl_weight(self.options.kl_weight if self.prior.mixture else 1.0)
        return super().forward(x)

    def cluster_probs(self, z):
        return self.prior.log_prior(z).softmax(-1)

    @torch.no_grad()
    def prior_moments(self, x, code_mean):
        """Each unit's mean and variance under the mixture sum_c pi_c N(mu_c, Sigma_c) (N(0, 1) in the warm-up)."""
        p = self.prior
        if not p.mixture:
            return super().prior_moments(x, code_mean)
        pi = p.logits.softmax(-1)[:, None]
        variances = p.scale_tril.pow(2).sum(-1)  # diagonal of L L^T
        mean = (pi * p.loc).sum(0)
        return mean, (pi * (variances + p.loc**2)).sum(0) - mean**2

    @torch.no_grad()
    def end_epoch(self, epoch, encode_data, evaluating=True):
        if epoch != self.options.warmup_epochs or self.prior.mixture:
            return {}
        o = self.options
        x = encode_data()["x"]
        # the prior should match the aggregate posterior q(z) = mean_n q(z|x_n), so the mixture is fitted
        # to samples of q(z|x), not to its means: means alone give components too narrow for q's spread
        codes = self.sample_codes(x)
        gmm = PyroGaussianMixture(
            o.clusters, o.z_dim, reg_covar=o.reg_covar, n_init=o.n_init, covariance_type=o.covariance
        ).fit(codes)
        p = self.prior
        p.logits.copy_(gmm.log_weights.to(p.logits))
        p.loc.copy_(gmm.means.to(p.loc))
        p.set_scale_tril(gmm.scale_tril.to(p.loc))
        p.mixture_on.fill_(True)
        return {"warmup_gmm_mean_log_likelihood": gmm.log_likelihood(codes) / codes.shape[0]}

    @torch.no_grad()
    def evaluation_counts(self, x, y, batch_size=1000):
        """Sums of the ELBO of the bound in force and of the reconstruction cross-entropy; the table of
        (cluster, class) pairs once the mixture prior is on."""
        weight = self.prior.kl_weight
        self.set_kl_weight(1.0)
        try:
            elbo = sum(-self.elbo.loss(self.prior, self.guide, xb) for xb in torch.split(x, batch_size))
        finally:
            self.set_kl_weight(weight)
        codes = self.latent(x, batch_size)
        counts = {
            "elbo": torch.tensor(elbo, dtype=torch.float64),
            "count": torch.tensor(x.shape[0]),
            "reconstruction_bce": reconstruction_bce_sum(self.decode, codes, x, batch_size),
        }
        if self.prior.mixture:
            counts["clusters"] = label_table(
                self.cluster_probs(codes).argmax(-1), y, self.num_clusters, self.meta["num_classes"]
            )
        return counts

    def metrics_from_counts(self, counts):
        return clustering_vae_metrics(counts)

    @torch.no_grad()
    def log_likelihood(self, x, num_samples, batch_size=100):
        """IWAE estimate of log p(x) with the mixture prior's exact marginal log sum_c p(c) p(z|c)."""

        def one(xb):
            q = self.guide.distribution(xb)
            z = q.rsample((num_samples,))  # [k, n, d]
            log_pz = (
                self.prior.log_prior(z.reshape(-1, z.shape[-1])).logsumexp(-1).reshape(num_samples, -1)
                if self.prior.mixture
                else torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
            )
            log_px = pixel_likelihood(self.decoder(z)).log_prob(xb.flatten(1))
            return iwae_log_likelihood(log_px + log_pz - q.log_prob(z))

        return torch.cat([one(xb) for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def sample_cluster(self, n: int, cluster: int) -> torch.Tensor:
        return self.decode(self.prior.component(cluster).sample((n,)))

    @torch.no_grad()
    def sample(self, n, y=None):
        """Images from the generative model (of clusters ``y`` when given)."""
        p = self.prior
        c = (
            torch.multinomial(p.logits.softmax(-1), n, replacement=True)
            if y is None
            else torch.as_tensor(y, device=p.loc.device).expand(n)
        )
        return self.decode(p.component(c).sample())
