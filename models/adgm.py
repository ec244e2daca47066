"""The auxiliary and the skip deep generative models of Maaløe, Sønderby, Sønderby & Winther (2016).

Both add an auxiliary latent a to M2 (:mod:`pyrossl.models.m2`) and share one inference network,

    q(a, y, z | x) = q(a|x) q(y|a, x) q(z|a, y, x),

in which a is drawn first and conditions both the classifier q(y|a, x) and q(z|a, y, x): the classifier's
marginal q(y|x) = E_q(a|x)[q(y|a, x)] is a continuous mixture, more expressive than M2's q(y|x). The
generative models (y ~ Cat(1/K), z ~ N(0, I), Bernoulli pixels) differ in where a sits:

- ``adgm``, the auxiliary DGM: p(y) p(z) p(x|y, z) p(a|x, y, z). a leaves the marginal p(x, y, z) of M2
  untouched; it only makes the guide richer (their eq. 3-5);
- ``sdgm``, the skip DGM: p(y) p(z) p(a|y, z) p(x|a, y, z). a is a latent of the generative model, a
  second stochastic layer above x with a skip connection from (y, z) (their eq. 6).

The bounds (their eq. 7-9, with M2's per-batch means, see :mod:`pyrossl.zoo`): for a labelled pair

    -L(x, y) = -E_q(a|x) q(z|a,y,x)[log p(x, y, z, a) - log q(a|x) - log q(z|a, y, x)],

for an unlabelled image, with y summed out exactly (``TraceEnum_ELBO``, y enumerated in parallel),

    -U(x) = -E_q(a|x)[ sum_y q(y|a,x) (E_q(z|a,y,x)[log p(x, y, z, a) - log q(z|a,y,x)] - log q(y|a,x)) - log q(a|x) ],

and the classification term on labelled pairs, -alpha E_q(a|x)[log q(y|a, x)], one draw of a per
step (the same draw the labelled bound uses), weighted by ``aux_weight``. a is reparameterised; its
term log p(a|.) - log q(a|x) is a Monte Carlo estimate (p(a|.) depends on z, which q draws after a,
so no closed-form KL applies; the z term is scored by Monte Carlo too).

q(y|x) at test time averages q(y|a, x) over ``eval_samples`` draws of a: the same standard normal
draws for every image (a fixed seed, as the flow z-guide's moments), so predictions do not depend on
the batch an image is in and evaluation draws nothing from the training random state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.guides.label import as_one_hot
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options, make_z_guide
from pyrossl.infer.objective import AuxiliaryTermsMixin, SemiSupervisedELBO, particle_settings
from pyrossl.infer.params import register
from pyrossl.models.m2 import ClassConditional
from pyrossl.nn import ConvDecoder, activation, check_network_options, make_features, pixel_likelihood
from pyrossl.zoo import LabelClassifier, ZooModel


class LabelledTrace_ELBO(AuxiliaryTermsMixin, Trace_ELBO):
    """``Trace_ELBO`` with the guide's observed auxiliary sites as terms: the labelled bound plus
    alpha log q(y|a, x). Not the mean-field ELBO: q(z|a, y, x) depends on a, so a closed-form KL of a
    given one draw of z would be biased."""


@dataclass
class ADGMOptions(ZGuideOptions):
    z_dim: int = setting(100, "width of the continuous code z (Maaløe et al.: 100)")
    a_dim: int = setting(100, "width of the auxiliary latent a (Maaløe et al.: 100)")
    hidden: list[int] = setting(
        [500, 500], "widths of the hidden layers of every network (the decoder mirrors them; Maaløe et al.: 500, 500)"
    )
    act: str = setting("relu", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv: the pixels' input stage of the guide's networks and the decoder")
    aux_weight: float = setting(
        50.0, "alpha of the classification term -alpha E_q(a|x)[log q(y|a, x)] on labelled data; 0 turns it off"
    )
    eval_samples: int = setting(10, "draws of a ~ q(a|x) that q(y|x) = mean of q(y|a, x) averages when predicting")
    batch_norm: bool = setting(
        False,
        "batch normalisation after every hidden layer (with y enumerated, a layer that takes y sees each image once "
        "per class)",
    )

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if self.a_dim < 1:
            raise ConfigError(f"options.a_dim must be at least 1, not {self.a_dim}")
        if not self.aux_weight >= 0:
            raise ConfigError(f"options.aux_weight must be >= 0, not {self.aux_weight}")
        if self.eval_samples < 1:
            raise ConfigError(f"options.eval_samples must be at least 1, not {self.eval_samples}")


class JointInput(nn.Module):
    """The first layer on the concatenation [v_1, ..., v_m], computed as sum_i W_i v_i + b: the same map,
    but inputs with different leading dimensions (an enumerated y ``[K, 1, K]``, one a per image
    ``[n, d_a]``, z per class ``[K, n, d_z]``) broadcast instead of being copied, and the costly W_x x is
    computed once for all K classes."""

    def __init__(self, widths: Sequence[int], out: int):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(w, out, bias=i == 0) for i, w in enumerate(widths))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return sum(m(v) for m, v in zip(self.maps, inputs))


class FlatBatchNorm(nn.BatchNorm1d):
    """Batch normalisation of the last dimension over every leading one: with y enumerated, a ``[K, n, H]``
    layer is normalised over its K n rows, each image once per class (in training; at evaluation the
    running averages of those statistics are used)."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return super().forward(h.reshape(-1, h.shape[-1])).reshape(h.shape)


