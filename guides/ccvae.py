"""The CCVAE guide (Joy et al. 2021): an encoder q(z|x) = q(z_c|x) q(z_s|x) and a diagonal classifier q(y|z_c).

Sites, in the ``data`` plate:

- ``z_c`` (one dimension per label: per attribute, or per class of a categorical label) and ``z_s``
  (style), from one encoder; each block's q is the chosen z-guide (:mod:`pyrossl.guides.zguide`,
  ``diag-normal`` by default): q(z|x) = q(z_c|x) q(z_s|x), so a low-rank or flow z-guide correlates the
  units within a block (the model scores z_c and z_s as two sites, with their own priors);
- ``y`` ~ q(y|z_c). Unlabelled: enumerated in parallel for a categorical label (the exact sum over
  classes), sampled for binary attributes (Pyro scores it with a score-function gradient).
  Labelled: observed, so the trace holds log q(y|z_c);
- labelled only, two more observed sites that :class:`pyrossl.models.ccvae.CCVAE_ELBO` reads:
  ``y_weight`` (q(y|z_c) with z_c detached: the importance weight's numerator, whose gradient reaches
  the classifier and not the encoder, as in the authors' code) and ``y_x``, the Monte Carlo estimate
  q(y|x) = 1/k sum_j q(y|z_c^j), z_c^j ~ q(z_c|x), written as a uniform mixture of the k classifiers'
  distributions so that its log-probability is the log of that average.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrossl.guides.family import GuideFamily
from pyrossl.guides.normal import CodeGuide
from pyrossl.guides.zguide import DEFAULT_Z_GUIDE, ZGuideOptions, make_z_guide
from pyrossl.infer.params import register


class DiagonalClassifier(nn.Module):
    """q(y|z_c): label i's logit is ``weight[i] * z_c[i] + bias[i]``, from its own latent dimension only."""

    def __init__(self, num_labels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_labels))
        self.bias = nn.Parameter(torch.zeros(num_labels))

    def forward(self, z_c: torch.Tensor) -> torch.Tensor:
        return z_c * self.weight + self.bias


def label_distribution(logits: torch.Tensor, multilabel: bool) -> dist.Distribution:
    """Independent Bernoulli attributes (event dim 1) or one categorical label, from classifier logits."""
    if multilabel:
        return dist.Bernoulli(logits=logits).to_event(1)
    return dist.Categorical(logits=logits)


#: CCVAE's guides, by name; as a mapping, name -> description (what ``CCVAE.guides`` is). CCVAE
#: constructs a member as ``cls(image_shape, num_labels, z_style, multilabel, hidden, act, net, k,
#: z_guide=..., z_options=...)``; :class:`CCVAEGuide` is the paper's.
CCVAE_GUIDES = GuideFamily(
    "guides of ccvae",
    requires={
        "forward": "forward(x, y=None): sites z_c, z_s and y ~ q(y|z_c); with y given, the auxiliary sites y, "
        "y_weight, y_x of eq. 4",
        "blocks": "blocks(x) -> (q(z_c|x), q(z_s|x)), batch shape [n] each",
        "label_logits": "label_logits(z_c) -> the logits of q(y|z_c)",
        "moments": "moments(x) -> the mean and variance of each unit of q(z|x), z = [z_c, z_s]",
        "point": "point(x) -> a representative code z = [z_c, z_s] per image",
    },
)


def label_values(y: torch.Tensor | None, multilabel: bool, dtype: torch.dtype) -> torch.Tensor | None:
    """A label batch as the label site holds it: attributes as floats in {0, 1}, classes as indices."""
    if y is None:
        return None
    return y.to(dtype) if multilabel else y.long()


