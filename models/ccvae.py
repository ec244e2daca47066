"""CCVAE: the characteristic-capturing VAE of Joy et al., "Capturing label characteristics in VAEs" (ICLR 2021).

Generative model: p(y) p(z_c|y) p(z_s) p(x|z_c, z_s), with z_c one dimension per label and a learned
conditional prior p(z_c|y): per binary attribute a location and scale for y = 1 and for y = 0; for
one categorical label with K classes, z_c has K dimensions and each class its own location and scale
vector. p(y) is the label frequency of the labelled training data (probabilities, not logits).
Inference: q(z|x) and a diagonal classifier q(y|z_c) (:mod:`pyrossl.guides.ccvae`).

Objective (:class:`CCVAE_ELBO`). A labelled pair (x, y) contributes the paper's eq. 4,

    E_q(z|x)[ w log( p(x|z) p(z_c|y) p(z_s) / (q(y|z_c) q(z|x)) ) ] + log q(y|x) + log p(y),
    w = q(y|z_c) / q(y|x),

a bound on log p(x, y) whose posterior is q(z|x) q(y|z_c) / q(y|x); an unlabelled x contributes the
ELBO of p(x) with y drawn from q(y|z_c) (enumerated exactly for a categorical label).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

from pyrossl.config import setting
from pyrossl.errors import ConfigError
from pyrossl.figures import Figure
from pyrossl.guides.ccvae import CCVAE_GUIDES, label_values
from pyrossl.guides.zguide import Z_GUIDES, ZGuideOptions, check_z_guide_options
from pyrossl.infer.objective import DifferentiableLossELBO, DispatchingELBO
from pyrossl.infer.params import register
from pyrossl.nn import BernoulliDecoder, check_network_options
from pyrossl.zoo import ZooModel

LIKELIHOODS = ("bernoulli", "laplace")


@dataclass
class CCVAEOptions(ZGuideOptions):
    z_style: int = setting(20, "dimensions of z_s; z_c has one per label (per class for a categorical label)")
    hidden: list[int] = setting([500], "widths of the hidden layers (the encoder's; the decoder mirrors them)")
    act: str = setting("relu", "activation between layers: relu | softplus | elu | tanh | gelu")
    net: str = setting("mlp", "mlp | conv (images with sides divisible by 4: 28x28, 32x32, 64x64)")
    likelihood: str = setting("bernoulli", "bernoulli | laplace (location = sigmoid(decoder), scale below)")
    laplace_scale: float = setting(0.1, "laplace likelihood: the scale of each pixel's Laplace around its decoded mean")
    k: int = setting(100, "samples of z_c in the Monte Carlo estimate of q(y|x)")
    prior_separation: float = setting(2.0, "initial |location| of the conditional prior (+ for y = 1, - for y = 0)")

    def __post_init__(self):
        check_network_options(self)
        check_z_guide_options(self)
        if self.z_style < 0:
            raise ConfigError(f"options.z_style must be at least 0, not {self.z_style}")
        if self.likelihood not in LIKELIHOODS:
            raise ConfigError(f"options.likelihood must be one of {', '.join(LIKELIHOODS)}, not '{self.likelihood}'")
        if self.k < 1:
            raise ConfigError(f"options.k must be at least 1, not {self.k}")
        if self.laplace_scale <= 0:
            raise ConfigError(f"options.laplace_scale must be positive, not {self.laplace_scale}")


class ConditionalPrior(nn.Module):
    """p(z_c|y): a learned diagonal Gaussian per label value.

    Binary attributes (``multilabel``): ``loc[i, v]``, ``scale[i, v]`` for attribute i taking value v.
    A categorical label with K classes: ``loc[k]``, ``scale[k]`` are K-vectors. Locations start at
    +separation on a label's own dimension for y = 1 (class k: dimension k) and -separation otherwise.
    """

    def __init__(self, num_labels: int, multilabel: bool, separation: float = 2.0):
        super().__init__()
        self.multilabel = multilabel
        if multilabel:
            loc = torch.tensor([-separation, separation]).expand(num_labels, 2).clone()
        else:
            loc = separation * (2 * torch.eye(num_labels) - 1)
        self.loc = nn.Parameter(loc)
        self.log_scale = nn.Parameter(torch.zeros_like(loc))

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of z_c for labels ``y``: float [..., L] in {0, 1}, or class indices [...]."""
        if self.multilabel:
            y = y.long()
            labels = torch.arange(self.loc.shape[0], device=y.device)
            return self.loc[labels, y], self.log_scale[labels, y].exp()
        return self.loc[y], self.log_scale[y].exp()