def hidden_stack(widths: Sequence[int], act: str, batch_norm: bool) -> nn.Sequential:
    """What follows a first layer of width ``widths[0]``: [batch norm,] activation, then for each next width
    a linear layer, [batch norm,] activation."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i:
            layers.append(nn.Linear(widths[i - 1], width))
        if batch_norm:
            layers.append(FlatBatchNorm(width))
        layers.append(activation(act))
    return nn.Sequential(*layers)


class JointNet(nn.Module):
    """(v_1, ..., v_m) -> features h of width ``hidden[-1]``: :class:`JointInput`, then the hidden layers."""

    def __init__(self, widths: Sequence[int], hidden: Sequence[int], act: str, batch_norm: bool = False):
        super().__init__()
        self.input = JointInput(widths, hidden[0])
        self.body = hidden_stack(hidden, act, batch_norm)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.body(self.input(*inputs))


class GaussianNet(JointNet):
    """(v_1, ..., v_m) -> (loc, scale, h) of a diagonal Gaussian, h the last hidden layer (a z-guide's context)."""

    def __init__(self, widths: Sequence[int], hidden: Sequence[int], act: str, out: int, batch_norm: bool = False):
        super().__init__(widths, hidden, act, batch_norm)
        self.loc = nn.Linear(hidden[-1], out)
        self.scale = nn.Linear(hidden[-1], out)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = super().forward(*inputs)
        return self.loc(h), nn.functional.softplus(self.scale(h)) + 1e-4, h


class PixelDecoder(nn.Module):
    """(v_1, ..., v_m) -> flat pixel logits ``[..., D]``: the hidden layers mirroring ``hidden``, or
    :class:`ConvDecoder`."""

    def __init__(
        self, widths: Sequence[int], image_shape, hidden: Sequence[int], act: str, net: str, batch_norm: bool = False
    ):
        super().__init__()
        self.input = JointInput(widths, hidden[-1])
        if net == "conv":
            self.body = hidden_stack(hidden[-1:], act, batch_norm)
            self.out = ConvDecoder(hidden[-1], image_shape, hidden=hidden[-1], act=act)
        else:
            self.body = hidden_stack(list(reversed(hidden)), act, batch_norm)
            self.out = nn.Linear(hidden[0], math.prod(image_shape))

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        h = self.body(self.input(*inputs))
        return self.out(h).reshape(*h.shape[:-1], -1)


class AuxiliaryModel(nn.Module):
    """p(y) p(z) p(x|y, z) p(a|x, y, z) (``skip=False``, the ADGM) or p(y) p(z) p(a|y, z) p(x|a, y, z)
    (``skip=True``, the SDGM); ``x=None`` samples."""

    def __init__(
        self, image_shape, num_classes: int, z_dim: int, a_dim: int, hidden, act, net, skip: bool, batch_norm=False
    ):
        super().__init__()
        self.skip = skip
        bn = batch_norm
        self.num_pixels = math.prod(image_shape)
        self.register_buffer("prior_logits", torch.zeros(num_classes), persistent=False)
        self.register_buffer("z_loc", torch.zeros(z_dim), persistent=False)
        if skip:
            self.aux = GaussianNet([z_dim, num_classes], list(reversed(hidden)), act, a_dim, bn)
            self.decoder = PixelDecoder([z_dim, num_classes, a_dim], image_shape, hidden, act, net, bn)
        else:
            self.decoder = PixelDecoder([z_dim, num_classes], image_shape, hidden, act, net, bn)
            self.aux = GaussianNet([self.num_pixels, z_dim, num_classes], hidden, act, a_dim, bn)

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, num: int | None = None):
        """Sites in plate ``data``: ``y`` (class indices ``[n]``, observed when ``y`` is given), ``z``
        ``[n, z_dim]``, ``a`` ``[n, a_dim]`` and ``x`` (flat pixels ``[n, D]``, observed when ``x`` is
        given). ``x``: images ``[n, C, H, W]`` or flat; ``y``: class indices ``[n]`` or one-hot ``[n, K]``;
        ``num``: how many to draw when neither is given."""
        register(self)
        n = x.shape[0] if x is not None else (y.shape[0] if y is not None else num)
        if y is not None and y.is_floating_point():
            y = y.argmax(-1)
        pixels = None if x is None else x.flatten(1)
        with pyro.plate("data", n):
            logits = self.prior_logits.expand(n, -1)
            label = as_one_hot(pyro.sample("y", dist.Categorical(logits=logits), obs=y), logits.shape[-1], logits.dtype)
            loc = self.z_loc.expand(n, -1)
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            if self.skip:
                a_loc, a_scale, _ = self.aux(z, label)
                a = pyro.sample("a", dist.Normal(a_loc, a_scale).to_event(1))
                return pyro.sample("x", pixel_likelihood(self.decoder(z, label, a)), obs=pixels)
            pixels = pyro.sample("x", pixel_likelihood(self.decoder(z, label)), obs=pixels)
            a_loc, a_scale, _ = self.aux(pixels, z, label)
            pyro.sample("a", dist.Normal(a_loc, a_scale).to_event(1))
            return pixels


