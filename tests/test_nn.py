import pytest
import torch

from pyrossl.errors import ConfigError
from pyrossl.nn import (
    MLP,
    BernoulliDecoder,
    ConvDecoder,
    ConvEncoder,
    GaussianHead,
    check_conv_shape,
    make_encoder,
    pixel_likelihood,
)


def test_mlp_layers():
    net = MLP([5, 7, 3], "softplus")
    assert [type(m).__name__ for m in net] == ["Linear", "Softplus", "Linear"]
    assert net(torch.zeros(2, 5)).shape == (2, 3)


def test_gaussian_head_scale_is_positive():
    loc, scale = GaussianHead([4, 8, 2])(torch.randn(10, 4) * 100)
    assert loc.shape == scale.shape == (10, 2) and (scale > 0).all()


def test_conv_shapes_round_trip():
    enc, dec = ConvEncoder((1, 28, 28), 6), ConvDecoder(6, (1, 28, 28))
    h = enc(torch.zeros(2, 1, 28, 28))
    assert h.shape == (2, 6)
    assert dec(torch.zeros(3, 2, 6)).shape == (3, 2, 1, 28, 28)


@pytest.mark.parametrize("shape", [(1, 8, 6), (1, 4, 4), (3, 30, 30), (64,)])
def test_conv_refuses_sizes_it_cannot_take(shape):
    with pytest.raises(ConfigError, match="divisible by 4"):
        check_conv_shape(shape)


def test_unknown_activation():
    with pytest.raises(ConfigError, match="unknown activation 'relu6'"):
        MLP([2, 2, 2], "relu6")


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_the_shared_encoder_maps_images_to_vectors(net):
    encoder = make_encoder((1, 8, 8), 5, [16], "relu", net)
    assert encoder(torch.rand(3, 1, 8, 8)).shape == (3, 5)


@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_the_bernoulli_decoder_keeps_leading_dimensions_and_scores_grey_pixels(net):
    decoder = BernoulliDecoder((1, 8, 8), 4, [16], "relu", net)
    logits = decoder(torch.randn(2, 3, 4))
    assert logits.shape == (2, 3, 64)
    x = torch.rand(3, 64)  # grey levels: the cross-entropy -sum x log p + (1 - x) log (1 - p)
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(logits[0], x, reduction="none").sum(-1)
    assert torch.allclose(pixel_likelihood(logits[0]).log_prob(x), expected)
