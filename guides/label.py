"""Guides for a model with a class label y and a continuous code z: q(y|x) q(z|x, y).

They differ only in how the label site ``y`` is drawn when it is not observed; the site names
(``y`` as a one-hot or relaxed one-hot vector, ``z``) and the networks are the same, so the model
never changes when a guide is swapped. Each guide names the Pyro ELBO that trains it:

=================  =====================================================  ===================
name               q(y|x) at the unobserved site ``y``                    ELBO
=================  =====================================================  ===================
enum               OneHotCategorical, enumerated in parallel (exact sum)  TraceEnum_ELBO
gumbel             Gumbel-softmax relaxation, annealed temperature        TraceMeanField_ELBO
st-gumbel          straight-through Gumbel-softmax (hard forward)         TraceMeanField_ELBO
logistic-normal    softmax(sharpness * (logits + sigma * eps))            TraceMeanField_ELBO
sample             OneHotCategorical sample, score-function gradient      Trace_ELBO
=================  =====================================================  ===================

The relaxed guides take the KL of q(y|x) to the prior on the categoricals, in closed form
(:mod:`pyrossl.infer.relaxed`); the z term's KL is analytic too. A labelled example is scored with
its observed one-hot y exactly, whatever the guide.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
import pyro
import pyro.distributions as dist
from pyro import poutine
import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrossl.infer.relaxed import ConcreteLabel, LogisticNormalLabel
from pyrossl.nn import MLP, ConvEncoder, activation


def make_classifier(image_shape: Sequence[int], num_classes: int, hidden: Sequence[int], act: str, net: str) -> nn.Module:
    """The network of q(y|x): x -> class logits (MLP on flat pixels, or the conv encoder)."""
    if net == "conv":
        return ConvEncoder(image_shape, num_classes, hidden=hidden[0], act=act)
    num_features = math.prod(image_shape)
    return nn.Sequential(nn.Flatten(), MLP([num_features, *hidden, num_classes], act))


def make_features(image_shape: Sequence[int], hidden: Sequence[int], act: str, net: str) -> tuple[nn.Module, int]:
    """The input stage of an encoder: flat pixels (MLP) or conv features; returns it and its width."""
    if net == "conv":
        return ConvEncoder(image_shape, hidden[0], hidden=hidden[0], act=act), hidden[0]
    return nn.Flatten(), math.prod(image_shape)


class ConditionalGaussianEncoder(nn.Module):
    """q(z|x, y) = N(mu(x, y), diag sigma(x, y)^2) on top of a feature stage f(x).

    The first layer acts on the concatenation [f(x), y]; it is computed as W_x f(x) + W_y y, the
    same map, so that with y enumerated over K classes ([K, 1, K]) the costly W_x f(x) is computed
    once and broadcast, not K times.
    """

    def __init__(self, features: nn.Module, num_features: int, num_classes: int, z_dim: int, hidden: Sequence[int], act: str):
        super().__init__()
        self.features = features
        self.from_x = nn.Linear(num_features, hidden[0])
        self.from_y = nn.Linear(num_classes, hidden[0], bias=False)
        layers = [activation(act)]
        if len(hidden) > 1:
            layers += [MLP(list(hidden), act), activation(act)]
        self.body = nn.Sequential(*layers)
        self.loc = nn.Linear(hidden[-1], z_dim)
        self.scale = nn.Linear(hidden[-1], z_dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.from_x(self.features(x)) + self.from_y(y))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4


class LabelGuide(nn.Module):
    """q(y|x) q(z|x, y); subclasses say how an unobserved y is drawn (:meth:`label_site`)."""

    def __init__(self, image_shape, num_classes: int, z_dim: int, hidden=(500,), act: str = "softplus", net: str = "mlp",
                 classifier_net: str | None = None, shared_trunk: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.z_kl_weight = 1.0  # beta of the z term; the model's z site must carry the same weight
        if shared_trunk:
            # one feature layer h(x) under both q(y|x) and q(z|x, y): the ELBO of every unlabelled
            # image trains the classifier's features, not only its output through the label site
            features, width = make_features(image_shape, hidden, act, classifier_net or net)
            trunk = nn.Sequential(features, nn.Linear(width, hidden[0]), activation(act))
            self.classifier = nn.Sequential(trunk, nn.Linear(hidden[0], num_classes))
            self.z_encoder = ConditionalGaussianEncoder(trunk, hidden[0], num_classes, z_dim, hidden, act)
        else:
            self.classifier = make_classifier(image_shape, num_classes, hidden, act, classifier_net or net)
            self.z_encoder = ConditionalGaussianEncoder(*make_features(image_shape, hidden, act, net), num_classes, z_dim, hidden, act)

    @classmethod
    def make_elbo(cls) -> ELBO:
        """The Pyro ELBO that estimates the unlabelled term with this guide."""
        return TraceMeanField_ELBO()

    def label_site(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        with pyro.plate("data", x.shape[0]):
            if y is None:
                y = self.label_site(self.classifier(x))
            loc, scale = self.z_encoder(x, y)
            with poutine.scale(scale=self.z_kl_weight):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class EnumeratedLabelGuide(LabelGuide):
    """y summed out exactly: every class in parallel, weighted by q(y|x) (Kingma et al. 2014, eq. 7)."""

    @classmethod
    def make_elbo(cls) -> ELBO:
        return TraceEnum_ELBO(max_plate_nesting=1)

    def label_site(self, logits):
        return pyro.sample("y", dist.OneHotCategorical(logits=logits), infer={"enumerate": "parallel"})


class GumbelSoftmaxGuide(LabelGuide):
    """y ~ Gumbel-softmax(logits, temperature) (Jang et al. 2017); the temperature is annealed by the model."""

    straight_through = False

    def __init__(self, *args, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature

    def label_site(self, logits):
        return pyro.sample("y", ConcreteLabel(self.temperature, logits, straight_through=self.straight_through))


class StraightThroughGumbelGuide(GumbelSoftmaxGuide):
    """Gumbel-softmax with a hard one-hot forward pass and the relaxed sample's gradient."""

    straight_through = True


class LogisticNormalGuide(LabelGuide):
    """y = softmax(sharpness * (logits + sigma * eps)), eps ~ N(0, I)."""

    def __init__(self, *args, sigma: float = 1.0, sharpness: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma, self.sharpness = sigma, sharpness

    def label_site(self, logits):
        return pyro.sample("y", LogisticNormalLabel(logits, self.sigma, self.sharpness))


class SampledLabelGuide(LabelGuide):
    """y ~ q(y|x) sampled, with the score-function (REINFORCE) gradient: high variance, an ablation baseline."""

    @classmethod
    def make_elbo(cls) -> ELBO:
        return Trace_ELBO()

    def label_site(self, logits):
        return pyro.sample("y", dist.OneHotCategorical(logits=logits))


LABEL_GUIDES: dict[str, type[LabelGuide]] = {
    "enum": EnumeratedLabelGuide,
    "gumbel": GumbelSoftmaxGuide,
    "st-gumbel": StraightThroughGumbelGuide,
    "logistic-normal": LogisticNormalGuide,
    "sample": SampledLabelGuide,
}
