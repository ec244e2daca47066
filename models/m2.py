"""M2, the semi-supervised VAE of Kingma, Rezende, Mohamed & Welling (2014).

Generative model, for each image x:

    y ~ Cat(1/K),   z ~ N(0, I),   x ~ Bernoulli(sigmoid(f_theta(y, z)))

with the guide q(y|x) q(z|x, y); q(y|x) is the classifier. The objective (their eq. 9) sums

- for a labelled pair (x, y):   -L(x, y) = -E_q(z|x,y)[log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)]
- for an unlabelled x:          -U(x) = -E_q(y|x)[-L(x, y)] - H(q(y|x))
- the auxiliary classification loss on labelled pairs:  -alpha * log q(y|x)

each averaged over its batch (eq. 9 sums them over the dataset; here each step adds the batch means,
so ``aux_weight`` is per labelled example and the labelled ELBO is not swamped by the unlabelled one).
How y is drawn in U(x) is the guide's business
(:mod:`pyrossl.guides.label`): summed out exactly (``enum``), relaxed (``gumbel``, ``st-gumbel``,
``logistic-normal``) or sampled (``sample``); a labelled y is always scored exactly.

Two guides come with a variant of the model (vae_ssl's), in which the decoder takes a latent point
alpha of the simplex in place of the one-hot y, and y ~ Cat(alpha) is observed for labelled images:

    alpha ~ Dirichlet(c 1)                                   (``dirichlet``), or
    alpha = softmax(sharpness * l),  l ~ N(0, I_K)           (``logistic-normal-latent``),
    z ~ N(0, I),   x ~ Bernoulli(sigmoid(f_theta(alpha, z))),   y ~ Cat(alpha) where labelled.

Every image, labelled or not, is then scored by the ELBO of this model with q(alpha|x) q(z|x, alpha),
whose alpha (or l) KL is in closed form; ``train.objective = "iwae"`` trains these two with the
importance-weighted bound instead. A one-hot y is a vertex of the simplex, so sampling and decoding
with a class still means p(x | alpha = e_y, z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.evaluate import confusion_matrix, iwae_log_likelihood
from pyrossl.figures import Figure
from pyrossl.guides.label import LABEL_GUIDES, GumbelSoftmaxGuide, as_one_hot
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options
from pyrossl.infer.iwae import importance_log_weights
from pyrossl.infer.objective import LabelledMeanField_ELBO, SemiSupervisedELBO, make_elbo, particle_settings
from pyrossl.infer.params import register, with_module_local
from pyrossl.nn import MLP, ConvDecoder, activation, check_network_options, pixel_likelihood
from pyrossl.zoo import LabelClassifier, ZooModel


@dataclass
class M2Options(ZGuideOptions):
    z_dim: int = setting(50, "width of the continuous code z")
    hidden: list[int] = setting([500], "widths of the hidden layers (the encoder's; the decoder mirrors them)")
    act: str = setting("softplus", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv (28x28 images and the like)")
    classifier_net: str | None = setting(None, "the network of q(y|x) alone: mlp | conv; None: as net")
    shared_trunk: bool = setting(False, "q(y|x) and q(z|x, y) share their first layer h(x)")
    z_kl_weight: float = setting(1.0, "beta > 1 squeezes z, so the decoder has to take the class from y")
    aux_weight: float = setting(
        50.0, "alpha of the auxiliary loss -alpha * log q(y|x) on labelled data; 0 turns it off"
    )
    temperature_start: float = setting(1.0, "gumbel, st-gumbel: t_e = max(end, start * exp(-anneal * (e - 1)))")
    temperature_end: float = setting(0.5, "gumbel, st-gumbel: the floor of the annealed temperature")
    temperature_anneal: float = setting(
        0.05, "gumbel, st-gumbel: the rate of the temperature's exponential decay per epoch"
    )
    sigma: float = setting(1.0, "logistic-normal noise scale; logistic-normal-latent: the initial scale of q(logits|x)")
    sharpness: float = setting(1.0, "logistic-normal, logistic-normal-latent: alpha = softmax(sharpness * logits)")
    dirichlet_concentration: float = setting(1.0, "dirichlet: c of the prior p(alpha) = Dirichlet(c 1)")

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if self.aux_weight < 0 or not 0 < self.temperature_end <= self.temperature_start or self.temperature_anneal < 0:
            raise ConfigError(
                "options: aux_weight and temperature_anneal must be >= 0, and 0 < temperature_end <= temperature_start"
            )
        if not (self.sigma > 0 and self.sharpness > 0):
            raise ConfigError("options.sigma and options.sharpness must be positive")
        if not self.dirichlet_concentration > 0:
            raise ConfigError(f"options.dirichlet_concentration must be positive, not {self.dirichlet_concentration}")


class LabelledDecoder(nn.Module):
    """(y, z) -> pixel logits; the first layer is W_z z + W_y y (the concatenation, without copying)."""

    def __init__(
        self, image_shape, num_classes: int, z_dim: int, hidden=(500,), act: str = "softplus", net: str = "mlp"
    ):
        super().__init__()
        self.from_z = nn.Linear(z_dim, hidden[-1])
        self.from_y = nn.Linear(num_classes, hidden[-1], bias=False)
        self.act = activation(act)
        if net == "conv":
            self.net = ConvDecoder(hidden[-1], image_shape, hidden=hidden[-1], act=act)
        else:
            self.net = MLP([*reversed(hidden), math.prod(image_shape)], act)

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Flat pixel logits ``[..., D]``, the leading dimensions those of y and z broadcast: an enumerated
        y ``[K, 1, K]`` with a z drawn per class ``[K, n, d]`` or once for all classes ``[n, d]``."""
        h = self.from_z(z) + self.from_y(y)
        out = self.net(self.act(h))
        return out.reshape(*h.shape[:-1], -1)