class CCVAEModel(nn.Module):
    def __init__(self, image_shape, num_labels: int, z_style: int, multilabel: bool, options: CCVAEOptions):
        super().__init__()
        self.multilabel = multilabel
        self.image_shape = tuple(image_shape)
        self.likelihood, self.laplace_scale = options.likelihood, options.laplace_scale
        self.prior = ConditionalPrior(num_labels, multilabel, options.prior_separation)
        self.decoder = BernoulliDecoder(image_shape, num_labels + z_style, options.hidden, options.act, options.net)
        # p(y): set from the labelled training data (set_label_prior); saved with the checkpoint
        probs = torch.full((num_labels,), 0.5) if multilabel else torch.full((num_labels,), 1.0 / num_labels)
        self.register_buffer("y_probs", probs)
        self.register_buffer("z_s_loc", torch.zeros(z_style), persistent=False)

    def label_prior(self, n: int) -> dist.Distribution:
        probs = self.y_probs.expand(n, -1)
        return dist.Bernoulli(probs=probs).to_event(1) if self.multilabel else dist.Categorical(probs=probs)

    def pixels(self, z: torch.Tensor) -> dist.Distribution:
        """p(x|z) over flat pixels (event dim 1)."""
        logits = self.decoder(z)
        if self.likelihood == "laplace":
            return dist.Laplace(torch.sigmoid(logits), self.laplace_scale).to_event(1)
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)  # grey levels: a cross-entropy

    def forward(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, num: int | None = None):
        """Sites in plate ``data``: ``y`` (class indices ``[n]``, or attributes ``[n, L]`` in {0, 1};
        observed when given), ``z_c`` ``[n, L]``, ``z_s`` ``[n, z_style]`` and ``x`` (flat pixels, observed
        when ``x`` is given); ``num``: how many to draw when neither is given."""
        register(self)
        n = x.shape[0] if x is not None else (y.shape[0] if y is not None else num)
        y = label_values(y, self.multilabel, self.y_probs.dtype)
        with pyro.plate("data", n):
            y = pyro.sample("y", self.label_prior(n), obs=y)
            loc_c, scale_c = self.prior(y)
            z_c = pyro.sample("z_c", dist.Normal(loc_c, scale_c).to_event(1))
            loc_s = self.z_s_loc.expand(n, -1)
            z_s = pyro.sample("z_s", dist.Normal(loc_s, torch.ones_like(loc_s)).to_event(1))
            z = torch.cat([z_c, z_s], -1)  # z_c is the guide's sample: enumerating y leaves it unbatched
            return pyro.sample("x", self.pixels(z), obs=None if x is None else x.flatten(1))


