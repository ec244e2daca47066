import re

import numpy as np
import pytest
import torch

from pyrossl.data import load_dataset
from pyrossl.data.shapes import ATTRIBUTES, load_shapes, render
from pyrossl.errors import ConfigError


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    a, b, c = load_shapes(num_examples=60), load_shapes(num_examples=60), load_shapes(num_examples=60, seed=1)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert a.x.shape == (60, 1, 32, 32) and a.y.shape == (60, 5) and a.y.dtype == torch.float32
    assert a.multilabel and a.attributes == ATTRIBUTES
    assert 0 <= a.x.min() and a.x.max() <= 1
    assert a.test_index.tolist() == list(range(50, 60))  # the last sixth


def test_each_attribute_is_what_its_name_says():
    d = load_shapes(num_examples=1200)
    x, y = d.x[:, 0], d.y.bool()
    grid = (torch.arange(32) + 0.5) / 32
    mass = x.sum((1, 2))
    cx, cy = (x.sum(1) * grid).sum(1) / mass, (x.sum(2) * grid).sum(1) / mass
    col = {name: y[:, i] for i, name in enumerate(ATTRIBUTES)}
    assert torch.equal(cx > 0.5, col["right"]) and torch.equal(cy > 0.5, col["bottom"])
    # filled shapes have more ink than outlines of the same size and kind; large more than small
    for shape in (True, False):
        same = col["round"] == shape
        assert mass[same & col["filled"] & col["large"]].min() > mass[same & ~col["filled"] & col["large"]].max()
        assert mass[same & col["large"] & col["filled"]].min() > mass[same & ~col["large"] & col["filled"]].max()
    # a square fills its bounding box, a disc about pi/4 of it
    filled_large = col["filled"] & col["large"]
    box = (x > 0.5).any(1).sum(1).float() * (x > 0.5).any(2).sum(1).float()
    fill = (x > 0.5).sum((1, 2)) / box
    assert fill[filled_large & col["round"]].max() < 0.9 < fill[filled_large & ~col["round"]].min()


def test_attributes_are_balanced_and_independent():
    y = load_shapes(num_examples=6000).y
    assert torch.allclose(y.mean(0), torch.full((5,), 0.5), atol=0.03)
    corr = np.corrcoef(y.numpy().T)
    assert np.abs(corr - np.eye(5)).max() < 0.05


def test_attribute_subset_image_size_and_registry():
    d = load_dataset("shapes", attributes=["filled", "round"], image_size=64, num_examples=12)
    full = load_shapes(num_examples=12)
    assert d.attributes == ("filled", "round") and d.x.shape == (12, 1, 64, 64)
    assert torch.equal(d.y, full.y[:, [4, 0]])
    assert d.meta()["num_classes"] == 2


def test_render_draws_a_ring_for_an_outline():
    one = lambda v: np.array([v])  # noqa: E731
    factors = {
        "round": one(1),
        "filled": one(0),
        "half_width": one(0.25),
        "cx": one(0.5),
        "cy": one(0.5),
        "brightness": one(1.0),
    }
    ring = render(factors, 32)[0]
    assert ring[16, 16] == 0 and ring[16, 16 + 7] > 0.5 and ring[0, 0] == 0
    disc = render({**factors, "filled": one(1)}, 32)[0]
    assert disc[16, 16] == 1 and disc.sum() > ring.sum()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"attributes": ["rund"]}, "unknown attribute 'rund' (did you mean 'round'?)"),
        ({"attributes": []}, "at least one attribute"),
        ({"attributes": ["round", "round"]}, "lists one twice"),
        ({"image_size": 8}, "image_size must be an integer of at least 16"),
        ({"num_examples": 0}, "num_examples must be an integer of at least 6"),
        ({"num_examples": True}, "num_examples must be an integer"),
    ],
)
def test_bad_options_are_config_errors(options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_dataset("shapes", **options)
