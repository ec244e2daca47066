"""Guides for a model with a class label y and a continuous code z: q(y|x) q(z|x, y).

The first five differ only in how the label site ``y`` is drawn when it is not observed; the site
names (``y``, ``z``) and the networks are the same. ``y`` holds class indices (a Categorical site,
which Pyro's enumeration and ``infer_discrete`` work on) for ``enum`` and ``sample``; the relaxed
guides put points of the simplex there and say so (``relaxed = True``), and the model then holds y
as a one-hot vector (OneHotCategorical), the one change a swap makes to it. The last two go with a
model of their own (vae_ssl's):
the label's relaxed proxy alpha, a point of the simplex, is a latent of the *generative model*,

    alpha ~ p(alpha),  z ~ N(0, I),  x ~ p(x | alpha, z),  y ~ Cat(alpha) (observed for labelled x only),

and the guide draws alpha from q(alpha|x) for every image, labelled or not. Each guide names the Pyro
ELBO that trains it (``make_elbo``) and says what its unlabelled loss U(x) is (``unlabelled_loss``);
the family's table, made from the classes, is ``print(LABEL_GUIDES.table())`` and is on the site's
M2 page.

"bound": U(x) is an estimate of -ELBO >= -log p(x) of the model it trains. "surrogate": the relaxed
guides feed a simplex point to the decoder but take, as the label's KL, the closed-form KL of
Cat(softmax(logits)) to the categorical prior (:mod:`pyrossl.infer.relaxed`), not a KL of what they
actually draw, so their U(x) bounds nothing. For ``logistic-normal`` even the class the sample points
to, argmax(logits + sigma eps), does not follow softmax(logits). ``dirichlet`` and
``logistic-normal-latent`` take the exact KLs of their latents (torch's Dirichlet/Dirichlet and
Normal/Normal), and ``train.objective = "iwae"`` trains them with the importance-weighted bound.

q(z|x, .) is the z-guide of the family (:mod:`pyrossl.guides.zguide`, ``z_guide =``), conditioned on
the vector the decoder takes (y, or alpha): the z term's KL is analytic for ``diag-normal`` and a
Monte Carlo estimate otherwise (``TraceMeanField_ELBO`` takes the closed form where one is
registered, per site). With the first five guides a labelled example is scored with its observed
y exactly; with the last two the model observes y ~ Cat(alpha) and alpha is still drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from torch import nn

from pyrossl.guides.family import GuideFamily
from pyrossl.guides.zguide import DEFAULT_Z_GUIDE, ZGuideOptions, make_z_guide
from pyrossl.infer.objective import Objective, particle_settings
from pyrossl.infer.objective import make_elbo as objective_elbo
from pyrossl.infer.params import register
from pyrossl.infer.relaxed import ConcreteLabel, LogisticNormalLabel
from pyrossl.nn import MLP, activation, make_encoder, make_features


def as_one_hot(y: torch.Tensor | None, num_classes: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A label batch as the one-hot (or simplex) vectors the label site holds: class indices ``[n]`` are
    encoded, vectors ``[n, K]`` kept."""
    if y is None or y.is_floating_point():
        return y
    return nn.functional.one_hot(y.long(), num_classes).to(dtype)