class CCVAE_ELBO(DispatchingELBO):
    """The CCVAE objective as a Pyro ELBO (the pattern of ``pyro.contrib.cevae.TraceCausalEffect_ELBO``);
    ``loss``, ``loss_and_grads`` and ``differentiable_loss`` agree.

    ``(model, guide, x)`` (no labels) is scored by TraceEnum_ELBO: the guide enumerates a categorical y,
    or samples binary attributes. ``(model, guide, x, y)`` by :class:`CCVAELabelled_ELBO`, minus eq. 4.
    With ``num_particles`` = k both average k draws of q(z|x).
    """

    def __init__(self, enumerate_labels: bool = True, num_particles: int = 1):
        super().__init__(num_particles=num_particles, max_plate_nesting=1)
        settings = {"num_particles": num_particles, "vectorize_particles": num_particles > 1, "max_plate_nesting": 1}
        # binary attributes are sampled: Trace_ELBO scores them (a score-function term) without
        # TraceEnum_ELBO's warning that nothing is enumerated
        self.unlabelled = TraceEnum_ELBO(**settings) if enumerate_labels else Trace_ELBO(**settings)
        self.labelled = CCVAELabelled_ELBO(num_particles=num_particles)

    def choose(self, model, guide, x=None, y=None):
        return self.unlabelled if y is None else self.labelled


class CCVAELabelled_ELBO(DifferentiableLossELBO):
    """Minus eq. 4 of Joy et al. (2021), summed over a labelled batch, read off one model and one guide
    trace: the guide's observed auxiliary sites give log q(y|z_c) (``y``), the weight's numerator
    (``y_weight``) and log q(y|x) (``y_x``). With ``num_particles`` = k, the mean of k independent
    estimates (each with a single draw of q(z|x) inside the expectation).
    """

    def __init__(self, num_particles: int = 1):
        super().__init__(num_particles=num_particles, max_plate_nesting=1)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("CCVAELabelled_ELBO traces in differentiable_loss")

    def differentiable_loss(self, model, guide, x, y):
        return (
            -sum(self.labelled_terms(model, guide, x, y)["objective"].sum() for _ in range(self.num_particles))
            / self.num_particles
        )

    @staticmethod
    def labelled_terms(model, guide, x, y) -> dict[str, torch.Tensor]:
        """Per-example terms of eq. 4 (each [B]) from one model and one guide trace."""
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
        log_p = {name: site["log_prob"] for name, site in model_trace.nodes.items() if site["type"] == "sample"}
        log_q = {name: site["log_prob"] for name, site in guide_trace.nodes.items() if site["type"] == "sample"}
        log_qy_zc, log_qy_x = log_q["y"], log_q["y_x"]
        weight = torch.exp(log_q["y_weight"] - log_qy_x)
        inner = log_p["x"] + log_p["z_c"] + log_p["z_s"] - log_qy_zc - log_q["z_c"] - log_q["z_s"]
        objective = weight * inner + log_qy_x + log_p["y"]
        return {
            "objective": objective,
            "weight": weight,
            "inner": inner,
            "log_qy_x": log_qy_x,
            "log_py": log_p["y"],
            "log_qy_zc": log_qy_zc,
        }


