"""Serket's VAE+GMM (Nakamura et al. 2018) as the zoo entry ``serket-vae-gmm`` (:class:`SerketVAEGMM`).
A VAE and a Gaussian mixture are separate modules that exchange messages. The VAE sends latent codes z
to the GMM; the GMM clusters them and sends back, for each training point n, the mean mu_{k_n} of the
cluster it was put in; the VAE then trains on

    L(x_n) = E_q(z|x_n)[log p(x_n|z)] - alpha * KL(q(z|x_n) || N(mu_{k_n}, I))

(before the first message mu = 0: a plain VAE). A *round* is ``epochs_per_round`` epochs of VAE
training followed by one GMM update (at the end of the round's last epoch). The GMM is
:class:`pyrossl.mixture.PyroGaussianMixture`, a Pyro model fitted by EM: the E-step is Pyro's exact
posterior of the enumerated assignment, the M-step closed form; seeded, deterministic. Each round's
Serket files (``module001_vae/z_learn.txt``, ``module002_gmm/class_learn.txt``,
``module002_gmm/acc_learn.txt``) are values :meth:`SerketVAEGMM.epoch_outputs` returns, which the
run folder writes, per round under ``rounds/NNN/`` and the latest at the top. Unlike Serket, whose
VAE is re-initialised before every update, the VAE here continues from the previous round: the
messages move its prior, not its starting point.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.evaluate import clustering_metrics, label_table, reconstruction_bce_sum
from pyrossl.figures import Figure
from pyrossl.infer.objective import Objective
from pyrossl.infer.params import register
from pyrossl.mixture import PyroGaussianMixture
from pyrossl.models.clustering import ClusteringVAE, ClusteringVAEOptions, clustering_vae_metrics
from pyrossl.nn import BernoulliDecoder, pixel_likelihood


@dataclass
class SerketOptions(ClusteringVAEOptions):
    z_dim: int = 18
    hidden: list[int] = field(default_factory=lambda: [100])
    init_std: float | None = 0.1
    reg_covar: float = setting(1e-6, "added to the variances of each GMM update")
    alpha: float = setting(1.0, "weight of KL(q(z|x) || N(mu_k, I))")
    epochs_per_round: int = setting(200, "VAE epochs between GMM updates (Serket's itr)")
    message: str = setting("sample", 'what the VAE sends the GMM: a sample of q(z|x), as Serket does, or its "mean"')

    def __post_init__(self):
        super().__post_init__()
        if self.epochs_per_round < 1 or not self.alpha >= 0:
            raise ConfigError("options: epochs_per_round must be at least 1, alpha >= 0")
        if self.message not in ("sample", "mean"):
            raise ConfigError(f"options.message must be 'sample' or 'mean', not '{self.message}'")


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


class SerketVAEGMM(ClusteringVAE):
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
        self.gmm = PyroGaussianMixture(
            o.clusters, o.z_dim, reg_covar=o.reg_covar, n_init=o.n_init, covariance_type=o.covariance
        )
        num_examples = meta.get("num_examples")
        if num_examples is None:
            raise ConfigError(
                "serket-vae-gmm needs the dataset's size (meta['num_examples']) to hold a message per example"
            )
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
        return (
            self.elbo.differentiable_loss(self.model, self.guide, x, self.prior_loc(self.assignment[index]))
            / x.shape[0]
        )

    @torch.no_grad()
    def prior_moments(self, x, code_mean):
        """N(mu_k, I), the message of each image's cluster k (k from its code's posterior mean; N(0, I)
        before the first)."""
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
        self._round = {
            "round": int(self.rounds),
            "index": data["index"].cpu(),
            "z": codes.cpu(),
            "classes": classes.cpu(),
        }
        self.train()
        return {
            "round": int(self.rounds),
            "gmm_mean_log_likelihood": self.gmm.log_likelihood(codes) / codes.shape[0],
            "gmm_iterations": self.gmm.n_iter,
        }

    @torch.no_grad()
    def evaluation_counts(self, x, y, batch_size=1000):
        """Sums of the ELBO against each image's own message (the GMM cluster of its code) and of the
        reconstruction cross-entropy; the table of (cluster, class) pairs once the GMM is fitted."""
        codes = self.latent(x, batch_size)
        fitted = int(self.rounds) > 0
        clusters = self.gmm.predict(codes) if fitted else torch.full((x.shape[0],), -1, device=x.device)
        self.set_alpha(1.0)
        try:
            elbo = -sum(
                self.eval_elbo.loss(self.loss.model, self.guide, xb, self.prior_loc(cb))
                for xb, cb in zip(torch.split(x, batch_size), torch.split(clusters, batch_size))
            )
        finally:
            self.set_alpha(self.options.alpha)
        counts = {
            "elbo": torch.tensor(elbo, dtype=torch.float64),
            "count": torch.tensor(x.shape[0]),
            "reconstruction_bce": reconstruction_bce_sum(self.decode, codes, x, batch_size),
        }
        if fitted:
            counts["clusters"] = label_table(clusters, y, self.num_clusters, self.meta["num_classes"])
        return counts

    def metrics_from_counts(self, counts):
        return clustering_vae_metrics(counts)

    @torch.no_grad()
    def sample_cluster(self, n: int, cluster: int) -> torch.Tensor:
        """Images decoded from z ~ N(mu_k, I), the prior the messages give the members of cluster k."""
        loc = self.gmm.means[cluster].expand(n, -1)
        return self.decode(loc + torch.randn_like(loc))

    @torch.no_grad()
    def sample(self, n, y=None):
        """Images of clusters drawn from the GMM's weights (or of clusters ``y``)."""
        k = (
            torch.multinomial(self.gmm.log_weights.exp().cpu(), n, replacement=True)
            if y is None
            else torch.as_tensor(y).expand(n)
        )
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
        tables = {
            "module001_vae/z_learn.txt": (z.numpy(), "%.18e"),
            "module002_gmm/class_learn.txt": (classes.numpy(), "%d"),
            "module002_gmm/acc_learn.txt": ([metrics["cluster_accuracy"]], "%.18e"),
            "module002_gmm/mu.txt": (self.gmm.means.cpu().numpy(), "%.18e"),
        }
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
        return {
            "truth": truth,
            "before": files.table(first, shape=shape),
            "after": files.table("module001_vae/z_learn.txt", shape=shape),
        }

    def figures(self, x, y, outputs=None):
        figures = super().figures(x, y)
        if outputs:
            figures.append(
                Figure.latent_pair(
                    "latent_before_after",
                    outputs["before"],
                    outputs["after"],
                    outputs["truth"],
                    classes=self.meta.get("classes"),
                    titles=(
                        "round 1: before the first message (plain VAE)",
                        f"round {int(self.rounds)}: after the last message",
                    ),
                )
            )
        return figures
