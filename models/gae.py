"""Gaussian Auto Embeddings: an autoencoder, then one Gaussian mixture per class on its codes.

1. A plain (deterministic) autoencoder is trained on every training image, without labels. As a Pyro
   program it is the limit of a VAE with a flat prior and a point-mass guide:

       model:  z ~ ImproperUniform(R^d),   x ~ Bernoulli(sigmoid(g(z)))
       guide:  z ~ Delta(f(x))

   so the ELBO is exactly the reconstruction log-likelihood log p(x | z = f(x)) (both log-densities of
   z are 0).
2. After each epoch the codes of the training images are standardised and a Gaussian mixture of
   ``components`` components is fitted to the codes of each class
   (:class:`pyrossl.mixture.GaussianMixtureClassifier`). An image is classified by
   argmax_c p(c) p(z|c); it is "none of the classes" where log p(z) is under the threshold; a class
   is sampled by decoding z ~ p(z|c), and each component of a class reads as one of its styles.
3. For comparison, a single mixture of K components (K classes, no labels) is fitted to all codes:
   its clusters are scored against the classes with cluster accuracy, NMI and ARI.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.evaluate import (
    classification_metrics,
    clustering_metrics,
    confusion_matrix,
    label_table,
    pairs_from_table,
    per_image,
    reconstruction_bce_sum,
)
from pyrossl.figures import Figure
from pyrossl.infer.params import register
from pyrossl.mixture import GaussianMixtureClassifier, MixtureStack, check_mixture_options
from pyrossl.nn import BernoulliDecoder, check_network_options, make_encoder, pixel_likelihood
from pyrossl.zoo import ELBOModuleEntry, ZooModel


@dataclass
class GAEOptions:
    z_dim: int = setting(32, "width of the continuous code z")
    hidden: list[int] = setting([512, 256], "widths of the hidden layers (the encoder's; the decoder mirrors them)")
    act: str = setting("relu", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv")
    components: int = setting(6, "mixture components per class")
    covariance: str = setting("full", "full | diag | tied | spherical")
    reg_covar: float = setting(1e-2, "added to the covariances' diagonal (codes are standardised)")
    n_init: int = setting(1, "EM restarts per mixture")
    novelty_quantile: float = setting(0.01, "threshold: the log p(z) this fraction of training codes falls below")
    single_mixture: bool = setting(True, "also fit one mixture of num_classes components to all codes (no labels)")
    single_mixture_points: int = setting(10000, "... on at most this many codes (a seeded subset), to bound its cost")

    def __post_init__(self):
        check_network_options(self)
        check_mixture_options(self.components, self.covariance, self.reg_covar)
        if self.n_init < 1:
            raise ConfigError(f"options.n_init must be at least 1, not {self.n_init}")
        if self.single_mixture_points < 2:
            raise ConfigError(f"options.single_mixture_points must be at least 2, not {self.single_mixture_points}")
        if not 0 <= self.novelty_quantile < 1:
            raise ConfigError(f"options.novelty_quantile must be in [0, 1), not {self.novelty_quantile}")


class Encoder(nn.Module):
    """x -> code f(x): the zoo's shared encoder network (:func:`pyrossl.nn.make_encoder`), held as ``net``
    so that checkpoints keep their parameter names."""

    def __init__(self, image_shape, z_dim: int, hidden=(512, 256), act: str = "relu", net: str = "mlp"):
        super().__init__()
        self.net = make_encoder(image_shape, z_dim, hidden, act, net)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class AutoencoderModel(nn.Module):
    """Flat prior on z, Bernoulli pixels given z."""

    def __init__(self, image_shape, z_dim: int, hidden=(512, 256), act: str = "relu", net: str = "mlp"):
        super().__init__()
        self.z_dim = z_dim
        self.decoder = BernoulliDecoder(image_shape, z_dim, hidden, act, net)

    def forward(self, x: torch.Tensor) -> None:
        """Sites ``z`` (an improper flat prior) and ``x`` (flat pixels, observed) in plate ``data``."""
        register(self)
        n = x.shape[0]
        with pyro.plate("data", n):
            z = pyro.sample("z", dist.ImproperUniform(constraints.real_vector, (n,), (self.z_dim,)))
            pyro.sample("x", pixel_likelihood(self.decoder(z)), obs=x.flatten(1))


class PointGuide(nn.Module):
    """q(z|x) = Delta(f(x)): the encoder's code, a point mass."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> None:
        register(self)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(self.encoder(x)).to_event(1))


