"""Network building blocks shared by the zoo: MLPs, image encoders and decoders, and the pixel likelihood
the decoders' logits parameterise. No model logic here."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from pyrossl.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "softplus": nn.Softplus, "elu": nn.ELU, "tanh": nn.Tanh, "gelu": nn.GELU}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation '{name}' (valid: {', '.join(ACTIVATIONS)})") from None


class MLP(nn.Sequential):
    """Linear layers of the given sizes with an activation between them (none after the last)."""

    def __init__(self, sizes: Sequence[int], act: str = "relu"):
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
            if i:
                layers.append(activation(act))
            layers.append(nn.Linear(n_in, n_out))
        super().__init__(*layers)


class GaussianHead(nn.Module):
    """An MLP whose output is the location and (softplus) scale of a diagonal Gaussian."""

    def __init__(self, sizes: Sequence[int], act: str = "relu", min_scale: float = 1e-4):
        super().__init__()
        self.body = MLP(list(sizes[:-1]), act)
        self.act = activation(act) if len(sizes) > 2 else nn.Identity()
        self.loc = nn.Linear(sizes[-2], sizes[-1])
        self.scale = nn.Linear(sizes[-2], sizes[-1])
        self.min_scale = min_scale

    @property
    def features(self) -> int:
        """The width of the last hidden layer, from which the location and scale are read."""
        return self.loc.in_features

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The last hidden layer's activations (a z-guide's context)."""
        return self.act(self.body(h))

    def params(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The location and scale from :meth:`hidden`'s output."""
        return self.loc(hidden), nn.functional.softplus(self.scale(hidden)) + self.min_scale

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.params(self.hidden(h))


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (32, 64 channels) and a dense layer: [B, C, H, W] -> [B, out]."""

    def __init__(self, image_shape: Sequence[int], out_features: int, hidden: int = 256, act: str = "relu"):
        super().__init__()
        c, h, w = image_shape
        check_conv_shape(image_shape)
        self.net = nn.Sequential(
            nn.Conv2d(c, 32, 4, 2, 1),
            activation(act),
            nn.Conv2d(32, 64, 4, 2, 1),
            activation(act),
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), hidden),
            activation(act),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_encoder(image_shape: Sequence[int], out_features: int, hidden: Sequence[int], act: str, net: str) -> nn.Module:
    """x -> a vector of ``out_features``: an MLP on flat pixels, or :class:`ConvEncoder`. The network of
    q(y|x) (class logits), of the supervised-only classifier and of the GAE's code f(x) alike."""
    if net == "conv":
        return ConvEncoder(image_shape, out_features, hidden=hidden[0], act=act)
    # flatten the example's own dimensions only: leading sample dimensions (a code drawn k times) are kept
    return nn.Sequential(nn.Flatten(-len(image_shape)), MLP([math.prod(image_shape), *hidden, out_features], act))


def make_features(image_shape: Sequence[int], hidden: Sequence[int], act: str, net: str) -> tuple[nn.Module, int]:
    """The input stage of an encoder: flat pixels (MLP) or conv features; returns it and its width."""
    if net == "conv":
        return ConvEncoder(image_shape, hidden[0], hidden=hidden[0], act=act), hidden[0]
    return nn.Flatten(-len(image_shape)), math.prod(image_shape)


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: [..., in] -> [..., C, H, W] logits (leading dims kept)."""

    def __init__(self, in_features: int, image_shape: Sequence[int], hidden: int = 256, act: str = "relu"):
        super().__init__()
        c, h, w = image_shape
        check_conv_shape(image_shape)
        self.shape = (64, h // 4, w // 4)
        self.dense = nn.Sequential(
            nn.Linear(in_features, hidden),
            activation(act),
            nn.Linear(hidden, math.prod(self.shape)),
            activation(act),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 4, 2, 1),
            activation(act),
            nn.ConvTranspose2d(32, c, 4, 2, 1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        lead = z.shape[:-1]
        h = self.dense(z.reshape(-1, z.shape[-1])).reshape(-1, *self.shape)
        out = self.deconv(h)
        return out.reshape(*lead, *out.shape[1:])


class BernoulliDecoder(nn.Module):
    """z -> pixel logits with the image's shape; leading batch dimensions of z are kept."""

    def __init__(self, image_shape, z_dim: int, hidden=(256,), act: str = "relu", net: str = "mlp"):
        super().__init__()
        self.image_shape = tuple(image_shape)
        if net == "conv":
            self.net = ConvDecoder(z_dim, image_shape, hidden=hidden[0], act=act)
        else:
            self.net = MLP([z_dim, *reversed(hidden), math.prod(image_shape)], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.net(z)
        return out.reshape(*z.shape[:-1], -1)  # flat logits [..., D]


def pixel_likelihood(logits: torch.Tensor) -> dist.Distribution:
    """Independent Bernoulli pixels; grey levels in [0, 1] are allowed (a cross-entropy), hence no validation."""
    return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


NETS = ("mlp", "conv")


def check_network_options(options) -> None:
    """The network settings models share (``net``, ``classifier_net``, ``hidden``, ``z_dim``), checked."""
    for key in ("net", "classifier_net"):
        value = getattr(options, key, None)
        if value is not None and value not in NETS:
            raise ConfigError(f"options.{key} must be one of {', '.join(NETS)}, not '{value}'")
    hidden = getattr(options, "hidden", None)
    if hidden is not None and (not hidden or min(hidden) < 1):
        raise ConfigError(f"options.hidden must list at least one layer width, each at least 1, not {list(hidden)}")
    if getattr(options, "z_dim", 1) < 1:
        raise ConfigError(f"options.z_dim must be at least 1, not {options.z_dim}")
    if getattr(options, "act", "relu") not in ACTIVATIONS:
        raise ConfigError(f"options.act must be one of {', '.join(ACTIVATIONS)}, not '{options.act}'")


def check_conv_shape(image_shape: Sequence[int]) -> None:
    """The convolutional nets halve the image twice: height and width must be multiples of 4."""
    if len(image_shape) != 3 or image_shape[1] % 4 or image_shape[2] % 4 or image_shape[1] < 8:
        raise ConfigError(
            f"the convolutional network needs images of at least 8x8 with height and width divisible by 4, "
            f'not {"x".join(map(str, image_shape))}: use options.net = "mlp"'
        )