class AuxiliaryGuide(nn.Module):
    """q(a|x) q(y|a, x) q(z|a, y, x), a drawn first and shared by both factors; y enumerated in
    parallel when not given. With a given y and ``aux_weight`` > 0 the guide also scores it at the
    observed auxiliary site ``y_x``: alpha log q(y|a, x), the classification term (a term of the
    objective, :class:`pyrossl.infer.objective.AuxiliaryTermsMixin`, not a latent)."""

    def __init__(
        self,
        image_shape,
        num_classes: int,
        z_dim: int,
        a_dim: int,
        hidden,
        act,
        net,
        z_guide,
        z_options=None,
        batch_norm: bool = False,
    ):
        super().__init__()
        bn = batch_norm
        self.num_classes = num_classes
        self.aux_weight = 0.0
        # one input stage per network (flat pixels, or a conv stack each), so the three factors share no weights
        self.a_features, width = make_features(image_shape, hidden, act, net)
        self.a_net = GaussianNet([width], hidden, act, a_dim, bn)
        self.y_features, width = make_features(image_shape, hidden, act, net)
        self.y_net = JointNet([width, a_dim], hidden, act, bn)
        self.y_logits = nn.Linear(hidden[-1], num_classes)
        self.z_features, width = make_features(image_shape, hidden, act, net)
        self.z_net = GaussianNet([width, a_dim, num_classes], hidden, act, z_dim, bn)
        self.z_guide = make_z_guide(z_guide, z_dim, hidden[-1], z_options)

    def a_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The location and scale of q(a|x)."""
        loc, scale, _ = self.a_net(self.a_features(x))
        return loc, scale

    def classify_given(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """The class logits of q(y|a, x) (``a`` may carry leading sample dimensions)."""
        return self.y_logits(self.y_net(self.y_features(x), a))

    def z_distribution(self, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor):
        """q(z|a, y, x) (``y`` one-hot)."""
        return self.z_guide.distribution(*self.z_net(self.z_features(x), a, y))

    def z_point(self, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.z_guide.point(*self.z_net(self.z_features(x), a, y))

    def z_moments(self, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.z_guide.moments(*self.z_net(self.z_features(x), a, y))

    def classify(self, x: torch.Tensor, num_samples: int = 10) -> torch.Tensor:
        """log q(y|x) = log mean_s q(y|a_s, x), a_s = mu(x) + sigma(x) eps_s with fixed eps_s (seed 0,
        the same for every image): a deterministic prediction that uses no global random state."""
        loc, scale = self.a_params(x)
        generator = torch.Generator(device=loc.device).manual_seed(0)
        eps = torch.randn((num_samples, 1, loc.shape[-1]), generator=generator, device=loc.device, dtype=loc.dtype)
        log_q = torch.log_softmax(self.classify_given(x, loc + scale * eps), -1)
        return log_q.logsumexp(0) - math.log(num_samples)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Sites in plate ``data``: ``a`` ``[n, a_dim]``, ``y`` (enumerated class indices) unless ``y`` is
        given, ``z`` ``[n, z_dim]``; with a given y and ``aux_weight`` > 0 also ``y_x``."""
        register(self)
        y = as_one_hot(y, self.num_classes, x.dtype)
        with pyro.plate("data", x.shape[0]):
            a = pyro.sample("a", dist.Normal(*self.a_params(x)).to_event(1))
            logits = self.classify_given(x, a)
            if y is None:
                label = pyro.sample("y", dist.Categorical(logits=logits), infer={"enumerate": "parallel"})
                label = as_one_hot(label, self.num_classes, x.dtype)
            else:
                label = y
                if self.aux_weight:
                    with poutine.scale(scale=self.aux_weight):
                        pyro.sample("y_x", dist.OneHotCategorical(logits=logits), obs=y, infer={"is_auxiliary": True})
            pyro.sample("z", self.z_distribution(x, a, label))


