"""``shapes``: a procedurally generated image dataset with five independent binary attributes.

Each grey-level image shows one shape on a black background. Its attributes are drawn independently,
each 1 with probability 1/2:

============  ====================================  ====================================
attribute     1                                     0
============  ====================================  ====================================
``round``     a disc (or ring)                      a square
``large``     half-width 0.23-0.26 of the side      half-width 0.14-0.17 of the side
``right``     centre in the right half              centre in the left half
``bottom``    centre in the lower half              centre in the upper half
``filled``    filled                                outlined
============  ====================================  ====================================

Within its attribute values, each image has continuous nuisance factors drawn uniformly: the exact
half-width, the centre's position inside its half, and the brightness (0.75-1). These are what a
model's style latent is left to capture; the attributes are known exactly, which makes "does this
latent dimension capture that characteristic" measurable. Edges are anti-aliased: a pixel's value is
the shape's coverage of it, estimated from the signed distance to the outline.

The images are made by the code from a seed, so the dataset is the same on every machine and
nothing is read from disk. The last sixth of the images is the official test part.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pyrossl.data.dataset import Dataset, choose_attributes
from pyrossl.errors import ConfigError

ATTRIBUTES = ("round", "large", "right", "bottom", "filled")
DEFAULT_SIZE = 32
DEFAULT_COUNT = 24_000
OUTLINE = 0.07  # outline thickness as a fraction of the side


def render(factors: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Images ``float32 [N, size, size]`` in [0, 1] from per-image factors (arrays of length N).

    ``factors``: ``round``, ``filled`` (0/1), ``half_width``, ``cx``, ``cy`` (fractions of the side;
    the centre in image coordinates, y downwards) and ``brightness``.
    """
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
    u = grid[None, None, :] - factors["cx"][:, None, None].astype(np.float32)
    v = grid[None, :, None] - factors["cy"][:, None, None].astype(np.float32)
    r = factors["half_width"][:, None, None].astype(np.float32)
    round_ = factors["round"][:, None, None].astype(bool)
    # signed distance to the outline (negative inside): Euclidean for a disc, Chebyshev for a square
    distance = np.where(round_, np.sqrt(u * u + v * v), np.maximum(np.abs(u), np.abs(v))) - r
    filled = factors["filled"][:, None, None].astype(bool)
    distance = np.where(filled, distance, np.abs(distance + OUTLINE / 2) - OUTLINE / 2)
    coverage = np.clip(0.5 - distance * size, 0.0, 1.0)  # one pixel of anti-aliasing
    return (coverage * factors["brightness"][:, None, None]).astype(np.float32)


def draw_factors(n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Attributes ``[n, 5]`` (columns in :data:`ATTRIBUTES` order) and the factors :func:`render` reads."""
    y = rng.integers(0, 2, size=(n, len(ATTRIBUTES)))
    round_, large, right, bottom, filled = y.T
    half_width = np.where(large == 1, rng.uniform(0.23, 0.26, n), rng.uniform(0.14, 0.17, n))

    # the centre lies inside its half and the whole shape inside the image
    def centre(upper_half):
        offset = rng.uniform(0.0, 1.0, n)
        low, high = half_width + 0.02, 0.5 - 0.04
        position = low + offset * np.maximum(high - low, 0.0)
        return np.where(upper_half == 1, 1.0 - position, position)

    factors = {
        "round": round_,
        "filled": filled,
        "half_width": half_width,
        "cx": centre(right),
        "cy": centre(bottom),
        "brightness": rng.uniform(0.75, 1.0, n),
    }
    return y, factors


def load_shapes(
    *,
    data_dir=None,
    attributes: Sequence[str] | None = None,
    image_size: int | None = None,
    num_examples: int | None = None,
    seed: int = 0,
) -> Dataset:
    """The ``shapes`` dataset as a multi-label :class:`Dataset` (see the module docstring).

    ``attributes``: which of :data:`ATTRIBUTES` are labels (default all five; the others still vary);
    ``image_size``: side of the square images (default 32, at least 16); ``num_examples``: how many
    images (default 24,000), the last sixth the test part; ``seed``: the generator's seed (the same
    seed gives the same images). ``data_dir`` is not used.
    """
    size = DEFAULT_SIZE if image_size is None else image_size
    count = DEFAULT_COUNT if num_examples is None else num_examples
    if isinstance(size, bool) or not isinstance(size, int) or size < 16:
        raise ConfigError(f"shapes: image_size must be an integer of at least 16, not {image_size!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 6:
        raise ConfigError(f"shapes: num_examples must be an integer of at least 6, not {num_examples!r}")
    chosen = choose_attributes("shapes", attributes, ATTRIBUTES, ATTRIBUTES)
    if len(set(chosen)) != len(chosen):
        raise ConfigError(f"shapes: attributes lists one twice: {chosen}")
    rng = np.random.default_rng(seed)
    y, factors = draw_factors(count, rng)
    x = render(factors, size)
    columns = [ATTRIBUTES.index(name) for name in chosen]
    num_test = count // 6
    return Dataset(
        name="shapes",
        x=torch.from_numpy(x[:, None]),
        y=torch.from_numpy(y[:, columns].astype(np.float32)),
        attributes=tuple(chosen),
        test_index=torch.arange(count - num_test, count),
        source=f"procedural shapes (seed {seed}, {count} images of {size}x{size})",
        extra={"factors": {k: torch.from_numpy(np.asarray(v)) for k, v in factors.items()}},
    )
