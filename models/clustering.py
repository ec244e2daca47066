"""What the two GMM-prior VAEs of the zoo share: a VAE whose codes a Gaussian mixture clusters, without labels.

``serket-vae-gmm`` (:mod:`pyrossl.models.serket_vae_gmm`) trains the VAE and the mixture as two modules
exchanging messages; ``gmm-vae`` (:mod:`pyrossl.models.gmm_vae`) makes the mixture the VAE's prior. Both
encode with the z-guide family (q(z|x)), decode with independent Bernoulli pixels, report the ELBO and
the clustering of the training images (cluster accuracy by the Hungarian matching, NMI, ARI) and draw
the same figures; their options share one base, :class:`ClusteringVAEOptions`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.evaluate import cluster_mapping, clustering_metrics, confusion_matrix, pairs_from_table, per_image
from pyrossl.figures import Figure
from pyrossl.guides.normal import CodeGuide
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options
from pyrossl.nn import BernoulliDecoder, check_network_options
from pyrossl.zoo import ELBOModuleEntry, ZooModel


@dataclass
class ClusteringVAEOptions(ZGuideOptions):
    """The settings both GMM-prior VAEs share (each entry sets its own defaults), checked alike."""

    z_dim: int = setting(10, "width of the continuous code z")
    hidden: list[int] = setting([500, 500], "widths of the hidden layers (the encoder's; the decoder mirrors them)")
    act: str = setting("relu", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv (images of at least 8x8, sides divisible by 4)")
    init_std: float | None = setting(
        None, "Serket's truncated-normal weights of this sd; None: PyTorch's default initialisation"
    )
    clusters: int = setting(10, "mixture components")
    covariance: str = setting("full", "of each mixture component: full | diag")
    reg_covar: float = setting(1e-3, "added to the variances of a mixture fitted by EM")
    n_init: int = setting(10, "EM restarts per mixture fit; the most likely wins")

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if self.clusters < 2:
            raise ConfigError(f"options.clusters must be at least 2, not {self.clusters}")
        if self.covariance not in ("full", "diag"):
            raise ConfigError(f"options.covariance must be 'full' or 'diag', not '{self.covariance}'")
        if self.init_std is not None and not self.init_std > 0:
            raise ConfigError("options.init_std must be positive (or left out)")
        if not self.reg_covar > 0:
            raise ConfigError(f"options.reg_covar must be positive, not {self.reg_covar}")
        if self.n_init < 1:
            raise ConfigError(f"options.n_init must be at least 1, not {self.n_init}")


def serket_init(module: nn.Module, std: float) -> None:
    """Serket's initialisation: weights from N(0, std) truncated at two sd, biases zero."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def clustering_vae_metrics(counts: dict) -> dict:
    """ELBO and reconstruction per image, and the clustering metrics where there is a table of clusters."""
    metrics = per_image(counts, "elbo", "reconstruction_bce")
    if "clusters" in counts:
        metrics.update(clustering_metrics(*pairs_from_table(counts["clusters"])))
    return metrics


class ClusteringVAE(ELBOModuleEntry, ZooModel):
    """What both GMM-prior VAEs share: the encoder, the decoder, clustering metrics and figures.
    Subclasses give :meth:`cluster_probs`, ``num_clusters`` and ``sample_cluster``."""

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
        figures.append(
            Figure.images(
                "cluster_samples",
                samples,
                nrow=10,
                row_labels=[f"cluster {c} → {names[mapping[c]]}" if c in mapping else f"cluster {c}" for c in order],
                title="samples per cluster (rows matched to classes)",
            )
        )
        return figures