class ADGM(ClassConditional, LabelClassifier, ZooModel):
    """The auxiliary deep generative model (Maaløe et al. 2016): see the module's docstring."""

    name = "adgm"
    description = "auxiliary deep generative model (Maaløe et al. 2016): q(a|x) q(y|a,x) q(z|a,y,x), p(a|x,y,z)"
    Options = ADGMOptions
    guides = {"enum": "q(a|x) q(y|a,x) q(z|a,y,x): a drawn, y summed out exactly (parallel enumeration)"}
    default_guide = "enum"
    z_guides = Z_GUIDES
    uses_labels = True
    selection_metric = "accuracy"
    objective_limits = {"iwae": "its label y is enumerated, and the IWAE bound needs every latent reparameterised"}
    #: whether a sits above x in the generative model (the SDGM) rather than below it
    skip = False

    def __init__(self, meta: dict, options: ADGMOptions, guide: str = "enum", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        shape, k = meta["image_shape"], meta["num_classes"]
        self.model = AuxiliaryModel(
            shape, k, o.z_dim, o.a_dim, o.hidden, o.act, o.net, skip=self.skip, batch_norm=o.batch_norm
        )
        self.guide = AuxiliaryGuide(
            shape, k, o.z_dim, o.a_dim, o.hidden, o.act, o.net, self.z_guide_name, o, batch_norm=o.batch_norm
        )
        self.guide.aux_weight = o.aux_weight
        particles = particle_settings(self.objective)
        self.elbo = SemiSupervisedELBO(TraceEnum_ELBO(**particles), LabelledTrace_ELBO(**particles))

    @torch.no_grad()
    def class_logits(self, x, batch_size=1000):
        """log q(y|x), q(y|a, x) averaged over ``options.eval_samples`` fixed draws of a ~ q(a|x)."""
        return torch.cat([self.guide.classify(xb, self.options.eval_samples) for xb in torch.split(x, batch_size)])

    # --- generative side ----------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x, num_samples, batch_size=100):
        """log p(x) = log sum_y p(x, y): the sum over classes exact, each p(x, y) an IWAE bound over (a, z)."""
        return self.class_log_joint(x, num_samples, batch_size).logsumexp(-1)

    @torch.no_grad()
    def elbo_estimate(self, x, batch_size=100):
        """The guide's ELBO of log p(x), one draw of a per image and one of z per class (the unlabelled
        bound U(x) that ``TraceEnum_ELBO`` trains, per image, every weight 1):

            sum_y q(y|a,x) [log p(x, y, z_y, a) - log q(z_y|a, y, x) - log q(y|a, x)] - log q(a|x)."""
        out = []
        for xb in torch.split(x, batch_size):
            q_a = dist.Normal(*self.guide.a_params(xb)).to_event(1)
            a = q_a.rsample()
            log_q_a = q_a.log_prob(a)
            log_q_y = torch.log_softmax(self.guide.classify_given(xb, a), -1)
            per_class = []
            for c in range(self.meta["num_classes"]):
                y = torch.full((xb.shape[0],), c, device=xb.device)
                q_z = self.guide.z_distribution(xb, a, self.one_hot(y))
                z = q_z.rsample()
                trace = poutine.trace(poutine.condition(self.model, data={"a": a, "z": z})).get_trace(xb, y)
                trace.compute_log_prob()
                log_p = sum(trace.nodes[site]["log_prob"] for site in ("y", "z", "a", "x"))
                per_class.append(log_p - q_z.log_prob(z))
            log_joint = torch.stack(per_class, -1)  # log p(x, y, z, a) - log q(z|a, y, x), per class
            out.append((log_q_y.exp() * (log_joint - log_q_y)).sum(-1) - log_q_a)
        return torch.cat(out)

    # --- the code and pictures ----------------------------------------------------------------
    def a_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.guide.a_params(x)[0]

    @torch.no_grad()
    def code_moments(self, x):
        """The moments of q(z|a, y, x) at the mean of q(a|x) and the predicted class."""
        return self.guide.z_moments(x, self.a_mean(x), self.one_hot(self.predict(x)))

    latent_title = "means of q(z|a = E[a|x], x, y = predicted class)"

    @torch.no_grad()
    def latent(self, x):
        return self.guide.z_point(x, self.a_mean(x), self.one_hot(self.predict(x)))

    @torch.no_grad()
    def posterior(self, x):
        """q(y|x), q(a|x) (``a_loc``, ``a_scale``) and q(z|a, y, x) at the mean of a and the most probable
        class (``z_loc``, ``z_scale``)."""
        probs = self.predict_proba(x)
        a_loc, a_scale = self.guide.a_params(x)
        loc, var = self.guide.z_moments(x, a_loc, self.one_hot(probs.argmax(-1)))
        return {"y_probs": probs, "a_loc": a_loc, "a_scale": a_scale, "z_loc": loc, "z_scale": var.sqrt()}

    @torch.no_grad()
    def decode(self, y: torch.Tensor, z: torch.Tensor, a: torch.Tensor | None = None) -> torch.Tensor:
        """Pixel probabilities of p(x|y, z) (ADGM) or p(x|a, y, z) (SDGM; ``a`` None: the mean of
        p(a|y, z)) as images ``[n, C, H, W]``."""
        if self.skip:
            if a is None:
                a = self.model.aux(z, y)[0]
            logits = self.model.decoder(z, y, a)
        else:
            logits = self.model.decoder(z, y)
        return torch.sigmoid(logits).reshape(z.shape[0], *self.meta["image_shape"])

    @torch.no_grad()
    def reconstruct(self, x):
        y = self.one_hot(self.predict(x))
        a = self.a_mean(x)
        return self.decode(y, self.guide.z_point(x, a, y), a)


class SDGM(ADGM):
    """The skip deep generative model (Maaløe et al. 2016): the ADGM's guide, and a as a latent of the
    generative model, p(a|y, z) p(x|a, y, z)."""

    name = "sdgm"
    description = "skip deep generative model (Maaløe et al. 2016): the ADGM's guide, p(a|y,z) p(x|a,y,z)"
    skip = True
    samples_title = "p(x|a,y,z), a at the mean of p(a|y,z)"