class GAE(ELBOModuleEntry, ZooModel):
    name = "gae"
    description = "Gaussian Auto Embeddings: autoencoder + one Gaussian mixture per class (classify, sample, novelty)"
    Options = GAEOptions
    guides = {"point": "q(z|x) = Delta(f(x)): a deterministic encoder"}
    default_guide = "point"
    selection_metric = "accuracy"
    objective_limits = {"iwae": "its guide is a point mass (a deterministic encoder): there is no importance weight"}

    def __init__(self, meta: dict, options: GAEOptions, guide: str = "point", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        shape, k = meta["image_shape"], meta["num_classes"]
        self.loss = self.make_elbo(analytic_kl=False)(
            AutoencoderModel(shape, o.z_dim, o.hidden, o.act, o.net),
            PointGuide(Encoder(shape, o.z_dim, o.hidden, o.act, o.net)),
        )
        self.register_buffer("code_mean", torch.zeros(o.z_dim))
        self.register_buffer("code_scale", torch.ones(o.z_dim))
        self.classifier = GaussianMixtureClassifier(
            k, o.z_dim, o.components, o.covariance, o.reg_covar, o.n_init, o.novelty_quantile
        )
        self.clusters = MixtureStack(1, o.z_dim, k, o.covariance, o.reg_covar, o.n_init) if o.single_mixture else None

    def check_split(self, split, dataset):
        # each class's mixture is fitted to its labelled codes (a class with one code has no covariance)
        k = self.meta["num_classes"]
        counts = torch.bincount(dataset.y[split.labelled].long(), minlength=k)
        few = [
            dataset.classes[c] if c < len(dataset.classes) else str(c)
            for c in (counts < 2).nonzero().flatten().tolist()
        ]
        if few:
            raise ConfigError(
                f"gae fits one mixture per class to its labelled codes: every class needs at least 2 "
                "labelled examples (data.labels_per_class or data.label_fraction); class(es) "
                f"{', '.join(map(str, few))} have fewer"
            )
        sizes = split.sizes()
        if self.clusters is not None and sizes["labelled"] + sizes["unlabelled"] < k:
            raise ConfigError(
                f"options.single_mixture fits {k} components to the training codes: at least {k} training examples "
                "are needed"
            )

    @property
    def encoder(self) -> nn.Module:
        return self.loss.guide.encoder

    # --- the mixtures ---------------------------------------------------------------------
    @torch.no_grad()
    def codes(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """Standardised codes (the space the mixtures live in)."""
        return self._standardise(self.latent(x, batch_size))

    def _standardise(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self.code_mean) / self.code_scale

    def _unstandardise(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.code_scale + self.code_mean

    @torch.no_grad()
    def fit_mixtures(self, x: torch.Tensor, x_labelled: torch.Tensor, y_labelled: torch.Tensor) -> None:
        """Standardise with the codes of ``x``; fit the class mixtures on the labelled codes, the single
        mixture on all."""
        if x_labelled.shape[0] == 0:
            raise ConfigError(
                "model 'gae' fits one mixture per class on labelled codes: set data.labels_per_class or "
                "data.label_fraction (or leave both unset)"
            )
        was_training = self.training
        self.eval()
        z = self.latent(x)
        self.code_mean.copy_(z.mean(0))
        self.code_scale.copy_(z.std(0).clamp_min(1e-6))
        self.classifier.fit(self.codes(x_labelled), y_labelled)
        if self.clusters is not None:
            if z.shape[0] > self.options.single_mixture_points:
                g = torch.Generator().manual_seed(0)
                z = z[torch.randperm(z.shape[0], generator=g)[: self.options.single_mixture_points].to(z.device)]
            self.clusters.fit([self._standardise(z)])
        self.train(was_training)

    def end_epoch(self, epoch, encode_data, evaluating=True):
        """Refit the mixtures to the new codes, when an evaluation follows (they are what it scores)."""
        if not evaluating:
            return {}
        start = time.perf_counter()
        data = encode_data()
        self.fit_mixtures(data["x"], data["x_labelled"], data["y_labelled"])
        return {"mixture_seconds": time.perf_counter() - start}

    # --- evaluation and prediction ---------------------------------------------------------
    def _check_fitted(self):
        if not bool(self.classifier.mixtures.fitted):
            raise RuntimeError("the class mixtures are not fitted yet: train at least one epoch (or call fit_mixtures)")

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self.classifier.predict_proba(self.codes(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self._check_fitted()
        return self.classifier.predict(self.codes(x))

    @torch.no_grad()
    def posterior(self, x):
        """The code (the guide is a point mass at f(x)), the class posterior p(y|z) of the class
        mixtures, and, with a label-free mixture, its responsibilities."""
        self._check_fitted()
        raw = self.latent(x)
        z = self._standardise(raw)
        out = {"z": raw, "y_probs": self.classifier.predict_proba(z)}
        if self.clusters is not None:
            out["cluster_probs"] = self.clusters.responsibilities(z)
        return out

    @torch.no_grad()
    def is_novel(self, x: torch.Tensor) -> torch.Tensor:
        """True for images whose code is unlikely under every class mixture (log p(z) below the threshold)."""
        self._check_fitted()
        return self.classifier.is_novel(self.codes(x))

    @torch.no_grad()
    def cluster(self, x: torch.Tensor) -> torch.Tensor:
        """The component of the single (label-free) mixture each image belongs to."""
        return self.clusters.responsibilities(self.codes(x)).argmax(-1)

    @torch.no_grad()
    def evaluation_counts(self, x, y, batch_size=1000):
        """Tables of (predicted class, class) and (single-mixture cluster, class) pairs, the number of
        novel codes and the reconstruction cross-entropy summed over the images."""
        self._check_fitted()
        raw = self.latent(x, batch_size)
        z = self._standardise(raw)
        k = self.meta["num_classes"]
        counts = {
            "labels": label_table(self.classifier.predict(z), y, k, k),
            "count": torch.tensor(x.shape[0]),
            "novel": self.classifier.is_novel(z).sum().cpu(),
            "reconstruction_bce": reconstruction_bce_sum(self.decode, raw, x, batch_size),
        }
        if self.clusters is not None:
            counts["clusters"] = label_table(self.clusters.responsibilities(z).argmax(-1), y, k, k)
        return counts

    def metrics_from_counts(self, counts):
        metrics = classification_metrics(*pairs_from_table(counts["labels"]), self.meta["num_classes"])
        metrics["novelty_rate"] = float(counts["novel"]) / float(counts["count"])
        if "clusters" in counts:
            metrics.update(clustering_metrics(*pairs_from_table(counts["clusters"]), prefix="single_mixture_"))
        metrics.update(per_image(counts, "reconstruction_bce"))
        return metrics

    # --- inspection and generation -----------------------------------------------------------
    latent_title = "codes f(x) of the encoder"

    @torch.no_grad()
    def latent(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """The code f(x) (not standardised)."""
        return torch.cat([self.encoder(xb) for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities of p(x|z) as images [n, C, H, W], for codes z in the encoder's space."""
        return torch.sigmoid(self.loss.model.decoder(z)).reshape(z.shape[0], *self.meta["image_shape"])

    @torch.no_grad()
    def reconstruct(self, x):
        return self.decode(self.latent(x))

    @torch.no_grad()
    def sample(self, n, y=None, generator: torch.Generator | None = None):
        """Images decoded from z ~ p(z|c), for classes ``y`` (int or one per image) or drawn from p(c)."""
        self._check_fitted()
        z, _ = self.classifier.sample(n, y, generator=generator)
        return self.decode(self._unstandardise(z))

    @torch.no_grad()
    def sample_styles(self, y: int, columns: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
        """One row per component ("style") of class ``y``'s mixture, ``columns`` samples each, heaviest first."""
        self._check_fitted()
        mix = self.classifier.mixtures
        order = [m for m in mix.log_weights[y].argsort(descending=True).tolist() if mix.log_weights[y, m] > -math.inf]
        z = torch.cat([mix.sample(columns, y, component=m, generator=generator) for m in order])
        return self.decode(self._unstandardise(z))

    def figures(self, x, y, outputs=None):
        k = self.meta["num_classes"]
        classes = [str(c) for c in self.meta["classes"]] or [str(c) for c in range(k)]
        g = torch.Generator().manual_seed(0)
        per_class = self.sample(10 * k, torch.arange(k).repeat_interleave(10), generator=g)
        figures = [
            Figure.images(
                "class_samples", per_class, nrow=10, title="z ~ p(z|c), decoded: one class per row", row_labels=classes
            ),
            Figure.images(
                "styles",
                self.sample_styles(0, generator=g),
                nrow=10,
                title=f"class {classes[0]}: one mixture component (style) per row, heaviest first",
            ),
            Figure.confusion("confusion", confusion_matrix(self.predict(x).cpu(), y.cpu(), k), classes),
            Figure.reconstructions("reconstructions", x[:10], self.reconstruct(x[:10])),
        ]
        pairs = class_pairs(y, k)
        if pairs:
            rows = torch.cat([latent_interpolation(self, x[i : i + 1], x[j : j + 1]) for i, j in pairs])
            labels = [f"{classes[int(y[i])]} → {classes[int(y[j])]}" for i, j in pairs]
            figures.append(
                Figure.images(
                    "interpolation", rows, nrow=10, title="linear path between two images' codes", row_labels=labels
                )
            )
        return figures


def class_pairs(y: torch.Tensor, num_classes: int, count: int = 5) -> list[tuple[int, int]]:
    """Indices (i, j) of the first image of class c and of class c + 1, for the first ``count`` classes present."""
    first = {}
    for i, c in enumerate(y.tolist()):
        first.setdefault(c, i)
    return [(first[c], first[c + 1]) for c in range(num_classes - 1) if c in first and c + 1 in first][:count]


@torch.no_grad()
def latent_interpolation(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decoded images along the straight line between the codes of ``x_a`` and ``x_b`` (any model with
    ``latent`` and ``decode``)."""
    za, zb = model.latent(x_a), model.latent(x_b)
    t = torch.linspace(0, 1, steps, device=za.device)[:, None]
    return model.decode((1 - t) * za + t * zb)
