"""The supervised-only baseline: q(y|x)'s network trained on the labelled examples alone.

As a Pyro model it is y ~ Cat(softmax(f(x))) observed, with an empty guide: the ELBO is the
log-likelihood sum_n log p(y_n | x_n), i.e. minus the cross-entropy. Every semi-supervised number of
the zoo is read against it: same network (:func:`pyrossl.nn.make_encoder`), same labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrossl.config import setting
from pyrossl.infer.params import register
from pyrossl.nn import check_network_options, make_encoder
from pyrossl.zoo import ELBOModuleEntry, LabelClassifier, ZooModel


@dataclass
class ClassifierOptions:
    hidden: list[int] = setting([500], "widths of the hidden layers of the network of q(y|x)")
    act: str = setting("softplus", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv (images of at least 8x8, sides divisible by 4)")
    classifier_net: str | None = setting(None, "as M2's option: overrides net")

    def __post_init__(self):
        check_network_options(self)


class ClassifierModel(nn.Module):
    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Site ``y`` (class indices ``[n]``, observed when given) in plate ``data``."""
        register(self)
        logits = self.network(x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Categorical(logits=logits), obs=y)


class NoLatentGuide(nn.Module):
    """A model with no latent variable needs a guide that samples nothing."""

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        pass


class Classifier(ELBOModuleEntry, LabelClassifier, ZooModel):
    name = "classifier"
    description = "supervised-only baseline: the network of q(y|x) trained on the labelled examples"
    Options = ClassifierOptions
    guides = {"none": "no latent variables"}
    default_guide = "none"
    uses_labels = True
    uses_unlabelled = False
    selection_metric = "accuracy"
    objective_limits = {"iwae": "it has no latent variable: its ELBO is the exact log-likelihood log p(y|x)"}

    def __init__(self, meta: dict, options: ClassifierOptions, guide: str = "none", **settings):
        super().__init__(meta, options, guide, **settings)
        network = make_encoder(
            meta["image_shape"], meta["num_classes"], options.hidden, options.act, options.classifier_net or options.net
        )
        self.loss = self.make_elbo(analytic_kl=False)(ClassifierModel(network), NoLatentGuide())

    @property
    def classifier_network(self) -> nn.Module:
        return self.loss.model.network