class ConditionalGaussianEncoder(nn.Module):
    """q(z|x, y) on top of a feature stage f(x): hidden features h(x, y) and (mu, sigma) of them, made
    into a distribution by the z-guide (``diag-normal``: N(mu(x, y), diag sigma(x, y)^2)).

    The first layer acts on the concatenation [f(x), y]; it is computed as W_x f(x) + W_y y, the
    same map, so that with y enumerated over K classes ([K, 1, K]) the costly W_x f(x) is computed
    once and broadcast, not K times.
    """

    def __init__(
        self,
        features: nn.Module,
        num_features: int,
        num_classes: int,
        z_dim: int,
        hidden: Sequence[int],
        act: str,
        z_guide: str = DEFAULT_Z_GUIDE,
        z_options: ZGuideOptions | None = None,
    ):
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
        self.z_guide = make_z_guide(z_guide, z_dim, hidden[-1], z_options)

    def encode_all(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The base location and scale of q(z|x, y), and the features h(x, y) they are read from."""
        h = self.body(self.from_x(self.features(x)) + self.from_y(y))
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4, h

    def distribution(self, x: torch.Tensor, y: torch.Tensor):
        return self.z_guide.distribution(*self.encode_all(x, y))

    def point(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A deterministic code per image: the mean of a Gaussian q(z|x, y), the flow's image of its base mean."""
        return self.z_guide.point(*self.encode_all(x, y))

    def moments(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance of each unit of z under q(z|x, y) (Monte Carlo for a flow)."""
        return self.z_guide.moments(*self.encode_all(x, y))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of each unit of z under q(z|x, y)."""
        mean, var = self.moments(x, y)
        return mean, var.sqrt()


#: M2's label guides, by name; as a mapping, name -> description (what ``M2.guides`` is). Register your
#: own with ``@LABEL_GUIDES.register("name")`` (from a plugin: :mod:`pyrossl.plugins`). M2 constructs a
#: member as ``cls(image_shape, num_classes, z_dim, hidden, act, net, classifier_net=..., shared_trunk=...,
#: z_guide=..., z_options=..., **extra)``, the extra keywords named by its ``option_arguments``
#: (constructor keyword -> option), and sets ``z_kl_weight`` and ``aux_weight`` on the instance.
#: Subclassing :class:`LabelGuide` gives all of it; override what differs.
def _label_site(cls) -> str:
    site = getattr(cls, "latent_site", "y")
    if site != "y":
        return f"{site} (the model's own latent)"
    return "y, relaxed vector" if cls.relaxed else "y, class index"


def _elbo_name(cls) -> str:
    name = type(cls.make_elbo()).__name__
    return f"{name} (or iwae)" if getattr(cls, "iwae", False) else name


LABEL_GUIDES = GuideFamily(
    "label guides of m2",
    columns={
        "site drawn": _label_site,
        "Pyro ELBO": _elbo_name,
        "unlabelled loss": lambda cls: getattr(cls, "unlabelled_loss", "-"),
    },
    requires={
        "forward": "forward(x, y=None): the guide, sampling the label's site unless y is given, then z",
        "classify": "classify(x) -> the class logits of q(y|x) (the classifier M2 predicts with)",
        "z_moments": "z_moments(x, y) -> the mean and variance of each unit of q(z|x, y), y one-hot",
        "z_point": "z_point(x, y) -> a representative code of q(z|x, y) (its mean for a Gaussian)",
        "make_elbo": "make_elbo(objective) (a classmethod) -> the Pyro ELBO of the unlabelled term",
        "label_latent": "None, or the simplex-latent model variant it needs: 'dirichlet' or 'logistic-normal'",
        "relaxed": "False if the label site y holds class indices (Categorical), True if it holds one-hot or relaxed "
        "vectors",
    },
)


class LabelGuide(nn.Module):
    """q(y|x) q(z|x, y); subclasses say how an unobserved y is drawn (:meth:`label_site`), or, where the
    label's proxy is a latent of the model (:attr:`label_latent`), what is drawn (:meth:`label_input`)."""

    #: the model's label variant (:class:`pyrossl.models.m2.M2Model`): None (y ~ Cat(1/K) feeds the
    #: decoder), "dirichlet" or "logistic-normal" (a simplex latent feeds it, y ~ Cat(alpha))
    label_latent: ClassVar[str | None] = None
    #: whether the guide puts vectors of the simplex at the label site ``y`` (a relaxation): the model
    #: then holds y as a one-hot vector (OneHotCategorical) instead of a class index (Categorical)
    relaxed: ClassVar[bool] = False
    #: the kind of unlabelled loss U(x) it trains, a bound on -log p(x) or a surrogate bounding nothing
    #: (the guide table's column)
    unlabelled_loss: ClassVar[str] = "a bound on -log p(x)"
    #: whether every site is reparameterised and none enumerated, so ``train.objective = "iwae"`` trains it
    iwae: ClassVar[bool] = False
    #: constructor keyword -> M2 option it takes (a temperature, a noise scale)
    option_arguments: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        image_shape,
        num_classes: int,
        z_dim: int,
        hidden=(500,),
        act: str = "softplus",
        net: str = "mlp",
        classifier_net: str | None = None,
        shared_trunk: bool = False,
        z_guide: str = DEFAULT_Z_GUIDE,
        z_options: ZGuideOptions | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.z_kl_weight = 1.0  # beta of the z term; the model's z site must carry the same weight
        self.aux_weight = 0.0  # alpha of the auxiliary term alpha log q(y|x) on an observed label (site y_x)
        if shared_trunk:
            # one feature layer h(x) under both q(y|x) and q(z|x, y): the ELBO of every unlabelled
            # image trains the classifier's features, not only its output through the label site
            features, width = make_features(image_shape, hidden, act, classifier_net or net)
            trunk = nn.Sequential(features, nn.Linear(width, hidden[0]), activation(act))
            self.classifier = nn.Sequential(trunk, nn.Linear(hidden[0], num_classes))
            self.z_encoder = ConditionalGaussianEncoder(
                trunk, hidden[0], num_classes, z_dim, hidden, act, z_guide, z_options
            )
        else:
            self.classifier = make_encoder(image_shape, num_classes, hidden, act, classifier_net or net)
            self.z_encoder = ConditionalGaussianEncoder(
                *make_features(image_shape, hidden, act, net), num_classes, z_dim, hidden, act, z_guide, z_options
            )

    @classmethod
    def make_elbo(cls, objective: Objective | None = None) -> ELBO:
        """The Pyro ELBO that estimates the unlabelled term with this guide (``objective.particles`` samples)."""
        return TraceMeanField_ELBO(**particle_settings(objective))

    def label_site(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The class logits of q(y|x)."""
        return self.classifier(x)

    def z_moments(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance of each unit of z under q(z|x, y) (``y`` one-hot or simplex)."""
        return self.z_encoder.moments(x, y)

    def z_point(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """A representative code of q(z|x, y): the mean of a Gaussian, the flow's image of its base mean."""
        return self.z_encoder.point(x, y)

    def label_input(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The vector that q(z|x, .) (and the model's decoder) takes: an observed one-hot y as it is,
        else the one-hot vector of a draw at the label site (a class index, or a relaxed vector as it
        is). Inside the data plate."""
        if y is not None:
            return y
        return as_one_hot(self.label_site(self.classify(x)), self.num_classes, x.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Sites in plate ``data``: the label's (``y``, or the simplex latent) unless y is observed, and
        ``z``; with an observed y and ``aux_weight`` > 0 also ``y_x``, the observed auxiliary site
        alpha log q(y|x) (Kingma et al. 2014, eq. 9), a term of the objective, not a latent
        (:class:`pyrossl.infer.objective.AuxiliaryTermsMixin`). ``y``: class indices or one-hot."""
        register(self)
        with pyro.plate("data", x.shape[0]):
            self.sites(x, y)

    def sites(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """The sites of :meth:`forward`, inside a data plate the caller has opened (a guide that draws its
        ``x`` first, M1+M2's code, in the same plate; ``x`` may then carry leading sample dimensions)."""
        y = as_one_hot(y, self.num_classes, x.dtype)
        label = self.label_input(x, y)
        with poutine.scale(scale=self.z_kl_weight):
            pyro.sample("z", self.z_encoder.distribution(x, label))
        if y is not None and self.aux_weight:
            with poutine.scale(scale=self.aux_weight):
                pyro.sample("y_x", dist.OneHotCategorical(logits=self.classify(x)), obs=y, infer={"is_auxiliary": True})


@LABEL_GUIDES.register("enum")
class EnumeratedLabelGuide(LabelGuide):
    """y summed out exactly: every class in parallel, weighted by q(y|x) (Kingma et al. 2014, eq. 7)."""

    description = "q(y|x) summed out exactly, every class in parallel (Kingma et al. 2014, eq. 7)"

    @classmethod
    def make_elbo(cls, objective=None) -> ELBO:
        return TraceEnum_ELBO(**particle_settings(objective))

    def label_site(self, logits):
        return pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})


@LABEL_GUIDES.register("gumbel")
class GumbelSoftmaxGuide(LabelGuide):
    """y ~ Gumbel-softmax(logits, temperature) (Jang et al. 2017); the temperature is annealed by the model."""

    description = (
        "Gumbel-softmax sample of y, temperature annealed (temperature_start/end/anneal); "
        "KL of the categoricals (Jang et al. 2017)"
    )
    option_arguments = {"temperature": "temperature_start"}
    relaxed = True
    unlabelled_loss = "a surrogate"
    straight_through = False

    def __init__(self, *args, temperature: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature = temperature

    def label_site(self, logits):
        return pyro.sample("y", ConcreteLabel(self.temperature, logits, straight_through=self.straight_through))


@LABEL_GUIDES.register("st-gumbel")
class StraightThroughGumbelGuide(GumbelSoftmaxGuide):
    """Gumbel-softmax with a hard one-hot forward pass and the relaxed sample's gradient."""

    description = "Gumbel-softmax with a hard one-hot forward pass and the relaxed gradient (straight-through)"

    straight_through = True


@LABEL_GUIDES.register("logistic-normal")
class LogisticNormalGuide(LabelGuide):
    """y = softmax(sharpness * (logits + sigma * eps)), eps ~ N(0, I)."""

    description = "y = softmax(sharpness * (logits + sigma * eps)), eps ~ N(0, I); KL of the categoricals"
    relaxed = True
    unlabelled_loss = "a surrogate"
    option_arguments = {"sigma": "sigma", "sharpness": "sharpness"}

    def __init__(self, *args, sigma: float = 1.0, sharpness: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sigma, self.sharpness = sigma, sharpness

    def label_site(self, logits):
        return pyro.sample("y", LogisticNormalLabel(logits, self.sigma, self.sharpness))


@LABEL_GUIDES.register("sample")
class SampledLabelGuide(LabelGuide):
    """y ~ q(y|x) sampled, with the score-function (REINFORCE) gradient: high variance, an ablation baseline."""

    description = "a discrete sample of q(y|x), score-function gradient (the known failure, as a baseline)"

    @classmethod
    def make_elbo(cls, objective=None) -> ELBO:
        return Trace_ELBO(**particle_settings(objective))

    def label_site(self, logits):
        return pyro.sample("y", dist.Categorical(logits=logits))


class SimplexLatentGuide(LabelGuide):
    """q(alpha|x) q(z|x, alpha) for a model whose label proxy alpha (on the simplex) is a latent:

        alpha ~ p(alpha),  z ~ N(0, I),  x ~ p(x|alpha, z),  y ~ Cat(alpha) where y is observed

    (the models of vae_ssl). alpha is drawn for every image: a labelled one too, whose y the model then
    observes, so :meth:`label_input` ignores y. Both subclasses have a closed-form KL of their latent to
    its prior, so ``TraceMeanField_ELBO`` (or, with ``train.objective = "iwae"``, the IWAE bound) trains them.
    """

    #: the name of the latent sample site, in the model and here
    latent_site: ClassVar[str]
    iwae = True
    unlabelled_loss = "a bound of its own model"

    @classmethod
    def make_elbo(cls, objective: Objective | None = None) -> ELBO:
        return objective_elbo(objective)  # TraceMeanField_ELBO, or IWAE_ELBO for train.objective = "iwae"

    def latent_distribution(self, x: torch.Tensor) -> dist.Distribution:
        """q of the latent site given x, batch shape ``[n]``."""
        raise NotImplementedError

    def simplex(self, latent: torch.Tensor) -> torch.Tensor:
        """alpha, the point of the simplex that the latent site's value stands for."""
        return latent

    def label_input(self, x, y):
        return self.simplex(pyro.sample(self.latent_site, self.latent_distribution(x)))


@LABEL_GUIDES.register("dirichlet")
class DirichletLabelGuide(SimplexLatentGuide):
    """q(alpha|x) = Dirichlet(beta(x)), beta(x) = softplus(logits(x)) + 0.01, reparameterised; the model's
    prior is Dirichlet(c 1), and KL(q || p) is torch's closed form.

    softplus rather than exp: beta grows linearly, not exponentially, with a logit, so logits of +-50
    give beta of at most ~50 (exp would give 5e21, where lgamma/digamma of the sum lose all float32
    precision and the Gamma sampler's gradients overflow); it is increasing, so argmax beta (the mode
    class of q, that of its mean beta / sum beta) is argmax logits, the classifier's prediction. The floor
    keeps beta away from 0, where softplus of a very negative logit underflows and the reparameterised
    Gamma gradient blows up (its largest value over 1000 draws: ~1e5 at beta = 1e-3, ~2e3 at 1e-2, ~24 at 0.1).
    """

    description = (
        "the model's label latent alpha ~ Dirichlet(dirichlet_concentration) decoded in place of y, "
        "y ~ Cat(alpha) observed where labelled; q(alpha|x) = Dirichlet(softplus(logits) + 0.01), exact KL"
    )
    label_latent = "dirichlet"
    latent_site = "alpha"
    floor = 1e-2

    def concentration(self, logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(logits) + self.floor

    def latent_distribution(self, x):
        return dist.Dirichlet(self.concentration(self.classify(x)))


@LABEL_GUIDES.register("logistic-normal-latent")
class LogisticNormalLatentGuide(SimplexLatentGuide):
    """q(logits|x) = N(m(x), diag s(x)^2) with m(x) the classifier's logits and a learned per-image scale
    s(x) = softplus(W f(x) + b) + 1e-4, f the z-encoder's feature stage; the model's prior is N(0, I_K)
    and alpha = softmax(sharpness * logits) feeds the decoder. KL(q || p) is the Normal/Normal closed form.

    W starts at zero and b at softplus^-1(sigma), so every image starts with the scale ``sigma`` and
    learns its own (vae_ssl's LogisticNormal learns it too). The prediction, argmax m(x), is the mode
    class of q: argmax softmax(sharpness * m) = argmax m.
    """

    description = (
        "the model's label latent l ~ N(0, I), alpha = softmax(sharpness * l); q(l|x) = N(logits, s(x)^2) "
        "with a learned scale starting at sigma, exact KL"
    )
    label_latent = "logistic-normal"
    latent_site = "logits"
    option_arguments = {"sigma": "sigma", "sharpness": "sharpness"}

    def __init__(self, *args, sigma: float = 1.0, sharpness: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.sharpness = sharpness
        self.logit_scale = nn.Linear(self.z_encoder.from_x.in_features, self.num_classes)
        with torch.no_grad():
            self.logit_scale.weight.zero_()
            self.logit_scale.bias.fill_(math.log(math.expm1(sigma)))

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(self.logit_scale(self.z_encoder.features(x))) + 1e-4

    def latent_distribution(self, x):
        return dist.Normal(self.classify(x), self.scale(x)).to_event(1)

    def simplex(self, latent):
        return torch.softmax(self.sharpness * latent, dim=-1)
