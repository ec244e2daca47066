"""Two guides for M2, from outside the package: q(z|x) that ignores y, and a smoothed q(y|x)."""

import math

import pyro
import pyro.distributions as dist
from torch import nn

from pyrossl.guides.label import LABEL_GUIDES, EnumeratedLabelGuide


class XOnlyEncoder(nn.Module):
    """q(z|x) = N(mu(x), diag sigma(x)^2), whatever the label."""

    def __init__(self, pixels, z_dim, width):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(pixels, width), nn.Softplus(), nn.Linear(width, 2 * z_dim))

    def loc_scale(self, x):
        loc, raw = self.net(x).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-4

    def distribution(self, x, y):
        return dist.Normal(*self.loc_scale(x)).to_event(1)

    def moments(self, x, y):
        loc, scale = self.loc_scale(x)
        return loc, scale**2

    def point(self, x, y):
        return self.loc_scale(x)[0]


@LABEL_GUIDES.register("qzx")
class QzxGuide(EnumeratedLabelGuide):
    description = "q(y|x) enumerated, q(z|x) ignoring y"

    def __init__(self, image_shape, num_classes, z_dim, hidden=(500,), *args, **kwargs):
        super().__init__(image_shape, num_classes, z_dim, hidden, *args, **kwargs)
        self.z_encoder = XOnlyEncoder(math.prod(image_shape), z_dim, hidden[0])


@LABEL_GUIDES.register("smoothed-enum")
class SmoothedEnumGuide(EnumeratedLabelGuide):
    """q(y|x) = (1 - eps) softmax(logits) + eps / K, summed out exactly."""

    description = "q(y|x) = (1 - eps) softmax(logits) + eps / K, enumerated"
    eps = 0.05

    def label_site(self, logits):
        probs = (1 - self.eps) * logits.softmax(-1) + self.eps / logits.shape[-1]
        return pyro.sample("y", dist.Categorical(probs=probs), infer={"enumerate": "parallel"})