@CCVAE_GUIDES.register("ccvae")
class CCVAEGuide(nn.Module):
    def __init__(
        self,
        image_shape,
        num_labels: int,
        z_style: int,
        multilabel: bool,
        hidden=(500,),
        act: str = "relu",
        net: str = "mlp",
        k: int = 100,
        z_guide: str = DEFAULT_Z_GUIDE,
        z_options: ZGuideOptions | None = None,
    ):
        super().__init__()
        self.num_labels, self.z_style, self.multilabel, self.k = num_labels, z_style, multilabel, k
        # the encoder's own z-guide stays diagonal: its (mu, sigma) are split into the two blocks below
        self.encoder = CodeGuide(image_shape, num_labels + z_style, hidden, act, net)
        width = self.encoder.head.features
        self.z_c_guide = make_z_guide(z_guide, num_labels, width, z_options)
        # an empty style block (z_style = 0) has nothing to correlate
        self.z_s_guide = make_z_guide(z_guide if z_style else DEFAULT_Z_GUIDE, z_style, width, z_options)
        self.classifier = DiagonalClassifier(num_labels)

    description = "encoder q(z|x) and diagonal classifier q(y|z_c); y enumerated (categorical) or sampled (attributes)"

    def label_logits(self, z_c: torch.Tensor) -> torch.Tensor:
        """The logits of q(y|z_c): each label's from its own unit of z_c."""
        return self.classifier(z_c)

    def _per_block(self, method: str, encoded) -> tuple:
        """``method`` of the z_c and the z_s guide, each on its slice of the encoder's (mu, sigma) and on h."""
        c = self.num_labels
        loc, scale, h = encoded
        return (
            getattr(self.z_c_guide, method)(loc[:, :c], scale[:, :c], h),
            getattr(self.z_s_guide, method)(loc[:, c:], scale[:, c:], h),
        )

    def blocks(self, x: torch.Tensor, encoded=None) -> tuple[dist.Distribution, dist.Distribution]:
        """q(z_c|x) and q(z_s|x), each of batch shape [B] (``encoded``: the encoder's output for x, if at hand)."""
        return self._per_block("distribution", encoded or self.encoder.encode_all(x))

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and variance of each unit of q(z|x), z = [z_c, z_s] (Monte Carlo for a flow)."""
        (mc, vc), (ms, vs) = self._per_block("moments", self.encoder.encode_all(x))
        return torch.cat([mc, ms], -1), torch.cat([vc, vs], -1)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and standard deviation of each unit of q(z|x), z = [z_c, z_s]."""
        mean, var = self.moments(x)
        return mean, var.sqrt()

    def point(self, x: torch.Tensor) -> torch.Tensor:
        """A deterministic code z = [z_c, z_s] per image (the posterior mean of a Gaussian z-guide)."""
        return torch.cat(self._per_block("point", self.encoder.encode_all(x)), -1)

    def q_y_x(self, q_c: dist.Distribution, k: int | None = None) -> dist.Distribution:
        """q(y|x) ~= 1/k sum_j q(y|z_c^j), z_c^j ~ q(z_c|x) (reparameterised): a uniform mixture, batch shape [B]."""
        k = k or self.k
        z = q_c.rsample((k,)).transpose(0, 1)  # [B, k, c]
        logits = self.classifier(z)
        mixing = dist.Categorical(logits=torch.zeros(logits.shape[:-1], dtype=logits.dtype, device=logits.device))
        return dist.MixtureSameFamily(mixing, label_distribution(logits, self.multilabel))

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Sites in plate ``data``: ``z_c``, ``z_s``, and ``y`` ~ q(y|z_c) (enumerated for a categorical
        label) when y is not given; with y given, the observed auxiliary sites ``y`` (q(y|z_c)),
        ``y_weight`` (the same with z_c held fixed) and ``y_x`` (q(y|x)) that :class:`~pyrossl.models.ccvae.CCVAE_ELBO`
        reads. ``y``: class indices or attributes in {0, 1}."""
        register(self)
        y = label_values(y, self.multilabel, x.dtype)
        encoded = self.encoder.encode_all(x)
        q_c, q_s = self.blocks(x, encoded)
        with pyro.plate("data", x.shape[0]):
            z_c = pyro.sample("z_c", q_c)
            pyro.sample("z_s", q_s)
            q_y = label_distribution(self.classifier(z_c), self.multilabel)
            if y is None:
                infer = {} if self.multilabel else {"enumerate": "parallel"}
                pyro.sample("y", q_y, infer=infer)
                return
            auxiliary = {"is_auxiliary": True}  # terms of eq. 4, not latents
            pyro.sample("y", q_y, obs=y, infer=auxiliary)
            pyro.sample(
                "y_weight", label_distribution(self.classifier(z_c.detach()), self.multilabel), obs=y, infer=auxiliary
            )
            # a fresh distribution: q_c's transforms cache the site's own sample, which these draws must not evict
            pyro.sample("y_x", self.q_y_x(self.blocks(x, encoded)[0]), obs=y, infer=auxiliary)
