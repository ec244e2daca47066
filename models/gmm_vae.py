"""GMM-prior VAEs: unsupervised classification by a VAE whose prior is a Gaussian mixture.

Two ways of training the same idea, as two zoo entries.

**Serket mode** (:class:`SerketVAEGMM`, ``serket-vae-gmm``): Serket's VAE+GMM (Nakamura et al.).
A VAE and a Gaussian mixture are separate modules that exchange messages. The VAE sends latent codes z
to the GMM; the GMM clusters them and sends back, for each training point n, the mean mu_{k_n} of the
cluster it was put in; the VAE then trains on

    L(x_n) = E_q(z|x_n)[log p(x_n|z)] - alpha * KL(q(z|x_n) || N(mu_{k_n}, I))

(before the first message mu = 0: a plain VAE). A *round* is ``epochs_per_round`` epochs of VAE
training followed by one GMM update (at the end of the round's last epoch). The GMM is
:class:`pyrossl.mixture.PyroGaussianMixture`, a Pyro model fitted by EM: the E-step is Pyro's exact
posterior of the enumerated assignment, the M-step closed form; seeded, deterministic. Each round
writes Serket's files into the run directory (``module001_vae/z_learn.txt``,
``module002_gmm/class_learn.txt``, ``module002_gmm/acc_learn.txt``), per round under ``NNN/`` and the
latest at the top. Unlike Serket, whose VAE is re-initialised before every update, the VAE here
continues from the previous round: the messages move its prior, not its starting point.

**End-to-end** (:class:`GMMVAE`, ``gmm-vae``): the mixture *is* the prior of one Pyro model (the
VaDE prior of Jiang et al. 2017):

    c ~ Cat(pi),   z ~ N(mu_c, Sigma_c),   x ~ Bernoulli(f_theta(z))

with the guide q(z|x) and c summed out exactly by ``TraceEnum_ELBO`` (c is enumerated in the model;
the guide has no c), so the bound is E_q[log sum_c pi_c N(z; mu_c, sigma_c) + log p(x|z) - log q(z|x)],
and pi, mu, Sigma, the encoder and the decoder are learned jointly. The first ``warmup_epochs`` train a
plain VAE (prior N(0, I)); at the end of the warm-up a Gaussian mixture is fitted by EM to samples
of q(z|x) for every training image and becomes the prior's initial value. A point's cluster is argmax_c p(c|z) at its code.
Covariances are full by default (``covariance = "diag"`` is VaDE's diag sigma_c^2): a plain VAE's
codes are correlated within a class, and on the same codes of Serket's 3,000 digits a diagonal
mixture clusters 0.55 of them correctly where a full one clusters 0.72.
``kl_weight`` (beta) multiplies log q(z|x) - log sum_c p(c) p(z|c) once the mixture is on (Pyro
scales an enumerated group outside its sum over c, so the weight applies to the marginal, not to each
component); beta > 1 trades reconstruction for codes that sit closer to their cluster. The reported
``elbo`` is always the bound with beta = 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrossl.errors import ConfigError
from pyrossl.evaluate import (
    cluster_mapping,
    clustering_metrics,
    confusion_matrix,
    iwae_log_likelihood,
    label_table,
    pairs_from_table,
    per_image,
    reconstruction_bce_sum,
)
from pyrossl.figures import Figure
from pyrossl.guides.normal import CodeGuide
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options
from pyrossl.infer.objective import DispatchingELBO, Objective
from pyrossl.infer.params import register
from pyrossl.mixture import PyroGaussianMixture
from pyrossl.nn import BernoulliDecoder, check_network_options, pixel_likelihood
from pyrossl.zoo import ELBOModuleEntry, ZooModel


def serket_init(module: nn.Module, std: float) -> None:
    """Serket's initialisation: weights from N(0, std) truncated at two sd, biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _clustering_vae_metrics(counts: dict) -> dict:
    """ELBO and reconstruction per image, and the clustering metrics where there is a table of clusters."""
    metrics = per_image(counts, "elbo", "reconstruction_bce")
    if "clusters" in counts:
        metrics.update(clustering_metrics(*pairs_from_table(counts["clusters"])))
    return metrics