LABEL_LATENTS = (None, "dirichlet", "logistic-normal")
#: the likelihoods of M2Model: Bernoulli pixels, or a diagonal Gaussian (M1+M2 models the codes of a VAE with it)
LIKELIHOODS = ("bernoulli", "gaussian")


class M2Model(nn.Module):
    """p(y) p(z) p(x|y, z); ``x=None`` samples.

    The label site ``y`` holds class indices, y ~ Categorical(1/K) (shape ``[n]``, enumerated ``[K, 1]``),
    so that Pyro's discrete machinery (``TraceEnum_ELBO``, ``infer_discrete``) works on it; the decoder
    takes its one-hot vector. ``relaxed_label`` (the guide's :attr:`~pyrossl.guides.label.LabelGuide.relaxed`)
    makes it a vector site, y ~ OneHotCategorical(1/K) ``[n, K]``, for guides that put relaxed points of
    the simplex there (Gumbel-softmax and the like).

    ``label_latent`` picks the model variant (the guide's :attr:`~pyrossl.guides.label.LabelGuide.label_latent`):
    None is M2 itself; ``"dirichlet"`` and ``"logistic-normal"`` decode from a latent alpha on the simplex,
    alpha ~ Dirichlet(concentration 1) at site ``alpha``, or alpha = softmax(sharpness * l) with
    l ~ N(0, I_K) at site ``logits``, and observe y ~ Categorical(alpha) at site ``y`` where y is given.

    ``likelihood``: ``"bernoulli"`` pixels, or ``"gaussian"``, x ~ N(mu(y, z), diag sigma(y, z)^2), for
    continuous x such as the codes of a VAE (:mod:`pyrossl.models.m1m2`).
    """

    def __init__(
        self,
        image_shape,
        num_classes: int,
        z_dim: int,
        hidden=(500,),
        act: str = "softplus",
        net: str = "mlp",
        label_latent: str | None = None,
        concentration: float = 1.0,
        sharpness: float = 1.0,
        relaxed_label: bool = False,
        likelihood: str = "bernoulli",
    ):
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, not {likelihood!r}")
        if label_latent not in LABEL_LATENTS:
            raise ValueError(f"label_latent must be one of {LABEL_LATENTS}, not {label_latent!r}")
        if relaxed_label and label_latent is not None:
            raise ValueError("relaxed_label is a variant of M2 itself (label_latent None)")
        self.label_latent, self.concentration, self.sharpness = label_latent, concentration, sharpness
        self.relaxed_label = relaxed_label
        self.likelihood = likelihood
        self.x_site = "x"  # the name of x's site (M1+M2 names M2's x "code", beneath its pixels' "x")
        self.z_kl_weight = 1.0  # beta of the z term (log p(z) - log q(z|x,y)); the guide carries the same
        self.register_buffer("prior_logits", torch.zeros(num_classes), persistent=False)
        self.register_buffer("z_loc", torch.zeros(z_dim), persistent=False)
        # a Gaussian x needs a location and a scale per coordinate
        out_shape = image_shape if likelihood == "bernoulli" else (2 * math.prod(image_shape),)
        self.decoder = LabelledDecoder(out_shape, num_classes, z_dim, hidden, act, net)

    def observation(self, out: torch.Tensor) -> dist.Distribution:
        """p(x|y, z) from the decoder's output: Bernoulli pixels of logits ``out``, or with
        ``likelihood="gaussian"`` N(loc, diag scale^2), ``out`` = [loc, scale before a softplus]."""
        if self.likelihood == "bernoulli":
            return pixel_likelihood(out)
        loc, scale = out.chunk(2, -1)
        return dist.Normal(loc, nn.functional.softplus(scale) + 1e-3).to_event(1)

    def label_input(self, n: int, y: torch.Tensor | None) -> torch.Tensor:
        """The decoder's label input: y's one-hot vector (or relaxed point), or alpha of the simplex-latent
        variants (inside the data plate). ``y``: class indices, or vectors with ``relaxed_label``."""
        logits = self.prior_logits.expand(n, -1)
        if self.relaxed_label:
            # relaxed guides put simplex points at this site: they are scored by the categorical KL
            # (pyrossl.infer.relaxed), so the one-hot support is not checked here
            return pyro.sample("y", dist.OneHotCategorical(logits=logits, validate_args=False), obs=y)
        if self.label_latent is None:
            value = pyro.sample("y", dist.Categorical(logits=logits), obs=y)
            if value.is_floating_point():  # a guide's vector replayed here would be scored as an index
                raise ValueError(
                    "m2's label site 'y' holds class indices (Categorical); a guide that puts one-hot or "
                    "relaxed vectors there declares relaxed = True (pyrossl.guides.label.LabelGuide)"
                )
            return as_one_hot(value, logits.shape[-1], logits.dtype)
        if self.label_latent == "dirichlet":
            alpha = pyro.sample(
                "alpha", dist.Dirichlet(torch.full_like(self.prior_logits, self.concentration).expand(n, -1))
            )
        else:
            loc = self.prior_logits.expand(n, -1)
            alpha = torch.softmax(
                self.sharpness * pyro.sample("logits", dist.Normal(loc, torch.ones_like(loc)).to_event(1)), -1
            )
        if y is not None:
            pyro.sample("y", dist.Categorical(probs=alpha), obs=y)
        return alpha

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, num: int | None = None):
        """Sites ``y`` (class indices ``[n]``, or one-hot ``[n, K]`` with ``relaxed_label``; observed when
        ``y`` is given; the simplex-latent variants: ``alpha`` or ``logits``, and ``y`` only when given),
        ``z`` ``[n, z_dim]`` and ``x`` (flat pixels ``[n, D]``, observed when ``x`` is given), all in plate
        ``data``. ``x``: images ``[n, C, H, W]`` or flat; ``y``: class indices ``[n]`` or one-hot ``[n, K]``
        (either is taken); ``num``: how many to draw when neither is given."""
        register(self)
        n = x.shape[0] if x is not None else (y.shape[0] if y is not None else num)
        with pyro.plate("data", n):
            return self.sites(n, x, y)

    def sites(self, n: int, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        """The sites of :meth:`forward` for ``n`` examples, inside a data plate the caller has opened (a
        model that puts M2 under a layer of its own, M1+M2's, samples more in the same plate)."""
        if self.relaxed_label:
            y = as_one_hot(y, self.prior_logits.shape[-1], self.prior_logits.dtype)
        elif y is not None and y.is_floating_point():
            y = y.argmax(-1)
        label = self.label_input(n, y)
        loc = self.z_loc.expand(n, -1)
        with poutine.scale(scale=self.z_kl_weight):
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
        return pyro.sample(
            self.x_site, self.observation(self.decoder(label, z)), obs=None if x is None else x.flatten(1)
        )


class ClassConditional:
    """What M2 and its relatives (M1+M2, ADGM, SDGM), models p(y) p(z) p(x|y, z, ...) with y ~ Cat and
    z ~ N(0, I), share: p(x, y) per class by importance sampling, the generative posterior p(y|x),
    per-class samples, and the figures (class samples, the confusion matrix, reconstructions, a t-SNE of
    the code). The entry gives ``model(x, y)`` and ``guide(x, y)``, ``decode(y, z)`` (y one-hot),
    ``predict``, ``reconstruct``, ``latent`` and ``latent_title``."""

    #: what the class samples decode, and what the t-SNE shows (the figures' titles)
    samples_title = "p(x|y,z)"
    latent_title = "means of q(z|x, y = predicted class)"

    def one_hot(self, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(y, self.meta["num_classes"]).to(torch.get_default_dtype())

    @torch.no_grad()
    @with_module_local  # the entry's own methods run so (ZooModel); a mixin's are not wrapped by it
    def class_log_joint(self, x, num_samples, batch_size=100):
        """log p(x, y) for every class y, ``[n, K]``: each an IWAE bound (``num_samples`` draws) over the
        model's other latents, drawn from the guide given y (the model's y site adds log p(y)).

        A proposal that ignores y (M2's simplex-latent guides: p(x, y) = E_p(alpha) p(z)[alpha_y
        p(x|alpha, z)], (alpha, z) from q(alpha|x) q(z|x, alpha); the ADGM's q(a|x)) leaves the bound valid
        (importance sampling needs only its support), if less tight than a y-aware one.
        """
        out = []
        for xb in torch.split(x, batch_size):
            per_class = []
            for c in range(self.meta["num_classes"]):
                y = self.one_hot(torch.full((xb.shape[0],), c, device=xb.device))
                log_w = importance_log_weights(self.model, self.guide, xb, y, num_samples=num_samples)
                per_class.append(iwae_log_likelihood(log_w))
            out.append(torch.stack(per_class, -1))
        return torch.cat(out)

    @torch.no_grad()
    def generative_posterior(self, x, num_samples=16, batch_size=100):
        """p(y|x) of the generative model, p(x, y) / sum_y' p(x, y'), with the IWAE estimates of p(x, y).

        The unlabelled term pulls q(y|x) towards this posterior; where the two agree on the unlabelled
        images, the unlabelled data has nothing left to teach the classifier. With M2's simplex-latent
        guides it is E_p(alpha|x)[alpha_y]."""
        return self.class_log_joint(x, num_samples, batch_size).softmax(-1)

    @torch.no_grad()
    def sample(self, n, y=None):
        device = self.model.z_loc.device
        if y is None:
            y = torch.randint(self.meta["num_classes"], (n,), device=device)
        z = torch.randn(n, self.options.z_dim, device=device)
        return self.decode(self.one_hot(y.to(device)), z)

    @torch.no_grad()
    def class_conditional_samples(self, columns: int = 10) -> torch.Tensor:
        """One row per class, one column per z ~ N(0, I): the style is held down a column."""
        k = self.meta["num_classes"]
        device = self.model.z_loc.device
        z = torch.randn(columns, self.options.z_dim, device=device).repeat(k, 1)
        y = torch.arange(k, device=device).repeat_interleave(columns)
        return self.decode(self.one_hot(y), z)

    def figures(self, x, y, outputs=None):
        classes = [str(c) for c in self.meta["classes"]] or [str(c) for c in range(self.meta["num_classes"])]
        cm = confusion_matrix(self.predict(x).cpu(), y.cpu(), self.meta["num_classes"])
        return [
            Figure.images(
                "class_samples",
                self.class_conditional_samples(),
                nrow=10,
                title=f"{self.samples_title}: one class per row, one z per column",
                row_labels=classes,
            ),
            Figure.confusion("confusion", cm, classes),
            Figure.reconstructions("reconstructions", x[:10], self.reconstruct(x[:10])),
            Figure.latent(
                "latent_tsne",
                self.latent(x[:1000]),
                y[:1000],
                classes=classes,
                title=f"t-SNE of the {self.latent_title}",
                method="tsne",
            ),
        ]


class M2(ClassConditional, LabelClassifier, ZooModel):
    name = "m2"
    description = "M2 semi-supervised VAE (Kingma et al. 2014) with swappable label guides"
    Options = M2Options
    #: the family of label guides (:data:`pyrossl.guides.label.LABEL_GUIDES`): a guide registered there,
    #: from a plugin too, fits M2 by its name
    guides = LABEL_GUIDES
    objectives = ("elbo", "iwae")
    default_guide = "enum"
    z_guides = Z_GUIDES
    uses_labels = True
    selection_metric = "accuracy"

    @classmethod
    def check_objective(cls, guide, z_guide, objective):
        super().check_objective(guide, z_guide, objective)
        if objective.name == "iwae" and not getattr(LABEL_GUIDES.cls(guide), "iwae", False):
            fitting = [name for name, c in LABEL_GUIDES.classes.items() if getattr(c, "iwae", False)]
            raise ConfigError(
                f"train.objective 'iwae' fits m2 only with guide {' or '.join(fitting)}, not '{guide}' "
                "(the IWAE bound needs every latent reparameterised and none enumerated)"
            )

    #: p(x|y, z) of the model (:data:`LIKELIHOODS`)
    likelihood = "bernoulli"

    def data_shape(self, meta: dict) -> tuple[int, ...]:
        """The shape of one x of the model: an image (the entry's networks take its pixels)."""
        return tuple(meta["image_shape"])

    def __init__(self, meta: dict, options: M2Options, guide: str = "enum", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        shape, k = self.data_shape(meta), meta["num_classes"]
        guide_cls = LABEL_GUIDES.cls(guide)
        extra = {keyword: getattr(o, option) for keyword, option in getattr(guide_cls, "option_arguments", {}).items()}
        self.model = M2Model(
            shape,
            k,
            o.z_dim,
            o.hidden,
            o.act,
            o.net,
            label_latent=guide_cls.label_latent,
            concentration=o.dirichlet_concentration,
            sharpness=o.sharpness,
            relaxed_label=guide_cls.relaxed,
            likelihood=self.likelihood,
        )
        self.guide = guide_cls(
            shape,
            k,
            o.z_dim,
            o.hidden,
            o.act,
            o.net,
            classifier_net=o.classifier_net,
            shared_trunk=o.shared_trunk,
            z_guide=self.z_guide_name,
            z_options=o,
            **extra,
        )
        # U(x) is estimated as the guide says; L(x, y) has no label to draw (the simplex-latent guides
        # draw alpha all the same, and the model observes y ~ Cat(alpha)): its z term's KL is
        # analytic with a diagonal z-guide (TraceMeanField_ELBO falls back to Monte Carlo otherwise)
        self.model.z_kl_weight = self.guide.z_kl_weight = o.z_kl_weight
        # the guide scores an observed label with q(y|x), weighted by alpha: the auxiliary term
        self.guide.aux_weight = o.aux_weight
        if self.objective.name == "iwae":  # check_objective let it through for the simplex-latent guides only
            self.elbo = SemiSupervisedELBO(make_elbo(self.objective), make_elbo(self.objective))
        else:
            self.elbo = SemiSupervisedELBO(
                guide_cls.make_elbo(self.objective), LabelledMeanField_ELBO(**particle_settings(self.objective))
            )

    def temperature(self, epoch: int) -> float:
        o = self.options
        return max(o.temperature_end, o.temperature_start * math.exp(-o.temperature_anneal * (epoch - 1)))

    def start_epoch(self, epoch):
        if isinstance(self.guide, GumbelSoftmaxGuide):
            self.guide.temperature = self.temperature(epoch)
            return {"temperature": self.guide.temperature}
        return {}

    @torch.no_grad()
    def class_logits(self, x, batch_size=1000):
        """q(y|x)'s logits, from the guide's classifier (``guide.classify``)."""
        return torch.cat([self.guide.classify(xb) for xb in torch.split(x, batch_size)])

    # --- generative side ----------------------------------------------------------------
    @torch.no_grad()
    def log_likelihood(self, x, num_samples, batch_size=100):
        """log p(x) = log sum_y p(x, y): the sum over classes is exact, each p(x|y) an IWAE bound over z.

        With a simplex-latent guide y is not a latent of p(x) = E[p(x|alpha, z)] (sum_y alpha_y = 1):
        one IWAE bound over (alpha, z), the model's y site absent.
        """
        if self.guide.label_latent is None:
            return self.class_log_joint(x, num_samples, batch_size).logsumexp(-1)
        return torch.cat(
            [
                iwae_log_likelihood(importance_log_weights(self.model, self.guide, xb, num_samples=num_samples))
                for xb in torch.split(x, batch_size)
            ]
        )

    @torch.no_grad()
    def elbo_estimate(self, x, batch_size=100):
        """The guide's ELBO of log p(x), one sample of z per class: sum_y q(y|x) L(x, y) + H(q(y|x)) with
        L(x, y) = log p(x, y, z) - log q(z|x, y), the enumerated ELBO of Kingma et al.'s U(x), whatever the
        label guide trains with (a relaxed guide's training loss bounds nothing). With a simplex-latent
        guide, the one-sample ELBO of its own model, log p(x, alpha, z) - log q(alpha, z|x)."""
        if self.guide.label_latent is not None:
            return super().elbo_estimate(x, batch_size)
        # with one sample of z the IWAE bound of each class is its one-sample L(x, y)
        log_joint = self.class_log_joint(x, 1, batch_size)
        log_q = torch.cat([torch.log_softmax(self.guide.classify(xb), -1) for xb in torch.split(x, batch_size)])
        return (log_q.exp() * (log_joint - log_q)).sum(-1)

    @torch.no_grad()
    def decode(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Pixel probabilities of p(x|y, z) as images [n, C, H, W]."""
        return torch.sigmoid(self.model.decoder(y, z)).reshape(z.shape[0], *self.meta["image_shape"])

    @torch.no_grad()
    def posterior(self, x):
        """q(y|x), and q(z|x, y) at the most probable class (``z_loc``, ``z_scale``)."""
        probs = self.predict_proba(x)
        loc, var = self.guide.z_moments(x, self.one_hot(probs.argmax(-1)))
        return {"y_probs": probs, "z_loc": loc, "z_scale": var.sqrt()}

    @torch.no_grad()
    def code_moments(self, x):
        """The moments of q(z|x, y) at the predicted class."""
        return self.guide.z_moments(x, self.one_hot(self.predict(x)))

    @torch.no_grad()
    def latent(self, x):
        """The mean of q(z|x, y) at the predicted class (a flow: its image of the base mean)."""
        return self.guide.z_point(x, self.one_hot(self.predict(x)))

    @torch.no_grad()
    def reconstruct(self, x):
        y = self.one_hot(self.predict(x))
        return self.decode(y, self.guide.z_point(x, y))