class CCVAE(ZooModel):
    name = "ccvae"
    description = (
        "characteristic-capturing VAE (Joy et al. 2021): conditional prior p(z_c|y), diagonal classifier q(y|z_c)"
    )
    Options = CCVAEOptions
    guides = CCVAE_GUIDES
    objective_limits = {
        "iwae": "its labelled bound is eq. 4 of Joy et al., not an ELBO to weight, and its label y is enumerated"
    }
    default_guide = "ccvae"
    z_guides = Z_GUIDES
    uses_labels = True
    selection_metric = "accuracy"

    def __init__(self, meta: dict, options: CCVAEOptions, guide: str = "ccvae", **settings):
        super().__init__(meta, options, guide, **settings)
        o = options
        shape, labels, multilabel = meta["image_shape"], meta["num_classes"], bool(meta.get("multilabel"))
        self.multilabel = multilabel
        self.model = CCVAEModel(shape, labels, o.z_style, multilabel, o)
        self.guide = CCVAE_GUIDES.cls(guide)(
            shape, labels, o.z_style, multilabel, o.hidden, o.act, o.net, o.k, z_guide=self.z_guide_name, z_options=o
        )
        self.elbo = CCVAE_ELBO(enumerate_labels=not multilabel, num_particles=self.objective.particles)

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.meta.get("attributes") or ()) if self.multilabel else tuple(self.meta.get("classes") or ())

    def set_label_prior(self, y_labelled: torch.Tensor) -> None:
        """p(y) from the labels of the labelled training data: attribute frequencies, or class frequencies."""
        if y_labelled.numel() == 0:
            return
        if self.multilabel:
            probs = y_labelled.float().mean(0).clamp(1e-3, 1 - 1e-3)
        else:
            probs = torch.bincount(y_labelled, minlength=self.meta["num_classes"]).float().clamp_min(1e-6)
            probs = probs / probs.sum()  # an unseen class keeps a tiny probability
        self.model.y_probs.copy_(probs)

    def prepare(self, encode_data) -> None:
        self.set_label_prior(encode_data()["y_labelled"])

    # --- classification --------------------------------------------------------------------
    def _q_y(self, x: torch.Tensor) -> torch.Tensor:
        """q(y|x), by Monte Carlo over k samples of z_c ~ q(z_c|x)."""
        logits = self.guide.label_logits(self.guide.blocks(x)[0].sample((self.options.k,)))
        return torch.sigmoid(logits).mean(0) if self.multilabel else logits.softmax(-1).mean(0)

    def _labels(self, probs: torch.Tensor) -> torch.Tensor:
        return (probs > 0.5).to(torch.int64) if self.multilabel else probs.argmax(-1)

    @torch.no_grad()
    def predict_proba(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        """q(y|x): attribute probabilities [N, L] or class probabilities [N, K]."""
        return torch.cat([self._q_y(xb) for xb in torch.split(x, batch_size)])

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
        return self._labels(self.predict_proba(x, batch_size))

    @torch.no_grad()
    def evaluation_counts(self, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
        """A table of (predicted, true) classes; for attributes, each one's number of right answers."""
        from pyrossl.evaluate import label_table

        pred = self.predict(x, batch_size)
        if not self.multilabel:
            k = self.meta["num_classes"]
            return {"labels": label_table(pred, y, k, k)}
        return {"correct": (pred == y.long()).sum(0).cpu(), "count": torch.tensor(x.shape[0])}

    def metrics_from_counts(self, counts: dict[str, torch.Tensor]) -> dict:
        from pyrossl.evaluate import classification_metrics, pairs_from_table

        if not self.multilabel:
            return classification_metrics(*pairs_from_table(counts["labels"]), self.meta["num_classes"])
        per_attribute = counts["correct"].double() / counts["count"]
        return {"accuracy": per_attribute.mean().item(), "per_attribute_accuracy": per_attribute.tolist()}

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        loc, var = self.guide.moments(x)
        return {"y_probs": self._q_y(x), "z_loc": loc, "z_scale": var.sqrt()}

    @torch.no_grad()
    def code_moments(self, x):
        return self.guide.moments(x)

    @torch.no_grad()
    def prior_moments(self, x, code_mean):
        """z_c: each unit's moments under sum_y p(y) p(z_c|y) (p(y) the labelled data's frequencies); z_s: N(0, 1)."""
        prior, probs = self.model.prior, self.model.y_probs
        loc, var = prior.loc, (2 * prior.log_scale).exp()
        if self.multilabel:  # attribute i: y_i = 1 with probability p_i
            w = torch.stack([1 - probs, probs], -1)
            mean_c = (w * loc).sum(-1)
            var_c = (w * (var + loc**2)).sum(-1) - mean_c**2
        else:  # class k with probability p_k: rows of loc
            mean_c = probs @ loc
            var_c = probs @ (var + loc**2) - mean_c**2
        s = self.options.z_style
        mean = torch.cat([mean_c, mean_c.new_zeros(s)])
        return mean.expand_as(code_mean), torch.cat([var_c, var_c.new_ones(s)]).expand_as(code_mean)

    @torch.no_grad()
    def latent(self, x: torch.Tensor) -> torch.Tensor:
        return self.guide.point(x)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel means [N, C, H, W] for codes z = [z_c, z_s]."""
        d = self.model.pixels(z)
        mean = d.base_dist.loc if self.model.likelihood == "laplace" else d.base_dist.probs
        return mean.reshape(-1, *self.model.image_shape)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.latent(x))

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None) -> torch.Tensor:
        """Images from p(x|z) with z_c ~ p(z_c|y) (y ~ p(y) when not given) and z_s ~ N(0, I)."""
        device = self.model.y_probs.device
        y = self.model.label_prior(n).sample() if y is None else y.to(device)
        loc, scale = self.model.prior(y)
        z_c = torch.distributions.Normal(loc, scale).sample()
        z_s = torch.randn(n, self.options.z_style, device=device)
        return self.decode(torch.cat([z_c, z_s], -1))

    @torch.no_grad()
    def swap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Characteristic swap: encode x, set z_c to the prior mean of labels ``y``, keep z_s, decode."""
        z = self.latent(x).clone()
        z[:, : self.meta["num_classes"]] = self.model.prior(y.to(z.device))[0]
        return self.decode(z)

    @torch.no_grad()
    def walk(self, x: torch.Tensor, label: int, steps: int = 7) -> torch.Tensor:
        """Latent walk [steps, N, C, H, W]: z_c[label] moves from its y = 0 prior mean to its y = 1 prior mean
        (a categorical label: z_c from the prior mean of x's predicted class to that of class ``label``), z_s held."""
        z, c, prior = self.latent(x), self.meta["num_classes"], self.model.prior.loc
        start = None if self.multilabel else prior[self._labels(self._q_y(x))]  # one prediction for every frame
        frames = []
        for t in torch.linspace(0, 1, steps):
            zt = z.clone()
            if self.multilabel:
                zt[:, label] = (1 - t) * prior[label, 0] + t * prior[label, 1]
            else:
                zt[:, :c] = (1 - t) * start + t * prior[label]
            frames.append(self.decode(zt))
        return torch.stack(frames)

    # --- interventions, judged by an independent classifier (pyrossl.judge) -----------------
    @torch.no_grad()
    def _judged(self, judge, z: torch.Tensor, batch_size: int) -> torch.Tensor:
        return torch.cat([judge.predict(self.decode(zb)) for zb in torch.split(z, batch_size)])

    @torch.no_grad()
    def _judged_ends(self, judge, z: torch.Tensor, i: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The judge's attributes [N, A] for codes ``z`` with z_c[i] at the y_i = 0 and at the y_i = 1 prior mean."""
        ends = []
        for v in (0, 1):
            zi = z.clone()
            zi[:, i] = self.model.prior.loc[i, v]
            ends.append(self._judged(judge, zi, batch_size).cpu())
        return ends[0], ends[1]

    @torch.no_grad()
    def intervention_accuracy(self, x: torch.Tensor, judge, batch_size: int = 1000) -> dict:
        """How often ``judge`` sees the label that z_c was set to.

        A categorical label: for every class k, encode ``x``, set z_c to class k's prior mean, keep z_s,
        decode, and count the images the judge labels k. Attributes: for every attribute i and value v,
        set z_c[i] alone to the prior mean of y_i = v and count the images whose judged attribute i is v.
        ``judge.predict`` maps images to class indices [N] or attribute values [N, A]
        (:func:`pyrossl.judge.fit_judge`). Returns the mean and the rate per class (per attribute).
        """
        z = self.latent(x)
        prior = self.model.prior.loc
        rates = []
        if not self.multilabel:
            for k in range(self.meta["num_classes"]):
                zk = z.clone()
                zk[:, : prior.shape[0]] = prior[k]
                rates.append((self._judged(judge, zk, batch_size).cpu() == k).float().mean().item())
            return {"intervention_accuracy": sum(rates) / len(rates), "per_class": rates}
        for i in range(prior.shape[0]):
            at_0, at_1 = self._judged_ends(judge, z, i, batch_size)
            rates.append(((at_0[:, i] == 0).float().mean().item() + (at_1[:, i] == 1).float().mean().item()) / 2)
        return {"intervention_accuracy": sum(rates) / len(rates), "per_attribute": rates}

    @torch.no_grad()
    def walk_effects(self, x: torch.Tensor, judge, batch_size: int = 1000) -> dict:
        """What a latent walk changes, as the judge sees it (attributes only).

        For each attribute i, encode ``x`` and decode twice: with z_c[i] at the y_i = 0 prior mean and
        at the y_i = 1 prior mean, everything else held. ``own``: the fraction of images the judge sees
        go from y_i = 0 to y_i = 1; ``other``: the fraction of (image, attribute j != i) pairs whose
        judged value differs between the two ends. Means over attributes and the rates per attribute.
        """
        if not self.multilabel:
            raise ValueError("walk_effects needs binary attributes; for a class label use intervention_accuracy")
        count = self.model.prior.loc.shape[0]
        own, other = [], []
        for i, (start, end) in enumerate(self._walk_ends(x, judge, batch_size)):
            own.append(((start[:, i] == 0) & (end[:, i] == 1)).float().mean().item())
            others = [j for j in range(count) if j != i]
            other.append((start[:, others] != end[:, others]).float().mean().item() if others else 0.0)
        return {
            "walk_own_change": sum(own) / count,
            "walk_other_change": sum(other) / count,
            "per_attribute_own": own,
            "per_attribute_other": other,
        }

    @torch.no_grad()
    def walk_matrix(self, x: torch.Tensor, judge, batch_size: int = 1000) -> torch.Tensor:
        """M[i, j]: the fraction of images whose judged attribute j differs between the two ends of
        the walk of attribute i (z_c[i] at its y_i = 0 and at its y_i = 1 prior mean, all else held).
        A CCVAE that captures each characteristic in its own unit has M near the identity."""
        if not self.multilabel:
            raise ValueError("walk_matrix needs binary attributes")
        return torch.stack([(start != end).float().mean(0) for start, end in self._walk_ends(x, judge, batch_size)])

    def _walk_ends(self, x: torch.Tensor, judge, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each attribute i, the judge's attributes of ``x`` decoded at both ends of the walk of i."""
        z = self.latent(x)
        return [self._judged_ends(judge, z, i, batch_size) for i in range(self.model.prior.loc.shape[0])]

    def figures(self, x, y, outputs=None):
        x = x[:10]
        figures = [Figure.reconstructions("reconstructions", x, self.reconstruct(x))]
        if not self.multilabel:
            k = self.meta["num_classes"]
            swapped = [self.swap(x, torch.full((x.shape[0],), c, dtype=torch.long, device=x.device)) for c in range(k)]
            rows = torch.stack([x.reshape(swapped[0].shape), *swapped])  # the originals above their swaps
            names = [str(n) for n in (self.label_names or range(k))]
            figures.append(
                Figure.images(
                    "swaps",
                    rows.reshape(-1, *rows.shape[2:]),
                    nrow=x.shape[0],
                    title="swaps: row k sets z_c to class k's prior mean, z_s kept",
                    row_labels=["original", *names],
                )
            )
        else:
            frames = torch.stack([self.walk(x[:1], i)[:, 0] for i in range(self.meta["num_classes"])])
            figures.append(
                Figure.images(
                    "walks",
                    frames.reshape(-1, *frames.shape[2:]),
                    nrow=frames.shape[1],
                    title="latent walks: row i moves z_c[i] from the y=0 to the y=1 prior mean",
                    row_labels=self.label_names or None,
                )
            )
        return figures
