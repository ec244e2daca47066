import pytest
import torch

from pyrossl.errors import ConfigError
from pyrossl.nn import MLP, ConvDecoder, ConvEncoder, GaussianHead, check_conv_shape


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