class _ClusteringVAE(ELBOModuleEntry, ZooModel):
    """What both modes share: the encoder, the decoder, clustering metrics and figures."""

    uses_labels = False
    evaluate_on_train = True
    selection_metric = "elbo"

    guides = {"amortised": "an encoder x -> q(z|x); the family of q is the z_guide"}
    default_guide = "amortised"
    guide_aliases = {"diag-normal": "amortised"}  # its name before the z-guides (now z_guide = "diag-normal")
    z_guides = Z_GUIDES

    def check_split(self, split, dataset):
        sizes = split.sizes()
        n, k = sizes["labelled"] + sizes["unlabelled"], self.num_clusters
        if n < k:  # the mixture is fitted to the training codes
            raise ConfigError(f"options.clusters = {k} needs at least {k} training examples; the split leaves {n}")

    def _networks(self, o) -> tuple[CodeGuide, BernoulliDecoder]:
        shape = self.meta["image_shape"]
        guide = CodeGuide(shape, o.z_dim, o.hidden, o.act, o.net, z_guide=self.z_guide_name, z_options=o)
        decoder = BernoulliDecoder(shape, o.z_dim, o.hidden, o.act, o.net)
        if o.init_std is not None:
            # the encoder and decoder as Serket's; a flow keeps Pyro's near-identity start
            serket_init(guide.features, o.init_std)
            serket_init(guide.head, o.init_std)
            serket_init(decoder, o.init_std)
        return guide, decoder

    @property
    def decoder(self) -> BernoulliDecoder:
        return self.loss.model.decoder

    def cluster_probs(self, z: torch.Tensor) -> torch.Tensor:
        """p(c | z) for codes z [n, d]."""
        raise NotImplementedError

    @torch.no_grad()
    def q_z(self, x: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of each unit of q(z|x) for every image, encoded in batches."""
        loc, scale = zip(*(self.guide.encode(xb) for xb in torch.split(x, batch_size)))
        return torch.cat(loc), torch.cat(scale)

    @torch.no_grad()
    def code_moments(self, x):
        return self.guide.moments(x)

    @torch.no_grad()
    def sample_codes(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """One draw of z ~ q(z|x) for every image."""
        return torch.cat([self.guide.distribution(xb).rsample() for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def latent(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        return torch.cat([self.guide.point(xb) for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(z)).reshape(z.shape[0], *self.meta["image_shape"])

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.latent(x))

    @torch.no_grad()
    def responsibilities(self, x: torch.Tensor) -> torch.Tensor:
        """The cluster posterior of each image, at its code's posterior mean: [n, K]."""
        return self.cluster_probs(self.latent(x))

    @torch.no_grad()
    def cluster(self, x: torch.Tensor) -> torch.Tensor:
        return self.responsibilities(x).argmax(-1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The cluster of each image (a cluster index, not a class: nothing here saw a label)."""
        return self.cluster(x)

    @torch.no_grad()
    def posterior(self, x):
        loc, scale = self.q_z(x)
        return {"z_loc": loc, "z_scale": scale, "cluster_probs": self.cluster_probs(self.latent(x))}

    def figures(self, x, y, outputs=None):
        figures = [Figure.reconstructions("reconstructions", x[:10], self.reconstruct(x[:10]))]
        clusters = self.cluster(x).cpu()
        k = self.num_clusters
        # rows: clusters in the order of the class each is matched to (Hungarian), so row i shows "class i"
        mapping = cluster_mapping(clusters, y.cpu(), self.meta["num_classes"])
        order = sorted(range(k), key=lambda c: (mapping.get(c, k), c))
        matched = torch.tensor([mapping.get(int(c), -1) for c in clusters])
        if (matched >= 0).all():
            cm = confusion_matrix(matched, y.cpu(), self.meta["num_classes"])
            figures.append(Figure.confusion("cluster_confusion", cm, self.meta.get("classes")))
        names = self.meta.get("classes") or [str(i) for i in range(self.meta["num_classes"])]
        samples = torch.cat([self.sample_cluster(10, c) for c in order])
        figures.append(Figure.images("cluster_samples", samples, nrow=10,
                                     row_labels=[f"cluster {c} → {names[mapping[c]]}" if c in mapping else f"cluster {c}" for c in order],
                                     title="samples per cluster (rows matched to classes)"))
        return figures


# ---------------------------------------------------------------------------------------------
# Serket mode
# ---------------------------------------------------------------------------------------------
@dataclass
class SerketOptions(ZGuideOptions):
    z_dim: int = 18
    hidden: list[int] = field(default_factory=lambda: [100])
    act: str = "relu"
    net: str = "mlp"
    init_std: float | None = 0.1  # Serket's truncated-normal weights; None: PyTorch's default initialisation
    alpha: float = 1.0  # weight of KL(q(z|x) || N(mu_k, I))
    clusters: int = 10
    epochs_per_round: int = 200  # VAE epochs between GMM updates (Serket's itr)
    message: str = "sample"  # what the VAE sends the GMM: a sample of q(z|x), as Serket does, or its "mean"
    covariance: str = "full"  # of the GMM: full | diag
    reg_covar: float = 1e-6
    n_init: int = 10  # EM restarts per GMM update; the most likely wins

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if self.clusters < 2 or self.epochs_per_round < 1 or not self.alpha >= 0:
            raise ConfigError("options: clusters must be at least 2, epochs_per_round at least 1, alpha >= 0")
        if self.message not in ("sample", "mean"):
            raise ConfigError(f"options.message must be 'sample' or 'mean', not '{self.message}'")
        if self.covariance not in ("full", "diag"):
            raise ConfigError(f"options.covariance must be 'full' or 'diag', not '{self.covariance}'")
        if self.init_std is not None and not self.init_std > 0:
            raise ConfigError("options.init_std must be positive (or left out)")


class MessagePriorVAE(nn.Module):
    """p(z) p(x|z) with p(z) = N(prior_loc_n, I) per example: the message of the GMM."""

    def __init__(self, decoder: BernoulliDecoder, alpha: float):
        super().__init__()
        self.decoder = decoder
        self.alpha = alpha

    def forward(self, x: torch.Tensor, prior_loc: torch.Tensor) -> torch.Tensor:
        """Sites ``z`` ``[n, z_dim]`` (prior N(prior_loc, I): each image's GMM message, zeros before the
        first round) and ``x`` (flat pixels, observed) in plate ``data``."""
        register(self)
        with pyro.plate("data", x.shape[0]):
            with poutine.scale(scale=self.alpha):
                z = pyro.sample("z", dist.Normal(prior_loc, torch.ones_like(prior_loc)).to_event(1))
            return pyro.sample("x", pixel_likelihood(self.decoder(z)), obs=x.flatten(1))


class SerketVAEGMM(_ClusteringVAE):
    name = "serket-vae-gmm"
    description = "Serket's VAE+GMM: a VAE and a Pyro GMM exchanging messages (KL to the assigned cluster mean)"
    Options = SerketOptions
    objectives = ("elbo", "iwae")
    wants_index = True

    def __init__(self, meta: dict, options: SerketOptions, guide: str = "amortised", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        encoder, decoder = self._networks(o)
        self.loss = self.make_elbo()(MessagePriorVAE(decoder, o.alpha), encoder)
        # evaluation reports the one-sample ELBO, whatever the training objective
        self.eval_elbo = self.make_elbo(objective=Objective())
        self.set_alpha(o.alpha)
        self.gmm = PyroGaussianMixture(o.clusters, o.z_dim, reg_covar=o.reg_covar, n_init=o.n_init,
                                       covariance_type=o.covariance)
        num_examples = meta.get("num_examples")
        if num_examples is None:
            raise ConfigError("serket-vae-gmm needs the dataset's size (meta['num_examples']) to hold a message per example")
        # the message to each dataset row: its cluster (-1: none yet, the prior is N(0, I))
        self.register_buffer("assignment", torch.full((num_examples,), -1, dtype=torch.long))
        self.register_buffer("rounds", torch.zeros((), dtype=torch.long))
        self._round = None  # the last round's codes and clusters, until epoch_outputs hands them to the run folder

    @property
    def num_clusters(self) -> int:
        return self.options.clusters

    def set_alpha(self, alpha: float) -> None:
        """The KL weight, on the model's and the guide's ``z`` alike (the analytic KL takes the guide's)."""
        self.loss.model.alpha = self.guide.kl_weight = alpha

    def prior_loc(self, assignment: torch.Tensor) -> torch.Tensor:
        """N(mu_k, I)'s mean for each assignment k (zeros where there is no message yet)."""
        loc = self.gmm.means[assignment.clamp(min=0)]
        return torch.where((assignment >= 0)[:, None], loc, torch.zeros_like(loc))

    def forward(self, x, x_lab=None, y_lab=None, index=None):
        """The per-example mean of ``entry.elbo`` on ``(x, prior_loc)``, the messages of the batch's dataset rows."""
        if index is None:
            raise ConfigError("serket-vae-gmm trains on unlabelled batches with their dataset rows (index=)")
        return self.elbo.differentiable_loss(self.model, self.guide, x, self.prior_loc(self.assignment[index])) / x.shape[0]

    @torch.no_grad()
    def prior_moments(self, x, code_mean):
        """N(mu_k, I), the message of each image's cluster k (k from its code's posterior mean; N(0, I) before the first)."""
        if int(self.rounds) == 0:
            return super().prior_moments(x, code_mean)
        loc = self.prior_loc(self.gmm.predict(code_mean))
        return loc, torch.ones_like(loc)

    def cluster_probs(self, z):
        if int(self.rounds) == 0:
            raise RuntimeError("the GMM has not been fitted yet (it is fitted at the end of the first round)")
        return self.gmm.responsibilities(z)

    @torch.no_grad()
    def end_epoch(self, epoch, encode_data, evaluating=True):
        if epoch % self.options.epochs_per_round:
            return {}
        data = encode_data()
        self.eval()
        codes = self.sample_codes(data["x"]) if self.options.message == "sample" else self.latent(data["x"])
        self.gmm.seed = int(self.rounds)  # each update's restarts are seeded, differently per round
        self.gmm.fit(codes)
        classes = self.gmm.predict(codes)
        self.assignment[data["index"]] = classes
        self.rounds += 1
        self._round = {"round": int(self.rounds), "index": data["index"].cpu(), "z": codes.cpu(), "classes": classes.cpu()}
        self.train()
        return {"round": int(self.rounds), "gmm_mean_log_likelihood": self.gmm.log_likelihood(codes) / codes.shape[0],
                "gmm_iterations": self.gmm.n_iter}

    @torch.no_grad()
    def evaluation_counts(self, x, y, batch_size=1000):
        """Sums of the ELBO against each image's own message (the GMM cluster of its code) and of the
        reconstruction cross-entropy; the table of (cluster, class) pairs once the GMM is fitted."""
        codes = self.latent(x, batch_size)
        fitted = int(self.rounds) > 0
        clusters = self.gmm.predict(codes) if fitted else torch.full((x.shape[0],), -1, device=x.device)
        self.set_alpha(1.0)
        try:
            elbo = -sum(self.eval_elbo.loss(self.loss.model, self.guide, xb, self.prior_loc(cb))
                        for xb, cb in zip(torch.split(x, batch_size), torch.split(clusters, batch_size)))
        finally:
            self.set_alpha(self.options.alpha)
        counts = {"elbo": torch.tensor(elbo, dtype=torch.float64), "count": torch.tensor(x.shape[0]),
                  "reconstruction_bce": reconstruction_bce_sum(self.decode, codes, x, batch_size)}
        if fitted:
            counts["clusters"] = label_table(clusters, y, self.num_clusters, self.meta["num_classes"])
        return counts

    def metrics_from_counts(self, counts):
        return _clustering_vae_metrics(counts)

    @torch.no_grad()
    def sample_cluster(self, n: int, cluster: int) -> torch.Tensor:
        """Images decoded from z ~ N(mu_k, I), the prior the messages give the members of cluster k."""
        loc = self.gmm.means[cluster].expand(n, -1)
        return self.decode(loc + torch.randn_like(loc))

    @torch.no_grad()
    def sample(self, n, y=None):
        """Images of clusters drawn from the GMM's weights (or of clusters ``y``)."""
        k = torch.multinomial(self.gmm.log_weights.exp().cpu(), n, replacement=True) if y is None else torch.as_tensor(y).expand(n)
        loc = self.gmm.means[k.to(self.gmm.means.device)]
        return self.decode(loc + torch.randn_like(loc))

    def epoch_outputs(self, epoch, labels):
        """Serket's tables of the round that just ended: under ``rounds/NNN/`` and, as the latest, at the top."""
        if self._round is None:
            return {}
        r, self._round = self._round, None
        order = r["index"].argsort()  # rows in dataset order, as Serket's data file
        index, z, classes = r["index"][order], r["z"][order], r["classes"][order]
        truth = labels(index).cpu()
        metrics = clustering_metrics(classes, truth)
        tables = {"module001_vae/z_learn.txt": (z.numpy(), "%.18e"), "module002_gmm/class_learn.txt": (classes.numpy(), "%d"),
                  "module002_gmm/acc_learn.txt": ([metrics["cluster_accuracy"]], "%.18e"),
                  "module002_gmm/mu.txt": (self.gmm.means.cpu().numpy(), "%.18e")}
        kept = {**tables, **{f"rounds/{r['round']:03d}/{name}": table for name, table in tables.items()}}
        return {**kept, "index.txt": (index.numpy(), "%d"), "category.txt": (truth.numpy(), "%d")}

    @classmethod
    def read_outputs(cls, files, options) -> dict:
        """The codes before the first message and after the last (``rounds/001`` and the top
        ``module001_vae/z_learn.txt``) with the true classes (``category.txt``), checked; empty before a round."""
        first = "rounds/001/module001_vae/z_learn.txt"
        if not (files.exists(first) or files.exists("category.txt")):
            return {}
        truth = files.table("category.txt", dtype=int)
        shape = (len(truth), options.z_dim)
        return {"truth": truth, "before": files.table(first, shape=shape),
                "after": files.table("module001_vae/z_learn.txt", shape=shape)}

    def figures(self, x, y, outputs=None):
        figures = super().figures(x, y)
        if outputs:
            figures.append(Figure.latent_pair(
                "latent_before_after", outputs["before"], outputs["after"], outputs["truth"], classes=self.meta.get("classes"),
                titles=("round 1: before the first message (plain VAE)", f"round {int(self.rounds)}: after the last message"),
            ))
        return figures


# ---------------------------------------------------------------------------------------------
# End-to-end mode
# ---------------------------------------------------------------------------------------------
@dataclass
class GMMVAEOptions(ZGuideOptions):
    z_dim: int = 10
    hidden: list[int] = field(default_factory=lambda: [500, 500])
    act: str = "relu"
    net: str = "mlp"
    init_std: float | None = None
    clusters: int = 10
    covariance: str = "full"  # of each prior component: full | diag (VaDE's)
    warmup_epochs: int = 10  # plain-VAE epochs before the mixture prior is fitted and switched on
    reg_covar: float = 1e-3  # added to the warm-up mixture's variances
    n_init: int = 10  # EM restarts of the warm-up mixture
    min_scale: float = 1e-3  # floor of the prior's component scales
    kl_weight: float = 1.0  # beta on log q(z|x) - log p(z) once the mixture is on (the warm-up keeps 1)

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if self.clusters < 2 or self.warmup_epochs < 0 or not self.min_scale > 0 or not self.kl_weight > 0:
            raise ConfigError("options: clusters must be at least 2, warmup_epochs >= 0, min_scale > 0, kl_weight > 0")
        if self.covariance not in ("full", "diag"):
            raise ConfigError(f"options.covariance must be 'full' or 'diag', not '{self.covariance}'")
        if self.init_std is not None and not self.init_std > 0:
            raise ConfigError("options.init_std must be positive (or left out)")


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


class GMMVAE(_ClusteringVAE):
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
        gmm = PyroGaussianMixture(o.clusters, o.z_dim, reg_covar=o.reg_covar, n_init=o.n_init, covariance_type=o.covariance).fit(codes)
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
        counts = {"elbo": torch.tensor(elbo, dtype=torch.float64), "count": torch.tensor(x.shape[0]),
                  "reconstruction_bce": reconstruction_bce_sum(self.decode, codes, x, batch_size)}
        if self.prior.mixture:
            counts["clusters"] = label_table(self.cluster_probs(codes).argmax(-1), y, self.num_clusters, self.meta["num_classes"])
        return counts

    def metrics_from_counts(self, counts):
        return _clustering_vae_metrics(counts)

    @torch.no_grad()
    def log_likelihood(self, x, num_samples, batch_size=100):
        """IWAE estimate of log p(x) with the mixture prior's exact marginal log sum_c p(c) p(z|c)."""
        def one(xb):
            q = self.guide.distribution(xb)
            z = q.rsample((num_samples,))  # [k, n, d]
            log_pz = self.prior.log_prior(z.reshape(-1, z.shape[-1])).logsumexp(-1).reshape(num_samples, -1) \
                if self.prior.mixture else torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
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
        c = torch.multinomial(p.logits.softmax(-1), n, replacement=True) if y is None else torch.as_tensor(y, device=p.loc.device).expand(n)
        return self.decode(p.component(c).sample())
